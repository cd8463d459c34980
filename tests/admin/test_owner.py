"""Which metadata store owns the nodes (hafs.store.owner) through the admin commands:
`hafs node adopt` with a node that did not answer, `node set --address` to a directory
of another store, and a rebalance of a copy that moves nothing."""

from __future__ import annotations

import json
import shutil
import subprocess

from conftest import hafs
from test_rebalance import build, contents, read_back, ring_of

from hafs.store.dirstore import DirStore, read_identity
from hafs.store.owner import OwnerClaim


def owner_where(path) -> str:
    return read_identity(path)["owner_where"]


def test_adopt_switches_the_nodes_and_one_that_missed_it_takes_it_later(tmp_path):
    files = contents(30, seed=41)
    h = build(tmp_path, files)
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(h), str(copy)], check=True)
    nodes = {s.id: s.address for s in ring_of(h).nodes.values()}
    shutil.move(nodes["n3"], tmp_path / "n3-away")  # n3 does not answer during the adopt
    p = hafs("node", "adopt", "--home", copy, check=False)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "node n3 was not switched (it will be once it answers)" in p.stdout
    assert all(owner_where(nodes[n]).endswith(f"{copy}/meta.db") for n in ("n1", "n2"))
    shutil.move(tmp_path / "n3-away", nodes["n3"])
    assert owner_where(nodes["n3"]).endswith(f"{h}/meta.db")  # still the original's token

    # The original is refused (by n1 already); the adopted copy takes n3 when it opens it.
    p = hafs("fsck", "--home", h, "--repair", check=False)
    assert p.returncode == 8 and "belongs to another metadata store" in p.stderr, p.stderr
    read_back(copy, files)
    assert owner_where(nodes["n3"]).endswith(f"{copy}/meta.db")
    p = hafs("fsck", "--home", copy, "--repair", "--deep", "--json", check=False)
    assert json.loads(p.stdout)["exit_code"] == 0, p.stdout


def test_node_set_address_refuses_a_directory_another_store_owns(tmp_path):
    h = build(tmp_path, contents(10, seed=42))
    n2 = ring_of(h).nodes["n2"].address
    twin = tmp_path / "twin"
    shutil.copytree(n2, twin)  # n2's identity, then taken by another store
    DirStore(twin, "n2", read_identity(twin)["fs_uuid"]).set_owner(
        OwnerClaim("tok-other", "otherhost:/srv/hafs/meta.db")
    )
    before = ring_of(h)
    p = hafs("node", "set", "--home", h, "n2", "--address", twin, check=False)
    assert p.returncode == 2, p.stderr
    assert "belongs to another metadata store" in p.stderr and "otherhost:" in p.stderr
    assert ring_of(h) == before


def test_a_dry_run_rebalance_of_a_copy_plans_and_a_real_one_is_refused(tmp_path):
    h = build(tmp_path, contents(10, seed=43))
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(h), str(copy)], check=True)
    p = hafs("rebalance", "--home", copy, "--dry-run")
    assert "plan (dry run, nothing changed)" in p.stdout
    p = hafs("rebalance", "--home", copy, check=False)
    assert p.returncode == 2 and "is a copy of the metadata at" in p.stderr
