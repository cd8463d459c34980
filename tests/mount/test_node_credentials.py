"""A mount over HTTPS nodes checked against the filesystem's CA, and a token rotation
with a mount running throughout: real `hafs node` processes, certificates made on the
fly (trustme), a real FUSE mount.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import trustme
from conftest import hafs
from nodeproc import Node, ca_file
from test_remote_nodes import EXPECTED, Cluster

from hafs import home as home_mod


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def settings(home: Path):
    meta = home_mod.open_meta(home)
    try:
        return meta.config()
    finally:
        meta.close()


def check_log(cluster: Cluster) -> None:
    bad = cluster.mount.bad_log_lines(allowed=EXPECTED)
    assert not bad, "unexpected errors in the daemon's log:\n" + "\n".join(bad[:20])


def test_a_mount_over_tls_nodes_writes_and_reads_files(ca, tmp_path):
    c = Cluster(tmp_path, cas=[ca] * 3)
    try:
        assert all(n.url.startswith("https://") for n in c.nodes)
        c.mkfs("--ca-file", str(ca_file(ca, tmp_path / "ca.pem")))
        assert settings(c.mount.home).ca_pem == ca.cert_pem.bytes().decode()
        c.mount.start()
        data = os.urandom(3 << 20)
        (c.mount.mnt / "f").write_bytes(data)
        c.mount.stop()  # a new mount reads it back from the nodes
        c.mount.start()
        assert (c.mount.mnt / "f").read_bytes() == data
        assert sum(1 for n in c.nodes for _ in (n.data / "blocks").rglob("*/*")) >= 2
        status = hafs("status", "--home", c.mount.home).stdout
        assert status.count("https://127.0.0.1:") == 3, status
        c.mount.stop()
        # the owner token goes over https too: an adopt switches every node
        before = {owner_of(n) for n in c.nodes}
        assert len(before) == 1 and None not in before  # mkfs: every node the store's
        p = hafs("node", "adopt", "--home", c.mount.home)
        assert "is the owner of its nodes now" in p.stdout and "not switched" not in p.stdout
        after = {owner_of(n) for n in c.nodes}
        assert len(after) == 1 and after != before
        c.mount.start()  # and the mount takes the nodes with the new token
        assert (c.mount.mnt / "f").read_bytes() == data
    finally:
        c.close()
    check_log(c)


def owner_of(node: Node) -> str | None:
    """The owner token the node's identity file records (hafs.store.owner)."""
    return json.loads((node.data / "hafs-node.json").read_text()).get("owner")


def test_a_node_whose_certificate_another_ca_signed_is_refused(ca, tmp_path):
    c = Cluster(tmp_path, cas=[ca, trustme.CA(), ca])
    try:
        ca_pem = ca_file(ca, tmp_path / "ca.pem")
        args = ["mkfs", "--home", c.mount.home, "--ca-file", ca_pem]
        p = hafs(*args, *[a for n in c.nodes for a in ("--node", n.url)], check=False)
        assert p.returncode == 2
        assert p.stderr.startswith(f"hafs: node n2 ({c.nodes[1].url}): its certificate is not")
        assert "signed by the filesystem's CA" in p.stderr and "--ca-file" in p.stderr
        assert not (c.mount.home / "meta.db").exists()
        assert not (c.nodes[0].data / "hafs-node.json").exists(), "no node was claimed"
        # a filesystem over the two good nodes; then n2 comes back with a foreign certificate
        hafs(*args, "-r", "1", "--node", c.nodes[0].url, "--node", c.nodes[2].url)
        c.tls[2] = c.tls[1]
        c.restart(2)
        p = hafs("mount", "--home", c.mount.home, c.mount.mnt, check=False)
        assert p.returncode == 2, p.stderr
        assert f"node n2 ({c.nodes[2].url}): its certificate is not signed" in p.stderr
        assert not os.path.ismount(c.mount.mnt)
    finally:
        c.close()


def write_token_file(node: Node, *tokens: str) -> None:
    """Put `tokens` in the node's --token-file and make it read them (SIGHUP)."""
    seen = node.log_text().count("TOKENS-RELOADED")
    (node.data.parent / f"{node.data.name}.token").write_text("".join(t + "\n" for t in tokens))
    node.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while node.log_text().count("TOKENS-RELOADED") == seen:
        assert time.monotonic() < deadline, node.log_text()
        time.sleep(0.05)


class Worker(threading.Thread):
    """Writes a new file, reads it back and re-reads the first one, over and over."""

    def __init__(self, root: Path) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.stop = threading.Event()
        self.rounds = 0
        self.errors: list[str] = []

    def run(self) -> None:
        first = None
        while not self.stop.is_set():
            data = os.urandom(256 * 1024)
            path = self.root / f"f{self.rounds}"
            try:
                path.write_bytes(data)  # close: its blocks are stored on the nodes
                assert path.read_bytes() == data
                first = first or (path, data)
                assert first[0].read_bytes() == first[1]
            except (OSError, AssertionError) as e:
                self.errors.append(f"round {self.rounds}: {e!r}")
            self.rounds += 1

    def rounds_after(self, n: int = 3) -> None:
        """Wait until `n` more rounds were done."""
        target = self.rounds + n
        deadline = time.monotonic() + 60
        while self.rounds < target:
            assert time.monotonic() < deadline and self.is_alive(), self.errors
            time.sleep(0.05)


def test_a_token_rotation_never_fails_a_call_of_a_running_mount(ca, tmp_path):
    old, new = "old-token-0123", "new-token-4567"
    c = Cluster(tmp_path, token=old, cas=[ca] * 3)
    worker = None
    try:
        (tmp_path / "old.token").write_text(old + "\n")
        (tmp_path / "new.token").write_text(new + "\n")
        ca_pem = ca_file(ca, tmp_path / "ca.pem")
        c.mkfs("--token-file", str(tmp_path / "old.token"), "--ca-file", str(ca_pem))
        c.mount.start()
        worker = Worker(c.mount.mnt)
        worker.start()
        worker.rounds_after()
        token = ["node", "token", "--home", c.mount.home, "--token-file", tmp_path / "new.token"]
        # before the nodes know the new token, storing it is refused: nothing changes
        p = hafs(*token, check=False)
        assert p.returncode == 2 and "does not take the new token yet" in p.stderr, p.stderr
        assert settings(c.mount.home).node_token == old
        # (a) every node takes both tokens
        for node in c.nodes:
            write_token_file(node, new, old)
        worker.rounds_after()
        # (b) the filesystem's configuration gets the new one
        p = hafs(*token)
        assert "remove the old token" in p.stdout
        assert settings(c.mount.home).node_token == new
        worker.rounds_after()
        # (c) the nodes drop the old one: the mount, still sending it, is refused once per
        # change, re-reads the configuration and goes on with the new token
        for node in c.nodes:
            write_token_file(node, new)
        worker.rounds_after(5)
        worker.stop.set()
        worker.join(60)
        assert not worker.errors, worker.errors
        log = c.mount.log.read_text()
        assert "NODE-CREDENTIALS the filesystem's node token changed" in log
        assert "NODE-DOWN" not in log
        assert hafs("node", "list", "--home", c.mount.home).returncode == 0  # every node up
        assert hafs(*token).stdout.startswith("the nodes' token is already that one")
    finally:
        if worker is not None:
            worker.stop.set()
            worker.join(60)
        c.close()
    check_log(c)
