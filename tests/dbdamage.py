"""Damage chosen pages of a SQLite database file, as a bad disk or a stray write would.

`pages(db, table, kind)` lists a table's (or index's) pages of one kind ("leaf",
"internal", "overflow") from SQLite's dbstat; `damage(db, pages)` overwrites the
middle of each (from byte 8, half a page) with garbage: the page's cell pointers
and part of its cells, so SQLite finds it malformed.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path


def page_size(db: Path) -> int:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("PRAGMA page_size").fetchone()[0]
    finally:
        conn.close()


def pages(db: Path, table: str, kind: str = "leaf") -> list[int]:
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute(
            "SELECT pageno FROM dbstat WHERE name = ? AND pagetype = ? ORDER BY pageno",
            (table, kind),
        )
        return [r[0] for r in rows]
    finally:
        conn.close()


def cells(db: Path, page: int) -> int:
    """How many rows (cells) the page holds."""
    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT ncell FROM dbstat WHERE pageno = ?", (page,)).fetchone()[0]
    finally:
        conn.close()


def damage(db: Path, numbers) -> None:
    size = page_size(db)
    with open(db, "r+b") as f:
        for n in numbers:
            f.seek((n - 1) * size + 8)
            f.write(b"\xa5" * (size // 2))
