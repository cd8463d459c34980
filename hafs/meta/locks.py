"""LockService: named locks granted as leases, with fencing tokens.

A lease is held for `ttl` seconds and renewed by its holder (`keepalive`);
it ends by `release` or by expiry.  Each grant of a name carries a fencing
token strictly greater than every earlier grant of that name, so a store that
records the newest token it has seen can refuse a holder whose lease expired
(DESIGN.md invariant 6).

This module holds what every engine's LockService shares (the Lease and
LockInfo values, the holder's name, the polling wait); each engine implements
the service over its own storage (sqlite.py: the `locks` table; kv.py: keys
bound to the mount's lease).
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from ..errors import LockTimeout

log = logging.getLogger(__name__)


@dataclass
class Lease:
    name: str
    holder: str
    token: int
    expires_ns: int


@dataclass(frozen=True)
class LockInfo:
    name: str
    holder: str
    token: int
    acquired_ns: int
    expires_ns: int


FRESH_KEPT = 1024  # grants made by creates, not yet acquired (see CreatedGrants)


class CreatedGrants:
    """The write locks an engine's creates granted (`locks_at_create`): kept from the
    create's commit until the creator's acquire takes its grant (`take`), then until its
    first fence (`fenced`), which needs no request: no older token of a new inode can
    exist.  At most FRESH_KEPT of each (the vfs acquires right after the create).
    Thread-safe (the KV engines run in worker threads)."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._fresh: dict[str, tuple[Any, Any]] = {}  # name -> (lease, inode): not acquired
        self._taken: dict[str, tuple[int, Any]] = {}  # name -> (token, inode): not fenced

    def keep(self, lease: Lease, inode: Any) -> None:
        """The create that granted `lease` (of `inode`) committed."""
        with self._mutex:
            _keep(self._fresh, lease.name, (lease, inode))

    def take(self, name: str, usable: Callable[[Any], bool]) -> Any | None:
        """The lease a create granted of `name`, if there is one and `usable(lease)`."""
        with self._mutex:
            found = self._fresh.pop(name, None)
        if found is None or not usable(found[0]):
            return None
        lease, inode = found
        with self._mutex:
            _keep(self._taken, name, (lease.token, inode))
        return lease

    def fenced(self, name: str, token: int) -> Any | None:
        """The inode as its create made it, if that create granted lock `name` at `token`
        and this is the first fence since."""
        with self._mutex:
            found = self._taken.get(name)
            if found is None or found[0] != token:
                return None
            del self._taken[name]
            return found[1]


def _keep(d: dict, key: str, value: object) -> None:
    """d[key] = value, dropping the oldest entries beyond FRESH_KEPT."""
    d[key] = value
    while len(d) > FRESH_KEPT:
        del d[next(iter(d))]


def default_holder(label: str = "") -> str:
    return f"{socket.gethostname()}:{os.getpid()}" + (f":{label}" if label else "")


async def wait_for(name: str, wait_s: float, attempt: Callable[[], tuple]) -> Lease:
    """Call `attempt()` -> (lease, None) | (None, holder) until it grants the lock,
    polling with jittered backoff; LockTimeout after wait_s seconds."""
    deadline = trio.current_time() + wait_s
    delay = 0.02
    while True:
        lease, holder = attempt()
        if lease is not None:
            return lease
        if trio.current_time() >= deadline:
            raise LockTimeout(name, holder)
        await trio.sleep(min(delay * random.uniform(0.5, 1.5), deadline - trio.current_time()))
        delay = min(delay * 2, 0.5)
