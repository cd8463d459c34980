"""`hafs rebalance`: put every block copy where the current ring says, never losing one.

After `hafs node add|remove|set` the ring has a new version, and some copies sit
on nodes the ring no longer names for their block ("misplaced").  Rebalance
moves each of them:

1. make sure every node the ring names holds a verified copy: each named
   node's copy is read and hashed; one that lacks it (or whose copy is
   corrupt) gets the bytes of a good copy (from a named node, else a misplaced
   one; `put`: temp file, fsync, rename) and is then read back and hashed;
2. only then delete the misplaced copies.

Both steps are hafs.store.restore, the path the mount's background repair and
`hafs fsck --repair` take too; node health is a placement `NodeHealth` (a node
down stays down for the rest of the run).

So at every instant a block has at least as many good copies as before its
move began (the old copy goes only after a verified new one exists), and a
kill -9 at any point leaves the block on its old homes, on both, or on its new
ones: a rerun finds whatever is still misplaced and finishes it, and nothing is
left twice.  A copy missing on a named node with no misplaced copy anywhere (a
write made while a node was down) is restored the same way (DESIGN invariant
4: "back to R copies once fsck or rebalance runs").  Extra copies are kept
when the ring names fewer than R nodes.

Which blocks: every copy found on the nodes, referenced or not.  Copy-then-
delete never lowers a block's copy count, so moving a young unreferenced block
that a writer is about to commit is safe (it is on its named nodes when the
commit lands), and a draining node must be emptied of garbage too before it can
leave the ring.  The one cost: a block a mount's garbage collector deletes in
the instant rebalance copies it may come back as a copy nothing references,
which fsck reclaims after its grace period.

Listing: every node's block ids are read page by page (sorted, `iter_ids`) and
merged, so each block is seen once with the set of nodes holding it, and
memory holds one page per node, never every id.  The moves run in a thread
pool with a bounded number in flight; the merge, the report and the metadata
stay on the calling thread.

Mounted filesystems: mounts reload the ring within RING_RELOAD_S of a change;
rebalance starts moving only RING_SETTLE_S after the ring's last change, so
every mount already writes new blocks to their new homes when the listing
starts (a put begun on the old ring that outlasts the wait may leave a copy
misplaced: never lost, and the next run moves it).  Reads find a block on its
old or new home meanwhile (they walk every node).  If the ring changes during
a run, another pass follows under the new version.

Draining nodes: one that is empty after the pass leaves the ring (a new
version); after RING_SETTLE_S it is listed once more and anything a mount
wrote there meanwhile (a fallback write while a named node failed) is moved
too.  A draining node that cannot be listed (down) stays in the ring.

Ownership: a rebalance deletes copies, so it takes the nodes for its metadata
store first (`home.owner_claim`): a copy of a home, or nodes another store
owns, are refused with a message before anything is moved (hafs.store.owner).

Exclusion: a rebalance registers a "rebalance" session in the metadata, which
keeps two rebalances apart and `hafs fsck --repair` from running beside one
(see `hafs.meta.session_conflict`).  A dry run registers nothing and changes
nothing.

Left behind by a kill -9: at most the temp file of a copy cut short on its new
node (tmp/, never read as a block), removed by `hafs fsck --repair`.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import HafsError, NodeOwnedElsewhere, UserError
from ..home import holds_fs, node_auth, open_meta, open_store, owner_claim
from ..meta import MetaStore
from ..store.dirstore import DirStore
from ..store.owner import OwnerClaim
from ..store.placement import NodeHealth
from ..store.remote import NodeAuth, RemoteStore
from ..store.restore import drop_extra, restore
from ..store.ring import RING_SETTLE_S, NodeSpec, Ring
from . import tool_session
from .fsck import Progress, Throttle
from .nodes import change_ring

log = logging.getLogger(__name__)

PAGE = 1000  # ids per node listing
DEFAULT_THREADS = 8  # blocks moved at once
IN_FLIGHT = 4  # moves queued per thread
MAX_PASSES = 4  # passes while the ring keeps changing under us
MAX_DETAILS = 100  # error lines kept (counts are exact)
STRIKES = 3  # failures in a row that make a node down for the rest of the run
NODE_TIMEOUT_S = 10.0

Store = DirStore | RemoteStore


class RingUnusable(HafsError):
    """The ring description in the metadata cannot be parsed or built."""


# -------------------------------------------------------------------- report


@dataclass
class Report:
    """The plan (what the listing found) and what was done; `exit_code` sums it up."""

    home: str
    dry_run: bool
    ring_version: int = 0
    replicas: int = 0
    # the plan, from the first pass
    blocks: int = 0  # distinct block ids listed
    copies: int = 0  # block copies listed on all nodes
    misplaced: int = 0  # copies on a node the ring does not name for their block
    to_copy: int = 0  # copies to make on named nodes
    bytes_to_copy: int = 0
    moves: Counter = field(default_factory=Counter)  # "from -> to": copies
    held: Counter = field(default_factory=Counter)  # node -> copies listed there
    target: Counter = field(default_factory=Counter)  # node -> copies the ring names there
    # what was done, all passes together
    copied: int = 0
    bytes_copied: int = 0
    deleted: int = 0
    failed: int = 0  # blocks left misplaced or short of copies (errors)
    corrupt: int = 0  # corrupt copies found (moved aside by the store)
    errors: list[str] = field(default_factory=list)
    removed_nodes: list[str] = field(default_factory=list)
    draining_left: dict[str, str] = field(default_factory=dict)  # node -> why it stays
    passes: int = 0
    waited_s: float = 0.0  # of `seconds`: waiting for mounts to use a new ring version
    seconds: float = 0.0
    error: str | None = None  # the run could not start or went wrong (exit 1)

    def fail(self, detail: str) -> None:
        self.failed += 1
        if len(self.errors) < MAX_DETAILS:  # the log, too, gets the first ones only
            self.errors.append(detail)
            log.error("REBALANCE-FAILED %s", detail)

    @property
    def fraction(self) -> float:
        """The share of all copies that move (misplaced copies / copies)."""
        return self.misplaced / self.copies if self.copies else 0.0

    @property
    def ideal_fraction(self) -> float:
        """The least share of copies any scheme must move to reach the ring's layout.

        Each node must gain the copies the ring names there beyond those it
        holds; the sum of those gains over all copies (adding a node of equal
        weight to N: about 1/(N+1)).
        """
        if not self.copies:
            return 0.0
        gain = sum(max(0, n - self.held[node]) for node, n in self.target.items())
        return gain / self.copies

    @property
    def exit_code(self) -> int:
        return 1 if self.error or self.failed or self.draining_left else 0

    def to_json(self) -> dict:
        return {
            "home": self.home,
            "dry_run": self.dry_run,
            "ring_version": self.ring_version,
            "replicas": self.replicas,
            "plan": {
                "blocks": self.blocks,
                "copies": self.copies,
                "misplaced": self.misplaced,
                "to_copy": self.to_copy,
                "bytes_to_copy": self.bytes_to_copy,
                "fraction": round(self.fraction, 4),
                "ideal_fraction": round(self.ideal_fraction, 4),
                "moves": dict(sorted(self.moves.items())),
                "held": dict(sorted(self.held.items())),
                "target": dict(sorted(self.target.items())),
            },
            "done": {
                "copied": self.copied,
                "bytes_copied": self.bytes_copied,
                "deleted": self.deleted,
                "failed": self.failed,
                "corrupt": self.corrupt,
                "removed_nodes": self.removed_nodes,
                "draining_left": self.draining_left,
                "passes": self.passes,
                "waited_s": round(self.waited_s, 3),
            },
            "errors": self.errors,
            "error": self.error,
            "exit_code": self.exit_code,
            "seconds": round(self.seconds, 3),
        }

    def render(self) -> str:
        mib = 2**20
        head = "plan (dry run, nothing changed)" if self.dry_run else "rebalance"
        out = [f"hafs {head}: {self.home}, ring version {self.ring_version}, R={self.replicas}"]
        if self.error:
            out.append(f"error: {self.error}")
        out.append(
            f"listed {self.blocks:,} blocks, {self.copies:,} copies; misplaced {self.misplaced:,}"
            f" ({100 * self.fraction:.1f}% of all copies; the ideal for this ring:"
            f" {100 * self.ideal_fraction:.1f}%); copies to make {self.to_copy:,}"
            f" ({self.bytes_to_copy / mib:,.1f} MiB)"
        )
        for move, n in sorted(self.moves.items()):
            out.append(f"  {move}: {n:,}")
        if self.held:
            out.append(
                "copies per node now -> as the ring places them: "
                + ", ".join(f"{n} {self.held[n]:,} -> {self.target[n]:,}" for n in self._nodes())
            )
        if not self.dry_run:
            busy = self.seconds - self.waited_s
            rate = self.bytes_copied / mib / busy if busy > 0 else 0.0
            waited = (
                f"; waited {self.waited_s:.1f} s for the mounts to use the new ring"
                if self.waited_s
                else ""
            )
            out.append(
                f"copied {self.copied:,} ({self.bytes_copied / mib:,.1f} MiB, {rate:,.1f} MiB/s),"
                f" deleted {self.deleted:,} misplaced copies in {busy:.1f} s"
                f" ({self.passes} pass{'es' if self.passes != 1 else ''}{waited})"
            )
        for node in self.removed_nodes:
            out.append(f"node {node} was empty and left the ring")
        for node, why in self.draining_left.items():
            out.append(f"node {node} is still draining: {why}")
        if self.corrupt:
            out.append(f"{self.corrupt:,} corrupt copies were found and moved aside")
        if self.failed:
            out.append(f"FAILED: {self.failed:,} blocks could not be put right (run it again):")
            out.extend(f"  {e}" for e in self.errors[:20])
            if self.failed > 20:
                out.append(f"  ... and {self.failed - 20:,} more (--json lists {MAX_DETAILS})")
        if not self.dry_run and not self.exit_code:
            out.append("every block is where the ring puts it")
        return "\n".join(out)

    def _nodes(self) -> list[str]:
        return sorted(set(self.held) | set(self.target))


# -------------------------------------------------------------- entry point


def run(
    home: Path,
    *,
    dry_run: bool = False,
    bandwidth_mib: float | None = None,
    progress: Progress | None = None,
    threads: int = DEFAULT_THREADS,
    settle_s: float = RING_SETTLE_S,
) -> Report:
    """Plan (dry_run) or carry out the moves the current ring asks for."""
    home = Path(home).absolute()
    report = Report(str(home), dry_run)
    progress = progress or Progress(enabled=False)
    t0 = time.monotonic()
    if not holds_fs(home):
        raise UserError(f"no hafs filesystem in {home}: create one with 'hafs mkfs --home {home}'")
    meta = None
    session = contextlib.ExitStack()
    try:
        meta = open_meta(home)
        owner = None if dry_run else owner_claim(meta, home)  # refuses a copy of a home
        if not dry_run:
            session.enter_context(tool_session(meta, "rebalance"))
        rebalancer = Rebalancer(meta, report, progress, bandwidth_mib, threads, settle_s, owner)
        try:
            rebalancer.run()
        except RingUnusable as e:
            report.error = str(e)
        finally:
            rebalancer.close()
        if not dry_run:
            log.info(
                "REBALANCE-DONE ring version %d: copied %d, deleted %d, failed %d, removed %s",
                report.ring_version,
                report.copied,
                report.deleted,
                report.failed,
                ",".join(report.removed_nodes) or "-",
            )
    finally:
        progress.close()
        if meta is not None:
            session.close()
            meta.close()
        report.seconds = time.monotonic() - t0
    return report


# ---------------------------------------------------------------- the work


def settle(meta: MetaStore, version: int, settle_s: float, progress: Progress) -> float:
    """Wait until every mount uses ring `version` (they reload the ring every RING_RELOAD_S):
    until `settle_s` after the ring's last change.  Returns the seconds waited."""
    wait = meta.ring_changed_ns() / 1e9 + settle_s - time.time()
    if wait <= 0:
        return 0.0
    progress.start(f"waiting {wait:.0f} s for the mounts to use ring {version}")
    time.sleep(wait)
    return wait


