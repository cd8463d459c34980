"""DirtyBuffer against a plain bytearray model, with random operations."""

import random

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
        assert e1 < s2, "segments must be sorted, disjoint and not adjacent"


def test_random_operations_match_a_model():
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
