"""A module nothing imports ahead: a remote grandchild fetches it at run time."""

VALUE = 43
