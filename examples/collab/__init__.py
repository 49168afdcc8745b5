"""A collaborative text editing server: one child process per document."""
