"""qkov's one error family. Every error that is the user's to fix derives from `QkovError`;
the CLI prints such an error as one line and exits 2, and lets anything else (a bug)
raise. Each class says which input is at fault; the message says what to change.

The classes also derive from the builtin that describes them best (ValueError, …), so
callers that caught those before keep working.
"""
from __future__ import annotations

import re

# An option a message tells the user to pass reads as the caller spells it: `--replace` on the
# command line, `replace=True` in Python. Messages carry it as a marker (`option`); str(error)
# is the Python spelling and `cli_message(error)` the command line's.
_MARK = "\x00"
_OPTION = re.compile(f"{_MARK}([^{_MARK}]*){_MARK}([^{_MARK}]*){_MARK}")


_BARE = "\x01"


def option(name: str, value: str | None = None) -> str:
    """`name` (the API parameter) passed in a message: `--name VALUE` on the command line,
    `name=VALUE` in Python; without a value a flag: `--name` / `name=True`."""
    return f"{_MARK}{name}{_MARK}{value or ''}{_MARK}"


def param(name: str) -> str:
    """`name` (the API parameter) named in a message: `--name` on the command line, `name` in Python."""
    return f"{_MARK}{name}{_MARK}{_BARE}{_MARK}"


def render(message: str, cli: bool) -> str:
    """A message with its options spelled for the command line (cli) or for Python."""
    def spell(m: re.Match) -> str:
        name, value = m.group(1), m.group(2)
        flag = "--" + name.replace("_", "-")
        if value == _BARE:
            return flag if cli else name
        if cli:
            return flag + (f" {value}" if value else "")
        return f"{name}={value or 'True'}"

    return _OPTION.sub(spell, message)


class QkovError(Exception):
    """An error the user can fix; the message names what to change (options as Python
    parameters; `cli_message` spells them as command-line flags)."""

    def __str__(self) -> str:
        return render(super().__str__(), cli=False)


def cli_message(e: BaseException) -> str:
    """What the command line prints for an error: options spelled as flags."""
    return render(Exception.__str__(e), cli=True) if isinstance(e, QkovError) else str(e)


class UsageError(QkovError, ValueError):
    """A command-line or API argument that cannot be used as given."""


class JobFileError(UsageError):
    """A job file that cannot be used as written (syntax, unknown keys, invalid values)."""


class TaskFileError(UsageError):
    """A task file or one of its rows that cannot be used."""


class ModelLoadError(UsageError):
    """A model that cannot be found or loaded as asked."""


class UnsupportedModelError(UsageError):
    """A model whose attention layout qkov cannot find; the message shows how to declare one."""


class NonFiniteGradientError(QkovError, FloatingPointError):
    """Samples whose loss or gradients are not finite, under extract.nonfinite = "error"."""


class StoreError(QkovError, RuntimeError):
    """A run store that cannot be used as asked (missing, incomplete, owned, foreign)."""


class CorruptChunkError(StoreError, ValueError):
    """A chunk whose bytes do not match their checksum (corrupted or half-written after it was
    stored). A ValueError too, like zarr's own checksum error, so one handler serves both."""


class StatsStageError(StoreError):
    """The statistics cannot be computed or written as asked."""


class ClusterError(QkovError, RuntimeError):
    """A cluster that cannot be reached, started or used as configured."""


__all__ = ["QkovError", "UsageError", "JobFileError", "TaskFileError", "ModelLoadError", "UnsupportedModelError",
           "NonFiniteGradientError", "StoreError", "CorruptChunkError", "StatsStageError", "ClusterError"]

# what a damaged chunk's message tells the user to do (DirectChunks and zarr's own reader alike)
DAMAGED_FIX = "the store was corrupted after it was written. Rerun the job with --overwrite (or restore the run from a copy)."


def corrupt_chunk_error(e: BaseException, where: str | None = None) -> StoreError | None:
    """A StoreError for a chunk whose crc32c checksum does not match (corrupted or half-written
    bytes), or None when `e` is something else. DirectChunks names the chunk itself; zarr's
    own reader (remote stores) raises a plain ValueError, named here by the run (`where`)."""
    if isinstance(e, CorruptChunkError):
        return e
    if not isinstance(e, ValueError) or "checksum" not in str(e).lower():
        return None
    return StoreError(f"{where or 'the run'} is damaged: a chunk's bytes do not match its checksum "
                      f"({str(e).splitlines()[0]}); {DAMAGED_FIX}")


# what the file system refuses (a full disk, a read-only mount, a name it cannot hold): the
# user's to fix, and every stage's writes are whole chunks recorded done last, so --resume continues
_OS_FIXES = {
    "ENOSPC": "the disk is full: free space (`qkov plan JOB.toml` shows what the run needs) and continue with {resume}",
    "EDQUOT": "the disk quota is used up: free space or raise the quota and continue with {resume}",
    "EROFS": "the file system is read-only: choose a writable output.path (or remount it) and continue with {resume}",
    "ENAMETOOLONG": "a file name is too long for the file system: choose a shorter output.path (or a shorter {name})",
    "EACCES": "permission denied: choose a writable output.path",
    "EPERM": "permission denied: choose a writable output.path",
}


def os_error(e: BaseException, where: str | None = None) -> StoreError | None:
    """A one-line StoreError for an OSError the file system raised while qkov read or wrote a
    run (no space, read-only, name too long, permission), or None when `e` is something else."""
    import errno as _errno

    name = _errno.errorcode.get(getattr(e, "errno", None) or -1) if isinstance(e, OSError) else None
    if name not in _OS_FIXES:
        return None
    what = getattr(e, "filename", None) or where or "the output"
    fix = _OS_FIXES[name].format(resume=option("resume"), name=param("name"))
    return StoreError(f"the file system refused {what}: {e.strerror or name} ({name}); {fix}")
