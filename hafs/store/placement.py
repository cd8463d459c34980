"""Placement: where blocks go on the ring, how replicas are written and read, node health.

- `put` writes a block to the R nodes the ring names, in parallel worker
  threads.  A node that is down (or fails the write) is replaced by the next
  healthy node clockwise on the ring, so R copies are still made while any R
  nodes work; a node that has not answered within its hedge delay (below) gets
  a stand-in started beside it.  The put succeeds once at least W durable
  copies are made (W = the write quorum) and the attempts have ended or R
  copies exist; fewer than R copies is logged BLOCK-DEGRADED and handed to
  `on_degraded` (the mount records it; `repair` puts it right once its nodes
  answer), fewer than W is `QuorumLost`, or `NoSpace` when the nodes that
  refused for lack of space would have made up the quorum.  Draining nodes,
  then down nodes, are tried only when the healthy ones cannot make W copies.
- `get` asks the ring's replicas in order, then every other node (a block
  written while its preferred node was failing lives elsewhere), healthy nodes
  first, and returns the first bytes whose hash matched (the store verifies).
  A node that fails or lacks the block hands over to the next at once; one that
  has not answered within its hedge delay gets the next one asked beside it
  (hedged reads), so a hung node costs a read that delay, not a timeout.
  Corrupt replicas are logged (BLOCK-CORRUPT) and skipped.
- `delete` removes an unreferenced block from every reachable node, only if no
  copy was written or re-stored within the grace period (a writer that just
  stored a block with this content is about to reference it).  A copy left on a
  down node is garbage for fsck.

Bounds: every `get` and `put` ends within `timeout` (the mount's node_timeout_s)
plus DEADLINE_MARGIN_S in total, retries and stand-ins included (the margin lets
the store's own timeout of a hung node end first, so the node is down for the
next call); calls still running then are
abandoned (their threads end at the store's own timeout).  A node known to be
down is asked only as a last resort, after the healthy nodes, and then for at
most LAST_RESORT_S.  The hedge delay of a node is HEDGE_FACTOR times a high
estimate of its latency (EWMA of the mean plus 4 mean deviations, as TCP's
retransmission timer), clamped to HEDGE_MIN_S..HEDGE_MAX_S (reads: 20 ms..1 s;
writes: 1 s, since a hedged write that was only slow leaves an extra copy, and a
loaded disk's fsync can take hundreds of milliseconds); it is the floor while a
call to the node is late
and the node has not answered since, so a hung node costs one call that delay
and the next ones almost nothing, until it is marked down.  One timer task per
placement (`_HedgeTimer`) watches every running race for its next late attempt.

Retries: a node that failed a get or put in a way that may be gone a moment
later (`is_temporary`: a refused or reset connection, a 5xx answer; never a
timeout) is tried once more after a jittered backoff, if no other node served
the read or the write still lacks its quorum.

Node health (`NodeHealth`, the one place it is kept): a node that refuses
connections or our token, shows a certificate we do not trust, or answers as
another node, is down at once; a timeout or another failure is a strike, and
STRIKES in a row make it down, as does a timeout of a
call during which no other call to the node succeeded (it hangs); any answer (a
success, a missing block, a full disk) clears the strikes.  `probe_loop` pings the down
nodes every few seconds in its own threads and brings back those that answer
(NODE-UP).  `NodeHealth.call` makes one blocking call and records its outcome; the
placement's calls and those of hafs.store.restore (repair, fsck, rebalance) go through it.

`repair` puts a degraded block right through hafs.store.restore (verified copies
on the ring's nodes, read back, before any stand-in copy is deleted), the path
fsck and rebalance use too, in one worker thread bounded by `limiter`.

Concurrency rules: store calls are blocking and run in worker threads, each
node with its own CapacityLimiter of `limiter.total_tokens` threads, so calls
stuck on a hung node never take threads from the others (probes have their
own).  A thread records its call's outcome and latency in `NodeHealth` itself
(under its lock), and in the mount's metrics (per node and call), also when
nobody waits for it any more.  `put` and `delete`
of the same block id are serialized by a keyed trio lock, so a garbage
collection in this mount can never delete a block that a writer of this mount
has just (re)stored.  `set_ring` swaps the ring and stores; a call already
running goes on with the ring and stores it started with.
"""

from __future__ import annotations

