"""How the ``reflora`` commands fail: one line on stderr naming the field, path or problem, never a traceback,
and nothing half-written on disk.

* Exit codes: 2 for a usage error (a bad flag or value, a bad input file), 1 for a failed check or a failure
  while running (a full disk, out of memory), 130 for Ctrl-C and 143 for SIGTERM.
* ``guarded``: runs a command's function and turns what escapes it into that one line: ``KeyboardInterrupt``,
  SIGTERM (``Terminated``, raised by the handler ``guarded`` installs, so every ``finally`` and the atomic
  writer's clean-up of its temporary files run), ``MemoryError``, ``OSError`` and the spec's own errors.
* ``output_file`` / ``output_folder``: argparse ``type=`` for the paths a command writes, refused at parse time
  (exit 2) when empty, a folder where a file goes (or a file where a folder goes), a device, fifo or socket,
  or under a file.
* ``check_memory`` / ``check_disk``: refuse up front a job that would not fit, saying how much it needs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import stat
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from reflora.checkpoint import CheckpointError
from reflora.config import ConfigError

USAGE_ERROR = 2
FAILED = 1
INTERRUPTED = 130  # 128 + SIGINT
TERMINATED = 128 + signal.SIGTERM


class Terminated(BaseException):
    """SIGTERM arrived. A ``BaseException``, like ``KeyboardInterrupt``, so that only clean-up code sees it."""


class ResourceError(ValueError):
    """A job needs more memory or disk than there is; the message says how much."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


def guarded(prog: str, func: Callable[[argparse.Namespace], Any], args: argparse.Namespace) -> int:
    """``func(args)`` as an exit code; whatever escapes it becomes one line ``<prog>: ...`` on stderr."""
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        return _say(f"{prog}: interrupted", INTERRUPTED)
    except Terminated:
        return _say(f"{prog}: terminated", TERMINATED)
    except MemoryError:
        return _say(f"{prog}: error: out of memory (try smaller shapes, batch or sequence length)", FAILED)
    except BrokenPipeError:  # e.g. `reflora inspect --json | head`: the reader left; say nothing
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 128 + 13
    except (ConfigError, CheckpointError, ResourceError) as exc:
        return _say(f"{prog}: error: {exc}", FAILED if isinstance(exc, (OSError, ResourceError)) else USAGE_ERROR)
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        return _say(f"{prog}: error: {where}{exc.strerror or exc}", FAILED)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _say(line: str, code: int) -> int:
    print(line, file=sys.stderr, flush=True)
    return code


# ----------------------------------------------------------------------------------------------
# output paths (argparse types)
# ----------------------------------------------------------------------------------------------


def _first_existing_ancestor(path: Path) -> Path:
    for parent in path.parents:
        if os.path.lexists(parent):
            return parent
    return Path(".")


def _check_ancestors(path: Path) -> None:
    ancestor = _first_existing_ancestor(path)
    if not ancestor.is_dir():
        raise argparse.ArgumentTypeError(f"{path}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{path}: the folder {ancestor} is not writable")


def output_file(text: str) -> Path:
    """argparse ``type=``: a file a command will write (replaced atomically): a new path or a regular file."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path: give a file name")
    path = Path(text)
    if os.path.lexists(path):
        try:
            mode = os.stat(path).st_mode
        except OSError:
            raise argparse.ArgumentTypeError(f"{path}: a dangling symbolic link") from None
        if stat.S_ISDIR(mode):
            raise argparse.ArgumentTypeError(f"{path} is a folder: give a file path")
        if not stat.S_ISREG(mode):
            raise argparse.ArgumentTypeError(f"{path} is not a regular file (a device, fifo or socket): "
                                             "refusing to replace it")  # fmt: skip
        if not os.access(path.parent if str(path.parent) else ".", os.W_OK | os.X_OK):
            raise argparse.ArgumentTypeError(f"{path}: the folder {path.parent} is not writable")
        return path
    _check_ancestors(path)
    return path


def output_folder(text: str) -> Path:
    """argparse ``type=``: a folder a command will write files into: a new path or an existing folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path: give a folder")
    path = Path(text)
    if os.path.lexists(path):
        if not path.is_dir():
            raise argparse.ArgumentTypeError(f"{path} exists and is not a folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise argparse.ArgumentTypeError(f"{path}: the folder is not writable")
        return path
    _check_ancestors(path)
    return path


# ----------------------------------------------------------------------------------------------
# resources
# ----------------------------------------------------------------------------------------------


def gib(n_bytes: float) -> str:
    """A byte count for people: ``512 MiB``, ``3.2 GiB``, ``1.5e+04 TiB``."""
    if n_bytes < 2**30:
        return f"{n_bytes / 2**20:.0f} MiB"
    if n_bytes < 2**40:
        return f"{n_bytes / 2**30:.1f} GiB"
    return f"{n_bytes / 2**40:.3g} TiB"


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (``MemAvailable`` of /proc/meminfo), or None if unknown."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(need: int, what: str) -> None:
    """``ResourceError`` if ``need`` bytes (an estimate) exceed the memory available now."""
    available = available_memory()
    if available is not None and need > available:
        raise ResourceError(f"{what} needs about {gib(need)} of memory, and {gib(available)} is available: "
                            "use smaller shapes")  # fmt: skip


def check_disk(path: Path, need: int, what: str) -> None:
    """``ResourceError`` if the file system that ``path`` goes to has fewer than ``need`` bytes free."""
    target = Path(path).absolute()
    try:
        free = shutil.disk_usage(target if target.is_dir() else _first_existing_ancestor(target)).free
    except OSError:
        return
    if need > free:
        raise ResourceError(f"{what} is about {gib(need)}, and {path}'s file system has {gib(free)} free")
