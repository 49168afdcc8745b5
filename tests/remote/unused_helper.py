"""A module nothing imports ahead: the remote tests import it at run time."""

VALUE = 42
