"""Grouped durability (hafs.store.syncer) and the DirStore puts that use it.

The flush is replaced by a double only to see when passes run and to inject
errors; everything else (files, renames, threads) is real.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from hafs.store import syncer as syncer_mod
from hafs.store.dirstore import DirStore, block_id
from hafs.store.syncer import Syncer, syncfs

FS = "3f0c6a55-0b8e-4d0e-9a43-5d1b8a3c2f10"
THREADS = 16


@dataclass
class Pass:
    started: float
    tmp: dict[str, int]  # temp files (name -> size) when the pass began
    blocks: set[str]  # block files when it began
    blocks_after: set[str] = field(default_factory=set)  # ... when it ended
    ended: float = 0.0


class FlushDouble:
    """Stands in for syncfs: records each pass (what the store held when it began and ended),
    runs the real syncfs, and can be told to wait, to sleep or to fail a pass."""

    def __init__(self, root: Path, sleep: float = 0.0) -> None:
        self.root = root
        self.sleep = sleep
        self.passes: list[Pass] = []
        self.fail: set[int] = set()  # numbers (from 1) of the passes that raise EIO
        self.hold_first_until: threading.Event | None = None
        self.lock = threading.Lock()

    def _tmp(self) -> dict[str, int]:
        out = {}
        for name in os.listdir(self.root / "tmp"):
            try:
                out[name] = os.stat(self.root / "tmp" / name).st_size
            except FileNotFoundError:
                pass  # renamed meanwhile
        return out

    def _blocks(self) -> set[str]:
        return {p.name for p in (self.root / "blocks").glob("*/*")}

    def __call__(self, fd: int) -> None:
        p = Pass(time.monotonic(), self._tmp(), self._blocks())
        with self.lock:
            self.passes.append(p)
            number = len(self.passes)
        if number == 1 and self.hold_first_until is not None:
            assert self.hold_first_until.wait(10)
        time.sleep(self.sleep)
        syncfs(fd)
        p.blocks_after = self._blocks()
        p.ended = time.monotonic()
        if number in self.fail:
            raise OSError(errno.EIO, "Input/output error")


@pytest.fixture
def store(tmp_path: Path) -> DirStore:
    return DirStore.create(tmp_path / "n1", "n1", FS)


@pytest.fixture
def flush(store: DirStore, monkeypatch) -> FlushDouble:
    double = FlushDouble(store.path)
    monkeypatch.setattr(syncer_mod, "syncfs", double)
    return double


def in_threads(fn, args: list) -> list:
    """fn(arg) for every arg, each in its own thread started at once; results or exceptions."""
    results: list = [None] * len(args)
    start = threading.Barrier(len(args))

    def run(i: int) -> None:
        start.wait()
        try:
            results[i] = fn(args[i])
        except Exception as e:
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(args))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


def puts_held_together(store: DirStore, flush: FlushDouble, blocks: list[bytes]) -> list:
    """Put `blocks` from threads started at once, the first pass held until every put has
    written its temp file: all of them are then in flight together. Results or exceptions."""
    flush.hold_first_until = threading.Event()

    def watch() -> None:
        deadline = time.monotonic() + 10
        while len(list((store.path / "tmp").iterdir())) < len(blocks):
            if time.monotonic() > deadline:
                break  # (the test then fails on its counts)
            time.sleep(0.001)
        flush.hold_first_until.set()

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        return in_threads(lambda d: store.put(block_id(d), d), blocks)
    finally:
        watcher.join()
        flush.hold_first_until = None


def test_syncfs_reports_errors() -> None:
    with pytest.raises(OSError) as e:
        syncfs(-1)
    assert e.value.errno == errno.EBADF


def test_no_put_returns_before_a_pass_made_its_bytes_and_its_name_durable(store, flush) -> None:
    flush.sleep = 0.005  # passes long enough for puts to pile up behind them
    blocks = [os.urandom(4096) for _ in range(THREADS)]

    def put(data: bytes) -> tuple[str, float]:
        bid = block_id(data)
        store.put(bid, data)
        return bid, time.monotonic()

    for bid, returned in in_threads(put, blocks):
        done = [p for p in flush.passes if p.ended <= returned]
        # the bytes: a pass began once the temp file was whole, and ended before the rename
        assert any(
            any(n.startswith(bid) and size == 4096 for n, size in p.tmp.items())
            and bid not in p.blocks_after
            for p in done
        ), bid
        # the name: a pass began after the rename and ended before put returned
        assert any(bid in p.blocks for p in done), bid
    assert {store.get(block_id(b)) for b in blocks} == set(blocks)


def test_a_put_of_a_block_already_there_waits_for_a_pass_too(store, flush) -> None:
    data = os.urandom(100)
    store.put(block_id(data), data)
    before = len(flush.passes)
    store.put(block_id(data), data)
    assert len(flush.passes) == before + 1


def test_concurrent_puts_share_passes(store, flush) -> None:
    flush.sleep = 0.002
    blocks = [os.urandom(4096) for _ in range(THREADS)]
    results = puts_held_together(store, flush, blocks)
    assert results == [None] * THREADS
    # alone, each put needs two passes; together they took fewer than one each
    assert len(flush.passes) < THREADS, len(flush.passes)
    assert store._syncer.passes == len(flush.passes)


def test_a_failed_pass_fails_every_waiter_and_the_next_pass_works(store, flush) -> None:
    flush.fail = {1}
    blocks = [os.urandom(4096) for _ in range(THREADS)]
    results = puts_held_together(store, flush, blocks)
    # every put was in flight when the pass failed: none may claim its block is durable
    assert all(isinstance(r, OSError) and r.errno == errno.EIO for r in results), results
    assert not list((store.path / "tmp").iterdir())  # no temp file left behind
    assert not any(store.has(block_id(b)) for b in blocks)  # no name made from unsynced bytes
    for b in blocks:  # the next passes work
        store.put(block_id(b), b)
        assert store.get(block_id(b)) == b


def test_a_pass_fails_callers_that_began_before_it_ended_not_later_ones(tmp_path, monkeypatch):
    """A writeback error seen by a pass may hit the bytes of a writer that had not joined it."""
    calls = []

    def flush(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 1:
            raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(syncer_mod, "syncfs", flush)
    s = Syncer(str(tmp_path))
    early = s.begin()  # wrote before the failing pass, joins only after it
    with pytest.raises(OSError) as e:
        s.sync(s.begin())
    assert e.value.errno == errno.EIO and str(tmp_path) in str(e.value)
    with pytest.raises(OSError):
        s.sync(early)
    s.sync(s.begin())  # began after the failure: unaffected
    assert len(calls) == 3


def test_an_interrupted_pass_is_not_taken_for_success(tmp_path, monkeypatch):
    class Interrupt(BaseException):
        pass

    def flush(fd: int) -> None:
        raise Interrupt

    monkeypatch.setattr(syncer_mod, "syncfs", flush)
    s = Syncer(str(tmp_path))
    ticket = s.begin()
    with pytest.raises(Interrupt):
        s.sync(ticket)
    monkeypatch.setattr(syncer_mod, "syncfs", lambda fd: None)
    with pytest.raises(OSError) as e:  # a writer that began before it cannot trust it
        s.sync(ticket)
    assert e.value.errno == errno.EIO
    s.sync(s.begin())


def test_delete_waits_for_a_pass(store, flush) -> None:
    data = os.urandom(100)
    store.put(block_id(data), data)
    before = len(flush.passes)
    assert store.delete(block_id(data))
    assert len(flush.passes) == before + 1 and block_id(data) not in flush.passes[-1].blocks
