"""`hafs status`: nodes, replicas, logical vs stored bytes."""

from __future__ import annotations

import time
from pathlib import Path

from . import home as home_mod
from .blocks import DirStore
from .errors import HafsError
from .meta import MetaStore
from .ring import Ring


def gather(home: Path) -> dict:
    if not home_mod.meta_path(home).exists():
        from .errors import UserError

        raise UserError(f"no hafs filesystem in {home}: create one with 'hafs mkfs --home {home}'")
    meta = MetaStore.open(home_mod.meta_path(home))
    try:
        fs_uuid = meta.setting("fs_uuid")
        ring = Ring.from_json(meta.ring_json())
        replicas = int(meta.setting("replicas"))
        logical, stored, count = meta.usage()
        files = meta.count_inodes()
        now = time.time_ns()
        locks = [
            {
                "name": name,
                "path": meta.path_of(int(name.split(":")[1])),
                "holder": holder,
                "token": token,
                "age_s": round((now - acquired) / 1e9, 1),
                "expires_in_s": round((expires - now) / 1e9, 1),
            }
            for name, holder, token, acquired, expires in meta.db.execute(
                "SELECT name, holder, token, acquired_ns, expires_ns FROM locks"
                " WHERE holder IS NOT NULL AND expires_ns > ? ORDER BY name",
                (now,),
            )
        ]
    finally:
        meta.close()
    nodes = []
    for spec in ring.nodes.values():
        node = {
            "id": spec.id,
            "address": spec.address,
            "weight": spec.weight,
            "zone": spec.zone,
            "up": True,
            "error": None,
        }
        try:
            usage = DirStore.open(spec.address, spec.id, fs_uuid).usage()
            node.update(
                blocks=usage.block_count,
                bytes=usage.block_bytes,
                free_bytes=usage.free_bytes,
                total_bytes=usage.total_bytes,
            )
        except (HafsError, OSError) as e:
            node.update(up=False, error=str(e), blocks=None, bytes=None)
        nodes.append(node)
    return {
        "home": str(home),
        "fs_uuid": fs_uuid,
        "replicas": replicas,
        "ring_version": ring.version,
        "inodes": files,
        "logical_bytes": logical,
        "stored_bytes": stored,
        "unique_blocks": count,
        "dedup_ratio": round(logical / stored, 3) if stored else None,
        "nodes": nodes,
        "locks": locks,
    }


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def render(r: dict) -> str:
    lines = [
        f"filesystem {r['fs_uuid']} in {r['home']}",
        f"replicas: {r['replicas']}   ring version: {r['ring_version']}   inodes: {r['inodes']}",
        f"logical: {_size(r['logical_bytes'])}   stored once: {_size(r['stored_bytes'])}"
        f" in {r['unique_blocks']} blocks   dedup ratio: {r['dedup_ratio'] or '-'}",
        "",
        f"{'node':<6} {'state':<6} {'weight':>6} {'blocks':>8} {'bytes':>10}  address",
    ]
    for n in r["nodes"]:
        state = "up" if n["up"] else "DOWN"
        blocks = "-" if n["blocks"] is None else n["blocks"]
        lines.append(
            f"{n['id']:<6} {state:<6} {n['weight']:>6g} {blocks:>8}"
            f" {_size(n['bytes']):>10}  {n['address']}"
        )
        if n["error"]:
            lines.append(f"       {n['error']}")
    lines += ["", f"write locks held: {len(r['locks'])}"]
    for lk in r["locks"]:
        lines.append(
            f"  {lk['path']}  holder {lk['holder']}  token {lk['token']}  age {lk['age_s']} s"
            f"  (lease ends in {lk['expires_in_s']} s)"
        )
    return "\n".join(lines)
