"""Run folders: one writer at a time, and no silent restart over an earlier run.

- `lock(folder)`: a lock file naming its holder (host and pid) for the length of a run; a
  lock left by a process that is gone (same host) is taken over, any other is refused with
  a message naming the holder.
- `check_folder(folder)`: an error naming the file where a folder is wanted;
- `holds_run(folder)`: whether a folder already has a run's files, so that starting a new
  run there is refused unless the user resumes or asks to start over;
- `remove_run(folder)`: a started-over run's files go, so none of them is taken for the new
  run's (e.g. the EMA weights of a run with EMA, over which one without is started);
- `remove_stale_temporaries(folder)`: half-written files of killed writes.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

LOCK_NAME = ".quadranet.lock"
RUN_FILES = ("last.pt", "metrics.jsonl", "last.safetensors", "best.safetensors")
# everything a run writes (config.yaml is written again by every run)
WRITTEN = (*RUN_FILES, "last_ema.safetensors", "best_ema.safetensors", "report.md", "curves.png")


class RunFolderError(ValueError):
    """A run folder is in use, or holds a run this command would overwrite."""


def check_folder(folder: Path) -> None:
    """A RunFolderError when `folder`, or the first of its parents that exists, is a file."""
    for path in (folder, *folder.parents):
        if path.exists():
            if not path.is_dir():
                raise RunFolderError(
                    f"--output {folder}: {path} is a file, not a folder; choose another --output"
                )
            return


def holds_run(folder: Path) -> bool:
    """True when `folder` has the files of an earlier run."""
    return any((folder / name).exists() for name in RUN_FILES)


def remove_run(folder: Path) -> None:
    """Delete the files an earlier run wrote in `folder` (and nothing else)."""
    for name in WRITTEN:
        (folder / name).unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextlib.contextmanager
def lock(folder: Path) -> Iterator[Path]:
    """Hold `folder`'s lock file while the block runs."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    me = f"{socket.gethostname()} {os.getpid()}"
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = path.read_text().strip()
            except FileNotFoundError:  # released meanwhile
                continue
            host, _, pid = holder.partition(" ")
            if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
                path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            raise RunFolderError(
                f"{folder} is in use by another run (host {host or '?'}, pid {pid or '?'}); "
                f"wait for it to end, use another --output, or delete {path} if that run is "
                "gone"
            ) from None
        with os.fdopen(fd, "w") as f:
            f.write(me)
        break
    else:
        raise RunFolderError(f"could not take the lock {path}; try again")
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            if path.read_text().strip() == me:
                path.unlink()


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the temporaries of writes that were killed (`.<name>.<random>.tmp`)."""
    removed = []
    for tmp in folder.glob(".*.tmp"):
        with contextlib.suppress(OSError):
            tmp.unlink()
            removed.append(tmp)
    return removed
