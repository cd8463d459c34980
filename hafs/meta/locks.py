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
from collections.abc import Callable
from dataclasses import dataclass

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


FRESH_KEPT = 1024  # grants made by creates, not yet acquired (see keep_fresh)


def keep_fresh(d: dict, key: str, value: object) -> None:
    """d[key] = value, dropping the oldest entries beyond FRESH_KEPT: the grants an
    engine's creates made (`locks_at_create`), until their acquire (and fence) takes them."""
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
