"""A directory of 100,000 entries, listed through the mount while it changes."""

import os

from hafs.meta.sqlite import SqliteMeta

N = 100_000


def test_readdir_100k_entries_streams(mount, work):
    for i in range(N):
        os.close(os.open(work / f"entry-{i:06d}", os.O_WRONLY | os.O_CREAT, 0o644))
    seen = 0
    names = set()
    with os.scandir(work) as it:
        for entry in it:
            names.add(entry.name)
            seen += 1
            if seen == N // 2:  # a create during the listing must not repeat or drop entries
                os.close(os.open(work / "late", os.O_WRONLY | os.O_CREAT, 0o644))
    assert seen in (N, N + 1) and len(names) == seen
    assert {f"entry-{i:06d}" for i in range(0, N, 997)} <= names
    meta = SqliteMeta.open(mount.home / "meta.db")
    try:
        assert meta.db.execute("SELECT count(*) FROM dentries").fetchone()[0] >= N
    finally:
        meta.close()