def open_stores(
    specs: list[NodeSpec],
    fs_uuid: str,
    auth: NodeAuth,
    owner: OwnerClaim | None,
    timeout: float = NODE_TIMEOUT_S,
) -> tuple[dict[str, Store | None], dict[str, str]]:
    """The stores of the nodes `specs`, taken for `owner` (home.owner_claim; None: to
    read only), and why a node cannot be used (its store None: its directory is missing
    or foreign, or the remote node does not answer as itself).  NodeOwnedElsewhere (a
    node of another metadata store) is raised: nothing may be changed then."""
    stores: dict[str, Store | None] = {}
    problems: dict[str, str] = {}
    for spec in specs:
        store = None
        try:
            store = open_store(spec, fs_uuid, auth, timeout, owner)
            if isinstance(store, RemoteStore):
                store.check_identity()
        except (HafsError, OSError) as e:
            if isinstance(store, RemoteStore):
                store.close()
            if isinstance(e, NodeOwnedElsewhere):
                raise
            store, problems[spec.id] = None, str(e)
        stores[spec.id] = store
    return stores, problems


class _Stream:
    """One node's block ids in order, a page at a time."""

    def __init__(self, node_id: str, store: Store) -> None:
        self.node_id = node_id
        self.store = store
        self.page: list[str] = []
        self.i = 0
        self.after = ""
        self.done = False

    def head(self) -> str | None:
        """The next id (fetching a page when needed); None at the end.  OSError: node failed."""
        if self.i >= len(self.page):
            if self.done:
                return None
            self.page = self.store.iter_ids(self.after, PAGE)
            self.i = 0
            self.done = len(self.page) < PAGE
            if not self.page:
                return None
            self.after = self.page[-1]
        return self.page[self.i]


