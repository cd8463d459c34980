"""Placement: a consistent-hash ring that maps a block id to the nodes holding it.

Invariant 3 (DESIGN.md) makes placement a pure function of (ring, block id), and
invariant 4 puts replicas on distinct nodes and, where zones allow it, distinct
zones.  This module is that function; it does no I/O and holds no mutable state
after construction, so one `Ring` may be shared by any number of tasks and threads.

The scheme
----------
- The ring is the 64-bit integer circle.  A block id is a 64-char hex BLAKE3
  digest, already uniform, so its position is simply its first 16 hex digits:
  ``int(block_id[:16], 16)``.
- Each node owns ``round(weight * VNODES_PER_WEIGHT)`` points (at least 1 when
  weight > 0; weight 0 means no points), point ``i`` of node ``n`` being the first
  8 bytes (big-endian) of ``blake3(f"{n}#{i}")``.  Points are sorted once, in
  ``__init__``; ties (never seen in practice) are broken by node id, so the order
  does not depend on the order the nodes were given.
- A key belongs to the first point at or after its position (``bisect_left``),
  wrapping past the top.  ``walk()`` yields the distinct owners of the points from
  there on, clockwise: the fallback order for "next healthy node" and failover
  reads.  Every node appears in it, draining ones too; nodes with weight 0 (no
  points) come last, in id order, so that reads can still find data left there.
- ``replicas(block_id, r)`` takes the first r distinct *up* nodes of that walk,
  preferring new zones: a first pass takes only nodes whose zone is not used yet,
  and stops once it has r nodes or has used every zone; if that gives fewer than
  r, a second pass from the same start fills with the remaining distinct nodes in
  ring order.  A node without a zone counts as a zone of its own.  Draining nodes
  are left out of a separate point list, so draining a node places blocks exactly
  as removing it would, and `hafs rebalance` can empty it before it is removed.
  With fewer than r eligible nodes, all of them are returned.

Minimal movement: adding a node only inserts its points into the walk, so a
key's replica set changes only by taking the new node in, and (without zones)
only a 1/N share of the (key, replica) assignments moves; removing or draining
a node moves only the assignments it held.  With zones, adding a node can also
shift which node of a zone is chosen, so movement is larger than ideal there.

The vnode count
---------------
VNODES_PER_WEIGHT = 2048.  A node's share of the circle is the sum of its arcs,
whose relative standard deviation is about 1/sqrt(vnodes).  Measured as exact
arc lengths (no sampling) for sets of 10 equal nodes with random ids, max/mean was:

    vnodes   sets   mean max/mean   p95     worst   (n1..n10)
    256      30     1.103           --      1.181   (1.099)
    1024     200    1.049           1.077   1.094   (1.044; one 30-set run saw 1.127)
    2048     200    1.035           1.058   1.073   (1.033)

so 2048 keeps the busiest of 10 nodes within 10% of the mean for any node
names, with margin for sampling noise.  For nodes n1..n10 and 1,000,000 random
keys the busiest node holds 1.034x the mean (primary replicas; tests/test_ring.py
asserts <= 1.10).  The cost is in the build: about 1.4 us per point, so some
28 ms for 10 nodes of weight 1; build a new Ring in a worker thread if that
matters (invariant 7).  Lookups do not depend on the point count: ``replicas``
for r=2 takes about 1.5 us with 3-10 nodes.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from blake3 import blake3

NODE_STATES = ("up", "draining")

# Running mounts read the ring's version from the metadata this often and switch to a
# new version without remounting; `hafs rebalance` waits RING_SETTLE_S after a change
# before it moves anything, so that every mount writes new blocks to the new homes.
RING_RELOAD_S = 1.0
RING_SETTLE_S = 3.0

_BLOCK_ID_LEN = 64


@dataclass(frozen=True)
class NodeSpec:
    """One node of the ring; `address` is opaque here (a directory or a URL).

    A ``draining`` node gets no new placements but is still walked for reads.
    """

    id: str
    address: str
    weight: float = 1.0
    zone: str | None = None
    state: str = "up"

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise ValueError(f"node id must be a non-empty string, not {self.id!r}")
        if not isinstance(self.address, str):
            raise ValueError(f"node {self.id}: address must be a string, not {self.address!r}")
        if isinstance(self.weight, bool) or not isinstance(self.weight, int | float):
            raise ValueError(f"node {self.id}: weight must be a number, not {self.weight!r}")
        if not math.isfinite(self.weight) or self.weight < 0:
            raise ValueError(f"node {self.id}: weight must be finite and >= 0, not {self.weight!r}")
        if self.zone is not None and not isinstance(self.zone, str):
            raise ValueError(f"node {self.id}: zone must be a string or None, not {self.zone!r}")
        if self.state not in NODE_STATES:
            raise ValueError(
                f"node {self.id}: state must be one of {NODE_STATES}, not {self.state!r}"
            )
        # Normalise so that NodeSpec(weight=2) == NodeSpec(weight=2.0) and JSON round-trips.
        object.__setattr__(self, "weight", float(self.weight))


def vnode_count(weight: float, per_weight: int) -> int:
    """How many points a node of this weight owns: 0 for weight 0, else at least 1."""
    if weight <= 0:
        return 0
    return max(1, round(weight * per_weight))


def vnode_point(node_id: str, i: int) -> int:
    """The position of point `i` of node `node_id` on the 64-bit circle."""
    return int.from_bytes(blake3(f"{node_id}#{i}".encode()).digest(8), "big")


def key_position(block_id: str) -> int:
    """The position of a block id (64-char hex BLAKE3 digest) on the 64-bit circle."""
    if len(block_id) != _BLOCK_ID_LEN:
        raise ValueError(f"block id must be {_BLOCK_ID_LEN} hex characters, got {block_id!r}")
    return int(block_id[:16], 16)


class _Points:
    """Sorted points with their owners and the owners' zone keys (parallel lists)."""

    __slots__ = ("points", "owners", "zones", "n_nodes", "n_zones")

    def __init__(self, points: list[int], owners: list[str], zone_of: Mapping[str, Hashable]):
        self.points = points
        self.owners = owners
        self.zones = [zone_of[o] for o in owners]
        self.n_nodes = len(set(owners))
        self.n_zones = len(set(self.zones))


