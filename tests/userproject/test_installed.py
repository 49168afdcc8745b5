"""What a user of the installed wheel gets: the package, its pytest plugin, its
fakes for fake-clock tests, and the README's example."""

from __future__ import annotations

import math
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

import nursery_procs
from nursery_procs import Policy
from nursery_procs.testing import FakeBehaviour, open_fake_supervisor

README = Path(__file__).resolve().parent / "README.md"


def test_installed_not_from_a_source_tree() -> None:
    assert "site-packages" in Path(nursery_procs.__file__).parts
    assert (Path(nursery_procs.__file__).parent / "py.typed").exists()


def test_plugin_is_active(request: pytest.FixtureRequest) -> None:
    assert request.config.pluginmanager.has_plugin("nursery_procs.testing.pytest_plugin")


async def test_a_real_child() -> None:
    async with nursery_procs.open_supervisor() as sup:
        worker = await sup.start_child(None, name="worker")
        assert await worker.call(math.sqrt, 4.0) == 2.0


async def test_escalation_on_the_fake_clock(autojump_clock: trio.testing.MockClock) -> None:
    policy = Policy(grace_period=5.0, kill_after=3.0)
    async with open_fake_supervisor(FakeBehaviour.IGNORE_SHUTDOWN) as (sup, processes):
        ctx = await sup.start_child(None, name="stubborn", policy=policy)
        started = trio.current_time()
        await ctx.aclose()
        (process,) = processes
        (signum, sent_at), *_ = process.signals
        assert signum == signal.SIGTERM
        assert sent_at - started == pytest.approx(5.0)


def test_readme_example(tmp_path: Path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    script = tmp_path / "example.py"
    script.write_text(blocks[0])
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == str(math.sqrt(2.0))


def test_the_plugin_fails_a_test_that_leaves_a_process(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import subprocess
        import sys

        def test_leaves_a_child_running():
            subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        """
    )
    result = pytester.runpytest_subprocess("-p", "nursery_procs.testing.pytest_plugin")
    # The test body passes; the plugin's check fails it at teardown, and kills the child.
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*the test left things behind*", "*processes still running*"])
