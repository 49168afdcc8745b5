"""The project's own tests. ``userproject`` is a user's project that runs against
the installed wheel (``nox -s wheel``), not against this tree."""

collect_ignore = ["userproject"]
