"""DirtyBuffer against a plain bytearray model, with random operations."""

import random

import pytest

from hafs.fs import dirty
from hafs.fs.dirty import DirtyBuffer


def _model_check(buf: DirtyBuffer, model: dict[int, int]) -> None:
    segs = buf.segments()
    covered = {}
    for s, e in segs:
        for off, data in buf.overlapping(s, e):
            for i, b in enumerate(data):
                covered[off + i] = b
    assert covered == model
    assert buf.nbytes == len(model)
    for (_, e1), (s2, _) in zip(segs, segs[1:]):
        assert e1 < s2, "runs must be sorted, disjoint and not adjacent"
    ends = [s + len(b) for s, b in zip(buf._starts, buf._bufs)]
    assert all(e1 <= s2 for e1, s2 in zip(ends, buf._starts[1:])), "segments overlap"


@pytest.mark.parametrize("segment_bytes", [dirty.SEGMENT_BYTES, 8], ids=["default", "pieces"])
def test_random_operations_match_a_model(monkeypatch, segment_bytes):
    monkeypatch.setattr(dirty, "SEGMENT_BYTES", segment_bytes)
    rnd = random.Random(7)
    for _ in range(200):
        buf, model = DirtyBuffer(), {}
        for _ in range(30):
            op = rnd.random()
            off = rnd.randrange(200)
            n = rnd.randrange(1, 40)
            if op < 0.5:
                data = rnd.randbytes(n)
                buf.write(off, data)
                model.update({off + i: b for i, b in enumerate(data)})
            elif op < 0.65:
                data = rnd.randbytes(n)
                buf.fill_gaps(off, data)
                for i, b in enumerate(data):
                    model.setdefault(off + i, b)
            elif op < 0.8:
                pieces = buf.take(off, off + n)
                taken = {o + i: b for o, d in pieces for i, b in enumerate(d)}
                assert taken == {k: v for k, v in model.items() if off <= k < off + n}
                model = {k: v for k, v in model.items() if not off <= k < off + n}
            else:
                buf.truncate_range(off)
                model = {k: v for k, v in model.items() if k < off}
            _model_check(buf, model)


def test_append_extends_one_segment():
    buf = DirtyBuffer()
    for i in range(100):
        assert buf.write(i * 10, b"x" * 10) == 10
    assert buf.segments() == [(0, 1000)]
    assert buf.end() == 1000


def test_a_stream_keeps_each_write_past_segment_bytes_without_a_copy(monkeypatch):
    monkeypatch.setattr(dirty, "SEGMENT_BYTES", 100)
    buf = DirtyBuffer()
    writes = [bytes([i]) * 100 for i in range(4)]
    for i, data in enumerate(writes):
        buf.write(i * 100, data)
    assert buf.segments() == [(0, 400)]
    assert buf._bufs[1] is writes[1] and buf._bufs[-1] is writes[-1]
    buf.write(190, b"z" * 20)  # across two pieces: the bytes written, nothing else changed
    want = b"".join(writes)
    want = want[:190] + b"z" * 20 + want[210:]
    pieces = buf.take(0, 400)
    assert b"".join(d for _, d in pieces) == want and not buf
