"""HTTPS nodes and the credentials of their clients: real `hafs node` processes with
certificates made on the fly (trustme), checked against the filesystem's CA.

Also the token's side of it: what a 401 says, and a client whose token is
refused re-reading the configuration (NodeAuth.renew) and retrying once.
"""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import pytest
import trustme
from nodeproc import FS, run_node, running, start_node, tls_files
from prometheus_client.parser import text_string_to_metric_families

from hafs.store.dirstore import block_id
from hafs.store.remote import (
    NodeAuth,
    NodeAuthError,
    NodeCertificateError,
    NodeProtocolError,
    NodeUnavailable,
    RemoteStore,
)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def pem(ca: trustme.CA) -> str:
    return ca.cert_pem.bytes().decode()


def wait_for_log(node, text: str, count: int = 1) -> None:
    deadline = time.monotonic() + 10
    while node.log_text().count(text) < count:
        assert time.monotonic() < deadline, node.log_text()
        time.sleep(0.05)


def test_a_tls_node_serves_blocks_ping_and_metrics_over_https(ca, tmp_path: Path) -> None:
    with running(tmp_path / "n1", tls=tls_files(ca, tmp_path)) as node:
        assert node.url.startswith("https://")
        data = b"over tls" * 1000
        bid = block_id(data)
        with node.store(ca_pem=pem(ca)) as s:
            s.put(bid, data)
            assert s.get(bid) == data
            assert s.get(bid) == data  # the kept-alive connection
            s.check_identity()
        assert node.block_file(bid).read_bytes() == data
        with node.client(ca_pem=pem(ca)) as c:
            assert c.get("/ping").json() == {
                "node_id": "n1",
                "fs_uuid": FS,
                "owner": None,  # no metadata store has taken it yet (hafs.store.owner)
                "owner_where": None,
            }
            names = {f.name for f in text_string_to_metric_families(c.get("/metrics").text)}
            assert "hafs_node_requests" in names
        assert f"serving {node.data} at {node.url}" in node.log_text()


def test_a_certificate_of_another_ca_is_refused_naming_node_and_remedy(ca, tmp_path) -> None:
    other = trustme.CA()
    with running(tmp_path / "n1", tls=tls_files(other, tmp_path)) as node:
        with node.store("n1", ca_pem=pem(ca)) as s, pytest.raises(NodeCertificateError) as e:
            s.ping()
        message = str(e.value)
        assert message.startswith(f"node n1 ({node.url}): ")
        assert "its certificate is not signed by the filesystem's CA" in message
        assert "--tls-cert on the node" in message and "--ca-file" in message
        assert "\n" not in message
        # without a CA of its own, the filesystem trusts the system's CAs only
        with node.store("n1") as s, pytest.raises(NodeCertificateError, match="system's CAs"):
            s.ping()
        assert node.proc.poll() is None  # the refused handshakes did not hurt the node
        with node.store("n1", ca_pem=pem(other)) as s:
            s.ping()


def test_a_certificate_for_another_host_is_refused(ca, tmp_path) -> None:
    with running(tmp_path / "n1", tls=tls_files(ca, tmp_path, host="node.example")) as node:
        with node.store(ca_pem=pem(ca)) as s, pytest.raises(NodeCertificateError) as e:
            s.ping()
        assert "its certificate is not valid for 127.0.0.1" in str(e.value)
        assert "whose names include 127.0.0.1" in str(e.value)


def test_http_and_https_mixed_up_say_so(ca, tmp_path) -> None:
    with running(tmp_path / "n1", tls=tls_files(ca, tmp_path)) as node:
        plain = RemoteStore(node.url.replace("https://", "http://"), "n1", FS, timeout=5)
        with plain, pytest.raises(NodeProtocolError, match="address it as https://"):
            plain.ping()
        with node.store(ca_pem=pem(ca)) as s:
            s.ping()  # the node is still fine
    with running(tmp_path / "n2") as node:
        tls = RemoteStore(node.url.replace("http://", "https://"), "n1", FS, timeout=5)
        with tls, pytest.raises(NodeUnavailable, match="is the node serving HTTPS"):
            tls.ping()


