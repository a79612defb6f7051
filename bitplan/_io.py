"""Atomic artifact writes: a crash leaves either the old file or the new one, never half of either.

Write to a temporary file in the destination's directory (same filesystem), flush and fsync it,
then ``os.replace`` it over the destination -- an atomic rename on POSIX and Windows.

Several files that only make sense together (a search's front plans, pick, trials table and report) go
through a :class:`FileSet`: every file is written to its temporary first, so a crash while writing leaves
the previous set untouched; the commit then removes the set's manifest, renames everything into place
(microseconds) and writes a new manifest naming each file's SHA-256. A set whose manifest is missing or
disagrees with the files was interrupted inside those microseconds and is rewritten by the next run.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bitplan.errors import BitplanError

__all__ = ["FileSet", "atomic_path", "atomic_write_bytes", "atomic_write_json", "atomic_write_text", "check_file_set", "pid_alive", "sha256_file"]


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed over ``path``, else removed."""
    tmp_path = _temp_beside(Path(path), suffix)
    dest = Path(path)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        raise


def _remove_stale(parent: Path, name: str) -> None:
    """Delete temporary files a killed process left beside ``name`` (``.NAME.PID.XXXX.tmp`` of a dead PID)."""
    for p in parent.glob(f".{glob.escape(name)}.*.tmp"):
        pid = p.name[len(name) + 2 :].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            with contextlib.suppress(OSError):
                p.unlink()


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _temp_beside(dest: Path, suffix: str = "") -> Path:
    parent = dest.parent if str(dest.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(parent, dest.name)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.{os.getpid()}.", suffix=suffix + ".tmp", dir=parent)
    except OSError as e:
        raise BitplanError(f"cannot write {dest}: {e.strerror or e}") from None
    os.close(fd)
    return Path(tmp)


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class FileSet:
    """Files under ``root`` replaced together, with a manifest (module docstring). Use as a context manager:
    stage files with :meth:`path` / :meth:`write_text`, mark old ones with :meth:`remove`; leaving the block
    normally commits, an exception discards the temporaries and leaves every file as it was."""

    def __init__(self, root: str | os.PathLike[str], manifest: str, kind: str, *, invalidates: tuple[str, ...] = ()) -> None:
        self.root, self.manifest, self.kind = Path(root), manifest, kind
        self.invalidates = invalidates  # other files that describe the old set (removed before the renames)
        self._staged: dict[Path, Path] = {}
        self._removed: list[Path] = []

    def path(self, rel: str, suffix: str = "") -> Path:
        """A temporary path to write ``root/rel`` to; it is renamed into place on commit."""
        dest = self.root / rel
        if dest in self._staged:
            raise ValueError(f"{rel} staged twice")
        self._staged[dest] = _temp_beside(dest, suffix)
        return self._staged[dest]

    def write_text(self, rel: str, text: str) -> None:
        self.path(rel).write_text(text, encoding="utf-8")

    def remove(self, rel: str) -> None:
        self._removed.append(self.root / rel)

    def __enter__(self) -> FileSet:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()

    def discard(self) -> None:
        for tmp in self._staged.values():
            with contextlib.suppress(OSError):
                tmp.unlink()
        self._staged.clear()

    def commit(self) -> None:
        try:
            for tmp in self._staged.values():
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
            hashes = {str(d.relative_to(self.root)): sha256_file(t) for d, t in self._staged.items()}
        except BaseException:
            self.discard()
            raise
        for name in (self.manifest, *self.invalidates):
            (self.root / name).unlink(missing_ok=True)
        for dest, tmp in self._staged.items():
            os.replace(tmp, dest)
        for dest in self._removed:
            if dest not in self._staged:
                dest.unlink(missing_ok=True)
        self._staged.clear()
        atomic_write_json(self.root / self.manifest, {"kind": self.kind, "schema_version": 1, "files": hashes})


def check_file_set(root: str | os.PathLike[str], manifest: str) -> dict[str, str]:
    """The manifest's files (relative path -> SHA-256) if every one is present and unchanged, else raise
    :class:`BitplanError` naming what is missing or different (an interrupted or hand-edited set)."""
    root = Path(root)
    try:
        files = json.loads((root / manifest).read_text())["files"]
    except FileNotFoundError:
        raise BitplanError(f"{root}: no {manifest}: its outputs were never completed (rerun the command)") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BitplanError(f"{root / manifest}: unreadable manifest ({e})") from None
    for rel, digest in files.items():
        p = root / rel
        if not p.is_file():
            raise BitplanError(f"{root}: {rel} is missing (listed in {manifest})")
        if sha256_file(p) != digest:
            raise BitplanError(f"{root}: {rel} differs from the one {manifest} lists")
    return dict(files)
