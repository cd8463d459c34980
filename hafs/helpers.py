"""mount(8) and fsck(8) integration: SOURCE, the generic mount options, mount.hafs.

`mount -t hafs SOURCE MOUNTPOINT -o OPTIONS` (or an fstab line of that shape)
runs `/sbin/mount.hafs SOURCE MOUNTPOINT [-sfnv] [-o OPTIONS]`; an fstab line
with a pass number gets `fsck.hafs [-a|-p|-n|-y|-f] SOURCE`.  `hafs
install-helpers` puts both where mount(8) and fsck(8) look (/sbin), as small
scripts that run the Python hafs is installed in.

SOURCE is parsed in one place (`parse_source`): today the filesystem's home
directory.  The generic options mount(8) passes are split from hafs's own in
one place too (`split_generic`), and given to the daemon as a `Generic` value.

Concurrency: no shared state; everything here runs before the daemon starts.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError

log = logging.getLogger(__name__)

HELPER_DIR = Path("/sbin")  # where mount(8) and fsck(8) look for mount.TYPE / fsck.TYPE
HELPERS = {"mount.hafs": "hafs.helpers:mount_main", "fsck.hafs": "hafs.cli:fsck_main"}

FUSE_FLAGS = {"nosuid", "suid", "nodev", "dev", "noexec", "exec"}  # passed on to the kernel
ATIME = {"noatime", "atime", "relatime", "norelatime", "strictatime", "nostrictatime"}
# mount(8) acted on these already (or they are for it, systemd or the reader of fstab)
IGNORED = {"defaults", "auto", "noauto", "nofail", "_netdev", "user", "nouser", "users"}
IGNORED |= {"owner", "group", "async", "nodiratime"}
IGNORED_PREFIXES = ("x-", "comment=", "user=")


@dataclass
class Generic:
    """What the generic options of mount(8) ask of a mount."""

    read_only: bool = False
    fuse: set[str] = field(default_factory=set)  # nosuid, nodev, noexec, ... for the kernel

    def fuse_options(self) -> set[str]:
        """FUSE mount options: ro or rw, noatime (hafs updates atime only when set), flags."""
        return {"ro" if self.read_only else "rw", "noatime", *self.fuse}


def parse_source(source: str) -> Path:
    """The home directory named by mount(8)'s or fsck(8)'s SOURCE."""
    if "://" in source:
        raise UserError(
            f"mount source {source!r}: only a filesystem's home directory is supported"
            " (the directory given to 'hafs mkfs --home')"
        )
    home = Path(source).expanduser().absolute()
    if not (home / "meta.db").exists():
        raise UserError(
            f"mount source {source}: no hafs filesystem there; create one with"
            f" 'hafs mkfs --home {home}'"
        )
    return home


def split_generic(options: str | None) -> tuple[Generic, str]:
    """Take mount(8)'s generic options out of `-o OPTIONS`; the rest are hafs's own."""
    generic = Generic()
    rest = []
    for item in filter(None, (options or "").split(",")):
        if item in ("ro", "rw"):
            generic.read_only = item == "ro"
        elif item in FUSE_FLAGS:
            generic.fuse.add(item)
        elif item in ATIME:
            if item != "noatime":
                log.info("mount option %s: hafs sets access times only when asked (noatime)", item)
        elif item in IGNORED or item.startswith(IGNORED_PREFIXES):
            pass
        else:
            rest.append(item)
    return generic, ",".join(rest)


def known_option(item: str) -> bool:
    """Whether `item` of `-o` is an option hafs knows (generic or its own)."""
    from .fs.vfs import Options
    from .mount import FUSE_PASSTHROUGH

    name = item.partition("=")[0]
    return (
        not split_generic(item)[1]
        or name in Options.__dataclass_fields__
        or (name in FUSE_PASSTHROUGH)
    )


def mount_main(argv: list[str] | None = None) -> int:
    """`mount.hafs SOURCE MOUNTPOINT [-sfnv] [-o OPTIONS]`, as mount(8) calls it."""
    from . import mount

    ap = argparse.ArgumentParser(
        prog="mount.hafs",
        description="Mount a hafs filesystem; called by mount(8) for 'mount -t hafs SOURCE"
        " MOUNTPOINT' and fstab lines of type hafs. SOURCE is the filesystem's home directory.",
    )
    ap.add_argument("source", metavar="SOURCE")
    ap.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")
    ap.add_argument("-o", dest="options", metavar="OPTIONS", help="comma-separated mount options")
    ap.add_argument("-s", dest="sloppy", action="store_true", help="drop unknown options")
    ap.add_argument("-f", dest="fake", action="store_true", help="check everything, mount nothing")
    ap.add_argument("-n", dest="no_mtab", action="store_true", help="(accepted: no mtab is kept)")
    ap.add_argument("-v", dest="verbose", action="store_true", help="say what was mounted")
    ap.add_argument("-t", dest="type", help=argparse.SUPPRESS)  # hafs or hafs.SUBTYPE
    args = ap.parse_args(argv)
    try:
        home = parse_source(args.source)
        options = args.options or ""
        if args.sloppy:
            options = ",".join(i for i in options.split(",") if i and known_option(i))
        mount.parse_options(split_generic(options)[1])  # refuse bad options before forking
        if args.fake:
            return 0
    except UserError as e:
        print(f"mount.hafs: {e}", file=sys.stderr)
        return 32  # mount(8): mount failure
    argv = ["--home", str(home), str(args.mountpoint.absolute())]
    if options:
        argv[:0] = ["-o", options]
    code = mount.start_background(argv)
    if code == 0 and args.verbose:
        print(f"mount.hafs: mounted {home} at {args.mountpoint}")
    return 0 if code == 0 else 32


def install_helpers(directory: Path = HELPER_DIR) -> list[Path]:
    """Write mount.hafs and fsck.hafs into `directory` as scripts run by this Python.

    A script naming the interpreter, not a link to pip's entry point: pip's
    scripts directory (a venv's, pyenv's) is not where mount(8) runs, and
    `python -m hafs install-helpers` from a checkout has none.
    """
    written = []
    for name, entry in HELPERS.items():
        module, func = entry.split(":")
        path = directory / name
        text = (
            f"#!{os.path.abspath(sys.executable)}\n"
            f"# {name}: written by 'hafs install-helpers'\n"
            f"import sys\nfrom {module} import {func}\nsys.exit({func}())\n"
        )
        tmp = path.with_name(f".{name}.tmp")
        tmp.write_text(text)
        tmp.chmod(0o755)
        tmp.replace(path)
        written.append(path)
    return written
