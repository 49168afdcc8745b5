"""``python -m examples.collab``: run the collaborative editing server."""

import sys

from examples.collab.server import main

if __name__ == "__main__":
    sys.exit(main())
