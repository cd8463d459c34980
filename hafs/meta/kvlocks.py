"""Write locks, mount sessions and elections of the `kv` engine (meta/kv.py), on one lease.

The client's lease (`ClientLease`, one per KvMeta, so one per mount): granted
on first use, renewed by `keepalive`, revoked at close.  Everything a client
holds in the store is a key bound to it: its write locks, its session, the
roles it was elected to.  A client that dies, or is paused or cut off from
the store past the lease's ttl, loses all of them at once when the store ends
the lease: its locks are free, its session is over, another client is elected.
`keepalive` sends at most one request per ttl/8 however many locks and loops
ask, bounded by the time the lease has left; a client that finds its lease
ended takes a new one at its next need.  A client whose keepalive has not
succeeded for a whole ttl (cut off from the store, or the store without a
quorum) gives the lease up itself (LEASE-LOST): its locks are lost from then
on, its session is registered again at the next renewal, and the lease is
revoked, best effort, before the next one is granted (the store may have kept
it alive meanwhile: etcd renews every lease when a new leader is elected).

A new file's lock (`create_locked`, a create with `locked`): its keys are put
by the create's transaction, its token that commit's revision; the next
acquire of it by this client takes it without a request, and the fence after
it needs none either (no older token can exist).  Such grants are kept until
acquired (meta.locks.CreatedGrants; the vfs acquires right after the create).

Locks (the semantics of meta/locks.py): a held lock is the key `L<name>`
bound to the client's lease, valued {holder, acquired_ns, lease}.  Acquiring
is a commit that finds the key absent (or held by this same holder) and puts
it; the fencing token is that commit's revision, which is the key's
mod_revision, so every later grant of the name has a greater token.
`commit`/`truncate`/`fence` with a token check, in their own transaction, that
`L<name>` still has mod_revision == token: a writer whose lease ended (its key
vanished with it) or whose lock was taken over can never commit (LockLost).
A lock is renewed with the lease, and is lost when the lease it was granted
on is no longer the client's.  `l<name>` (not bound to a lease) names the
holder of the last grant not released, so that a grant after an expiry logs
LOCK-TAKEOVER as the embedded locks do.

Sessions: `S<id>` bound to the client's lease is a live session; `s<id>` is
its record, kept when the lease ends, so that `reap` (on any client) returns
each session that died exactly once: it deletes the record of a session whose
live key is gone in a transaction that checks both.  The exclusion of
"repair" and "mount" sessions reads every live key and writes the guard key
Msessions in one transaction (every registration writes it, so two
registrations that cannot both be right conflict on it).  A session whose
lease ended while its client lived on (a paused mount) is registered again
by its next `renew`, under the same id and a new lease (SESSION-LOST).

Orphans: an inode that loses its last name is marked `N<ino>` valued with the
id of the session of the client that removed the name (the client that may
still hold it open).  `reap` deletes the marked inodes of every session that
is over (it died, or ended while the kernel still held them), each in a
transaction that checks the mark and that the session's live key is absent;
their blocks go to garbage, collected after the grace.

Elections: `Mleader_<role>` bound to the client's lease, valued with the
client's session id (or holder name without a session), names the one
client that has `role`; `elect` takes it when it is free.

Concurrency: the sync methods run in worker threads; the async ones hand
their KV calls to worker threads and sleep on trio between attempts.  The
lease id is guarded by a threading.Lock.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import threading
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING

import trio

from .. import __version__
from ..errors import LockLost, LockTimeout, MetaUnavailable, UserError
from . import Inode, SessionInfo, session_conflict
from .locks import CreatedGrants, Lease, LockInfo, default_holder

if TYPE_CHECKING:
    from .kv import KV, KvMeta, Txn

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


def _leader_key(role: str) -> bytes:
    return b"Mleader_" + role.encode()


class ClientLease:
    """The one lease of a client (see the module docstring)."""

    def __init__(self, kv: KV, ttl_s: float, clock: Callable[[], int]) -> None:
        self.kv = kv
        self.ttl_s = ttl_s
        self.clock = clock
        self._mutex = threading.Lock()
        self._id: int | None = None
        self._renewed_ns = 0  # when the last renewal (or the grant) was sent
        self._given_up: list[int] = []  # leases given up (LEASE-LOST), not revoked yet

    def id(self, ttl_s: float | None = None) -> int:
        """The client's lease, granted now (for ttl_s, default the client's ttl) if it
        holds none."""
        with self._mutex:
            if self._id is None:
                self._revoke_given_up()
                self.ttl_s = ttl_s or self.ttl_s
                now = self.clock()
                self._id = self.kv.lease_grant(self.ttl_s)
                self._renewed_ns = now
            return self._id

    @property
    def ttl_ns(self) -> int:
        return int(self.ttl_s * 1e9)

    def expires_ns(self) -> int:
        """When the lease ends unless renewed (by this client's clock; the store's ends it
        no earlier)."""
        return self._renewed_ns + self.ttl_ns

    def ended(self, lease_id: int) -> None:
        """The store said `lease_id` has ended: the next `id` grants a new one."""
        with self._mutex:
            if self._id == lease_id:
                self._id = None

    def keepalive(self) -> int | None:
        """Renew the lease; its id, or None if the client holds none (it ended, or it was
        not renewed for a whole ttl: then it is given up, LEASE-LOST).  MetaUnavailable
        if the store did not answer and the lease has time left."""
        from .kv import LeaseNotFound

        lease_id = self._id
        if lease_id is None:
            return None
        now = self.clock()
        if now - self._renewed_ns < self.ttl_ns // 8:
            return lease_id
        try:
            left_s = (self.expires_ns() - now) / 1e9
            if left_s <= 0:
                raise MetaUnavailable(f"{self.kv.name}: the lease was not renewed in time")
            alive = self.kv.lease_keepalive(lease_id, left_s)
        except LeaseNotFound:
            alive = False
        except MetaUnavailable as e:
            if self.clock() < self.expires_ns():
                raise
            self._give_up(lease_id, e.why)
            return None
        if not alive:
            self.ended(lease_id)
            return None
        with self._mutex:
            if self._id == lease_id:
                self._renewed_ns = max(self._renewed_ns, now)
        return lease_id

    def _give_up(self, lease_id: int, why: str) -> None:
        with self._mutex:
            if self._id != lease_id:
                return
            self._id = None
            self._given_up.append(lease_id)
        log.warning(
            "LEASE-LOST %x: not renewed for %g s (%s: %s); this client gives up its write"
            " locks, session and roles, and takes a new lease at its next need",
            lease_id,
            self.ttl_s,
            self.kv.name,
            why,
        )

    def _revoke_given_up(self) -> None:
        """Revoke the leases given up (best effort: they end with their ttl anyway)."""
        while self._given_up:
            try:
                self.kv.lease_revoke(self._given_up[0])
            except Exception as e:
                log.info("revoking a lease given up failed (it ends with its ttl): %s", e)
                return
            self._given_up.pop(0)

    def revoke(self) -> None:
        """End the lease now: the client's locks, session and roles are free at once."""
        with self._mutex:
            lease_id, self._id = self._id, None
            given_up, self._given_up = self._given_up, []
        for old in given_up:  # best effort
            try:
                self.kv.lease_revoke(old)
            except Exception:
                pass
        if lease_id is not None:
            self.kv.lease_revoke(lease_id)


