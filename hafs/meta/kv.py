"""The `kv` engine: every MetaStore operation written once over a small transactional KV.

`KV` is an ordered key-value store with global revisions, leases and one kind
of transaction (compare mod_revisions, then put and delete), shaped so that
etcd v3 fits it one-to-one; `memkv` (meta/memkv.py) and `etcd` are adapters.

Key layout (LAYOUT_VERSION 1).  Integers are 8-byte big-endian, so key order
is numeric order; `+` is concatenation; names and block ids are raw bytes.

    Mversion                  layout version (ASCII int); absent: no hafs filesystem here
    Mconfig                   FsConfig as JSON (ca_pem left out while None: an older hafs
                              reads it)
    Mring                     the ring description as JSON ({"version": N, "nodes": [...]})
    Mring_changed             when the ring last got a new version (ASCII ns; absent: 0)
    Mowner                    {"token", "previous": [...]} as JSON: the owner token the nodes
                              record (hafs.store.owner); absent in a filesystem made before
    Mnext_ino                 the lowest inode number never handed out (clients take 64 at once)
    Mloading                  a load ("hafs meta load") is writing here: {host, pid, since_ns};
                              the load's last transaction writes Mversion and deletes it
    Msessions                 guard of the session keys (see kvlocks.py)
    Mleader_<role>            the session id of the client elected to `role`; bound to its lease
    I + ino                   inode: mode, uid, gid, nlink, size, atime/mtime/ctime ns, rdev,
                              fence token (newest write token; older ones are refused), target
    D + parent + hash + name  directory entry -> ino.  hash: 63-bit BLAKE2b of the name, > 0,
                              the readdir cursor (an off_t, like ext4's htree hash)
    P + ino + parent + name   reverse entry (parent_of, path_of; one per hard link)
    N + ino                   the inode has nlink 0 (unlinked_inodes) -> the id of the session
                              that removed its last name, which may hold it open (empty: none);
                              deleted by `reap` once that session is over (kvlocks.py)
    X + ino + name            xattr value
    E + ino + end             extent covering [end - length, end) -> length + block id.  Keyed by
                              its end, so the extents overlapping [a, b) are one forward scan from
                              end > a (extents never overlap, so end order is offset order)
    B + block                 block: size, refcount, zero_since_ns (-1: referenced)
    U + block + 0x00 + ino + offset   the extent at (ino, offset) uses the block (block_users)
    Z + zero_since + block    the block's refcount is 0 since then (garbage_blocks)
    G + block                 degraded: since_ns + space-separated node ids
    L + lock name             a held write lock -> holder; bound to the holder's lease (one
                              per client: its locks, session and roles; kvlocks.py); its
                              mod_revision is the fencing token (kvlocks.py)
    l + lock name             last grant not released (holder), to log LOCK-TAKEOVER
    S + id / s + id           a live session (bound to its lease) / its record (kvlocks.py)

Readdir cursors: an entry's cursor is its name hash, so it survives creates and
deletes.  Two names of one directory with the same hash (about 2^-63 per pair)
share a cursor: a page never ends between them (readdir extends or shortens the
page), but a kernel that stops inside such a pair would, resuming, skip the rest.

Transactions (`KvMeta._transact`): an operation runs against a `Txn` that
records the mod_revision of every key it reads (0 for an absent key) and
buffers its writes (later reads in the txn see them); it then commits with
those checks, and a failed check re-runs the whole operation (jittered backoff,
up to MAX_TRIES).  An exception (an answer: EEXIST, ENOENT, LockLost, ...; or
an error met on reads from different moments, such as an nlink going below 0)
leaves the operation only after an empty commit with the same checks
succeeded, so every answer is one a serial execution could give.  Range reads
are protected by a guard key that every writer of the range writes (key checks
alone do not see an insert):

- the entries of a directory (D, P under it): the directory's inode.  Every
  operation that adds or removes an entry writes the parent's inode (its
  mtime/ctime change anyway); rmdir and rename over a directory read the
  directory's inode, and creates read their parent's;
- a file's extents (E) and xattrs (X): the file's inode (size/mtime, ctime);
- a block's users (U) and garbage entry (Z): the block's B key (refcount);
- the sessions (S): Msessions.

Checks beyond the vfs's (so that two mounts cannot build what one kernel would
refuse): link and rename into a removed directory (nlink 0) give ENOENT, as
create does; moving a directory into itself or below it gives EINVAL.

Inode numbers are never reused: each client takes 64 numbers at a time from
Mnext_ino in its own small transaction.  Reads outside transactions (getattr,
lookup: the entry, then the inode) are not transactions.  Round trips are cut
by meta/kvcache.py: reads an operation knows in advance go in one `KV.batch`
(`Txn.prefetch`), a first attempt takes inodes as this client last saw them,
and files' extents and xattrs are kept at an inode revision.

Dump and load: `dump` reads every key at one revision (`KV.snapshot`); `load`
writes a dump into an empty KV in transactions of at most LOAD_OPS keys and
LOAD_BYTES bytes (under etcd's limits, meta/etcd.py), the derived keys (P, N,
U, Z) made from the records.

Concurrency: KvMeta is called from worker threads (`direct = False`); its own
state (the inode-number batch, leases) is guarded by a threading.Lock.
Figures (usage) and unlinked_inodes scan their keys: O(filesystem) each call.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable, Collection, Container, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, replace
from typing import Any, Protocol, TypeVar

from ..errors import FsError, HafsError, LockLost, MetaError, UserError
from . import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    ROOT_INODE,
    BlockRow,
    Degraded,
    Dentry,
    Entry,
    Extent,
    FileExtent,
    FsConfig,
    FsState,
    Inode,
    Owner,
    Record,
    Usage,
    Xattr,
    check_config_changes,
    check_name,
    check_xattr,
    now_ns,
)
from .kvcache import FIRST_EXTENTS, FileCache, FileView
from .kvlocks import ClientLease, KvLocks, KvSessions, lock_key

log = logging.getLogger(__name__)

LAYOUT_VERSION = 1
MAX_TRIES = 100
INO_BATCH = 64
PAGE = 512  # keys per scan request
BATCH_READS = 512  # reads per batch request (etcd: --max-txn-ops 4096)
LOAD_OPS = 1000  # keys per transaction of a load (etcd: --max-txn-ops 4096)
LOAD_BYTES = 4 << 20  # bytes of keys and values per load transaction (base64: < 16 MiB)
WATCH_S = 10.0  # a watch of the ring is made again this often while the ring stays

T = TypeVar("T")


class LeaseNotFound(Exception):
    """A commit named a lease that has ended."""


class TxnConflict(HafsError):
    """An operation kept conflicting with other clients for MAX_TRIES attempts."""


class ReadOnly(HafsError):
    """A write through a KvMeta opened read-only."""


Read = tuple[bytes, bytes | None, int]  # (key, None, 0): one key; (start, end, limit): a range


class KVReader(Protocol):
    def get(self, key: bytes) -> tuple[bytes, int] | None:
        """(value, mod_revision), or None if absent."""

    def scan(self, start: bytes, end: bytes, limit: int) -> list[tuple[bytes, bytes, int]]:
        """Up to `limit` (key, value, mod_revision) with start <= key < end, in key order."""


class KV(KVReader, Protocol):
    """An ordered, transactional key-value store with global revisions (etcd v3's shape).

    Every successful commit that writes gets a new revision, greater than all
    before it; a key's mod_revision is the revision of its last put.  Revision 0
    means "absent" in checks.
    """

    name: str  # for messages: "etcd://h1:2379/prod", "memkv"

    def batch(self, reads: list[Read]) -> list[list[tuple[bytes, bytes, int]]]:
        """The rows of each read ((key, None, 0): that key, if present; (start, end,
        limit): as `scan`), all at one revision, in one request."""

    def snapshot(self) -> AbstractContextManager[KVReader]:
        """Reads (get, scan) of the store as it is now, whatever is committed after, for
        the block's duration (etcd: reads at the current revision, a MetaError once etcd
        has compacted it)."""

    def commit(
        self,
        checks: dict[bytes, int],
        puts: dict[bytes, bytes],
        deletes: Collection[bytes],
        lease: int | None = None,
        leased: Collection[bytes] | None = None,
    ) -> int | None:
        """Atomically: if every checked key has that mod_revision, apply the deletes and
        the puts (those in `leased`, or all when it is None, bound to `lease`) and return
        the revision (the current one if nothing was written); else None.  LeaseNotFound
        if `lease` has ended."""

    def lease_grant(self, ttl_s: float) -> int: ...
    def lease_keepalive(self, lease: int, timeout_s: float | None = None) -> bool:
        """Renew for another ttl; False if the lease has ended (its keys are gone).
        timeout_s: fail (MetaUnavailable) after this long instead of the store's bound."""

    def lease_revoke(self, lease: int) -> None: ...
    def lease_ttl(self, lease: int) -> float | None:
        """Seconds the lease has left, None if it has ended."""

    def watch(self, key: bytes, revision: int, timeout_s: float) -> bool:
        """Wait until `key` changes after `revision` (its mod_revision then): True once it
        has, False after timeout_s without a change or when no watch can be made."""

    def close(self) -> None: ...


