"""hafs node list|add|remove|set: ring versions, refusals, remote nodes, and a running
vfs that switches to a new ring without remounting."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace

import pytest
import trio
import trustme
from conftest import hafs, vfs_session
from nodeproc import ca_file, start_node, tls_files
from test_rebalance import assert_in_place, build, contents, holders, read_back, ring_of

from hafs import home
from hafs.admin import nodes as nodeadmin
from hafs.admin import rebalance
from hafs.cli import build_parser
from hafs.errors import UserError
from hafs.meta import ROOT_INODE
from hafs.store.dirstore import block_id
from hafs.store.ring import NodeSpec


@pytest.fixture
def h(tmp_path):
    home.create(tmp_path / "h")
    return tmp_path / "h"


def settings(h) -> dict:
    meta = home.open_meta(h)
    try:
        return {
            "ring": meta.ring(),
            "ring_changed_ns": meta.ring_changed_ns(),
            "fs_uuid": meta.config().fs_uuid,
        }
    finally:
        meta.close()


def config_of(h):
    meta = home.open_meta(h)
    try:
        return meta.config()
    finally:
        meta.close()


# --------------------------------------------------------------- the CLI


def test_node_parses_both_serving_and_managing():
    args = build_parser().parse_args(["node", "--data", "D", "--listen", "127.0.0.1:0"])
    assert (args.command, args.node_command, str(args.data)) == ("node", None, "D")
    args = build_parser().parse_args(["node", "list", "--home", "H", "--json"])
    assert (args.node_command, str(args.home), args.json) == ("list", "H", True)
    args = build_parser().parse_args(["node", "add", "/x", "--id", "a", "--weight", "2"])
    assert (args.address, args.node_id, args.weight, args.zone) == ("/x", "a", 2.0, None)


def test_node_help_explains_both():
    p = hafs("node", "--help")
    assert "--data DIR" in p.stdout and "{list,add,remove,set,adopt,token,ca}" in p.stdout
    for sub in ("list", "add", "remove", "set", "adopt", "token", "ca"):
        hafs("node", sub, "--help")


def test_node_without_data_or_subcommand_is_bad_input():
    p = hafs("node", check=False)
    assert p.returncode == 2 and "--data DIR" in p.stderr


def test_list_add_remove_set_through_the_cli(h, tmp_path):
    p = hafs("node", "list", "--home", h)
    assert "ring version 1" in p.stdout and p.stdout.count("up") >= 3
    p = hafs("node", "add", "--home", h, tmp_path / "d4", "--zone", "z1")
    assert "added node n4" in p.stdout and "ring version 2" in p.stdout
    report = json.loads(hafs("node", "list", "--home", h, "--json").stdout)
    assert report["ring_version"] == 2
    nodes = {n["id"]: n for n in report["nodes"]}
    assert sorted(nodes) == ["n1", "n2", "n3", "n4"]
    assert nodes["n4"]["zone"] == "z1" and nodes["n4"]["state"] == "up"
    assert sum(n["ring_share"] for n in nodes.values()) == pytest.approx(1, abs=0.01)
    assert all(n["blocks"] == 0 and n["data_share"] == 0 for n in nodes.values())

    p = hafs("node", "remove", "--home", h, "n1")
    assert "draining" in p.stdout and "ring version 3" in p.stdout
    p = hafs("node", "remove", "--home", h, "n1")
    assert "already draining" in p.stdout
    assert ring_of(h).version == 3  # nothing changed: no new version
    nodes = {
        n["id"]: n for n in json.loads(hafs("node", "list", "--home", h, "--json").stdout)["nodes"]
    }
    assert nodes["n1"]["state"] == "draining" and nodes["n1"]["ring_share"] == 0

    hafs("node", "set", "--home", h, "n1", "--state", "up")  # cancel the removal
    hafs("node", "set", "--home", h, "n2", "--weight", "3", "--zone", "z2")
    ring = ring_of(h)
    assert ring.version == 5 and ring.nodes["n1"].state == "up"
    assert (ring.nodes["n2"].weight, ring.nodes["n2"].zone) == (3.0, "z2")
    p = hafs("node", "set", "--home", h, "n2", "--weight", "3")
    assert "nothing to change" in p.stdout and ring_of(h).version == 5
    hafs("node", "set", "--home", h, "n2", "--zone", "")
    assert ring_of(h).nodes["n2"].zone is None
    assert settings(h)["ring_changed_ns"] > 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["remove", "n9"], "no node 'n9' in the ring"),
        (["set", "n9", "--weight", "2"], "no node 'n9' in the ring"),
        (["set", "n1"], "give --weight W, --zone Z, --state up|draining or --address"),
        (["set", "n1", "--weight", "-1"], "weight must be finite and >= 0"),
        (["add", "{n1}"], "already is node n1"),
        (["add", "{tmp}/d5", "--id", "n2"], "already has a node n2"),
        (["add", "{tmp}/d5", "--id", "bad/id"], "node id 'bad/id'"),
        (["add", "{tmp}/d5", "--weight", "0"], "needs a weight above 0"),
        (["add", "{tmp}/full"], "is not empty"),
        (["add", "ftp://host:1"], "expected http://HOST:PORT or https://HOST:PORT"),
    ],
)
def test_refusals_change_nothing(h, tmp_path, args, message):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    n1 = ring_of(h).nodes["n1"].address
    args = [a.format(n1=n1, tmp=tmp_path) for a in args]
    before = settings(h)
    p = hafs("node", *args, "--home", h, check=False)
    assert p.returncode == 2, p.stderr
    assert message in p.stderr, p.stderr
    assert settings(h) == before
    assert not (tmp_path / "d5").exists()


def test_remove_below_r_is_refused(h):
    nodeadmin.remove_node(h, "n3")
    with pytest.raises(UserError, match="would leave 1 node.*fewer than the 2 replicas"):
        nodeadmin.remove_node(h, "n2")
    with pytest.raises(UserError, match="fewer than the 2 replicas"):
        nodeadmin.set_node(h, "n1", weight=0)
    p = hafs("node", "remove", "--home", h, "n1", check=False)
    assert p.returncode == 2 and "fewer than the 2 replicas" in p.stderr
    assert ring_of(h).version == 2


def test_a_concurrent_ring_change_is_retried_not_lost(h, tmp_path):
    meta = home.open_meta(h)
    try:
        calls = []

        def change(current):
            calls.append(current.version)
            if len(calls) == 1:  # someone else writes version 2 meanwhile
                nodeadmin.add_node(h, str(tmp_path / "d9"), "other")
            return [replace(s, weight=2.0) if s.id == "n1" else s for s in current.nodes.values()]

        ring, changed = nodeadmin.change_ring(meta, change)
        assert calls == [1, 2] and changed and ring.version == 3 and "other" in ring.nodes
        assert ring.nodes["n1"].weight == 2
        assert not meta.replace_ring(ring.to_json(), 2)  # a stale version is refused
    finally:
        meta.close()


def test_default_ids_are_the_next_free_nk(h, tmp_path):
    assert nodeadmin.add_node(h, str(tmp_path / "a"))[0].id == "n4"
    assert nodeadmin.add_node(h, str(tmp_path / "b"), "x")[0].id == "x"
    assert nodeadmin.add_node(h, str(tmp_path / "c"))[0].id == "n5"


# ---------------------------------------------------------- remote nodes


def test_rebalance_onto_a_remote_node_and_list_it(tmp_path):
    files = contents(300, seed=20)
    h = build(tmp_path, files)
    fs_uuid = settings(h)["fs_uuid"]
    node = start_node(tmp_path / "remote", "--init", "n4", "--fs-uuid", fs_uuid, init=None)
    try:
        meta = home.open_meta(h)
        try:  # what 'hafs node add' does once the node is claimed
            nodeadmin.change_ring(meta, lambda r: [*r.nodes.values(), NodeSpec("n4", node.url)])
        finally:
            meta.close()
        report = rebalance.run(h, settle_s=0)
        assert report.exit_code == 0 and report.copied > 0, report.render()
        assert all(move.endswith("-> n4") for move in report.moves), report.moves
        listing = json.loads(hafs("node", "list", "--home", h, "--json").stdout)
        remote = {n["id"]: n for n in listing["nodes"]}["n4"]
        assert remote["address"] == node.url and remote["state"] == "up"
        assert remote["blocks"] == report.copied
        status = json.loads(hafs("status", "--home", h, "--json").stdout)
        assert {n["id"]: n for n in status["nodes"]}["n4"]["blocks"] == report.copied
        read_back(h, files)

        node.stop()  # down: listed as such, exit 1
        p = hafs("node", "list", "--home", h, check=False)
        assert p.returncode == 1 and "DOWN" in p.stdout, p.stdout
        node = start_node(node.data, init=None, port=node.port)

        # Draining it moves everything back to the directory nodes, over HTTP.
        nodeadmin.remove_node(h, "n4")
        report = rebalance.run(h, settle_s=0)
        assert report.exit_code == 0 and report.removed_nodes == ["n4"], report.render()
        assert node.store("n4", fs_uuid).iter_ids("", 10) == []
        assert_in_place(h, files)
    finally:
        node.stop()


def test_node_add_claims_a_remote_node(tmp_path):
    (tmp_path / "remote").mkdir()
    try:
        node = start_node(tmp_path / "remote", init=None)
    except AssertionError as e:
        if "no identity file" not in str(e):
            raise
        pytest.skip("this hafs node cannot serve an unclaimed directory yet")
    try:
        h = build(tmp_path, contents(50, seed=23))
        hafs("node", "add", "--home", h, node.url)
        assert ring_of(h).nodes["n4"].address == node.url
        assert rebalance.run(h, settle_s=0).exit_code == 0
        home.create(tmp_path / "other")  # a second filesystem cannot take the same node
        p = hafs("node", "add", "--home", tmp_path / "other", node.url, check=False)
        assert p.returncode == 2 and "already serves node n4" in p.stderr
    finally:
        node.stop()


def test_node_add_gives_a_filesystem_its_first_token_and_ca(tmp_path):
    """A filesystem of directories gets an HTTPS node with a token: node add stores both;
    another token or CA is refused; 'hafs node ca' takes a CA only if the nodes' certificates
    are signed by it (a bundle of the old and new CA during a change)."""
    ca, other = trustme.CA(), trustme.CA()
    h = tmp_path / "h"
    home.create(h)
    files = {}
    for name, text in (("tok", "s3cret\n"), ("wrong", "nope\n"), ("another", "t2\n")):
        files[name] = tmp_path / f"{name}.token"
        files[name].write_text(text)
    ca_pem, other_pem = ca_file(ca, tmp_path / "ca.pem"), ca_file(other, tmp_path / "o.pem")
    bundle = tmp_path / "bundle.pem"
    bundle.write_text(ca_pem.read_text() + other_pem.read_text())
    node = start_node(tmp_path / "remote", init=None, token="s3cret", tls=tls_files(ca, tmp_path))
    try:
        before = settings(h)
        add = ["node", "add", "--home", h, node.url]
        for extra, message in (
            (["--token-file", files["tok"]], "not signed by the system's CAs"),
            (["--ca-file", ca_pem], "refuses the token"),
            (["--ca-file", ca_pem, "--token-file", files["wrong"]], "wrong bearer token"),
            (["--ca-file", other_pem, "--token-file", files["tok"]], "not signed by the"),
        ):
            p = hafs(*add, *extra, check=False)
            assert p.returncode == 2 and message in p.stderr, (extra, p.stderr)
        assert settings(h) == before and not (node.data / "hafs-node.json").exists()
        hafs(*add, "--ca-file", ca_pem, "--token-file", files["tok"])
        config = config_of(h)
        assert (config.node_token, config.ca_pem) == ("s3cret", ca_pem.read_text())
        assert (h / "meta.db").stat().st_mode & 0o077 == 0, "it holds the token now"
        assert ring_of(h).nodes["n4"].address == node.url
        p = hafs("node", "add", "--home", h, tmp_path / "d5", "--token-file", files["another"],
                 check=False)  # fmt: skip
        assert p.returncode == 2 and "use another token" in p.stderr, p.stderr
        p = hafs("node", "ca", "--home", h, "--ca-file", other_pem, check=False)
        assert p.returncode == 2 and "not signed by the filesystem's CA" in p.stderr, p.stderr
        assert "nothing was changed" in p.stderr
        hafs("node", "ca", "--home", h, "--ca-file", bundle)
        assert config_of(h).ca_pem == bundle.read_text()
        assert hafs("node", "list", "--home", h).returncode == 0  # n4 answers: up
    finally:
        node.stop()


def test_a_draining_node_that_is_down_stays_in_the_ring(tmp_path):
    h = build(tmp_path, contents(50, seed=21))
    n3 = ring_of(h).nodes["n3"].address
    nodeadmin.remove_node(h, "n3")
    shutil.move(n3, tmp_path / "n3-away")
    report = rebalance.run(h, settle_s=0)
    assert report.exit_code == 1 and "n3" in report.draining_left, report.render()
    assert "n3" in ring_of(h).nodes
    shutil.move(tmp_path / "n3-away", n3)
    report = rebalance.run(h, settle_s=0)
    assert report.exit_code == 0 and report.removed_nodes == ["n3"], report.render()


# ------------------------------------------------- a running vfs follows


def test_a_running_vfs_switches_to_each_new_ring_version(tmp_path):
    h = tmp_path / "h"
    home.create(h)

    async def main(v):
        placement = v.placement
        n1_store = placement.stores["n1"]
        nodeadmin.add_node(h, str(tmp_path / "n4"))
        await v.reload_ring()
        assert placement.ring.version == 2 and "n4" in placement.stores
        assert placement.stores["n1"] is n1_store  # unchanged nodes keep their store
        files = contents(60, seed=22)
        for name, data in files.items():
            fh, _ = await v.create(ROOT_INODE, name.encode(), 0o644, os.O_WRONLY, 0, 0)
            await v.write(fh, 0, data)
            await v.release(fh)
        where = holders(placement.ring, v.engine.config().fs_uuid)
        for data in files.values():
            bid = block_id(data)
            assert where[bid] == set(placement.ring.replicas(bid, 2))
        assert any("n4" in where[block_id(d)] for d in files.values())

        # The background task follows on its own (within RING_RELOAD_S).
        nodeadmin.remove_node(h, "n4")
        with trio.fail_after(5):
            while placement.ring.version != 3:
                await trio.sleep(0.05)
        assert placement.ring.nodes["n4"].state == "draining"
        report = await trio.to_thread.run_sync(lambda: rebalance.run(h, settle_s=0))
        assert report.removed_nodes == ["n4"], report.render()
        with trio.fail_after(5):
            while placement.ring.version != 4:
                await trio.sleep(0.05)
        assert "n4" not in placement.ring.nodes
        assert "n4" not in placement.stores
        return files

    files = trio.run(vfs_session, h, main)
    assert_in_place(h, files)
