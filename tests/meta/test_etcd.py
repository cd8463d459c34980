"""The etcd adapter's own: URLs, prefixes, etcd's limits, failover and the time bound.

One real 3-member cluster for the module (tests/etcdproc.py); a test that stops
members starts them again in its finally, so the next test finds it whole.
"""

from __future__ import annotations

import signal
import time

import pytest
from etcd3gw import exceptions as gwexc
from etcdproc import free_port, require_etcd, running_cluster

from hafs.errors import MetaError, MetaUnavailable, UserError
from hafs.meta import ROOT_INODE, FsConfig
from hafs.meta.etcd import (
    MAX_TXN_OPS,
    EtcdKV,
    connect,
    create_etcd,
    open_etcd,
    parse_meta_url,
)
from hafs.meta.kv import KvMeta

CONFIG = FsConfig("fs-uuid", 2, 1, "tok", 123)
RING = {"version": 1, "nodes": []}
REG = 0o100644


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    require_etcd()
    with running_cluster(tmp_path_factory.mktemp("etcd")) as c:
        yield c


@pytest.fixture
def whole(cluster):
    """The cluster, made whole again (every member running and healthy) after the test."""
    try:
        yield cluster
    finally:
        for i, m in enumerate(cluster.members):
            if not m.running():
                cluster.start_member(i)
        cluster.wait_healthy()


def test_parse_meta_url():
    assert parse_meta_url("etcd://h1:2379,h2:2380,10.0.0.3/prod") == (
        ["http://h1:2379", "http://h2:2380", "http://10.0.0.3:2379"],
        "prod",
    )
    assert parse_meta_url("etcd://[::1]:2379/a.b_c-1") == (["http://[::1]:2379"], "a.b_c-1")
    for url, what in [
        ("http://h1:2379/prod", "expected etcd://"),
        ("h1:2379/prod", "expected etcd://"),
        ("etcd:///prod", "names no etcd host"),
        ("etcd://h1:2379,,h2/prod", "bad etcd host"),
        ("etcd://h1:port/prod", "bad port 'port'"),
        ("etcd://h1:0/prod", "bad port '0'"),
        ("etcd://h1:70000/prod", "bad port '70000'"),
        ("etcd://h1:2379", "names no filesystem"),
        ("etcd://h1:2379/", "names no filesystem"),
        ("etcd://h1:2379/a/b", "may hold only letters"),
        ("etcd://h1:2379/.hidden", "may hold only letters"),
        ("etcd://h1:2379/caf\u00e9", "may hold only letters"),
        ("etcd://[::1/prod", "bad IPv6 host"),
    ]:
        with pytest.raises(UserError, match=what):
            parse_meta_url(url)


def test_filesystems_keep_to_their_prefixes(cluster):
    a = create_etcd(cluster.url("pa"), CONFIG, RING, 0, 0)
    b = create_etcd(cluster.url("pa2"), CONFIG, RING, 0, 0)  # "pa" begins its name
    junk = EtcdKV(cluster.endpoints, b"/hafs/junk/")
    try:
        junk.commit({}, {b"Z": b"not hafs"}, ())
        a.mknod(ROOT_INODE, b"only-in-a", REG, 0, 0)
        assert b.lookup(ROOT_INODE, b"only-in-a") is None
        for m in (a, b):
            keys = [k for k, _, _ in m.kv.scan(b"", b"\xff\xff", 1000)]
            assert keys and all(k[:1] in b"IDPM" for k in keys), keys  # its own layout only
        assert a.kv.scan(b"Z", b"\xff\xff", 10) == []
        with pytest.raises(UserError, match="not empty"):
            create_etcd(cluster.url("pa"), CONFIG, RING, 0, 0)
        with pytest.raises(UserError, match="holds no hafs filesystem: run 'hafs mkfs'"):
            open_etcd(cluster.url("nothing-here"))
        with pytest.raises(UserError, match="not a hafs filesystem"):
            open_etcd(cluster.url("junk"))
    finally:
        junk.close()
        a.close()
        b.close()


def test_a_transaction_over_etcds_limit_names_the_flag(cluster):
    kv = EtcdKV(cluster.endpoints, b"/hafs/limits/")
    try:
        puts = {b"k%05d" % i: b"" for i in range(MAX_TXN_OPS)}
        assert kv.commit({}, puts, ()) is not None  # the documented limit holds
        puts[b"one-more"] = b""
        t = time.monotonic()
        with pytest.raises(MetaError, match=f"--max-txn-ops {MAX_TXN_OPS}"):
            kv.commit({}, puts, ())
        assert time.monotonic() - t < 5  # refused at once, not retried until the bound
    finally:
        kv.close()


def test_calls_go_on_when_the_leader_dies_or_a_member_hangs(whole):
    m = create_etcd(whole.url("failover"), CONFIG, RING, 0, 0, request_timeout_s=1)
    try:
        leader = whole.leader()
        assert leader is not None
        m.kv._first = leader  # the client talks to the leader itself
        m.mknod(ROOT_INODE, b"before", REG, 0, 0)
        whole.stop_member(leader, signal.SIGKILL)
        for i in range(20):  # every call succeeds: on another member, after the election
            m.mknod(ROOT_INODE, b"f%d" % i, REG, 0, 0)
        assert {m.lookup(ROOT_INODE, b"f%d" % i) is not None for i in range(20)} == {True}
        whole.start_member(leader)
        hung = m.kv._first  # the member the client uses now stops answering
        whole.pause_member(hung)
        try:
            t = time.monotonic()
            m.mknod(ROOT_INODE, b"after-pause", REG, 0, 0)
            assert time.monotonic() - t < 10  # one request timeout, then another member
        finally:
            whole.resume_member(hung)
        assert m.kv._first != hung
        assert m.lookup(ROOT_INODE, b"before") is not None
    finally:
        m.close()


