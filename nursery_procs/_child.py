"""``python -m nursery_procs._child FD PARENT_PID``: a child process's entry point."""

import sys

from nursery_procs._runtime import child_main

if __name__ == "__main__":
    child_main(sys.argv)