class Ring:
    """An immutable consistent-hash ring built from node specs; see the module docstring."""

    VNODES_PER_WEIGHT = 2048

    def __init__(self, nodes: Sequence[NodeSpec], version: int = 1) -> None:
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise ValueError(f"ring version must be an integer >= 0, not {version!r}")
        if not nodes:
            raise ValueError("a ring needs at least one node")
        seen: set[str] = set()
        for n in nodes:
            if not isinstance(n, NodeSpec):
                raise ValueError(f"ring nodes must be NodeSpec, not {type(n).__name__}")
            if n.id in seen:
                raise ValueError(f"duplicate node id {n.id!r} in ring")
            seen.add(n.id)
        if all(n.weight == 0 for n in nodes):
            raise ValueError("no node has a positive weight: the ring could place nothing")

        self.version: int = version
        # Sorted by id, so the ring (and its JSON) does not depend on input order.
        self.nodes: dict[str, NodeSpec] = {n.id: n for n in sorted(nodes, key=lambda n: n.id)}

        # A node without a zone is a zone of its own; the tuple cannot equal a zone name.
        zone_of: dict[str, Hashable] = {
            n.id: n.zone if n.zone is not None else ("node", n.id) for n in nodes
        }
        # Sort (point, node index) packed into one int: fast, and ties go by node id.
        ids = list(self.nodes)
        shift = max(1, len(ids).bit_length())
        packed = [
            (vnode_point(node_id, i) << shift) | j
            for j, node_id in enumerate(ids)
            for i in range(self._vnodes(self.nodes[node_id].weight))
        ]
        packed.sort()
        mask = (1 << shift) - 1
        points = [p >> shift for p in packed]
        owners = [ids[p & mask] for p in packed]
        self._all = _Points(points, owners, zone_of)
        up = [k for k, o in enumerate(owners) if self.nodes[o].state == "up"]
        self._up = _Points([points[k] for k in up], [owners[k] for k in up], zone_of)
        self._unplaced = [n.id for n in self.nodes.values() if n.weight == 0]

    @classmethod
    def _vnodes(cls, weight: float) -> int:
        return vnode_count(weight, cls.VNODES_PER_WEIGHT)

    def __repr__(self) -> str:
        return f"Ring(version={self.version}, nodes={list(self.nodes.values())!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Ring):
            return NotImplemented
        return self.version == other.version and self.nodes == other.nodes

    def replicas(self, block_id: str, r: int) -> list[str]:
        """The ids of the up to `r` distinct up nodes that hold `block_id`, primary first."""
        pos = key_position(block_id)
        ring = self._up
        points = ring.points
        n = len(points)
        want = min(r, ring.n_nodes)
        if want <= 0:
            return []
        owners = ring.owners
        start = bisect_left(points, pos)
        chosen: list[str] = []
        # range(start - n, start) visits start..n-1 then 0..start-1 through negative indexes.
        if ring.n_zones == ring.n_nodes:
            # Every node is its own zone: a plain walk for distinct nodes (the common case).
            for k in range(start - n, start):
                o = owners[k]
                if o not in chosen:
                    chosen.append(o)
                    if len(chosen) == want:
                        return chosen
            return chosen  # pragma: no cover - want <= n_nodes, so the loop returns

        zones = ring.zones
        want_zones = min(want, ring.n_zones)
        used: set[Hashable] = set()
        for k in range(start - n, start):
            z = zones[k]
            if z not in used:
                used.add(z)
                chosen.append(owners[k])
                if len(chosen) == want_zones:
                    break
        if len(chosen) < want:
            for k in range(start - n, start):
                o = owners[k]
                if o not in chosen:
                    chosen.append(o)
                    if len(chosen) == want:
                        break
        return chosen

    def walk(self, block_id: str) -> Iterator[str]:
        """Every node id once, clockwise from `block_id`, draining nodes included.

        Nodes of weight 0 own no points; they come last, in id order.
        """
        pos = key_position(block_id)
        ring = self._all
        points = ring.points
        owners = ring.owners
        n = len(points)
        start = bisect_left(points, pos)
        seen: set[str] = set()
        for k in range(start - n, start):
            o = owners[k]
            if o not in seen:
                seen.add(o)
                yield o
                if len(seen) == ring.n_nodes:
                    break
        yield from self._unplaced

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready description: ``{"version": v, "nodes": [{id, address, ...}, ...]}``."""
        return {"version": self.version, "nodes": [asdict(n) for n in self.nodes.values()]}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Ring:
        """The ring that `to_json` described; ValueError on a malformed description."""
        if not isinstance(d, Mapping) or "nodes" not in d or "version" not in d:
            raise ValueError("ring description must be a mapping with 'version' and 'nodes'")
        if not isinstance(d["nodes"], list):
            raise ValueError("ring description: 'nodes' must be a list")
        specs = []
        for item in d["nodes"]:
            if not isinstance(item, Mapping):
                raise ValueError(f"ring description: node entry must be a mapping, not {item!r}")
            try:
                specs.append(NodeSpec(**item))
            except TypeError as e:
                raise ValueError(f"ring description: bad node entry {dict(item)!r}: {e}") from e
        return cls(specs, version=d["version"])
