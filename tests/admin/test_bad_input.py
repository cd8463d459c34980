"""Bad input in cluster mode: one line that says what to do, exit 2 (fsck: 8, as fsck(8)),
and nothing modified: etcd's revision and leases unchanged, no state directory left.

One real etcd member for the module (tests/etcdproc.py); block nodes are directories.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time

import pytest
from etcdproc import _request, free_port, require_etcd, running_cluster

from hafs.meta.etcd import EtcdKV

HAFS = [sys.executable, "-m", "hafs"]


@pytest.fixture(scope="module")
def etcd(tmp_path_factory):
    require_etcd()
    with running_cluster(tmp_path_factory.mktemp("etcd"), size=1) as c:
        yield c


def hafs(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*HAFS, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def state(etcd) -> tuple[int, list]:
    """etcd's revision and its leases: what any write would change."""
    port = etcd.members[0].client_port
    rev = _request(port, "POST", "/v3/kv/range", {"key": base64.b64encode(b"/").decode()}, 5)
    leases = _request(port, "POST", "/v3/lease/leases", {}, 5).get("leases", [])
    return int(rev["header"]["revision"]), sorted(le["ID"] for le in leases)


def refused(p: subprocess.CompletedProcess, code: int, *texts: str) -> None:
    lines = p.stderr.strip().splitlines()
    assert p.returncode == code and len(lines) == 1, p.stderr
    for text in texts:
        assert text in lines[0], lines[0]


@pytest.fixture(scope="module")
def names(etcd, tmp_path_factory):
    """'prod' (a filesystem), 'junk' (keys that are not hafs), 'newer' (a newer layout)."""
    base = tmp_path_factory.mktemp("fs")
    for name in ("prod", "newer"):
        p = hafs("mkfs", "--meta", etcd.url(name), "--home", base / name)
        assert p.returncode == 0, p.stderr
    kv = EtcdKV(etcd.endpoints, b"/hafs/")
    try:
        kv.commit({}, {b"junk/config": b"something else"}, ())
        kv.commit({}, {b"newer/Mversion": b"2"}, ())
    finally:
        kv.close()
    return {n: etcd.url(n) for n in ("prod", "junk", "newer", "missing")}


def test_mkfs_onto_a_name_that_exists_or_holds_other_keys(etcd, names, tmp_path):
    before = state(etcd)
    for name in ("prod", "junk"):
        p = hafs("mkfs", "--meta", names[name], "--home", tmp_path / "s", "--node", tmp_path / "n")
        refused(p, 2, names[name], "already holds a filesystem", "choose another NAME")
    assert state(etcd) == before
    assert not (tmp_path / "s").exists() and not (tmp_path / "n").exists()


@pytest.mark.parametrize(
    "name, says",
    [
        ("missing", "holds no hafs filesystem: run 'hafs mkfs'"),
        ("junk", "not a hafs filesystem: give another NAME"),
        ("newer", "newer than this hafs understands (1): upgrade hafs"),
    ],
)
def test_mount_status_and_fsck_refuse_what_they_cannot_use(etcd, names, tmp_path, name, says):
    (tmp_path / "mnt").mkdir()
    env = {"HAFS_HOME": str(tmp_path / "default")}  # where a state directory would go
    before = state(etcd)
    p = hafs("mount", "--meta", names[name], tmp_path / "mnt", env=env)
    refused(p, 2, says)
    assert not os.path.ismount(tmp_path / "mnt")
    refused(hafs("status", "--meta", names[name], env=env), 2, says)
    refused(hafs("fsck", "--meta", names[name], env=env), 8, says)
    assert state(etcd) == before
    assert not (tmp_path / "default").exists()  # no meta.url left behind


def test_a_url_that_does_not_answer_is_refused_within_10_s(tmp_path):
    url = f"etcd://127.0.0.1:{free_port()},127.0.0.1:{free_port()}/prod"
    (tmp_path / "mnt").mkdir()
    home = tmp_path / "s"
    for args, code in [
        (["mkfs", "--meta", url, "--home", home, "--node", tmp_path / "n"], 2),
        (["mount", "--meta", url, "--home", home, tmp_path / "mnt"], 2),
        (["status", "--meta", url, "--home", home], 2),
        (["fsck", "--meta", url, "--home", home], 8),
        (["mount", "--meta", url, "--home", home, "-o", "meta_timeout_s=2", tmp_path / "mnt"], 2),
    ]:
        t = time.monotonic()
        p = hafs(*args)
        took = time.monotonic() - t
        refused(p, code, f"etcd at {url} does not answer", "a majority of them is up")
        bound = 2 if "meta_timeout_s=2" in args else 10
        assert took < bound + 5, (args[0], took)  # (+ starting python, twice for a mount)
        assert not home.exists() and not (tmp_path / "n").exists()
    assert not os.path.ismount(tmp_path / "mnt")
