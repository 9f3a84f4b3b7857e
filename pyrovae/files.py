"""Writing files so that nothing half-written is ever left behind.

Every file pyrovae writes (checkpoints, ``config.json``, ``--json`` reports, PNGs, the
summaries of studies) goes through :func:`write_atomic`: the bytes go to a temporary file in
the same folder, which is renamed over the target only once complete. A process killed at
any moment, or a disk that fills up, leaves the previous file intact and no 0-byte file;
a write that fails raises ``OutputError`` (a ``ValueError``: the command line turns it into
one line and exit code 2) naming the file.

JSON is written strictly: ``NaN`` and infinities are not JSON, so :func:`json_safe` turns
them into ``null`` first.
"""

from __future__ import annotations

import errno
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Callable

__all__ = ["OutputError", "write_atomic", "write_text_atomic", "write_json", "json_safe", "TMP_SUFFIX"]

#: suffix of the temporary files; ``pyrovae train --resume`` removes leftovers of killed writes
TMP_SUFFIX = ".tmp"


class OutputError(ValueError):
    """A file could not be written (full disk, no permission, a folder in the way)."""


def _reason(e: OSError) -> str:
    if e.errno == errno.ENOSPC:
        return "the disk is full: free some space"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "no permission to write there: choose another path"
    if e.errno == errno.EISDIR:
        return "a folder of that name is in the way: choose another path"
    if e.errno == errno.ENOENT:
        return "its folder does not exist"
    return e.strerror or type(e).__name__


def write_atomic(path: str | os.PathLike, write: Callable, *, binary: bool = True) -> Path:
    """Call ``write(f)`` on a temporary file beside ``path``, then rename it to ``path``.

    The folder is created if need be. On any failure the temporary file is removed, the old
    ``path`` (if any) is untouched, and an ``OSError`` becomes :class:`OutputError` naming
    ``path``. A ``KeyboardInterrupt`` leaves things the same way and propagates.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    except OSError as e:
        raise OutputError(f"{path}: cannot be written ({_reason(e)})") from None
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise OutputError(f"{path}: cannot be written ({_reason(e)}); nothing was changed") from None
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_atomic(path, lambda f: f.write(text), binary=False)


def json_safe(obj, why: dict | None = None, where: str = ""):
    """``obj`` with every non-finite float replaced by ``None``. With ``why``, each replaced
    value's path (``a.b[3]``) is recorded there with the value it had (``"nan"``, ``"inf"``)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        if why is not None:
            why[where or "."] = "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v, why, f"{where}.{k}" if where else str(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v, why, f"{where}[{i}]") for i, v in enumerate(obj)]
    return obj


def dumps(obj, indent: int | None = 2, explain: bool = False) -> str:
    """Strict JSON text of ``obj``: non-finite floats become ``null`` (``allow_nan=False``
    guarantees that nothing else slips through). With ``explain``, a dict gains a field
    ``null_values`` mapping each such value's path to what it was (``"nan"``, ``"inf"``): for
    example the Pareto k-hat of an example whose K weights leave nothing to fit."""
    why: dict = {}
    safe = json_safe(obj, why)
    if explain and why and isinstance(safe, dict):
        safe = {**safe, "null_values": why}
    return json.dumps(safe, indent=indent, allow_nan=False)


def write_json(path: str | os.PathLike, obj, explain: bool = False) -> Path:
    """Write ``obj`` as strict JSON to ``path`` atomically (see :func:`dumps`)."""
    return write_text_atomic(path, dumps(obj, explain=explain) + "\n")