def test_bad_tls_options_are_refused(ca, tmp_path) -> None:
    cert, key = tls_files(ca, tmp_path)
    other_cert, _ = tls_files(ca, tmp_path, name="other")
    data = ["--data", str(tmp_path / "d"), "--listen", "127.0.0.1:0"]
    for args, message in (
        (["--tls-cert", str(cert)], "give --tls-cert FILE and --tls-key FILE together"),
        (["--tls-cert", str(tmp_path / "none"), "--tls-key", str(key)], "cannot read"),
        (["--tls-cert", str(other_cert), "--tls-key", str(key)], "the private key it was made"),
        (["--tls-cert", str(key), "--tls-key", str(key)], "cannot use"),
    ):
        p = run_node(*data, *args)
        assert p.returncode == 2, p.stderr
        assert message in p.stderr and p.stderr.count("\n") == 1, p.stderr
    assert not (tmp_path / "d").exists()


def test_sighup_loads_a_renewed_certificate(ca, tmp_path) -> None:
    cert, key = tls_files(ca, tmp_path)
    new_ca = trustme.CA()
    with running(tmp_path / "n1", tls=(cert, key)) as node:
        with node.store(ca_pem=pem(ca)) as s:
            s.ping()
        tls_files(new_ca, tmp_path)  # the same files, renewed by another CA
        node.proc.send_signal(signal.SIGHUP)
        wait_for_log(node, "TLS-RELOADED")
        with node.store(ca_pem=pem(new_ca)) as s:
            s.ping()  # (raises unless the node now shows the renewed certificate)
        with node.store(ca_pem=pem(ca)) as s, pytest.raises(OSError):
            s.ping()  # the old CA no longer signs what the node shows
        key.write_text("broken\n")
        node.proc.send_signal(signal.SIGHUP)
        wait_for_log(node, "TLS-KEPT")
        with node.store(ca_pem=pem(new_ca)) as s:
            s.ping()


def test_the_401_says_whether_the_token_is_missing_or_wrong(tmp_path) -> None:
    with running(tmp_path / "n1", token="right-token") as node:
        with node.client() as c:
            assert "the request has none" in c.get("/ping").json()["error"]
        with node.client("wrong") as c:
            error = c.get("/ping").json()["error"]
            assert error.startswith("wrong bearer token") and "--token-file" in error
        with node.store(token="wrong") as s, pytest.raises(NodeAuthError) as e:
            s.ping()
        assert "wrong bearer token" in str(e.value)
        assert "must be a line of the node's --token-file" in str(e.value)
        assert not re.search(r"\bstart\b", str(e.value))


def test_a_refused_token_is_renewed_from_the_configuration_once(tmp_path) -> None:
    """A store refused with 401 asks its NodeAuth to re-read the configuration; all the
    stores sharing it use the new token from then on; an unchanged one is no retry."""
    config = {"token": "old-token"}
    reads = []

    def reload():
        reads.append(config["token"])
        return config["token"], None

    data = tmp_path / "n1"
    node = start_node(data, token="old-token")
    try:
        auth = NodeAuth("old-token", None, reload)
        with node.store(auth=auth) as a, node.store(auth=auth) as b:
            a.ping()
            (data.parent / "n1.token").write_text("new-token\n")
            node.proc.send_signal(signal.SIGHUP)
            wait_for_log(node, "TOKENS-RELOADED")
            with pytest.raises(NodeAuthError):  # the configuration still holds the old one
                a.ping()
            assert reads == ["old-token"]
            config["token"] = "new-token"
            a.ping()
            b.ping()
            assert reads == ["old-token", "new-token"] and auth.current.token == "new-token"
    finally:
        node.stop()
