"""`hafs status`: nodes, replicas, logical vs stored bytes; and the node table it shares
with `hafs node list`.

`node_table` is the one place that asks every node of a ring what it holds: each
node's store is opened with `home.open_store` (a backing directory or a remote
`hafs node`) and asked for its usage, all nodes at once in worker threads, so one
slow or dead node costs one timeout, not one per node.  Beside what a node holds
(its share of the data) it gives the share of the ring's placements the node
should hold (its share of the ring), so a user sees what `hafs rebalance` would
even out.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .. import home as home_mod
from ..errors import HafsError
from ..meta import LEAD_ROLE
from ..store.remote import NodeAuth
from ..store.ring import Ring

NODE_TIMEOUT_S = 5.0  # a remote node that does not answer within this is shown down
SHARE_SAMPLES = 20_000  # sampled block ids for a node's share of the ring (about 30 ms)


def ring_shares(ring: Ring, replicas: int, samples: int = SHARE_SAMPLES) -> dict[str, float]:
    """Each node's share of the replica placements the ring makes (sums to 1 over nodes).

    Sampled over fixed pseudo-random ids, so it counts R replicas per block and
    zones exactly as placement does; draining nodes get 0.
    """
    rng = random.Random(0)
    counts: Counter[str] = Counter()
    for _ in range(samples):
        counts.update(ring.replicas(f"{rng.getrandbits(256):064x}", replicas))
    total = sum(counts.values()) or 1
    return {node_id: counts[node_id] / total for node_id in ring.nodes}


def node_table(
    ring: Ring, fs_uuid: str, auth: NodeAuth, replicas: int, timeout: float = NODE_TIMEOUT_S
) -> list[dict]:
    """One row per node of `ring`: its spec, state, what it holds, its shares.

    state: "up", "draining" (takes no new blocks; `hafs rebalance` empties it) or
    "down" (its store cannot be opened or does not answer; "draining" then says
    whether it was being emptied).  blocks/bytes are None for a down node.
    """

    def usage(spec):
        try:
            store = home_mod.open_store(spec, fs_uuid, auth, timeout)
        except (HafsError, OSError) as e:
            return None, str(e)
        try:
            return store.usage(), None
        except (HafsError, OSError) as e:
            return None, str(e)
        finally:
            if hasattr(store, "close"):  # a remote node's HTTP client
                store.close()

    specs = list(ring.nodes.values())
    with ThreadPoolExecutor(max(1, min(16, len(specs)))) as pool:
        usages = list(pool.map(usage, specs))
    shares = ring_shares(ring, replicas)
    held = sum(u.block_bytes for u, _ in usages if u is not None)
    rows = []
    for spec, (u, error) in zip(specs, usages, strict=True):
        state = "down" if u is None else spec.state
        rows.append(
            {
                "id": spec.id,
                "address": spec.address,
                "weight": spec.weight,
                "zone": spec.zone,
                "state": state,
                "draining": spec.state == "draining",
                "up": u is not None,
                "error": error,
                "blocks": None if u is None else u.block_count,
                "bytes": None if u is None else u.block_bytes,
                "free_bytes": None if u is None else u.free_bytes,
                "total_bytes": None if u is None else u.total_bytes,
                "ring_share": round(shares[spec.id], 4),
                "data_share": None if u is None else round(u.block_bytes / held, 4) if held else 0,
            }
        )
    return rows


def gather(home: Path) -> dict:
    meta = home_mod.open_meta(home)
    try:
        config = meta.config()
        fs_uuid, replicas = config.fs_uuid, config.replicas
        auth = NodeAuth(config.node_token, config.ca_pem)  # the metadata is closed when used
        ring = Ring.from_json(meta.ring())
        usage = meta.usage()
        logical, stored, count, files = (
            usage.logical_bytes,
            usage.stored_bytes,
            usage.blocks,
            usage.inodes,
        )
        degraded = meta.count_degraded()
        now = time.time_ns()
        locks = [
            {
                "name": lock.name,
                "path": meta.path_of(int(lock.name.split(":")[1])),
                "holder": lock.holder,
                "token": lock.token,
                "age_s": round((now - lock.acquired_ns) / 1e9, 1),
                "expires_in_s": round((lock.expires_ns - now) / 1e9, 1),
            }
            for lock in meta.locks.held()
        ]
        leader = meta.sessions.leader(LEAD_ROLE)  # None: every mount runs gc and repair
        sessions = [
            {
                "host": s.host,
                "mountpoint": s.mountpoint,
                "pid": s.pid,
                "version": s.version,
                "since_s": round((now - s.since_ns) / 1e9, 1),
                "leader": leader is None or leader == s.id,  # runs gc and repair
            }
            for s in meta.sessions.alive()
            if s.kind == "mount"
        ]
    finally:
        meta.close()
    return {
        "home": str(home),
        "mounts": sessions,
        "fs_uuid": fs_uuid,
        "replicas": replicas,
        "ring_version": ring.version,
        "inodes": files,
        "logical_bytes": logical,
        "stored_bytes": stored,
        "unique_blocks": count,
        "dedup_ratio": round(logical / stored, 3) if stored else None,
        "degraded_blocks": degraded,
        "nodes": node_table(ring, fs_uuid, auth, replicas),
        "locks": locks,
    }


def size_text(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def render_nodes(nodes: list[dict]) -> list[str]:
    """The node table of `hafs status` and `hafs node list`."""
    lines = [
        f"{'node':<6} {'state':<9} {'weight':>6} {'zone':<8} {'blocks':>8} {'bytes':>10}"
        f" {'ring':>6} {'data':>6}  address"
    ]
    for n in nodes:
        state = "DOWN" if n["state"] == "down" else n["state"]
        if n["state"] == "down" and n["draining"]:
            state = "DOWN,drn"
        blocks = "-" if n["blocks"] is None else n["blocks"]
        lines.append(
            f"{n['id']:<6} {state:<9} {n['weight']:>6g} {n['zone'] or '-':<8} {blocks:>8}"
            f" {size_text(n['bytes']):>10} {_pct(n['ring_share']):>6}"
            f" {_pct(n['data_share']):>6}  {n['address']}"
        )
        if n["error"]:
            lines.append(f"       {n['error']}")
    return lines


def render(r: dict) -> str:
    lines = [
        f"filesystem {r['fs_uuid']} in {r['home']}",
        f"replicas: {r['replicas']}   ring version: {r['ring_version']}   inodes: {r['inodes']}",
        f"logical: {size_text(r['logical_bytes'])}   stored once: {size_text(r['stored_bytes'])}"
        f" in {r['unique_blocks']} blocks   dedup ratio: {r['dedup_ratio'] or '-'}",
        "",
        *render_nodes(r["nodes"]),
    ]
    if r["degraded_blocks"]:
        lines += [
            "",
            f"degraded blocks: {r['degraded_blocks']} (written while a node was failing;"
            " a mount repairs them in the background, as does 'hafs fsck --repair')",
        ]
    lines += ["", f"mounted: {len(r['mounts'])}"]
    for m in r["mounts"]:
        lines.append(
            f"  {m['host']}:{m['mountpoint']}  pid {m['pid']}  hafs {m['version']}"
            f"  for {m['since_s']} s{'  (runs gc and repair)' if m['leader'] else ''}"
        )
    lines += ["", f"write locks held: {len(r['locks'])}"]
    for lk in r["locks"]:
        lines.append(
            f"  {lk['path']}  holder {lk['holder']}  token {lk['token']}  age {lk['age_s']} s"
            f"  (lease ends in {lk['expires_in_s']} s)"
        )
    return "\n".join(lines)
