"""User-facing errors: bad input, bad config, missing files.

The CLI catches :class:`FeatstudyError`, prints its one-line message (which names the key or file and what to do)
and exits with status 2; a traceback is shown only with ``HYDRA_FULL_ERROR=1``.
"""

from __future__ import annotations

EXIT_USAGE = 2


class FeatstudyError(Exception):
    """An error the user can fix; its message is one line naming the key or path and the fix."""


class ConfigError(FeatstudyError, ValueError):
    """A config key holds a value that is not allowed."""


class DataError(FeatstudyError, ValueError):
    """A dataset, image, weights file or embedding folder is missing or malformed."""
