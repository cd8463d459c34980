"""Background work never ends the mount: a node that fails during garbage collection
and during repair costs a logged round, and the work is done once the node answers.

Three real `hafs node` processes (R=2, W=2); a node is stopped (SIGSTOP) while
garbage collection or repair needs it, then resumed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

from conftest import hafs
from test_remote_nodes import EXPECTED, Cluster, check_tree, degraded_blocks, make_tree

from hafs.store.chunker import MiB


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.3)


def test_a_node_failing_during_gc_and_repair_does_not_end_the_mount(tmp_path):
    c = Cluster(tmp_path)
    try:
        c.mkfs()
        c.mount.start()
        mnt = c.mount.mnt
        # Garbage collection while a node hangs.
        make_tree(tmp_path / "gone", 12, MiB, seed=11)
        subprocess.run(["cp", "-a", str(tmp_path / "gone"), str(mnt / "gone")], check=True)
        subprocess.run(["sync", "-f", str(mnt)], check=True)
        held_before = set(c.holders())
        victim = c.nodes[0]
        os.kill(victim.proc.pid, signal.SIGSTOP)
        try:
            subprocess.run(["rm", "-r", str(mnt / "gone")], check=True)
            log = c.mount.log
            wait_for(  # a GC round failed on the hung node, or the probe found it down first
                lambda: any(t in log.read_text() for t in ("NODE-DOWN n1", "collect_garbage")),
                30,
                "neither garbage collection nor the probe met the hung node",
            )
            time.sleep(3)  # garbage-collection rounds while n1 does not answer
            assert os.path.ismount(mnt)
            on_victim = {f.name for f in (victim.data / "blocks").rglob("*") if f.is_file()}
            assert held_before & on_victim, "n1's copies wait for n1 (their rows are kept)"
            kept = make_tree(tmp_path / "kept", 3, MiB, seed=12)  # the mount still serves
            subprocess.run(["cp", "-a", str(tmp_path / "kept"), str(mnt / "kept")], check=True)
        finally:
            os.kill(victim.proc.pid, signal.SIGCONT)
        wait_for(
            lambda: not held_before & set(c.holders()),
            60,
            "the removed files' blocks were not collected once the node answered",
        )
        check_tree(mnt / "kept", kept)
        # Repair while a node hangs: blocks written while n2 was dead, n2 back but hung.
        c.nodes[1].stop(signal.SIGKILL)
        later = make_tree(tmp_path / "later", 6, MiB, seed=13)
        subprocess.run(["cp", "-a", str(tmp_path / "later"), str(mnt / "later")], check=True)
        subprocess.run(["sync", "-f", str(mnt)], check=True)
        assert degraded_blocks(c) > 0
        c.restart(1)
        os.kill(c.nodes[1].proc.pid, signal.SIGSTOP)
        try:
            time.sleep(4)  # repair rounds (every second) meet the hung node
            assert os.path.ismount(mnt) and degraded_blocks(c) > 0
            check_tree(mnt / "later", later)
        finally:
            os.kill(c.nodes[1].proc.pid, signal.SIGCONT)
        wait_for(lambda: degraded_blocks(c) == 0, 60, "degraded blocks were not repaired")
        assert set(c.holders().values()) == {2}
        check_tree(mnt / "later", later)
        p = hafs("fsck", "--home", c.mount.home, check=False)  # a check beside the mount
        assert p.returncode == 0, p.stdout + p.stderr
    finally:
        c.close()
    bad = c.mount.bad_log_lines(allowed=(*EXPECTED, "background collect_garbage failed"))
    assert not bad, "\n".join(bad[:20])
