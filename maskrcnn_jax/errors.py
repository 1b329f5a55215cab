"""The errors a user can fix, which the command-line tools report as one line (`cli.reporting`).

- `UsageError`: a bad command-line argument or configuration value (a flag, a config key, an
  output folder that must not be written into); the tools exit 2.
- `InputError`: an input that exists but cannot be used (a checkpoint, a data set split, an
  image); the tools exit 1. `CheckpointError` and `ImageError` name the file or the image.

Both are `ValueError`s, so library callers that catch ValueError keep working. Anything else
that escapes a tool is an internal error and keeps its traceback.
"""

from typing import Optional


class UsageError(ValueError):
    """A bad argument or setting; the message names it, its value and what is allowed."""


class ConfigError(UsageError):
    """A training config value that cannot run (`training.config_checks`)."""


class InputError(ValueError):
    """An input file or data set that exists but cannot be used; the message names it."""


class CheckpointError(InputError):
    """A checkpoint (folder or `.pth`) that cannot be read; the message names the path."""


class ImageError(InputError):
    """An image that cannot be read or used.

    Attributes: `reason` (what is wrong, without the image's name), `index` (its position in
    the caller's list, or None) and `path` (its file, or None). The message is
    `'<path>: <reason>'`, or `'image <index>: <reason>'` for an array.
    """

    def __init__(self, reason: str, index: Optional[int] = None, path: Optional[str] = None):
        self.reason, self.index, self.path = reason, index, path
        where = str(path) if path is not None else f"image {index}"
        super().__init__(f"{where}: {reason}")
