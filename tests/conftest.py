"""Configuration shared by the project's tests.

``userproject`` is a user's project that runs against the installed wheel
(``nox -s wheel``), not against this tree. Helpers shared by several test
modules live in plain modules beside this one (``programs``, ``targets``).
"""

collect_ignore = ["userproject"]
