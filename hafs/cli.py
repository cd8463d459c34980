"""The `hafs` command: one entry point, one subcommand per tool.

Exit codes: 0 success, 1 operation failed, 2 bad input (a UserError: wrong
option, missing or foreign directory, ...), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from . import __version__, logs
from . import home as home_mod
from .errors import HafsError, UserError

log = logging.getLogger(__name__)

EPILOG = """\
exit codes: 0 success, 1 the operation failed, 2 bad input (the message says what
to change), 130 interrupted.
Without --home, commands use $HAFS_HOME, else the per-user data directory
(~/.local/share/hafs); 'hafs mount' creates the default filesystem there on first use.
"""


def _home_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--home",
        type=Path,
        help="directory holding the filesystem's metadata (default: $HAFS_HOME or"
        " ~/.local/share/hafs); with --meta, this client's local state (log, pid files)",
    )
    _meta_arg(p)


def _meta_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--meta",
        metavar="URL",
        default=os.environ.get("HAFS_META") or None,
        help="cluster mode: the metadata lives in etcd at etcd://HOST:PORT[,HOST:PORT...]/NAME"
        " (default: $HAFS_META); the local state then goes to --home or"
        " ~/.local/share/hafs/clients/NAME",
    )


def _log_arg(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument(
        "--log",
        metavar="FILE|syslog|-",
        help=f"where the log goes: a file (reopened on SIGHUP, for logrotate), syslog, or -"
        f" for stderr (default: {default})",
    )


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="hafs",
        description="hafs: a high-availability filesystem in user space. Files are cut into"
        " content-hashed blocks, each stored on R backing directories chosen by a"
        " consistent-hash ring.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--version", action="version", version=f"hafs {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "mkfs",
        help="create a filesystem",
        description="Create a filesystem whose state lives in --home. Without --node, three"
        " backing directories are made inside it (nodes n1, n2, n3).",
    )
    p.add_argument(
        "--home",
        type=Path,
        help="directory for the new filesystem (required without --meta; with it, this"
        " client's local state)",
    )
    _meta_arg(p)
    p.add_argument(
        "--replicas",
        "-r",
        type=int,
        default=home_mod.DEFAULT_REPLICAS,
        help="copies of every block, each on a different node (default: %(default)s)",
    )
    p.add_argument(
        "--node",
        action="append",
        metavar="ADDRESS",
        default=None,
        help="a node: a backing directory (empty or new) or the http://HOST:PORT (https://"
        " with --tls-cert on the node) of a 'hafs node' serving an empty directory; repeat for"
        " each node (ids n1, n2, ... in this order). Directories and remote nodes can be mixed.",
    )
    p.add_argument(
        "--write-quorum",
        "-w",
        type=int,
        metavar="W",
        help="a block write succeeds once W copies are durable (default: a majority of R);"
        " hafs still tries to write R",
    )
    p.add_argument(
        "--token-file",
        type=Path,
        metavar="FILE",
        help="the bearer token the remote nodes were started with (their --token-file); it is"
        " kept in the filesystem's metadata",
    )
    p.add_argument(
        "--ca-file",
        type=Path,
        metavar="FILE",
        help="the CA certificate (PEM) that signed the https nodes' certificates; it is kept in"
        " the filesystem's metadata (default: the system's CAs check them)",
    )

    p = sub.add_parser(
        "mount",
        help="mount a filesystem",
        description="Mount the filesystem at MOUNTPOINT (an empty directory). Returns once the"
        " mount is ready; the daemon runs in the background and logs to HOME/hafs.log.",
        epilog="mount options (-o name=value,...): cache_mb (read cache, default 128),"
        " write_buffer_mb (buffered writes of all files, default 256), flush_mb (a file with"
        " this much buffered data starts storing it, default 16), readahead_blocks (default 4),"
        " readahead_kb (the kernel's read-ahead, default 1024), threads (block I/O threads,"
        " default 16), gc_grace_s (unreferenced blocks are deleted"
        " after this long, default 600), gc_interval_s (default 30), lock_ttl_s (write-lock"
        " lease, default 10), lock_wait_s (wait for another mount's write lock, default 30),"
        " node_timeout_s (a remote node's request fails after this long and the next node is"
        " used, default 10), probe_interval_s (how often down nodes are asked again, default"
        " 2), repair_interval_s (how often blocks written while a node failed are put right,"
        " default 10), meta_timeout_s (cluster mode: a metadata call etcd does not answer"
        " fails with EIO after this long, default 30; calls work again once etcd is back),"
        " allow_other, allow_root; and mount(8)'s generic options: ro (the kernel"
        " refuses writes with EROFS and the daemon writes nothing), rw, nosuid, nodev, noexec"
        " (passed to the kernel), noatime (always: access times change only when set;"
        " relatime, strictatime are accepted and mount noatime), defaults, noauto, _netdev,"
        " user, nouser, nofail, x-* (accepted; mount(8) acts on them).",
    )
    _home_arg(p)
    p.add_argument(
        "--foreground",
        "-f",
        action="store_true",
        help="stay in the foreground, log to stderr; Ctrl-C flushes and unmounts",
    )
    p.add_argument("-o", dest="options", metavar="OPTIONS", help="comma-separated mount options")
    _log_arg(p, "HOME/hafs.log in the background; stderr with --foreground or under systemd")
    p.add_argument("--debug", action="store_true", help="log debug messages")
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    p.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")

    p = sub.add_parser(
        "install-helpers",
        help="put mount.hafs and fsck.hafs where mount(8) and fsck(8) look (/sbin)",
        description="Write /sbin/mount.hafs and /sbin/fsck.hafs, small scripts that run hafs"
        " with this Python, so that 'mount -t hafs HOME MOUNTPOINT', fstab lines of type hafs"
        " and 'fsck -t hafs HOME' work. Needs root.",
    )
    p.add_argument("--dir", type=Path, default=Path("/sbin"), help="(default: %(default)s)")

    p = sub.add_parser(
        "install-systemd",
        help="install the systemd units hafs-node@.service and hafs-mount@.service",
        description="Write hafs-node@.service (a block node) and hafs-mount@.service (a client"
        " mount) into --dir, with this Python's path; each instance reads its settings from"
        " /etc/hafs (see the comment at the top of each unit). Then 'systemctl daemon-reload'.",
    )
    p.add_argument(
        "--dir", type=Path, default=Path("/etc/systemd/system"), help="(default: %(default)s)"
    )

    p = sub.add_parser(
        "umount",
        help="unmount a filesystem",
        description="Flush and unmount a hafs mount, and wait until its daemon has exited.",
    )
    p.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")

    p = sub.add_parser(
        "stats",
        help="show a mount's operations, throughput, cache and nodes live, every second",
        description="Show the figures of a hafs mount live, refreshed every second (like top on"
        " a terminal; one line per interval otherwise): operations and their latency, bytes"
        " read and written, block cache hit rate, block gets and puts to the nodes with their"
        " latency and errors, nodes up and down, degraded blocks, write locks, write-buffer"
        " fill. The mount must have been mounted with -o metrics=HOST:PORT. Ctrl-C ends it.",
    )
    p.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")
    p.add_argument(
        "--interval", type=float, default=1.0, metavar="SECONDS", help="(default: %(default)g)"
    )
    p.add_argument("--count", type=int, metavar="N", help="stop after N refreshes")

    p = sub.add_parser(
        "status",
        help="show nodes, replicas and space",
        description="Show the filesystem's nodes (id, address, weight, up/down, blocks, bytes),"
        " its replica count, and logical vs stored bytes (the dedup ratio).",
    )
    _home_arg(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    from .admin import nodes as nodeadmin
    from .node import server as node_mod

    p = sub.add_parser(
        "node",
        help="serve a block node, or list, add, remove and reweight a filesystem's nodes",
        description="Serve one backing directory to the network as a block node: 'hafs node"
        " --data DIR --listen HOST:PORT'. A new, empty DIR waits to be claimed by 'hafs mkfs"
        " --node http://HOST:PORT' or 'hafs node add http://HOST:PORT' (which write the"
        " node's identity into it); a DIR that belongs to a filesystem serves that filesystem"
        " only. Ctrl-C or SIGTERM stops it cleanly. With a subcommand instead, manage the"
        " nodes of a filesystem's ring: 'hafs node list|add|remove|set|adopt ... [--home DIR]'"
        " ('hafs node SUBCOMMAND --help'); each change makes a new ring version that running"
        " mounts pick up within a second, and 'hafs rebalance' then moves the blocks. 'hafs node"
        " token|ca' change the token or the CA the clients use for every node.",
    )
    node_mod.add_arguments(p)
    nodeadmin.add_subcommands(p, _home_arg)

    from .admin.fsck import DEFAULT_GRACE_S, arg_grace, arg_rate

    p = sub.add_parser(
        "fsck",
        help="check and repair metadata, replicas and garbage",
        description="Check the filesystem: metadata consistency (entries, orphan inodes, link"
        " counts, extents, refcounts, the SQLite database), replicas (every referenced block on"
        " the R nodes the ring names) and garbage (blocks nothing references). Without --repair"
        " nothing is changed, and it may run while the filesystem is mounted. Files that lost"
        " data are named. Also installed as fsck.hafs.",
        epilog="exit codes (as fsck(8)): 0 no errors, 1 errors corrected, 4 errors left"
        " uncorrected, 8 operational error (no filesystem, unreadable metadata, --repair while"
        " mounted), 32 interrupted.",
    )
    _home_arg(p)
    p.add_argument(
        "--repair",
        action="store_true",
        help="fix what can be fixed: re-replicate from a good copy, fix the metadata, delete"
        " garbage older than --grace (refused while mounted)",
    )
    p.add_argument(
        "--salvage",
        action="store_true",
        help="embedded filesystems: if the SQLite database (meta.db) is damaged, rebuild it"
        " from what can be read of it, keeping the damaged file as meta.db.damaged-TIME; then"
        " repair as --repair does (refused while mounted)",
    )
    p.add_argument(
        "--deep",
        action="store_true",
        help="read every replica and verify its hash (default: check presence and size)",
    )
    p.add_argument("--json", action="store_true", help="print a JSON report instead of a summary")
    p.add_argument(
        "--rate",
        type=arg_rate,
        metavar="MB/s",
        help="limit replica reads to this many MiB per second (default: no limit)",
    )
    p.add_argument(
        "--grace",
        type=arg_grace,
        default=DEFAULT_GRACE_S,
        metavar="SECONDS",
        help="unreferenced blocks younger than this are left for writers (default: %(default)g)",
    )

    p = sub.add_parser(
        "meta",
        help="dump or load a filesystem's whole metadata (backup; embedded <-> cluster)",
        description="'hafs meta dump' writes the whole metadata of a filesystem (inodes,"
        " names, xattrs, extents, blocks, the ring and settings) to stdout as JSON lines, read"
        " from one state of it (safe while mounted); 'hafs meta load' makes a new filesystem"
        " of such a dump, read from stdin, in an empty engine: a new --home (SQLite) or a new"
        " --meta NAME (etcd). The blocks stay where they are: the loaded filesystem uses the"
        " dump's nodes and becomes their owner, so the metadata the dump came from can no"
        " longer change them (only a read-only mount of it works).",
    )
    msub = p.add_subparsers(dest="meta_command", metavar="SUBCOMMAND", required=True)
    for name, what in (
        ("dump", "write the metadata to stdout (hafs meta dump --home H > fs.json)"),
        ("load", "make a new filesystem of a dump read from stdin (hafs meta load ... < fs.json)"),
    ):
        _home_arg(msub.add_parser(name, help=what, description=what[0].upper() + what[1:] + "."))

    p = sub.add_parser(
        "rebalance",
        help="move blocks to where the ring puts them (after node add/remove/set)",
        description="Move every block copy that sits on a node the ring does not name for it"
        " to the node that it names: copy, verify the hash there, then delete the old copy,"
        " so no block ever has fewer good copies. Also restores copies missing on the named"
        " nodes, and drops drained nodes from the ring once empty. Safe while mounted; kill it"
        " at any time and run it again to finish. --dry-run prints the plan only.",
        epilog="exit codes: 0 every block is where the ring puts it, 1 some blocks could not"
        " be moved (a node down or failing: the summary says which; run it again), 2 bad"
        " input, 130 interrupted.",
    )
    _home_arg(p)
    p.add_argument(
        "--dry-run",
        "-n",
        action="store_true",
        help="list the nodes and print what would move (blocks, bytes, from where to where,"
        " the fraction of all replicas and the ideal fraction); change nothing",
    )
    p.add_argument(
        "--bandwidth",
        type=arg_rate,
        metavar="MB/s",
        help="copy at most this many MiB per second (default: no limit)",
    )
    p.add_argument("--json", action="store_true", help="print a JSON report instead of a summary")
    return ap


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `hafs status | head` ends quietly
    args = build_parser().parse_args(argv)
    args.made = []  # what _home made (a new state directory of --meta): gone if we fail
    code = 1
    try:
        code = COMMANDS[args.command](args)
    except UserError as e:
        print(f"hafs: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    finally:
        if code not in REACHED:
            home_mod.unmake(args.made)
    return code


REACHED = (0, 1, 4)  # exit codes of a command that worked with the filesystem (fsck: 4)


def _home(args) -> Path:
    return home_mod.resolve_home(
        args.home, getattr(args, "meta", None), getattr(args, "made", None)
    )


def cmd_mkfs(args) -> int:
    if args.home is None and not args.meta:
        raise UserError("hafs mkfs needs --home DIR (embedded) or --meta etcd://... (cluster)")
    home = _home(args)
    fs_uuid = home_mod.create(
        home,
        args.replicas,
        args.node,
        token=home_mod.read_token_file(args.token_file),
        ca_pem=home_mod.read_ca_file(args.ca_file),
        quorum=args.write_quorum,
    )
    print(f"created hafs filesystem {fs_uuid} in {args.meta or home}")
    return 0


def cmd_mount(args) -> int:
    from . import mount

    home = _home(args)
    if not home_mod.holds_fs(home) and home != home_mod.default_home().absolute():
        raise UserError(f"no hafs filesystem in {home}: create one with 'hafs mkfs --home {home}'")
    home.mkdir(parents=True, exist_ok=True)
    if args.foreground:
        target = args.log or ("-" if args.ready_fd is None else str(home / "hafs.log"))
        logs.setup(target, args.debug)
        return mount.run_foreground(home, args.mountpoint, args.options, args.ready_fd)
    target = args.log or ("-" if logs.under_systemd() else str(home / "hafs.log"))
    if target not in ("-", "syslog"):
        target = str(Path(target).absolute())
    logs.handler_for(target).close()  # a target the daemon could not use is refused here
    argv = ["--home", str(home), "--log", target, str(args.mountpoint.absolute())]
    if args.options:
        argv[:0] = ["-o", args.options]
    if args.debug:
        argv.insert(0, "--debug")
    return mount.start_background(argv, keep_stderr=target == "-")


def cmd_install_helpers(args) -> int:
    from .helpers import install_helpers

    try:
        paths = install_helpers(args.dir)
    except OSError as e:
        raise UserError(f"cannot write into {args.dir}: {e.strerror or e} (run it as root)")
    print("installed " + ", ".join(map(str, paths)))
    return 0


def cmd_install_systemd(args) -> int:
    from . import systemd

    try:
        paths = systemd.install(args.dir)
    except OSError as e:
        raise UserError(f"cannot write into {args.dir}: {e.strerror or e} (run it as root)")
    print("installed " + ", ".join(map(str, paths)) + "; now run 'systemctl daemon-reload'")
    return 0


def cmd_umount(args) -> int:
    from . import mount

    return mount.umount(args.mountpoint)


def cmd_stats(args) -> int:
    from . import mount
    from .admin import stats

    if args.interval <= 0:
        raise UserError(f"--interval must be more than 0 seconds, not {args.interval:g}")
    url = mount.metrics_url(args.mountpoint)
    return stats.run(url, str(args.mountpoint), args.interval, args.count)


def cmd_status(args) -> int:
    from .admin.status import gather, render

    report = gather(_home(args))
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0 if all(n["up"] for n in report["nodes"]) else 1


@contextmanager
def _audit_log(home: Path, enabled: bool = True) -> Iterator[None]:
    """Log hafs's INFO and above to HOME/hafs.log (beside the mounts') while a tool runs."""
    logger = logging.getLogger("hafs")
    handler = None
    if enabled and home_mod.holds_fs(home):
        try:
            handler = logging.FileHandler(home / "hafs.log")
        except OSError:
            pass
    if handler is None:
        yield
        return
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
    )
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        handler.close()


def cmd_node(args) -> int:
    if args.node_command is not None:
        from .admin import nodes as nodeadmin

        home = _home(args)
        with _audit_log(home, enabled=args.node_command != "list"):
            return nodeadmin.run(args, home)
    if getattr(args, "data", None) is None:
        raise UserError(
            "give 'hafs node' --data DIR to serve a directory, or a subcommand (list, add,"
            " remove, set, token, ca, adopt) to manage a filesystem's nodes; see 'hafs node"
            " --help'"
        )
    from .node import server as node_mod

    return node_mod.run(args)


def cmd_rebalance(args) -> int:
    from .admin import rebalance

    home = _home(args)
    with _audit_log(home, enabled=not args.dry_run):
        report = rebalance.run(
            home, dry_run=args.dry_run, bandwidth_mib=args.bandwidth, progress=rebalance.Progress()
        )
    print(json.dumps(report.to_json(), indent=2) if args.json else report.render())
    return report.exit_code


def cmd_meta(args) -> int:
    from .admin import dump

    home = _home(args)
    try:
        if args.meta_command == "dump":
            if sys.stdout.isatty():
                raise UserError("hafs meta dump writes to stdout: redirect it (> fs.json)")
            print(dump.run_dump(home, sys.stdout.buffer), file=sys.stderr)
            return 0
        if sys.stdin.isatty():
            raise UserError("hafs meta load reads a dump from stdin: hafs meta load ... < fs.json")
        print(dump.run_load(home, sys.stdin.buffer, "stdin"))
        print(
            "note: it uses the nodes of the filesystem the dump came from and owns them now:"
            " the metadata the dump came from can no longer change them (read-only mounts"
            " still read; README, 'Backups and damaged metadata')",
            file=sys.stderr,
        )
        return 0
    except UserError:
        raise
    except HafsError as e:
        print(f"hafs meta {args.meta_command}: {e}", file=sys.stderr)
        return 1


def cmd_fsck(args) -> int:
    from .admin import fsck

    home = _home(args)
    salvage = getattr(args, "salvage", False)
    audit = None  # repairs are logged (FSCK-REPAIR ...) to HOME/hafs.log beside the mounts'
    if (args.repair or salvage) and home_mod.holds_fs(home):
        try:
            audit = logging.FileHandler(home / "hafs.log")
        except OSError:
            pass
        else:
            audit.setFormatter(
                logging.Formatter("%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
            )
            logging.getLogger("hafs").addHandler(audit)
            logging.getLogger("hafs").setLevel(logging.INFO)
    opts = {"deep": args.deep, "rate_mib": args.rate, "grace_s": args.grace}
    try:
        if salvage:
            from . import mount
            from .admin import salvage as salvage_mod

            daemons = mount.live_daemons(home)
            report = salvage_mod.run(home, daemons=daemons, progress=fsck.Progress(), **opts)
        else:
            report = fsck.run(home, repair=args.repair, progress=fsck.Progress(), **opts)
        log.info("FSCK-DONE exit %d: %s", report.exit_code, report.error or dict(report.fixed))
    except KeyboardInterrupt:
        print("hafs fsck: interrupted", file=sys.stderr)
        return 32
    except Exception:
        log.exception("hafs fsck: unexpected error")
        print("hafs fsck: unexpected error (traceback above)", file=sys.stderr)
        return fsck.EXIT_OPERATIONAL
    finally:
        if audit is not None:
            logging.getLogger("hafs").removeHandler(audit)
            audit.close()
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    elif report.error:
        print(f"hafs fsck: {report.error}", file=sys.stderr)
    else:
        print(report.render())
    return report.exit_code


def fsck_main(argv: list[str] | None = None) -> int:
    """`fsck.hafs [-n|-y|-p|-a] [-f] [--deep] [--json] [--rate MB/s] [--grace S] [SOURCE]`.

    The form fsck(8) calls (`fsck -t hafs HOME`, or an fstab line with a pass
    number): -n checks only, -y/-p/-a repair; SOURCE is the mount's source.
    """
    from .admin.fsck import DEFAULT_GRACE_S, arg_grace, arg_rate
    from .helpers import parse_source

    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    ap = argparse.ArgumentParser(
        prog="fsck.hafs",
        description="Check (and with -y, -p or -a repair) a hafs filesystem; see 'hafs fsck'.",
        epilog="exit codes: 0 no errors, 1 errors corrected, 4 errors left uncorrected,"
        " 8 operational error, 16 usage error, 32 interrupted.",
    )
    ap.add_argument("-n", dest="repair", action="store_false", help="check only (the default)")
    for flag in ("-y", "-p", "-a"):
        ap.add_argument(flag, dest="repair", action="store_true", help="repair")
    ap.add_argument("-f", "-v", "-V", dest="ignored", action="count", help=argparse.SUPPRESS)
    ap.add_argument("--deep", action="store_true", help="read and hash every replica")
    ap.add_argument("--json", action="store_true", help="print a JSON report")
    ap.add_argument("--rate", type=arg_rate, metavar="MB/s", help="limit replica reads (MiB/s)")
    ap.add_argument("--grace", type=arg_grace, default=DEFAULT_GRACE_S, metavar="SECONDS")
    ap.add_argument("home", nargs="?", metavar="SOURCE", help="the filesystem's home directory")
    ap.set_defaults(repair=False)
    try:
        args = ap.parse_args(argv)
    except SystemExit as e:
        return 0 if e.code == 0 else 16
    if args.home is not None:
        try:
            args.home = parse_source(args.home)
        except UserError as e:
            print(f"fsck.hafs: {e}", file=sys.stderr)
            return 8
    return cmd_fsck(args)


COMMANDS = {
    "mkfs": cmd_mkfs,
    "mount": cmd_mount,
    "umount": cmd_umount,
    "install-helpers": cmd_install_helpers,
    "install-systemd": cmd_install_systemd,
    "stats": cmd_stats,
    "status": cmd_status,
    "fsck": cmd_fsck,
    "node": cmd_node,
    "rebalance": cmd_rebalance,
    "meta": cmd_meta,
}
