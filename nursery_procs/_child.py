"""A child process's entry point, ``python -m nursery_procs._child FD PARENT_PID``,
and a fork server's, ``python -m nursery_procs._child --fork-server FD MASTER_PID``."""

import sys

if __name__ == "__main__":
    if sys.argv[1:2] == ["--fork-server"]:
        from nursery_procs import _runtime
        from nursery_procs._forkserver import serve_forks

        serve_forks(sys.argv[2:], _runtime.FORKED)
    else:
        from nursery_procs._runtime import child_main

        child_main(sys.argv)
