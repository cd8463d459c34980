"""What the vfs keeps of the kernel's view of files (no mount): the version of its pages,
the generation of its inodes with the writeback cache, the write lock across the last
close, the absent security.* xattrs the kernel asks for before every write."""

from __future__ import annotations

import errno
import os

import pytest
import trio
from metacheck import assert_consistent

from hafs import home
from hafs.errors import FsError
from hafs.fs import vfs as vfs_module
from hafs.fs.files import content_version
from hafs.fs.vfs import Options, Vfs
from hafs.meta import ROOT_INODE
from hafs.store.placement import Placement


@pytest.fixture(params=[False, True], ids=["default", "writeback"])
async def vfs(tmp_path, request):
    home.create(tmp_path / "h")
    fs = home.open_fs(tmp_path / "h")
    placement = Placement(fs.ring, fs.stores, fs.replicas, trio.CapacityLimiter(8))
    v = Vfs(fs.meta, placement, Options(gc_grace_s=0, writeback_cache=request.param))
    async with trio.open_nursery() as nursery:
        await nursery.start(v.run)
        yield v
        await v.shutdown()
        assert_consistent(fs.meta)
        nursery.cancel_scope.cancel()
    fs.meta.close()


async def new_file(v: Vfs, name: bytes, data: bytes) -> int:
    """A file written and closed on this mount; the kernel holds a reference to it."""
    fh, inode = await v.create(ROOT_INODE, name, 0o644, os.O_WRONLY, 0, 0)
    v.entry_generation(inode)
    v.lookups[inode.id] += 1
    await v.write(fh, 0, data)
    await v.flush(fh)
    await v.release(fh)
    return inode.id


async def changed_elsewhere(v: Vfs, ino: int) -> None:
    """What another mount's commit does to the version: a new mtime and ctime."""
    v.engine.setattr(ino, mtime_ns=v.engine.getattr(ino).mtime_ns + 1)


async def test_the_pages_of_a_close_stay_current_through_chmod_and_utime(vfs):
    ino = await new_file(vfs, b"f", b"page" * 1024)  # whole pages: the kernel has them all
    assert vfs.page_versions[ino] == content_version(vfs.engine.getattr(ino))
    await vfs.setattr(ino, mode=0o100600)
    await vfs.setattr(ino, atime_ns=1, mtime_ns=2)
    fh, keep_cache, _ = await vfs.open(ino, os.O_RDONLY)
    await vfs.release(fh)
    assert keep_cache
    await changed_elsewhere(vfs, ino)
    await vfs.setattr(ino, mode=0o100644)  # the pages were of an older version: not current
    assert vfs.page_versions[ino] != content_version(vfs.engine.getattr(ino))


async def test_a_write_of_part_of_a_page_keeps_no_pages(vfs):
    """Without the writeback cache the kernel keeps a page written in part without its
    other bytes: the next open must drop the file's pages."""
    ino = await new_file(vfs, b"f", b"data")
    fh, keep_cache, _ = await vfs.open(ino, os.O_RDONLY)
    await vfs.release(fh)
    assert keep_cache == vfs.opts.writeback_cache


async def test_the_kernels_attributes_are_kept_at_open_while_they_are_of_the_version(vfs):
    """An open drops the kernel's attributes only when they are not of the version it
    finds: a file written here and given to the kernel since keeps them, another mount's
    change drops them (with the writeback cache: whenever the pages are dropped)."""
    ino = await new_file(vfs, b"f", b"data")  # (a page in part: its pages are dropped)
    vfs.attrs_given(vfs.engine.getattr(ino))  # e.g. the reply to tar's utimensat
    fh, keep_cache, attrs_current = await vfs.open(ino, os.O_RDONLY)
    await vfs.release(fh)
    assert attrs_current == (keep_cache or not vfs.opts.writeback_cache)
    await changed_elsewhere(vfs, ino)
    try:
        fh, keep_cache, attrs_current = await vfs.open(ino, os.O_RDONLY)
    except FsError as e:  # the writeback cache: the kernel replaces its inode, then retries
        assert vfs.opts.writeback_cache and e.errno == errno.ESTALE
        fh, keep_cache, attrs_current = await vfs.open(ino, os.O_RDONLY)
    await vfs.release(fh)
    assert not keep_cache and not attrs_current
    await vfs.forget(ino, 1)
    assert ino not in vfs.attr_versions