@dataclass
class _Outcome:
    """What one block's move did (made in a worker, merged into the report on the caller)."""

    bid: str
    copied: list[tuple[str, str, int]] = field(default_factory=list)  # (from, to, bytes)
    deleted: list[str] = field(default_factory=list)
    corrupt: int = 0
    error: str | None = None


class Rebalancer:
    """One rebalance (or plan) over an open metadata store."""

    def __init__(
        self,
        meta: MetaStore,
        report: Report,
        progress: Progress,
        bandwidth_mib: float | None,
        threads: int,
        settle_s: float,
        owner: OwnerClaim | None = None,
    ) -> None:
        self.meta = meta
        self.report = report
        self.progress = progress
        self.bandwidth_mib = bandwidth_mib
        self.throttle = Throttle(None)  # made anew per pass: waits must not bank bandwidth
        self.threads = threads
        self.settle_s = settle_s
        self.dry_run = report.dry_run
        config = meta.config()
        self.fs_uuid = config.fs_uuid
        self.auth = node_auth(meta)
        self.replicas = config.replicas
        self.owner = owner  # None: a dry run, which changes nothing
        self.stores: dict[str, Store | None] = {}  # None: could not be opened
        self._addresses: dict[str, str] = {}
        self.health = NodeHealth(STRIKES)  # a node down stays down for the rest of the run
        self._listed_ok: set[str] = set()  # nodes listed to the end in the last pass
        self._plan = False  # the pass running is the first: its moves are the plan's

    def close(self) -> None:
        for store in self.stores.values():
            if isinstance(store, RemoteStore):
                store.close()

    def _ring(self) -> Ring:
        try:
            return Ring.from_json(self.meta.ring())
        except ValueError as e:
            raise RingUnusable(
                f"the ring in the metadata is unusable ({e}): run 'hafs fsck'"
            ) from None

    # -------------------------------------------------------------- driver

    def run(self) -> None:
        report = self.report
        report.replicas = self.replicas
        version = None
        for n in range(MAX_PASSES):
            ring = self._ring()
            if ring.version == version:
                break
            version = ring.version
            report.ring_version = ring.version
            self._open_stores(ring)
            if not self.dry_run:
                self._settle(ring)
            report.passes = n + 1
            self._plan = n == 0
            self._pass(ring, list(ring.nodes), plan=self._plan)
            if self.dry_run:
                return
        self._remove_drained()

    def _settle(self, ring: Ring) -> None:
        self.report.waited_s += settle(self.meta, ring.version, self.settle_s, self.progress)

    def _open_stores(self, ring: Ring) -> None:
        specs = [s for s in ring.nodes.values() if self._addresses.get(s.id) != s.address]
        stores, problems = open_stores(specs, self.fs_uuid, self.auth, self.owner)
        self.stores.update(stores)
        self._addresses.update((s.id, s.address) for s in specs)
        for node_id, why in problems.items():
            self.report.errors.append(f"node {node_id} is unavailable: {why}")
            log.error("REBALANCE node %s is unavailable: %s", node_id, why)

    # ------------------------------------------------------------- a pass

    def _pass(self, ring: Ring, listed: list[str], plan: bool) -> None:
        """Merge the listings of nodes `listed`; move (or plan) each block that needs it."""
        streams = [_Stream(n, self.stores[n]) for n in listed if self.stores.get(n) is not None]
        self.throttle = Throttle(self.bandwidth_mib)
        if self.progress.enabled:
            self.progress.start("counting blocks")
            with ThreadPoolExecutor(max(1, len(streams))) as pool:
                totals = pool.map(self._count, [s.store for s in streams])
            self.progress.start("rebalance: copies listed", sum(totals) or None)
        heap: list[tuple[str, int]] = []
        for k, s in enumerate(streams):
            self._push(heap, s, k)
        self._listed_ok = set()
        pending: deque[Future] = deque()
        with ThreadPoolExecutor(self.threads, thread_name_prefix="rebalance") as pool:
            while heap:
                bid, k = heapq.heappop(heap)
                holders = [streams[k].node_id]
                self._advance(heap, streams, k)
                while heap and heap[0][0] == bid:
                    _, k = heapq.heappop(heap)
                    holders.append(streams[k].node_id)
                    self._advance(heap, streams, k)
                named = ring.replicas(bid, self.replicas)
                misplaced = [n for n in holders if n not in named]
                missing = [n for n in named if n not in holders]
                if plan:
                    self._note_plan(holders, named, misplaced, missing)
                if misplaced or missing:
                    if self.dry_run:
                        task = (self._size, bid, holders)
                    else:
                        task = (self._move, bid, holders, named, misplaced)
                    pending.append(pool.submit(*task))
                    while len(pending) > self.threads * IN_FLIGHT:
                        self._collect(pending.popleft())
                self.progress.advance(len(holders))
            while pending:
                self._collect(pending.popleft())
        self._listed_ok = {s.node_id for s in streams if s.done and s.i >= len(s.page)}

    def _count(self, store: Store) -> int:
        try:
            return store.usage().block_count
        except (HafsError, OSError):
            return 0

    def _push(self, heap: list, stream: _Stream, k: int) -> None:
        try:
            bid = stream.head()
        except (HafsError, OSError) as e:
            self.report.fail(f"listing node {stream.node_id} failed: {e}")
            stream.done, stream.page = False, []  # not listed to the end
            return
        if bid is not None:
            heapq.heappush(heap, (bid, k))

    def _advance(self, heap: list, streams: list[_Stream], k: int) -> None:
        streams[k].i += 1
        self._push(heap, streams[k], k)

    def _note_plan(
        self, holders: list[str], named: list[str], misplaced: list[str], missing: list[str]
    ) -> None:
        r = self.report
        r.blocks += 1
        r.copies += len(holders)
        r.held.update(holders)
        r.target.update(named)
        r.misplaced += len(misplaced)
        r.to_copy += len(missing)
        for k, dst in enumerate(missing):
            src = misplaced[k] if k < len(misplaced) else "copy of " + holders[0]
            r.moves[f"{src} -> {dst}"] += 1
        for src in misplaced[len(missing) :]:
            r.moves[f"{src} -> (deleted: the named nodes have it)"] += 1

    def _collect(self, future: Future) -> None:
        result = future.result()
        r = self.report
        if isinstance(result, int):  # a dry run's size of a block to copy
            r.bytes_to_copy += result
            return
        r.copied += len(result.copied)
        r.bytes_copied += sum(n for _, _, n in result.copied)
        if self._plan:
            r.bytes_to_copy += sum(n for _, _, n in result.copied)
        r.deleted += len(result.deleted)
        r.corrupt += result.corrupt
        if result.error:
            r.fail(f"block {result.bid}: {result.error}")
        if self.progress.enabled:
            self.progress.phase = (
                f"rebalance: {r.copied:,} copied ({r.bytes_copied / 2**20:,.1f} MiB),"
                f" {r.deleted:,} deleted; copies listed"
            )

    # --------------------------------------------------------- per block

    def _size(self, bid: str, holders: list[str]) -> int:
        """(dry run) The size of a block that will be copied, from one of its holders."""
        for node in holders:
            store = self.stores.get(node)
            if store is None or self.health.is_down(node):
                continue
            try:
                size = self.health.call(node, store.size, bid)
            except OSError:
                continue
            if size is not None:
                return size
        return 0

    def _move(self, bid: str, holders: list[str], named: list[str], misplaced: list[str]):
        """Verified copies on every named node, then drop the misplaced ones (worker thread)."""
        out = _Outcome(bid)
        done = restore(
            bid, self.stores, named, misplaced, health=self.health, throttle=self.throttle.consume
        )
        out.corrupt = len(done.corrupt)
        if not done.found:
            if done.problems:
                out.error = "no good copy to move: " + "; ".join(done.problems)
            return out  # else: every copy is gone, the block was garbage collected
        out.copied = [(done.source or "?", node, done.size or 0) for node in done.written]
        for node in done.written:
            log.debug("REBALANCE-COPY %s %s -> %s", bid, done.source, node)
        if done.failed:
            out.error = "; ".join(f"copying it to {n} failed: {w}" for n, w in done.failed.items())
            return out
        if len(named) < self.replicas:
            if misplaced:
                out.error = (
                    f"the ring names only {len(named)} nodes ({', '.join(named)}) for R="
                    f"{self.replicas}: the copies on {', '.join(misplaced)} are kept"
                )
            return out
        dropped = drop_extra(done, self.stores, misplaced, health=self.health)
        out.deleted = dropped.deleted
        for node in dropped.deleted:
            log.debug("REBALANCE-DELETE %s from %s", bid, node)
        if dropped.kept:
            out.error = "; ".join(
                f"deleting the copy on {n} failed: {w}" for n, w in dropped.kept.items()
            )
        return out

    # ------------------------------------------------------ draining nodes

    def _remove_drained(self) -> None:
        """Drop draining nodes that are empty from the ring, then sweep them once more."""
        ring = self._ring()
        removed: list[str] = []
        for spec in ring.nodes.values():
            if spec.state != "draining":
                continue
            store = self.stores.get(spec.id)
            why = None
            if store is None or spec.id not in self._listed_ok:
                why = "it could not be listed to the end (down?); run rebalance again"
            else:
                try:
                    if store.iter_ids("", 1):
                        why = "blocks are left on it (see the errors); run rebalance again"
                except (HafsError, OSError) as e:
                    why = f"listing it failed: {e}"
            if why is not None:
                self.report.draining_left[spec.id] = why
                continue

            def drop(current: Ring, node_id: str = spec.id) -> list | None:
                s = current.nodes.get(node_id)
                if s is None or s.state != "draining":
                    return None
                return [n for n in current.nodes.values() if n.id != node_id]

            try:
                ring, changed = change_ring(self.meta, drop)
            except UserError as e:
                self.report.draining_left[spec.id] = str(e)
                continue
            if changed:
                removed.append(spec.id)
                self.report.ring_version = ring.version
                log.info("NODE-REMOVED %s (drained): ring version %d", spec.id, ring.version)
        if not removed:
            return
        self.report.removed_nodes += removed
        self._plan = False
        # A mount still on the previous version may have written a block to a removed
        # node as a fallback; once the mounts use the new ring, move anything found there.
        self._settle(ring)
        self._pass(ring, removed, plan=False)
        for node_id in removed:
            if node_id not in self._listed_ok:
                self.report.draining_left[node_id] = "it left the ring but could not be swept"
