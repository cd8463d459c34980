"""`hafs meta dump` and `hafs meta load`: a filesystem's whole metadata as JSON lines.

The metadata backup, and the way to move a filesystem between engines (embedded
SQLite and etcd, either way).  `write_dump` writes what `MetaStore.dump` reads
(one state of the metadata, page by page); `read_dump` parses a dump line by
line for `home.load`, which makes a new filesystem of it in an empty engine.
Both stream: memory stays bounded whatever the filesystem's size.

Format (FORMAT 1): UTF-8, one JSON object per line.  The first line:

    {"hafs_dump": 1, "hafs_version": "0.1.0", "source": {"engine": E, "location": L},
     "dumped_ns": N, "config": {"fs_uuid", "replicas", "write_quorum", "node_token",
     "created_ns", "ca_pem"}, "ring": {"version": N, "nodes": [...]}, "ring_changed_ns": N,
     "next_ino": N, "owner": {"token": T or null, "previous": [T, ...]}}

then one line per record (bytes, such as names, xattrs and symlink targets, in base64):

    {"type": "inode", "id", "mode", "uid", "gid", "nlink", "size", "atime_ns",
     "mtime_ns", "ctime_ns", "rdev", "target": base64 or null}
    {"type": "entry", "parent", "name", "inode"}          (one per name: hard links)
    {"type": "xattr", "inode", "name", "value"}
    {"type": "extent", "inode", "offset", "length", "block"}
    {"type": "block", "id", "size", "refcount", "zero_since_ns": N or null}
    {"type": "degraded", "block", "nodes": [ids], "since_ns"}

and last {"type": "end", "records": N}: a dump without it was cut off, and is
refused.  Blocks with refcount 0 are the garbage list; next_ino keeps inode
numbers from ever being reused.  Not in a dump: write locks, sessions and fencing
tokens (live state, which starts again in the loaded engine), and what an engine
derives from the records (indexes, counters).  The config holds the nodes' token:
a dump is as secret as the token file.  "owner" is the owner token the nodes record
for the store dumped (hafs.store.owner; absent in a dump of an older hafs): the
loaded store gets a new one and keeps this one among its previous tokens, so the
nodes it takes at the load, and those it meets later, refuse the old store's
deletes (`home.load`).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any

from .. import __version__
from .. import home as home_mod
from ..errors import HafsError, UserError
from ..meta import (
    BlockRow,
    Degraded,
    Entry,
    Extent,
    FileExtent,
    FsConfig,
    FsState,
    Inode,
    MetaStore,
    Record,
    Xattr,
    now_ns,
)

FORMAT = 1
KINDS = ("inode", "entry", "xattr", "extent", "block", "degraded")


class DumpError(HafsError):
    """A dump could not be read from the metadata (damaged storage, an engine failure)."""


# ------------------------------------------------------------------ encoding


def _b64(b: bytes | None) -> str | None:
    return None if b is None else base64.b64encode(b).decode()


def encode(rec: Record) -> dict:
    """The JSON object of one record (the module docstring)."""
    if isinstance(rec, Inode):
        return {"type": "inode", **asdict(rec), "target": _b64(rec.target)}
    if isinstance(rec, Entry):
        return {"type": "entry", "parent": rec.parent, "name": _b64(rec.name), "inode": rec.inode}
    if isinstance(rec, Xattr):
        return {
            "type": "xattr",
            "inode": rec.inode,
            "name": _b64(rec.name),
            "value": _b64(rec.value),
        }
    if isinstance(rec, FileExtent):
        e = rec.extent
        return {
            "type": "extent",
            "inode": rec.inode,
            "offset": e.offset,
            "length": e.length,
            "block": e.block_id,
        }
    if isinstance(rec, BlockRow):
        return {"type": "block", **asdict(rec)}
    if isinstance(rec, Degraded):
        return {
            "type": "degraded",
            "block": rec.block_id,
            "nodes": list(rec.nodes),
            "since_ns": rec.since_ns,
        }
    raise TypeError(f"not a dump record: {rec!r}")


def header(state: FsState, source: dict) -> dict:
    return {
        "hafs_dump": FORMAT,
        "hafs_version": __version__,
        "source": {"engine": source.get("engine"), "location": source.get("location")},
        "dumped_ns": now_ns(),
        "config": asdict(state.config),
        "ring": state.ring,
        "ring_changed_ns": state.ring_changed_ns,
        "next_ino": state.next_ino,
        "owner": {"token": state.owner, "previous": list(state.owner_previous)},
    }


def _line(obj: dict) -> bytes:
    return (json.dumps(obj, separators=(",", ":")) + "\n").encode()


def write_dump(meta: MetaStore, out: IO[bytes]) -> Counter:
    """Write the whole metadata of `meta` to `out`; returns the records written per kind."""
    counts: Counter = Counter({k: 0 for k in KINDS})
    with meta.dump() as (state, records):
        out.write(_line(header(state, meta.describe())))
        for rec in records:
            obj = encode(rec)
            counts[obj["type"]] += 1
            out.write(_line(obj))
    out.write(_line({"type": "end", "records": sum(counts.values())}))
    out.flush()
    return counts


# ------------------------------------------------------------------ decoding

# Field kinds: what a JSON value must be, and what it becomes.
_INT, _OPT_INT, _STR, _BYTES, _OPT_BYTES, _STRS = "int", "int?", "str", "b64", "b64?", "strs"

_RECORDS: dict[str, tuple[tuple[tuple[str, str], ...], Callable[..., Record]]] = {
    "inode": (
        tuple((f, _INT) for f in ("id", "mode", "uid", "gid", "nlink", "size", "atime_ns",
                                  "mtime_ns", "ctime_ns", "rdev")) + (("target", _OPT_BYTES),),
        Inode,
    ),
    "entry": ((("parent", _INT), ("name", _BYTES), ("inode", _INT)), Entry),
    "xattr": ((("inode", _INT), ("name", _BYTES), ("value", _BYTES)), Xattr),
    "extent": (
        (("inode", _INT), ("offset", _INT), ("length", _INT), ("block", _STR)),
        lambda ino, off, length, block: FileExtent(ino, Extent(off, length, block)),
    ),
    "block": (
        (("id", _STR), ("size", _INT), ("refcount", _INT), ("zero_since_ns", _OPT_INT)),
        BlockRow,
    ),
    "degraded": (
        (("block", _STR), ("nodes", _STRS), ("since_ns", _INT)),
        lambda block, nodes, since: Degraded(block, tuple(nodes), since),
    ),
}  # fmt: skip


def _value(obj: dict, field: str, kind: str) -> Any:
    """obj[field] as `kind` says (ValueError naming the field if it is not that)."""
    if field not in obj:
        raise ValueError(f"no {field!r}")
    v = obj[field]
    if v is None and kind in (_OPT_INT, _OPT_BYTES):
        return None
    if kind in (_INT, _OPT_INT):
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    elif kind == _STR:
        if isinstance(v, str):
            return v
    elif kind == _STRS:
        if isinstance(v, list) and all(isinstance(x, str) for x in v):
            return v
    elif isinstance(v, str):  # base64
        try:
            return base64.b64decode(v, validate=True)
        except binascii.Error:
            pass
    raise ValueError(f"{field!r} is not {_WHAT[kind]}: {v!r}")


_WHAT = {_INT: "an integer", _OPT_INT: "an integer or null", _STR: "a string",
         _BYTES: "base64", _OPT_BYTES: "base64 or null", _STRS: "a list of strings"}  # fmt: skip


def _parse(raw: bytes, where: str) -> dict:
    try:
        obj = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{where}: not a line of a hafs metadata dump ({e})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{where}: not a line of a hafs metadata dump (a JSON object)")
    return obj


def _state(obj: dict, where: str) -> FsState:
    """The FsState of a dump's first line."""
    version = obj.get("hafs_dump")
    if not isinstance(version, int):
        raise UserError(
            f"{where}: not a hafs metadata dump (its first line has no \"hafs_dump\" format):"
            " give what 'hafs meta dump' wrote"
        )
    if version > FORMAT:
        raise UserError(
            f"{where}: the dump has format {version} (hafs {obj.get('hafs_version')}), newer"
            f" than this hafs reads ({FORMAT}): upgrade hafs"
        )
    try:
        c = obj["config"]
        config = FsConfig(
            fs_uuid=_value(c, "fs_uuid", _STR),
            replicas=_value(c, "replicas", _INT),
            write_quorum=_value(c, "write_quorum", _INT),
            node_token=c["node_token"] if isinstance(c.get("node_token"), str) else None,
            created_ns=_value(c, "created_ns", _INT),
            ca_pem=c["ca_pem"] if isinstance(c.get("ca_pem"), str) else None,
        )
        ring = obj["ring"]
        if not isinstance(ring, dict) or not isinstance(ring.get("nodes"), list):
            raise ValueError("'ring' is not a ring ({\"version\": N, \"nodes\": [...]})")
        _value(ring, "version", _INT)
        owner = obj.get("owner") or {"token": None, "previous": []}  # absent: an older dump
        state = FsState(
            config,
            ring,
            _value(obj, "ring_changed_ns", _INT),
            _value(obj, "next_ino", _INT),
            None if owner["token"] is None else _value(owner, "token", _STR),
            tuple(_value(owner, "previous", _STRS)),
        )
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise UserError(f"{where}: a bad header ({e}): not a dump 'hafs meta dump' wrote") from None
    if state.next_ino < 2:
        raise UserError(f"{where}: a bad header (next_ino {state.next_ino})")
    return state


