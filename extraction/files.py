"""Output files shared by every stage: one writer per output, atomic writes that respect the umask, clear disk errors.

This module lives in ``extraction`` because every stage may import it (``sae`` and ``probes`` already
depend on ``extraction``; no stage imports ``revelio``); ``revelio.files`` re-exports it.

* ``hold_output(path)``: a lock file ``.<name>.lock`` beside the output (file or folder), taken with
  ``flock`` so two starts cannot both win however they interleave; the kernel drops the lock when its
  process dies, so a lock file left by a killed run is stale and taken over (its owner is named).
  The lock file holds ``{"pid", "host", "command", "started"}``; a refused start names that process.
  Readers never take it: it only keeps writers apart.
* ``make_tmp(path)``: the hidden temporary ``.<name>.<pid>-<random>.tmp`` beside ``path``, with the
  permissions the umask gives a new file (``mkstemp`` alone makes it 0600). ``clean_stale_tmps`` removes
  the ones whose process is dead (run when an output's lock is taken).
* ``atomic_path(path)``: THE atomic write every stage uses (``atomic_write`` opens it as a file object):
  the body fills a ``make_tmp`` temporary (file or folder) beside ``path``; a clean exit fsyncs it and
  renames it onto ``path``, an error removes it, so a kill or a full disk never leaves a half-written output
  and no temporary outlives its writer. ``scratch_path(path)``: a temporary beside ``path`` for work space
  only (never renamed), removed when the body ends.
* ``WriteFailed``: an ``OSError`` whose message names the cause and the file, e.g.
  "no space left on device while writing batch rows 4-6 of runs/a.h5".
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any


class OutputError(OSError):
    """An output that cannot be written (another writer holds it, the disk is full, an I/O error): one line."""

    def __str__(self) -> str:  # OSError's default adds "[Errno N]"; the message already says it in words
        return str(self.args[-1]) if self.args else ""


class OutputLocked(OutputError):
    """Another live process is writing the same output."""


class WriteFailed(OutputError):
    """A write failed (no space left, I/O error, read-only file system, ...)."""


# --------------------------------------------------------------------------------------------------------------
# umask and temporary files
# --------------------------------------------------------------------------------------------------------------


def current_umask() -> int:
    """The process umask (read without changing it where /proc allows, so other threads never see 0)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


_TMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)-[0-9a-f]{8}\.tmp(?P<ext>\.[A-Za-z0-9]+)?$")


def make_tmp(path: str | Path, folder: bool = False, ext: str = "") -> Path:
    """Create ``.<name>.<pid>-<random>.tmp<ext>`` (a file, or a folder with ``folder``) beside ``path``.

    Its permissions are what the umask gives a new file or folder (0666 / 0777 & ~umask), not mkstemp's 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = current_umask()
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp{ext}"
        try:
            if folder:
                os.mkdir(tmp, 0o777 & ~mask)
            else:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666 & ~mask))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file beside {path}")


def fix_mode(path: str | Path, folder: bool = False) -> None:
    """Give a file made by ``tempfile.mkstemp``/``mkdtemp`` (0600/0700) the permissions the umask allows."""
    os.chmod(path, (0o777 if folder else 0o666) & ~current_umask())


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_tmps(folder: str | Path, name: str | None = None, recursive: bool = False) -> list[Path]:
    """Remove the temporary files/folders made by ``make_tmp`` in ``folder`` whose process is no longer alive.

    ``name`` restricts it to the temporaries of one output (``.<name>.<pid>-*.tmp``). Returns what was removed.
    """
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    walker = os.walk(folder) if recursive else [(str(folder), [], [])]
    for root, dirs, _files in walker:
        try:
            entries = list(os.scandir(root))
        except OSError:
            continue
        for e in entries:
            m = _TMP_RE.match(e.name)
            if not m or (name is not None and m["name"] != name):
                continue
            pid = int(m["pid"])
            if pid == os.getpid() or _pid_alive(pid):
                continue
            try:
                if e.is_dir(follow_symlinks=False):
                    shutil.rmtree(e.path)
                    if e.name in dirs:
                        dirs.remove(e.name)
                else:
                    os.remove(e.path)
                removed.append(Path(e.path))
            except FileNotFoundError:
                pass
    return removed


def fsync_path(path: str | Path) -> None:
    """fsync a file (or folder, so that a rename in it is durable); silently skipped where not supported."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EBADF, errno.EROFS, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------------------

