"""A filesystem's home directory: where its metadata, default nodes and logs live.

Layout of HOME:

    meta.db        SQLite metadata (WAL): the ring, R, W, the nodes' token and CA live in it
    meta.url       instead of meta.db, in cluster mode: the etcd URL of the metadata
                   (HOME is then only this client's local state: log, pid files)
    nodes/n1 ...   the default backing directories (mkfs without --node)
    hafs.log       the mount daemon's log
    run/*.pid      pid and mountpoint of each mount daemon

Every tool finds the metadata through HOME: `--meta URL` (or $HAFS_META) picks
the state directory of that URL (`--home`, else `state_home(URL)`) and records
the URL in it, so the same code serves the embedded and the cluster mode.

`create` is `hafs mkfs`, `load` is `hafs meta load` (a filesystem made from a
dump instead of new); `open_fs` checks everything a mount needs and modifies
nothing when it refuses.  `open_store` is the one place that turns a
node of the ring into a block store: a backing directory (DirStore) or, for an
http:// or https:// address, the client of a `hafs node` server (RemoteStore),
with the filesystem's credentials (`node_auth`: the token and the CA, re-read
from the metadata when a node refuses them).

`owner_claim` is the one check that the metadata store may change its nodes
(hafs.store.owner): every command that does (a read-write mount, fsck
--repair, rebalance, the node changes) asks it first and opens the nodes with
the claim it returns; a copy of a home (`cp -a`) is refused there.  A store made
from a dump (`load`) gets a new owner token and takes the nodes from the store it
came from (`take_nodes`, as `hafs node adopt`); a salvaged database keeps its
token (`SqliteMeta.load`).
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from .errors import HafsError, MetaDamaged, NodeOwnedElsewhere, UserError
from .meta import FsConfig, FsState, MetaStore, Record, now_ns
from .meta.sqlite import SqliteMeta
from .store.dirstore import DirStore, read_identity
from .store.owner import OwnerClaim, new_token
from .store.remote import (
    NodeAuth,
    NodeAuthError,
    NodeCertificateError,
    NodeError,
    RemoteStore,
    check_token,
    tls_context,
)
from .store.ring import NodeSpec, Ring

log = logging.getLogger(__name__)

DEFAULT_REPLICAS = 2
DEFAULT_NODES = 3
CAS_RETRIES = 5  # a ring change is tried again this often when another one wins


def default_home() -> Path:
    """$HAFS_HOME, else the per-user data directory ($XDG_DATA_HOME/hafs)."""
    if os.environ.get("HAFS_HOME"):
        return Path(os.environ["HAFS_HOME"]).expanduser()
    data = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(data) / "hafs"


def meta_path(home: Path) -> Path:
    return home / "meta.db"


def url_path(home: Path) -> Path:
    return home / "meta.url"


def meta_url(home: Path) -> str | None:
    """The etcd URL of a cluster-mode home (None: embedded, SQLite in meta.db)."""
    try:
        return url_path(home).read_text().strip() or None
    except FileNotFoundError:
        return None


def holds_fs(home: Path) -> bool:
    """Whether `home` names a filesystem (its SQLite metadata, or the URL of its etcd)."""
    return meta_path(home).exists() or url_path(home).exists()


def state_home(url: str) -> Path:
    """The default local state directory of a client of the cluster filesystem `url`."""
    from .meta.etcd import parse_meta_url

    _, name = parse_meta_url(url)
    return default_home() / "clients" / name


def resolve_home(home: Path | None, url: str | None, made: list[Path] | None = None) -> Path:
    """The home a command works on: with a metadata URL, that URL's state directory
    (made, and the URL recorded, on first use); else `home` or the default.  `made`:
    what was made for it is appended there (`unmake` removes it if the command fails)."""
    if not url:
        return (home or default_home()).absolute()
    home = (home or state_home(url)).absolute()
    if meta_path(home).exists():
        raise UserError(
            f"{home} holds an embedded filesystem (meta.db): give another --home for {url}"
        )
    known = meta_url(home)
    if known is not None and known != url:
        raise UserError(f"{home} is the state directory of {known}, not {url}: give another --home")
    if known is None:
        new_dirs = [d for d in (home, *home.parents) if not d.exists()]
        home.mkdir(parents=True, exist_ok=True)
        url_path(home).write_text(url + "\n")
        if made is not None:
            made += [*reversed(new_dirs), url_path(home)]
    return home


def unmake(made: list[Path]) -> None:
    """Remove what `resolve_home` made for a command that failed, newest first: the
    URL's record (with the empty log and run directory a failed mount leaves beside it)
    and the directories made for it, if empty."""
    for path in reversed(made):
        try:
            if path.is_dir():
                path.rmdir()
                continue
            path.unlink()
            log_file, run = path.parent / "hafs.log", path.parent / "run"
            if log_file.exists() and log_file.stat().st_size == 0:
                log_file.unlink()
            if run.is_dir() and not any(run.iterdir()):
                run.rmdir()
        except OSError:
            pass


def is_remote(address: str) -> bool:
    return "://" in address


def read_token_file(path: Path | None) -> str | None:
    """The token in `path` (None: no file given); UserError if it holds none, or several."""
    if path is None:
        return None
    try:
        lines = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read the token file {path}: {getattr(e, 'strerror', e)}") from None
    if len(lines) != 1:
        raise UserError(
            f"the token file {path} holds {'no token' if not lines else f'{len(lines)} lines'}:"
            " give a file with the nodes' bearer token on one line"
        )
    try:
        return check_token(lines[0])
    except UserError:
        raise UserError(
            f"the token in {path} must be printable ASCII without spaces (e.g. the output of"
            " 'openssl rand -hex 32')"
        ) from None


def read_ca_file(path: Path | None) -> str | None:
    """The PEM text of the CA certificate(s) in `path` (None: no file given); UserError
    if it holds no certificate."""
    if path is None:
        return None
    try:
        pem = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read the CA file {path}: {getattr(e, 'strerror', e)}") from None
    if "-----BEGIN CERTIFICATE-----" not in pem:
        raise UserError(
            f"the CA file {path} holds no PEM certificate (-----BEGIN CERTIFICATE-----): give"
            " the certificate of the CA that signed the nodes' --tls-cert"
        )
    try:
        tls_context(pem)
    except UserError as e:
        raise UserError(f"the CA file {path}: {e}") from None
    return pem


def node_auth(meta: MetaStore) -> NodeAuth:
    """The credentials of the filesystem's nodes, re-read from `meta` when one refuses them."""
    config = meta.config()

    def reload() -> tuple[str | None, str | None]:
        fresh = meta.fresh_config()
        return fresh.node_token, fresh.ca_pem

    return NodeAuth(config.node_token, config.ca_pem, reload)