@dataclass
class KvLease(Lease):
    lease_id: int = 0  # the client lease the lock's key is bound to


class KvLocks:
    def __init__(self, meta: KvMeta, holder: str | None) -> None:
        self.meta = meta
        self.kv = meta.kv
        self.lease = meta.lease
        self.holder = holder or default_holder(uuid.uuid4().hex[:8])
        self.grants = CreatedGrants()

    def _value(self, lease_id: int) -> bytes:
        now = self.meta.clock()
        return json.dumps({"holder": self.holder, "acquired_ns": now, "lease": lease_id}).encode()

    def create_locked(self, create: Callable[[Txn], Inode]) -> tuple[Inode, int]:
        """Run `create` (KvMeta.mknod's operation) in a transaction that also takes the new
        file's lock (module docstring): the new inode, and the revision of its commit."""
        from .kv import LeaseNotFound

        while True:
            self.lease.keepalive()
            lease_id = self.lease.id()
            value = self._value(lease_id)

            def op(t: Txn, value: bytes = value) -> Inode:
                inode = create(t)
                name = f"inode:{inode.id}"
                t.put(lock_key(name), value, leased=True)
                t.put(_last_key(name), self.holder.encode())
                return inode

            try:
                inode, token = self.meta._transact(op, lease_id)
            except LeaseNotFound:
                self.lease.ended(lease_id)
                continue
            name = f"inode:{inode.id}"
            lease = KvLease(name, self.holder, token, self.lease.expires_ns(), lease_id)
            self.grants.keep(lease, inode)
            log.debug("LOCK-ACQUIRE %s token %d (with its create)", name, token)
            return inode, token

    def _try(self, name: str) -> tuple[Lease | None, str | None]:
        """One attempt: (lease, None) on success, (None, current holder) otherwise."""
        from .kv import LeaseNotFound

        lease = self.grants.take(
            name, lambda lease: self.valid(lease) and self.lease.keepalive() == lease.lease_id
        )
        if lease is not None:
            return lease, None
        while True:
            self.lease.keepalive()  # a lock lasts a whole ttl from its grant
            lease_id = self.lease.id()
            value = self._value(lease_id)

            def op(t: Txn, value: bytes = value) -> tuple[bool, str | None]:
                t.prefetch([lock_key(name), _last_key(name)])
                cur = t.get(lock_key(name))
                if cur is not None and json.loads(cur)["holder"] != self.holder:
                    return False, json.loads(cur)["holder"]
                last = t.get(_last_key(name))
                t.put(lock_key(name), value, leased=True)
                t.put(_last_key(name), self.holder.encode())
                return True, None if last is None else last.decode()

            try:
                (granted, other), token = self.meta._transact(op, lease_id)
            except LeaseNotFound:
                self.lease.ended(lease_id)  # our lease ended (a pause): take a new one
                continue
            if not granted:
                return None, other
            if other is not None and other != self.holder:
                log.warning("LOCK-TAKEOVER %s: the lease of %s had expired", name, other)
            log.debug("LOCK-ACQUIRE %s token %d", name, token)
            return KvLease(name, self.holder, token, self.lease.expires_ns(), lease_id), None

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

    def _renew(self, lease: KvLease) -> None:
        now = self.meta.clock()
        if now >= lease.expires_ns:
            raise LockLost(
                f"lease of {lease.name} expired {(now - lease.expires_ns) / 1e9:.1f} s ago"
            )
        if self.lease.keepalive() != lease.lease_id:
            raise LockLost(
                f"lease of {lease.name} has ended (this client was paused or cut off from"
                f" {self.kv.name} for more than {self.lease.ttl_s:g} s)"
            )
        lease.expires_ns = self.lease.expires_ns()

    async def keepalive(self, lease: KvLease) -> None:
        """Renew the lease; LockLost if it expired or someone else holds the lock now."""
        await trio.to_thread.run_sync(self._renew, lease)

    def valid(self, lease: Lease) -> bool:
        return self.meta.clock() < lease.expires_ns

    def _release(self, lease: Lease) -> None:
        """Delete the lock's keys if it is still this grant: one compare, no read (a
        refused commit: it is not, nothing to release)."""
        key = lock_key(lease.name)
        self.kv.commit({key: lease.token}, {}, (key, _last_key(lease.name)))
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


