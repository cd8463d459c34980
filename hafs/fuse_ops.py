"""The pyfuse3 adapter: inode numbers and attributes in, FUSEErrors out.

The filesystem model lives in `vfs`; this class only translates.  Errors are
converted once, here: `FsError` becomes its errno, `NoSpace` ENOSPC, other
storage errors EIO (logged with the block they concern; `MetaUnavailable` is not: the
engine logs an outage once), and any other exception is logged with
its traceback and becomes EIO, so the mount stays up (DESIGN.md invariant 8).

Lookup counts: +1 for lookup, create, mknod, mkdir, symlink, link and each
readdir entry the kernel accepted; `forget` gives them back.
"""

from __future__ import annotations

import errno
import functools
import logging
import time

import pyfuse3

from .errors import FsError, LockLost, MetaError, MetaUnavailable, NoSpace, StorageError
from .fs.vfs import Vfs
from .meta import Inode

log = logging.getLogger(__name__)

# Short caches: another mount's changes are visible within about a second.
ATTR_TIMEOUT = 1.0
ENTRY_TIMEOUT = 1.0


def _errors_to_fuse(fn):
    """Every handler passes through here: its errors become errno, and it is counted in the
    mount's metrics (by name, with its latency; an answer with an error also as an error)."""
    op = fn.__name__

    @functools.wraps(fn)
    async def wrapper(self, *args, **kwargs):
        metrics = self.vfs.metrics
        started = time.perf_counter()
        failed = True
        try:
            result = await fn(self, *args, **kwargs)
            failed = False
            return result
        except pyfuse3.FUSEError:
            raise
        except FsError as e:
            raise pyfuse3.FUSEError(e.errno) from None
        except NoSpace as e:
            log.warning("no space in %s: %s", op, e)
            raise pyfuse3.FUSEError(errno.ENOSPC) from None
        except MetaUnavailable as e:  # logged once per outage, by the engine
            log.debug("I/O error in %s: %s", op, e)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except (StorageError, LockLost, MetaError) as e:
            log.error("I/O error in %s: %s", op, e)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except Exception:
            log.exception("unexpected error in %s", op)
            raise pyfuse3.FUSEError(errno.EIO) from None
        finally:
            metrics.op(op).observe(time.perf_counter() - started)
            if failed:
                metrics.op_errors.labels(op).inc()

    return wrapper


def _attrs(inode: Inode, allocated: int, generation: int = 0) -> pyfuse3.EntryAttributes:
    """The kernel's attributes of `inode`, which holds `allocated` bytes (st_blocks);
    `generation`: of an entry reply (Vfs.entry_generation)."""
    a = pyfuse3.EntryAttributes()
    a.st_ino = inode.id
    a.generation = generation
    a.entry_timeout = ENTRY_TIMEOUT
    a.attr_timeout = ATTR_TIMEOUT
    a.st_mode = inode.mode
    a.st_nlink = inode.nlink
    a.st_uid = inode.uid
    a.st_gid = inode.gid
    a.st_rdev = inode.rdev
    a.st_size = inode.size
    a.st_blksize = 128 * 1024
    a.st_blocks = (allocated + 511) // 512
    a.st_atime_ns = inode.atime_ns
    a.st_mtime_ns = inode.mtime_ns
    a.st_ctime_ns = inode.ctime_ns
    return a


