"""hafs rebalance on real filesystems: thousands of small blocks written through the Vfs
(or a real mount), nodes added, reweighted and removed, rebalance killed and rerun.

After every rebalance: each block sits on exactly the R nodes the ring names, fsck is
clean and the files read back.  Measured figures are printed (pytest -s shows them).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import trio
from conftest import HAFS, hafs, make_mount, vfs_session

from hafs import home
from hafs.admin import fsck, rebalance
from hafs.admin import nodes as nodeadmin
from hafs.fs.vfs import Vfs
from hafs.meta import ROOT_INODE
from hafs.store.dirstore import DirStore, block_id
from hafs.store.ring import Ring

R = 2


# ------------------------------------------------------------------ helpers


def contents(n: int, seed: int = 0) -> dict[str, bytes]:
    """`n` small files (one block each), deterministic."""
    rng = random.Random(seed)
    return {f"f{i}": rng.randbytes(rng.randint(1000, 3000)) for i in range(n)}


def build(tmp_path: Path, files: dict[str, bytes], **kw) -> Path:
    """A filesystem (3 directory nodes, R=2) in tmp_path/h holding `files`."""
    h = tmp_path / "h"
    home.create(h, **kw)

    async def work(v: Vfs) -> None:
        limit = trio.Semaphore(16)

        async def one(name: str, data: bytes) -> None:
            async with limit:
                fh, _ = await v.create(ROOT_INODE, name.encode(), 0o644, os.O_WRONLY, 0, 0)
                await v.write(fh, 0, data)
                await v.release(fh)

        async with trio.open_nursery() as n:
            for name, data in files.items():
                n.start_soon(one, name, data)

    trio.run(vfs_session, h, work)
    return h


def read_back(h: Path, files: dict[str, bytes]) -> None:
    async def work(v: Vfs) -> None:
        for name, data in files.items():
            ino = (await v.lookup(ROOT_INODE, name.encode())).id
            fh, _, _ = await v.open(ino, os.O_RDONLY)
            got = await v.read(fh, 0, len(data) + 1)
            await v.release(fh)
            assert got == data, name

    trio.run(vfs_session, h, work)


def ring_of(h: Path) -> Ring:
    meta = home.open_meta(h)
    try:
        return Ring.from_json(meta.ring())
    finally:
        meta.close()


def holders(ring: Ring, fs_uuid: str, extra: dict[str, Path] | None = None) -> dict[str, set]:
    """block id -> the nodes holding a copy (ring nodes, plus `extra` directories)."""
    where: dict[str, set] = {}
    dirs = {s.id: Path(s.address) for s in ring.nodes.values()} | (extra or {})
    for node_id, path in dirs.items():
        store = DirStore(path, node_id, fs_uuid)
        after = ""
        while ids := store.iter_ids(after, 1000):
            after = ids[-1]
            for bid in ids:
                where.setdefault(bid, set()).add(node_id)
    return where


def fs_uuid_of(h: Path) -> str:
    meta = home.open_meta(h)
    try:
        return meta.config().fs_uuid
    finally:
        meta.close()


def assert_in_place(h: Path, files: dict[str, bytes]) -> Ring:
    """Every block of `files` on exactly the R nodes the ring names, and nothing else."""
    ring = ring_of(h)
    where = holders(ring, fs_uuid_of(h))
    ids = {block_id(d) for d in files.values()}
    assert set(where) == ids, "blocks missing or left over"
    wrong = {
        b: (sorted(n), ring.replicas(b, R))
        for b, n in where.items()
        if n != set(ring.replicas(b, R))
    }
    assert not wrong, f"{len(wrong)} blocks off their ring nodes, e.g. {next(iter(wrong.items()))}"
    return ring


def assert_fsck_clean(h: Path) -> None:
    report = fsck.run(h, deep=True)
    assert report.exit_code == fsck.EXIT_CLEAN, report.render()


def node_dirs(h: Path) -> dict[str, list]:
    """Every file under the home's nodes (name, size, mtime): a snapshot."""
    snap = {}
    for root, _, names in os.walk(h.parent):
        for n in names:
            p = Path(root) / n
            if "blocks" in p.parts:
                st = p.stat()
                snap[str(p)] = (st.st_size, st.st_mtime_ns)
    return snap


