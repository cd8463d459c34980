"""A real etcd cluster for tests and tools: members on free loopback ports, stopped by PID.

`running_cluster(base)` starts 3 members (each with its own data directory
and log under `base`), waits until the cluster answers a linearizable read,
and stops every member by PID in its finally (SIGTERM, then SIGKILL).  A test
may stop and start one member (`stop_member`, `start_member`), pause it
(SIGSTOP; stopping resumes it first) and ask which member leads (`leader`).

The members run with short heartbeats and election timeouts (elections in a
fraction of a second) and with the limits hafs needs (`--max-txn-ops`,
`--max-request-bytes`: meta/etcd.py).  Standard library and hafs only, so
tools/etcdbench.py imports this file too.

Not thread-safe: one thread drives a Cluster.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from hafs.meta.etcd import MAX_REQUEST_BYTES, MAX_TXN_OPS

HEARTBEAT_MS = 25
ELECTION_MS = 250


def etcd_binary() -> str | None:
    return shutil.which("etcd") or ("/usr/bin/etcd" if os.path.exists("/usr/bin/etcd") else None)


def require_etcd() -> str:
    """The etcd binary; without one a test is skipped, or fails under CI (CI=true)."""
    import pytest

    binary = etcd_binary()
    if binary is None:
        why = "etcd is not installed (apt-get install etcd-server)"
        if os.environ.get("CI"):
            pytest.fail(why + ", and CI must run the etcd tests")
        pytest.skip(why)
    return binary


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(port: int, method: str, path: str, body: dict | None, timeout: float) -> dict:
    """One HTTP request to a member (http.client: no proxy from the environment)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, None if body is None else json.dumps(body))
        resp = conn.getresponse()
        data = resp.read()
        if resp.status != 200:
            raise OSError(f"HTTP {resp.status}: {data[:200]!r}")
        return json.loads(data)
    finally:
        conn.close()


@dataclass
class Member:
    name: str
    client_port: int
    peer_port: int
    data: Path
    log: Path
    proc: subprocess.Popen | None = None
    wanted: bool = False  # started and not stopped on purpose since

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 30) -> str:
        lines = self.log.read_text(errors="replace").splitlines() if self.log.exists() else []
        return "\n".join(lines[-n:])


@dataclass
class Cluster:
    binary: str
    members: list[Member]
    token: str = field(default_factory=lambda: "hafs-test-" + uuid.uuid4().hex[:8])

    @property
    def endpoints(self) -> list[str]:
        return [m.url for m in self.members]

    def url(self, name: str) -> str:
        """The hafs metadata URL of filesystem `name` in this cluster."""
        hosts = ",".join(f"127.0.0.1:{m.client_port}" for m in self.members)
        return f"etcd://{hosts}/{name}"

    def _args(self, m: Member, state: str) -> list[str]:
        initial = ",".join(f"{o.name}={o.peer_url}" for o in self.members)
        return [
            self.binary,
            *("--name", m.name, "--data-dir", str(m.data)),
            *("--listen-client-urls", m.url, "--advertise-client-urls", m.url),
            *("--listen-peer-urls", m.peer_url, "--initial-advertise-peer-urls", m.peer_url),
            *("--initial-cluster", initial, "--initial-cluster-state", state),
            *("--initial-cluster-token", self.token),
            *("--heartbeat-interval", str(HEARTBEAT_MS), "--election-timeout", str(ELECTION_MS)),
            *("--max-txn-ops", str(MAX_TXN_OPS), "--max-request-bytes", str(MAX_REQUEST_BYTES)),
            *("--auto-compaction-mode", "revision", "--auto-compaction-retention", "10000"),
            *("--logger", "zap", "--log-outputs", "stderr"),
        ]

    def _spawn(self, m: Member, state: str) -> None:
        m.wanted = True
        with open(m.log, "ab") as out:
            m.proc = subprocess.Popen(
                self._args(m, state),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a ^C of the test run does not hit etcd first
            )

    def start(self, timeout: float = 30) -> None:
        for m in self.members:
            m.data.mkdir(parents=True, exist_ok=True)
            self._spawn(m, "new")
        self.wait_healthy(timeout)

    def start_member(self, i: int, timeout: float = 30) -> None:
        """Start member i again (on its data directory) and wait for a healthy cluster."""
        m = self.members[i]
        if m.running():
            raise AssertionError(f"{m.name} is running already")
        self._spawn(m, "existing")
        self.wait_healthy(timeout)

    def stop_member(self, i: int, sig: int = signal.SIGTERM) -> None:
        """Stop member i by PID: `sig` (SIGKILL: a crash), then SIGKILL after 10 s."""
        m = self.members[i]
        m.wanted = False
        if m.proc is None:
            return
        if m.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(m.proc.pid, signal.SIGCONT)  # a paused member cannot exit
                os.kill(m.proc.pid, sig)
            try:
                m.proc.wait(10)
            except subprocess.TimeoutExpired:
                m.proc.kill()
                m.proc.wait(10)

    def pause_member(self, i: int) -> None:
        """SIGSTOP member i: it holds its connections but answers nothing."""
        os.kill(self.members[i].proc.pid, signal.SIGSTOP)

    def resume_member(self, i: int) -> None:
        os.kill(self.members[i].proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        for i in range(len(self.members)):
            self.stop_member(i)

    def status(self, i: int, timeout: float = 2) -> dict:
        return _request(self.members[i].client_port, "POST", "/v3/maintenance/status", {}, timeout)

    def leader(self) -> int | None:
        """The index of the member that leads now (by its own status), or None."""
        for i, m in enumerate(self.members):
            if m.running():
                with contextlib.suppress(OSError, ValueError):
                    st = self.status(i)
                    if st["header"]["member_id"] == st.get("leader"):
                        return i
        return None

    def wait_healthy(self, timeout: float = 30) -> None:
        """Until every member not stopped on purpose answers /health (a linearizable read: a
        quorum with a leader); AssertionError with its log if one exits or time runs out."""
        deadline = time.monotonic() + timeout
        pending = [m for m in self.members if m.wanted]
        while pending:
            m = pending[0]
            if not m.running():
                raise AssertionError(
                    f"etcd member {m.name} exited ({m.proc.returncode}):\n{m.log_tail()}"
                )
            try:
                if _request(m.client_port, "GET", "/health", None, 2).get("health") == "true":
                    pending.pop(0)
                    continue
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"etcd member {m.name} not healthy in {timeout} s:\n" + m.log_tail()
                )
            time.sleep(0.05)


@contextlib.contextmanager
def running_cluster(base: Path, size: int = 3, binary: str | None = None) -> Iterator[Cluster]:
    """A started cluster of `size` members under `base`, stopped by PID on the way out."""
    binary = binary or etcd_binary()
    if binary is None:
        raise RuntimeError("etcd is not installed (apt-get install etcd-server)")
    for attempt in range(3):  # a free port can be taken by someone else before etcd binds it
        ports = [free_port() for _ in range(2 * size)]
        members = [
            Member(f"m{i}", ports[2 * i], ports[2 * i + 1], base / f"m{i}-{attempt}",
                   base / f"m{i}-{attempt}.log")
            for i in range(size)
        ]  # fmt: skip
        cluster = Cluster(binary, members)
        try:
            cluster.start()
        except AssertionError:
            cluster.stop()
            logs = "".join(m.log_tail() for m in members)
            if "address already in use" in logs and attempt < 2:
                continue
            raise
        except BaseException:
            cluster.stop()
            raise
        try:
            yield cluster
        finally:
            cluster.stop()
        return
