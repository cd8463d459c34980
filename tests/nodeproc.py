"""Real `hafs node` processes for tests: started on a free loopback port, stopped by PID.

TLS: `tls_files(ca, directory)` writes a certificate for 127.0.0.1 signed by a
`trustme.CA` (made on the fly) and its key; `start_node(..., tls=(cert, key))`
serves HTTPS with them, and the Node's url, client and store speak https.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from hafs.store.remote import NodeAuth, RemoteStore

FS = "3f0c6a55-0b8e-4d0e-9a43-5d1b8a3c2f10"  # the filesystem uuid of nodes started with init


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Node:
    proc: subprocess.Popen
    port: int
    data: Path
    log: Path
    token: str | None = None
    tls: tuple[Path, Path] | None = None  # (certificate, key) the node serves HTTPS with

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def store(
        self, node_id: str = "n1", fs_uuid: str = FS, ca_pem: str | None = None, **kw
    ) -> RemoteStore:
        """A client of this node: with its token, and for HTTPS checking it against `ca_pem`."""
        kw.setdefault("auth", NodeAuth(kw.pop("token", self.token), ca_pem))
        return RemoteStore(self.url, node_id, fs_uuid, **kw)

    def client(self, token: str | None = None, ca_pem: str | None = None) -> httpx.Client:
        headers = {"authorization": f"Bearer {token}"} if token else {}
        verify = ssl.create_default_context(cadata=ca_pem) if ca_pem else True
        return httpx.Client(
            base_url=self.url, headers=headers, timeout=10, trust_env=False, verify=verify
        )

    def block_file(self, bid: str) -> Path:
        return self.data / "blocks" / bid[:2] / bid

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        """Stop the process by PID: `sig`, then SIGKILL; its exit code (None if killed)."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)  # in case a test left it stopped
                os.kill(self.proc.pid, sig)
            try:
                return self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                return None
        return self.proc.returncode

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def tls_files(
    ca, directory: Path, name: str = "node", host: str = "127.0.0.1"
) -> tuple[Path, Path]:
    """A certificate for `host` signed by the trustme CA `ca`, and its key: (cert, key) files."""
    leaf = ca.issue_cert(host)
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    key.chmod(0o600)
    return cert, key


def ca_file(ca, path: Path) -> Path:
    """The trustme CA's certificate written to `path` (what --ca-file takes)."""
    ca.cert_pem.write_to_path(str(path))
    return path


def _answers(port: int, tls: bool) -> bool:
    """Whether something on `port` answers GET /ping with HTTP (over TLS, unchecked)."""
    with socket.create_connection(("127.0.0.1", port), timeout=1) as raw:
        sock = raw
        if tls:
            context = ssl.create_default_context()
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
            sock = context.wrap_socket(raw)
        sock.sendall(b"GET /ping HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        return sock.recv(12).startswith(b"HTTP/1.1 ")


def run_node(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """`python -m hafs.node ARGS` expected to exit (a refusal)."""
    return subprocess.run(
        [sys.executable, "-m", "hafs.node", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_node(
    data: Path,
    *extra: str,
    init: str | None = "n1",
    token: str | None = None,
    port: int | None = None,
    tls: tuple[Path, Path] | None = None,
) -> Node:
    """Start a node serving `data` (HTTPS with `tls`: (cert, key) files, see `tls_files`),
    and return once it answers HTTP."""
    args = ["--data", str(data)]
    if tls is not None:
        args += ["--tls-cert", str(tls[0]), "--tls-key", str(tls[1])]
    if init:
        args += ["--init", init, "--fs-uuid", FS]
    if token is not None:
        token_file = data.parent / f"{data.name}.token"
        token_file.write_text(token + "\n")
        token_file.chmod(0o600)
        args += ["--token-file", str(token_file)]
    log = data.parent / f"{data.name}.log"
    for _attempt in range(3):  # a free port can be taken by someone else before we bind it
        node_port = port or free_port()
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "hafs.node",
                    *args,
                    "--listen",
                    f"127.0.0.1:{node_port}",
                    *extra,
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        node = Node(proc, node_port, data, log, token, tls)
        try:
            deadline = time.monotonic() + 20
            while proc.poll() is None and time.monotonic() < deadline:
                try:
                    if _answers(node_port, tls is not None):
                        return node
                except OSError:  # ssl.SSLError too
                    time.sleep(0.05)
            if proc.poll() is None:
                raise AssertionError(f"node did not answer in time:\n{node.log_text()}")
        except BaseException:
            node.stop(signal.SIGKILL)
            raise
        if port is not None or "Address already in use" not in node.log_text():
            raise AssertionError(f"node exited {proc.returncode}:\n{node.log_text()}")
    raise AssertionError("no free port found")


@contextlib.contextmanager
def running(data: Path, *extra: str, **kw) -> Iterator[Node]:
    node = start_node(data, *extra, **kw)
    try:
        yield node
    finally:
        node.stop()