class KvSessions:
    def __init__(self, meta: KvMeta) -> None:
        self.meta = meta
        self.kv = meta.kv
        self.lease = meta.lease
        self.current: SessionInfo | None = None  # the client's (the last registered)
        self._bound: dict[str, int] = {}  # session id -> the lease its keys are bound to
        self._roles: dict[str, int] = {}  # role -> the lease its key was taken on

    def register(self, kind: str, mountpoint: str, ttl_s: float) -> SessionInfo:
        """Start a session on the client's lease (granted for ttl_s if it holds none)."""
        if kind not in ("mount", "rebalance", "repair"):
            raise ValueError(f"session kind {kind!r}: 'mount', 'rebalance' or 'repair'")
        now = self.meta.clock()
        info = SessionInfo(
            uuid.uuid4().hex,
            kind,
            socket.gethostname(),
            mountpoint,
            os.getpid(),
            __version__,
            now,
            now + int(ttl_s * 1e9),
        )
        self._bind(info, ttl_s)
        self.current = info
        return info

    def _bind(self, info: SessionInfo, ttl_s: float | None = None) -> None:
        """Write the session's live key (on the client's lease) and its record, unless
        `session_conflict` forbids it (UserError)."""
        from .kv import LeaseNotFound, prefix_end

        while True:
            lease_id = self.lease.id(ttl_s)
            value = json.dumps({**asdict(info), "lease": lease_id}).encode()

            def op(t: Txn, value: bytes = value) -> None:
                t.get(SESSION_GUARD)
                alive = [_info(json.loads(v)) for _, v in t.scan(b"S", prefix_end(b"S"))]
                why = session_conflict(info.kind, [s for s in alive if s.id != info.id])
                if why is not None:
                    raise UserError(why)
                t.put(_live_key(info.id), value, leased=True)
                t.put(SESSION_GUARD, info.id.encode(), leased=True)
                t.put(_record_key(info.id), value)  # outlives the lease: reap

            try:
                self.meta._transact(op, lease_id)
            except LeaseNotFound:
                self.lease.ended(lease_id)
                continue
            self._bound[info.id] = lease_id
            return

    def renew(self, session: SessionInfo) -> SessionInfo:
        """Renew the client's lease; a session that ended with an earlier lease (the client
        was paused or cut off past its ttl) is registered again (SESSION-LOST)."""
        lease_id = self.lease.keepalive()
        if lease_id is None or self._bound.get(session.id) != lease_id:
            log.warning(
                "SESSION-LOST %s (%s at %s): its lease ended, this client having been paused or"
                " cut off from %s for more than %g s; its write locks are lost, registering"
                " it again",
                session.id,
                session.kind,
                session.mountpoint or session.host,
                self.kv.name,
                self.lease.ttl_s,
            )
            self._bind(session)
        return replace(session, expires_ns=self.lease.expires_ns())

    def end(self, session: SessionInfo) -> None:
        def op(t: Txn) -> None:
            t.delete(_live_key(session.id))
            t.delete(_record_key(session.id))

        self.meta._run(op)
        self._bound.pop(session.id, None)
        if self.current is not None and self.current.id == session.id:
            self.current = None

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
        the one client whose transaction removes its record); then the inodes that only
        sessions that are over kept are deleted."""
        out = []
        for key, value, _ in self.meta._scan(b"s", b"t"):
            sid = key[1:].decode()
            if self.kv.get(_live_key(sid)) is not None:
                continue  # alive (a read, not a transaction, for the common case)

            def op(t: Txn, sid: str = sid) -> bool:
                if t.get(_live_key(sid)) is not None or t.get(_record_key(sid)) is None:
                    return False
                t.delete(_record_key(sid))
                return True

            if self.meta._transact(op)[0]:
                out.append(_info(json.loads(value)))
        self._drop_orphans()
        return out

    def _drop_orphans(self) -> int:
        """Delete the inodes marked as kept by a session that is over; returns how many."""
        from .kv import k_unlinked

        over: dict[bytes, bool] = {}
        done = 0
        for key, owner, _ in self.meta._scan(b"N", b"O"):
            if not owner or (self.current is not None and owner == self.current.id.encode()):
                continue  # no session's (a lone mount purges those), or ours
            if owner not in over:
                over[owner] = self.kv.get(_live_key(owner.decode())) is None
            if not over[owner]:
                continue
            ino = int.from_bytes(key[1:9], "big")

            def op(t: Txn, ino: int = ino, owner: bytes = owner) -> bool:
                if t.get(k_unlinked(ino)) != owner or t.get(_live_key(owner.decode())):
                    return False
                return self.meta._drop_inode(t, ino)

            if self.meta._run(op):
                log.info("ORPHAN-DELETED inode %d, kept open by session %s", ino, owner.decode())
                done += 1
        return done

    def elect(self, role: str) -> bool:
        """Whether this client has `role` now, taking it if no client has.  A role taken
        on the lease the client still holds is its own without a request: its key goes
        only with that lease."""
        from .kv import LeaseNotFound

        held = self.lease.keepalive()
        if held is not None and self._roles.get(role) == held:
            return True
        me = (self.current.id if self.current is not None else self.meta.locks.holder).encode()
        key = _leader_key(role)
        row = self.kv.get(key)
        if row is not None:
            if row[0] == me and held is not None:
                self._roles[role] = held  # on the lease it holds: the old one's keys are gone
            return row[0] == me
        lease_id = self.lease.id()
        try:
            taken = self.kv.commit({key: 0}, {key: me}, (), lease_id) is not None
        except LeaseNotFound:
            self.lease.ended(lease_id)
            return False
        if taken:
            self._roles[role] = lease_id
        return taken

    def leader(self, role: str) -> str | None:
        """The session id (or holder) of the client that has `role`, if any."""
        row = self.kv.get(_leader_key(role))
        return None if row is None else row[0].decode()


def _info(d: dict) -> SessionInfo:
    """A session from its stored JSON (which also names its lease)."""
    return SessionInfo(**{k: v for k, v in d.items() if k != "lease"})
