"""A filesystem's home directory: where its metadata, default nodes and logs live.

Layout of HOME:

    meta.db        SQLite metadata (WAL), the ring and R live in it
    nodes/n1 ...   the default backing directories (mkfs without --node)
    hafs.log       the mount daemon's log
    mount.lock     held (flock, shared) by every mount daemon; fsck --repair takes it exclusively
    run/*.pid      pid and mountpoint of each mount daemon

`create` is `hafs mkfs`; `open_fs` checks everything a mount needs and
modifies nothing when it refuses.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from .blocks import DirStore
from .errors import UserError
from .meta import MetaStore, now_ns
from .ring import NodeSpec, Ring

DEFAULT_REPLICAS = 2
DEFAULT_NODES = 3


def default_home() -> Path:
    """$HAFS_HOME, else the per-user data directory ($XDG_DATA_HOME/hafs)."""
    if os.environ.get("HAFS_HOME"):
        return Path(os.environ["HAFS_HOME"]).expanduser()
    data = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(data) / "hafs"


def meta_path(home: Path) -> Path:
    return home / "meta.db"


def create(home: Path, replicas: int = DEFAULT_REPLICAS, nodes: list[str] | None = None) -> str:
    """Create a filesystem in `home`; returns its uuid.  Refuses to touch an existing one."""
    home = home.absolute()
    if meta_path(home).exists():
        raise UserError(f"{home} already holds a hafs filesystem: use it, or choose another --home")
    if "," in str(home):
        raise UserError(f"home directory {home} contains a comma, which mount options cannot carry")
    addresses = nodes or [str(home / "nodes" / f"n{i + 1}") for i in range(DEFAULT_NODES)]
    for a in addresses:
        if "://" in a:
            raise UserError(f"node {a}: remote block nodes are not supported yet; give a directory")
    addresses = [str(Path(a).expanduser().absolute()) for a in addresses]
    if len(set(addresses)) != len(addresses):
        raise UserError("the same backing directory is given twice: each node needs its own")
    if not 1 <= replicas <= len(addresses):
        raise UserError(
            f"--replicas {replicas} needs at least that many nodes (have {len(addresses)})"
        )
    fs_uuid = str(uuid.uuid4())
    specs = [NodeSpec(id=f"n{i + 1}", address=a) for i, a in enumerate(addresses)]
    # Check every node directory before creating anything.
    for spec in specs:
        p = Path(spec.address)
        if p.exists() and (not p.is_dir() or any(p.iterdir())):
            raise UserError(
                f"backing directory {p} for node {spec.id} is not empty: give an empty or new one"
            )
    home.mkdir(parents=True, exist_ok=True)
    for spec in specs:
        DirStore.create(spec.address, spec.id, fs_uuid)
    ring = Ring(specs, version=1)
    settings = {
        "fs_uuid": fs_uuid,
        "replicas": str(replicas),
        "ring": json.dumps(ring.to_json()),
        "created_ns": str(now_ns()),
    }
    MetaStore.create(meta_path(home), settings, os.getuid(), os.getgid()).close()
    return fs_uuid


@dataclass
class Filesystem:
    home: Path
    meta: MetaStore
    ring: Ring
    stores: dict[str, DirStore]
    replicas: int
    fs_uuid: str


def open_fs(home: Path) -> Filesystem:
    """Open the metadata and every backing directory, checking their identity."""
    home = home.absolute()
    if not meta_path(home).exists():
        raise UserError(f"no hafs filesystem in {home}: create one with 'hafs mkfs --home {home}'")
    meta = MetaStore.open(meta_path(home))
    try:
        fs_uuid = meta.setting("fs_uuid")
        ring = Ring.from_json(meta.ring_json())
        replicas = int(meta.setting("replicas"))
        stores = {
            spec.id: DirStore.open(spec.address, spec.id, fs_uuid) for spec in ring.nodes.values()
        }
    except BaseException:
        meta.close()
        raise
    return Filesystem(home, meta, ring, stores, replicas, fs_uuid)