async def test_a_writer_that_opens_during_the_last_close_keeps_the_lock(vfs):
    ino = await new_file(vfs, b"f", b"x")
    fh1, _, _ = await vfs.open(ino, os.O_WRONLY)
    await vfs.write(fh1, 0, b"first")
    fs = vfs.handles[fh1].file
    async with trio.open_nursery() as nursery:
        nursery.start_soon(vfs.release, fh1)
        await trio.sleep(0)  # the release runs up to its flush's first wait
        fh2, _, _ = await vfs.open(ino, os.O_RDWR)
        if not vfs.opts.writeback_cache:
            await vfs.write(fh2, 5, b"second")
    assert fs.lease is not None and vfs.locks.valid(fs.lease), "the open writer holds the lock"
    await vfs.release(fh2)
    assert fs.lease is None
    fh, _, _ = await vfs.open(ino, os.O_RDONLY)
    want = b"first" + (b"" if vfs.opts.writeback_cache else b"second")
    assert await vfs.read(fh, 0, 100) == want
    await vfs.release(fh)


async def test_writeback_opens_take_the_lock_and_leave_o_append_to_the_kernel(vfs):
    ino = await new_file(vfs, b"f", b"0123456789")
    fh, _, _ = await vfs.open(ino, os.O_WRONLY | os.O_APPEND)
    h = vfs.handles[fh]
    assert (h.file.lease is not None) == vfs.opts.writeback_cache
    await vfs.write(fh, 2, b"ab")  # the kernel's offset, with the writeback cache
    await vfs.release(fh)
    fh, _, _ = await vfs.open(ino, os.O_RDONLY)
    want = b"01ab456789" if vfs.opts.writeback_cache else b"0123456789ab"
    assert await vfs.read(fh, 0, 100) == want
    await vfs.release(fh)


async def kernel_lookup(v: Vfs, name: bytes, pid: int) -> int:
    """The generation a lookup of `name` by process `pid` gives the kernel."""
    return v.entry_generation(await v.lookup(ROOT_INODE, name), pid)


async def test_a_file_changed_elsewhere_gets_a_new_kernel_inode(vfs):
    """With the writeback cache: a new generation at the next lookup, or ESTALE at an open
    (once: the kernel looks the name up again, twice, and retries)."""
    ino = await new_file(vfs, b"f", b"data")
    assert await kernel_lookup(vfs, b"f", 1) == 0  # unchanged
    await changed_elsewhere(vfs, ino)
    wb = vfs.opts.writeback_cache
    assert await kernel_lookup(vfs, b"f", 1) == (1 if wb else 0)
    assert await kernel_lookup(vfs, b"f", 1) == (1 if wb else 0)  # (the kernel's second lookup)
    assert (vfs.page_versions.get(ino) == content_version(vfs.engine.getattr(ino))) == wb
    fh, keep_cache, _ = await vfs.open(ino, os.O_RDONLY, pid=1)  # the new inode: no pages
    await vfs.release(fh)
    assert keep_cache == wb and not vfs.replacing

    await changed_elsewhere(vfs, ino)
    if wb:
        with pytest.raises(FsError) as e:
            await vfs.open(ino, os.O_RDONLY, pid=2)
        assert e.value.errno == errno.ESTALE and vfs.generations[ino] == 2
        assert ino in vfs.replacing
        assert await kernel_lookup(vfs, b"f", 2) == 2
    fh, keep_cache, _ = await vfs.open(ino, os.O_RDONLY, pid=2)  # the kernel's retry
    assert keep_cache == wb and not vfs.replacing
    await vfs.release(fh)


