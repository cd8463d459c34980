"""A cluster-mode filesystem for mount tests: metadata in a real 3-member etcd, blocks on
three real `hafs node`s, and two mounts with separate local state directories standing for
two client hosts.

`cluster_fs(base, options, allowed)` makes it (mkfs from an admin state directory `base /
"admin"`), mounts A and B with `options`, and on the way out unmounts them, stops the nodes
and the members by PID, and fails on a line of a mount's log that a healthy run never
writes (BAD_LOG in conftest) unless it holds one of `allowed`.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from conftest import Mount, hafs
from etcdproc import Cluster, require_etcd, running_cluster
from nodeproc import start_node


@dataclass
class ClusterFs:
    etcd: Cluster
    url: str
    mounts: list[Mount]  # A and B
    admin: Path  # the state directory the admin commands use

    def status(self) -> dict:
        return json.loads(hafs("status", "--meta", self.url, "--home", self.admin, "--json").stdout)

    def mounted(self) -> list[str]:
        return sorted(m["mountpoint"] for m in self.status()["mounts"])


@contextlib.contextmanager
def cluster_fs(base: Path, options: str, allowed: tuple[str, ...] = ()) -> Iterator[ClusterFs]:
    require_etcd()
    with running_cluster(base / "etcd") as etcd:
        nodes = [start_node(base / f"d{i}", init=None) for i in range(3)]
        try:
            url = etcd.url("prod")
            args = ["mkfs", "--meta", url, "--home", base / "admin", "--replicas", "2"]
            for n in nodes:
                args += ["--node", n.url]
            hafs(*args)
            mounts = []
            try:
                for host in ("a", "b"):
                    (base / host / "mnt").mkdir(parents=True)
                    m = Mount(base / host / "state", base / host / "mnt", options)
                    hafs("mount", "--meta", url, "--home", m.home, "-o", options, m.mnt)
                    mounts.append(m)
                yield ClusterFs(etcd, url, mounts, base / "admin")
            finally:
                for m in mounts:
                    m.stop()
            for m in mounts:
                bad = m.bad_log_lines(allowed=allowed)
                assert not bad, "\n".join(bad[:20])
        finally:
            for n in nodes:
                n.stop()


def log_allows(request) -> tuple[str, ...]:
    """The texts a test's `log_allows` marker allows in the mounts' logs."""
    marker = request.node.get_closest_marker("log_allows")
    return marker.args if marker else ()
