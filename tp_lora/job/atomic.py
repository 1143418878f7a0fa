"""Folders written atomically: built under a temporary name next to the target, then renamed into place.

Readers (another rank, another node on a shared file system, a later run) see either no folder or a
complete one, never a partial one; a failure (an exception, or SIGTERM turned into one by
``console.run_command``) removes the temporary folder.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path
from typing import Callable

from ..errors import ConfigError


def write_folder(final: str | os.PathLike[str], make: Callable[[Path], object], *,
                 replace: bool = False) -> bool:
    """Build ``final`` by calling ``make(tmp)`` on an empty temporary folder in the same parent, then rename.

    ``replace=False``: when ``final`` appears meanwhile (another writer got there first) ours is dropped
    and the function returns False. ``replace=True``: an existing ``final`` is swapped out and removed
    after ours is in place. Returns True when our folder is the one at ``final``.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temp(final, "tmp")
    old: Path | None = None
    try:
        make(tmp)
        if replace and final.exists():
            old = _new_temp(final, "old")
            os.rename(final, old / final.name)
        try:
            os.rename(tmp, final)  # replaces only an empty folder; a non-empty one raises
        except OSError:
            if old is not None:  # put the previous folder back
                os.rename(old / final.name, final)
                raise
            if final.is_dir():  # another writer's complete folder is there
                return False
            raise
        return True
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _new_temp(final: Path, kind: str) -> Path:
    """An empty folder ``.NAME.KIND<pid>-<random>`` beside ``final`` (mode from the umask, as mkdir gives)."""
    while True:
        p = final.with_name(f".{final.name}.{kind}{os.getpid()}-{secrets.token_hex(4)}")
        try:
            p.mkdir()
            return p
        except FileExistsError:
            continue


def check_new_folder(path: str | os.PathLike[str], *, force: bool, marker: str) -> None:
    """Refuse to write ``path`` over something: a file, or a non-empty folder unless ``force`` and it holds
    ``marker`` (so ``--force`` replaces an earlier output, never an unrelated folder)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{p} exists and is not a folder")
    if p.is_dir() and any(p.iterdir()):
        if not force:
            raise ConfigError(f"{p} exists and is not empty; pass --force to replace it")
        if not (p / marker).exists():
            raise ConfigError(f"{p} is not empty and holds no {marker}: refusing to replace it, even with --force")
