"""Write locks and mount sessions of the `kv` engine (meta/kv.py), over KV leases.

Locks (the semantics of meta/locks.py): a held lock is the key `L<name>`
bound to the mount's lease (one per KvMeta, granted on the first acquire,
renewed by `keepalive`), valued {holder, acquired_ns, lease}.  Acquiring is a
commit that finds the key absent (or held by this same holder) and puts it;
the fencing token is that commit's revision, which is the key's mod_revision,
so every later grant of the name has a greater token.  `commit`/`truncate`/
`fence` with a token check, in their own transaction, that `L<name>` still has
mod_revision == token: a writer whose lease ended (its key vanished with it)
or whose lock was taken over can never commit (LockLost).  `l<name>` (not
bound to a lease) names the holder of the last grant not released, so that
a grant after an expiry logs LOCK-TAKEOVER as the embedded locks do.

Sessions: `S<id>` bound to the session's own lease (ttl_s of register) is a
live session; `s<id>` is its record, kept when the lease ends, so that `reap`
(on any client) returns each session that died exactly once: it deletes the
record of a session whose live key is gone in a transaction that checks both.
The exclusion of "repair" and "mount" sessions reads every live key and
writes the guard key Msessions in one transaction (every registration writes
it, so two registrations that cannot both be right conflict on it).

Concurrency: the sync methods run in worker threads; the async ones hand
their KV calls to worker threads and sleep on trio between attempts.  The
lease ids are guarded by a threading.Lock.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import threading
import uuid
from dataclasses import asdict, replace
from typing import TYPE_CHECKING

import trio

from .. import __version__
from ..errors import LockLost, LockTimeout, UserError
from . import SessionInfo, session_conflict
from .locks import Lease, LockInfo, default_holder

if TYPE_CHECKING:
    from .kv import KvMeta, Txn

log = logging.getLogger(__name__)

SESSION_GUARD = b"Msessions"


def lock_key(name: str) -> bytes:
    return b"L" + name.encode()


def _last_key(name: str) -> bytes:
    return b"l" + name.encode()


def _live_key(sid: str) -> bytes:
    return b"S" + sid.encode()


def _record_key(sid: str) -> bytes:
    return b"s" + sid.encode()


class KvLocks:
    def __init__(self, meta: KvMeta, holder: str | None, ttl_s: float) -> None:
        self.meta = meta
        self.kv = meta.kv
        self.holder = holder or default_holder(uuid.uuid4().hex[:8])
        self.ttl_s = ttl_s
        self.ttl_ns = int(ttl_s * 1e9)
        self._mutex = threading.Lock()
        self._lease: int | None = None

    def _mount_lease(self) -> int:
        with self._mutex:
            if self._lease is None:
                self._lease = self.kv.lease_grant(self.ttl_s)
            return self._lease

    def _lease_ended(self, lease_id: int) -> None:
        with self._mutex:
            if self._lease == lease_id:
                self._lease = None

    def _try(self, name: str) -> tuple[Lease | None, str | None]:
        """One attempt: (lease, None) on success, (None, current holder) otherwise."""
        from .kv import LeaseNotFound

        while True:
            now = self.meta.clock()
            lease_id = self._mount_lease()
            value = json.dumps({"holder": self.holder, "acquired_ns": now, "lease": lease_id})

            def op(t: Txn, value: str = value) -> tuple[bool, str | None]:
                cur = t.get(lock_key(name))
                if cur is not None and json.loads(cur)["holder"] != self.holder:
                    return False, json.loads(cur)["holder"]
                last = t.get(_last_key(name))
                t.put(lock_key(name), value.encode(), leased=True)
                t.put(_last_key(name), self.holder.encode())
                return True, None if last is None else last.decode()

            try:
                (granted, other), token = self.meta._transact(op, lease_id)
            except LeaseNotFound:
                self._lease_ended(lease_id)  # our lease ended (a pause): take a new one
                continue
            if not granted:
                return None, other
            if other is not None and other != self.holder:
                log.warning("LOCK-TAKEOVER %s: the lease of %s had expired", name, other)
            log.debug("LOCK-ACQUIRE %s token %d", name, token)
            return Lease(name, self.holder, token, now + self.ttl_ns), None

    async def acquire(self, name: str, wait_s: float) -> Lease:
        """Take the lock, waiting up to wait_s seconds for its holder; LockTimeout after."""
        deadline = trio.current_time() + wait_s
        delay = 0.02
        while True:
            lease, holder = await trio.to_thread.run_sync(self._try, name)
            if lease is not None:
                return lease
            if trio.current_time() >= deadline:
                raise LockTimeout(name, holder)
            await trio.sleep(min(delay * random.uniform(0.5, 1.5), deadline - trio.current_time()))
            delay = min(delay * 2, 0.5)

    def _renew(self, lease: Lease) -> None:
        now = self.meta.clock()
        if now >= lease.expires_ns:
            raise LockLost(
                f"lease of {lease.name} expired {(now - lease.expires_ns) / 1e9:.1f} s ago"
            )
        lease_id = self._lease
        if lease_id is None or not self.kv.lease_keepalive(lease_id):
            if lease_id is not None:
                self._lease_ended(lease_id)
            raise LockLost(f"lease of {lease.name} has ended")
        row = self.kv.get(lock_key(lease.name))
        if row is None or row[1] != lease.token:
            raise LockLost(f"lock {lease.name} was taken over")
        lease.expires_ns = now + self.ttl_ns

    async def keepalive(self, lease: Lease) -> None:
        """Renew the lease; LockLost if it expired or someone else holds the lock now."""
        await trio.to_thread.run_sync(self._renew, lease)

    def valid(self, lease: Lease) -> bool:
        return self.meta.clock() < lease.expires_ns

    def _release(self, lease: Lease) -> None:
        def op(t: Txn) -> None:
            if t.revision(lock_key(lease.name)) == lease.token:
                t.delete(lock_key(lease.name))
                t.delete(_last_key(lease.name))

        self.meta._transact(op)
        log.debug("LOCK-RELEASE %s token %d", lease.name, lease.token)

    async def release(self, lease: Lease) -> None:
        await trio.to_thread.run_sync(self._release, lease)

    def held(self) -> list[LockInfo]:
        """Every lock whose lease has not ended, in name order."""
        now = self.meta.clock()
        left: dict[int, float | None] = {}
        out = []
        for key, value, rev in self.meta._scan(b"L", b"M"):
            d = json.loads(value)
            if d["lease"] not in left:
                left[d["lease"]] = self.kv.lease_ttl(d["lease"])
            if left[d["lease"]] is not None:
                expires = now + int(left[d["lease"]] * 1e9)
                out.append(LockInfo(key[1:].decode(), d["holder"], rev, d["acquired_ns"], expires))
        return out

    def close(self) -> None:
        """End the mount's lease: its locks are free at once."""
        with self._mutex:
            lease_id, self._lease = self._lease, None
        if lease_id is not None:
            self.kv.lease_revoke(lease_id)


