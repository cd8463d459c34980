"""MemKV: the `KV` of meta/kv.py in memory, for tests.

An ordered map (a sorted list of keys beside a dict), one global revision
counter, and leases that end lazily: every call first ends the leases whose
ttl has passed by `clock` (injectable, so tests end a lease by moving it on),
deleting their keys in one revision, as etcd does.  It keeps no history: a
`snapshot` is a copy of the map (it is all in memory anyway).

Concurrency: KvMeta calls a KV from worker threads; every method holds one
threading.Lock for its whole duration, so each call is atomic.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from .kv import LeaseNotFound


@dataclass
class _Lease:
    ttl_ns: int
    deadline_ns: int
    keys: set[bytes] = field(default_factory=set)


class MemKV:
    def __init__(self, clock: Callable[[], int] = time.monotonic_ns, name: str = "memkv") -> None:
        self.name = name
        self.clock = clock
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # notified by every write (watch)
        self._keys: list[bytes] = []  # sorted
        self._data: dict[bytes, tuple[bytes, int, int | None]] = {}  # value, mod_revision, lease
        self._rev = 0
        self._leases: dict[int, _Lease] = {}
        self._next_lease = 1

    # ------------------------------------------------------------ internals

    def _expire(self) -> None:
        now = self.clock()
        ended = [lid for lid, le in self._leases.items() if le.deadline_ns <= now]
        for lid in ended:
            self._end_lease(lid)

    def _end_lease(self, lid: int) -> None:
        lease = self._leases.pop(lid)
        if lease.keys:
            self._rev += 1
            for key in lease.keys:
                self._remove(key)
            self._changed.notify_all()

    def _remove(self, key: bytes) -> None:
        old = self._data.pop(key, None)
        if old is None:
            return
        del self._keys[bisect.bisect_left(self._keys, key)]
        if old[2] is not None and old[2] in self._leases:
            self._leases[old[2]].keys.discard(key)

    # ------------------------------------------------------------------- KV

    def get(self, key: bytes) -> tuple[bytes, int] | None:
        with self._lock:
            self._expire()
            row = self._data.get(key)
            return None if row is None else (row[0], row[1])

    def scan(self, start: bytes, end: bytes, limit: int) -> list[tuple[bytes, bytes, int]]:
        with self._lock:
            self._expire()
            return _scan(self._keys, self._data, start, end, limit)

    def batch(self, reads: list[tuple[bytes, bytes | None, int]]) -> list[list[tuple]]:
        with self._lock:
            self._expire()
            out = []
            for start, end, limit in reads:
                if end is None:
                    row = self._data.get(start)
                    out.append([] if row is None else [(start, row[0], row[1])])
                else:
                    out.append(_scan(self._keys, self._data, start, end, limit))
            return out

    @contextmanager
    def snapshot(self) -> Iterator[_Frozen]:
        with self._lock:
            self._expire()
            frozen = _Frozen(list(self._keys), dict(self._data))
        yield frozen

    def commit(
        self,
        checks: dict[bytes, int],
        puts: dict[bytes, bytes],
        deletes: Collection[bytes],
        lease: int | None = None,
        leased: Collection[bytes] | None = None,
    ) -> int | None:
        with self._lock:
            self._expire()
            for key, rev in checks.items():
                row = self._data.get(key)
                if (0 if row is None else row[1]) != rev:
                    return None
            if lease is not None and lease not in self._leases:
                raise LeaseNotFound(f"lease {lease} has ended")
            if not puts and not deletes:
                return self._rev
            self._rev += 1
            for key in deletes:
                self._remove(key)
            for key, value in puts.items():
                bound = lease if lease is not None and (leased is None or key in leased) else None
                if key in self._data:
                    self._remove(key)
                bisect.insort(self._keys, key)
                self._data[key] = (value, self._rev, bound)
                if bound is not None:
                    self._leases[bound].keys.add(key)
            self._changed.notify_all()
            return self._rev

    def lease_grant(self, ttl_s: float) -> int:
        with self._lock:
            self._expire()
            lid = self._next_lease
            self._next_lease += 1
            ttl = int(ttl_s * 1e9)
            self._leases[lid] = _Lease(ttl, self.clock() + ttl)
            return lid

    def lease_keepalive(self, lease: int, timeout_s: float | None = None) -> bool:
        with self._lock:
            self._expire()
            le = self._leases.get(lease)
            if le is None:
                return False
            le.deadline_ns = self.clock() + le.ttl_ns
            return True

    def lease_revoke(self, lease: int) -> None:
        with self._lock:
            self._expire()
            if lease in self._leases:
                self._end_lease(lease)

    def lease_ttl(self, lease: int) -> float | None:
        with self._lock:
            self._expire()
            le = self._leases.get(lease)
            return None if le is None else (le.deadline_ns - self.clock()) / 1e9

    def watch(self, key: bytes, revision: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while True:
                self._expire()
                row = self._data.get(key)
                if (0 if row is None else row[1]) != revision:
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)

    def close(self) -> None:
        pass


class _Frozen:
    """A copy of a MemKV's keys: reads of one moment (`MemKV.snapshot`)."""

    def __init__(self, keys: list[bytes], data: dict[bytes, tuple]) -> None:
        self._keys = keys
        self._data = data

    def get(self, key: bytes) -> tuple[bytes, int] | None:
        row = self._data.get(key)
        return None if row is None else (row[0], row[1])

    def scan(self, start: bytes, end: bytes, limit: int) -> list[tuple[bytes, bytes, int]]:
        return _scan(self._keys, self._data, start, end, limit)


def _scan(
    keys: list[bytes], data: dict[bytes, tuple], start: bytes, end: bytes, limit: int
) -> list[tuple[bytes, bytes, int]]:
    """Up to `limit` (key, value, revision) with start <= key < end of a sorted key list."""
    i = bisect.bisect_left(keys, start)
    out = []
    while i < len(keys) and keys[i] < end and len(out) < limit:
        value, rev, _ = data[keys[i]]
        out.append((keys[i], value, rev))
        i += 1
    return out
