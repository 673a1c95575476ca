"""Error types whose messages are written for the person running the tool.

Every message says what was wrong and what to do; nodes show it as is.
"""


class DynASynError(Exception):
    """Base class: an input or environment problem the user can fix."""


class UnsupportedModelError(DynASynError):
    """The base model is not a family DynASyn supports (SD 1.x, SD 2.x)."""


class InvalidNameError(DynASynError, ValueError):
    """A name for an exported file was refused."""


class TargetExistsError(DynASynError, FileExistsError):
    """An export would overwrite an existing file."""


class ExportWriteError(DynASynError, OSError):
    """An export could not be written (permissions, full disk...)."""
