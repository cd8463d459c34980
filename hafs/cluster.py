"""Placement: where blocks go on the ring, and how R replicas are written and read.

- `put` writes a block to the R nodes the ring names, in parallel worker
  threads, and returns once every copy is durable.  A node that fails is
  skipped for the next node clockwise on the ring, so R copies are still made
  while any R nodes work; fewer than R durable copies is `QuorumLost`.
- `get` tries the ring's replicas in order, then every other node (a block
  written while its preferred node was failing lives elsewhere), and returns
  only bytes whose hash matched (the store verifies).  Corrupt replicas are
  logged (BLOCK-CORRUPT) and skipped.
- `delete` removes an unreferenced block from every node, only if no copy was
  written or re-stored within the grace period (a writer that just stored a
  block with this content is about to reference it).

Concurrency rules: store calls are blocking and run in worker threads bounded
by one CapacityLimiter.  `put` and `delete` of the same block id are
serialized by a keyed trio lock, so a garbage collection in this mount can
never delete a block that a writer of this mount has just (re)stored.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import asynccontextmanager

import trio

from .blocks import DirStore
from .errors import BlockCorrupt, BlockMissing, QuorumLost
from .ring import Ring

log = logging.getLogger(__name__)


class KeyedLock:
    """One trio lock per key, created on demand and dropped when unused."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[trio.Lock, int]] = {}

    @asynccontextmanager
    async def __call__(self, key: str):
        lock, users = self._locks.get(key, (None, 0))
        if lock is None:
            lock = trio.Lock()
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


class Placement:
    """R-way replicated block storage over the nodes of a ring."""

    def __init__(
        self, ring: Ring, stores: dict[str, DirStore], replicas: int, limiter: trio.CapacityLimiter
    ) -> None:
        self.ring = ring
        self.stores = stores
        self.replicas = replicas
        self.limiter = limiter
        self._block_locks = KeyedLock()

    def _run(self, fn: Callable, *args):
        return trio.to_thread.run_sync(fn, *args, limiter=self.limiter)

    def _candidates(self, block_id: str) -> Iterator[str]:
        """Preferred replicas first, then every other node clockwise."""
        preferred = self.ring.replicas(block_id, self.replicas)
        yield from preferred
        for node_id in self.ring.walk(block_id):
            if node_id not in preferred:
                yield node_id

    async def put(self, block_id: str, data: bytes | memoryview) -> None:
        async with self._block_locks(block_id):
            candidates = self._candidates(block_id)
            stored: list[str] = []
            errors: list[str] = []

            async def store_on(node_id: str) -> None:
                try:
                    await self._run(self.stores[node_id].put, block_id, data)
                except OSError as e:
                    log.error("BLOCK-WRITE-FAILED %s on node %s: %s", block_id, node_id, e)
                    errors.append(f"{node_id}: {e}")
                    nxt = next(candidates, None)
                    if nxt is not None:
                        await store_on(nxt)
                else:
                    stored.append(node_id)

            async with trio.open_nursery() as nursery:
                for _ in range(self.replicas):
                    node_id = next(candidates, None)
                    if node_id is None:
                        break
                    nursery.start_soon(store_on, node_id)
            if len(stored) < self.replicas:
                raise QuorumLost(
                    f"block {block_id}: {len(stored)} of {self.replicas} copies stored"
                    f" ({'; '.join(errors) or 'not enough nodes'})"
                )

    async def get(self, block_id: str) -> bytes:
        problems: list[str] = []
        for node_id in self._candidates(block_id):
            try:
                return await self._run(self.stores[node_id].get, block_id)
            except BlockMissing:
                continue
            except BlockCorrupt:
                problems.append(f"corrupt on {node_id}")
            except OSError as e:
                log.error("BLOCK-READ-FAILED %s on node %s: %s", block_id, node_id, e)
                problems.append(f"{node_id}: {e}")
        raise BlockMissing(block_id, "; ".join(problems) or "on no node")

    async def delete(self, block_id: str, grace_s: float) -> bool:
        """Delete an unreferenced block everywhere unless a copy is younger than grace_s."""
        async with self._block_locks(block_id):
            cutoff = time.time_ns() - int(grace_s * 1e9)
            for node_id in self.ring.walk(block_id):
                mtime = await self._run(self.stores[node_id].mtime_ns, block_id)
                if mtime is not None and mtime >= cutoff:
                    return False
            for node_id in self.ring.walk(block_id):
                await self._run(self.stores[node_id].delete, block_id)
            return True