def _records(lines: Iterator[tuple[int, bytes]], name: str) -> Iterator[Record]:
    n, lineno = 0, 1
    for lineno, raw in lines:
        where = f"{name} line {lineno}"
        obj = _parse(raw, where)
        kind = obj.get("type")
        if kind == "end":
            if obj.get("records") != n:
                raise UserError(
                    f"{where}: the dump says it holds {obj.get('records')!r} records, but {n}"
                    " came before: it is damaged; nothing was loaded"
                )
            for lineno, raw in lines:
                if raw.strip():
                    raise UserError(f"{name} line {lineno}: more after the end of the dump")
            return
        if kind not in _RECORDS:
            raise UserError(f"{where}: unknown record type {kind!r}")
        fields, make = _RECORDS[kind]
        try:
            rec = make(*(_value(obj, f, k) for f, k in fields))
        except ValueError as e:
            raise UserError(f"{where}: a bad {kind} record: {e}") from None
        n += 1
        yield rec
    raise UserError(
        f"{name} ends after line {lineno} without the dump's end line: it is incomplete (was"
        " the dump cut off?); nothing was loaded"
    )


def read_dump(stream: Iterable[bytes], name: str) -> tuple[FsState, Iterator[Record]]:
    """The state from a dump's first line, and an iterator of its records that reads the
    rest as it goes (UserError, naming the line, for anything that is not a whole dump)."""
    lines = ((i, raw) for i, raw in enumerate(stream, 1) if raw.strip())
    first = next(lines, None)
    if first is None:
        raise UserError(
            f"{name} is empty: give what 'hafs meta dump' wrote (hafs meta load < fs.json)"
        )
    state = _state(_parse(first[1], f"{name} line {first[0]}"), f"{name} line {first[0]}")
    return state, _records(lines, name)


