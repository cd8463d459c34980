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
by `timeout_s` in total (each request by `request_timeout_s`); past it the
call raises `MetaUnavailable`, which the FUSE adapter turns into EIO.  What
etcd refuses for good (too many operations in a transaction, a request too
large, the space quota reached, a permission) raises `MetaError` at once with
what to do.  `is_temp_failure` is that classification.

A commit whose request failed after it was sent (a timeout, a leader change)
may have been applied anyway; it is retried, and if it had been applied its
checks now fail, so KvMeta re-runs the operation against what it finds.  That
is safe (no operation is applied twice) but such an operation may answer as if
another client had done its work (EEXIST from its own mknod).

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


def open_etcd(url: str, **opts: Any) -> KvMeta:
    """Open the filesystem at `url` (UserError if it is not there).  `opts` go to EtcdKV
    (timeout_s, request_timeout_s) and KvMeta (holder, lock_ttl_s, clock)."""
    kv_opts, meta_opts = _split(opts)
    endpoints, name = parse_meta_url(url)
    kv = EtcdKV(endpoints, prefix_of(name), name=url, **kv_opts)
    try:
        return KvMeta.open(kv, **meta_opts)
    except BaseException:
        kv.close()
        raise


def create_etcd(url: str, config: FsConfig, ring: dict, uid: int, gid: int, **opts: Any) -> KvMeta:
    """Make a new filesystem at `url` (UserError if its prefix holds anything)."""
    kv_opts, meta_opts = _split(opts)
    endpoints, name = parse_meta_url(url)
    kv = EtcdKV(endpoints, prefix_of(name), name=url, **kv_opts)
    try:
        return KvMeta.create(kv, config, ring, uid, gid, **meta_opts)
    except BaseException:
        kv.close()
        raise


def load_etcd(url: str, state: FsState, records: Iterable[Record]) -> None:
    """Make a new filesystem at `url` from a dump (UserError if its prefix holds anything)."""
    endpoints, name = parse_meta_url(url)
    kv = EtcdKV(endpoints, prefix_of(name), name=url)
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
        self.request_timeout_s = request_timeout_s
        self._first = 0  # the member that answered last
        self._idle: list[list[etcd3gw.Etcd3Client]] = [[] for _ in self._members]
        self._pool_lock = threading.Lock()
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

    def _call(self, path: str, body: dict, call: str) -> dict:
        """POST one gateway request, failing over between members until `timeout_s`; its
        time (retries included) goes to `observe` as `call`'s."""
        observe = self.observe
        if observe is None:
            return self._failover(path, body)
        start = time.perf_counter()
        try:
            return self._failover(path, body)
        finally:
            observe(call, time.perf_counter() - start)

    def _failover(self, path: str, body: dict) -> dict:
        deadline = time.monotonic() + self.timeout_s
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
                if left <= 0:
                    raise MetaUnavailable(
                        f"{self.name}: etcd did not answer within {self.timeout_s:g} s"
                        f" (last: {why}); is a majority of its members up?"
                    ) from None
                level = logging.WARNING if tries > 2 * len(self._members) else logging.INFO
                log.log(level, "etcd %s failed (try %d, %.1f s left): %s", path, tries, left, why)
                if tries % len(self._members) == 0:  # a whole round failed: wait a little
                    time.sleep(min(random.uniform(delay / 2, delay), left))
                    delay = min(delay * 2, 1.0)
                continue
            self._first = i
            return reply

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
        reply = self._call("kv/txn", {"compare": compare, "success": ops}, "commit")
        if not reply.get("succeeded", False):
            return None
        return int(reply["header"]["revision"])

    def lease_grant(self, ttl_s: float) -> int:
        reply = self._call("lease/grant", {"TTL": max(1, math.ceil(ttl_s))}, "lease_grant")
        return int(reply["ID"])

    def lease_keepalive(self, lease: int) -> bool:
        reply = self._call("lease/keepalive", {"ID": lease}, "lease_keepalive")
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
