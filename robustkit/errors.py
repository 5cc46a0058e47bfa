"""User-facing errors.

Every error a user can cause (a bad name, a bad file, bad data) is a ``RobustkitError`` whose
message is one line that says what is wrong and how to fix it. The CLI prints that line and
exits with the error's ``exit_code`` (1; 2 for a bad option value, as click's usage errors;
130 for an interrupt that saved its work); anything else is a bug and gets a traceback
under ``-v``.
"""
from __future__ import annotations

from typing import ClassVar


def one_line(err: BaseException) -> str:
    """``Type: first line`` of an error robustkit reports but did not raise (a library's, a
    plugin's), cut at 200 characters: what a one-line message or a report field quotes."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:200]}" if text else type(err).__name__


class RobustkitError(Exception):
    """A problem the user can fix; ``str(err)`` is a complete one-line explanation."""

    exit_code: ClassVar[int] = 1


class OptionError(RobustkitError, ValueError):
    """A bad value on the command line (``--eps abc``): a usage error, exit 2."""

    exit_code = 2


class Interrupted(RobustkitError):
    """Ctrl-C or SIGTERM, after what was done is saved; the message says how to continue."""

    exit_code = 130


class UnknownNameError(RobustkitError, LookupError):
    """A name that no registry knows (carries close matches in its message)."""


class DuplicateNameError(RobustkitError):
    """The same qualified name registered twice."""


class UnsafeFileError(RobustkitError):
    """A file that could run code when loaded, refused without ``--trust-code``."""


class DataError(RobustkitError, ValueError):
    """Data that breaks the input convention (shape, dtype, NaN, bounds, labels)."""


class ParamsError(OptionError):
    """An unknown or ill-typed parameter (``-o steps 0``): a bad option value, exit 2."""
