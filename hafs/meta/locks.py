"""LockService: named locks granted as leases, with fencing tokens.

A lease is held for `ttl` seconds and renewed by its holder (`keepalive`);
it ends by `release` or by expiry.  Each grant of a name carries a fencing
token strictly greater than every earlier grant of that name, so a store that
records the newest token it has seen can refuse a holder whose lease expired
(DESIGN.md invariant 6).

`SqliteLockService` is the embedded implementation: the `locks` table of the
filesystem's SQLite metadata database (see meta.py), shared by every mount of
the home on this host; no daemon to run.  Times are wall-clock nanoseconds
(one clock for every process on the host); tests inject a clock that follows
trio's.  A cluster implementation (etcd leases) fits the same interface.

Concurrency rules: methods run on the trio thread; each database access is
one short transaction with no await inside.  `acquire` polls with jittered
backoff while another holder has the lock.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass

import trio

from ..errors import LockLost, LockTimeout
from .sqlite import transaction

log = logging.getLogger(__name__)


@dataclass
class Lease:
    name: str
    holder: str
    token: int
    expires_ns: int


@dataclass(frozen=True)
class LockInfo:
    name: str
    holder: str
    token: int
    acquired_ns: int
    expires_ns: int


def default_holder(label: str = "") -> str:
    return f"{socket.gethostname()}:{os.getpid()}" + (f":{label}" if label else "")


class SqliteLockService:
    def __init__(
        self,
        db: sqlite3.Connection,
        holder: str,
        ttl_s: float = 10.0,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        self.db = db
        self.holder = holder
        self.ttl_ns = int(ttl_s * 1e9)
        self.clock = clock

    def _try(self, name: str) -> tuple[Lease | None, str | None]:
        """One attempt: (lease, None) on success, (None, current holder) otherwise."""
        now = self.clock()
        self.db.execute("BEGIN IMMEDIATE")
        try:
            row = self.db.execute(
                "SELECT holder, token, expires_ns FROM locks WHERE name = ?", (name,)
            ).fetchone()
            if row and row[0] is not None and row[0] != self.holder and row[2] > now:
                self.db.execute("ROLLBACK")
                return None, row[0]
            token = (row[1] if row else 0) + 1
            expires = now + self.ttl_ns
            self.db.execute(
                "INSERT OR REPLACE INTO locks VALUES (?, ?, ?, ?, ?)",
                (name, self.holder, token, now, expires),
            )
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")
        if row and row[0] is not None and row[0] != self.holder:
            log.warning("LOCK-TAKEOVER %s: the lease of %s had expired", name, row[0])
        log.debug("LOCK-ACQUIRE %s token %d", name, token)
        return Lease(name, self.holder, token, expires), None

    async def acquire(self, name: str, wait_s: float) -> Lease:
        """Take the lock, waiting up to wait_s seconds for its holder; LockTimeout after."""
        deadline = trio.current_time() + wait_s
        delay = 0.02
        while True:
            lease, holder = self._try(name)
            if lease is not None:
                return lease
            if trio.current_time() >= deadline:
                raise LockTimeout(name, holder)
            await trio.sleep(min(delay * random.uniform(0.5, 1.5), deadline - trio.current_time()))
            delay = min(delay * 2, 0.5)

    def keepalive(self, lease: Lease) -> None:
        """Renew the lease; LockLost if it expired or someone else holds the lock now."""
        now = self.clock()
        if now >= lease.expires_ns:
            raise LockLost(
                f"lease of {lease.name} expired {(now - lease.expires_ns) / 1e9:.1f} s ago"
            )
        expires = now + self.ttl_ns
        with transaction(self.db):
            cur = self.db.execute(
                "UPDATE locks SET expires_ns = ? WHERE name = ? AND holder = ? AND token = ?",
                (expires, lease.name, lease.holder, lease.token),
            )
        if cur.rowcount != 1:
            raise LockLost(f"lock {lease.name} was taken over")
        lease.expires_ns = expires

    def valid(self, lease: Lease) -> bool:
        """Whether the lease is still ours by the clock (commits check the token too)."""
        return self.clock() < lease.expires_ns

    def release(self, lease: Lease) -> None:
        with transaction(self.db):
            self.db.execute(
                "UPDATE locks SET holder = NULL, expires_ns = NULL, acquired_ns = NULL"
                " WHERE name = ? AND holder = ? AND token = ?",
                (lease.name, lease.holder, lease.token),
            )
        log.debug("LOCK-RELEASE %s token %d", lease.name, lease.token)

    def held(self) -> list[LockInfo]:
        """Every lock whose lease has not expired."""
        rows = self.db.execute(
            "SELECT name, holder, token, acquired_ns, expires_ns FROM locks"
            " WHERE holder IS NOT NULL AND expires_ns > ? ORDER BY name",
            (self.clock(),),
        )
        return [LockInfo(*r) for r in rows]