import errno
import logging
import math
import random
import threading
import time
from collections.abc import Awaitable, Callable

import trio

from ..errors import BlockCorrupt, BlockMissing, NoSpace, NotOwner, QuorumLost, one_error
from ..metrics import MountMetrics
from .chunker import MAX_SIZE
from .dirstore import DirStore
from .remote import (
    DEFAULT_TIMEOUT_S,
    NodeCertificateError,
    NodeRefused,
    NodeTimeout,
    NodeUnavailable,
    RemoteStore,
)
from .restore import DropResult, RestoreResult, drop_extra, restore
from .ring import Ring

log = logging.getLogger(__name__)

STRIKES = 3  # failures in a row (timeouts, errors) that mark a node down
PROBE_INTERVAL_S = 2.0  # how often down nodes are pinged and free space refreshed
RETRY_BACKOFF_S = 0.25  # mean wait before the one retry of a node that failed temporarily
DEADLINE_MARGIN_S = 0.5  # a get or put ends within timeout + this
LAST_RESORT_S = 1.0  # how long a node known to be down is waited for, when it is asked at all
# bounds of the delay before a slow node gets a stand-in asked beside it (the upper one also
# while a node's latency is not known yet); a write's stand-in costs an extra copy: a higher floor
HEDGE_MIN_S = {"get": 0.02, "put": 1.0}
HEDGE_MAX_S = 1.0
HEDGE_FACTOR = 2.0  # hedge delay = this times the high latency estimate
EWMA_WEIGHT = 0.1  # weight of the newest latency sample


class NodeHealth:
    """Up or down, per node, from the outcomes of the calls made to it; their latency.

    Thread-safe: worker threads report the outcome of their calls as they end.
    """

    def __init__(self, strikes: int = STRIKES) -> None:
        self.strikes_to_down = strikes
        self._lock = threading.Lock()
        self._strikes: dict[str, int] = {}
        self._down: dict[str, str] = {}  # node id -> why
        self._last_ok: dict[str, float] = {}  # node id -> when a call to it last succeeded
        self._late: set[str] = (
            set()
        )  # nodes with a call past its hedge delay since their last answer
        self._latency: dict[tuple[str, str], tuple[float, float]] = {}  # (node, kind) -> s, dev

    def is_down(self, node_id: str) -> bool:
        with self._lock:
            return node_id in self._down

    def down(self) -> dict[str, str]:
        with self._lock:
            return dict(self._down)

    def success(self, node_id: str) -> None:
        with self._lock:
            self._last_ok[node_id] = time.monotonic()
            self._late.discard(node_id)
            self._strikes.pop(node_id, None)
            why = self._down.pop(node_id, None)
        if why is not None:
            log.warning("NODE-UP %s (was down: %s)", node_id, why)

    def failure(self, node_id: str, exc: BaseException, since: float | None = None) -> None:
        """Count a failed call to the node; `since`: when the call began (time.monotonic).

        A timeout of a call during which nothing else of the node succeeded either
        (a hung node, not a busy one) marks it down at once.
        """
        if isinstance(exc, NotOwner) or (
            isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
        ):
            self.success(node_id)  # a full disk, a refused delete: the node answers
            return
        immediate = isinstance(
            exc, NodeUnavailable | NodeRefused | NodeCertificateError
        ) and not isinstance(exc, NodeTimeout)
        if isinstance(exc, NodeRefused) and exc.status not in (401, 409, None):
            immediate = False  # a disk error or a refused body: the node itself answers
        with self._lock:
            if isinstance(exc, NodeTimeout) and since is not None:
                immediate = self._last_ok.get(node_id, -math.inf) < since
            strikes = self._strikes.get(node_id, 0) + 1
            self._strikes[node_id] = strikes
            mark = (immediate or strikes >= self.strikes_to_down) and node_id not in self._down
        if mark:
            self.mark_down(node_id, str(exc))

    def mark_down(self, node_id: str, why: str) -> None:
        with self._lock:
            self._down[node_id] = why
        log.warning("NODE-DOWN %s: %s", node_id, why)

    def call(self, node_id: str, fn: Callable, *args, kind: str = ""):
        """fn(*args), a blocking call to the node in this thread, with its outcome recorded:
        a missing or corrupt block is an answer, an OSError a failure; for a `kind`
        ("get", "put") the latency of a success is counted too."""
        started = time.monotonic()
        try:
            result = fn(*args)
        except BaseException as e:
            self.outcome(node_id, started, e, kind)
            raise
        self.outcome(node_id, started, None, kind)
        return result

    def outcome(
        self, node_id: str, started: float, exc: BaseException | None, kind: str = ""
    ) -> bool:
        """Record how a call to the node that began at `started` (time.monotonic) ended:
        `exc` None (a success: its latency counted for a `kind`), a missing or corrupt
        block (an answer), an OSError (a failure of the node); anything else is not the
        node's doing.  Returns whether it was a failure (of the node or not)."""
        if exc is None:
            self.success(node_id)
            if kind:
                self.observe(node_id, kind, time.monotonic() - started)
            return False
        if isinstance(exc, BlockMissing | BlockCorrupt):
            self.success(node_id)
            return False
        if isinstance(exc, OSError):
            self.failure(node_id, exc, since=started)
        return True

    def observe(self, node_id: str, kind: str, seconds: float) -> None:
        """Count the latency of a successful call of `kind` ("get", "put") to the node."""
        with self._lock:
            mean, dev = self._latency.get((node_id, kind), (seconds, seconds / 2))
            dev += EWMA_WEIGHT * (abs(seconds - mean) - dev)
            mean += EWMA_WEIGHT * (seconds - mean)
            self._latency[node_id, kind] = (mean, dev)

    def late(self, node_id: str) -> None:
        """A call to the node is past its hedge delay: until it answers, hedge at once."""
        with self._lock:
            self._late.add(node_id)

    def hedge_delay(self, node_id: str, kind: str) -> float:
        """How long a call of `kind` to the node may go unanswered before another node is asked."""
        with self._lock:
            if node_id in self._late:
                return HEDGE_MIN_S[kind]
            estimate = self._latency.get((node_id, kind))
        if estimate is None:
            return HEDGE_MAX_S
        mean, dev = estimate
        return min(HEDGE_MAX_S, max(HEDGE_MIN_S[kind], HEDGE_FACTOR * (mean + 4 * dev)))


