"""One rule for everything flawmap writes (``fit``, ``calibrate``, ``predict``, ``report``, ``export``, ``score``).

1. **Checked before any work**: the nearest existing ancestor of an output must be a writable
   folder (:func:`check_writable`), so a long fit or export never ends in a permission error.
2. **Never replacing what flawmap did not write** without ``force``: an existing output is replaced
   only when the module that writes it recognises it as its own (a model directory, a predict
   folder whose files its ``scores.jsonl`` lists, a report page, an exported graph, a results
   table: :func:`check_replaceable`).
3. **Atomic**: files are written to a temporary sibling and renamed into place; folders are
   staged and renamed (:func:`flawmap.io.write_atomically`, ``predict``'s staging folder).
4. **With the process umask**: temporary files and folders are created private (0600 / 0700) by
   :mod:`tempfile`; :func:`set_umask_mode` gives them the mode an ordinary ``open`` or ``mkdir``
   would (0644 / 0755 under the usual umask 022), so a service account can read the results.

This module needs the standard library only.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable

from flawmap.errors import FlawmapError


def check_writable(path: Path, *, folder: bool) -> None:
    """Fail now, before any long work, if ``path`` (a folder or a file to create or replace)
    cannot be written: its nearest existing ancestor must be a writable folder."""
    existing = Path(os.path.abspath(path))
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing == Path(os.path.abspath(path)):
        if folder != existing.is_dir():
            raise FlawmapError(f"{path}: exists and is {'a file, not a folder' if folder else 'a folder, not a file'}")
        existing = existing if folder else existing.parent
    elif not existing.is_dir():
        raise FlawmapError(f"{path}: cannot be created ({existing} is a file, not a folder)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise FlawmapError(f"{path}: cannot write there ({existing} is not writable)")
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as error:
        raise FlawmapError(f"{path}: cannot write there ({error.strerror or error})") from None


def check_replaceable(path: Path, *, folder: bool, force: bool, ours: Callable[[Path], bool], what: str) -> None:
    """:func:`check_writable`, and unless ``force`` FlawmapError for an existing ``path`` (a file,
    or a non-empty folder) that ``ours`` does not recognise as ``what`` flawmap wrote."""
    check_writable(path, folder=folder)
    exists = path.is_dir() and any(path.iterdir()) if folder else path.is_file()
    if exists and not force and not ours(path):
        raise FlawmapError(f"{path}: exists and is not {what}; give --force to replace it")


def is_listed_output(folder: Path, index: str, key: str) -> bool:
    """Whether ``folder`` holds a JSON-lines file ``index`` and only the files its records name
    under ``key`` (paths relative to ``folder``) besides it: a folder flawmap wrote and the user
    added nothing to."""
    try:
        lines = (folder / index).read_text(encoding="utf-8").splitlines()
        listed = {json.loads(line)[key] for line in lines if line.strip()}
        present = {path.relative_to(folder).as_posix() for path in folder.rglob("*") if not path.is_dir()}
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return present <= listed | {index}


def umask() -> int:
    """The process umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def set_umask_mode(path: Path, *, folder: bool) -> None:
    """Give ``path`` (made by :mod:`tempfile`: 0600 / 0700) the mode ``open`` / ``mkdir`` would
    have given it: 0666 / 0777 less the umask."""
    os.chmod(path, (0o777 if folder else 0o666) & ~umask())