def write_quorum(replicas: int) -> int:
    """The default W: a majority of R, at least 1."""
    return replicas // 2 + 1


def create(
    home: Path,
    replicas: int = DEFAULT_REPLICAS,
    nodes: list[str] | None = None,
    *,
    token: str | None = None,
    ca_pem: str | None = None,
    quorum: int | None = None,
) -> str:
    """Create a filesystem in `home`; returns its uuid.  Refuses to touch an existing one.

    A node is a backing directory (empty or new) or the http:// (https://) address
    of a `hafs node` serving an unclaimed directory; mkfs claims it (writes the
    node's identity) once every node has been checked.  `token`: the nodes' bearer
    token; `ca_pem`: the CA their certificates are checked against (None: the
    system's CAs); both are kept in the configuration.
    """
    home = home.absolute()
    url = meta_url(home)
    if meta_path(home).exists():
        raise UserError(f"{home} already holds a hafs filesystem: use it, or choose another --home")
    if url is not None:
        _check_new_etcd(url)
    _check_home_name(home)
    addresses = nodes or [str(home / "nodes" / f"n{i + 1}") for i in range(DEFAULT_NODES)]
    addresses = [
        a.rstrip("/") if is_remote(a) else str(Path(a).expanduser().absolute()) for a in addresses
    ]
    if len(set(addresses)) != len(addresses):
        raise UserError("the same node is given twice: each node needs its own address")
    if not 1 <= replicas <= len(addresses):
        raise UserError(
            f"--replicas {replicas} needs at least that many nodes (have {len(addresses)})"
        )
    quorum = write_quorum(replicas) if quorum is None else quorum
    if not 1 <= quorum <= replicas:
        raise UserError(f"--write-quorum {quorum} must be between 1 and --replicas ({replicas})")
    fs_uuid = str(uuid.uuid4())
    specs = [NodeSpec(id=f"n{i + 1}", address=a) for i, a in enumerate(addresses)]
    # Check every node before creating anything.
    auth = NodeAuth(token, ca_pem)
    for spec in specs:
        check_new_node(spec, auth)
    home.mkdir(parents=True, exist_ok=True)
    owner = OwnerClaim(new_token(), url or f"{socket.gethostname()}:{meta_path(home)}")
    for spec in specs:
        init_node(spec, fs_uuid, auth, owner)
    ring = Ring(specs, version=1)
    config = FsConfig(fs_uuid, replicas, quorum, token, now_ns(), ca_pem)
    uid, gid = os.getuid(), os.getgid()
    if url is not None:
        from .meta.etcd import create_etcd

        create_etcd(url, config, ring.to_json(), uid, gid, owner=owner.token).close()
        return fs_uuid
    SqliteMeta.create(meta_path(home), config, ring.to_json(), uid, gid, owner=owner.token).close()
    if token is not None:
        keep_secret(home)
    return fs_uuid


