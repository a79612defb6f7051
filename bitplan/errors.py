"""Exceptions that carry a user-facing, one-line message.

The CLI turns any :class:`BitplanError` into ``error: <message>`` on stderr and exit code 2; anything
else is a bug and keeps its traceback. Keep messages to one line that names the bad thing.
"""

from __future__ import annotations


class BitplanError(Exception):
    """Base class for errors caused by the user's input (not by a bug in bitplan)."""


class FormatError(BitplanError, ValueError):
    """An unknown, malformed or inapplicable format string."""


class PlanError(BitplanError, ValueError):
    """A plan file that is malformed, of another schema version, or does not fit the model."""


class ModelError(BitplanError):
    """A model bitplan cannot load or does not understand."""


class DataError(BitplanError):
    """Missing, empty or too-short text/calibration data."""