def test_without_a_quorum_calls_fail_within_the_bound_and_work_again(whole):
    m = create_etcd(whole.url("quorum"), CONFIG, RING, 0, 0, timeout_s=3, request_timeout_s=1)
    try:
        f = m.mknod(ROOT_INODE, b"f", REG, 0, 0)
        whole.stop_member(1)
        whole.stop_member(2)
        for call in (lambda: m.getattr(f.id), lambda: m.mknod(ROOT_INODE, b"g", REG, 0, 0)):
            t = time.monotonic()
            with pytest.raises(MetaUnavailable, match="did not answer within 3 s|not answered"):
                call()
            assert time.monotonic() - t < 3 + 1.5  # the bound, plus one request's slack
        whole.start_member(1)  # a quorum again: the same client works on, no reopening
        assert m.getattr(f.id) == f
        m.mknod(ROOT_INODE, b"g2", REG, 0, 0)
    finally:
        m.close()


class LosingKV(EtcdKV):
    """A fault-injecting double: the reply of the next `lose` commits that write is lost,
    after etcd applied them (`before=True`: the request is lost before it is sent)."""

    def __init__(self, *args, before: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lose = 0
        self.before = before

    def _post(self, i: int, path: str, body: dict, timeout: float) -> dict:
        if path == "kv/txn" and body["success"] and self.lose > 0:
            self.lose -= 1
            if not self.before:
                super()._post(i, path, body, timeout)  # applied ...
            raise gwexc.ConnectionTimeoutError("reply lost")  # ... but the client never knows
        return super()._post(i, path, body, timeout)


@pytest.mark.parametrize("before", [False, True], ids=["reply-lost", "request-lost"])
def test_a_commit_whose_reply_was_lost_answers_as_the_commit_it_was(cluster, before):
    url = cluster.url(f"lost-{before}")
    create_etcd(url, CONFIG, RING, 0, 0).close()
    kv = LosingKV(cluster.endpoints, f"/hafs/lost-{before}/".encode(), before=before)
    m = KvMeta.open(kv)
    try:
        m.mknod(ROOT_INODE, b"first", REG, 0, 0)  # (takes inode numbers: the next is mknod's)
        kv.lose = 1
        f = m.mknod(ROOT_INODE, b"f", REG, 0, 0)  # not EEXIST from its own first try
        assert kv.lose == 0 and m.lookup(ROOT_INODE, b"f") == f
        kv.lose = 1
        m.rename(ROOT_INODE, b"f", ROOT_INODE, b"g", 0)  # not ENOENT
        assert m.lookup(ROOT_INODE, b"f") is None and m.lookup(ROOT_INODE, b"g").id == f.id
        kv.lose = 1
        m.unlink(ROOT_INODE, b"g")
        assert m.lookup(ROOT_INODE, b"g") is None
        rev = kv.commit({}, {b"Qk": b"v"}, ())  # a commit whose checks fail says so
        kv.lose = 1
        assert kv.commit({b"Qk": rev - 1}, {b"Qk": b"w"}, ()) is None
        assert kv.get(b"Qk") == (b"v", rev)
        assert not [k for k, _, _ in kv.scan(b"", b"\xff", 1000) if b"txn" in k]
        markers = kv._range("scan", kv.markers, kv.markers + b"\xff", 100)
        assert 1 <= len(markers) <= 8  # beside the prefix; the next commits delete them
    finally:
        m.close()


def test_a_url_that_does_not_answer_is_refused_at_open_within_the_bound(tmp_path):
    url = f"etcd://127.0.0.1:{free_port()},127.0.0.1:{free_port()}/prod"
    for timeout_s, bound in ((30, 10), (3, 3)):
        t = time.monotonic()
        with pytest.raises(UserError, match="does not answer.*majority of them is up") as e:
            connect(url, timeout_s=timeout_s)
        assert time.monotonic() - t < bound + 2
        assert url in str(e.value)


def test_an_outage_is_logged_once_and_calls_fail_fast_until_it_ends(whole, caplog):
    m = create_etcd(whole.url("outage"), CONFIG, RING, 0, 0, timeout_s=3, request_timeout_s=1)
    try:
        f = m.mknod(ROOT_INODE, b"f", REG, 0, 0)
        whole.stop_member(1)
        whole.stop_member(2)
        with pytest.raises(MetaUnavailable):
            m.getattr(f.id)
        for i in range(3):  # during the outage: each call within OUTAGE_CALL_S
            t = time.monotonic()
            with pytest.raises(MetaUnavailable):
                m.mknod(ROOT_INODE, b"g%d" % i, REG, 0, 0)
            assert time.monotonic() - t < 2 + 1
        whole.start_member(1)
        m.mknod(ROOT_INODE, b"g", REG, 0, 0)
        assert m.getattr(f.id) == f
    finally:
        m.close()
    lines = [r.getMessage() for r in caplog.records]
    assert sum("META-UNAVAILABLE" in line for line in lines) == 1, lines
    assert sum("META-AVAILABLE" in line for line in lines) == 1, lines
