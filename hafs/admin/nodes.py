"""`hafs node list|add|remove|set|adopt|token|ca`: the nodes of a filesystem's ring, and
the credentials clients present to them.

Every change writes a new ring version (version + 1) into the metadata in one
transaction (`MetaStore.replace_ring`, a compare-and-set on the version, so two
changes made at once cannot lose one another: the loser re-reads and re-checks).
Running mounts switch to the new version within about a second
(`RING_RELOAD_S`); `hafs rebalance` then moves the blocks the change displaced.

- add: a backing directory (empty or new) or the http:// address of a `hafs
  node` serving an empty directory; it is checked and claimed as mkfs does
  (`home.check_new_node`, `home.init_node`) before the ring names it.
- remove: the node drains (state "draining"): it takes no new blocks, reads
  still find what it holds, and `hafs rebalance` moves its blocks to their new
  homes and drops it from the ring once it is empty.  Its directory (or
  server) is left as it is, for the user to reuse or delete.
- remove --lost: for a node that is gone for good; it leaves the ring at once
  and its blocks are restored from the other nodes (hafs.admin.lost).
- adopt: make this metadata store the owner of its nodes (hafs.store.owner): a
  home moved to another disk or restored from a backup, which the other commands
  refuse as a possible copy of a home.
- set: weight, zone, or state ("up" cancels a removal not yet finished), or the
  address of a node that moved (another host or path): the node must answer
  there as itself (`home.check_node`: its directory's identity, or the `hafs
  node` serving it), so the ring never names another node's directory.
- token, ca: store a new bearer token, or a new CA for the nodes' certificates, in
  the configuration, once every remote node that answers accepts it (a node that
  refuses it: UserError, nothing changed; one that is down is named and left).
  Running mounts and tools re-read the configuration when a node refuses their
  credentials, and retry with the new ones (hafs.store.remote, NodeAuth).  `add`
  with --token-file or --ca-file stores them the same way when the filesystem has
  none yet; another token or CA than the filesystem's is refused.

Refused with a clear message (UserError, exit 2, nothing changed): an unknown
id, an address or id the ring already has, any change that would leave fewer
nodes taking blocks (state up, weight > 0) than the R replicas, and every
change made from a copy of a home (`home.owner_claim`).

No lock is needed beyond the transaction: the tool is short and synchronous.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from .. import home as home_mod
from ..errors import UserError
from ..home import change_ring
from ..meta import FsConfig, MetaStore
from ..store.owner import OwnerClaim
from ..store.remote import NodeAuth, NodeAuthError, NodeCertificateError, NodeError, RemoteStore
from ..store.ring import NODE_STATES, NodeSpec, Ring
from . import tool_session
from .status import node_table, render_nodes

log = logging.getLogger(__name__)

NODE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
CHECK_TIMEOUT_S = 5.0  # how long a node is given to answer (new credentials, an adopt)


def add_subcommands(p: argparse.ArgumentParser, home_arg: Callable) -> None:
    """Add `list`, `add`, `remove`, `set`, `adopt` under the `hafs node` parser `p`."""
    sub = p.add_subparsers(
        dest="node_command",
        metavar="{list,add,remove,set,adopt,token,ca}",
        required=False,
        title="managing the nodes of a filesystem (instead of serving one)",
    )
    q = sub.add_parser(
        "list",
        help="the ring's nodes: state, weight, zone, blocks and bytes held",
        description="List the nodes of the ring: id, address, weight, zone, state (up, down,"
        " draining), blocks and bytes held, the share of the ring's placements each should"
        " hold and the share of the data it holds. Exit 1 if a node is down.",
    )
    home_arg(q)
    q.add_argument("--json", action="store_true", help="print JSON instead of a table")

    q = sub.add_parser(
        "add",
        help="add a node to the ring",
        description="Add a node: a backing directory (empty or new) or the http://HOST:PORT of a"
        " 'hafs node' serving an empty directory (it is claimed for this filesystem). The ring"
        " gets a new version, running mounts use it within a second, new blocks go to the new"
        " node at once; run 'hafs rebalance' to move its share of the existing blocks.",
    )
    home_arg(q)
    q.add_argument(
        "address", metavar="ADDRESS", help="a directory, http://HOST:PORT or https://HOST:PORT"
    )
    q.add_argument("--id", dest="node_id", help="the node's id (default: the next free nK)")
    q.add_argument(
        "--weight",
        type=float,
        default=1.0,
        help="its share of the blocks relative to the others (default: %(default)g)",
    )
    q.add_argument("--zone", help="failure zone: replicas go to distinct zones where possible")
    q.add_argument(
        "--token-file",
        type=Path,
        metavar="FILE",
        help="the bearer token the node was started with: the filesystem's (the default), or"
        " the first token of a filesystem that has none yet (then kept in its configuration)",
    )
    q.add_argument(
        "--ca-file",
        type=Path,
        metavar="FILE",
        help="the CA (PEM) that signed an https node's certificate: the filesystem's (the"
        " default), or the first CA of a filesystem that has none yet (then kept for all its"
        " https nodes; until then they are checked against the system's CAs)",
    )

    q = sub.add_parser(
        "remove",
        help="drain a node; it leaves the ring once rebalance emptied it (--lost: at once)",
        description="Remove a node: it drains at once (takes no new blocks; reads still find"
        " its blocks) and 'hafs rebalance' moves its blocks to their new homes, then drops it"
        " from the ring. With --lost, for a node that is gone for good (its directory deleted,"
        " its host dead): it leaves the ring at once, every block that files use is restored"
        " to R verified copies from the other nodes, and every file that had a block with no"
        " other copy is named. Refused if fewer than R nodes would be left taking blocks.",
        epilog="exit codes: 0 done (with --lost: every block files use has R copies again),"
        " 1 (--lost) some files lost data (they are named) or some blocks are still short of"
        " copies because another node failed (run 'hafs rebalance' once it answers), 2 bad"
        " input (nothing changed; also: --lost for a node that still answers), 130"
        " interrupted.",
    )
    home_arg(q)
    q.add_argument("node_id", metavar="ID")
    q.add_argument(
        "--lost",
        action="store_true",
        help="the node is gone for good: drop it now and restore its blocks from the others",
    )
    q.add_argument("--json", action="store_true", help="(--lost) print a JSON report")

    q = sub.add_parser(
        "set",
        help="change a node's weight, zone or state",
        description="Change a node's weight or zone (then run 'hafs rebalance'), set"
        " --state up to cancel a removal that rebalance has not finished, or give a node that"
        " moved (another host or path) its new --address: the node there must answer as this"
        " node of this filesystem (its backing directory's identity, or the 'hafs node' serving"
        " it), else nothing changes.",
    )
    home_arg(q)
    q.add_argument("node_id", metavar="ID")
    q.add_argument(
        "--address",
        help="the node's new address: its directory, http://HOST:PORT or https://HOST:PORT",
    )
    q.add_argument("--weight", type=float, help="new weight (0: takes no new blocks)")
    q.add_argument("--zone", help="new zone ('' for none)")
    q.add_argument("--state", choices=NODE_STATES, help="up, or draining (as 'hafs node remove')")

    q = sub.add_parser(
        "adopt",
        help="make this metadata the owner of its nodes (a home moved or restored)",
        description="Make this filesystem's metadata the owner of every node of its ring. A"
        " copy of a home (cp -a) names the original's nodes and is refused by every command"
        " that would change them; so is a home whose meta.db is another file now: moved to"
        " another disk, restored from a backup. If this IS the filesystem and the original is"
        " gone for good, adopt it: it gets a new owner token, every node records it, and every"
        " other copy of the metadata is refused by the nodes from then on."
        " Runs alone (no mount, rebalance or repair meanwhile).",
        epilog="exit codes: 0 every node records this metadata as its owner, 1 some nodes"
        " did not answer (they take it when this metadata next opens them; run it again once"
        " they answer), 2 bad input.",
    )
    home_arg(q)

    q = sub.add_parser(
        "token",
        help="change the bearer token of the filesystem's nodes (a rotation: see the README)",
        description="Store a new bearer token for the nodes in the filesystem's configuration."
        " First put the new token as a line of every node's --token-file, beside the old one,"
        " and send each node SIGHUP; this command checks that every node that answers accepts"
        " it (else it changes nothing). Running mounts take the new token the first time a node"
        " refuses the old one. Then remove the old line from the nodes' files and send SIGHUP.",
    )
    home_arg(q)
    q.add_argument("--token-file", type=Path, metavar="FILE", required=True, help="the new token")

    q = sub.add_parser(
        "ca",
        help="change the CA the nodes' TLS certificates are checked against",
        description="Store a new CA certificate (PEM; several certificates in one file are all"
        " trusted, for a change of CA) in the filesystem's configuration, once every https node"
        " that answers shows a certificate it signs (else nothing is changed). Running mounts"
        " take it the first time a node's certificate is refused.",
    )
    home_arg(q)
    q.add_argument("--ca-file", type=Path, metavar="FILE", required=True, help="the new CA")


def run(args: argparse.Namespace, home: Path) -> int:
    """Dispatch `hafs node SUBCOMMAND`; returns the exit code."""
    if args.node_command == "list":
        report = list_nodes(home)
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            print(f"ring version {report['ring_version']}, {report['replicas']} replicas")
            print("\n".join(render_nodes(report["nodes"])))
        return 0 if all(n["up"] for n in report["nodes"]) else 1
    if args.node_command == "add":
        spec, ring = add_node(
            home,
            args.address,
            args.node_id,
            args.weight,
            args.zone,
            token=home_mod.read_token_file(args.token_file),
            ca_pem=home_mod.read_ca_file(args.ca_file),
        )
        print(
            f"added node {spec.id} ({spec.address}, weight {spec.weight:g}"
            f"{', zone ' + spec.zone if spec.zone else ''}): ring version {ring.version}."
            f" New blocks go to it now; 'hafs rebalance --home {home}' moves its share of the"
            " existing ones."
        )
        return 0
    if args.node_command == "remove" and args.lost:
        from .fsck import Progress
        from .lost import remove_lost

        report = remove_lost(home, args.node_id, progress=Progress())
        print(json.dumps(report.to_json(), indent=2) if args.json else report.render())
        return report.exit_code
    if args.node_command == "remove":
        ring, changed = remove_node(home, args.node_id)
        print(
            f"node {args.node_id} is {'' if changed else 'already '}draining: ring version"
            f" {ring.version}. It takes no new"
            f" blocks; 'hafs rebalance --home {home}' moves its blocks off and then drops it"
            " from the ring."
        )
        return 0
    if args.node_command == "set":
        ring, changed = set_node(
            home, args.node_id, args.weight, args.zone, args.state, args.address
        )
        if not changed:
            print(f"node {args.node_id}: nothing to change (ring version {ring.version})")
            return 0
        spec = ring.nodes[args.node_id]
        print(
            f"node {spec.id}: {spec.address}, weight {spec.weight:g}, zone {spec.zone or '-'},"
            f" {spec.state}: ring version {ring.version}."
            + (
                ""
                if args.weight is None and args.zone is None and args.state is None
                else f" 'hafs rebalance --home {home}' moves the blocks this displaced."
            )
        )
        return 0
    if args.node_command == "adopt":
        claim, failed = adopt(home)
        print(f"the metadata at {claim.where} is the owner of its nodes now")
        for node_id, why in failed.items():
            print(f"node {node_id} was not switched (it will be once it answers): {why}")
        return 1 if failed else 0
    if args.node_command in ("token", "ca"):
        if args.node_command == "token":
            changes = {"node_token": home_mod.read_token_file(args.token_file)}
        else:
            changes = {"ca_pem": home_mod.read_ca_file(args.ca_file)}
        changed, down = change_credentials(home, **changes)
        for node_id, why in down.items():
            print(f"hafs: warning: node {node_id} could not be asked: {why}", file=sys.stderr)
        what = "token" if args.node_command == "token" else "CA"
        if not changed:
            print(f"the nodes' {what} is already that one: nothing to change")
        elif what == "token":
            print(
                "the nodes' token is changed; running mounts take it the first time a node"
                " refuses the old one. Now remove the old token from every node's --token-file"
                " and send the node SIGHUP."
            )
        else:
            print(
                "the nodes' CA is changed; running mounts take it the first time a node's"
                " certificate is refused."
            )
        return 0
    raise AssertionError(args.node_command)


# ------------------------------------------------------------------ operations


def _open(home: Path) -> MetaStore:
    return home_mod.open_meta(home)


def _open_to_change(home: Path) -> tuple[MetaStore, OwnerClaim]:
    """The metadata and its claim on the nodes (UserError for a copy of a home)."""
    meta = _open(home)
    try:
        return meta, home_mod.owner_claim(meta, home)
    except BaseException:
        meta.close()
        raise


def _normalise(address: str) -> str:
    if home_mod.is_remote(address):
        if not address.startswith(("http://", "https://")):
            raise UserError(
                f"node address {address!r}: expected http://HOST:PORT or https://HOST:PORT"
            )
        return address.rstrip("/")
    return str(Path(address).expanduser().absolute())


def _same_address(a: str, b: str) -> bool:
    if home_mod.is_remote(a) or home_mod.is_remote(b):
        return a.lower() == b.lower()
    return Path(a).resolve() == Path(b).resolve()


def check_takers(specs: list[NodeSpec], replicas: int, what: str) -> None:
    """Refuse a ring with fewer nodes taking blocks (up, weight > 0) than R."""
    takers = [s.id for s in specs if s.state == "up" and s.weight > 0]
    if len(takers) < replicas:
        raise UserError(
            f"{what} would leave {len(takers)} node(s) taking blocks"
            f" ({', '.join(takers) or 'none'}), fewer than the {replicas} replicas of every"
            " block: add a node first ('hafs node add ADDRESS')"
        )


def known_node(ring: Ring, node_id: str) -> NodeSpec:
    spec = ring.nodes.get(node_id)
    if spec is None:
        raise UserError(
            f"no node {node_id!r} in the ring (nodes: {', '.join(ring.nodes)});"
            " 'hafs node list' shows them"
        )
    return spec


def list_nodes(home: Path) -> dict:
    meta = _open(home)
    try:
        ring = Ring.from_json(meta.ring())
        config = meta.config()
    finally:
        meta.close()
    return {
        "home": str(home),
        "ring_version": ring.version,
        "replicas": config.replicas,
        "nodes": node_table(
            ring, config.fs_uuid, NodeAuth(config.node_token, config.ca_pem), config.replicas
        ),
    }


def next_node_id(ring: Ring) -> str:
    """n1, n2, ...: one more than the highest nK in the ring."""
    nums = [int(i[1:]) for i in ring.nodes if re.fullmatch(r"n[0-9]+", i)]
    return f"n{max(nums, default=0) + 1}"


def add_node(
    home: Path,
    address: str,
    node_id: str | None = None,
    weight: float = 1.0,
    zone: str | None = None,
    *,
    token: str | None = None,
    ca_pem: str | None = None,
) -> tuple[NodeSpec, Ring]:
    """Check, claim and add a node; returns its spec and the new ring.

    `token`, `ca_pem`: what the node wants and shows, if not the filesystem's (which
    then has none, and keeps these: module docstring).
    """
    address = _normalise(address)
    meta, owner = _open_to_change(home)
    try:
        config = meta.config()
        fs_uuid = config.fs_uuid
        changes = _first_credentials(config, token, ca_pem)
        auth = NodeAuth(token or config.node_token, ca_pem or config.ca_pem)
        ring = Ring.from_json(meta.ring())
        if node_id is None:
            node_id = next_node_id(ring)
        elif not NODE_ID_RE.fullmatch(node_id):
            raise UserError(
                f"node id {node_id!r}: use letters, digits, '.', '_' or '-' (at most 64,"
                " starting with a letter or digit)"
            )
        if not weight > 0:
            raise UserError(f"--weight {weight:g}: a new node needs a weight above 0")
        try:
            spec = NodeSpec(node_id, address, weight, zone or None)
        except ValueError as e:
            raise UserError(str(e)) from None

        def check(current: Ring) -> None:
            if spec.id in current.nodes:
                raise UserError(
                    f"the ring already has a node {spec.id}: choose another --id"
                    " ('hafs node list' shows them)"
                )
            for other in current.nodes.values():
                if _same_address(other.address, spec.address):
                    hint = (
                        f"; to cancel its removal: 'hafs node set {other.id} --state up'"
                        if other.state == "draining"
                        else ""
                    )
                    raise UserError(f"{spec.address} already is node {other.id}{hint}")

        check(ring)
        home_mod.check_new_node(spec, auth)
        if changes:
            _store_credentials(home, meta, ring, changes)
        home_mod.init_node(spec, fs_uuid, auth, owner)

        def change(current: Ring) -> list[NodeSpec]:
            check(current)
            return [*current.nodes.values(), spec]

        ring = change_ring(meta, change)[0]
        log.info(
            "NODE-ADD %s at %s, weight %g, zone %s: ring version %d",
            spec.id,
            spec.address,
            spec.weight,
            spec.zone or "-",
            ring.version,
        )
        return spec, ring
    finally:
        meta.close()


def _first_credentials(config: FsConfig, token: str | None, ca_pem: str | None) -> dict:
    """The credentials `node add` stores: those given that the filesystem lacks; UserError
    for one that differs from the filesystem's."""
    changes = {}
    for key, given, what, command in (
        ("node_token", token, "token", "hafs node token --token-file"),
        ("ca_pem", ca_pem, "CA", "hafs node ca --ca-file"),
    ):
        have = getattr(config, key)
        if given is not None and have is not None and given != have:
            raise UserError(
                f"the filesystem's nodes use another {what}: give the new node the filesystem's"
                f" {what} (and drop the option), or change it for every node first ('{command}"
                " FILE': see the README)"
            )
        if given is not None and have is None:
            changes[key] = given
    return changes