def keep_secret(home: Path) -> None:
    """Make an embedded filesystem's database readable by its owner only (it holds the
    token); SQLite gives -wal and -shm the same mode."""
    if meta_path(home).exists():
        os.chmod(meta_path(home), 0o600)


def load(home: Path, state: FsState, records: Iterable[Record]) -> tuple[str, dict[str, str]]:
    """Make the filesystem of `home` from a dump's state and records (`hafs meta load`):
    its SQLite database, or for a cluster home its etcd prefix, which must hold nothing.
    The nodes are the ring's, as they are; the new store becomes their owner
    (`take_nodes`), so the store the dump came from can no longer delete on them.
    Returns where it went and {node id: why it was not taken} (see `take_nodes`)."""
    where = _load(home.absolute(), state, records)
    meta = open_meta(home)
    try:
        return where, take_nodes(meta)[1]
    finally:
        meta.close()


def _load(home: Path, state: FsState, records: Iterable[Record]) -> str:
    url = meta_url(home)
    if url is not None:
        from .meta.etcd import load_etcd

        load_etcd(url, state, records)
        return url
    if meta_path(home).exists():
        raise UserError(
            f"{home} already holds a hafs filesystem: a load needs an empty home (give another"
            " --home)"
        )
    _check_home_name(home)
    made = not home.exists()
    home.mkdir(parents=True, exist_ok=True)
    try:
        SqliteMeta.load(meta_path(home), state, records)
    except BaseException:
        if made:
            home.rmdir()
        raise
    if state.config.node_token is not None:
        keep_secret(home)
    return str(meta_path(home))


def _check_home_name(home: Path) -> None:
    if "," in str(home):
        raise UserError(f"home directory {home} contains a comma, which mount options cannot carry")


def _check_new_etcd(url: str) -> None:
    """Refuse (UserError) an etcd prefix that holds anything, before any node is claimed."""
    from .meta.etcd import connect

    kv = connect(url)
    try:
        if kv.scan(b"", b"\xff", 1):
            raise UserError(
                f"{url} already holds a filesystem (or something else): choose another NAME"
            )
    finally:
        kv.close()


def check_new_node(spec: NodeSpec, auth: NodeAuth) -> None:
    """Refuse (UserError) a node that cannot become `spec.id` of a new filesystem."""
    if is_remote(spec.address):
        try:
            node_id, fs_uuid = RemoteStore.probe(spec.address, auth=auth)
        except NodeAuthError as e:
            raise UserError(
                f"node {spec.id} at {spec.address} refuses the token ({e}): give the node and"
                " the filesystem the same token (--token-file)"
            ) from None
        except NodeCertificateError as e:  # probed before it has an id: name it here
            raise UserError(f"node {spec.id} ({spec.address}): {e.message}") from None
        except NodeError as e:
            raise UserError(
                f"node {spec.id} at {spec.address}: {e}; start 'hafs node --data DIR --listen"
                " HOST:PORT' there (with --token-file if the nodes need a token)"
            ) from None
        if fs_uuid:
            raise UserError(
                f"node {spec.id} at {spec.address} already serves node {node_id} of filesystem"
                f" {fs_uuid}: give a node started on an empty directory"
            )
        return
    p = Path(spec.address)
    if p.exists() and (not p.is_dir() or any(p.iterdir())):
        raise UserError(
            f"backing directory {p} for node {spec.id} is not empty: give an empty or new one"
        )


