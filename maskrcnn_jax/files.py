"""Output files written whole or not at all, and checks that an output is not an input.

    with files.atomic_open(path, "w") as f:   # path appears only once f is complete
        json.dump(value, f)
    files.write_json(path, value)

A file is written to a temporary name in its own folder and renamed over `path` only after it
was written and flushed (`os.replace` is atomic on POSIX file systems): an interrupted run, a
full disk or an exception while writing leave `path` as it was (absent, or the previous
complete version), never a truncated file.
"""

import contextlib
import json
import os
import secrets


@contextlib.contextmanager
def atomic_open(path, mode: str = "w"):
    """A file object (text `'w'` or binary `'wb'`) whose content replaces `path` when the block
    ends without an exception; on an exception the temporary file is removed and `path` is
    untouched."""
    if mode not in ("w", "wb"):
        raise ValueError(f"mode {mode!r}: 'w' or 'wb'")
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    # Created with mode 0666 less the umask, as open(path, 'w') would; a unique name, so that
    # processes writing the same path do not share a temporary file.
    temporary = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}."
                                     f"{secrets.token_hex(4)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise


def write_json(path, value, **dump_kwargs):
    """`json.dump(value, ...)` into `path`, whole or not at all (`atomic_open`)."""
    with atomic_open(path, "w") as f:
        json.dump(value, f, **dump_kwargs)


def file_identity(path):
    """`(device, inode)` of the file `path` resolves to (symlinks followed), or None when it
    does not exist: two paths with the same identity are the same file (`os.path.samefile`),
    through symlinks and hard links alike."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino
