"""errors.one_error: a nursery's ExceptionGroup becomes the one hafs error that matters."""

import errno

import pytest
import trio

from hafs.errors import BlockMissing, FsError, NoSpace, QuorumLost, one_error


async def fail_with(exc: BaseException) -> None:
    raise exc  # before any checkpoint: every task of the nursery fails, none is cancelled


async def run_together(*excs: BaseException) -> None:
    with one_error():
        async with trio.open_nursery() as nursery:
            for exc in excs:
                nursery.start_soon(fail_with, exc)


async def test_no_space_beats_eio_whatever_the_order():
    for excs in [
        (QuorumLost("q"), NoSpace("full")),
        (NoSpace("full"), QuorumLost("q")),
        (BlockMissing("b"), QuorumLost("q"), NoSpace("full")),
    ]:
        with pytest.raises(NoSpace, match="full"):
            await run_together(*excs)


async def test_an_fs_error_with_enospc_counts_as_no_space():
    with pytest.raises(FsError) as err:
        await run_together(QuorumLost("q"), FsError(errno.ENOSPC))
    assert err.value.errno == errno.ENOSPC


async def test_one_error_of_a_group_is_raised_as_it_is():
    with pytest.raises(QuorumLost, match="q") as err:
        await run_together(QuorumLost("q"))
    assert err.value.__cause__ is None


async def test_a_hafs_error_beats_a_bug_and_the_bug_is_logged(caplog):
    with pytest.raises(BlockMissing):
        await run_together(ValueError("a bug"), BlockMissing("b"))
    assert "a bug" in caplog.text and "Traceback" in caplog.text


async def test_nested_groups_are_flattened():
    async def inner() -> None:
        await run_together_raw(QuorumLost("q"), NoSpace("deep"))

    async def run_together_raw(*excs: BaseException) -> None:
        async with trio.open_nursery() as nursery:
            for exc in excs:
                nursery.start_soon(fail_with, exc)

    with pytest.raises(NoSpace, match="deep"):
        with one_error():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(inner)
                nursery.start_soon(fail_with, BlockMissing("b"))


async def test_cancellation_is_left_to_trio():
    with trio.move_on_after(0.05) as scope:
        with one_error():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.sleep_forever)
                await trio.sleep_forever()
    assert scope.cancelled_caught