@pytest.mark.parametrize("vfs", [True], ids=["writeback"], indirect=True)
async def test_opens_of_the_old_inode_answer_estale_and_a_retry_never_does(vfs):
    """Opens by other processes while the kernel replaces its inode are opens of the old
    one (they came before their own lookup): ESTALE too.  A retry is answered with the
    new inode even if the file changed again meanwhile (it changed during that open)."""
    ino = await new_file(vfs, b"f", b"data")
    await changed_elsewhere(vfs, ino)
    for pid in (1, 2):
        with pytest.raises(FsError) as e:
            await vfs.open(ino, os.O_RDONLY, pid=pid)
        assert e.value.errno == errno.ESTALE
    assert vfs.generations[ino] == 1  # one replacement for both
    for _ in range(2):
        assert await kernel_lookup(vfs, b"f", 1) == 1
    built = content_version(vfs.engine.getattr(ino))
    await changed_elsewhere(vfs, ino)
    fh1, keep_cache, _ = await vfs.open(ino, os.O_RDONLY, pid=1)
    assert not keep_cache and not vfs.replacing
    assert vfs.page_versions[ino] == built  # the size the kernel's new inode has
    fh2, _, _ = await vfs.open(ino, os.O_RDONLY, pid=2)  # the retry without its own lookup
    fh3, keep_cache, _ = await vfs.open(ino, os.O_RDONLY, pid=3)  # a new open: kept inode
    assert not keep_cache and vfs.generations[ino] == 1
    for fh in (fh1, fh2, fh3):
        await vfs.release(fh)
    assert ino not in vfs.files


@pytest.mark.parametrize("vfs", [True], ids=["writeback"], indirect=True)
async def test_a_writer_keeps_its_lock_from_its_open_answered_estale_to_its_retry(
    vfs, monkeypatch
):
    """No other mount writes between the two: the new inode's size is the one it writes
    after.  A retry that never comes lets the handle and the lock go."""
    monkeypatch.setattr(vfs_module, "RETRY_HOLD_S", 0.2)
    ino = await new_file(vfs, b"f", b"data")
    await changed_elsewhere(vfs, ino)
    with pytest.raises(FsError):
        await vfs.open(ino, os.O_WRONLY | os.O_APPEND, pid=1)
    fs = vfs.files[ino]
    lease = fs.lease
    assert lease is not None and vfs.locks.valid(lease)
    await kernel_lookup(vfs, b"f", 1)
    fh, _, _ = await vfs.open(ino, os.O_WRONLY | os.O_APPEND, pid=1)
    assert vfs.handles[fh].file is fs and fs.lease is lease
    await vfs.write(fh, 4, b"more")
    await vfs.release(fh)
    assert fs.lease is None

    await changed_elsewhere(vfs, ino)
    with pytest.raises(FsError):
        await vfs.open(ino, os.O_WRONLY, pid=2)
    assert vfs.files[ino].lease is not None
    await trio.sleep(0.4)
    assert ino not in vfs.files and not vfs._held
    with pytest.raises(FsError):  # the old inode, still: the kernel looks up and retries
        await vfs.open(ino, os.O_RDONLY, pid=3)
    await kernel_lookup(vfs, b"f", 3)
    fh, _, _ = await vfs.open(ino, os.O_RDONLY, pid=3)
    assert await vfs.read(fh, 0, 100) == b"datamore"
    await vfs.release(fh)


async def test_an_absent_security_xattr_is_answered_from_memory_for_a_while(vfs, monkeypatch):
    monkeypatch.setattr(vfs_module, "XATTR_ABSENT_S", 0.2)
    ino = await new_file(vfs, b"f", b"data")
    for _ in range(2):
        with pytest.raises(FsError) as e:
            await vfs.getxattr(ino, b"security.capability")
        assert e.value.errno == errno.ENODATA
    vfs.engine.set_xattr(ino, b"security.capability", b"cap")  # another mount sets it...
    with pytest.raises(FsError):
        await vfs.getxattr(ino, b"security.capability")
    await trio.sleep(0.3)  # ...and it is seen within XATTR_ABSENT_S
    assert await vfs.getxattr(ino, b"security.capability") == b"cap"
    await vfs.removexattr(ino, b"security.capability")
    with pytest.raises(FsError):
        await vfs.getxattr(ino, b"security.capability")
    await vfs.setxattr(ino, b"security.capability", b"new")  # this mount's change: at once
    assert await vfs.getxattr(ino, b"security.capability") == b"new"