# -------------------------------------------------------------------- tests


def test_add_a_node_moves_a_quarter_and_only_to_it(tmp_path):
    files = contents(3000)
    h = build(tmp_path, files)
    spec, ring = nodeadmin.add_node(h, str(tmp_path / "n4"))
    assert (spec.id, ring.version) == ("n4", 2)

    before = node_dirs(h)
    plan = rebalance.run(h, dry_run=True)
    assert node_dirs(h) == before and ring_of(h).version == 2  # a dry run changes nothing
    assert plan.exit_code == 0 and plan.copied == plan.deleted == 0

    t0 = time.monotonic()
    report = rebalance.run(h, settle_s=0)
    seconds = time.monotonic() - t0
    assert report.exit_code == 0, report.render()
    assert report.misplaced == plan.misplaced and report.to_copy == plan.to_copy
    assert report.bytes_to_copy == plan.bytes_to_copy == report.bytes_copied
    # Moved: near the ideal 1/4, and all of it onto the new node.
    assert report.copies == 6000
    assert abs(report.fraction / 0.25 - 1) <= 0.10, report.fraction
    assert abs(report.fraction / report.ideal_fraction - 1) <= 0.10
    assert all(move.endswith("-> n4") for move in report.moves), report.moves
    assert report.copied == report.deleted == report.misplaced
    ring = assert_in_place(h, files)
    where = holders(ring, fs_uuid_of(h))
    on_n4 = sum("n4" in n for n in where.values()) / (len(files) * R)
    assert abs(on_n4 / 0.25 - 1) <= 0.10, on_n4
    print(
        f"\nadd n4 to 3 nodes, R=2, {len(files)} blocks: moved {report.fraction:.4f} of"
        f" {report.copies} copies (ideal {report.ideal_fraction:.4f}, 1/4 = 0.25);"
        f" n4 holds {on_n4:.4f}; rebalance took {seconds:.2f} s"
        f" ({report.copied} copies, {report.bytes_copied / 2**20:.1f} MiB)"
    )
    assert_fsck_clean(h)
    read_back(h, files)

    # A second run finds nothing to do.
    again = rebalance.run(h, settle_s=0)
    assert (again.misplaced, again.copied, again.deleted, again.exit_code) == (0, 0, 0, 0)

    # Reweight: n1 to weight 2 moves about the share it gains, only onto n1.
    ring, changed = nodeadmin.set_node(h, "n1", weight=2)
    assert changed and ring.version == 3
    report = rebalance.run(h, settle_s=0)
    assert report.exit_code == 0, report.render()
    assert all(move.endswith("-> n1") for move in report.moves), report.moves
    assert abs(report.fraction / report.ideal_fraction - 1) <= 0.10
    share = report.target["n1"] / report.copies
    print(
        f"reweight n1 1 -> 2 of 4 nodes: moved {report.fraction:.4f} (ideal"
        f" {report.ideal_fraction:.4f}); n1 holds {share:.4f} of the copies"
    )
    assert 0.3 < share < 0.5  # at most 1/R of the copies can be on one node
    assert_in_place(h, files)
    assert_fsck_clean(h)


def test_remove_a_node_empties_it_and_it_leaves_the_ring(tmp_path):
    files = contents(1500, seed=1)
    h = build(tmp_path, files)
    n2 = Path(ring_of(h).nodes["n2"].address)
    ring, changed = nodeadmin.remove_node(h, "n2")
    assert changed and ring.nodes["n2"].state == "draining" and ring.version == 2
    report = rebalance.run(h, settle_s=0)
    assert report.exit_code == 0, report.render()
    assert report.removed_nodes == ["n2"]
    assert all(move.startswith("n2 ->") for move in report.moves), report.moves
    assert abs(report.fraction / (1 / 3) - 1) <= 0.10, report.fraction
    ring = ring_of(h)
    assert ring.version == 3 and sorted(ring.nodes) == ["n1", "n3"]
    assert DirStore(n2, "n2", fs_uuid_of(h)).iter_ids("", 10) == []
    assert_in_place(h, files)
    assert_fsck_clean(h)
    read_back(h, files)


