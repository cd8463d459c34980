"""Restore: bring a block back to a verified copy on each node the ring names.

The one path (DESIGN invariant 4) shared by the mount's background repair
(`Placement.repair`), `hafs fsck --repair` and `hafs rebalance`:

1. `restore` looks at each target (a node the ring names): its copy is read and
   hashed (or, where the caller gives the block's `size`, a copy of that size is
   taken as good: fsck's fast pass).  A good copy read there is the source.
2. Only if a target lacks a good copy are bytes needed: the targets taken as
   good by size are read, then the other `sources`, until one copy hashes to
   the block's id.  A copy that does not is reported corrupt and never used
   (its store moves it aside).
3. Each target lacking a good copy gets the bytes (a target whose copy could not
   even be read has that copy deleted first: a put would keep a file of the
   right size), and the copy written is read back and hashed there.  Only then
   does the target count as good (`RestoreResult.good`).
4. `drop_extra` deletes copies on nodes the ring no longer names, and only when
   every target of the restore is good: a block never has fewer good copies
   than before.

Nothing is recorded or deleted on the strength of a write alone.  Failures of
a node are reported per node in the result, never raised (only programming
errors such as a malformed block id are).

Node health: where a `NodeHealth` (hafs.store.placement, the one place health
is kept) is given, every call to a node records its outcome there
(`NodeHealth.call`), and a node it knows to be down is not asked: as a target
it is reported failed, as a source or an extra copy it is skipped.

Concurrency: both functions are synchronous and make blocking store calls one
after another; run them in a worker thread (the mount:
`trio.to_thread.run_sync`, bounded by the placement's limiter; fsck and
rebalance: their thread pools).  They share nothing between calls but the
stores (made for any number of threads) and the health object (locked), so
restores of different blocks may run at once.  Two restores of one block at
once are harmless (the same bytes are written twice); a restore racing a
garbage collector's delete of the same block may leave an unreferenced copy,
which fsck reclaims after its grace period: the mount serializes both with its
keyed block lock.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from ..errors import BlockCorrupt, BlockMissing
from .dirstore import block_id as hash_id

if TYPE_CHECKING:
    from .placement import NodeHealth

log = logging.getLogger(__name__)


class BlockStore(Protocol):
    """What a restore needs of a node's store (DirStore and RemoteStore have it)."""

    def get(self, block_id: str) -> bytes | memoryview: ...
    def put(self, block_id: str, data: bytes | bytearray | memoryview) -> None: ...
    def size(self, block_id: str) -> int | None: ...
    def delete(self, block_id: str) -> bool: ...


Stores = Mapping[str, "BlockStore | None"]  # node id -> its store; None: could not be opened


@dataclass
class RestoreResult:
    """What `restore` found and did for one block (every list in the order nodes were met)."""

    block_id: str
    targets: list[str]
    good: list[str] = field(default_factory=list)  # targets holding a good copy now
    written: list[str] = field(default_factory=list)  # of those, the ones this call wrote
    failed: dict[str, str] = field(default_factory=dict)  # targets without one -> why
    corrupt: list[str] = field(default_factory=list)  # nodes whose copy failed its hash
    problems: list[str] = field(default_factory=list)  # failed reads: "corrupt on n2", "n3: ..."
    source: str | None = None  # the node whose verified bytes were read (None: none read)
    size: int | None = None  # the length of those bytes

    @property
    def complete(self) -> bool:
        """Every target holds a good copy."""
        return bool(self.targets) and not self.failed

    @property
    def found(self) -> bool:
        """A good copy exists somewhere (read and hashed, or a target taken as good)."""
        return self.source is not None or bool(self.good)


@dataclass
class DropResult:
    """What `drop_extra` deleted and what it kept (node -> why)."""

    deleted: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)


class _Nodes:
    """Calls to the nodes for one block: health recorded, down nodes not asked; the
    first verified copy read (`data`) and what the reads met, noted in `result`."""

    def __init__(self, result: RestoreResult, stores: Stores, health: NodeHealth | None) -> None:
        self.block_id = result.block_id
        self.result = result
        self.stores = stores
        self.health = health
        self.data: bytes | memoryview | None = None

    def unusable(self, node_id: str) -> str | None:
        """Why the node cannot be asked (no store, known down), else None."""
        if self.stores.get(node_id) is None:
            return f"node {node_id} is unavailable"
        if self.health is not None and self.health.is_down(node_id):
            why = self.health.down().get(node_id, "")
            return f"node {node_id} is down" + (f" ({why})" if why else "")
        return None

    def call(self, node_id: str, method: str, *args):
        fn = getattr(self.stores[node_id], method)
        if self.health is None:
            return fn(self.block_id, *args)
        return self.health.call(node_id, fn, self.block_id, *args)

    def read(self, node_id: str) -> bytes | memoryview:
        """The node's copy, hashed here: BlockCorrupt unless it hashes to the id."""
        data = self.call(node_id, "get")
        if hash_id(data) != self.block_id:
            raise BlockCorrupt(self.block_id, where=node_id)
        return data

    def ask(self, node_id: str) -> str:
        """`look` at a source, or "unusable" (noted among the problems) if it cannot be asked."""
        why = self.unusable(node_id)
        if why is None:
            return self.look(node_id)
        self.result.problems.append(why)
        return "unusable"

    def look(self, node_id: str) -> str:
        """Read and hash the node's copy: "good" (kept in `data` if the first), "missing",
        "corrupt" or "error" (noted in the result)."""
        try:
            got = self.read(node_id)
        except BlockMissing:
            return "missing"
        except BlockCorrupt:
            self.result.corrupt.append(node_id)
            self.result.problems.append(f"corrupt on {node_id}")
            return "corrupt"
        except OSError as e:
            self.result.problems.append(f"{node_id}: {e}")
            return "error"
        if self.data is None:
            self.data = got
            self.result.source, self.result.size = node_id, len(got)
        return "good"