_ERRNO_RE = re.compile(r"errno\s*=\s*(\d+)")


def error_cause(e: BaseException, folder: str | Path | None = None) -> tuple[int | None, str]:
    """(errno, words) of a failed write: from an OSError, or from the text of an h5py/HDF5 error (which hides it)."""
    seen: set[int] = set()
    x: BaseException | None = e
    while x is not None and id(x) not in seen:
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno:
            return x.errno, os.strerror(x.errno).lower()
        m = _ERRNO_RE.search(str(x))
        if m:
            n = int(m.group(1))
            return n, os.strerror(n).lower()
        if "no space left" in str(x).lower():
            return errno.ENOSPC, os.strerror(errno.ENOSPC).lower()
        x = x.__cause__ or x.__context__
    if folder is not None:
        try:
            if shutil.disk_usage(folder).free == 0:
                return errno.ENOSPC, os.strerror(errno.ENOSPC).lower()
        except OSError:
            pass
    return None, str(e).splitlines()[0] if str(e) else type(e).__name__


def write_failed(e: BaseException, what: str, path: str | Path) -> WriteFailed:
    """A ``WriteFailed`` for ``e`` raised while ``what`` (e.g. "writing") ``path``: "<cause> while <what> <path>"."""
    n, words = error_cause(e, Path(path).parent)
    err = WriteFailed(n or errno.EIO, f"{words} while {what} {path}")
    err.filename = str(path)
    return err


def check_free_space(path: str | Path, need: int, what: str) -> None:
    """Refuse (``WriteFailed``, ENOSPC) before writing ``need`` bytes at ``path`` when the file system lacks them."""
    try:
        free = shutil.disk_usage(Path(path).parent).free
    except OSError:
        return
    if free < need:
        raise WriteFailed(errno.ENOSPC, f"no space left on device while {what} {path} (needs {need / 1e6:.1f} MB, "
                                        f"{free / 1e6:.1f} MB free); free some space and rerun to resume")


# --------------------------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------------------------


def _seal_tree(folder: Path) -> None:
    """Give every file and folder under ``folder`` the umask's permissions and fsync it (deepest first, then ``folder``).

    Writers that make their own files (``save_pretrained``, safetensors' ``save_file``) may create them 0600;
    a finished output gets what the umask gives a new file (``fix_mode``). Links are left as they are.
    """
    for root, dirs, files in os.walk(folder, topdown=False):
        for name in files:
            p = os.path.join(root, name)
            if not os.path.islink(p):
                fix_mode(p)
                fsync_path(p)
        for name in dirs:
            p = os.path.join(root, name)
            if not os.path.islink(p):
                fix_mode(p, folder=True)
                fsync_path(p)
    fix_mode(folder, folder=True)
    fsync_path(folder)


def _discard(tmp: Path) -> None:
    """Remove a temporary file or folder if it is still there (never follows a link)."""
    if os.path.isdir(tmp) and not os.path.islink(tmp):
        shutil.rmtree(tmp, ignore_errors=True)
    elif os.path.lexists(tmp):
        try:
            os.remove(tmp)
        except FileNotFoundError:
            pass


def recover_folder(path: str | Path) -> bool:
    """Undo a folder swap that a crash cut between its two renames: ``path`` gone and ``.<name>.old`` (the last
    complete version) beside it. The old folder is moved back; returns whether it was. ``atomic_path`` calls
    it before every folder write, so the next write of the same output starts from the last complete one."""
    path = Path(path)
    old = path.with_name(f".{path.name}.old")
    if os.path.lexists(path) or not old.is_dir() or old.is_symlink():
        return False
    os.replace(old, path)
    fsync_path(path.parent)
    return True


