"""Chunker: pinned cut points, size bounds, and locality of a change."""

import random

from hafs.store.chunker import MAX_SIZE, MIN_SIZE, MiB, cut_points

# Cut points of 12 MiB from random.Random(2026).randbytes(): if these change,
# every stored file would chunk differently and lose dedup against old data.
GOLDEN = [
    873887,
    1735176,
    3030071,
    4311411,
    5067472,
    5967428,
    7616174,
    9372035,
    10544574,
    11543155,
    12582912,
]


def test_golden_cut_points():
    assert cut_points(random.Random(2026).randbytes(12 * MiB)) == GOLDEN


def test_sizes_within_bounds_and_mean_about_1_mib():
    buf = random.Random(1).randbytes(64 * MiB)
    cuts = cut_points(buf)
    sizes = [b - a for a, b in zip([0] + cuts, cuts)]
    assert cuts[-1] == len(buf)
    assert all(MIN_SIZE <= s <= MAX_SIZE for s in sizes[:-1])
    assert 0.8 * MiB < sum(sizes) / len(sizes) < 1.3 * MiB


def test_zeros_and_tiny_buffers():
    assert cut_points(b"") == []
    assert cut_points(b"x") == [1]
    assert cut_points(bytes(9 * MiB)) == [4 * MiB, 8 * MiB, 9 * MiB]  # no content: max size


def test_an_edit_moves_only_nearby_cuts():
    buf = bytearray(random.Random(3).randbytes(32 * MiB))
    before = set(cut_points(buf))
    buf[16 * MiB : 16 * MiB + 100] = b"y" * 100
    after = set(cut_points(buf))
    changed = before ^ after  # often empty: the edit fell inside one block
    assert len(before & after) >= len(before) - 3
    assert all(abs(c - 16 * MiB) < 2 * MAX_SIZE for c in changed)