def check_node(
    spec: NodeSpec,
    fs_uuid: str,
    auth: NodeAuth,
    timeout: float = 5.0,
    owner: OwnerClaim | None = None,
) -> None:
    """Refuse (UserError, saying why) unless node `spec.id` of `fs_uuid` answers at
    `spec.address`: its backing directory is there with that identity, or the `hafs
    node` there serves it (`hafs node set --address`; `remove --lost` refuses a node
    that still answers).  With `owner`, the node is taken for that store (or refused:
    NodeOwnedElsewhere)."""
    try:
        if not is_remote(spec.address):
            DirStore.open(spec.address, spec.id, fs_uuid, owner)
            return
        node_id, node_fs = RemoteStore.probe(spec.address, auth=auth, timeout=timeout)
        if (node_id, node_fs) == (spec.id, fs_uuid) and owner is not None:
            with open_store(spec, fs_uuid, auth, timeout, owner) as store:
                store.check_identity()
    except NodeAuthError as e:
        raise UserError(f"node {spec.id} at {spec.address} refuses the token ({e})") from None
    except NodeCertificateError as e:  # probed without its id: name it here
        raise UserError(f"node {spec.id} ({spec.address}): {e.message}") from None
    except NodeError as e:
        raise UserError(f"node {spec.id} does not answer at {spec.address} ({e})") from None
    except NodeOwnedElsewhere:
        raise
    except UserError as e:  # a missing or foreign directory
        raise UserError(f"node {spec.id} is not at {spec.address}: {e}") from None
    if (node_id, node_fs) != (spec.id, fs_uuid):
        there = "unclaimed" if node_id is None else f"node {node_id} of filesystem {node_fs}"
        raise UserError(
            f"node {spec.id} is not at {spec.address}: the node there is {there}, not node"
            f" {spec.id} of filesystem {fs_uuid}"
        )


def init_node(spec: NodeSpec, fs_uuid: str, auth: NodeAuth, owner: OwnerClaim) -> None:
    """Make the node `spec.id` of filesystem `fs_uuid`, owned by the metadata store
    `owner` (after `check_new_node`)."""
    if is_remote(spec.address):
        try:
            RemoteStore.claim(spec.address, spec.id, fs_uuid, auth=auth)
            with open_store(spec, fs_uuid, auth, owner=owner) as store:
                store.check_identity()  # takes it for the owner
        except NodeError as e:
            raise UserError(f"node {spec.id} at {spec.address}: claiming it failed: {e}") from None
    else:
        DirStore.create(spec.address, spec.id, fs_uuid, owner)


def open_store(
    spec: NodeSpec,
    fs_uuid: str,
    auth: NodeAuth | None = None,
    timeout: float | None = None,
    owner: OwnerClaim | None = None,
) -> DirStore | RemoteStore:
    """The block store of one node of the ring (`auth`: the filesystem's `node_auth`);
    with `owner`, for a command that changes the node (`owner_claim`): it deletes only
    while the node is that store's.

    A backing directory is opened and its identity (and owner) checked here
    (UserError when it is missing or foreign).  A remote node is not contacted: it
    may be down now and come back later; `RemoteStore.check_identity` asks it.
    """
    if is_remote(spec.address):
        kwargs = {} if timeout is None else {"timeout": timeout}
        return RemoteStore(spec.address, spec.id, fs_uuid, auth=auth, owner=owner, **kwargs)
    return DirStore.open(spec.address, spec.id, fs_uuid, owner)


def change_ring(
    meta: MetaStore, change: Callable[[Ring], list[NodeSpec] | None]
) -> tuple[Ring, bool]:
    """Write the ring `change(current ring)` returns as the next version.

    Returns (the ring now in force, whether this call wrote it).  `change` raises
    UserError to refuse, or returns None for "nothing to do".  A concurrent change
    makes us re-read and call `change` again.
    """
    for _ in range(CAS_RETRIES):
        current = Ring.from_json(meta.ring())
        specs = change(current)
        if specs is None:
            return current, False
        try:
            new = Ring(specs, version=current.version + 1)
        except ValueError as e:
            raise UserError(f"the new ring would be invalid: {e}") from None
        if meta.replace_ring(new.to_json(), current.version):
            return new, True
    raise UserError("the ring kept changing under this command (another 'hafs node'?): retry")


