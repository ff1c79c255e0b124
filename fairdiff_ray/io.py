"""Atomic file and directory writes: a reader never sees half a file, and a failed run leaves the old one.

Pattern: write to a temporary sibling, fsync, then ``os.replace`` (atomic on POSIX within one filesystem).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from fairdiff_ray.errors import UserError


def is_uri(path: str) -> bool:
    """A pyarrow filesystem URI (s3://, gs://, ...) rather than a local path."""
    return "://" in path


_UMASK = os.umask(0o022)
os.umask(_UMASK)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; results are meant to be shared like normal files
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def check_output_dir(path: str | Path, overwrite: bool, what: str = "output directory",
                     flag: str = "--overwrite") -> Path:
    """Refuse to reuse a non-empty directory unless overwrite is set (nothing is deleted here); ``flag`` is how
    the caller's users set overwrite."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
        raise UserError(f"{what} {str(path)!r} already exists: pass {flag} or choose another")
    return path


@contextlib.contextmanager
def atomic_dir(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``path`` in one rename.

    On failure the temporary directory is removed and ``path`` (if it existed) is untouched.
    """
    path = Path(path)
    check_output_dir(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        swap_in_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def swap_in_dir(new: str | Path, path: str | Path) -> Path:
    """Put the finished directory ``new`` at ``path`` (a sibling on the same filesystem), replacing what is
    there: two renames, so ``path`` is missing for an instant at most and never half written."""
    new, path = Path(new), Path(path)
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(new, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, path)
    return path
