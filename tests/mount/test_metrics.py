"""A mount with -o metrics: the endpoint counts what the test did; `hafs stats` prints lines."""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.request

import pytest
from conftest import HAFS, hafs, make_mount
from prometheus_client.parser import text_string_to_metric_families

from hafs.mount import metrics_file


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(sample, name: str, **labels) -> float:
    return sum(
        v
        for (n, ls), v in sample.items()
        if n == name and all(dict(ls).get(k) == want for k, want in labels.items())
    )


@pytest.fixture
def metered(tmp_path):
    port = free_port()
    m = make_mount(tmp_path, f"metrics=127.0.0.1:{port},gc_interval_s=3600")
    m.start()
    try:
        yield m, f"http://127.0.0.1:{port}/metrics"
    finally:
        m.stop()
    assert not metrics_file(m.home, m.mnt).exists()  # gone with the mount
    assert not m.bad_log_lines()


def test_metrics_count_what_was_done(metered):
    m, url = metered
    assert metrics_file(m.home, m.mnt).read_text().strip() == url
    before = scrape(url)
    n, k = 3 * 1024 * 1024 + 123, 7
    data = os.urandom(n)
    (m.mnt / "big").write_bytes(data)
    for i in range(k):
        (m.mnt / f"small{i}").write_bytes(b"x")
    os.sync()
    # a fresh open with a cold page cache: the read reaches hafs
    with open(m.mnt / "big", "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        assert f.read() == data
    time.sleep(1.5)  # the gauges are sampled once a second
    after = scrape(url)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("hafs_written_bytes_total") == n + k
    assert delta("hafs_read_bytes_total") == n
    assert delta("hafs_fuse_op_seconds_count", op="create") == k + 1
    assert delta("hafs_fuse_op_seconds_count", op="write") >= 1 + k
    assert delta("hafs_fuse_op_seconds_count", op="read") >= 1
    assert value(after, "hafs_fuse_op_seconds_bucket", op="create", le="+Inf") >= k + 1
    assert delta("hafs_fuse_op_errors_total", op="create") == 0
    # the 3 MiB file is at least 3 blocks, each put to the one backing directory
    puts = delta("hafs_block_call_seconds_count", call="put")
    assert puts >= 3
    assert delta("hafs_block_call_errors_total") == 0
    # its blocks were read: each one either from the cache or fetched (a miss, a get)
    assert delta("hafs_block_cache_hits_total") + delta("hafs_block_cache_misses_total") >= 3
    assert value(after, "hafs_nodes", state="up") == len(m.node_dirs())
    assert value(after, "hafs_nodes", state="down") == 0
    assert value(after, "hafs_degraded_blocks") == 0
    assert value(after, "hafs_write_locks_held") == 0
    assert value(after, "hafs_write_buffer_bytes") == 0
    assert value(after, "hafs_write_buffer_limit_bytes") == 256 * 1024 * 1024
    assert delta("hafs_write_lock_wait_seconds_count") == k + 1


def test_stats_prints_a_line_per_second(metered):
    m, _ = metered
    (m.mnt / "f").write_bytes(b"hello")
    p = subprocess.run(
        [*HAFS, "stats", str(m.mnt), "--count", "2"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert len(lines) == 3 and lines[0].split()[:2] == ["ops/s", "op_ms"]
    assert all(len(line.split()) == len(lines[0].split()) for line in lines[1:])


def test_stats_ends_with_ctrl_c(metered):
    m, _ = metered
    p = subprocess.Popen([*HAFS, "stats", str(m.mnt)], stdout=subprocess.PIPE, text=True)
    try:
        # the header, then a line a second (a loaded machine may take seconds to start it)
        first = [p.stdout.readline() for _ in range(2)]
        p.send_signal(2)
        out, _ = p.communicate(timeout=10)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0
    assert all(line.endswith("\n") for line in first)


def test_stats_without_metrics_says_how(tmp_path):
    m = make_mount(tmp_path)
    m.start()
    try:
        p = hafs("stats", m.mnt, check=False)
    finally:
        m.stop()
    assert p.returncode == 2
    assert "-o metrics=127.0.0.1:PORT" in p.stderr and len(p.stderr.splitlines()) == 1