def owner_claim(meta: MetaStore, home: Path) -> OwnerClaim:
    """The claim of the metadata store in `home` on its nodes, for a command that changes
    them (hafs.store.owner).

    Refuses (UserError, changing nothing) a store that is a copy of another: a `cp`
    of the home names the original's nodes, and its repairs and garbage collection
    would delete the original's blocks.  A store made before owners were recorded
    gets its token here, and a store whose file moved on its disk is recorded anew.
    """
    own = meta.owner()
    if own.copy_of is not None:
        raise UserError(
            f"{meta_path(home)} is a copy of the metadata at {own.copy_of} (a copy of its"
            " home?): it names that filesystem's nodes, so it must not change them; refusing."
            " A read-only mount (-o ro) reads it. To copy the files into a filesystem of its"
            " own, make one with 'hafs mkfs' and copy through both mounts (README, 'Copies of"
            " a home'); if this is the filesystem itself, moved to another disk or restored"
            f" from a backup, and the original is gone: 'hafs node adopt --home {home}'"
        )
    if own.moved_from is not None:
        follow_home(meta, Path(own.moved_from).parent, home)
    if own.token is None or own.moved_from is not None:
        meta.adopt(own.token or new_token())
        own = meta.owner()
    return OwnerClaim(own.token, own.where, frozenset(own.previous))


def take_nodes(meta: MetaStore, timeout: float = 5.0) -> tuple[OwnerClaim, dict[str, str]]:
    """Give the metadata store `meta` a new owner token and make every node of its ring
    record it, whatever owner it had (`hafs node adopt`, `hafs meta load`): every other
    store of these nodes is refused by them from then on (hafs.store.owner).

    Returns the claim and {node id: why it was not switched}; a node that was down
    takes the new token when this store next opens it if it records one the store
    held before (`Owner.previous`: its token before, or the dumped store's)."""
    meta.adopt(new_token())
    own = meta.owner()
    claim = OwnerClaim(own.token, own.where, frozenset(own.previous))
    fs_uuid, auth = meta.config().fs_uuid, node_auth(meta)
    failed: dict[str, str] = {}
    for spec in Ring.from_json(meta.ring()).nodes.values():
        store = None
        try:
            store = open_store(spec, fs_uuid, auth, timeout)
            if isinstance(store, RemoteStore):
                store.check_identity()
            store.set_owner(claim)
        except (HafsError, OSError) as e:
            failed[spec.id] = str(e)
        finally:
            if isinstance(store, RemoteStore):
                store.close()
    log.warning(
        "NODE-ADOPT the metadata at %s owns its nodes now%s",
        own.where,
        f" (not switched: {', '.join(failed)})" if failed else "",
    )
    return claim, failed


def follow_home(meta: MetaStore, was: Path, home: Path) -> Ring:
    """After `mv` of the home from `was` to `home`: the backing directories the ring
    names inside the old home, gone from there and found at the same place in the new
    one with their identity, get that address (one ring change; logged NODE-MOVED)."""
    fs_uuid = meta.config().fs_uuid

    def change(current: Ring) -> list[NodeSpec] | None:
        specs = list(current.nodes.values())
        for k, spec in enumerate(specs):
            old = Path(spec.address)
            if is_remote(spec.address) or not old.is_relative_to(was) or old.exists():
                continue
            new = home / old.relative_to(was)
            ident = read_identity(new) if new.is_dir() else None
            if ident is not None and (ident["fs_uuid"], ident["node_id"]) == (fs_uuid, spec.id):
                specs[k] = replace(spec, address=str(new))
        return None if specs == list(current.nodes.values()) else specs

    ring, changed = change_ring(meta, change)
    if changed:
        log.warning(
            "NODE-MOVED the home moved from %s to %s: ring version %d names its backing"
            " directories there",
            was,
            home,
            ring.version,
        )
    return ring


