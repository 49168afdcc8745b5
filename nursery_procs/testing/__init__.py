"""Testing aids: fakes for fake-clock tests, and a leak check for pytest.

* :class:`FakeProcess` and :func:`fake_spawner` let a supervisor run "children"
  inside the test's own Trio run, over in-memory streams, so that timing policy
  (grace periods, escalation) runs on :class:`trio.testing.MockClock` with
  ``autojump_threshold=0`` in milliseconds.
* :mod:`nursery_procs.testing.pytest_plugin` fails any test that leaves child
  processes, zombies, file descriptors or threads behind.
"""

from ._fakes import FakeAnswers as FakeAnswers
from ._fakes import FakeBehaviour as FakeBehaviour
from ._fakes import FakeProcess as FakeProcess
from ._fakes import fake_spawner as fake_spawner
from ._fakes import open_fake_supervisor as open_fake_supervisor
from ._leaks import LeakReport as LeakReport
from ._leaks import Snapshot as Snapshot
from ._waits import wait_process_gone as wait_process_gone
