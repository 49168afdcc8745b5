"""A module only the test process imports: calling its function on a remote
grandchild ships it there, through the intermediary."""


def double(value: int) -> int:
    return 2 * value
