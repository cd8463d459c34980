"""The metadata invariants fsck checks, asserted through the engine interface (any engine).

refcounts equal extent counts, link counts equal entries (directories: 2 + subdirectories),
every entry's inode and parent exist, extents lie inside their files and do not overlap.
"""

from __future__ import annotations

import stat
from collections import Counter

from hafs.meta import ROOT_INODE


def pages(scan, first, key, limit=500):
    after = first
    while True:
        rows = scan(after, limit)
        yield from rows
        if len(rows) < limit:
            return
        after = key(rows[-1])


def assert_consistent(meta) -> None:
    inodes = {i.id: i for i in pages(meta.scan_inodes, 0, lambda i: i.id)}
    names: Counter[int] = Counter()
    subdirs: Counter[int] = Counter()
    for parent, name, ino in pages(meta.scan_entries, (0, b""), lambda e: (e[0], e[1])):
        assert parent in inodes, f"entry {name!r} in a missing directory {parent}"
        assert stat.S_ISDIR(inodes[parent].mode), f"entry {name!r} in a non-directory {parent}"
        assert inodes[parent].nlink > 0, f"entry {name!r} in the removed directory {parent}"
        assert ino in inodes, f"entry {name!r} names the missing inode {ino}"
        names[ino] += 1
        if stat.S_ISDIR(inodes[ino].mode):
            subdirs[parent] += 1
    for ino, inode in inodes.items():
        if stat.S_ISDIR(inode.mode):
            expect = 2 + subdirs[ino] if (names[ino] or ino == ROOT_INODE) else 0
            assert inode.nlink == expect, f"directory {ino}: nlink {inode.nlink}, expected {expect}"
        else:
            n = names[ino]
            assert inode.nlink == n, f"inode {ino}: nlink {inode.nlink}, {n} names"
    refs: Counter[str] = Counter()
    prev: dict[int, int] = {}
    for ino, e in pages(meta.scan_extents, (0, -1), lambda r: (r[0], r[1].offset)):
        assert ino in inodes, f"extent of the missing inode {ino}"
        assert e.end <= inodes[ino].size, f"inode {ino}: extent past the end"
        assert prev.get(ino, 0) <= e.offset, f"inode {ino}: overlapping extents"
        prev[ino] = e.end
        refs[e.block_id] += 1
    rows = {b.id: b for b in pages(meta.scan_blocks, "", lambda b: b.id)}
    for bid, n in refs.items():
        assert bid in rows, f"block {bid} is referenced but has no row"
        assert rows[bid].refcount == n, f"block {bid}: refcount {rows[bid].refcount}, {n} extents"
    for bid, row in rows.items():
        if bid not in refs:
            assert row.refcount == 0 and row.zero_since_ns is not None, f"block {bid}: {row}"