def prefix_end(prefix: bytes) -> bytes:
    """The smallest key greater than every key that starts with `prefix`."""
    p = prefix.rstrip(b"\xff")
    return p[:-1] + bytes([p[-1] + 1])


def u64(n: int) -> bytes:
    return n.to_bytes(8, "big")


def name_hash(name: bytes) -> int:
    """The readdir cursor of a name: 63 bits, > 0."""
    h = int.from_bytes(hashlib.blake2b(name, digest_size=8).digest(), "big") >> 1
    return h or 1


# ---------------------------------------------------------------- the keys

K_VERSION = b"Mversion"
K_CONFIG = b"Mconfig"
K_RING = b"Mring"
K_RING_CHANGED = b"Mring_changed"
K_OWNER = b"Mowner"
OWNERS_KEPT = 16  # earlier owner tokens remembered (a node down at an adopt has one)
K_NEXT_INO = b"Mnext_ino"
K_LOADING = b"Mloading"


def _config_json(config: FsConfig) -> bytes:
    fields = asdict(config)
    if fields["ca_pem"] is None:
        del fields["ca_pem"]
    return json.dumps(fields).encode()


def k_inode(ino: int) -> bytes:
    return b"I" + u64(ino)


def k_dir(parent: int) -> bytes:
    return b"D" + u64(parent)


def k_entry(parent: int, name: bytes) -> bytes:
    return b"D" + u64(parent) + u64(name_hash(name)) + name


def k_names(ino: int) -> bytes:
    return b"P" + u64(ino)


def k_name(ino: int, parent: int, name: bytes) -> bytes:
    return b"P" + u64(ino) + u64(parent) + name


def k_unlinked(ino: int) -> bytes:
    return b"N" + u64(ino)


def k_xattr(ino: int, name: bytes) -> bytes:
    return b"X" + u64(ino) + name


def k_extents(ino: int) -> bytes:
    return b"E" + u64(ino)


def k_extent(ino: int, end: int) -> bytes:
    return b"E" + u64(ino) + u64(end)


def k_block(block_id: str) -> bytes:
    return b"B" + block_id.encode()


def k_users(block_id: str) -> bytes:
    return b"U" + block_id.encode() + b"\x00"


def k_user(block_id: str, ino: int, offset: int) -> bytes:
    return k_users(block_id) + u64(ino) + u64(offset)


def k_garbage(since_ns: int, block_id: str) -> bytes:
    return b"Z" + u64(since_ns) + block_id.encode()


def k_degraded(block_id: str) -> bytes:
    return b"G" + block_id.encode()


# -------------------------------------------------------------- the values

_INODE = struct.Struct(">IIIQQqqqQQB")  # ... rdev, fence, has_target; then the target
_BLOCK = struct.Struct(">Qqq")  # size, refcount, zero_since_ns (-1: referenced)


@dataclass
class _Rec:
    inode: Inode
    fence: int


def _enc_inode(r: _Rec) -> bytes:
    i = r.inode
    head = _INODE.pack(
        *(i.mode, i.uid, i.gid, i.nlink, i.size, i.atime_ns, i.mtime_ns, i.ctime_ns, i.rdev),
        *(r.fence, i.target is not None),
    )
    return head + (i.target or b"")


def _dec_inode(ino: int, v: bytes) -> _Rec:
    mode, uid, gid, nlink, size, at, mt, ct, rdev, fence, has = _INODE.unpack_from(v)
    target = v[_INODE.size :] if has else None
    return _Rec(Inode(ino, mode, uid, gid, nlink, size, at, mt, ct, rdev, target), fence)


@dataclass
class _Block:
    size: int
    refcount: int
    zero_since_ns: int | None


def _enc_block(b: _Block) -> bytes:
    zs = -1 if b.zero_since_ns is None else b.zero_since_ns
    return _BLOCK.pack(b.size, b.refcount, zs)


def _dec_block(v: bytes) -> _Block:
    size, refcount, zs = _BLOCK.unpack(v)
    return _Block(size, refcount, None if zs < 0 else zs)


def _enc_extent(e: Extent) -> bytes:
    return u64(e.length) + e.block_id.encode()


def _dec_extent(key: bytes, v: bytes) -> Extent:
    end = int.from_bytes(key[9:17], "big")
    length = int.from_bytes(v[:8], "big")
    return Extent(end - length, length, v[8:].decode())


# ------------------------------------------------------------ transactions


def batched(kv: KV, reads: list[Read]) -> list[list[tuple[bytes, bytes, int]]]:
    """KV.batch of any number of reads, BATCH_READS per request."""
    if len(reads) <= BATCH_READS:
        return kv.batch(reads) if reads else []
    out = []
    for i in range(0, len(reads), BATCH_READS):
        out += kv.batch(reads[i : i + BATCH_READS])
    return out


class Txn:
    """One attempt of an operation: reads recorded with their revisions, writes buffered."""

    def __init__(
        self,
        kv: KV,
        attempt: int = 0,
        guess: Callable[[int], tuple[bytes, int] | None] | None = None,
    ) -> None:
        self.kv = kv
        self.attempt = attempt  # 0: the first run of the operation
        # ino -> (value, revision) of an inode as last seen, taken instead of a read (the
        # commit checks the revision; a refused commit re-runs the operation without guesses)
        self._guess = guess
        self.checks: dict[bytes, int] = {}
        self._read: dict[bytes, bytes | None] = {}
        self._ranges: dict[tuple[bytes, bytes], list[tuple[bytes, bytes]]] = {}  # prefetched
        self.puts: dict[bytes, bytes] = {}
        self.deletes: set[bytes] = set()
        self.leased: set[bytes] = set()
        self._inodes: dict[int, _Rec | None] = {}
        self._blocks: dict[str, _Block | None] = {}

    def _guessed(self, key: bytes) -> bool:
        """Take a guess of inode `key`, if there is one, as the txn's read of it."""
        if self._guess is None or key[:1] != b"I" or len(key) != 9:
            return False
        found = self._guess(int.from_bytes(key[1:], "big"))
        if found is None:
            return False
        self._read[key], self.checks[key] = found
        return True

    def get(self, key: bytes) -> bytes | None:
        if key in self.puts:
            return self.puts[key]
        if key in self.deletes:
            return None
        if key not in self._read and not self._guessed(key):
            row = self.kv.get(key)
            self._read[key] = None if row is None else row[0]
            self.checks[key] = 0 if row is None else row[1]
        return self._read[key]

    def prefetch(
        self, keys: Iterable[bytes] = (), ranges: Iterable[tuple[bytes, bytes]] = ()
    ) -> None:
        """Read `keys` and the whole `ranges` in one request (KV.batch): later gets and
        scans within them are answered from it.  A range longer than PAGE is read again
        by its scans."""
        keys = [k for k in dict.fromkeys(keys) if k not in self._read and k not in self.puts]
        keys = [k for k in keys if k not in self.deletes and not self._guessed(k)]
        ranges = [r for r in dict.fromkeys(ranges) if r not in self._ranges]
        if len(keys) + len(ranges) < 2:
            return  # one read is one request anyway: made where it is needed
        rows = batched(self.kv, [(k, None, 0) for k in keys] + [(a, b, PAGE) for a, b in ranges])
        for k, found in zip(keys, rows):
            self._read[k] = found[0][1] if found else None
            self.checks[k] = found[0][2] if found else 0
        for r, found in zip(ranges, rows[len(keys) :]):
            if len(found) < PAGE:
                self._ranges[r] = [(k, v) for k, v, _ in found]

    def _prefetched(self, start: bytes, end: bytes) -> list[tuple[bytes, bytes]] | None:
        for (a, b), rows in self._ranges.items():
            if a <= start and end <= b:
                return [(k, v) for k, v in rows if start <= k < end]
        return None

    def read_value(self, key: bytes) -> bytes | None:
        """The value the txn read of `key` (None: absent, or not read)."""
        return self._read.get(key)

    def revision(self, key: bytes) -> int:
        """The mod_revision `get` saw (0: absent)."""
        self.get(key)
        return self.checks.get(key, 0)

    def put(self, key: bytes, value: bytes, leased: bool = False) -> None:
        self.deletes.discard(key)
        self.puts[key] = value
        if leased:
            self.leased.add(key)

    def delete(self, key: bytes) -> None:
        self.puts.pop(key, None)
        self.deletes.add(key)

    def scan(self, start: bytes, end: bytes, limit: int | None = None) -> list[tuple[bytes, bytes]]:
        """(key, value) in [start, end) as this txn sees them.  The keys are not checked
        one by one: a range is protected by its guard key (module docstring)."""
        out: list[tuple[bytes, bytes]] = []
        known = self._prefetched(start, end)
        if known is not None:
            out.extend((k, v) for k, v in known if k not in self.deletes and k not in self.puts)
        cursor = start
        page = PAGE if limit is None else min(PAGE, limit + len(self.deletes))
        while known is None and (limit is None or len(out) < limit):
            rows = self.kv.scan(cursor, end, page)
            out.extend((k, v) for k, v, _ in rows if k not in self.deletes and k not in self.puts)
            if len(rows) < page:
                break
            cursor = rows[-1][0] + b"\x00"
        out.extend((k, v) for k, v in self.puts.items() if start <= k < end)
        out.sort()
        return out if limit is None else out[:limit]

    # typed access, cached so that one inode or block is one object in the txn

    def inode(self, ino: int) -> _Rec | None:
        if ino not in self._inodes:
            v = self.get(k_inode(ino))
            self._inodes[ino] = None if v is None else _dec_inode(ino, v)
        return self._inodes[ino]

    def save(self, rec: _Rec) -> None:
        self._inodes[rec.inode.id] = rec
        self.put(k_inode(rec.inode.id), _enc_inode(rec))

    def block(self, block_id: str) -> _Block | None:
        if block_id not in self._blocks:
            v = self.get(k_block(block_id))
            self._blocks[block_id] = None if v is None else _dec_block(v)
        return self._blocks[block_id]

    def save_block(self, block_id: str, b: _Block) -> None:
        self._blocks[block_id] = b
        self.put(k_block(block_id), _enc_block(b))