# ------------------------------------------------------------ the commands


def summary(counts: Counter) -> str:
    plural = {"inode": "inodes", "entry": "entries", "xattr": "xattrs", "extent": "extents",
              "block": "blocks", "degraded": "degraded records"}  # fmt: skip
    return ", ".join(f"{counts[k]:,} {plural[k]}" for k in KINDS)


def run_dump(home: Path, out: IO[bytes]) -> str:
    """`hafs meta dump`: the metadata of `home` to `out`; returns the summary line."""
    meta = home_mod.open_meta(home, read_only=True)
    try:
        where = meta.describe()["location"]
        try:
            counts = write_dump(meta, out)
        except Exception as e:
            why = meta.damaged(e)
            if why is None:
                raise
            raise DumpError(f"{why}: {meta.describe()['recover']}") from None
        token = meta.config().node_token is not None
    finally:
        meta.close()
    note = "; it holds the nodes' token: keep it private" if token else ""
    return f"dumped {sum(counts.values()):,} records of {where} ({summary(counts)}){note}"


def run_load(home: Path, stream: Iterable[bytes], name: str = "the dump") -> str:
    """`hafs meta load`: a new filesystem in `home` from the dump in `stream`."""
    state, records = read_dump(stream, name)
    counts: Counter = Counter({k: 0 for k in KINDS})

    def counted() -> Iterator[Record]:
        for rec in records:
            counts[_KIND_OF[type(rec)]] += 1
            yield rec

    where, failed = home_mod.load(home, state, counted())
    lines = [f"loaded {sum(counts.values()):,} records into {where} ({summary(counts)})"]
    lines += [
        f"node {node_id} was not taken (it will be once this filesystem opens it, else run"
        f" 'hafs node adopt' once it answers): {why}"
        for node_id, why in failed.items()
    ]
    return "\n".join(lines)


_KIND_OF = {Inode: "inode", Entry: "entry", Xattr: "xattr", FileExtent: "extent",
            BlockRow: "block", Degraded: "degraded"}  # fmt: skip
