"""`hafs node remove --lost` and `hafs node set --address` on backing directories: a
deleted directory that kept a mount from starting, a moved one found again."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import Mount, hafs
from test_rebalance import R, build, contents, holders, read_back, ring_of

from hafs import home
from hafs.admin import fsck, lost
from hafs.store.dirstore import block_id


def fs_uuid(h) -> str:
    meta = home.open_meta(h)
    try:
        return meta.config().fs_uuid
    finally:
        meta.close()


def test_a_deleted_directory_is_dropped_its_blocks_restored_and_the_lost_file_named(tmp_path):
    files = contents(200, seed=31)
    h = build(tmp_path, files)
    ring = ring_of(h)
    n3 = ring.nodes["n3"].address
    # f7's block is left with its only copy on n3 (its other copy deleted by hand).
    only = next(n for n in sorted(files) if "n3" in ring.replicas(block_id(files[n]), R))
    bid = block_id(files[only])
    for node in ring.replicas(bid, R):
        if node != "n3":
            (tmp_path / ring.nodes[node].address / "blocks" / bid[:2] / bid).unlink()
    shutil.rmtree(n3)

    mount = Mount(h, tmp_path / "mnt")
    mount.mnt.mkdir()
    p = hafs("mount", "--home", h, mount.mnt, check=False)
    assert p.returncode == 2 and f"backing directory {n3} of node n3 is missing" in p.stderr

    p = hafs("node", "remove", "--home", h, "--lost", "n3", "--json", check=False)
    assert p.returncode == 1, p.stderr
    report = json.loads(p.stdout)
    assert report["lost"] == 1 and report["lost_paths"] == [f"/{only}"], report
    assert report["blocks"] == len(files) and report["short"] == 0
    moved = sum("n3" in ring.replicas(block_id(d), R) for d in files.values())
    assert report["copied"] == moved - 1, "one copy for each block n3 held but the lost one"

    # Every other block is on n1 and n2 (all there is now); fsck names the one file only.
    where = holders(ring_of(h), fs_uuid(h))
    assert all(where[block_id(d)] == {"n1", "n2"} for n, d in files.items() if n != only)
    check = fsck.run(h)
    assert check.lost_paths == {f"/{only}"} and set(check.found) == {"lost_block"}
    read_back(h, {n: d for n, d in files.items() if n != only})
    mount.start()  # the mount starts again
    mount.stop()


def test_remove_lost_renders_its_summary_and_a_clean_run_exits_0(tmp_path):
    files = contents(50, seed=32)
    h = build(tmp_path, files)
    shutil.rmtree(ring_of(h).nodes["n1"].address)
    p = hafs("node", "remove", "--home", h, "--lost", "n1")
    assert "the node left the ring (ring version 2), R=2" in p.stdout, p.stdout
    assert "every block that files use has 2 verified copies again" in p.stdout, p.stdout
    assert "checked 50 blocks that files use" in p.stdout
    assert fsck.run(h, deep=True).exit_code == fsck.EXIT_CLEAN


def test_remove_lost_refusals_change_nothing(tmp_path):
    h = build(tmp_path, contents(10, seed=33))
    before = ring_of(h)
    p = hafs("node", "remove", "--home", h, "--lost", "n2", check=False)
    assert p.returncode == 2 and "node n2 still answers at" in p.stderr, p.stderr
    p = hafs("node", "remove", "--home", h, "--lost", "n9", check=False)
    assert p.returncode == 2 and "no node 'n9' in the ring" in p.stderr
    shutil.rmtree(before.nodes["n1"].address)
    hafs("node", "remove", "--home", h, "--lost", "n1")
    shutil.rmtree(before.nodes["n2"].address)
    p = hafs("node", "remove", "--home", h, "--lost", "n2", check=False)
    assert p.returncode == 2 and "fewer than the 2 replicas" in p.stderr, p.stderr
    assert sorted(ring_of(h).nodes) == ["n2", "n3"]


def test_node_set_address_finds_a_moved_directory_and_refuses_another(tmp_path):
    files = contents(30, seed=34)
    h = build(tmp_path, files)
    ring = ring_of(h)
    moved = tmp_path / "disk2" / "n2"
    moved.parent.mkdir()
    shutil.move(ring.nodes["n2"].address, moved)
    (tmp_path / "empty").mkdir()
    for wrong, message in [
        (ring.nodes["n3"].address, "belongs to filesystem"),  # n3's directory
        (tmp_path / "empty", "has no identity file"),
        (tmp_path / "nowhere", "is missing"),
    ]:
        p = hafs("node", "set", "--home", h, "n2", "--address", wrong, check=False)
        assert p.returncode == 2, p.stderr
        assert f"node n2 is not at {wrong}" in p.stderr and message in p.stderr, p.stderr
        assert ring_of(h) == ring
    hafs("node", "set", "--home", h, "n2", "--address", moved)
    assert ring_of(h).nodes["n2"].address == str(moved)
    read_back(h, files)
    assert fsck.run(h, deep=True).exit_code == fsck.EXIT_CLEAN


@pytest.mark.parametrize("what", ["remove", "set"])
def test_help_documents_the_new_options(what):
    p = hafs("node", what, "--help")
    assert ("--lost" if what == "remove" else "--address") in p.stdout


def test_remove_lost_through_the_api_reports_each_count(tmp_path):
    files = contents(20, seed=35)
    h = build(tmp_path, files)
    shutil.rmtree(ring_of(h).nodes["n3"].address)
    report = lost.remove_lost(h, "n3", settle_s=0)
    assert report.exit_code == 0 and report.blocks == 20 and report.lost == 0
    assert report.to_json()["exit_code"] == 0
