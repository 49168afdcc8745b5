"""``python -m nursery_procs``: the ``nursery-procs`` command (see :mod:`nursery_procs._cli`)."""

from ._cli import main

if __name__ == "__main__":
    raise SystemExit(main())