@dataclass
class Filesystem:
    home: Path
    meta: MetaStore
    config: FsConfig
    ring: Ring
    stores: dict[str, DirStore | RemoteStore]
    auth: NodeAuth  # shared by the remote stores: a node joining the ring gets it too
    owner: OwnerClaim | None = None  # None: opened read-only, changes no node
    node_timeout: float | None = None

    def open_store(self, spec: NodeSpec) -> DirStore | RemoteStore:
        """The store of a node of this filesystem (one that joins the ring while mounted)."""
        return open_store(spec, self.fs_uuid, self.auth, self.node_timeout, self.owner)

    @property
    def replicas(self) -> int:
        return self.config.replicas

    @property
    def write_quorum(self) -> int:
        return self.config.write_quorum

    @property
    def fs_uuid(self) -> str:
        return self.config.fs_uuid

    @property
    def token(self) -> str | None:
        return self.config.node_token


MOUNT_CHECK_S = 2.0  # a mount checks the SQLite database for at most this long first


def open_meta(
    home: Path,
    lock_ttl_s: float = 10.0,
    read_only: bool = False,
    as_found: bool = False,
    check_s: float = 0.0,
    meta_timeout_s: float | None = None,
) -> MetaStore:
    """The metadata engine of the filesystem in `home` (UserError when there is none).

    read_only: the metadata is opened read-only (a `-o ro` mount); as_found: and an
    older layout is read as it is instead of refused (fsck's check writes nothing);
    check_s: a bounded check of the database first (a mount); meta_timeout_s: the bound
    of every call to etcd (cluster mode; None: the engine's default)."""
    home = home.absolute()
    url = meta_url(home)
    if url is not None:
        from .meta.etcd import open_etcd

        bound = {} if meta_timeout_s is None else {"timeout_s": meta_timeout_s}
        return open_etcd(url, lock_ttl_s=lock_ttl_s, read_only=read_only, **bound)
    if not meta_path(home).exists():
        raise UserError(f"no hafs filesystem in {home}: create one with 'hafs mkfs --home {home}'")
    return SqliteMeta.open(
        meta_path(home),
        lock_ttl_s=lock_ttl_s,
        read_only=read_only,
        as_found=as_found,
        check_s=check_s,
    )


def open_fs(
    home: Path,
    node_timeout: float | None = None,
    lock_ttl_s: float = 10.0,
    read_only: bool = False,
    check_s: float = 0.0,
    meta_timeout_s: float | None = None,
) -> Filesystem:
    """Open the metadata and every node's store, checking the identity of directories."""
    home = home.absolute()
    meta = open_meta(home, lock_ttl_s, read_only, check_s=check_s, meta_timeout_s=meta_timeout_s)
    try:
        owner = None if read_only else owner_claim(meta, home)  # (it may follow a moved home)
        config = meta.config()
        ring = Ring.from_json(meta.ring())
        fs = Filesystem(home, meta, config, ring, {}, node_auth(meta), owner, node_timeout)
        fs.stores = {spec.id: fs.open_store(spec) for spec in ring.nodes.values()}
    except MetaDamaged as e:
        meta.close()
        raise UserError(f"{e}: nothing was changed; run 'hafs fsck --home {home}'") from None
    except BaseException:
        meta.close()
        raise
    return fs


def check_remote_nodes(fs: Filesystem) -> dict[str, str]:
    """Ask every remote node who it is (in parallel); returns {node id: why} of unreachable ones.

    A node that answers as another node or filesystem, refuses the token or shows a
    certificate the CA does not sign, is a configuration error: UserError.  An
    unreachable one is only down (invariant 4: the mount works while up to R-1 nodes
    are down).
    """
    remote = [s for s in fs.stores.values() if isinstance(s, RemoteStore)]
    down: dict[str, str] = {}

    def check(store: RemoteStore) -> None:
        try:
            store.check_identity()
        except NodeAuthError as e:
            raise UserError(
                f"node {store.node_id} at {store.address} refuses the filesystem's token ({e})"
            ) from None
        except NodeCertificateError as e:
            raise UserError(str(e)) from None
        except NodeError as e:
            down[store.node_id] = str(e)

    if remote:
        with ThreadPoolExecutor(len(remote)) as pool:
            for future in [pool.submit(check, s) for s in remote]:
                future.result()
    return down
