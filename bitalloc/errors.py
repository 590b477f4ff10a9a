"""The project's exception types.

Every bad input raises :class:`BitallocError` (or a subclass) with a message that says what
to change. The CLI prints that message as one line and exits non-zero.
"""

from __future__ import annotations


class BitallocError(Exception):
    """A problem with the user's input or environment, with a message naming the fix."""


class InfeasibleBudgetError(BitallocError):
    """The requested budget cannot be met (or exceeds what any choice can use).

    ``feasible_range`` holds the (lowest, highest) achievable value of the constrained
    quantity, in the unit the user asked in (for example average bits per weight).
    """

    def __init__(self, message: str, feasible_range: tuple[float, float] | None = None):
        super().__init__(message)
        self.feasible_range = feasible_range


class ConfigError(BitallocError):
    """An option (or a combination of options) of a config is invalid; the message names each
    option as the user wrote it (``avg_bits`` in Python, ``--avg-bits`` on the command line)."""