@contextmanager
def atomic_path(path: str | Path, *, folder: bool = False, ext: str = "") -> Iterator[Path]:
    """The one atomic write of the project: yield a new temporary beside ``path`` for the body to fill.

    The temporary is a file (``folder=True``: a folder) made by ``make_tmp`` in ``path``'s folder, with the
    umask's permissions; ``ext`` ends its name (for writers that pick the format from the suffix: ``.png``,
    ``.npz``). When the body returns, the temporary is fsynced (a folder: everything in it) and renamed onto
    ``path`` with ``os.replace``, then the folder holding ``path`` is fsynced. A folder replaces an existing
    ``path`` folder: the old one is moved aside to ``.<name>.old`` first and removed after the swap (a crash
    between the two renames is undone by ``recover_folder`` at the next write). Every
    file and folder of the new output gets the umask's permissions (``fix_mode``: writers such as
    ``save_pretrained`` or safetensors may create 0600 files). When
    the body (or the commit) raises, also on KeyboardInterrupt, the temporary is removed and ``path`` stays
    as it was; the exception is passed on unchanged (callers name the file, e.g. with ``write_failed``).
    """
    path = Path(path)
    if folder:
        recover_folder(path)
    tmp = make_tmp(path, folder=folder, ext=ext)
    try:
        yield tmp
        if folder:
            _seal_tree(tmp)
            if path.is_dir() and not path.is_symlink():
                old = path.with_name(f".{path.name}.old")
                _discard(old)
                os.replace(path, old)
                try:
                    os.replace(tmp, path)
                except BaseException:
                    os.replace(old, path)  # put the old folder back
                    raise
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
        else:
            if not tmp.is_symlink():
                fix_mode(tmp)  # the writer may have replaced make_tmp's file with a 0600 one of its own
            fsync_path(tmp)
            os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        _discard(tmp)


@contextmanager
def scratch_path(path: str | Path, *, ext: str = "") -> Iterator[Path]:
    """A ``make_tmp`` scratch file beside ``path`` for the body (work space that is never an output), removed after."""
    tmp = make_tmp(path, ext=ext)
    try:
        yield tmp
    finally:
        _discard(tmp)


