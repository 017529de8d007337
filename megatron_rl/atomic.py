"""Directory operations that a crash cannot leave half done under a name that looks whole."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

DELETING_PREFIX = ".deleting-"
"""Hidden name a directory takes while it is deleted; leftovers of a crash carry it."""


def delete_aside(path: str | os.PathLike[str]) -> None:
    """Rename `path` to `.deleting-<name>`, then delete it: a crash mid-delete leaves a hidden
    leftover to sweep later, never a partial directory under its own name."""
    path = Path(path)
    doomed = path.with_name(DELETING_PREFIX + path.name)
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)