class _Race:
    """The attempts of one `Placement._race`: `want` successes wanted of `nodes`, in order."""

    def __init__(
        self,
        nodes: list[str],
        want: int,
        kind: str,
        attempt: Callable[[str], Awaitable[bool]],
        health: NodeHealth,
    ) -> None:
        self.queue = iter(nodes)
        self.want = want
        self.kind = kind
        self.attempt = attempt
        self.health = health
        self.nursery: trio.Nursery  # the race's, while it runs
        self.succeeded = 0
        self.late_at: dict[str, float] = {}  # running attempts: node -> when it is late

    def fill(self, now: float) -> None:
        """Start attempts on the next nodes until as many run on time as are still needed."""
        on_time = sum(t > now for t in self.late_at.values())
        for _ in range(self.want - self.succeeded - on_time):
            node_id = next(self.queue, None)
            if node_id is None:
                return
            self.late_at[node_id] = now + self.health.hedge_delay(node_id, self.kind)
            self.nursery.start_soon(self._run, node_id)

    async def _run(self, node_id: str) -> None:
        try:
            ok = await self.attempt(node_id)
        finally:
            del self.late_at[node_id]
        if ok:
            self.succeeded += 1
            if self.succeeded >= self.want and self.late_at:
                self.nursery.cancel_scope.cancel()  # (the late ones still running)
        elif self.succeeded < self.want:
            self.fill(trio.current_time())


class _HedgeTimer:
    """The one timer of a placement's races: it wakes when the next running attempt
    becomes late, marks its node late and has its race start the next node beside it.

    One task for all (a trio system task, started with the first race of each trio
    run) instead of a timer and a wake-up per race (an embedded mount created 3,000
    small files at 543/s instead of 525/s, medians of 5 runs).
    """

    def __init__(self) -> None:
        self._races: set[_Race] = set()
        self._token: trio.lowlevel.TrioToken | None = None
        self._sleep = trio.CancelScope()  # the timer task's, its deadline the next lateness

    def watch(self, race: _Race) -> None:
        token = trio.lowlevel.current_trio_token()
        if token is not self._token:  # the first race of this trio run
            self._token, self._races, self._sleep = token, set(), trio.CancelScope()
            trio.lowlevel.spawn_system_task(self._run, self._sleep, name="hafs hedge timer")
        self._races.add(race)
        first = min(race.late_at.values(), default=math.inf)
        if first < self._sleep.deadline:
            self._sleep.deadline = first

    def unwatch(self, race: _Race) -> None:
        self._races.discard(race)

    async def _run(self, sleep: trio.CancelScope) -> None:
        while True:
            with sleep:
                await trio.sleep_forever()
            now = trio.current_time()
            due = math.inf
            for race in list(self._races):
                late = [n for n, t in race.late_at.items() if t <= now]
                for node_id in late:
                    race.health.late(node_id)
                if late:
                    race.fill(now)
                due = min(due, min((t for t in race.late_at.values() if t > now), default=due))
            sleep = self._sleep = trio.CancelScope(deadline=due)


