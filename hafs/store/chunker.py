"""Content-defined chunking: where a file's bytes are cut into blocks.

hafs uses FastCDC 2020 (the `pyfastcdc` package, a compiled Cython
implementation) with its default gear table (seed 0), so cut points are a pure
function of the bytes and of the three sizes below:

- MIN_SIZE 256 KiB: no cut before this many bytes (FastCDC skips them).
- AVG_SIZE about 1 MiB: FastCDC's `avg_size` parameter is the expected size of
  the part after MIN_SIZE, so 768 KiB + 256 KiB gives a 1 MiB mean block.
- MAX_SIZE 4 MiB: a forced cut; also the largest block a store accepts.

A chunker instance is not thread-safe (pyfastcdc says so), so `cut_points`
builds one per call; that costs a few microseconds.  Chunking runs at about
2.4 GB/s on this machine; callers run it in worker threads for large buffers.
"""

from __future__ import annotations

import pyfastcdc

KiB = 1024
MiB = 1024 * KiB

MIN_SIZE = 256 * KiB
AVG_SIZE = 1 * MiB
MAX_SIZE = 4 * MiB
_FASTCDC_AVG = AVG_SIZE - MIN_SIZE  # FastCDC's avg excludes the skipped minimum


def cut_points(buf: bytes | bytearray | memoryview) -> list[int]:
    """Return the end offsets of the blocks `buf` is cut into (the last is len(buf)).

    Every block is at most MAX_SIZE and, except possibly the last, at least MIN_SIZE.
    An empty buffer gives an empty list.
    """
    if not len(buf):
        return []
    cdc = pyfastcdc.FastCDC(_FASTCDC_AVG, min_size=MIN_SIZE, max_size=MAX_SIZE)
    return [c.offset + c.length for c in cdc.cut_buf(buf)]
