"""Administration tools: fsck, rebalance, node management, status."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator

from ..meta import SessionInfo

log = logging.getLogger(__name__)

# The session of a tool that works alone (fsck --repair, rebalance, node lost/adopt).
# On a direct engine (SQLite, one host) a tool that died is noticed at once by its pid,
# so its session may be long and is never renewed.  On a networked engine (etcd) it
# may run on another host than the mounts it excludes: its session is bound to a short
# lease, renewed by a thread while the tool works, so a killed tool frees the
# filesystem within SHARED_SESSION_S.
LOCAL_SESSION_S = 24 * 3600.0
SHARED_SESSION_S = 60.0


@contextlib.contextmanager
def tool_session(meta, kind: str) -> Iterator[SessionInfo]:
    """Hold a `kind` session ("repair" or "rebalance") while the block runs; UserError
    when another session forbids it (`hafs.meta.session_conflict`)."""
    sessions = meta.sessions
    if meta.direct:
        session = sessions.register(kind, "", LOCAL_SESSION_S)
        try:
            yield session
        finally:
            sessions.end(session)
        return
    session = sessions.register(kind, "", SHARED_SESSION_S)
    done = threading.Event()

    def renew() -> None:
        current = session
        while not done.wait(SHARED_SESSION_S / 3):
            try:
                current = sessions.renew(current)
            except Exception as e:  # the next round tries again; the lease has time left
                log.warning("could not renew the %s session %s: %s", kind, session.id, e)

    thread = threading.Thread(target=renew, name=f"{kind}-session", daemon=True)
    thread.start()
    try:
        yield session
    finally:
        done.set()
        thread.join()
        sessions.end(session)