@contextmanager
def atomic_write(path: str | Path, mode: str = "w") -> Iterator[IO[Any]]:
    """``atomic_path`` with the temporary opened in ``mode`` (text: utf-8, newlines as written).

    Write errors (disk full, I/O error) become ``WriteFailed`` naming ``path``.
    """
    path = Path(path)
    kw = {} if "b" in mode else {"encoding": "utf-8", "newline": ""}
    made = False  # an error creating the temporary (e.g. an unwritable folder) is passed on as it is
    try:
        with atomic_path(path) as tmp:
            made = True
            with open(tmp, mode, **kw) as f:
                yield f
    except OSError as e:
        if not made or isinstance(e, OutputError) or isinstance(e, (FileNotFoundError, IsADirectoryError)):
            raise
        raise write_failed(e, "writing", path) from e


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (temp file in the same folder, then rename)."""
    with atomic_write(path) as f:
        f.write(text)
    return Path(path)


def write_json_atomic(path: str | Path, data: Any, **kw: Any) -> Path:
    """Write ``data`` as indented JSON to ``path`` atomically; ``kw`` goes to ``json.dumps`` (e.g. default=str)."""
    return write_text_atomic(path, json.dumps(data, indent=2, **kw) + "\n")


# --------------------------------------------------------------------------------------------------------------
# One writer per output
# --------------------------------------------------------------------------------------------------------------


def lock_path(path: str | Path) -> Path:
    """The lock file of an output file or folder: ``.<name>.lock`` beside it."""
    p = Path(os.path.abspath(path))
    if not p.name:  # the root folder
        return p / ".revelio.lock"
    return p.parent / f".{p.name}.lock"


def _describe(info: dict[str, Any] | None) -> str:
    if not info:
        return "another process (it has not written its name yet)"
    cmd = str(info.get("command", ""))
    if len(cmd) > 160:
        cmd = cmd[:157] + "..."
    return (f"process {info.get('pid')} on {info.get('host')} (started {info.get('started')}: {cmd})")


def _read_info(fd: int) -> dict[str, Any] | None:
    try:
        raw = os.pread(fd, 65536, 0)
        return json.loads(raw.decode("utf-8")) if raw.strip() else None
    except (OSError, ValueError):
        return None


_HELD: dict[Path, list[Any]] = {}  # lock file -> [fd, count]: re-entrant within one process
_HELD_LOCK = threading.Lock()


def _rank() -> int:
    for var in ("RANK", "LOCAL_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def lock_owner(path: str | Path) -> dict[str, Any] | None:
    """The process holding ``path``'s writer lock ({pid, host, command, started}), or None when nobody holds it."""
    lp = lock_path(path)
    try:
        fd = os.open(lp, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_info(fd) or {}
        except OSError:
            return None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def locked_message(path: str | Path, info: dict[str, Any]) -> str:
    return (f"{path} is being written by {_describe(info)}; wait for it to finish or choose another output "
            f"(lock file {lock_path(path)})")


def acquire_output(path: str | Path) -> Path | None:
    """Take the writer lock of ``path`` (see ``hold_output``); returns the lock file (None on ranks > 0)."""
    if _rank() != 0:  # torchrun / DDP workers: rank 0 holds the lock for the whole job
        return None
    lp = lock_path(path)
    with _HELD_LOCK:
        if lp in _HELD:
            _HELD[lp][1] += 1
            return lp
        lp.parent.mkdir(parents=True, exist_ok=True)
        mask = current_umask()
        for _ in range(100):
            try:
                fd = os.open(lp, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666 & ~mask)
            except OSError as e:
                raise write_failed(e, "creating the lock file", lp) from e
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                info = None
                for _ in range(20):  # the winner writes its name right after taking the lock
                    info = _read_info(fd)
                    if info:
                        break
                    time.sleep(0.05)
                os.close(fd)
                raise OutputLocked(errno.EBUSY, locked_message(path, info or {})) from None
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                    print(f"warning: {lp.parent} does not support file locks; another writer of {path} would not "
                          "be noticed", file=sys.stderr)
                    return None
                raise
            try:
                same = os.stat(lp).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the previous holder removed the file between our open and our lock: try again
                os.close(fd)
                continue
            old = _read_info(fd)
            if old and (old.get("pid") != os.getpid() or old.get("host") != socket.gethostname()):
                print(f"{path}: taking over the stale lock of {_describe(old)}, which is no longer running",
                      file=sys.stderr)
            info = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv),
                    "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "output": str(path)}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode("utf-8"), 0)
            _HELD[lp] = [fd, 1]
            break
        else:
            raise OutputLocked(errno.EBUSY, f"could not take the lock file {lp}")
    p = Path(path)
    clean_stale_tmps(p.parent, name=p.name)
    if p.is_dir():
        clean_stale_tmps(p, recursive=True)
    return lp


def release_output(path: str | Path) -> None:
    """Drop one hold of ``path``'s writer lock; the last one removes the lock file."""
    lp = lock_path(path)
    with _HELD_LOCK:
        held = _HELD.get(lp)
        if held is None:
            return
        held[1] -= 1
        if held[1] > 0:
            return
        fd = held[0]
        del _HELD[lp]
        try:
            if os.stat(lp).st_ino == os.fstat(fd).st_ino:
                os.remove(lp)
        except OSError:
            pass
        os.close(fd)


@contextmanager
def hold_output(path: str | Path | None) -> Iterator[Path | None]:
    """Be the only writer of ``path`` (a file or folder) while the block runs; refuse with ``OutputLocked`` otherwise.

    Re-entrant within a process; a no-op for ``path=None`` and on torchrun ranks other than 0. Taking the
    lock also removes the temporaries of dead runs beside (and, for a folder, inside) the output.
    """
    if path is None or str(path) == "":
        yield None
        return
    lp = acquire_output(path)
    try:
        yield lp
    finally:
        if lp is not None:
            release_output(path)


__all__ = ["OutputError", "OutputLocked", "WriteFailed", "atomic_path", "scratch_path", "atomic_write", "write_text_atomic", "write_json_atomic",
           "hold_output", "acquire_output", "release_output", "lock_owner", "lock_path", "locked_message",
           "make_tmp", "fix_mode", "clean_stale_tmps", "current_umask", "check_free_space", "write_failed",
           "error_cause", "fsync_path"]