def _ask_nodes(ring: Ring, fs_uuid: str, auth: NodeAuth) -> dict[str, str]:
    """Check that every remote node of `ring` accepts `auth` (a ping with it).

    Returns {node id: why} of those that could not be asked (down); UserError if one
    refuses the token or shows a certificate the CA does not sign.
    """
    remote = [s for s in ring.nodes.values() if home_mod.is_remote(s.address)]
    down: dict[str, str] = {}

    def ask(spec: NodeSpec) -> None:
        with RemoteStore(spec.address, spec.id, fs_uuid, auth=auth, timeout=CHECK_TIMEOUT_S) as s:
            try:
                s.ping()
            except NodeAuthError as e:
                raise UserError(
                    f"{e}: the node does not take the new token yet; add it as a line of the"
                    " node's --token-file and send the node SIGHUP, then try again (nothing"
                    " was changed)"
                ) from None
            except NodeCertificateError as e:
                raise UserError(f"{e} (nothing was changed)") from None
            except NodeError as e:
                down[spec.id] = str(e)

    if remote:
        with ThreadPoolExecutor(min(16, len(remote))) as pool:
            for future in [pool.submit(ask, s) for s in remote]:
                future.result()
    return down


def _store_credentials(home: Path, meta: MetaStore, ring: Ring, changes: dict) -> dict[str, str]:
    """Store new credentials once every remote node that answers takes them; returns the
    nodes that could not be asked (see `_ask_nodes`)."""
    config = replace(meta.config(), **changes)
    down = _ask_nodes(ring, config.fs_uuid, NodeAuth(config.node_token, config.ca_pem))
    meta.update_config(**changes)
    if config.node_token is not None:
        home_mod.keep_secret(home)
    log.info(
        "NODE-CREDENTIALS changed: %s%s",
        " and ".join("token" if k == "node_token" else "CA" for k in changes),
        f" (not asked, down: {', '.join(down)})" if down else "",
    )
    return down


