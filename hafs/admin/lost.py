"""`hafs node remove --lost ID`: drop a node that is gone for good, restore what it held.

A drained removal (`hafs node remove` + `hafs rebalance`) copies a node's blocks
off it before it leaves the ring; a node whose directory was deleted or whose
host is gone can give nothing, so its drain never ends and a mount refuses its
missing directory.  `--lost` instead:

1. refuses a node that still answers as itself (drain that one, so its copies
   are used) and a removal that would leave fewer than R nodes taking blocks;
2. takes the node out of the ring at once (the compare-and-set of every `hafs
   node` change: `nodes.change_ring`); mounts switch within RING_RELOAD_S and no
   longer ask it;
3. once every mount uses the new ring (RING_SETTLE_S after the change, as
   rebalance waits), walks every block a file references, page by page from the
   metadata, and brings it to a verified copy on each of the R nodes the new
   ring names through hafs.store.restore, the path the mount's repair, fsck and
   rebalance share: a copy of the recorded size counts as present, a missing one
   is copied from any other node that has a good copy and read back there;
4. names every path that uses a block with no good copy left on any node (lost
   data: the files are kept; reads of the lost ranges fail with EIO, and `hafs
   fsck` goes on reporting them).

A copy of a home is refused, and so are nodes that another metadata store owns
(hafs.store.owner), before anything changes.  Blocks no file references are
left alone (garbage: the mounts and fsck reclaim it).  Nothing is deleted but
an unreadable copy on a named node that a good one replaces.  Safe while
mounted: it holds a "rebalance" session (no `fsck --repair` and no rebalance
meanwhile), and a block a mount commits after the walk passed it was written
under the new ring, without the lost node.

Concurrency: the restores run in a thread pool with a bounded number in flight;
the metadata (one connection: the calling thread's), the report and the
progress line stay on the calling thread.

Exit codes: 0 every referenced block has R verified copies again; 1 some files
lost data (named) or some blocks are still short of copies because another
node failed (`hafs rebalance` finishes them once it answers); 2 bad input.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .. import home as home_mod
from ..errors import UserError
from ..meta import BlockRow, MetaStore
from ..store.dirstore import BLOCK_ID_RE
from ..store.placement import NodeHealth
from ..store.remote import RemoteStore
from ..store.restore import RestoreResult, restore
from ..store.ring import RING_SETTLE_S, Ring
from . import tool_session
from .fsck import Progress, lost_data, pages
from .nodes import change_ring, check_takers, known_node
from .rebalance import STRIKES, Store, open_stores, settle

log = logging.getLogger(__name__)

DEFAULT_THREADS = 8  # blocks restored at once
IN_FLIGHT = 4  # restores queued per thread
MAX_DETAILS = 100  # error lines kept (counts are exact)
MAX_PATHS = 100  # paths named per lost block (hard links, dedup)
PROBE_TIMEOUT_S = 5.0  # how long the lost node is given to answer as itself


@dataclass
class Report:
    """What the removal found and did; `exit_code` sums it up."""

    home: str
    node_id: str
    replicas: int = 0
    ring_version: int = 0
    blocks: int = 0  # referenced blocks checked
    copied: int = 0  # copies made on named nodes
    bytes_copied: int = 0
    corrupt: int = 0  # corrupt copies met (moved aside by their store)
    short: int = 0  # blocks left with fewer than R verified copies (another node failing)
    lost: int = 0  # blocks with no good copy on any node left
    lost_paths: set[str] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)
    unavailable: dict[str, str] = field(default_factory=dict)  # other nodes that failed
    waited_s: float = 0.0
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        return 1 if self.lost or self.short else 0

    def note(self, detail: str) -> None:
        if len(self.errors) < MAX_DETAILS:
            self.errors.append(detail)

    def to_json(self) -> dict:
        return {
            "home": self.home,
            "node": self.node_id,
            "replicas": self.replicas,
            "ring_version": self.ring_version,
            "blocks": self.blocks,
            "copied": self.copied,
            "bytes_copied": self.bytes_copied,
            "corrupt": self.corrupt,
            "short": self.short,
            "lost": self.lost,
            "lost_paths": sorted(self.lost_paths),
            "unavailable": self.unavailable,
            "errors": self.errors,
            "waited_s": round(self.waited_s, 3),
            "seconds": round(self.seconds, 3),
            "exit_code": self.exit_code,
        }

    def render(self) -> str:
        mib = 2**20
        out = [
            f"hafs node remove --lost {self.node_id}: {self.home}: the node left the ring"
            f" (ring version {self.ring_version}), R={self.replicas}",
            f"checked {self.blocks:,} blocks that files use: made {self.copied:,} copies"
            f" ({self.bytes_copied / mib:,.1f} MiB) from the other replicas in"
            f" {self.seconds - self.waited_s:.1f} s",
        ]
        for node_id, why in self.unavailable.items():
            out.append(f"node {node_id} is unavailable: {why}")
        if self.corrupt:
            out.append(f"{self.corrupt:,} corrupt copies were found and moved aside")
        if self.short:
            out.append(
                f"FAILED: {self.short:,} blocks are still short of {self.replicas} copies;"
                " run 'hafs rebalance' once the nodes named here answer:"
            )
            out.extend(f"  {e}" for e in self.errors[:20])
        if self.lost:
            out.extend(lost_data(self.lost, self.lost_paths))
        if not self.exit_code:
            out.append(f"every block that files use has {self.replicas} verified copies again")
        return "\n".join(out)


def remove_lost(
    home: Path,
    node_id: str,
    *,
    progress: Progress | None = None,
    threads: int = DEFAULT_THREADS,
    settle_s: float = RING_SETTLE_S,
) -> Report:
    """Drop node `node_id` from the ring and restore what it held (module docstring)."""
    home = Path(home).absolute()
    report = Report(str(home), node_id)
    progress = progress or Progress(enabled=False)
    t0 = time.monotonic()
    meta = home_mod.open_meta(home)
    session = contextlib.ExitStack()
    stores: dict[str, Store | None] = {}
    try:
        owner = home_mod.owner_claim(meta, home)  # refuses a copy of a home
        config = meta.config()
        auth = home_mod.node_auth(meta)
        report.replicas = config.replicas
        before = Ring.from_json(meta.ring())
        spec = known_node(before, node_id)
        try:
            home_mod.check_node(spec, config.fs_uuid, auth, PROBE_TIMEOUT_S)
        except UserError as e:
            why = str(e)
        else:
            raise UserError(
                f"node {node_id} still answers at {spec.address}: drain it instead ('hafs node"
                f" remove {node_id}', then 'hafs rebalance'), so that its copies are used;"
                " --lost is for a node that is gone for good"
            )
        # The others, opened (and taken for this store) before anything changes: nodes of
        # another metadata store refuse the whole removal (NodeOwnedElsewhere).
        others = [s for s in before.nodes.values() if s.id != node_id]
        stores, report.unavailable = open_stores(others, config.fs_uuid, auth, owner)
        session.enter_context(tool_session(meta, "rebalance"))

        def drop(current: Ring) -> list:
            known_node(current, node_id)
            specs = [s for s in current.nodes.values() if s.id != node_id]
            check_takers(specs, config.replicas, f"removing node {node_id}")
            return specs

        ring = change_ring(meta, drop)[0]
        report.ring_version = ring.version
        log.warning("NODE-LOST %s removed (%s): ring version %d", node_id, why, ring.version)
        report.waited_s = settle(meta, ring.version, settle_s, progress)
        Restorer(meta, ring, stores, report, progress, threads).run()
        log.info(
            "NODE-LOST %s: %d blocks checked, %d copies made, %d short, %d lost",
            node_id,
            report.blocks,
            report.copied,
            report.short,
            report.lost,
        )
    finally:
        progress.close()
        for store in stores.values():
            if isinstance(store, RemoteStore):
                store.close()
        session.close()
        meta.close()
        report.seconds = time.monotonic() - t0
    return report


class Restorer:
    """Every referenced block back to R verified copies on the nodes `ring` names."""

    def __init__(
        self,
        meta: MetaStore,
        ring: Ring,
        stores: dict[str, Store | None],
        report: Report,
        progress: Progress,
        threads: int,
    ) -> None:
        """stores: of the nodes of `ring` (rebalance.open_stores; None: unavailable)."""
        self.meta = meta
        self.ring = ring
        self.stores = stores
        self.report = report
        self.progress = progress
        self.threads = threads
        self.replicas = meta.config().replicas
        self.health = NodeHealth(STRIKES)  # a node down stays down for the rest of the run

    def run(self) -> None:
        self.progress.start("restoring blocks", self.meta.usage().blocks or None)
        pending: deque[tuple[BlockRow, Future]] = deque()
        with ThreadPoolExecutor(self.threads, thread_name_prefix="lost") as pool:
            for rows in pages(self.meta.scan_blocks, "", lambda b: b.id):
                for row in rows:
                    if row.refcount <= 0 or not BLOCK_ID_RE.fullmatch(row.id):
                        continue  # garbage, or a malformed row (fsck's business)
                    pending.append((row, pool.submit(self._restore, row)))
                    while len(pending) > self.threads * IN_FLIGHT:
                        self._collect(*pending.popleft())
            while pending:
                self._collect(*pending.popleft())

    def _restore(self, row: BlockRow) -> RestoreResult:
        """(worker thread) A verified copy on each named node, from any node that has one."""
        bid = row.id
        named = self.ring.replicas(bid, self.replicas)
        return restore(
            bid, self.stores, named, list(self.ring.walk(bid)), size=row.size, health=self.health
        )

    def _collect(self, row: BlockRow, future: Future) -> None:
        done: RestoreResult = future.result()
        r = self.report
        r.blocks += 1
        r.copied += len(done.written)
        r.bytes_copied += len(done.written) * (done.size or row.size)
        r.corrupt += len(done.corrupt)
        if not done.found:
            users = self.meta.block_users(row.id, MAX_PATHS)
            if users:  # else a mount dropped its last user meanwhile: not lost, garbage
                paths = [self.meta.path_of(ino) for ino in users]
                r.lost += 1
                r.lost_paths.update(paths)
                log.error(
                    "BLOCK-LOST %s: no copy on any node left (%s); used by %s",
                    row.id,
                    "; ".join(done.problems) or "missing everywhere",
                    ", ".join(paths),
                )
        elif done.failed:
            r.short += 1
            why = "; ".join(f"{n}: {w}" for n, w in done.failed.items())
            r.note(f"block {row.id}: {why}")
            log.error("BLOCK-SHORT %s: %s", row.id, why)
        self.progress.phase = (
            f"restoring blocks: {r.copied:,} copies made ({r.bytes_copied / 2**20:,.1f} MiB),"
            f" {r.lost:,} lost; checked"
        )
        self.progress.advance()
