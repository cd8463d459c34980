"""The errors hafs raises below the FUSE adapter.

Lower layers raise these; `fuse_ops` maps them to errno once, at the boundary
(STYLE: convert errors once). `FsError` carries a POSIX errno chosen by the vfs
(ENOENT, ENOTEMPTY, ...); the storage errors all become EIO for the caller and
are logged with the block and node they concern.
"""

from __future__ import annotations

import errno as _errno


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


class NodeIdentityError(UserError):
    """A backing directory belongs to another filesystem or node, or has no identity."""


class LockTimeout(HafsError):
    """A write lock stayed held by another mount for the whole lock wait."""

    def __init__(self, name: str, holder: str | None) -> None:
        super().__init__(f"lock {name} is held by {holder}")
        self.name = name
        self.holder = holder


class LockLost(HafsError):
    """A write lease expired or was taken over: its holder must not commit."""