def fetch(
    block_id: str, stores: Stores, sources: Iterable[str], *, health: NodeHealth | None = None
) -> tuple[bytes | memoryview | None, RestoreResult]:
    """The verified bytes of the block from the first of `sources` with a good copy (None if
    none has one), and what the reads met (`source`, `corrupt`, `problems`)."""
    nodes = _Nodes(RestoreResult(block_id, []), stores, health)
    for node_id in dict.fromkeys(sources):
        if nodes.ask(node_id) == "good":
            break
    return nodes.data, nodes.result


def restore(
    block_id: str,
    stores: Stores,
    targets: Iterable[str],
    sources: Iterable[str] | None = None,
    *,
    size: int | None = None,
    health: NodeHealth | None = None,
    throttle: Callable[[int], None] | None = None,
) -> RestoreResult:
    """Give every node of `targets` a verified copy of the block (see the module docstring).

    sources: other nodes that may hold a copy, asked in order once the targets
    gave none (default: every other node of `stores`).  size: the block's
    recorded size; given, a target's copy of that size counts as good unread.
    throttle: called with the byte count before each copy is written.
    """
    result = RestoreResult(block_id, list(dict.fromkeys(targets)))
    nodes = _Nodes(result, stores, health)
    unread: list[str] = []  # targets taken as good by their size: a source if one is needed
    lacking: list[tuple[str, bool]] = []  # (target, its copy is unreadable: delete it first)
    for node_id in result.targets:
        why = nodes.unusable(node_id)
        if why is not None:
            result.failed[node_id] = why
            continue
        if size is not None:
            try:
                if nodes.call(node_id, "size") == size:
                    unread.append(node_id)
                    result.good.append(node_id)
                    continue
            except OSError as e:
                result.problems.append(f"{node_id}: {e}")
                lacking.append((node_id, True))
                continue
        state = nodes.look(node_id)
        if state == "good":
            result.good.append(node_id)
        else:
            lacking.append((node_id, state == "error"))
    if not lacking:
        return result

    candidates = unread + [n for n in (stores if sources is None else sources)]
    for node_id in dict.fromkeys(candidates):
        if nodes.data is not None:
            break
        if node_id in result.targets and node_id not in unread:
            continue  # read above
        state = nodes.ask(node_id)
        if state != "good" and node_id in unread:
            result.good.remove(node_id)  # its size was right, its bytes are not
            lacking.append((node_id, state == "error"))
    data = nodes.data
    if data is None:
        why = "no good copy to copy from"
        if result.problems:
            why += f" ({'; '.join(result.problems)})"
        for node_id, _ in lacking:
            result.failed[node_id] = why
        return result

    for node_id, unreadable in lacking:
        why = nodes.unusable(node_id)  # it may have failed meanwhile
        if why is not None:
            result.failed[node_id] = why
            continue
        step = "deleting its unreadable copy"
        try:
            if unreadable:
                nodes.call(node_id, "delete")
            if throttle is not None:
                throttle(len(data))
            step = "writing"
            nodes.call(node_id, "put", data)
            step = "reading it back"
            nodes.read(node_id)
        except (BlockMissing, BlockCorrupt, OSError) as e:
            if isinstance(e, BlockCorrupt):
                result.corrupt.append(node_id)
            result.failed[node_id] = f"{step}: {e}"
            log.error("BLOCK-RESTORE-FAILED %s on node %s: %s: %s", block_id, node_id, step, e)
            continue
        result.good.append(node_id)
        result.written.append(node_id)
        log.info("BLOCK-RESTORED %s on node %s (from %s)", block_id, node_id, result.source)
    return result


def drop_extra(
    result: RestoreResult,
    stores: Stores,
    extra: Iterable[str],
    *,
    health: NodeHealth | None = None,
) -> DropResult:
    """Delete the block's copies on `extra` nodes, only if `result` is complete.

    A node among the restore's targets is never deleted from; one that is down
    (or without a store) keeps its copy until a later call.
    """
    nodes = _Nodes(result, stores, health)
    dropped = DropResult()
    extra = [n for n in dict.fromkeys(extra) if n not in result.targets]
    if not result.complete:
        failed = ", ".join(sorted(result.failed))
        for node_id in extra:
            dropped.kept[node_id] = f"not every target holds a good copy ({failed})"
        return dropped
    for node_id in extra:
        why = nodes.unusable(node_id)
        if why is not None:
            dropped.kept[node_id] = why
            continue
        try:
            if nodes.call(node_id, "delete"):
                dropped.deleted.append(node_id)
        except OSError as e:
            dropped.kept[node_id] = str(e)
    return dropped
