"""Checkpoint integrity: per-rank manifests, verification, and the fall-back to the newest intact checkpoint.

Ray Train copies every rank's checkpoint directory file by file into one storage directory, so a worker or
driver killed during a save or an upload, or a damaged disk, can leave a checkpoint with missing or truncated
files. Each rank writes ``manifest_rank<r>.json`` last (size and sha256 of every file it wrote, and the world
size); a checkpoint is intact when the manifests of all its ranks are there and every listed file matches.

Names: ``checkpoint_<step:08d>``; after a fall-back the run's later checkpoints get ``-<attempt>`` appended
(``checkpoint_00000003-1``), so a re-saved step never shares a directory with the damaged copy Ray still
lists (Ray deleting that old entry later would otherwise delete the new one too).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import posixpath
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MANIFEST = "manifest_rank{rank}.json"
_MANIFEST_RE = re.compile(r"^manifest_rank\d+\.json$")
_NAME_RE = re.compile(r"^checkpoint_(\d+)(?:-(\d+))?$")


def checkpoint_name(step: int, attempt: int = 0) -> str:
    return f"checkpoint_{step:08d}" + (f"-{attempt}" if attempt else "")


def parse_name(name: str) -> tuple[int, int] | None:
    """``checkpoint_00000003-1`` -> (3, 1); None for anything else."""
    m = _NAME_RE.match(name)
    return (int(m.group(1)), int(m.group(2) or 0)) if m else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(path: Path, rank: int, world_size: int, step: int) -> Path:
    """List every file under ``path`` (this rank's part of the checkpoint); call after all of them are written."""
    files = {p.relative_to(path).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(path.rglob("*")) if p.is_file() and not _MANIFEST_RE.match(p.name)}
    out = path / MANIFEST.format(rank=rank)
    out.write_text(json.dumps({"rank": rank, "world_size": world_size, "step": step, "files": files}, indent=1))
    return out


def verify_checkpoint(path: str | Path) -> str | None:
    """None when the checkpoint in ``path`` is intact, else what is wrong with it (one phrase naming the file)."""
    path = Path(path)
    try:
        world = int(json.loads((path / MANIFEST.format(rank=0)).read_text())["world_size"])
    except (FileNotFoundError, NotADirectoryError):
        return f"{MANIFEST.format(rank=0)} is missing (an unfinished save or upload)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST.format(rank=0)} is unreadable ({type(e).__name__})"
    for rank in range(world):
        name = MANIFEST.format(rank=rank)
        try:
            files = json.loads((path / name).read_text())["files"]
        except FileNotFoundError:
            return f"{name} is missing (an unfinished save or upload)"
        except (OSError, ValueError, KeyError, TypeError) as e:
            return f"{name} is unreadable ({type(e).__name__})"
        for rel, want in files.items():
            f = path / rel
            if not f.is_file():
                return f"{rel} is missing"
            if f.stat().st_size != want["size"]:
                return f"{rel} has {f.stat().st_size} bytes, the manifest says {want['size']}"
            if _sha256(f) != want["sha256"]:
                return f"{rel} does not match its sha256 in {name}"
    return None


@dataclass
class Restored:
    """What ``open_intact`` found: the directory to restore from (None: no checkpoint, start at step 0), its
    name, the damaged newer checkpoints skipped on the way (name, reason), and the attempt number for the
    names of this run's next checkpoints."""

    dir: Path | None = None
    name: str | None = None
    damaged: list[tuple[str, str]] = field(default_factory=list)
    attempt: int = 0


def _siblings(fs: Any, parent: str) -> list[str]:
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(parent, allow_not_found=True))
    return [i.base_name for i in infos if i.type == pafs.FileType.Directory and parse_name(i.base_name)]


@contextlib.contextmanager
def open_intact(checkpoint: Any, log: Callable[[str], None]) -> Iterator[Restored]:
    """Ray's latest checkpoint if intact, else the newest intact older one in the same run directory.

    checkpoint: a ``ray.train.Checkpoint`` (or None); log: where to say which checkpoint was damaged and
    which one the run resumes from. Raises RuntimeError when no intact checkpoint is left.
    """
    if checkpoint is None:
        yield Restored()
        return
    from ray.train import Checkpoint

    fs = checkpoint.filesystem
    parent, latest = posixpath.split(checkpoint.path.rstrip("/"))
    siblings = _siblings(fs, parent)
    key = parse_name(latest)
    older = sorted((n for n in siblings if key is None or parse_name(n) < key), key=parse_name, reverse=True)
    damaged: list[tuple[str, str]] = []
    for name in [latest, *older]:
        stack = contextlib.ExitStack()
        d = Path(stack.enter_context(Checkpoint(posixpath.join(parent, name), fs).as_directory()))
        reason = verify_checkpoint(d)
        if reason is None:
            if damaged:
                attempt = 1 + max(parse_name(n)[1] for n in siblings)  # type: ignore[index]
                log(f"[fairdiff] WARNING: checkpoint {', '.join(n for n, _ in damaged)} in {parent} is damaged "
                    f"({'; '.join(r for _, r in damaged)}): resuming from {name} instead; the steps after it are "
                    "trained again")
            else:
                attempt = 0
            with stack:
                yield Restored(d, name, damaged, attempt)
            return
        stack.close()
        damaged.append((name, reason))
    raise RuntimeError(f"no intact checkpoint left in {parent} ({'; '.join(f'{n}: {r}' for n, r in damaged)}): "
                       "start the run afresh with run.overwrite=true")


SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's list of the run's registered checkpoints


def newest_intact(run_dir: Path) -> tuple[str | None, list[tuple[str, str]]]:
    """Driver-side look at a local run directory: (the checkpoint a resume will start from, the damaged newer
    ones it skips). Starts at Ray's latest registered checkpoint; (None, []) when Ray has none registered (the
    run starts at step 0). ValueError when Ray's snapshot is unreadable."""
    path = run_dir / SNAPSHOT
    if not path.is_file():
        return None, []
    try:
        latest = (json.loads(path.read_text()).get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
    except (OSError, ValueError, AttributeError) as e:
        raise ValueError(f"{path} is unreadable ({type(e).__name__})") from None
    if latest is None or parse_name(latest) is None:
        return None, []
    names = sorted((p.name for p in run_dir.glob("checkpoint_*") if p.is_dir() and parse_name(p.name)
                    and parse_name(p.name) <= parse_name(latest)), key=parse_name, reverse=True)  # type: ignore[operator]
    damaged = []
    for name in names:
        reason = verify_checkpoint(run_dir / name)
        if reason is None:
            return name, damaged
        damaged.append((name, reason))
    return None, damaged


def checkpoint_for_step(run_dir: Path, step: int) -> Path | None:
    """The newest intact local checkpoint directory of ``step`` (``checkpoint_<step>`` or, after a fall-back,
    ``checkpoint_<step>-<attempt>``); None when there is none."""
    found = [p for p in run_dir.glob(f"checkpoint_{step:08d}*") if p.is_dir() and (parse_name(p.name) or (-1,))[0] == step]
    for p in sorted(found, key=lambda p: parse_name(p.name), reverse=True):  # type: ignore[arg-type, return-value]
        if verify_checkpoint(p) is None:
            return p
    return None
