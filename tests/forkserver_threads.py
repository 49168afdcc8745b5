"""A module that starts a thread on import (a fork server must refuse it)."""

import threading

STOP = threading.Event()
threading.Thread(target=STOP.wait, name="started-on-import", daemon=True).start()