def is_temporary(exc: BaseException) -> bool:
    """A failure that may be gone a moment later: a refused or reset connection (a node
    restarting) or a node's own 5xx answer.  Not a timeout (it took long enough
    already), a full disk or a refusal that would only repeat."""
    if isinstance(exc, NodeTimeout):
        return False
    if isinstance(exc, NodeUnavailable):
        return True
    return isinstance(exc, NodeRefused) and (exc.status or 0) >= 500 and exc.status != 507


async def backoff() -> None:
    """Wait before a retry: RETRY_BACKOFF_S, jittered so that callers do not retry in step."""
    await trio.sleep(RETRY_BACKOFF_S * random.uniform(0.5, 1.5))


def writable_bytes(free: dict[str, tuple[str, int]], replicas: int) -> int:
    """How many bytes of blocks can still be stored, each on `replicas` distinct nodes.

    free: node id -> (disk id, free bytes).  A node without room for one more
    block of the largest size (MAX_SIZE) counts as full; a disk shared by several
    nodes counts once.  With k of the nodes with most room capped, the others
    must hold the remaining replicas - k copies of every block: the least of
    those bounds is what fits (0 once fewer than `replicas` nodes have room).
    """
    room = {node: (disk, max(0, f - MAX_SIZE)) for node, (disk, f) in free.items()}
    by_node = sorted((r for _, r in room.values()), reverse=True)
    spread = min((sum(by_node[k:]) // (replicas - k) for k in range(replicas)), default=0)
    by_disk = {disk: r for disk, r in room.values()}
    return min(spread, sum(by_disk.values()) // replicas)


class KeyedLock:
    """One trio lock per key, created on demand and dropped when unused:
    `async with locks(key): ...` (a plain context object: no generator per use)."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[trio.Lock, int]] = {}

    def __call__(self, key: str) -> _KeyHeld:
        return _KeyHeld(self._locks, key)


class _KeyHeld:
    __slots__ = ("_locks", "_key", "_lock")

    def __init__(self, locks: dict[str, tuple[trio.Lock, int]], key: str) -> None:
        self._locks, self._key = locks, key

    async def __aenter__(self) -> None:
        lock, users = self._locks.get(self._key, (None, 0))
        if lock is None:
            lock = trio.Lock()
        self._locks[self._key] = (lock, users + 1)
        self._lock = lock
        try:
            await lock.acquire()
        except BaseException:
            self._leave()
            raise

    async def __aexit__(self, *exc: object) -> None:
        self._lock.release()
        self._leave()

    def _leave(self) -> None:
        lock, users = self._locks[self._key]
        if users == 1:
            del self._locks[self._key]
        else:
            self._locks[self._key] = (lock, users - 1)


class Placement:
    """R-way replicated block storage over the nodes of a ring."""

    def __init__(
        self,
        ring: Ring,
        stores: dict[str, DirStore | RemoteStore],
        replicas: int,
        limiter: trio.CapacityLimiter,
        write_quorum: int | None = None,
        health: NodeHealth | None = None,
        on_degraded: Callable[[str, list[str]], None] | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        metrics: MountMetrics | None = None,
    ) -> None:
        """limiter: its size is the number of worker threads per node; timeout: the bound of
        each get and put in seconds (the mount's node_timeout_s); metrics: the mount's
        (each call's outcome and latency is counted there, per node; default: a new set)."""
        self.ring = ring
        self.stores = stores
        self.replicas = replicas
        self.write_quorum = write_quorum or replicas
        self.limiter = limiter
        self._limiters: dict[str, trio.CapacityLimiter] = {}  # node id -> its threads
        self.timeout = timeout
        self.health = health or NodeHealth()
        self.metrics = metrics or MountMetrics()
        self._block_locks = KeyedLock()
        self._hedges = _HedgeTimer()
        self._probe_limiter = trio.CapacityLimiter(8)
        # remote nodes: node id -> (disk id, total bytes, free bytes), refreshed by probe_loop
        self.usage: dict[str, tuple[str, int, int]] = {}
        self.degraded = 0  # blocks stored with fewer than R copies or off their ring nodes
        self._degraded_logged = -1e9
        self.on_degraded = on_degraded  # records such a block (id, nodes holding it) for repair

    def set_ring(self, ring: Ring, stores: dict[str, DirStore | RemoteStore]) -> None:
        """Use a new version of the ring (and the stores of its nodes) from now on."""
        self.ring, self.stores = ring, stores

    async def _call(self, node_id: str, fn: Callable, *args, kind: str = ""):
        """fn(*args) in a worker thread of the node; a node failure (OSError) counts against it.

        The outcome (and, for a `kind`, the latency) is recorded here once the call
        returns; a call abandoned on cancellation (a deadline, a hedge that won) records
        its own from its thread when it ends (one that ends just as it is abandoned may
        go uncounted).  The thread runs nothing else: Python in the worker threads of a
        put contends with them for the GIL (a put of a block the three local directories
        already hold, in-process, median of 6 runs: 327 -> 306 us).
        """
        started = time.monotonic()
        call = kind or getattr(fn, "__name__", "call")
        abandoned = False

        def run():
            try:
                result = fn(*args)
            except BaseException as e:
                if abandoned:
                    self._record(node_id, call, kind, started, e)
                raise
            if abandoned:
                self._record(node_id, call, kind, started, None)
            return result

        limiter = self._limiters.get(node_id)
        if limiter is None:
            limiter = self._limiters[node_id] = trio.CapacityLimiter(self.limiter.total_tokens)
        try:
            result = await trio.to_thread.run_sync(run, limiter=limiter, abandon_on_cancel=True)
        except trio.Cancelled:
            abandoned = True
            raise
        except BaseException as e:
            self._record(node_id, call, kind, started, e)
            raise
        self._record(node_id, call, kind, started, None)
        return result

    def _record(
        self, node_id: str, call: str, kind: str, started: float, exc: BaseException | None
    ) -> None:
        """The outcome of a call in the node's health and the mount's metrics (any thread)."""
        failed = self.health.outcome(node_id, started, exc, kind)
        self.metrics.block_call(node_id, call, time.monotonic() - started, failed=failed)

    async def _race(
        self, nodes: list[str], want: int, kind: str, attempt: Callable[[str], Awaitable[bool]]
    ) -> int:
        """Run `attempt(node)` over `nodes` in order until `want` of them succeeded (True).

        `want` attempts run at once; one that fails hands over to the next node at
        once, one still running after the node's hedge delay gets the next node
        started beside it (by the placement's one timer, `_HedgeTimer`).  Returns the
        number of successes (the attempts still running then are cancelled).
        """
        race = _Race(nodes, want, kind, attempt, self.health)
        try:
            with one_error():
                async with trio.open_nursery() as race.nursery:
                    race.fill(trio.current_time())
                    self._hedges.watch(race)
        finally:
            self._hedges.unwatch(race)
        return race.succeeded

    @staticmethod
    def _order(ring: Ring, block_id: str, named: list[str]) -> list[str]:
        """The block's named replicas, then every other node of `ring` clockwise from it."""
        return named + [n for n in ring.walk(block_id) if n not in named]

    async def put(self, block_id: str, data: bytes | memoryview) -> None:
        async with self._block_locks(block_id):
            stores = self.stores  # this call's view, whatever set_ring does meanwhile
            ring = self.ring
            named = ring.replicas(block_id, self.replicas)
            known_down = self.health.down()
            # draining nodes are being emptied: like down ones, only a last resort
            healthy: list[str] = []
            draining: list[str] = []
            down: list[str] = []
            for n in self._order(ring, block_id, named):
                if n in known_down:
                    down.append(n)
                else:
                    (healthy if ring.nodes[n].state == "up" else draining).append(n)
            stored: list[str] = []
            errors: list[str] = []
            full: list[str] = []  # nodes that refused for lack of space
            retry: list[str] = []  # nodes that failed in a way worth one more try

            async def store_on(node_id: str) -> bool:
                try:
                    await self._call(node_id, stores[node_id].put, block_id, data, kind="put")
                except OSError as e:
                    log.error("BLOCK-WRITE-FAILED %s on node %s: %s", block_id, node_id, e)
                    errors.append(f"{node_id}: {e}")
                    if e.errno in (errno.ENOSPC, errno.EDQUOT):
                        full.append(node_id)
                    elif is_temporary(e):
                        retry.append(node_id)
                    return False
                stored.append(node_id)
                return True

            async def attempt(nodes: list[str]) -> None:
                await self._race(nodes, self.replicas - len(stored), "put", store_on)

            with trio.move_on_after(self.timeout + DEADLINE_MARGIN_S) as deadline:
                await attempt(healthy)
                if len(stored) < self.write_quorum:
                    await attempt(draining)
                if len(stored) < self.write_quorum and down:
                    with trio.move_on_after(LAST_RESORT_S):
                        await attempt(down)
                if len(stored) < self.write_quorum and retry:
                    await backoff()
                    await attempt(list(dict.fromkeys(retry)))
            if len(stored) < self.write_quorum:
                if deadline.cancelled_caught:
                    errors.append(f"no quorum within {self.timeout:g} s")
                why = f"({'; '.join(errors) or 'not enough nodes'})"
                copies = f"block {block_id}: {len(stored)} of {self.replicas} copies stored"
                if full and len(stored) + len(full) >= self.write_quorum:
                    raise NoSpace(f"{copies}, the other nodes are full {why}")
                raise QuorumLost(f"{copies}, at least {self.write_quorum} needed {why}")
            if set(stored) != set(named):
                self._degraded(block_id, stored, named)

    def _degraded(self, block_id: str, stored: list[str], named: list[str]) -> None:
        """Record a block stored off its ring nodes; log the first, then a count every 10 s."""
        self.degraded += 1
        if self.on_degraded is not None:
            self.on_degraded(block_id, stored)
        now = time.monotonic()
        if now - self._degraded_logged >= 10:
            log.warning(
                "BLOCK-DEGRADED %s: copies on %s, the ring names %s; %d blocks so far"
                " (recorded: background repair puts them right once the nodes answer)",
                block_id,
                ", ".join(sorted(stored)),
                ", ".join(named),
                self.degraded,
            )
            self._degraded_logged = now

    async def repair(self, block_id: str, holders: list[str]) -> bool | None:
        """Put a degraded block right: True once it is, False if that failed (try
        again later), None while it waits for a node that is down.

        Every node the ring names gets a verified copy, read from any node with a
        good one (`holders` first), and only then are the stand-in copies on
        `holders` the ring does not name deleted (hafs.store.restore), so the block
        never has fewer copies than before.  Nothing is done while a named node is
        down; a stand-in that is down keeps its copy until it answers.  The restore
        runs in one worker thread of `limiter`.
        """
        named = self.ring.replicas(block_id, self.replicas)
        if any(self.health.is_down(n) for n in named):
            return None
        async with self._block_locks(block_id):
            stores = self.stores  # this call's view, whatever set_ring does meanwhile
            ring, health = self.ring, self.health
            stand_ins = [n for n in holders if n not in named and n in stores]

            def put_right() -> tuple[RestoreResult, DropResult | None]:
                done = restore(
                    block_id, stores, named, [*holders, *ring.walk(block_id)], health=health
                )
                if not done.complete:
                    return done, None
                return done, drop_extra(done, stores, stand_ins, health=health)

            done, dropped = await trio.to_thread.run_sync(
                put_right, limiter=self.limiter, abandon_on_cancel=True
            )
        if dropped is None:
            why = "; ".join(f"{n}: {w}" for n, w in done.failed.items())
            log.info("repair of block %s deferred: %s", block_id, why)
            return False
        errors = {n: w for n, w in dropped.kept.items() if not self.health.is_down(n)}
        if errors:
            why = "; ".join(f"deleting the copy on {n}: {w}" for n, w in errors.items())
            log.info("repair of block %s deferred: %s", block_id, why)
            return False
        return None if dropped.kept else True

    async def get(self, block_id: str) -> bytes:
        problems: list[str] = []
        stores, ring = self.stores, self.ring  # this call's view, whatever set_ring does
        named = ring.replicas(block_id, self.replicas)
        found: list[bytes] = []
        retry: list[str] = []  # nodes that failed in a way worth one more try

        async def read_from(node_id: str) -> bool:
            try:
                found.append(await self._call(node_id, stores[node_id].get, block_id, kind="get"))
                return True
            except BlockMissing:
                pass
            except BlockCorrupt:
                problems.append(f"corrupt on {node_id}")
            except OSError as e:
                log.error("BLOCK-READ-FAILED %s on node %s: %s", block_id, node_id, e)
                problems.append(f"{node_id}: {e}")
                if is_temporary(e):
                    retry.append(node_id)
            return False

        deadline_at = trio.current_time() + self.timeout + DEADLINE_MARGIN_S
        first = next((n for n in named if not self.health.is_down(n)), None)
        late = False
        if first is not None:
            # The usual read: the first node answers within its hedge delay.  Awaited in
            # this task under one cancel scope, this costs one thread hand-off and no
            # nursery (it halved the cost of a small block's read), and the other
            # candidates are only listed if it does not answer; a late node's call is
            # abandoned (its thread still records the outcome) and the node is asked
            # again last, after the others.
            hedge_at = trio.current_time() + self.health.hedge_delay(first, "get")
            with trio.move_on_at(min(hedge_at, deadline_at)) as hedge:
                if await read_from(first):
                    return found[0]
            if hedge.cancelled_caught:
                self.health.late(first)
                late = True
        order = [n for n in self._order(ring, block_id, named) if n != first]
        down = [n for n in order if self.health.is_down(n)]
        live = [n for n in order if n not in down] + ([first] if late else [])
        with trio.move_on_at(deadline_at) as deadline:
            if live and await self._race(live, 1, "get", read_from):
                return found[0]
            if down:
                with trio.move_on_after(LAST_RESORT_S):
                    if await self._race(down, 1, "get", read_from):
                        return found[0]
            if retry:
                await backoff()
                if await self._race(list(dict.fromkeys(retry)), 1, "get", read_from):
                    return found[0]
        if deadline.cancelled_caught or trio.current_time() >= deadline_at:
            problems.append(f"no answer within {self.timeout:g} s")
        raise BlockMissing(block_id, "; ".join(problems) or "on no node")

    async def delete(self, block_id: str, grace_s: float) -> bool:
        """Delete an unreferenced block everywhere unless a copy is younger than grace_s.

        False (the caller keeps the block's row and tries again later) also while a node
        the ring names for the block is down: its copy there must go too, once it is back.
        """
        async with self._block_locks(block_id):
            if any(self.health.is_down(n) for n in self.ring.replicas(block_id, self.replicas)):
                return False
            cutoff = time.time_ns() - int(grace_s * 1e9)
            stores = self.stores  # this call's view, whatever set_ring does meanwhile
            nodes = [n for n in self.ring.walk(block_id) if not self.health.is_down(n)]
            for node_id in nodes:
                mtime = await self._call(node_id, stores[node_id].mtime_ns, block_id)
                if mtime is not None and mtime >= cutoff:
                    return False
            for node_id in nodes:
                await self._call(node_id, stores[node_id].delete, block_id)
            return True

    async def probe_loop(self, interval: float = PROBE_INTERVAL_S) -> None:
        """Bring back down nodes that answer again; keep remote nodes' free space fresh."""
        while True:
            async with trio.open_nursery() as nursery:
                for node_id, store in list(self.stores.items()):
                    if self.health.is_down(node_id) or isinstance(store, RemoteStore):
                        nursery.start_soon(self._probe, node_id, store)
            await trio.sleep(interval)

    async def _probe(self, node_id: str, store: DirStore | RemoteStore) -> None:
        try:
            if isinstance(store, RemoteStore):
                st = await trio.to_thread.run_sync(store.status, limiter=self._probe_limiter)
                disk = st.get("disk_id") if isinstance(st.get("disk_id"), str) else node_id
                self.usage[node_id] = (disk, st["total_bytes"], st["free_bytes"])
            else:
                await trio.to_thread.run_sync(store.ping, limiter=self._probe_limiter)
        except OSError as e:
            if not self.health.is_down(node_id):
                self.health.failure(node_id, e)
            return
        self.health.success(node_id)