def change_credentials(home: Path, **changes: str) -> tuple[bool, dict[str, str]]:
    """`hafs node token` / `hafs node ca`: store a new node_token or ca_pem once the nodes
    take it; (whether it changed, {node id: why} of nodes that could not be asked)."""
    meta = _open(home)
    try:
        config = meta.config()
        changes = {k: v for k, v in changes.items() if getattr(config, k) != v}
        if not changes:
            return False, {}
        return True, _store_credentials(home, meta, Ring.from_json(meta.ring()), changes)
    finally:
        meta.close()


def remove_node(home: Path, node_id: str) -> tuple[Ring, bool]:
    """Drain node `node_id` (rebalance empties it, then drops it); (ring, whether changed)."""
    meta = _open_to_change(home)[0]
    try:
        replicas = meta.config().replicas

        def change(current: Ring) -> list[NodeSpec] | None:
            spec = known_node(current, node_id)
            if spec.state == "draining":
                return None
            specs = [
                replace(s, state="draining") if s.id == node_id else s
                for s in current.nodes.values()
            ]
            check_takers(specs, replicas, f"removing node {node_id}")
            return specs

        ring, changed = change_ring(meta, change)
        if changed:
            log.info("NODE-DRAIN %s: ring version %d", node_id, ring.version)
        return ring, changed
    finally:
        meta.close()


