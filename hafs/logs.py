"""Where a daemon's log goes (`--log FILE|syslog|-`), and reopening it on SIGHUP.

`hafs mount` and `hafs node` share this.  A log FILE is reopened at its path
by `reopen()` (the daemons call it on SIGHUP, so logrotate can move the file
away and signal); syslog goes to /dev/log; `-` is stderr, which under systemd
(JOURNAL_STREAM set) is the journal, so the timestamp and pid are left to it.
Every line keeps the logger's name and the message's stable tag (NODE-DOWN,
BLOCK-DEGRADED, LOCK-LOST, ...) at its start.

Concurrency: `setup` runs once at start-up, before any thread; `reopen` may
run at any time (logging's handler lock keeps a line from being written to a
closed stream).
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
from pathlib import Path

from .errors import UserError

FILE_FORMAT = "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"
JOURNAL_FORMAT = "%(levelname)s %(name)s: %(message)s"  # the journal adds time and pid


def under_systemd() -> bool:
    """True when stderr is connected to the journal (systemd sets JOURNAL_STREAM)."""
    return bool(os.environ.get("JOURNAL_STREAM"))


def handler_for(target: str) -> logging.Handler:
    """A handler for `--log TARGET`: a file path, 'syslog' or '-' (stderr)."""
    if target == "-":
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
        fmt = JOURNAL_FORMAT if under_systemd() else FILE_FORMAT
    elif target == "syslog":
        if not os.path.exists("/dev/log"):  # (a syslog daemon that restarts is waited for)
            raise UserError(
                "--log syslog: no syslog daemon listens on /dev/log: give a file, or '-' for"
                " stderr (the journal under systemd)"
            )
        handler = logging.handlers.SysLogHandler(
            "/dev/log", facility=logging.handlers.SysLogHandler.LOG_DAEMON
        )
        handler.ident = f"hafs[{os.getpid()}]: "
        fmt = JOURNAL_FORMAT
    else:
        try:
            handler = logging.FileHandler(Path(target).expanduser().absolute())
        except OSError as e:
            raise UserError(
                f"--log {target}: cannot open it for writing ({e.strerror or e}): give a file"
                " in a writable directory, 'syslog' or '-' (stderr)"
            ) from None
        fmt = FILE_FORMAT
    handler.setFormatter(logging.Formatter(fmt))
    return handler


def setup(target: str, debug: bool = False) -> None:
    """Send every log record (INFO and above, DEBUG with `debug`) to `target` only."""
    root = logging.getLogger()
    for old in root.handlers:
        old.close()
    root.handlers[:] = [handler_for(target)]
    root.setLevel(logging.DEBUG if debug else logging.INFO)


def reopen() -> None:
    """Reopen every log file at its path (after logrotate moved it away)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.acquire()
            try:
                if handler.stream is not None:
                    handler.stream.close()
                handler.stream = handler._open()
            finally:
                handler.release()
    logging.getLogger(__name__).info("LOG-REOPENED on SIGHUP")