def _is_dir(rec: _Rec) -> bool:
    return stat.S_ISDIR(rec.inode.mode)


class KvMeta:
    """The MetaStore over a KV (see the module docstring)."""

    direct = False
    local_calls = frozenset({"referenced"})  # (answered without a request)
    locks_at_create = True  # (a request saved: the lock is put by the create's commit)

    def __init__(
        self,
        kv: KV,
        *,
        holder: str | None = None,
        lock_ttl_s: float = 10.0,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        self.kv = kv
        self.clock = clock
        self._mutex = threading.Lock()
        self._inos: Iterator[int] = iter(())
        self._config: FsConfig | None = None
        self.files = FileCache()  # extents and xattrs at an inode revision (kvcache.py)
        self.lease = ClientLease(kv, lock_ttl_s, clock)  # the client's: its locks and session
        self.locks = KvLocks(self, holder)
        self.sessions = KvSessions(self)

    # ---------------------------------------------------------------- opening

    @classmethod
    def create(
        cls,
        kv: KV,
        config: FsConfig,
        ring: dict,
        root_uid: int,
        root_gid: int,
        *,
        owner: str | None = None,
        **opts: Any,
    ) -> KvMeta:
        """Make a new filesystem in an empty KV (UserError if it holds anything); `owner`:
        its owner token (hafs.store.owner)."""
        if kv.scan(b"", b"\xff", 1):
            raise UserError(
                f"{kv.name} is not empty: a new filesystem needs an empty metadata store"
                " (choose another name)"
            )
        t = now_ns()
        root = Inode(ROOT_INODE, 0o40755, root_uid, root_gid, 2, 0, t, t, t, 0, None)
        puts = {
            K_VERSION: str(LAYOUT_VERSION).encode(),
            K_CONFIG: _config_json(config),
            K_RING: json.dumps(ring).encode(),
            K_NEXT_INO: u64(ROOT_INODE + 1),
            k_inode(ROOT_INODE): _enc_inode(_Rec(root, 0)),
        }
        if owner is not None:
            puts[K_OWNER] = _enc_owner(owner, ())
        if kv.commit({K_VERSION: 0}, puts, ()) is None:
            raise UserError(f"{kv.name}: another mkfs created a filesystem here meanwhile")
        return cls(kv, **opts)

    @classmethod
    def open(cls, kv: KV, read_only: bool = False, **opts: Any) -> KvMeta:
        """Open the filesystem in `kv`, refusing one that is not hafs or is newer.

        read_only: every write is refused (ReadOnly), leases too (fsck's check)."""
        row = kv.get(K_VERSION)
        if row is None:
            loading = kv.get(K_LOADING)
            if loading is not None:
                raise UserError(
                    f"{kv.name}: a 'hafs meta load' into it has not finished"
                    f" ({loading[0].decode()}): if none is running, delete its keys (etcd:"
                    " 'etcdctl del --prefix /hafs/NAME/') and load again"
                )
            if kv.scan(b"", b"\xff", 1):
                raise UserError(
                    f"{kv.name} holds something that is not a hafs filesystem: give another"
                    " NAME (or delete those keys if nothing needs them; etcd: 'etcdctl del"
                    " --prefix /hafs/NAME/')"
                )
            raise UserError(f"{kv.name} holds no hafs filesystem: run 'hafs mkfs' to create one")
        version = int(row[0])
        if version > LAYOUT_VERSION:
            raise UserError(
                f"{kv.name} has metadata layout version {version}, newer than this hafs"
                f" understands ({LAYOUT_VERSION}): upgrade hafs"
            )
        return cls(ReadOnlyKV(kv) if read_only else kv, **opts)

    def close(self) -> None:
        """End the client's lease (its locks, session and roles are free at once)."""
        try:
            self.lease.revoke()
        finally:
            self.kv.close()

    def sync(self) -> None:
        """A no-op: a KV acknowledges a commit once it is durable."""

    def observe_requests(self, observe: Callable[[str, float], None]) -> None:
        """Hand each request to the store (call name, seconds) to `observe`: a KV over the
        network (EtcdKV) times its calls; one in memory has no requests."""
        kv = self.kv.kv if isinstance(self.kv, ReadOnlyKV) else self.kv
        if hasattr(kv, "observe"):
            kv.observe = observe

    # ------------------------------------------------------------ transactions

    def _transact(self, fn: Callable[[Txn], T], lease: int | None = None) -> tuple[T, int]:
        """Run fn in a Txn until its commit succeeds: (fn's result, the revision)."""
        delay = 0.0005
        for attempt in range(MAX_TRIES):
            t = Txn(self.kv, attempt, self._guess if attempt == 0 else None)
            try:
                result = fn(t)
            except MetaError:  # the store failed (etcd did not answer): no answer to check
                raise
            except Exception:  # an answer, or a bug met on an inconsistent view: check first
                if self.kv.commit(t.checks, {}, ()) is not None:
                    self._inodes_seen(t, None)
                    raise  # the answer holds: its reads were current
            else:
                rev = self.kv.commit(
                    t.checks, t.puts, t.deletes, lease, t.leased if lease is not None else None
                )
                if rev is not None:
                    self._inodes_seen(t, rev)
                    return result, rev
            time.sleep(random.uniform(0, delay))
            delay = min(delay * 2, 0.05)
        raise TxnConflict(f"{self.kv.name}: a metadata transaction conflicted {MAX_TRIES} times")

    def _run(self, fn: Callable[[Txn], T]) -> T:
        return self._transact(fn)[0]

    def _guess(self, ino: int) -> tuple[bytes, int] | None:
        return self.files.guess(ino)

    def _inodes_seen(self, t: Txn, rev: int | None) -> None:
        """Tell the file cache the revisions (and values) of the inodes a committed txn
        read (current at its commit) and wrote (now `rev`)."""
        for key, r in t.checks.items():
            if key[:1] == b"I" and len(key) == 9 and key not in t.puts:
                self.files.seen(int.from_bytes(key[1:], "big"), r, t.read_value(key))
        if rev is not None:
            for key, value in t.puts.items():
                if key[:1] == b"I" and len(key) == 9:
                    self.files.seen(int.from_bytes(key[1:], "big"), rev, value)
            for key in t.deletes:
                if key[:1] == b"I" and len(key) == 9:
                    self.files.deleted(int.from_bytes(key[1:], "big"))

    def _scan(
        self, start: bytes, end: bytes, limit: int | None = None, kv: KVReader | None = None
    ) -> Iterator[tuple]:
        """(key, value, revision) in [start, end), paged; not a transaction.  kv: read
        through it instead (a snapshot)."""
        kv = kv or self.kv
        n = 0
        while limit is None or n < limit:
            page = PAGE if limit is None else min(PAGE, limit - n)
            rows = kv.scan(start, end, page)
            yield from rows
            n += len(rows)
            if len(rows) < page:
                return
            start = rows[-1][0] + b"\x00"

    def _new_ino(self) -> int:
        with self._mutex:
            ino = next(self._inos, None)
            if ino is None:

                def take(t: Txn) -> int:
                    first = int.from_bytes(t.get(K_NEXT_INO), "big")
                    t.put(K_NEXT_INO, u64(first + INO_BATCH))
                    return first

                first = self._run(take)
                self._inos = iter(range(first + 1, first + INO_BATCH))
                ino = first
            return ino

    # --------------------------------------------------- configuration, ring

    def config(self) -> FsConfig:
        if self._config is None:
            self._config = self.fresh_config()
        return self._config

    def fresh_config(self) -> FsConfig:
        return FsConfig(**json.loads(self.kv.get(K_CONFIG)[0]))  # an older one lacks ca_pem

    def update_config(self, **changes: str | None) -> FsConfig:
        check_config_changes(changes)

        def op(t: Txn) -> FsConfig:
            config = replace(FsConfig(**json.loads(t.get(K_CONFIG))), **changes)
            t.put(K_CONFIG, _config_json(config))
            return config

        self._config = self._run(op)
        return self._config

    def ring(self) -> dict:
        return json.loads(self.kv.get(K_RING)[0])

    def ring_changed_ns(self) -> int:
        row = self.kv.get(K_RING_CHANGED)
        return 0 if row is None else int(row[0])

    def wait_ring(self, version: int, poll_s: float) -> None:
        """Return once the ring may have a version other than `version`: at once if it
        has, as soon as a watch of Mring sees it written, or after WATCH_S; while no
        watch can be made (no member takes it), after poll_s."""
        start = time.monotonic()
        value, rev = self.kv.get(K_RING)
        if json.loads(value).get("version") != version:
            return
        if not self.kv.watch(K_RING, rev, WATCH_S):
            time.sleep(max(0.0, poll_s - (time.monotonic() - start)))

    def replace_ring(self, ring: dict, expect_version: int) -> bool:
        def op(t: Txn) -> bool:
            if json.loads(t.get(K_RING)).get("version") != expect_version:
                return False
            t.put(K_RING, json.dumps(ring).encode())
            t.put(K_RING_CHANGED, str(now_ns()).encode())
            return True

        return self._run(op)

    # ------------------------------------------------------------ ownership

    def owner(self) -> Owner:
        """(see MetaStore.owner) A KV is one store wherever its clients are: never a copy."""
        row = self.kv.get(K_OWNER)
        token, previous = _dec_owner(None if row is None else row[0])
        return Owner(token, tuple(previous), self.kv.name)

    def adopt(self, token: str) -> None:
        def op(t: Txn) -> None:
            old, previous = _dec_owner(t.get(K_OWNER))
            if old not in (None, token) and old not in previous:
                previous = [*previous, old][-OWNERS_KEPT:]
            t.put(K_OWNER, _enc_owner(token, previous))

        self._run(op)

    # ------------------------------------------------------ inodes, entries

    def getattr(self, ino: int) -> Inode | None:
        """The inode, read with its first extents and xattrs (kept in `files`)."""
        if ino != ROOT_INODE and self.files.gone(ino):
            return None  # (fsck may make a root again, nothing else comes back)
        at = self.files.clock()
        xattrs = k_xattr(ino, b"")
        inode, extents, names = self.kv.batch(
            [
                (k_inode(ino), None, 0),
                self._first_extents(ino),
                (xattrs, prefix_end(xattrs), FIRST_EXTENTS),
            ]
        )
        return self._viewed(ino, at, inode, extents, names)

    @staticmethod
    def _first_extents(ino: int) -> Read:
        return (k_extents(ino), prefix_end(k_extents(ino)), FIRST_EXTENTS)

    def _viewed(
        self, ino: int, at: float, inode: list[tuple], extents: list[tuple], names: list | None
    ) -> Inode | None:
        """The inode of the rows of one batch (its key, its first extents, its first xattrs
        or None), which `files` keeps as a view of its revision."""
        if not inode:
            self.files.seen(ino, 0)
            return None
        view = FileView(inode[0][2], at, extents=[_dec_extent(k, v) for k, v, _ in extents])
        view.value = inode[0][1]
        if len(extents) == FIRST_EXTENTS:
            view.hi = view.extents[-1].end
        if names is not None and len(names) < FIRST_EXTENTS:
            view.xattrs = {k[9:]: v for k, v, _ in names}
        self.files.put(ino, view, keep_window=True)
        return _dec_inode(ino, inode[0][1]).inode

    def lookup(self, parent: int, name: bytes) -> Inode | None:
        if name in (b".", b".."):
            self._need_dir(parent)
            return self.getattr(parent if name == b"." else self.parent_of(parent) or parent)
        entry, dir_inode = self.kv.batch(
            [(k_entry(parent, name), None, 0), (k_inode(parent), None, 0)]
        )
        if not entry:
            if not dir_inode:
                raise FsError(errno.ENOENT)
            if not stat.S_ISDIR(_dec_inode(parent, dir_inode[0][1]).inode.mode):
                raise FsError(errno.ENOTDIR)
            return None
        return self.getattr(int.from_bytes(entry[0][1], "big"))

    def _need_dir(self, ino: int) -> None:
        inode = self.getattr(ino)
        if inode is None:
            raise FsError(errno.ENOENT)
        if not stat.S_ISDIR(inode.mode):
            raise FsError(errno.ENOTDIR)

    def parent_of(self, ino: int) -> int | None:
        rows = self.kv.scan(k_names(ino), prefix_end(k_names(ino)), 1)
        return int.from_bytes(rows[0][0][9:17], "big") if rows else None

    def path_of(self, ino: int) -> str:
        parts: list[str] = []
        while ino != ROOT_INODE and len(parts) < 256:
            rows = self.kv.scan(k_names(ino), prefix_end(k_names(ino)), 1)
            if not rows:
                return f"<inode {ino}>" + ("/" + "/".join(reversed(parts)) if parts else "")
            key = rows[0][0]
            ino = int.from_bytes(key[9:17], "big")
            parts.append(key[17:].decode(errors="replace"))
        return "/" + "/".join(reversed(parts))

    def readdir(self, parent: int, after: int, limit: int) -> list[tuple[Dentry, Inode]]:
        start = k_dir(parent) + (u64(after + 1) if after > 0 else b"")
        end = prefix_end(k_dir(parent))
        rows = self.kv.scan(start, end, limit + 1)
        if len(rows) > limit:  # never end a page between two names of one hash
            last = rows[limit - 1][0][9:17]
            if rows[limit][0][9:17] == last:
                kept = [r for r in rows[:limit] if r[0][9:17] != last]
                if kept:
                    rows = kept
                else:
                    group_end = k_dir(parent) + u64(int.from_bytes(last, "big") + 1)
                    rows = self.kv.scan(start, group_end, 1 << 20)
            else:
                rows = rows[:limit]
        dentries = [
            Dentry(int.from_bytes(key[9:17], "big"), key[17:], int.from_bytes(value, "big"))
            for key, value, _ in rows
        ]
        at = self.files.clock()
        reads: list[Read] = []
        for d in dentries:  # each inode with its first extents (st_blocks), in one request
            reads += [(k_inode(d.inode), None, 0), self._first_extents(d.inode)]
        rows = batched(self.kv, reads)  # (BATCH_READS is even: a pair is read at one revision)
        out = []
        for i, d in enumerate(dentries):
            inode = self._viewed(d.inode, at, rows[2 * i], rows[2 * i + 1], None)
            if inode is not None:
                out.append((d, inode))
        return out

    def _dir(self, t: Txn, ino: int) -> _Rec:
        rec = t.inode(ino)
        if rec is None:
            raise FsError(errno.ENOENT)
        if not _is_dir(rec):
            raise FsError(errno.ENOTDIR)
        return rec

    def _live_dir(self, t: Txn, ino: int) -> _Rec:
        """A directory that may take new entries (a removed one has nlink 0: ENOENT)."""
        rec = self._dir(t, ino)
        if rec.inode.nlink == 0:
            raise FsError(errno.ENOENT)
        return rec

    @staticmethod
    def _entry(t: Txn, parent: int, name: bytes) -> int | None:
        v = t.get(k_entry(parent, name))
        return None if v is None else int.from_bytes(v, "big")

    @staticmethod
    def _set_entry(t: Txn, parent: int, name: bytes, ino: int, old: int | None) -> None:
        if old is not None:
            t.delete(k_name(old, parent, name))
        t.put(k_entry(parent, name), u64(ino))
        t.put(k_name(ino, parent, name), b"")

    @staticmethod
    def _del_entry(t: Txn, parent: int, name: bytes, ino: int) -> None:
        t.delete(k_entry(parent, name))
        t.delete(k_name(ino, parent, name))

    @staticmethod
    def _has_entries(t: Txn, ino: int) -> bool:
        return bool(t.scan(k_dir(ino), prefix_end(k_dir(ino)), 1))

    def _add_nlink(self, t: Txn, rec: _Rec, delta: int, ts: int) -> None:
        rec.inode.nlink += delta
        rec.inode.ctime_ns = ts
        if rec.inode.nlink == 0:
            self._mark_unlinked(t, rec.inode.id)
        t.save(rec)

    def _orphan(self, t: Txn, rec: _Rec, ts: int) -> None:
        """A removed directory: nlink 0 (its "." and its name are gone)."""
        rec.inode.nlink = 0
        rec.inode.ctime_ns = ts
        self._mark_unlinked(t, rec.inode.id)
        t.save(rec)

    def _mark_unlinked(self, t: Txn, ino: int) -> None:
        """The inode lost its last name: this client's session keeps it until it lets go of
        it (or is over: `reap`)."""
        session = self.sessions.current
        t.put(k_unlinked(ino), b"" if session is None else session.id.encode())

    @staticmethod
    def _touch(t: Txn, rec: _Rec, ts: int) -> None:
        rec.inode.mtime_ns = rec.inode.ctime_ns = ts
        t.save(rec)

    def _need(self, t: Txn, ino: int) -> _Rec:
        rec = t.inode(ino)
        if rec is None:
            raise FsError(errno.ENOENT)
        return rec

    def mknod(
        self,
        parent: int,
        name: bytes,
        mode: int,
        uid: int,
        gid: int,
        rdev: int = 0,
        target: bytes | None = None,
        locked: bool = False,
    ) -> Inode:
        check_name(name)

        def op(t: Txn) -> Inode:
            t.prefetch([k_inode(parent), k_entry(parent, name)])
            p = self._live_dir(t, parent)
            if self._entry(t, parent, name) is not None:
                raise FsError(errno.EEXIST)
            m, g = mode, gid
            if p.inode.mode & stat.S_ISGID:  # BSD group semantics of setgid directories
                g = p.inode.gid
                if stat.S_ISDIR(m):
                    m |= stat.S_ISGID
            is_dir = stat.S_ISDIR(m)
            ts = now_ns()
            ino = self._new_ino()
            size = len(target) if target else 0
            inode = Inode(ino, m, uid, g, 2 if is_dir else 1, size, ts, ts, ts, rdev, target)
            t.save(_Rec(inode, 0))
            self._set_entry(t, parent, name, ino, None)
            self._touch(t, p, ts)
            if is_dir:
                self._add_nlink(t, p, 1, ts)
            return inode

        at = self.files.clock()
        if locked and stat.S_ISREG(mode):
            inode, rev = self.locks.create_locked(op)
        else:
            inode, rev = self._transact(op)
        self.files.put(inode.id, FileView(rev, at, extents=[], xattrs={}))  # a new one: empty
        return inode

    def link(self, ino: int, parent: int, name: bytes) -> Inode:
        def op(t: Txn) -> Inode:
            t.prefetch([k_inode(ino), k_inode(parent), k_entry(parent, name)])
            rec = self._need(t, ino)
            if _is_dir(rec):
                raise FsError(errno.EPERM)
            if rec.inode.nlink == 0:
                raise FsError(errno.ENOENT)
            check_name(name)
            p = self._live_dir(t, parent)
            if self._entry(t, parent, name) is not None:
                raise FsError(errno.EEXIST)
            ts = now_ns()
            self._set_entry(t, parent, name, ino, None)
            self._add_nlink(t, rec, 1, ts)
            self._touch(t, p, ts)
            return rec.inode

        return self._run(op)

    def unlink(self, parent: int, name: bytes, open_here: Container[int] = ()) -> Inode:
        def op(t: Txn) -> Inode:
            t.prefetch([k_inode(parent), k_entry(parent, name)])
            p = self._dir(t, parent)
            ino = self._entry(t, parent, name)
            if ino is None:
                raise FsError(errno.ENOENT)
            t.prefetch([k_inode(ino)], self._file_ranges(ino))  # what a drop reads
            rec = self._need(t, ino)
            if _is_dir(rec):
                raise FsError(errno.EISDIR)
            ts = now_ns()
            self._del_entry(t, parent, name, ino)
            self._add_nlink(t, rec, -1, ts)
            self._touch(t, p, ts)
            if rec.inode.nlink == 0 and ino not in open_here:
                self._drop_inode(t, ino)
            return rec.inode

        return self._run(op)

    def rmdir(self, parent: int, name: bytes) -> int:
        def op(t: Txn) -> int:
            t.prefetch([k_inode(parent), k_entry(parent, name)])
            p = self._dir(t, parent)
            if name == b".":
                raise FsError(errno.EINVAL)
            ino = self._entry(t, parent, name)
            if ino is None:
                raise FsError(errno.ENOENT)
            rec = self._dir(t, ino)
            if self._has_entries(t, ino):
                raise FsError(errno.ENOTEMPTY)
            ts = now_ns()
            self._del_entry(t, parent, name, ino)
            self._orphan(t, rec, ts)
            self._add_nlink(t, p, -1, ts)
            self._touch(t, p, ts)
            return ino

        return self._run(op)

    def rename(self, p_old: int, n_old: bytes, p_new: int, n_new: bytes, flags: int) -> int | None:
        def op(t: Txn) -> int | None:
            t.prefetch(
                [k_inode(p_old), k_inode(p_new), k_entry(p_old, n_old), k_entry(p_new, n_new)]
            )
            po = self._dir(t, p_old)
            pn = self._live_dir(t, p_new)
            check_name(n_new)
            ino = self._entry(t, p_old, n_old)
            if ino is None:
                raise FsError(errno.ENOENT)
            target = self._entry(t, p_new, n_new)
            t.prefetch([k_inode(ino)] + ([] if target is None else [k_inode(target)]))
            rec = self._need(t, ino)
            is_dir = _is_dir(rec)
            if is_dir and p_old != p_new:
                self._not_inside(t, ino, p_new)
            ts = now_ns()
            if flags & RENAME_EXCHANGE:
                if target is None:
                    raise FsError(errno.ENOENT)
                trec = self._need(t, target)
                if _is_dir(trec) and p_old != p_new:
                    self._not_inside(t, target, p_old)
                self._set_entry(t, p_old, n_old, target, ino)
                self._set_entry(t, p_new, n_new, ino, target)
                if p_old != p_new and is_dir != _is_dir(trec):
                    moved = 1 if is_dir else -1
                    self._add_nlink(t, pn, moved, ts)
                    self._add_nlink(t, po, -moved, ts)
                for r in (po, pn):
                    self._touch(t, r, ts)
                for r in (rec, trec):
                    r.inode.ctime_ns = ts
                    t.save(r)
                return None
            if target is not None and flags & RENAME_NOREPLACE:
                raise FsError(errno.EEXIST)
            if target == ino:
                return None  # two names of one file: POSIX says do nothing
            if target is not None:
                trec = self._need(t, target)
                if is_dir and not _is_dir(trec):
                    raise FsError(errno.ENOTDIR)
                if _is_dir(trec) and not is_dir:
                    raise FsError(errno.EISDIR)
                if _is_dir(trec) and self._has_entries(t, target):
                    raise FsError(errno.ENOTEMPTY)
                self._set_entry(t, p_new, n_new, ino, target)
                if _is_dir(trec):
                    self._orphan(t, trec, ts)
                    self._add_nlink(t, pn, -1, ts)
                else:
                    self._add_nlink(t, trec, -1, ts)
            else:
                self._set_entry(t, p_new, n_new, ino, None)
            self._del_entry(t, p_old, n_old, ino)
            if is_dir and p_old != p_new:
                self._add_nlink(t, po, -1, ts)
                self._add_nlink(t, pn, 1, ts)
            for r in (po, pn):
                self._touch(t, r, ts)
            rec.inode.ctime_ns = ts
            t.save(rec)
            return target

        return self._run(op)

    @staticmethod
    def _not_inside(t: Txn, ino: int, parent: int) -> None:
        """EINVAL if `parent` is directory `ino` or below it (a move would make a loop that
        the kernel of one mount cannot see when another mount moved things meanwhile).
        Each ancestor's inode is read: moving it writes it, so a concurrent move conflicts."""
        cur = parent
        while cur != ROOT_INODE:
            if cur == ino:
                raise FsError(errno.EINVAL)
            t.inode(cur)
            rows = t.scan(k_names(cur), prefix_end(k_names(cur)), 1)
            if not rows:
                return  # a removed directory
            cur = int.from_bytes(rows[0][0][9:17], "big")

    def setattr(self, ino: int, **fields: int) -> Inode:
        unknown = set(fields) - {"mode", "uid", "gid", "atime_ns", "mtime_ns"}
        if unknown:
            raise TypeError(f"setattr: cannot set {', '.join(sorted(unknown))}")

        def op(t: Txn) -> Inode:
            rec = self._need(t, ino)
            if not fields:
                return rec.inode
            for k, v in fields.items():
                if k == "mode":
                    v = (rec.inode.mode & ~0o7777) | (v & 0o7777)
                setattr(rec.inode, k, v)
            rec.inode.ctime_ns = now_ns()
            t.save(rec)
            return rec.inode

        return self._run(op)

    def delete_inode(self, ino: int) -> bool:
        return self._run(lambda t: self._drop_inode(t, ino))

    def _drop_inode(self, t: Txn, ino: int) -> bool:
        rec = t.inode(ino)
        if rec is None or rec.inode.nlink > 0:
            return False
        self._drop_extents(t, ino, 0, None)
        for key, _ in t.scan(k_xattr(ino, b""), prefix_end(k_xattr(ino, b""))):
            t.delete(key)
        t.delete(k_inode(ino))
        t.delete(k_unlinked(ino))
        return True

    def unlinked_inodes(self) -> list[int]:
        return [int.from_bytes(k[1:9], "big") for k, _, _ in self._scan(b"N", b"O")]

    # ----------------------------------------------------------------- xattrs

    def get_xattr(self, ino: int, name: bytes) -> bytes | None:
        view = self.files.get(ino)
        if view is not None and view.xattrs is not None:
            return view.xattrs.get(name)
        row = self.kv.get(k_xattr(ino, name))
        return None if row is None else row[0]

    def set_xattr(self, ino: int, name: bytes, value: bytes) -> None:
        check_xattr(name, value)

        def op(t: Txn) -> None:
            rec = self._need(t, ino)
            t.put(k_xattr(ino, name), value)
            rec.inode.ctime_ns = now_ns()
            t.save(rec)

        self._run(op)

    def list_xattrs(self, ino: int) -> list[bytes]:
        view = self.files.get(ino)
        if view is not None and view.xattrs is not None:
            return sorted(view.xattrs)
        start = k_xattr(ino, b"")
        return [k[9:] for k, _, _ in self._scan(start, prefix_end(start))]

    def remove_xattr(self, ino: int, name: bytes) -> None:
        def op(t: Txn) -> None:
            rec = self._need(t, ino)
            if t.get(k_xattr(ino, name)) is None:
                raise FsError(errno.ENODATA)
            t.delete(k_xattr(ino, name))
            rec.inode.ctime_ns = now_ns()
            t.save(rec)

        self._run(op)

    # ---------------------------------------------------------------- content

    def extents(self, ino: int, start: int, end: int) -> list[Extent]:
        view = self.files.get(ino)
        if view is None or not view.covers(start, end):
            view = self._read_extents(ino, start)
        if view.covers(start, end):
            return view.within(start, end)
        out = []  # more than a PAGE of extents: paged
        for key, value, _ in self._scan(k_extent(ino, start + 1), prefix_end(k_extents(ino))):
            e = _dec_extent(key, value)
            if e.offset >= end:
                break
            out.append(e)
        return out

    def _read_extents(self, ino: int, start: int) -> FileView:
        """A view of the extents ending after `start` (up to a PAGE of them), read with the
        inode, so kept at its revision."""
        at = self.files.clock()
        inode, rows = self.kv.batch(
            [(k_inode(ino), None, 0), (k_extent(ino, start + 1), prefix_end(k_extents(ino)), PAGE)]
        )
        view = FileView(inode[0][2] if inode else 0, at, start, None)
        view.value = inode[0][1] if inode else None
        view.extents = [_dec_extent(k, v) for k, v, _ in rows]
        if len(rows) == PAGE:
            view.hi = view.extents[-1].end
        if inode:
            self.files.put(ino, view)
        else:
            self.files.seen(ino, 0)
        return view

    def allocated_bytes(self, ino: int) -> int:
        view = self.files.get(ino)
        if view is not None and view.covers(0, 1 << 63):
            return sum(e.length for e in view.extents)
        rows = self._scan(k_extents(ino), prefix_end(k_extents(ino)))
        return sum(int.from_bytes(v[:8], "big") for _, v, _ in rows)

    @staticmethod
    def _file_ranges(ino: int) -> list[tuple[bytes, bytes]]:
        """The ranges of a file's extents and xattrs, as `_drop_inode` scans them."""
        return [
            (k_extent(ino, 1), prefix_end(k_extents(ino))),
            (k_xattr(ino, b""), prefix_end(k_xattr(ino, b""))),
        ]

    def _fence(self, t: Txn, rec: _Rec | None, ino: int, token: int) -> None:
        """The check of every fenced change: the lock is still this grant, and no newer
        token is recorded; records the token.  The lock key is only compared at the
        commit, not read; a commit that fails re-runs the operation, which reads it."""
        key = lock_key(f"inode:{ino}")
        if t.attempt == 0 and key not in t.checks:
            t.checks[key] = token
        elif t.revision(key) != token:
            raise LockLost(f"inode {ino}: write token {token} refused, its lock has ended")
        if rec is None:
            raise LockLost(f"inode {ino}: write token {token} refused, the file was deleted")
        if rec.fence > token:
            raise LockLost(
                f"inode {ino}: write token {token} refused, a newer writer holds token {rec.fence}"
            )
        if rec.fence != token:
            rec.fence = token
            t.save(rec)

    def fence(self, ino: int, token: int) -> Inode:
        created = self.locks.grants.fenced(f"inode:{ino}", token)
        if created is not None:
            return created  # locked by its create: no older token, the lock compared at commits

        def op(t: Txn) -> Inode:
            rec = t.inode(ino)
            self._fence(t, rec, ino, token)
            return rec.inode

        return self._run(op)

    def commit(
        self,
        ino: int,
        start: int,
        end: int,
        new: list[Extent],
        sizes: dict[str, int],
        size: int,
        mtime_ns: int,
        token: int | None = None,
    ) -> Inode:
        def op(t: Txn) -> Inode:
            t.prefetch(
                [k_inode(ino), *(k_block(b) for b in sizes)],
                [(k_extent(ino, start + 1), prefix_end(k_extents(ino)))],
            )
            rec = t.inode(ino)
            if token is not None:
                self._fence(t, rec, ino, token)
            if rec is None:
                raise FsError(errno.ENOENT)
            self._drop_extents(t, ino, start, end)
            for e in new:
                self._ref_block(t, e.block_id, sizes[e.block_id])
                t.put(k_extent(ino, e.end), _enc_extent(e))
                t.put(k_user(e.block_id, ino, e.offset), b"")
            rec.inode.size = size
            rec.inode.mtime_ns = mtime_ns
            rec.inode.ctime_ns = max(mtime_ns, now_ns())
            t.save(rec)
            return rec.inode

        return self._run(op)

    def truncate(self, ino: int, size: int, mtime_ns: int, token: int | None = None) -> Inode:
        def op(t: Txn) -> Inode:
            t.prefetch([k_inode(ino)], [(k_extent(ino, size + 1), prefix_end(k_extents(ino)))])
            rec = t.inode(ino)
            if token is not None:
                self._fence(t, rec, ino, token)
            if rec is None:
                raise FsError(errno.ENOENT)
            self._drop_extents(t, ino, size, None)
            for key, value in t.scan(k_extent(ino, size + 1), prefix_end(k_extents(ino)), 1):
                e = _dec_extent(key, value)  # ends past the size, starts before it
                t.delete(key)
                t.put(
                    k_extent(ino, size), _enc_extent(Extent(e.offset, size - e.offset, e.block_id))
                )
            rec.inode.size = size
            rec.inode.mtime_ns = rec.inode.ctime_ns = mtime_ns
            t.save(rec)
            return rec.inode

        return self._run(op)

    def _drop_extents(self, t: Txn, ino: int, start: int, end: int | None) -> None:
        """Delete the extents starting in [start, end) and release their blocks."""
        ts = now_ns()
        dropped = []
        for key, value in t.scan(k_extent(ino, start + 1), prefix_end(k_extents(ino))):
            e = _dec_extent(key, value)
            if end is not None and e.offset >= end:
                break
            if e.offset >= start:
                dropped.append((key, e))
        t.prefetch(k_block(e.block_id) for _, e in dropped)  # their rows in one request
        for key, e in dropped:
            t.delete(key)
            t.delete(k_user(e.block_id, ino, e.offset))
            b = t.block(e.block_id)
            if b is None:
                continue  # a block row already gone (fsck reports it)
            b.refcount -= 1
            if b.zero_since_ns is not None:
                t.delete(k_garbage(b.zero_since_ns, e.block_id))
            b.zero_since_ns = ts if b.refcount == 0 else None
            if b.zero_since_ns is not None:
                t.put(k_garbage(ts, e.block_id), b"")
            t.save_block(e.block_id, b)

    @staticmethod
    def _ref_block(t: Txn, block_id: str, size: int) -> None:
        b = t.block(block_id)
        if b is None:
            b = _Block(size, 0, None)
        if b.zero_since_ns is not None:
            t.delete(k_garbage(b.zero_since_ns, block_id))
        b.refcount += 1
        b.zero_since_ns = None
        t.save_block(block_id, b)

    # ---------------------------------------------------------------- figures

    def usage(self) -> Usage:
        inodes = self.count_inodes()
        logical = sum(int.from_bytes(v[:8], "big") for _, v, _ in self._scan(b"E", b"F"))
        stored = blocks = 0
        for _, v, _ in self._scan(b"B", b"C"):
            b = _dec_block(v)
            if b.refcount > 0:
                stored += b.size
                blocks += 1
        return Usage(inodes, logical, stored, blocks)

    def count_inodes(self) -> int:
        return sum(1 for _ in self._scan(b"I", b"J"))

    # ------------------------------------------------- garbage and degraded

    def garbage_blocks(self, before_ns: int, limit: int) -> list[str]:
        return [k[9:].decode() for k, _, _ in self._scan(b"Z", b"Z" + u64(before_ns), limit)]

    def referenced(self, block_ids: list[str]) -> set[str]:
        return set()  # a read of the blocks' rows is a request on etcd: they are stored again

    def forget_block(self, block_id: str) -> bool:
        def op(t: Txn) -> bool:
            b = t.block(block_id)
            if b is None or b.refcount != 0:
                return False
            t.delete(k_block(block_id))
            if b.zero_since_ns is not None:
                t.delete(k_garbage(b.zero_since_ns, block_id))
            t.delete(k_degraded(block_id))
            return True

        return self._run(op)

    def record_degraded(self, block_id: str, nodes: list[str]) -> None:
        def op(t: Txn) -> None:
            v = t.get(k_degraded(block_id))
            since, known = (now_ns(), []) if v is None else _dec_degraded(v)
            value = u64(since) + " ".join(sorted({*known, *nodes})).encode()
            t.put(k_degraded(block_id), value)

        self._run(op)

    def degraded_blocks(self, after: str, limit: int) -> list[tuple[str, list[str]]]:
        start = k_degraded(after) + b"\x00"
        rows = self._scan(start, b"H", limit)
        return [(k[1:].decode(), _dec_degraded(v)[1]) for k, v, _ in rows]

    def forget_degraded(self, block_id: str) -> None:
        self.kv.commit({}, {}, {k_degraded(block_id)})

    def clear_degraded(self, keep: set[str]) -> int:
        gone = [k for k, _, _ in self._scan(b"G", b"H") if k[1:].decode() not in keep]
        for i in range(0, len(gone), 64):
            self.kv.commit({}, {}, gone[i : i + 64])
        return len(gone)

    def count_degraded(self) -> int:
        return sum(1 for _ in self._scan(b"G", b"H"))

    # ------------------------------------------------------------------ scans

    def scan_inodes(self, after: int, limit: int) -> list[Inode]:
        rows = self._scan(k_inode(after) + b"\x00", b"J", limit)
        return [_dec_inode(int.from_bytes(k[1:9], "big"), v).inode for k, v, _ in rows]

    def scan_entries(self, after: tuple[int, bytes], limit: int) -> list[tuple[int, bytes, int]]:
        """In (parent, name hash, name) order: a page goes on after the entry `after` names
        (parent 0: from the start)."""
        start = k_dir(0) if after[0] == 0 else k_entry(*after) + b"\x00"
        return [
            (int.from_bytes(k[1:9], "big"), k[17:], int.from_bytes(v[:8], "big"))
            for k, v, _ in self._scan(start, b"E", limit)
        ]

    def scan_blocks(self, after: str, limit: int) -> list[BlockRow]:
        out = []
        for k, v, _ in self._scan(k_block(after) + b"\x00", b"C", limit):
            b = _dec_block(v)
            out.append(BlockRow(k[1:].decode(), b.size, b.refcount, b.zero_since_ns))
        return out

    def scan_extents(self, after: tuple[int, int], limit: int) -> list[tuple[int, Extent]]:
        ino, off = after
        out: list[tuple[int, Extent]] = []
        for k, v, _ in self._scan(k_extent(max(ino, 0), max(off + 1, 0)), b"F"):
            i = int.from_bytes(k[1:9], "big")
            e = _dec_extent(k, v)
            if (i, e.offset) <= after:
                continue
            out.append((i, e))
            if len(out) == limit:
                break
        return out

    def block_users(self, block_id: str, limit: int) -> list[int]:
        out: list[int] = []
        start = k_users(block_id)
        for k, _, _ in self._scan(start, prefix_end(start)):
            i = int.from_bytes(k[len(start) : len(start) + 8], "big")
            if not out or out[-1] != i:
                out.append(i)
                if len(out) == limit:
                    break
        return out

    def block_refs(self, block_id: str) -> int:
        start = k_users(block_id)
        return sum(1 for _ in self._scan(start, prefix_end(start)))

    def block_rows(self, block_ids: list[str]) -> dict[str, BlockRow]:
        out = {}
        for bid in block_ids:
            row = self.kv.get(k_block(bid))
            if row is not None:
                b = _dec_block(row[0])
                out[bid] = BlockRow(bid, b.size, b.refcount, b.zero_since_ns)
        return out

    def names(self, ino: int, limit: int) -> list[tuple[int, bytes]]:
        start = k_names(ino)
        rows = self._scan(start, prefix_end(start), limit)
        return [(int.from_bytes(k[9:17], "big"), k[17:]) for k, _, _ in rows]

    # ------------------------------------------------------------ dump, load

    @contextmanager
    def dump(self) -> Iterator[tuple[FsState, Iterator[Record]]]:
        """Every record, read at one revision (see MetaStore.dump)."""
        with self.kv.snapshot() as snap:

            def value(key: bytes) -> bytes | None:
                row = snap.get(key)
                return None if row is None else row[0]

            owner, previous = _dec_owner(value(K_OWNER))
            state = FsState(
                FsConfig(**json.loads(value(K_CONFIG))),
                json.loads(value(K_RING)),
                int(value(K_RING_CHANGED) or 0),
                int.from_bytes(value(K_NEXT_INO), "big"),
                owner,
                tuple(previous),
            )
            yield state, self._records(snap)

    def _records(self, snap: KVReader) -> Iterator[Record]:
        def keys(prefix: bytes) -> Iterator[tuple]:
            return self._scan(prefix, prefix_end(prefix), kv=snap)

        for k, v, _ in keys(b"I"):
            yield _dec_inode(int.from_bytes(k[1:9], "big"), v).inode
        for k, v, _ in keys(b"D"):
            yield Entry(int.from_bytes(k[1:9], "big"), k[17:], int.from_bytes(v, "big"))
        for k, v, _ in keys(b"X"):
            yield Xattr(int.from_bytes(k[1:9], "big"), k[9:], v)
        for k, v, _ in keys(b"E"):
            yield FileExtent(int.from_bytes(k[1:9], "big"), _dec_extent(k, v))
        for k, v, _ in keys(b"B"):
            b = _dec_block(v)
            yield BlockRow(k[1:].decode(), b.size, b.refcount, b.zero_since_ns)
        for k, v, _ in keys(b"G"):
            since, nodes = _dec_degraded(v)
            yield Degraded(k[1:].decode(), tuple(nodes), since)

    @classmethod
    def load(cls, kv: KV, state: FsState, records: Iterable[Record]) -> None:
        """Make a new filesystem in an empty KV from a dump's state and records (UserError
        if it holds anything).  The keys go in transactions of at most LOAD_OPS keys and
        LOAD_BYTES bytes under the marker Mloading; the last one writes Mversion and the
        settings and drops the marker, so the filesystem exists only once whole.  A load
        that fails deletes what it wrote (where it cannot, `open` names the unfinished
        load).  Fencing tokens start again at 0: they only compare with this KV's locks."""
        if kv.scan(b"", b"\xff", 1):
            raise UserError(
                f"{kv.name} is not empty: a load needs an empty metadata store (give another NAME)"
            )
        marker = {"host": socket.gethostname(), "pid": os.getpid(), "since_ns": now_ns()}
        rev = kv.commit({K_VERSION: 0, K_LOADING: 0}, {K_LOADING: json.dumps(marker).encode()}, ())
        if rev is None:
            raise UserError(f"{kv.name}: another mkfs or load is writing there")
        try:
            puts: dict[bytes, bytes] = {}
            size = 0
            for rec in records:
                keys = _keys_of(rec)
                more = sum(len(k) + len(v) for k, v in keys)
                if len(puts) + len(keys) > LOAD_OPS or size + more > LOAD_BYTES:
                    kv.commit({}, puts, ())
                    puts, size = {}, 0
                puts.update(keys)
                size += more
            if puts:
                kv.commit({}, puts, ())
            settings = {
                K_VERSION: str(LAYOUT_VERSION).encode(),
                K_CONFIG: _config_json(state.config),
                K_RING: json.dumps(state.ring).encode(),
                K_NEXT_INO: u64(state.next_ino),
            }
            if state.ring_changed_ns:
                settings[K_RING_CHANGED] = str(state.ring_changed_ns).encode()
            if state.owner is not None:
                settings[K_OWNER] = _enc_owner(state.owner, state.owner_previous)
            if kv.commit({K_VERSION: 0, K_LOADING: rev}, settings, {K_LOADING}) is None:
                raise UserError(f"{kv.name} was written by another client during the load")
        except BaseException:
            _wipe(kv)
            raise

    # ------------------------------------------------------------------- fsck

    def describe(self) -> dict:
        row = self.kv.get(K_VERSION)
        return {
            "engine": "kv",
            "location": self.kv.name,
            "schema": int(row[0]) if row else None,
            "current": LAYOUT_VERSION,
            "recover": f"restore {self.kv.name} from a backup (a snapshot of the KV store)",
        }

    def check_storage(self, limit: int) -> list[str]:
        """Nothing to check: the KV keeps its own storage sound."""
        return []

    def damaged(self, exc: BaseException) -> str | None:
        return None

    @contextmanager
    def snapshot(self) -> Iterator[bool]:
        """No snapshot across calls: each read sees the KV as it is then."""
        yield False

    def fsck_add_root(self, uid: int, gid: int) -> bool:
        def op(t: Txn) -> bool:
            if t.inode(ROOT_INODE) is not None:
                return False
            ts = now_ns()
            root = Inode(ROOT_INODE, stat.S_IFDIR | 0o755, uid, gid, 2, 0, ts, ts, ts, 0, None)
            t.save(_Rec(root, 0))
            return True

        return self._run(op)

    def fsck_drop_entry(self, parent: int, name: bytes) -> int | None:
        def op(t: Txn) -> int | None:
            ino = self._entry(t, parent, name)
            if ino is not None:
                self._del_entry(t, parent, name, ino)
                self._guard(t, parent)
            return ino

        return self._run(op)

    def fsck_add_entry(self, parent: int, name: bytes, ino: int) -> None:
        check_name(name)

        def op(t: Txn) -> None:
            rec = self._need(t, ino)
            p = self._dir(t, parent)
            if self._entry(t, parent, name) is not None:
                raise FsError(errno.EEXIST)
            ts = now_ns()
            self._set_entry(t, parent, name, ino, None)
            if _is_dir(rec):
                self._add_nlink(t, p, 1, ts)
            else:
                n = len(t.scan(k_names(ino), prefix_end(k_names(ino))))
                self._set_nlink(t, rec, n)
            self._touch(t, p, ts)

        self._run(op)

    @staticmethod
    def _guard(t: Txn, ino: int) -> None:
        """Write the inode that guards the ranges under it (module docstring), if any."""
        rec = t.inode(ino)
        if rec is not None:
            t.save(rec)

    @staticmethod
    def _set_nlink(t: Txn, rec: _Rec, nlink: int) -> None:
        rec.inode.nlink = nlink
        if nlink == 0:
            t.put(k_unlinked(rec.inode.id), b"")
        else:
            t.delete(k_unlinked(rec.inode.id))
        t.save(rec)

    def fsck_set_nlink(self, ino: int, nlink: int) -> None:
        self._run(lambda t: self._set_nlink(t, self._need(t, ino), nlink))

    def fsck_set_size(self, ino: int, size: int) -> None:
        def op(t: Txn) -> None:
            rec = self._need(t, ino)
            rec.inode.size = size
            t.save(rec)

        self._run(op)

    @staticmethod
    def _extent_at(t: Txn, ino: int, offset: int) -> tuple[bytes, Extent] | None:
        """The extent starting at `offset` (keyed by its end: the first ending after
        `offset`, unless extents overlap)."""
        start, end = k_extent(ino, offset + 1), prefix_end(k_extents(ino))
        while True:
            rows = t.scan(start, end, 64)
            for key, value in rows:
                e = _dec_extent(key, value)
                if e.offset == offset:
                    return key, e
            if len(rows) < 64:
                return None
            start = rows[-1][0] + b"\x00"

    @staticmethod
    def _set_block(t: Txn, block_id: str, size: int, refcount: int) -> None:
        """The block row (and its garbage entry) as fsck_set_block describes it."""
        b = t.block(block_id)
        old = b.zero_since_ns if b is not None else None
        since = None if refcount > 0 else old if old is not None else now_ns()
        if old is not None and old != since:
            t.delete(k_garbage(old, block_id))
        if since is not None:
            t.put(k_garbage(since, block_id), b"")
        t.save_block(block_id, _Block(size, refcount, since))

    def fsck_drop_extent(self, ino: int, offset: int) -> bool:
        def op(t: Txn) -> bool:
            found = self._extent_at(t, ino, offset)
            if found is None:
                return False
            key, e = found
            t.delete(key)
            t.delete(k_user(e.block_id, ino, offset))
            b = t.block(e.block_id)
            if b is not None:
                self._set_block(t, e.block_id, b.size, max(b.refcount - 1, 0))
            self._guard(t, ino)
            return True

        return self._run(op)

    def fsck_cut_extent(self, ino: int, offset: int, length: int) -> None:
        def op(t: Txn) -> None:
            found = self._extent_at(t, ino, offset)
            if found is None:
                raise FsError(errno.ENOENT)
            key, e = found
            if not 0 < length < e.length:
                raise FsError(errno.EINVAL, f"cannot cut an extent of {e.length} to {length}")
            new = k_extent(ino, offset + length)
            if t.get(new) is not None:
                raise FsError(errno.EEXIST, f"inode {ino}: an extent ends at {offset + length}")
            t.delete(key)
            t.put(new, _enc_extent(Extent(offset, length, e.block_id)))
            self._guard(t, ino)

        self._run(op)

    def fsck_set_block(self, block_id: str, size: int, refcount: int) -> None:
        self._run(lambda t: self._set_block(t, block_id, size, refcount))


def _keys_of(rec: Record) -> list[tuple[bytes, bytes]]:
    """The keys that say a dump's record, with the keys derived from it."""
    if isinstance(rec, Inode):
        keys = [(k_inode(rec.id), _enc_inode(_Rec(rec, 0)))]
        return keys + [(k_unlinked(rec.id), b"")] if rec.nlink == 0 else keys
    if isinstance(rec, Entry):
        return [
            (k_entry(rec.parent, rec.name), u64(rec.inode)),
            (k_name(rec.inode, rec.parent, rec.name), b""),
        ]
    if isinstance(rec, Xattr):
        return [(k_xattr(rec.inode, rec.name), rec.value)]
    if isinstance(rec, FileExtent):
        e = rec.extent
        return [
            (k_extent(rec.inode, e.end), _enc_extent(e)),
            (k_user(e.block_id, rec.inode, e.offset), b""),
        ]
    if isinstance(rec, BlockRow):
        b = _Block(rec.size, rec.refcount, rec.zero_since_ns)
        keys = [(k_block(rec.id), _enc_block(b))]
        if rec.refcount == 0 and rec.zero_since_ns is not None:
            keys.append((k_garbage(rec.zero_since_ns, rec.id), b""))
        return keys
    if isinstance(rec, Degraded):
        return [(k_degraded(rec.block_id), u64(rec.since_ns) + " ".join(rec.nodes).encode())]
    raise TypeError(f"not a dump record: {rec!r}")


def _wipe(kv: KV) -> None:
    """Delete every key of a KV that a failed load wrote (best effort: logged if not)."""
    try:
        while rows := kv.scan(b"", b"\xff", LOAD_OPS):
            kv.commit({}, {}, [k for k, _, _ in rows])
    except Exception as e:
        log.warning("deleting what a failed load wrote into %s failed: %s", kv.name, e)


class ReadOnlyKV:
    """A KV that refuses every write: what a check reads through (`KvMeta.open`)."""

    def __init__(self, kv: KV) -> None:
        self.kv = kv
        self.name = kv.name

    def get(self, key: bytes) -> tuple[bytes, int] | None:
        return self.kv.get(key)

    def scan(self, start: bytes, end: bytes, limit: int) -> list[tuple[bytes, bytes, int]]:
        return self.kv.scan(start, end, limit)

    def batch(self, reads: list[Read]) -> list[list[tuple[bytes, bytes, int]]]:
        return self.kv.batch(reads)

    def commit(
        self,
        checks: dict[bytes, int],
        puts: dict[bytes, bytes],
        deletes: Collection[bytes],
        lease: int | None = None,
        leased: Collection[bytes] | None = None,
    ) -> int | None:
        if puts or deletes:
            raise ReadOnly(f"{self.name} is opened read-only: nothing may be written")
        return self.kv.commit(checks, {}, (), None, None)

    def snapshot(self) -> AbstractContextManager[KVReader]:
        return self.kv.snapshot()

    def lease_grant(self, ttl_s: float) -> int:
        raise ReadOnly(f"{self.name} is opened read-only: no lease may be taken")

    def lease_keepalive(self, lease: int, timeout_s: float | None = None) -> bool:
        return self.kv.lease_keepalive(lease, timeout_s)

    def lease_revoke(self, lease: int) -> None:
        self.kv.lease_revoke(lease)

    def lease_ttl(self, lease: int) -> float | None:
        return self.kv.lease_ttl(lease)

    def watch(self, key: bytes, revision: int, timeout_s: float) -> bool:
        return self.kv.watch(key, revision, timeout_s)

    def close(self) -> None:
        self.kv.close()


def _dec_degraded(v: bytes) -> tuple[int, list[str]]:
    return int.from_bytes(v[:8], "big"), v[8:].decode().split()


def _enc_owner(token: str, previous: Iterable[str]) -> bytes:
    return json.dumps({"token": token, "previous": list(previous)}).encode()


def _dec_owner(v: bytes | None) -> tuple[str | None, list[str]]:
    """Mowner's token and earlier tokens; (None, []) where there is none."""
    value = json.loads(v) if v is not None else {}
    return value.get("token"), list(value.get("previous", []))
