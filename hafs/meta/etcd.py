"""The `etcd` engine: the `KV` of meta/kv.py over etcd v3, so KvMeta runs on a cluster.

A thin adapter: `EtcdKV` maps each KV call to one request of etcd's v3 JSON
gateway (etcd >= 3.4, path /v3/), sent with etcd3gw's HTTP client:

    get        POST /v3/kv/range {key}
    scan       POST /v3/kv/range {key, range_end, limit}        (etcd answers in key order)
    batch      POST /v3/kv/txn   {success: one request_range per read}: several reads at
                                  one revision in one round trip (a read-only transaction)
    snapshot   the same with {revision}: reads of the revision current when it began, which
               etcd keeps until it compacts it (then a MetaError says so)
    commit     POST /v3/kv/txn   {compare: mod_revision == N (0: absent), success: puts
                                  (each with its lease or none) and deletes}
    lease_*    POST /v3/lease/grant | keepalive | revoke | timetolive
    watch      POST /v3/watch    {create_request: {key, start_revision}}, a stream read
                                  until its first event or a read timeout

Keys and values travel base64-encoded.  Every key is stored under the
filesystem's prefix (b"/hafs/NAME/"), added on the way in and stripped on
the way out; a scan's range is clamped to the prefix, so it never leaves it.

Several endpoints (the members of one cluster): a call goes to the member
that answered last; a connection error, a timeout or a temporary etcd error
(no leader, leader changed, request timed out: gRPC UNAVAILABLE,
DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED) moves it to the next member, with a
jittered backoff after each round over all of them.  Every call is bounded
by `timeout_s` in total (each request by `request_timeout_s`, at most half of
it, so one stuck request leaves time for another member; the mount's
`-o meta_timeout_s`); past it the call raises `MetaUnavailable`, which the
FUSE adapter turns into EIO.  What etcd refuses for good (too many operations
in a transaction, a request too large, the space quota reached, a permission)
raises `MetaError` at once with what to do.  `is_temp_failure` is that
classification.

Outages: the first call that runs out of its bound starts an outage, logged
once (META-UNAVAILABLE, an ERROR); while it lasts each call tries for at most
OUTAGE_CALL_S, so that an operation of several calls fails within about the
bound too, and the first call that is answered ends it (META-AVAILABLE).
Nothing needs reopening: calls simply work again once a quorum is back.
Opening a filesystem (`connect`) asks once, for at most OPEN_TIMEOUT_S, and
a URL that does not answer is a UserError naming it.

A commit that writes carries a marker: the key PREFIX~txn/<random> (beside
the filesystem's prefix, never in it: a NAME holds no "~") is put in the same
transaction, bound to a lease of the EtcdKV's own (MARKER_TTL_S or six
call bounds, taken anew a third of the way through), and the transaction also compares it
absent.  When a commit's request fails after it may have been sent (a
timeout, a leader change) it is sent again with the same marker: at most one
of the two can apply, and if the second finds its compares false the marker
says whether the first did (its mod_revision is that commit's revision).  So
a commit whose reply was lost answers as the commit it was, never as if
another client had done its work (EEXIST from its own mknod).  A marker is
deleted by the client's next commit that writes; the lease ends the rest.
(A commit of MAX_TXN_OPS operations has no room for a marker: it goes without.)

Limits: KvMeta writes one whole operation in one transaction; etcd refuses a
transaction of more than `--max-txn-ops` operations (default 128) or a
request over `--max-request-bytes` (default 1.5 MiB).  hafs needs etcd
started with `--max-txn-ops 4096 --max-request-bytes 16777216` (README,
"Cluster mode"); below that, large files' extent commits and deletions fail
with a MetaError naming the flag.

Concurrency: KvMeta calls an EtcdKV from several worker threads at once.
A request takes an idle etcd3gw client of its member (one requests.Session
each, so one HTTP connection) from a pool guarded by a threading.Lock, and
gives it back after; so there are as many clients as concurrent requests
have been.  The index of the member to try first is a plain int whose races
only change which member is asked.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import math
import random
import re
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import etcd3gw
from etcd3gw import exceptions as gwexc

from ..errors import MetaError, MetaUnavailable, UserError
from . import FsConfig, FsState, Record
from .kv import KvMeta, LeaseNotFound, prefix_end

log = logging.getLogger(__name__)

DEFAULT_PORT = 2379
MAX_TXN_OPS = 4096  # what hafs needs etcd's --max-txn-ops to be at least
MAX_REQUEST_BYTES = 16 << 20  # and --max-request-bytes
OPEN_TIMEOUT_S = 10.0  # opening a filesystem: its URL answers within this, or a UserError
OUTAGE_CALL_S = 2.0  # while etcd is known not to answer, a call tries this long at most
MARKER_TTL_S = 300  # a commit marker's lease, at least 6 call bounds (two thirds are left at use)
MARKER_TAIL = b"~txn/"  # markers go under the prefix without its "/", then this
MARKERS_DELETED = 8  # earlier markers a commit deletes at most

# gRPC status codes etcd's gateway puts in an error body ("code")
_NOT_FOUND, _INVALID_ARGUMENT, _PERMISSION_DENIED = 5, 3, 7
_TEMPORARY_CODES = {4, 8, 10, 14}  # DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, ABORTED, UNAVAILABLE
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


# ---------------------------------------------------------------- the URL


def parse_meta_url(url: str) -> tuple[list[str], str]:
    """`etcd://h1:2379,h2:2379,h3:2379/NAME` -> (["http://h1:2379", ...], NAME).

    A host without a port gets etcd's 2379; an IPv6 host is written in brackets.
    """
    form = "etcd://HOST:PORT[,HOST:PORT...]/NAME"
    scheme, sep, rest = url.partition("://")
    if not sep or scheme != "etcd":
        raise UserError(f"metadata URL {url!r}: expected {form}")
    hosts, _, name = rest.partition("/")
    if not hosts:
        raise UserError(f"metadata URL {url!r} names no etcd host: expected {form}")
    endpoints = []
    for hostport in hosts.split(","):
        host, port = _host_port(url, hostport)
        endpoints.append(f"http://{host}:{port}")
    if not name:
        raise UserError(
            f"metadata URL {url!r} names no filesystem: add /NAME after the hosts ({form})"
        )
    if not _NAME.fullmatch(name):
        raise UserError(
            f"metadata URL {url!r}: filesystem name {name!r} may hold only letters, digits,"
            " '.', '_' and '-' (at most 100, not starting with '.', '_' or '-')"
        )
    return endpoints, name


def _host_port(url: str, hostport: str) -> tuple[str, int]:
    if hostport.startswith("["):
        host, sep, tail = hostport[1:].partition("]")
        if not sep or not host:
            raise UserError(f"metadata URL {url!r}: bad IPv6 host {hostport!r} ('[ADDR]:PORT')")
        host = f"[{host}]"
        if tail and not tail.startswith(":"):
            raise UserError(f"metadata URL {url!r}: bad host {hostport!r}")
        port = tail[1:] if tail else None
    else:
        host, sep, port = hostport.partition(":")
        if not sep:
            port = None
    if not host or not re.fullmatch(r"\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+", host):
        raise UserError(f"metadata URL {url!r}: bad etcd host {hostport!r} (HOST:PORT)")
    if port is None:
        return host, DEFAULT_PORT
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(
            f"metadata URL {url!r}: bad port {port!r} for {host} (a number from 1 to 65535)"
        )
    return host, int(port)


def prefix_of(name: str) -> bytes:
    """Where the filesystem NAME keeps its keys in etcd."""
    return b"/hafs/" + name.encode() + b"/"


def connect(url: str, **kv_opts: Any) -> EtcdKV:
    """The EtcdKV of the filesystem at `url`, once etcd has answered a first request
    (within OPEN_TIMEOUT_S, or timeout_s if smaller): a URL that does not answer is a
    UserError that names it and what to check."""
    endpoints, name = parse_meta_url(url)
    kv = EtcdKV(endpoints, prefix_of(name), name=url, **kv_opts)
    try:
        kv.ping(min(OPEN_TIMEOUT_S, kv.timeout_s))
    except MetaUnavailable as e:
        kv.close()
        raise UserError(
            f"etcd at {url} does not answer ({e.why}): check that its members run and listen"
            f" at {', '.join(endpoints)}, and that a majority of them is up"
        ) from None
    except BaseException:
        kv.close()
        raise
    return kv


def open_etcd(url: str, **opts: Any) -> KvMeta:
    """Open the filesystem at `url` (UserError if it is not there).  `opts` go to EtcdKV
    (timeout_s, request_timeout_s) and KvMeta (holder, lock_ttl_s, clock)."""
    kv_opts, meta_opts = _split(opts)
    kv = connect(url, **kv_opts)
    try:
        return KvMeta.open(kv, **meta_opts)
    except BaseException:
        kv.close()
        raise


def create_etcd(url: str, config: FsConfig, ring: dict, uid: int, gid: int, **opts: Any) -> KvMeta:
    """Make a new filesystem at `url` (UserError if its prefix holds anything)."""
    kv_opts, meta_opts = _split(opts)
    kv = connect(url, **kv_opts)
    try:
        return KvMeta.create(kv, config, ring, uid, gid, **meta_opts)
    except BaseException:
        kv.close()
        raise


def load_etcd(url: str, state: FsState, records: Iterable[Record]) -> None:
    """Make a new filesystem at `url` from a dump (UserError if its prefix holds anything)."""
    kv = connect(url)
    try:
        KvMeta.load(kv, state, records)
    finally:
        kv.close()


def _split(opts: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    kv_keys = {"timeout_s", "request_timeout_s"}
    return (
        {k: v for k, v in opts.items() if k in kv_keys},
        {k: v for k, v in opts.items() if k not in kv_keys},
    )


# -------------------------------------------------------------- failures


def _etcd_error(exc: gwexc.Etcd3Exception) -> tuple[int | None, str]:
    """(gRPC code, message) from the error body the gateway sent, if it sent one."""
    try:
        body = json.loads(exc.detail_text or "")
        return body.get("code"), body.get("message") or body.get("error") or ""
    except (ValueError, AttributeError):
        return None, exc.detail_text or (exc.args[0] if exc.args else type(exc).__name__)


def is_temp_failure(exc: BaseException) -> bool:
    """Whether a failed request may succeed if tried again (on this member or another)."""
    if isinstance(exc, gwexc.ConnectionFailedError | gwexc.ConnectionTimeoutError):
        return True  # no answer, an HTTP 503/504/408, or the member's gateway lost etcd
    if isinstance(exc, gwexc.Etcd3Exception):
        code, message = _etcd_error(exc)
        if "space exceeded" in message:
            return False  # the quota: nothing gets better by waiting
        if code in _TEMPORARY_CODES:
            return True
        return isinstance(exc, gwexc.InternalServerError) and code is None
    return False


def _refusal(name: str, exc: gwexc.Etcd3Exception) -> MetaError:
    """The error for what etcd refused for good, saying what to do."""
    code, message = _etcd_error(exc)
    if "too many operations" in message:
        return MetaError(
            f"{name}: etcd refused a transaction ({message}): start every etcd member with"
            f" --max-txn-ops {MAX_TXN_OPS} or more (README, cluster mode)"
        )
    if "request is too large" in message:
        return MetaError(
            f"{name}: etcd refused a request ({message}): start every etcd member with"
            f" --max-request-bytes {MAX_REQUEST_BYTES} or more (README, cluster mode)"
        )
    if "space exceeded" in message:
        return MetaError(
            f"{name}: etcd is out of space ({message}): compact and defragment it, or raise"
            " its --quota-backend-bytes, then 'etcdctl alarm disarm'"
        )
    if "compacted" in message:
        return MetaError(
            f"{name}: etcd compacted the revision a consistent read was reading ({message}):"
            " run it again when fewer writes go on, or raise etcd's"
            " --auto-compaction-retention"
        )
    if code == _PERMISSION_DENIED or "permission denied" in message:
        return MetaError(f"{name}: etcd refused access ({message}): hafs needs a user-less etcd")
    return MetaError(f"{name}: etcd refused a request: {message or exc!r}")


# ---------------------------------------------------------------- the KV


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _unb64(s: str | None) -> bytes:
    return base64.b64decode(s) if s else b""


class EtcdKV:
    """The `KV` protocol (meta/kv.py) over one etcd cluster, under `prefix`."""

    def __init__(
        self,
        endpoints: list[str],
        prefix: bytes,
        *,
        name: str | None = None,
        timeout_s: float = 30.0,
        request_timeout_s: float = 5.0,
    ) -> None:
        if not endpoints:
            raise ValueError("EtcdKV needs at least one endpoint")
        if not prefix:
            raise ValueError("EtcdKV needs a non-empty key prefix")
        self._members = []
        for ep in endpoints:
            u = urlsplit(ep)
            if u.scheme != "http" or not u.hostname or u.port is None:
                raise ValueError(f"etcd endpoint {ep!r}: expected http://HOST:PORT")
            self._members.append((u.hostname, u.port))
        self.prefix = prefix
        self._end = prefix_end(prefix)
        self.name = name or "etcd://" + ",".join(e.split("://")[1] for e in endpoints)
        self.timeout_s = timeout_s
        # at most half the bound: a request stuck on a member (one whose leader was just
        # killed) leaves time to ask another within the call's bound
        self.request_timeout_s = min(request_timeout_s, timeout_s / 2)
        self._first = 0  # the member that answered last
        self._idle: list[list[etcd3gw.Etcd3Client]] = [[] for _ in self._members]
        self._pool_lock = threading.Lock()
        self._state_lock = threading.Lock()  # the outage and the markers
        self._down_since: float | None = None  # monotonic start of the outage, if one is on
        self._marker_lease: tuple[int, float] | None = None  # (lease id, monotonic grant)
        self._marker_ttl_s = max(MARKER_TTL_S, 6 * timeout_s)
        self.markers = prefix.rstrip(b"/") + MARKER_TAIL  # where the markers are
        self._granting = threading.Lock()  # one marker lease grant at a time
        self._applied: list[bytes] = []  # markers of applied commits, deleted by the next
        # (call, seconds) of each call ("get", "scan", "batch", "commit", "lease_*"; not
        # watches): KvMeta.observe_requests sets it, a mount's metrics count them
        self.observe: Callable[[str, float], None] | None = None

    # ------------------------------------------------------------ transport

    @contextlib.contextmanager
    def _client(self, i: int) -> Iterator[etcd3gw.Etcd3Client]:
        """An idle client of member i (or a new one), given back after."""
        with self._pool_lock:
            c = self._idle[i].pop() if self._idle[i] else None
        if c is None:
            host, port = self._members[i]
            c = etcd3gw.Etcd3Client(host=host, port=port, api_path="/v3/")
            c.session.trust_env = False  # no proxy from the environment for etcd
        try:
            yield c
        finally:
            with self._pool_lock:
                self._idle[i].append(c)

    def _post(self, i: int, path: str, body: dict, timeout: float) -> dict:
        """One request to member i."""
        with self._client(i) as c:
            c.timeout = timeout
            return c.post(c.get_url(path), json=body)

    def _call(
        self,
        path: str,
        body: dict,
        call: str,
        bound_s: float | None = None,
        failures: list[str] | None = None,
    ) -> dict:
        """POST one gateway request (see _failover); its time (retries included) goes to
        `observe` as `call`'s."""
        observe = self.observe
        if observe is None:
            return self._failover(path, body, bound_s, failures)
        start = time.perf_counter()
        try:
            return self._failover(path, body, bound_s, failures)
        finally:
            observe(call, time.perf_counter() - start)

    def _failover(
        self, path: str, body: dict, bound_s: float | None, failures: list[str] | None
    ) -> dict:
        """POST one gateway request, failing over between members for `bound_s` (default
        `timeout_s`; OUTAGE_CALL_S at most during an outage).  `failures`: each failed
        try is appended to it (a commit learns that its request may have been applied)."""
        bound = self.timeout_s if bound_s is None else min(bound_s, self.timeout_s)
        outage = self._down_since is not None
        if outage:
            bound = min(bound, OUTAGE_CALL_S)
        deadline = time.monotonic() + bound
        delay = 0.05
        tries = 0
        first = self._first
        while True:
            i = (first + tries) % len(self._members)
            timeout = max(0.001, min(self.request_timeout_s, deadline - time.monotonic()))
            try:
                reply = self._post(i, path, body, timeout)
            except gwexc.Etcd3Exception as e:
                if not is_temp_failure(e):
                    code, message = _etcd_error(e)
                    if code == _NOT_FOUND and "lease not found" in message:
                        raise LeaseNotFound(message) from None
                    raise _refusal(self.name, e) from None
                tries += 1
                left = deadline - time.monotonic()
                host, port = self._members[i]
                why = f"{host}:{port}: {_etcd_error(e)[1] or type(e).__name__}"
                if failures is not None:
                    failures.append(why)
                if left <= 0:
                    if bound_s is None:
                        self._outage(why)
                    since = self._down_since
                    what = (
                        f"has not answered for {time.monotonic() - since:.0f} s"
                        if outage and since is not None
                        else f"did not answer within {bound:g} s"
                    )
                    raise MetaUnavailable(
                        f"{self.name}: etcd {what} (last: {why}); is a majority of its members up?",
                        why,
                    ) from None
                level = logging.DEBUG if outage or bound_s is not None else logging.INFO
                log.log(level, "etcd %s failed (try %d, %.1f s left): %s", path, tries, left, why)
                if tries % len(self._members) == 0:  # a whole round failed: wait a little
                    time.sleep(min(random.uniform(delay / 2, delay), left))
                    delay = min(delay * 2, 1.0)
                continue
            self._first = i
            if self._down_since is not None:
                self._outage(None)
            return reply

    def _outage(self, why: str | None) -> None:
        """Start the outage (why: the last failure) or end it (None), logging it once."""
        with self._state_lock:
            since = self._down_since
            if (since is None) == (why is None):
                return
            self._down_since = time.monotonic() if why is not None else None
        if why is not None:
            log.error(
                "META-UNAVAILABLE %s: etcd did not answer within %g s (last: %s); metadata calls"
                " fail with EIO (after at most %g s each) until a majority of its members is"
                " back",
                self.name,
                self.timeout_s,
                why,
                OUTAGE_CALL_S,
            )
        else:
            log.warning(
                "META-AVAILABLE %s: etcd answers again, after %.1f s",
                self.name,
                time.monotonic() - since,
            )

    def ping(self, bound_s: float) -> None:
        """One read, failing over for at most bound_s (MetaUnavailable), no outage logged."""
        self._call("kv/range", {"key": _b64(self.prefix), "keys_only": True}, "ping", bound_s)

    @staticmethod
    def _range_body(start: bytes, end: bytes | None, limit: int, revision: int = 0) -> dict:
        body: dict[str, Any] = {"key": _b64(start)}
        if end is not None:
            body["range_end"] = _b64(end)
        if limit:
            body["limit"] = limit
        if revision:
            body["revision"] = revision
        return body

    def _range(
        self, call: str, start: bytes, end: bytes | None, limit: int, revision: int = 0
    ) -> list[dict]:
        body = self._range_body(start, end, limit, revision)
        return self._call("kv/range", body, call).get("kvs", [])

    def _rows(self, kvs: list[dict]) -> list[tuple[bytes, bytes, int]]:
        n = len(self.prefix)
        return [
            (_unb64(kv["key"])[n:], _unb64(kv.get("value")), int(kv["mod_revision"])) for kv in kvs
        ]

    # ------------------------------------------------------------------- KV

    def get(self, key: bytes, revision: int = 0) -> tuple[bytes, int] | None:
        """revision > 0: as the key was at that revision (the `snapshot` reader's)."""
        kvs = self._range("get", self.prefix + key, None, 0, revision)
        return (_unb64(kvs[0].get("value")), int(kvs[0]["mod_revision"])) if kvs else None

    def scan(
        self, start: bytes, end: bytes, limit: int, revision: int = 0
    ) -> list[tuple[bytes, bytes, int]]:
        lo, hi = self.prefix + start, min(self.prefix + end, self._end)
        if lo >= hi or limit <= 0:
            return []
        return self._rows(self._range("scan", lo, hi, limit, revision))

    def batch(self, reads: list[tuple[bytes, bytes | None, int]]) -> list[list[tuple]]:
        """One read-only transaction of range requests: every read at one revision."""
        ops, sent = [], []
        for i, (start, end, limit) in enumerate(reads):
            lo = self.prefix + start
            if end is None:
                ops.append({"request_range": self._range_body(lo, None, 0)})
            else:
                hi = min(self.prefix + end, self._end)
                if lo >= hi or limit <= 0:
                    continue
                ops.append({"request_range": self._range_body(lo, hi, limit)})
            sent.append(i)
        out: list[list[tuple]] = [[] for _ in reads]
        if ops:
            reply = self._call("kv/txn", {"compare": [], "success": ops}, "batch")
            for i, resp in zip(sent, reply.get("responses", [])):
                out[i] = self._rows(resp.get("response_range", {}).get("kvs", []))
        return out

    @contextmanager
    def snapshot(self) -> Iterator[_AtRevision]:
        body = {"key": _b64(self.prefix), "limit": 1, "keys_only": True}
        reply = self._call("kv/range", body, "snapshot")
        yield _AtRevision(self, int(reply["header"]["revision"]))

    def commit(
        self,
        checks: dict[bytes, int],
        puts: dict[bytes, bytes],
        deletes: Collection[bytes],
        lease: int | None = None,
        leased: Collection[bytes] | None = None,
    ) -> int | None:
        compare = [
            {"key": _b64(self.prefix + k), "target": "MOD", "result": "EQUAL", "mod_revision": r}
            for k, r in checks.items()
        ]
        ops: list[dict] = [
            {"request_delete_range": {"key": _b64(self.prefix + k)}} for k in deletes
        ]
        for k, v in puts.items():
            put: dict[str, Any] = {"key": _b64(self.prefix + k), "value": _b64(v)}
            if lease is not None and (leased is None or k in leased):
                put["lease"] = lease
            ops.append({"request_put": put})
        room = MAX_TXN_OPS - max(len(ops), len(compare))  # (etcd's limit, on each list)
        if not ops or room < 1:  # a check only: sent again as it is, it answers the same
            reply = self._call("kv/txn", {"compare": compare, "success": ops}, "commit")
            return int(reply["header"]["revision"]) if reply.get("succeeded", False) else None
        marker = self.markers + uuid.uuid4().hex.encode()
        n = min(MARKERS_DELETED, room - 1)  # (a few, so that a commit stays within the limit)
        with self._state_lock:
            done, self._applied = self._applied[:n], self._applied[n:]
        ops += [{"request_delete_range": {"key": _b64(k)}} for k in done]
        key = _b64(marker)
        compare.append({"key": key, "target": "MOD", "result": "EQUAL", "mod_revision": 0})
        for again in (False, True):
            put_marker = {"request_put": {"key": key, "value": "", "lease": self._marker()}}
            body = {"compare": compare, "success": [*ops, put_marker]}
            failures: list[str] = []
            try:
                reply = self._call("kv/txn", body, "commit", None, failures)
            except LeaseNotFound:
                if again or not self._marker_ended(lease):
                    raise
                continue  # the markers' lease ended (a long pause): again with a new one
            break
        if reply.get("succeeded", False):
            with self._state_lock:
                self._applied.append(marker)
            return int(reply["header"]["revision"])
        if failures:  # a try that failed may have been applied: its marker says
            rows = self._range("marker", marker, None, 0)
            if rows:
                log.info("etcd commit applied by a try whose reply was lost (%s)", failures[-1])
                with self._state_lock:
                    self._applied.append(marker)
                return int(rows[0]["mod_revision"])
        return None

    def _marker(self) -> int:
        """The lease commit markers are bound to: granted anew once a third of it is past
        (a commit and the read of its marker take two call bounds at most)."""
        renew_s = self._marker_ttl_s / 3
        current = self._marker_lease
        if current is not None and time.monotonic() - current[1] < renew_s:
            return current[0]
        with self._granting:
            current = self._marker_lease
            if current is None or time.monotonic() - current[1] >= renew_s:
                now = time.monotonic()
                current = self._marker_lease = (self.lease_grant(self._marker_ttl_s), now)
            return current[0]

    def _marker_ended(self, lease: int | None) -> bool:
        """After LeaseNotFound: whether it was the markers' lease that ended (dropped then)
        rather than the commit's own `lease`."""
        current = self._marker_lease
        if current is None or (lease is not None and self.lease_ttl(current[0]) is not None):
            return False
        self._marker_lease = None
        return True

    def lease_grant(self, ttl_s: float) -> int:
        reply = self._call("lease/grant", {"TTL": max(1, math.ceil(ttl_s))}, "lease_grant")
        return int(reply["ID"])

    def lease_keepalive(self, lease: int, timeout_s: float | None = None) -> bool:
        reply = self._call("lease/keepalive", {"ID": lease}, "lease_keepalive", timeout_s)
        return int(reply.get("result", {}).get("TTL", 0)) > 0  # ended: no TTL

    def lease_revoke(self, lease: int) -> None:
        try:
            self._call("lease/revoke", {"ID": lease}, "lease_revoke")
        except LeaseNotFound:
            pass  # ended already

    def lease_ttl(self, lease: int) -> float | None:
        ttl = int(self._call("lease/timetolive", {"ID": lease}, "lease_ttl").get("TTL", 0))
        return None if ttl < 0 else float(ttl)

    def watch(self, key: bytes, revision: int, timeout_s: float) -> bool:
        """Wait for a change of `key` after `revision`: True at its first event (or when
        etcd compacted past `revision` or cancelled the watch: read it again), False after
        timeout_s without one, or at once if the member that answered last does not take
        the watch (the caller polls then; its next read fails over).

        One streaming request, read here with a read timeout: etcd3gw's watch helpers
        post theirs without a timeout (a member that hangs would hold the thread for
        good) and start a thread pool per watch."""
        body = {"create_request": {"key": _b64(self.prefix + key), "start_revision": revision + 1}}
        i = self._first
        with self._client(i) as c:
            try:
                with c.session.post(
                    c.get_url("watch"),
                    json=body,
                    stream=True,
                    timeout=(self.request_timeout_s, timeout_s),
                ) as resp:
                    if resp.status_code != 200:
                        return False
                    for line in resp.iter_lines():
                        result = json.loads(line).get("result", {}) if line.strip() else {}
                        if result.get("events") or result.get("compact_revision"):
                            return True
                        if result.get("canceled"):
                            return True
            except (OSError, ValueError) as e:  # requests' errors are OSErrors
                host, port = self._members[i]
                log.debug("etcd watch on %s:%d ended: %s", host, port, e)
        return False

    def close(self) -> None:
        with self._pool_lock:
            clients = [c for idle in self._idle for c in idle]
            for idle in self._idle:
                idle.clear()
        for c in clients:
            c.session.close()


class _AtRevision:
    """Reads of one etcd revision (`EtcdKV.snapshot`)."""

    def __init__(self, kv: EtcdKV, revision: int) -> None:
        self.kv = kv
        self.revision = revision

    def get(self, key: bytes) -> tuple[bytes, int] | None:
        return self.kv.get(key, self.revision)

    def scan(self, start: bytes, end: bytes, limit: int) -> list[tuple[bytes, bytes, int]]:
        return self.kv.scan(start, end, limit, self.revision)
