"""``Policy(merge_pages=True)``: the fork server's pages are marked for the kernel's
samepage merging (KSM), every forked child inherits the marks, and ``ksmd``,
where root runs it, merges what the children copied without changing it."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from mappings import vm_flags

import nursery_procs
from nursery_procs import Policy
from nursery_procs._ksm import KSM_SYSFS, ksm_running, mergeable_ranges, merged_pages

MERGE = Policy(merge_pages=True)
FORK = {"start_method": "forkserver"}


def _uss_mib(pid: int) -> float:
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value, *_ = line.split()
        fields[name.rstrip(":")] = int(value)
    return (fields["Private_Clean"] + fields["Private_Dirty"]) / 1024


def test_the_ranges_marked_are_the_private_writable_ones() -> None:
    maps = "\n".join(
        [
            "55d0c0a00000-55d0c0a21000 rw-p 00000000 00:00 0          [heap]",
            "7f0000000000-7f0000100000 rw-p 00000000 00:00 0 ",
            "7f0000100000-7f0000101000 r--p 00000000 fe:00 42         /usr/lib/libc.so.6",
            "7f0000101000-7f0000102000 r-xp 00001000 fe:00 42         /usr/lib/libc.so.6",
            "7f0000102000-7f0000104000 rw-p 00002000 fe:00 42         /usr/lib/libc.so.6",
            "7f0000200000-7f0000300000 rw-s 00000000 00:01 7          /dev/shm/shared",
            "7ffc00000000-7ffc00002000 r--p 00000000 00:00 0          [vvar]",
            "7ffc00002000-7ffc00004000 r-xp 00000000 00:00 0          [vdso]",
            "7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0          [stack]",
        ]
    )
    assert mergeable_ranges(maps) == [
        (0x55D0C0A00000, 0x55D0C0A21000),
        (0x7F0000000000, 0x7F0000100000),
        (0x7F0000102000, 0x7F0000104000),
        (0x7FFD00000000, 0x7FFD00021000),
    ]


async def test_the_fork_server_and_its_children_are_marked_mergeable() -> None:
    async with nursery_procs.open_supervisor(policy=MERGE, **FORK) as sup:
        child = await sup.start_child(None)
        assert child.pid is not None
        server = await child.call(os.getppid)
        for pid in (server, child.pid):
            assert "mg" in vm_flags(pid, "[heap]")
            assert "mg" in vm_flags(pid, "[stack]")


async def test_without_merge_pages_nothing_is_marked() -> None:
    async with nursery_procs.open_supervisor(**FORK) as sup:
        child = await sup.start_child(None)
        assert child.pid is not None
        server = await child.call(os.getppid)
        for pid in (server, child.pid):
            assert "mg" not in vm_flags(pid, "[heap]")


async def test_a_fork_server_says_when_no_page_will_be_merged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="nursery_procs.forkserver")
    async with nursery_procs.open_supervisor(policy=MERGE, **FORK) as sup:
        await sup.start_child(None)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    running = ksm_running()
    if running is None:
        assert any("this kernel has no KSM" in w for w in warnings), warnings
    elif not running:
        assert any("ksmd is not running" in w for w in warnings), warnings
    else:
        assert not any("merge_pages" in w for w in warnings), warnings


def test_merge_pages_must_be_a_bool() -> None:
    with pytest.raises(TypeError):
        Policy(merge_pages="yes")  # type: ignore[arg-type]


@pytest.fixture
def ksmd() -> Iterator[None]:
    """``ksmd`` running fast for one test (root only); the settings put back after."""
    names = ("run", "pages_to_scan", "sleep_millisecs")
    if not (KSM_SYSFS / "run").exists() or not os.access(KSM_SYSFS / "run", os.W_OK):
        pytest.skip("running ksmd needs a kernel with KSM, and root")
    saved = {name: (KSM_SYSFS / name).read_text() for name in names}
    try:
        (KSM_SYSFS / "pages_to_scan").write_text("5000\n")
        (KSM_SYSFS / "sleep_millisecs").write_text("10\n")
        (KSM_SYSFS / "run").write_text("1\n")
        yield
    finally:
        for name in reversed(names):
            (KSM_SYSFS / name).write_text(saved[name])


@pytest.mark.usefixtures("ksmd")
async def test_ksmd_merges_what_idle_children_copied() -> None:
    async with nursery_procs.open_supervisor(policy=MERGE, **FORK) as sup:
        children = [await sup.start_child(None) for _ in range(3)]
        pids = [child.pid for child in children if child.pid is not None]
        for child in children:
            await child.call(int)
        before = [_uss_mib(pid) for pid in pids]
        # ksmd works on its own schedule: look at its counters until it has merged
        # (a page is merged once it has stayed the same over two of its scans); its
        # counters announce nothing, so they are polled.
        with trio.fail_after(60):
            while not all((merged_pages(pid) or 0) > 100 for pid in pids):  # noqa: ASYNC110
                await trio.sleep(0.05)
        after = [_uss_mib(pid) for pid in pids]
        for child in children:
            assert await child.call(sum, [1, 2, 3]) == 6  # merged pages still work
    assert all(a < b / 2 for a, b in zip(after, before, strict=True)), (before, after)