def set_node(
    home: Path,
    node_id: str,
    weight: float | None = None,
    zone: str | None = None,
    state: str | None = None,
    address: str | None = None,
) -> tuple[Ring, bool]:
    """Change a node's weight, zone, state and/or address; returns (ring, whether it changed).

    A new address is checked first: node `node_id` of this filesystem must answer
    there (`home.check_node`), so a moved node is found again and never another one.
    """
    if weight is None and zone is None and state is None and address is None:
        raise UserError("give --weight W, --zone Z, --state up|draining or --address ADDRESS")
    meta, owner = _open_to_change(home)
    try:
        config = meta.config()
        changes: dict = {}
        if weight is not None:
            changes["weight"] = weight
        if zone is not None:
            changes["zone"] = zone or None
        if state is not None:
            changes["state"] = state
        if address is not None:
            changes["address"] = _normalise(address)

        def change(current: Ring) -> list[NodeSpec] | None:
            spec = known_node(current, node_id)
            try:
                new = replace(spec, **changes)
            except ValueError as e:
                raise UserError(str(e)) from None
            if new == spec:
                return None
            for other in current.nodes.values():
                if other.id != node_id and _same_address(other.address, new.address):
                    raise UserError(f"{new.address} already is node {other.id}")
            specs = [new if s.id == node_id else s for s in current.nodes.values()]
            check_takers(specs, config.replicas, f"this change of node {node_id}")
            return specs

        spec = known_node(Ring.from_json(meta.ring()), node_id)
        if address is not None and not _same_address(spec.address, changes["address"]):
            moved = replace(spec, **changes)
            home_mod.check_node(moved, config.fs_uuid, home_mod.node_auth(meta), owner=owner)
        ring, changed = change_ring(meta, change)
        if changed:
            log.info("NODE-SET %s %s: ring version %d", node_id, changes, ring.version)
        return ring, changed
    finally:
        meta.close()


def adopt(home: Path) -> tuple[OwnerClaim, dict[str, str]]:
    """Make the metadata store in `home` the owner of every node of its ring.

    The store gets a new owner token (its file recorded as its own: a home moved to
    another disk, or a database put back from a backup, is then accepted), and each
    node records it whatever owner it had, so every other store of these nodes (the
    original of a copy, another copy) is refused from then on (`home.take_nodes`).
    Runs alone (a "repair" session: no mount, rebalance or repair of this store).
    Returns the claim and {node id: why it was not switched}.
    """
    meta = _open(home)
    try:
        with tool_session(meta, "repair"):
            return home_mod.take_nodes(meta, CHECK_TIMEOUT_S)
    finally:
        meta.close()
