"""The session of a tool that works alone (fsck --repair, rebalance, node lost/adopt)
on a real etcd: renewed while the tool works, ended within its ttl when the tool is
killed (so a dead repair on one host does not keep every mount out for a day)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from etcdproc import require_etcd, running_cluster

import hafs.admin
from hafs.admin import tool_session
from hafs.errors import UserError
from hafs.meta import FsConfig
from hafs.meta.etcd import create_etcd, open_etcd

TTL_S = 2.0
CONFIG = FsConfig("fs-uuid", 2, 1, "tok", 123)
RING = {"version": 1, "nodes": []}


@pytest.fixture
def url(tmp_path):
    require_etcd()
    with running_cluster(tmp_path / "etcd") as etcd:
        url = etcd.url("tools")
        create_etcd(url, CONFIG, RING, 0, 0).close()
        yield url


def kinds(meta) -> list[str]:
    return sorted(s.kind for s in meta.sessions.alive())


def test_a_tool_session_on_etcd_is_renewed_while_the_tool_works(url, monkeypatch):
    monkeypatch.setattr(hafs.admin, "SHARED_SESSION_S", TTL_S)
    tool, other = open_etcd(url, holder="tool"), open_etcd(url, holder="other")
    try:
        with tool_session(tool, "repair"):
            time.sleep(3 * TTL_S)  # three leases long: alive only if renewed
            assert kinds(other) == ["repair"]
            with pytest.raises(UserError, match="being repaired"):
                other.sessions.register("mount", "/m", TTL_S)
        assert kinds(other) == []  # ended on exit, not left to expire
        other.sessions.end(other.sessions.register("mount", "/m", TTL_S))
    finally:
        tool.close()
        other.close()


TOOL = """
import sys, time
import hafs.admin
from hafs.admin import tool_session
from hafs.meta.etcd import open_etcd
hafs.admin.SHARED_SESSION_S = float(sys.argv[2])
meta = open_etcd(sys.argv[1], holder="tool")
with tool_session(meta, "rebalance"):
    print("ready", flush=True)
    time.sleep(600)
"""


def test_a_killed_tools_session_ends_within_its_ttl(url):
    proc = subprocess.Popen(
        [sys.executable, "-c", TOOL, url, str(TTL_S)], stdout=subprocess.PIPE, text=True
    )
    other = open_etcd(url, holder="other")
    try:
        assert proc.stdout.readline().strip() == "ready"
        assert kinds(other) == ["rebalance"]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        killed = time.monotonic()
        while kinds(other) and time.monotonic() - killed < TTL_S + 3:
            time.sleep(0.1)
        assert kinds(other) == [], f"still alive {time.monotonic() - killed:.1f} s after the kill"
        other.sessions.end(other.sessions.register("repair", "", TTL_S))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        other.close()
