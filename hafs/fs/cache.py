"""BlockCache: recently read blocks, bounded in bytes, with one fetch per block at a time.

Concurrency: used from the trio thread only.  `get` awaits the fetch of a
missing block; concurrent callers for the same id wait for that one fetch
instead of starting their own, and share its error if it fails (so a caller
waits at most for one fetch, whose time placement bounds); one that was
cancelled is started again by the next waiter.  A failed fetch is remembered
for FAILED_TTL_S: the kernel retries a failed read at once, and that retry
gets the same error at once instead of waiting out the bound a second time.
Eviction is least-recently-used by bytes.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable

import trio

from ..metrics import MountMetrics

FAILED_TTL_S = 1.0  # how long the error of a failed fetch is given to callers without a new try


class _Fetch:
    """One fetch in progress: its waiters wake on `done` and share its `error`."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.error: Exception | None = None


class BlockCache:
    def __init__(
        self,
        limit_bytes: int,
        fetch: Callable[[str], Awaitable[bytes]],
        metrics: MountMetrics | None = None,
    ) -> None:
        """metrics: where hits and misses are counted (default: a new set)."""
        self.limit = limit_bytes
        self.metrics = metrics or MountMetrics()
        self._fetch = fetch
        self._blocks: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0
        self._pending: dict[str, _Fetch] = {}
        self._failed: dict[str, tuple[float, Exception]] = {}  # block id -> (until, error)

    def peek(self, block_id: str) -> bytes | None:
        data = self._blocks.get(block_id)
        if data is not None:
            self._blocks.move_to_end(block_id)
        return data

    def __contains__(self, block_id: str) -> bool:
        return block_id in self._blocks or block_id in self._pending

    async def get(self, block_id: str) -> bytes:
        """The block's bytes: a hit if cached (or being fetched by another caller already)."""
        hit = self.metrics.cache_hits
        while True:
            data = self.peek(block_id)
            if data is not None:
                hit.inc()
                return data
            until, error = self._failed.get(block_id, (0.0, None))
            if error is not None:
                if trio.current_time() < until:
                    raise error
                del self._failed[block_id]
            fetch = self._pending.get(block_id)
            if fetch is None:
                break
            await fetch.done.wait()
            if fetch.error is not None:
                raise fetch.error
        self.metrics.cache_misses.inc()
        fetch = self._pending[block_id] = _Fetch()
        try:
            data = await self._fetch(block_id)
            self.put(block_id, data)
            return data
        except Exception as e:
            fetch.error = e
            now = trio.current_time()
            self._failed = {b: f for b, f in self._failed.items() if f[0] > now}
            self._failed[block_id] = (now + FAILED_TTL_S, e)
            raise
        finally:
            del self._pending[block_id]
            fetch.done.set()

    def put(self, block_id: str, data: bytes) -> None:
        if len(data) > self.limit:
            return
        old = self._blocks.pop(block_id, None)
        if old is not None:
            self._bytes -= len(old)
        self._blocks[block_id] = data
        self._bytes += len(data)
        while self._bytes > self.limit:
            _, evicted = self._blocks.popitem(last=False)
            self._bytes -= len(evicted)

    def clear(self) -> None:
        self._blocks.clear()
        self._bytes = 0