def test_rebalance_restores_copies_missing_on_named_nodes(tmp_path):
    files = contents(200, seed=2)
    h = build(tmp_path, files)
    ring = ring_of(h)
    victim = ring.nodes["n1"]
    lost = 0
    store = DirStore(victim.address, "n1", fs_uuid_of(h))
    for bid in store.iter_ids("", 50):
        store.delete(bid)
        lost += 1
    report = rebalance.run(h, settle_s=0)
    assert report.exit_code == 0 and report.copied == lost and report.deleted == 0
    assert_in_place(h, files)


def test_kill_9_midway_then_rerun_completes(tmp_path):
    files = contents(2000, seed=3)
    h = build(tmp_path, files)
    nodeadmin.add_node(h, str(tmp_path / "n4"))
    n4 = DirStore(tmp_path / "n4", "n4", fs_uuid_of(h))
    proc = subprocess.Popen(
        [*HAFS, "rebalance", "--home", str(h), "--bandwidth", "0.1", "--json"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while len(n4.iter_ids("", 200)) < 100:
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "rebalance made no progress"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    # Killed midway: some copies moved, some not, and no block has fewer than R copies.
    where = holders(ring_of(h), fs_uuid_of(h))
    moved = sum("n4" in n for n in where.values())
    assert 100 <= moved < 0.9 * len(files) / 2, moved
    assert set(where) == {block_id(d) for d in files.values()}
    assert min(len(n) for n in where.values()) >= R
    report = rebalance.run(h, settle_s=0)
    assert report.exit_code == 0, report.render()
    assert report.copied + moved >= report.misplaced  # the rerun did only what was left
    assert_in_place(h, files)
    assert_fsck_clean(h)


def test_bandwidth_throttles_the_copies(tmp_path):
    files = contents(400, seed=4)
    h = build(tmp_path, files)
    nodeadmin.add_node(h, str(tmp_path / "n4"))
    t0 = time.monotonic()
    report = rebalance.run(h, settle_s=1.0, bandwidth_mib=0.25)
    took = time.monotonic() - t0 - report.waited_s  # waiting must not bank bandwidth
    assert report.exit_code == 0 and report.waited_s > 0.5
    expect = report.bytes_copied / 2**20 / 0.25
    assert expect > 1 and 0.8 * expect <= took <= 1.5 * expect + 1, (took, expect)
    assert_in_place(h, files)


def test_rebalance_waits_for_the_mounts_after_a_ring_change(tmp_path):
    h = build(tmp_path, contents(10, seed=5))
    nodeadmin.add_node(h, str(tmp_path / "n4"))
    report = rebalance.run(h, settle_s=1.0)
    assert 0.5 < report.waited_s <= 1.0 and report.exit_code == 0
    assert re.search(
        r"^copied .* \(\d+ pass(es)?; waited \d\.\d s for the mounts", report.render(), re.M
    )
    report = rebalance.run(h, settle_s=1.0)  # the change is old by now
    assert report.waited_s == 0
    summary = [line for line in report.render().splitlines() if line.startswith("copied ")]
    assert len(summary) == 1 and summary[0].endswith(" s (1 pass)"), report.render()
    assert ")" not in report.render().splitlines(), report.render()


def test_cli_dry_run_and_json(tmp_path):
    files = contents(300, seed=6)
    h = build(tmp_path, files)
    hafs("node", "add", "--home", h, tmp_path / "n4")
    before = node_dirs(h)
    p = hafs("rebalance", "--home", h, "--dry-run")
    assert "plan (dry run, nothing changed)" in p.stdout and "-> n4" in p.stdout, p.stdout
    plan = json.loads(hafs("rebalance", "--home", h, "--dry-run", "--json").stdout)
    assert node_dirs(h) == before
    assert plan["dry_run"] and plan["plan"]["misplaced"] > 0 and plan["plan"]["bytes_to_copy"] > 0
    p = hafs("rebalance", "--home", h)
    assert "every block is where the ring puts it" in p.stdout, p.stdout
    assert_in_place(h, files)


def test_cli_refuses_a_second_rebalance_and_a_missing_home(tmp_path):
    p = hafs("rebalance", "--home", tmp_path / "nothing", check=False)
    assert p.returncode == 2 and "no hafs filesystem" in p.stderr
    h = build(tmp_path, contents(5, seed=7))
    meta = home.open_meta(h)  # the session a running rebalance holds
    session = meta.sessions.register("rebalance", "", 60)
    try:
        p = hafs("rebalance", "--home", h, check=False)
        assert p.returncode == 2 and "another 'hafs rebalance' is running" in p.stderr
    finally:
        meta.sessions.end(session)
        meta.close()


# ---------------------------------------------------------------- mounted


def test_rebalance_while_a_writer_and_a_reader_use_the_mount(tmp_path):
    m = make_mount(tmp_path, "gc_grace_s=3600")
    m.start()
    errors: list[str] = []
    written: dict[str, bytes] = {}  # relative path -> content, once closed
    paths: list[str] = []  # the keys of `written`, for the reader (a list may grow under it)
    reads = [0]
    stop = threading.Event()
    try:
        work = m.mnt / "w"
        work.mkdir()
        for name, data in contents(300, seed=8).items():
            (work / name).write_bytes(data)
            written[f"w/{name}"] = data
            paths.append(f"w/{name}")

        def writer() -> None:
            rng = random.Random(9)
            i = 0
            while not stop.is_set():
                data = rng.randbytes(rng.randint(2000, 200_000))
                path = f"w/new{i}"
                try:
                    with open(m.mnt / path, "wb") as f:
                        f.write(data)
                except OSError as e:
                    errors.append(f"write {path}: {e}")
                written[path] = data
                paths.append(path)
                i += 1

        def reader() -> None:
            rng = random.Random(10)
            while not stop.is_set():
                path = rng.choice(paths)
                data = written[path]
                try:
                    got = (m.mnt / path).read_bytes()
                except OSError as e:
                    errors.append(f"read {path}: {e}")
                    continue
                if got != data:
                    errors.append(f"read {path}: wrong bytes")
                reads[0] += 1

        threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
        for t in threads:
            t.start()
        try:
            time.sleep(0.5)
            hafs("node", "add", "--home", m.home, tmp_path / "n4")
            p = hafs("rebalance", "--home", m.home, "--json")
            done = json.loads(p.stdout)
            assert done["exit_code"] == 0 and done["done"]["copied"] > 0, p.stdout
            assert done["done"]["waited_s"] > 0  # it waited for the mount to use ring 2
            # And drain n1 while the writer and the reader go on: it leaves the ring.
            hafs("node", "remove", "--home", m.home, "n1")
            p = hafs("rebalance", "--home", m.home, "--json")
            drained = json.loads(p.stdout)
            assert drained["exit_code"] == 0 and drained["done"]["removed_nodes"] == ["n1"]
            time.sleep(1.5)
        finally:
            stop.set()
            for t in threads:
                t.join(60)
        assert not errors, errors[:10]
        assert reads[0] > 0 and not any(t.is_alive() for t in threads)
        log = m.log.read_text()
        assert "RING-VERSION 2" in log and "RING-VERSION 4" in log
        assert sorted(ring_of(m.home).nodes) == ["n2", "n3", "n4"]
        # New files written since land on the new ring's nodes, the new node among them.
        fresh = contents(40, seed=11)
        for name, data in fresh.items():
            (work / name).write_bytes(data)
            written[f"w/{name}"] = data
        ring = ring_of(m.home)
        where = holders(ring, fs_uuid_of(m.home))
        for data in fresh.values():
            bid = block_id(data)
            assert where[bid] == set(ring.replicas(bid, R)), bid
        assert any("n4" in where[block_id(d)] for d in fresh.values())
        # Nothing written during the rebalance was left behind on its old homes.
        plan = json.loads(hafs("rebalance", "--home", m.home, "--dry-run", "--json").stdout)
        assert plan["plan"]["misplaced"] == 0 and plan["plan"]["to_copy"] == 0, plan["plan"]
        for path, data in written.items():
            assert (m.mnt / path).read_bytes() == data, path
        print(f"\nmounted: {len(written)} files written, rebalance {done['seconds']} s")
    finally:
        stop.set()
        m.stop()
    bad = m.bad_log_lines()
    assert not bad, "unexpected errors in the daemon's log:\n" + "\n".join(bad[:20])
    assert_fsck_clean(m.home)
