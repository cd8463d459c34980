"""Placement: where blocks go on the ring, how replicas are written and read, node health.

- `put` writes a block to the R nodes the ring names, in parallel worker
  threads.  A node that is down (or fails the write) is replaced by the next
  healthy node clockwise on the ring, so R copies are still made while any R
  nodes work.  The put succeeds once every attempt has ended with at least W
  durable copies (W = the write quorum, a majority of R by default); fewer than
  R copies is logged BLOCK-DEGRADED and handed to `on_degraded` (the mount
  records it; `repair` puts it right once its nodes answer), fewer than W is
  `QuorumLost`.  A down node is tried only when the healthy ones
  cannot make W copies.
- `get` tries the ring's replicas in order, then every other node (a block
  written while its preferred node was failing lives elsewhere), healthy nodes
  first and down ones last, and returns only bytes whose hash matched (the store
  verifies).  Corrupt replicas are logged (BLOCK-CORRUPT) and skipped.
- `delete` removes an unreferenced block from every reachable node, only if no
  copy was written or re-stored within the grace period (a writer that just
  stored a block with this content is about to reference it).  A copy left on a
  down node is garbage for fsck.

Retries: a node that failed a get or put in a way that may be gone a moment
later (`is_temporary`: a refused or reset connection, a 5xx answer; never a
timeout) is tried once more after a jittered backoff, if no other node served
the read or the write still lacks its quorum.

Node health (`NodeHealth`): a node that refuses connections, or answers as
another node, is down at once; a timeout or another failure is a strike, and
STRIKES in a row make it down; any success clears the strikes.  `probe_loop`
pings the down nodes every few seconds in its own threads and brings back those
that answer (NODE-UP), so a hung node costs at most one request timeout per
call that was already waiting on it, and no call once it is marked down.

Concurrency rules: store calls are blocking and run in worker threads bounded
by one CapacityLimiter (probes have their own, so a full pool of calls stuck
on a hung node cannot delay the probe that marks it down).  `put` and `delete`
of the same block id are serialized by a keyed trio lock, so a garbage
collection in this mount can never delete a block that a writer of this mount
has just (re)stored.  `set_ring` swaps the ring and stores; a call already
running goes on with the ring and stores it started with.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from contextlib import asynccontextmanager

import trio

from ..errors import BlockCorrupt, BlockMissing, QuorumLost
from .dirstore import DirStore
from .remote import NodeRefused, NodeTimeout, NodeUnavailable, RemoteStore
from .ring import Ring

log = logging.getLogger(__name__)

STRIKES = 3  # failures in a row (timeouts, errors) that mark a node down
PROBE_INTERVAL_S = 2.0  # how often down nodes are pinged and free space refreshed
RETRY_BACKOFF_S = 0.25  # mean wait before the one retry of a node that failed temporarily


class NodeHealth:
    """Up or down, per node, from the outcomes of the calls made to it."""

    def __init__(self, strikes: int = STRIKES) -> None:
        self.strikes_to_down = strikes
        self._strikes: dict[str, int] = {}
        self._down: dict[str, str] = {}  # node id -> why

    def is_down(self, node_id: str) -> bool:
        return node_id in self._down

    def down(self) -> dict[str, str]:
        return dict(self._down)

    def success(self, node_id: str) -> None:
        self._strikes.pop(node_id, None)
        why = self._down.pop(node_id, None)
        if why is not None:
            log.warning("NODE-UP %s (was down: %s)", node_id, why)

    def failure(self, node_id: str, exc: BaseException) -> None:
        immediate = isinstance(exc, NodeUnavailable | NodeRefused) and not isinstance(
            exc, NodeTimeout
        )
        if isinstance(exc, NodeRefused) and exc.status not in (401, 409, None):
            immediate = False  # a disk error or a refused body: the node itself answers
        strikes = self._strikes.get(node_id, 0) + 1
        self._strikes[node_id] = strikes
        if (immediate or strikes >= self.strikes_to_down) and node_id not in self._down:
            self.mark_down(node_id, str(exc))

    def mark_down(self, node_id: str, why: str) -> None:
        self._down[node_id] = why
        log.warning("NODE-DOWN %s: %s", node_id, why)


def is_temporary(exc: BaseException) -> bool:
    """A failure that may be gone a moment later: a refused or reset connection (a node
    restarting) or a node's own 5xx answer.  Not a timeout (it took long enough
    already), a full disk or a refusal that would only repeat."""
    if isinstance(exc, NodeTimeout):
        return False
    if isinstance(exc, NodeUnavailable):
        return True
    return isinstance(exc, NodeRefused) and (exc.status or 0) >= 500 and exc.status != 507


async def backoff() -> None:
    """Wait before a retry: RETRY_BACKOFF_S, jittered so that callers do not retry in step."""
    await trio.sleep(RETRY_BACKOFF_S * random.uniform(0.5, 1.5))


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
        self,
        ring: Ring,
        stores: dict[str, DirStore | RemoteStore],
        replicas: int,
        limiter: trio.CapacityLimiter,
        write_quorum: int | None = None,
        health: NodeHealth | None = None,
        on_degraded: Callable[[str, list[str]], None] | None = None,
    ) -> None:
        self.ring = ring
        self.stores = stores
        self.replicas = replicas
        self.write_quorum = write_quorum or replicas
        self.limiter = limiter
        self.health = health or NodeHealth()
        self._block_locks = KeyedLock()
        self._probe_limiter = trio.CapacityLimiter(8)
        # remote nodes: node id -> (disk id, total bytes, free bytes), refreshed by probe_loop
        self.usage: dict[str, tuple[str, int, int]] = {}
        self.degraded = 0  # blocks stored with fewer than R copies or off their ring nodes
        self._degraded_logged = -1e9
        self.on_degraded = on_degraded  # records such a block (id, nodes holding it) for repair

    def set_ring(self, ring: Ring, stores: dict[str, DirStore | RemoteStore]) -> None:
        """Use a new version of the ring (and the stores of its nodes) from now on."""
        self.ring, self.stores = ring, stores

    async def _call(self, node_id: str, fn: Callable, *args):
        """fn(*args) in a worker thread; a node failure (OSError) is counted against the node."""
        try:
            result = await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)
        except (BlockMissing, BlockCorrupt):
            self.health.success(node_id)
            raise
        except OSError as e:
            self.health.failure(node_id, e)
            raise
        self.health.success(node_id)
        return result

    def _candidates(self, block_id: str) -> Iterator[str]:
        """Preferred replicas first, then every other node clockwise; down nodes last."""
        preferred = self.ring.replicas(block_id, self.replicas)
        order = preferred + [n for n in self.ring.walk(block_id) if n not in preferred]
        down = [n for n in order if self.health.is_down(n)]
        yield from (n for n in order if n not in down)
        yield from down

    async def put(self, block_id: str, data: bytes | memoryview) -> None:
        async with self._block_locks(block_id):
            stores = self.stores  # this call's view, whatever set_ring does meanwhile
            order = list(self._candidates(block_id))
            ring = self.ring
            # draining nodes are being emptied: like down ones, only a last resort
            healthy = [
                n for n in order if not self.health.is_down(n) and ring.nodes[n].state == "up"
            ]
            stored: list[str] = []
            errors: list[str] = []
            retry: list[str] = []  # nodes that failed in a way worth one more try
            queue: Iterator[str] = iter(())

            async def store_on(node_id: str | None) -> None:
                while node_id is not None:
                    try:
                        await self._call(node_id, stores[node_id].put, block_id, data)
                    except OSError as e:
                        log.error("BLOCK-WRITE-FAILED %s on node %s: %s", block_id, node_id, e)
                        errors.append(f"{node_id}: {e}")
                        if is_temporary(e):
                            retry.append(node_id)
                        node_id = next(queue, None)
                    else:
                        stored.append(node_id)
                        return

            async def attempt(nodes: list[str]) -> None:
                nonlocal queue
                queue = iter(nodes)
                async with trio.open_nursery() as nursery:
                    for _ in range(self.replicas - len(stored)):
                        nursery.start_soon(store_on, next(queue, None))

            await attempt(healthy)
            if len(stored) < self.write_quorum:  # last resort: draining nodes, those believed down
                await attempt([n for n in order if n not in healthy])
            if len(stored) < self.write_quorum and retry:
                await backoff()
                again, retry[:] = list(dict.fromkeys(retry)), []
                await attempt(again)
            if len(stored) < self.write_quorum:
                raise QuorumLost(
                    f"block {block_id}: {len(stored)} of {self.replicas} copies stored, at least"
                    f" {self.write_quorum} needed ({'; '.join(errors) or 'not enough nodes'})"
                )
            named = self.ring.replicas(block_id, self.replicas)
            if set(stored) != set(named):
                self._degraded(block_id, stored, named)

    def _degraded(self, block_id: str, stored: list[str], named: list[str]) -> None:
        """Record a block stored off its ring nodes; log the first, then a count every 10 s."""
        self.degraded += 1
        if self.on_degraded is not None:
            self.on_degraded(block_id, stored)
        now = time.monotonic()
        if now - self._degraded_logged >= 10:
            log.warning(
                "BLOCK-DEGRADED %s: copies on %s, the ring names %s; %d blocks so far"
                " (recorded: background repair puts them right once the nodes answer)",
                block_id,
                ", ".join(sorted(stored)),
                ", ".join(named),
                self.degraded,
            )
            self._degraded_logged = now

    async def repair(self, block_id: str, holders: list[str]) -> bool | None:
        """Put a degraded block right: True once it is, False if that failed (try
        again later), None while it waits for a node that is down.

        Every node the ring names gets a verified copy (read from any node that
        has one), and only then are the stand-in copies on `holders` the ring
        does not name deleted, so the block never has fewer copies than before.
        Nothing is done while a named node is down; a stand-in that is down keeps
        its copy until it answers.
        """
        named = self.ring.replicas(block_id, self.replicas)
        if any(self.health.is_down(n) for n in named):
            return None
        async with self._block_locks(block_id):
            stores = self.stores  # this call's view, whatever set_ring does meanwhile
            stand_ins = [n for n in holders if n not in named and n in stores]
            failed: list[str] = []

            async def copy_to(node_id: str, data: bytes) -> None:
                try:
                    await self._call(node_id, stores[node_id].put, block_id, data)
                except OSError as e:
                    failed.append(str(e))

            try:
                lacking = [n for n in named if not await self._call(n, stores[n].has, block_id)]
                if lacking:
                    data = await self.get(block_id)
                    async with trio.open_nursery() as nursery:
                        for node_id in lacking:
                            nursery.start_soon(copy_to, node_id, data)
                if not failed:
                    for node_id in stand_ins:
                        if not self.health.is_down(node_id):
                            await self._call(node_id, stores[node_id].delete, block_id)
            except (OSError, BlockMissing) as e:
                failed.append(str(e))
            if failed:
                log.info("repair of block %s deferred: %s", block_id, "; ".join(failed))
                return False
        return None if any(self.health.is_down(n) for n in stand_ins) else True

    async def get(self, block_id: str) -> bytes:
        problems: list[str] = []
        stores = self.stores  # this call's view, whatever set_ring does meanwhile
        nodes = list(self._candidates(block_id))
        for attempt in range(2):
            retry = []  # nodes that failed in a way worth one more try
            for node_id in nodes:
                try:
                    return await self._call(node_id, stores[node_id].get, block_id)
                except BlockMissing:
                    continue
                except BlockCorrupt:
                    problems.append(f"corrupt on {node_id}")
                except OSError as e:
                    log.error("BLOCK-READ-FAILED %s on node %s: %s", block_id, node_id, e)
                    problems.append(f"{node_id}: {e}")
                    if is_temporary(e):
                        retry.append(node_id)
            if not retry or attempt:
                break
            await backoff()
            nodes = retry
        raise BlockMissing(block_id, "; ".join(problems) or "on no node")

    async def delete(self, block_id: str, grace_s: float) -> bool:
        """Delete an unreferenced block everywhere unless a copy is younger than grace_s."""
        async with self._block_locks(block_id):
            cutoff = time.time_ns() - int(grace_s * 1e9)
            stores = self.stores  # this call's view, whatever set_ring does meanwhile
            nodes = [n for n in self.ring.walk(block_id) if not self.health.is_down(n)]
            for node_id in nodes:
                mtime = await self._call(node_id, stores[node_id].mtime_ns, block_id)
                if mtime is not None and mtime >= cutoff:
                    return False
            for node_id in nodes:
                await self._call(node_id, stores[node_id].delete, block_id)
            return True

    async def probe_loop(self, interval: float = PROBE_INTERVAL_S) -> None:
        """Bring back down nodes that answer again; keep remote nodes' free space fresh."""
        while True:
            async with trio.open_nursery() as nursery:
                for node_id, store in list(self.stores.items()):
                    if self.health.is_down(node_id) or isinstance(store, RemoteStore):
                        nursery.start_soon(self._probe, node_id, store)
            await trio.sleep(interval)

    async def _probe(self, node_id: str, store: DirStore | RemoteStore) -> None:
        try:
            if isinstance(store, RemoteStore):
                st = await trio.to_thread.run_sync(store.status, limiter=self._probe_limiter)
                disk = st.get("disk_id") if isinstance(st.get("disk_id"), str) else node_id
                self.usage[node_id] = (disk, st["total_bytes"], st["free_bytes"])
            else:
                await trio.to_thread.run_sync(store.ping, limiter=self._probe_limiter)
        except OSError as e:
            if not self.health.is_down(node_id):
                self.health.failure(node_id, e)
            return
        self.health.success(node_id)
