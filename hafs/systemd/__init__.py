"""systemd integration: readiness (sd_notify) and the shipped unit files.

`notify("READY=1")` sends one datagram to $NOTIFY_SOCKET, the whole of the
sd_notify protocol a Type=notify service needs (a path, or an abstract socket
when it starts with '@'); without the variable it does nothing.  The unit
files beside this module are templates: `install` writes them to a systemd
directory with the absolute path of the Python hafs runs on, so they work
whatever Python (system, venv, pyenv) hafs was installed with.

Concurrency: stateless; `notify` is a non-blocking send, safe in the trio loop.
"""

from __future__ import annotations

import os
import socket
import sys
from importlib import resources
from pathlib import Path

UNITS = ("hafs-node@.service", "hafs-mount@.service")


def notify(state: str) -> bool:
    """Send `state` (e.g. "READY=1") to systemd; False when not run by it or unreachable."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(address)
            s.sendall(state.encode())
    except OSError:
        return False
    return True


def unit_text(name: str) -> str:
    """The unit file `name` with @PYTHON@ replaced by this interpreter's absolute path."""
    text = resources.files(__name__).joinpath(name).read_text()
    return text.replace("@PYTHON@", os.path.abspath(sys.executable))


def install(directory: Path) -> list[Path]:
    """Write the unit files into `directory` (e.g. /etc/systemd/system); returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name in UNITS:
        path = directory / name
        path.write_text(unit_text(name))
        written.append(path)
    return written
