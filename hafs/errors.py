"""The errors hafs raises below the FUSE adapter.

Lower layers raise these; `fuse_ops` maps them to errno once, at the boundary
(STYLE: convert errors once). `FsError` carries a POSIX errno chosen by the vfs
(ENOENT, ENOTEMPTY, ...); `NoSpace` becomes ENOSPC; the other storage errors
become EIO for the caller and are logged with the block and node they concern.

`one_error()` goes around a nursery inside an operation: the ExceptionGroup a
nursery raises becomes the one error that matters, so the adapter sees one hafs
error with one errno.
"""

from __future__ import annotations

import errno as _errno
import logging
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)


class HafsError(Exception):
    """Base class of every error hafs raises on purpose."""


class FsError(HafsError):
    """A POSIX error decided by the vfs: the operation fails with `errno`."""

    def __init__(self, errno: int, msg: str = "") -> None:
        super().__init__(msg or _errno.errorcode.get(errno, str(errno)))
        self.errno = errno


class UserError(HafsError):
    """Bad input from the user (config, directory, option): one clear line, exit 2.

    The message names what is wrong and what to do about it.
    """


class StorageError(HafsError):
    """A block could not be stored or fetched; reads and writes fail with EIO."""


class BlockMissing(StorageError):
    """No replica of the block could be found."""

    def __init__(self, block_id: str, detail: str = "") -> None:
        super().__init__(f"block {block_id} is missing" + (f": {detail}" if detail else ""))
        self.block_id = block_id


class BlockCorrupt(StorageError):
    """A replica's bytes do not hash to its id; it is never returned."""

    def __init__(self, block_id: str, where: str) -> None:
        super().__init__(f"block {block_id} is corrupt on {where}")
        self.block_id = block_id
        self.where = where


class QuorumLost(StorageError):
    """Fewer than W replicas of a block could be written."""


class NoSpace(StorageError):
    """A block could not be stored because the nodes it could go to are full (ENOSPC)."""


class MetaDamaged(FsError):
    """The metadata database is damaged: the call fails with EIO, and once that is known
    every change is refused with EROFS (logged once, META-DAMAGED, with what to do)."""


class MetaError(HafsError):
    """The metadata engine refused or failed a call (EIO), with what to do in its message."""


class MetaUnavailable(MetaError):
    """The metadata engine did not answer within its bound (etcd without a quorum): EIO.
    `why`: the last failure met (for a one-line message)."""

    def __init__(self, message: str, why: str = "") -> None:
        super().__init__(message)
        self.why = why or message


class NodeIdentityError(UserError):
    """A backing directory belongs to another filesystem or node, or has no identity."""


class NodeOwnedElsewhere(NodeIdentityError):
    """A node belongs to another metadata store of its filesystem (hafs.store.owner): a
    store opening it to change things is refused."""


class NotOwner(StorageError, OSError):
    """A node refused a delete: it belongs to another metadata store (hafs.store.owner)."""

    def __init__(self, message: str) -> None:
        super().__init__(_errno.EPERM, message)

    def __str__(self) -> str:
        return self.strerror

    def __reduce__(self):
        return type(self), (self.strerror,)


class LockTimeout(HafsError):
    """A write lock stayed held by another mount for the whole lock wait."""

    def __init__(self, name: str, holder: str | None) -> None:
        super().__init__(f"lock {name} is held by {holder}")
        self.name = name
        self.holder = holder


class LockLost(HafsError):
    """A write lease expired or was taken over: its holder must not commit."""


def _rank(exc: BaseException) -> int:
    """Which error of a group the caller gets: no space beats other hafs errors beats bugs."""
    if isinstance(exc, NoSpace) or (isinstance(exc, FsError) and exc.errno == _errno.ENOSPC):
        return 2
    return 1 if isinstance(exc, HafsError) else 0


@contextmanager
def one_error() -> Iterator[None]:
    """Around a nursery: raise the one error of its ExceptionGroup that matters.

    The leaf of highest rank (NoSpace, then any other hafs error, then anything
    else; the first of them) is raised in place of the group; other leaves that
    are not hafs errors (bugs) are logged with their traceback so they are not
    lost.  A group holding a cancellation or another BaseException is left as
    it is, for trio and the caller to handle.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        leaves = list(_leaves(group))
        if not all(isinstance(e, Exception) for e in leaves):
            raise
        chosen = max(leaves, key=_rank)
        for e in leaves:
            if e is not chosen and not isinstance(e, HafsError):
                log.error("also failed: %r", e, exc_info=e)
        raise chosen from None


def _leaves(group: BaseExceptionGroup) -> Iterator[BaseException]:
    for e in group.exceptions:
        if isinstance(e, BaseExceptionGroup):
            yield from _leaves(e)
        else:
            yield e
