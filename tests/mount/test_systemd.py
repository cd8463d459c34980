"""systemd: READY=1 over a real $NOTIFY_SOCKET once serving, clean SIGTERM, the unit files."""

from __future__ import annotations

import configparser
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import HAFS, _wait_gone, make_mount
from nodeproc import free_port

from hafs import systemd


def notify_socket(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    s.settimeout(60)
    return s


def start(args: list, sock: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "NOTIFY_SOCKET": str(sock)}
    with open(log, "wb") as f:
        return subprocess.Popen([*HAFS, *map(str, args)], env=env, stdout=f, stderr=f)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def test_notify_without_systemd_does_nothing(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False


def test_node_reports_ready_once_listening_reopens_its_log_and_stops_on_sigterm(tmp_path):
    sock = notify_socket(tmp_path / "notify")
    port, log = free_port(), tmp_path / "node.log"
    args = ["node", "--data", tmp_path / "d", "--listen", f"127.0.0.1:{port}", "--log", log]
    proc = start(args, sock.getsockname(), tmp_path / "out")
    try:
        assert sock.recv(4096) == b"READY=1"
        socket.create_connection(("127.0.0.1", port), timeout=5).close()  # serving already
        log.rename(tmp_path / "node.log.1")  # logrotate, then SIGHUP: a new file, still serving
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while not log.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "LOG-REOPENED" in log.read_text()
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert "NODE-STOPPED" in log.read_text()
        assert "NODE-READY" in (tmp_path / "node.log.1").read_text()
    finally:
        stop(proc)
        sock.close()


def test_mount_reports_ready_once_served_and_stops_on_sigterm(tmp_path):
    m = make_mount(tmp_path / "fs")
    sock = notify_socket(tmp_path / "notify")
    proc = start(
        ["mount", "--foreground", "--home", m.home, m.mnt], sock.getsockname(), tmp_path / "log"
    )
    try:
        assert sock.recv(4096) == b"READY=1"
        assert os.path.ismount(m.mnt)
        (m.mnt / "f").write_text("served\n")  # the FUSE handshake is done
        proc.send_signal(signal.SIGTERM)
        assert sock.recv(4096) == b"STOPPING=1"
        assert proc.wait(60) == 0
        assert not os.path.ismount(m.mnt)
        text = (tmp_path / "log").read_text()  # --foreground logs to stderr
        assert "signal SIGTERM: flushing and unmounting" in text and "unmounted" in text
    finally:
        stop(proc)
        _wait_gone(proc.pid, 10)
        m.stop()
        sock.close()
    m.start()
    try:
        assert (m.mnt / "f").read_text() == "served\n"
    finally:
        m.stop()


def test_unit_files_are_valid(tmp_path):
    p = subprocess.run(
        [*HAFS, "install-systemd", "--dir", tmp_path], capture_output=True, text=True
    )
    assert p.returncode == 0, p.stderr
    for name in systemd.UNITS:
        unit = configparser.ConfigParser(strict=False, interpolation=None)
        unit.optionxform = str
        unit.read(tmp_path / name)
        service = unit["Service"]
        assert service["Type"] == "notify" and service["Restart"] == "on-failure"
        assert service["ExecStart"].startswith(f"{os.path.abspath(sys.executable)} -m hafs ")
        assert "--log -" in service["ExecStart"]
        assert unit["Install"]["WantedBy"] == "multi-user.target"
        if shutil.which("systemd-analyze"):  # an instance of the template, as systemd would
            instance = tmp_path / name.replace("@.", "@test.")
            shutil.copy(tmp_path / name, instance)
            v = subprocess.run(
                ["systemd-analyze", "verify", instance], capture_output=True, text=True
            )
            assert v.returncode == 0 and not v.stderr.strip(), v.stderr  # warnings included


@pytest.mark.parametrize("bad", ["Type=notfy", "Restart=sometimes"])
def test_systemd_analyze_catches_a_broken_unit(tmp_path, bad):
    """The check above is not vacuous: systemd-analyze complains about a broken unit."""
    if not shutil.which("systemd-analyze"):
        pytest.skip("no systemd-analyze")
    key = bad.split("=")[0]
    text = "\n".join(
        bad if line.startswith(key + "=") else line
        for line in systemd.unit_text(systemd.UNITS[0]).splitlines()
    )
    path = tmp_path / "hafs-node@test.service"
    path.write_text(text)
    v = subprocess.run(["systemd-analyze", "verify", path], capture_output=True, text=True)
    assert v.returncode != 0 or bad.split("=")[1] in v.stderr