class KvSessions:
    def __init__(self, meta: KvMeta) -> None:
        self.meta = meta
        self.kv = meta.kv
        self._leases: dict[str, tuple[int, int]] = {}  # session id -> (lease, ttl_ns)

    def register(self, kind: str, mountpoint: str, ttl_s: float) -> SessionInfo:
        from .kv import prefix_end

        if kind not in ("mount", "rebalance", "repair"):
            raise ValueError(f"session kind {kind!r}: 'mount', 'rebalance' or 'repair'")
        now = self.meta.clock()
        ttl_ns = int(ttl_s * 1e9)
        info = SessionInfo(
            uuid.uuid4().hex,
            kind,
            socket.gethostname(),
            mountpoint,
            os.getpid(),
            __version__,
            now,
            now + ttl_ns,
        )
        lease_id = self.kv.lease_grant(ttl_s)
        value = json.dumps({**asdict(info), "lease": lease_id}).encode()

        def op(t: Txn) -> None:
            t.get(SESSION_GUARD)
            alive = [_info(json.loads(v)) for _, v in t.scan(b"S", prefix_end(b"S"))]
            why = session_conflict(kind, alive)
            if why is not None:
                raise UserError(why)
            t.put(_live_key(info.id), value, leased=True)
            t.put(SESSION_GUARD, info.id.encode(), leased=True)

        try:
            self.meta._transact(op, lease_id)
            self.kv.commit({}, {_record_key(info.id): value}, ())  # outlives the lease: reap
        except BaseException:
            self.kv.lease_revoke(lease_id)
            raise
        self._leases[info.id] = (lease_id, ttl_ns)
        return info

    def renew(self, session: SessionInfo) -> SessionInfo:
        lease_id, ttl_ns = self._leases.get(session.id, (None, 0))
        now = self.meta.clock()
        if lease_id is None or not self.kv.lease_keepalive(lease_id):
            raise LockLost(f"session {session.id} has ended: its lease ran out")
        return replace(session, expires_ns=now + ttl_ns)

    def end(self, session: SessionInfo) -> None:
        self.kv.commit({}, {}, {_record_key(session.id)})
        lease_id, _ = self._leases.pop(session.id, (None, 0))
        if lease_id is not None:
            self.kv.lease_revoke(lease_id)

    def alive(self) -> list[SessionInfo]:
        now = self.meta.clock()
        out = []
        for _, value, _ in self.meta._scan(b"S", b"T"):
            d = json.loads(value)
            left = self.kv.lease_ttl(d.pop("lease"))
            if left is not None:
                out.append(SessionInfo(**{**d, "expires_ns": now + int(left * 1e9)}))
        return out

    def reap(self) -> list[SessionInfo]:
        """The sessions whose lease ended since they registered, each returned once (to
        the one client whose transaction removes its record)."""
        out = []
        for key, value, _ in self.meta._scan(b"s", b"t"):
            sid = key[1:].decode()

            def op(t: Txn, sid: str = sid) -> bool:
                if t.get(_live_key(sid)) is not None or t.get(_record_key(sid)) is None:
                    return False
                t.delete(_record_key(sid))
                return True

            if self.meta._transact(op)[0]:
                d = json.loads(value)
                d.pop("lease")
                out.append(SessionInfo(**d))
        return out


def _info(d: dict) -> SessionInfo:
    """A session from its stored JSON (which also names its lease)."""
    return SessionInfo(**{k: v for k, v in d.items() if k != "lease"})
