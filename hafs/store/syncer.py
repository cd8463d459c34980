"""Grouped durability: one flush of a filesystem shared by every thread waiting for one.

DESIGN invariant 2 lets flushes be grouped: a block is durable once a flush that
began after its file was written (and again after its rename) has ended.  A
`Syncer` makes those flushes for one backing directory; each is one ``syncfs(2)``
of the filesystem that holds it, which writes back every dirty file and
directory of that filesystem and commits its journal once, so it costs about
what one fsync does, however many blocks it covers.

Use, from a worker thread::

    ticket = syncer.begin()   # before writing what must become durable
    ... write ...
    syncer.sync(ticket)       # returns once it is durable; OSError if it may not be

Group commit, with no thread of its own: a caller of `sync` joins the next pass.
If no pass is running, it runs that pass itself (it leads); otherwise it waits
for the running pass to end, and then one of the waiters of the next pass leads
it.  N callers that arrive while a pass runs share the next one: at most two
passes' time for each, one pass for all of them.

Errors: ``syncfs`` reports a writeback error of the filesystem once per open
file (Linux >= 5.8), and the page whose write failed may belong to any caller
that had written before the error was seen, also to one that had not joined a
pass yet.  So a failed pass fails every caller whose `begin` came before that
pass ended (its ticket is older), not only the waiters of the pass; a caller that
begins later is not affected.  Failures are never silent: any exception of a
pass reaches its waiters as an OSError.

Concurrency: any number of threads may call `begin` and `sync` at once; all
state is under one Condition; passes run one at a time, outside the lock.  The
file descriptor that ``syncfs`` is called on is opened by the first `begin` (so
the errors it reports include every write made after) and closed when the
Syncer is collected.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
import weakref

_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)
_libc = ctypes.CDLL(None, use_errno=True)  # ctypes releases the GIL during the call


def syncfs(fd: int) -> None:
    """syncfs(2): write back and commit the whole filesystem holding `fd` (Python lacks it)."""
    if _libc.syncfs(fd) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


class Syncer:
    """Grouped flushes of the filesystem that holds directory `path` (module docstring).

    No I/O until the first `begin`.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None
        self._cond = threading.Condition()
        self._running = False
        self._started = 0  # passes started (numbered from 1)
        self._ended = 0  # passes ended: they end in order
        self._failed = 0  # the number of the last pass that failed, 0 if none did
        self._error: Exception | None = None  # what it raised (None: interrupted)
        self.passes = 0  # passes run (metrics, tests)

    def __repr__(self) -> str:
        return f"Syncer({self.path!r})"

    def begin(self) -> int:
        """A ticket for `sync`: take it before writing what `sync` is to make durable."""
        with self._cond:
            self._open()
            return self._ended

    def _open(self) -> None:
        if self._fd is None:
            fd = self._fd = os.open(self.path, _DIR_FLAGS)
            weakref.finalize(self, os.close, fd)

    def sync(self, ticket: int) -> None:
        """Return once a pass that began after this call has ended.

        OSError if any pass failed after `ticket` was taken (what was written since
        may not be durable).
        """
        with self._cond:
            want = self._started + 1  # the first pass to start from now on
            while self._ended < want:
                if self._running:
                    self._cond.wait()
                else:
                    self._lead()
            if self._failed > ticket:
                raise self._oserror()

    def _lead(self) -> None:
        """Run the next pass in this thread (called, and returning, with the lock held)."""
        self._open()
        self._running = True
        self._started += 1
        number = self._started
        ok, error = False, None
        self._cond.release()
        try:
            syncfs(self._fd)  # (looked up here: tests replace it with a double)
            ok = True
        except Exception as e:
            error = e  # raised below as OSError, to this thread as to every waiter
        finally:  # (also when this thread is interrupted: no waiter may take it for success)
            self._cond.acquire()
            self._running = False
            self._ended = number
            self.passes += 1
            if not ok:
                self._failed, self._error = number, error
            self._cond.notify_all()

    def _oserror(self) -> OSError:
        """A fresh OSError for one caller (threads must not share one traceback)."""
        e = self._error
        if isinstance(e, OSError) and e.errno is not None:
            return OSError(e.errno, f"flush of the filesystem failed: {e.strerror}", self.path)
        return OSError(errno.EIO, f"flush of the filesystem failed: {e!r}", self.path)  # (or None)
