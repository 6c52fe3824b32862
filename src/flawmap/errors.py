"""The one exception type users see.

Every problem caused by the user's input (a missing folder, a corrupt image, a model directory
that is not a model, an unknown name) raises :class:`FlawmapError` with a one-line message that
names the file or value and the problem. The CLI prints that line and exits non-zero, with no
traceback. Anything else escaping is a bug in flawmap.
"""

from __future__ import annotations


class FlawmapError(Exception):
    """A user-facing error: ``str(error)`` is a complete one-line explanation."""