class FuseOps(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, vfs: Vfs) -> None:
        super().__init__()
        self.vfs = vfs
        # read by pyfuse3 when the kernel connects: per mount (-o writeback_cache)
        self.enable_writeback_cache = vfs.opts.writeback_cache

    async def _attrs(
        self, inode: Inode, generation: int = 0, *, given: bool = True
    ) -> pyfuse3.EntryAttributes:
        """The reply's attributes; `given`: the kernel takes them (Vfs.attrs_given)."""
        attrs = _attrs(inode, await self.vfs.allocated_bytes(inode), generation)
        if given:
            self.vfs.attrs_given(inode)
        return attrs

    async def _ref(self, inode: Inode, ctx) -> pyfuse3.EntryAttributes:
        """The entry reply of `inode` to the request of `ctx`; the kernel counts a lookup."""
        pid = ctx.pid if ctx is not None else 0
        attrs = await self._attrs(inode, self.vfs.entry_generation(inode, pid))
        self.vfs.lookups[inode.id] += 1
        return attrs

    @_errors_to_fuse
    async def lookup(self, parent_inode, name, ctx=None):
        return await self._ref(await self.vfs.lookup(parent_inode, name), ctx)

    async def forget(self, inode_list):
        for ino, n in inode_list:
            try:
                await self.vfs.forget(ino, n)
            except Exception:  # forget must not raise
                log.exception("forget of inode %d failed", ino)

    @_errors_to_fuse
    async def getattr(self, inode, ctx=None):
        return await self._attrs(await self.vfs.getattr(inode))

    @_errors_to_fuse
    async def setattr(self, inode, attr, fields, fh, ctx):
        return await self._attrs(
            await self.vfs.setattr(
                inode,
                mode=attr.st_mode if fields.update_mode else None,
                uid=attr.st_uid if fields.update_uid else None,
                gid=attr.st_gid if fields.update_gid else None,
                size=attr.st_size if fields.update_size else None,
                atime_ns=attr.st_atime_ns if fields.update_atime else None,
                mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
            )
        )

    @_errors_to_fuse
    async def readlink(self, inode, ctx):
        return await self.vfs.readlink(inode)

    @_errors_to_fuse
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        return await self._ref(
            await self.vfs.mknod(parent_inode, name, mode, rdev, ctx.uid, ctx.gid), ctx
        )

    @_errors_to_fuse
    async def mkdir(self, parent_inode, name, mode, ctx):
        return await self._ref(
            await self.vfs.mkdir(parent_inode, name, mode, ctx.uid, ctx.gid), ctx
        )

    @_errors_to_fuse
    async def symlink(self, parent_inode, name, target, ctx):
        inode = await self.vfs.symlink(parent_inode, name, target, ctx.uid, ctx.gid)
        return await self._ref(inode, ctx)

    @_errors_to_fuse
    async def link(self, inode, new_parent_inode, new_name, ctx):
        return await self._ref(await self.vfs.link(inode, new_parent_inode, new_name), ctx)

    @_errors_to_fuse
    async def unlink(self, parent_inode, name, ctx):
        await self.vfs.unlink(parent_inode, name)

    @_errors_to_fuse
    async def rmdir(self, parent_inode, name, ctx):
        await self.vfs.rmdir(parent_inode, name)

    @_errors_to_fuse
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        await self.vfs.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)

    @_errors_to_fuse
    async def open(self, inode, flags, ctx):
        fh, keep_cache, attrs_current = await self.vfs.open(inode, flags, ctx.pid)
        if not attrs_current:
            # the file changed since the kernel took its size and times, which the kernel
            # would otherwise keep until they time out (a read would stop at the old
            # size); a notification of a few microseconds, no page is touched
            try:
                pyfuse3.invalidate_inode(inode, attr_only=True)
            except OSError:
                pass  # the kernel let go of the inode meanwhile: nothing to drop
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep_cache)

    @_errors_to_fuse
    async def create(self, parent_inode, name, mode, flags, ctx):
        fh, inode = await self.vfs.create(parent_inode, name, mode, flags, ctx.uid, ctx.gid)
        return pyfuse3.FileInfo(fh=fh, keep_cache=False), await self._ref(inode, ctx)

    @_errors_to_fuse
    async def read(self, fh, off, size):
        data = await self.vfs.read(fh, off, size)
        self.vfs.metrics.read_bytes.inc(len(data))
        return data

    @_errors_to_fuse
    async def write(self, fh, off, buf):
        n = await self.vfs.write(fh, off, buf)
        self.vfs.metrics.written_bytes.inc(n)
        return n

    @_errors_to_fuse
    async def flush(self, fh):
        await self.vfs.flush(fh)

    @_errors_to_fuse
    async def release(self, fh):
        await self.vfs.release(fh)

    @_errors_to_fuse
    async def fsync(self, fh, datasync):
        await self.vfs.fsync(fh)

    @_errors_to_fuse
    async def opendir(self, inode, ctx):
        return await self.vfs.opendir(inode)

    @_errors_to_fuse
    async def readdir(self, fh, start_id, token):
        while True:
            page = await self.vfs.readdir(fh, start_id)
            if not page:
                return
            for dentry, inode in page:
                attrs = await self._attrs(inode, self.vfs.entry_generation(inode), given=False)
                if not pyfuse3.readdir_reply(token, dentry.name, attrs, dentry.cursor):
                    return
                self.vfs.attrs_given(inode)
                self.vfs.lookups[inode.id] += 1
                start_id = dentry.cursor

    @_errors_to_fuse
    async def releasedir(self, fh):
        self.vfs.releasedir(fh)

    @_errors_to_fuse
    async def fsyncdir(self, fh, datasync):
        await self.vfs.fsync_meta()

    @_errors_to_fuse
    async def statfs(self, ctx):
        out = pyfuse3.StatvfsData()
        for k, v in (await self.vfs.statfs()).items():
            setattr(out, k, v)
        return out

    @_errors_to_fuse
    async def setxattr(self, inode, name, value, ctx):
        await self.vfs.setxattr(inode, name, value)

    @_errors_to_fuse
    async def getxattr(self, inode, name, ctx):
        return await self.vfs.getxattr(inode, name)

    @_errors_to_fuse
    async def listxattr(self, inode, ctx):
        return await self.vfs.listxattr(inode)

    @_errors_to_fuse
    async def removexattr(self, inode, name, ctx):
        await self.vfs.removexattr(inode, name)

    @_errors_to_fuse
    async def access(self, inode, mode, ctx):
        await self.vfs.getattr(inode)
        return True  # permissions are checked by the kernel (default_permissions)


def mount_options(extra: set[str], fsname: str) -> set[str]:
    opts = set(pyfuse3.default_options) | {f"fsname={fsname}", "subtype=hafs"}
    return opts | extra
