"""Atomic publication of outputs: at every instant a path holds the old or the new output.

A finished output (a phase 1 store, a phase's output directory, the prepared model) is
written into a staging directory next to it and then published. Removing the old output
first and renaming the new one in afterwards is not enough: a process killed in between
leaves the path missing, and one killed while the old directory is being deleted file by
file leaves a directory whose metadata lists files that are gone (zarr reads a missing
chunk as zeros, so such a store would even look valid).

`publish` therefore swaps the two paths with one `renameat2(RENAME_EXCHANGE)` call (Linux
3.15+, on ext4, xfs, btrfs, tmpfs and most local filesystems): the swap is a single
atomic step, after which the old output sits at the staging path and is deleted at
leisure under a name of its own. Where the call is unavailable (other systems, some
network filesystems) it falls back to renaming the old output aside and the new one into
place: two atomic renames with a window of a few microseconds in which the path does not
exist, but never one in which it holds a partial output.

Every writer of the package (phase 1 stores, shards, merges, phase outputs, the prepared
model) stages through one `Staging` object: it first *claims* the path (`Claim`, an
exclusive `flock` on a lock file next to it, released by the kernel when the process
dies), so that two processes writing one output never mix: the second fails at once,
naming the path and the first process, and the first publishes whole.

Names of our own siblings of `final` (the staging and old copies carry the writing
process's id, so that `clean_stale` can tell leftovers of dead processes from work in
progress):

    .{name}.lock                      the claim of the process writing `final` now
    .{name}.{pid}-{random}.partial    staging directory being written (`Staging`)
    .{name}.{pid}-{random}.old        previous output being deleted after a publish

Processes are judged alive or dead on this machine (their pid namespace); the claim holds
across machines only where the filesystem supports `flock` across them (most local ones,
NFS v4 by emulation). Snakemake never runs two jobs of one output.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import platform
import re
import secrets
import shutil
import socket
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from .errors import DiskFullError, OutputBusyError, OutputPathError

__all__ = ["Claim", "Staging", "check_output_dir", "claim_holder", "clean_stale", "disk_full_error", "exchange",
           "publish", "relocate", "remove_path", "staged_dir", "staging_siblings"]

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
#: renameat2 system call numbers, for a libc without the `renameat2` wrapper (glibc < 2.28).
_SYS_RENAMEAT2 = {"x86_64": 316, "aarch64": 276, "riscv64": 276, "i686": 353, "i386": 353,
                  "armv7l": 382, "ppc64le": 357, "s390x": 347}

_lock = threading.Lock()
_active: set[str] = set()  # absolute paths of our own staging / old copies in use (not stale)
_renameat2 = None  # resolved on first use; False when this system has none


def _resolve_renameat2():
    """`renameat2(olddirfd, oldpath, newdirfd, newpath, flags)` from libc, or None."""
    global _renameat2
    if _renameat2 is None:
        _renameat2 = False
        if platform.system() == "Linux":
            try:
                libc = ctypes.CDLL(None, use_errno=True)
            except OSError:
                libc = None
            if libc is not None and hasattr(libc, "renameat2"):
                function = libc.renameat2
                function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
                function.restype = ctypes.c_int
                _renameat2 = function
            elif libc is not None and platform.machine() in _SYS_RENAMEAT2:
                number, syscall = _SYS_RENAMEAT2[platform.machine()], libc.syscall
                syscall.restype = ctypes.c_long

                def function(olddirfd, old, newdirfd, new, flags):
                    return syscall(ctypes.c_long(number), ctypes.c_int(olddirfd), ctypes.c_char_p(old),
                                   ctypes.c_int(newdirfd), ctypes.c_char_p(new), ctypes.c_uint(flags))

                _renameat2 = function
    return _renameat2 or None


def exchange(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Swap paths `a` and `b` (both must exist) in one atomic step.

    Returns False, having changed nothing, where the system or filesystem cannot (no
    renameat2, or EINVAL / ENOTSUP from a filesystem without RENAME_EXCHANGE).

    Raises:
        OSError: any other failure (a missing path, permissions, different filesystems).
    """
    global _renameat2
    function = _resolve_renameat2()
    if function is None:
        return False
    if function(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code == errno.ENOSYS:  # the kernel has no renameat2: never try again
        _renameat2 = False
        return False
    if code in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):  # this filesystem cannot
        return False
    raise OSError(code, f"{os.strerror(code)}: exchanging {os.fspath(a)!r} and {os.fspath(b)!r}")


def remove_path(path: str | os.PathLike) -> None:
    """Remove a file, link or directory tree if it exists (a path removed meanwhile is fine)."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        if sys.version_info >= (3, 12):
            shutil.rmtree(path, onexc=lambda function, name, error: _ignore_missing(error))
        else:
            shutil.rmtree(path, onerror=lambda function, name, info: _ignore_missing(info[1]))
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def _ignore_missing(error: BaseException) -> None:
    if not isinstance(error, FileNotFoundError):  # removed meanwhile (a concurrent clean_stale)
        raise error


def _sibling(final: Path, kind: str) -> Path:
    """A fresh name `.{name}.{pid}-{random}.{kind}` next to `final`."""
    return final.with_name(f".{final.name}.{os.getpid()}-{secrets.token_hex(4)}.{kind}")


def _delete_old(old: Path, final: Path) -> None:
    """Delete the previous output of `final`, now at `old`, first renaming it `.old`.

    If this process dies while deleting, what is left is unmistakably an old copy that
    `clean_stale` removes, not something that looks like a staging directory.
    """
    target = _sibling(final, "old")
    _use(target)
    try:
        os.rename(old, target)
        remove_path(target)
    finally:
        _done(target)


def _use(path: Path) -> None:
    with _lock:
        _active.add(os.path.abspath(path))


def _done(path: Path) -> None:
    with _lock:
        _active.discard(os.path.abspath(path))


def check_output_dir(final: str | os.PathLike) -> None:
    """Refuse to write an output directory where something else than a directory is: a file
    the user keeps there (or a link to one) would be replaced and deleted by the publish.

    Raises:
        OutputPathError: naming the path, what is there and the fix.
    """
    final = Path(final)
    if os.path.lexists(final) and not final.is_dir():
        what = "a link to a file" if final.is_symlink() else "a file" if final.is_file() else "not a directory"
        raise OutputPathError(f"{final} is {what}: an output directory would replace it and delete it. Move or "
                              "remove it, or name another output path")


def publish(staging: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Put the finished `staging` (directory or file) in place of `final`, atomically.

    At every instant `final` holds either its previous complete content or the new one:
    with renameat2 the two paths are exchanged in one step; the old content, now at the
    staging path, is then renamed to `.{name}.{pid}-{random}.old` and deleted. A file
    replacing a file needs only `os.replace`; a directory never replaces anything but a
    directory (`check_output_dir`). Without renameat2 the old content is first
    renamed aside, leaving `final` absent (never partial) for the microseconds between
    two renames. `staging` and `final` must be on one filesystem (siblings are).

    Returns:
        `final`.
    """
    staging, final = Path(staging), Path(final)
    if not os.path.lexists(staging):
        raise FileNotFoundError(f"nothing to publish: {staging} does not exist")
    if staging.is_dir():
        check_output_dir(final)  # checked again here: the path may have changed since the work began
    final_is_dir = final.is_dir() and not final.is_symlink()
    if not os.path.lexists(final) or (not final_is_dir and not staging.is_dir()):
        os.replace(staging, final)  # nothing there, or a file over a file: atomic by itself
        return final
    _use(staging)
    try:
        if exchange(staging, final):
            _delete_old(staging, final)  # the old output is at the staging path now
            return final
        aside = _sibling(final, "old")  # fallback: final is absent between the two renames
        _use(aside)
        try:
            os.rename(final, aside)
            try:
                os.rename(staging, final)
            except BaseException:
                os.rename(aside, final)  # put the old output back
                raise
            remove_path(aside)
        finally:
            _done(aside)
        return final
    finally:
        _done(staging)


class Claim:
    """This process's exclusive claim of output path `final`, for as long as it writes it.

    An `flock` on `.{name}.lock` next to `final`, holding the claimant's pid, host and start
    time for the message another claimant gets. The kernel drops the lock when the process
    dies, however it dies, so a claim is never stale; `release` deletes the file.

    Raises:
        OutputBusyError: another process (or another writer in this one) holds the claim.
    """

    def __init__(self, final: str | os.PathLike):
        self.final = Path(final)
        self.path = self.final.with_name(f".{self.final.name}.lock")
        self._fd: int | None = None
        tries = 0
        try:
            self.final.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as err:  # named by the output, not by our lock file's hidden name
            raise OSError(err.errno, err.strerror, str(self.final)) from None
        while self._fd is None:
            if fd is None:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                fd = None
                tries += 1
                if tries < 4:  # a `claim_holder` look lasts microseconds: not a claimant
                    time.sleep(0.02)
                    continue
                raise OutputBusyError(f"{self.final} is being written by another process ({holder}): wait for it "
                                      "to finish, or stop it, before writing it again") from None
            except OSError as err:  # a filesystem without locks: write unclaimed, as before claims existed
                if err.errno not in (errno.ENOLCK, errno.ENOTSUP, errno.EOPNOTSUPP):
                    os.close(fd)
                    raise
            # The previous holder may have deleted the file between our open and our lock:
            # then we hold a lock nobody else can see; start again on the file now there.
            try:
                current = os.stat(self.path).st_ino
            except FileNotFoundError:
                current = None
            if current != os.fstat(fd).st_ino:
                os.close(fd)
                fd = None
                continue
            holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                      "command": " ".join(sys.argv)[:300]}
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(holder).encode())
            self._fd = fd

    def release(self) -> None:
        """Give the path up (deleting the lock file while still holding it, then closing it)."""
        if self._fd is not None:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
            os.close(self._fd)
            self._fd = None


def claim_holder(final: str | os.PathLike) -> str | None:
    """Who holds the claim of `final` now, in words (None: nobody). Takes nothing."""
    lock = Path(final).with_name(f".{Path(final).name}.lock")
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # granted unless someone holds the claim
    except BlockingIOError:
        return _read_holder(fd)
    except OSError:  # no locks on this filesystem
        return None
    finally:
        os.close(fd)
    return None


def _read_holder(fd: int) -> str:
    """The claimant recorded in a lock file, in words."""
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {holder['pid']} on {holder['host']}, since {holder['since']}: {holder['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not yet recorded itself"


class Staging:
    """The one way the package writes an output: claim `final`, write into a fresh staging
    directory next to it, then `publish` it whole, or `abort`.

    Leftovers of earlier interrupted runs are removed first (`clean_stale`); another live
    process's staging directory is never touched (it carries that process's id).

    Args:
        final: the output directory.

    Attributes:
        path: the staging directory (`.{name}.{pid}-{random}.partial`), empty at first.

    Raises:
        OutputPathError: `final` is a file (`check_output_dir`).
        OutputBusyError: another process is writing `final`.
    """

    def __init__(self, final: str | os.PathLike):
        self.final = Path(final)
        check_output_dir(self.final)  # before any work: never after it
        self.claim = Claim(self.final)
        try:
            clean_stale(self.final)
            self.path = _sibling(self.final, "partial")
            _use(self.path)
            self.path.mkdir()
        except BaseException:
            self.claim.release()
            raise
        self._open = True

    def publish(self) -> Path:
        """Put the staging directory in place of `final` (`publish`); returns `final`."""
        try:
            return publish(self.path, self.final)
        except BaseException:
            remove_path(self.path)  # the unpublished output (or, if publish failed late, the old one)
            raise
        finally:
            self._end()

    def abort(self) -> None:
        """Give up: remove the staging directory and release the claim; `final` stays as it was."""
        if self._open:
            try:
                remove_path(self.path)
            finally:
                self._end()

    def written_bytes(self) -> int:
        """Bytes written into the staging directory so far (a file removed while they are
        counted, such as a library's temporary file, counts as 0)."""
        return sum(_size_of(entry) for entry in _files(self.path))

    def _end(self) -> None:
        if self._open:
            self._open = False
            _done(self.path)
            self.claim.release()


def _size_of(entry: os.DirEntry) -> int:
    # A writer whose error we are reporting may still be finishing in another thread (zarr
    # gathers its writes and returns the first error while the others run on): its
    # temporary file can vanish between the listing and the stat.
    try:
        return entry.stat(follow_symlinks=False).st_size
    except FileNotFoundError:
        return 0


def _files(folder: Path) -> Iterator[os.DirEntry]:
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            yield from _files(Path(entry.path))
        else:
            yield entry


@contextmanager
def staged_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging directory next to `final` (`Staging`); publish it on success.

    On an exception (KeyboardInterrupt included) the staging directory is removed and
    `final` is left as it was (a full disk is reported by `disk_full_error`); a killed process leaves its staging
    directory, named with its pid, for the next `clean_stale`.
    """
    staging = Staging(final)
    try:
        yield staging.path
    except BaseException as err:
        full = disk_full_error(err, staging.final, staging)
        staging.abort()
        if full is not None:
            raise full from err
        raise
    staging.publish()


def _is_disk_full(error: BaseException | None) -> bool:
    """Whether `error`, or an error it was raised from, is a full disk or quota."""
    seen = 0
    while error is not None and seen < 10:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(error):
            return True
        error, seen = error.__cause__ or error.__context__, seen + 1
    return False


def disk_full_error(error: BaseException, final: str | os.PathLike, staging: Staging | None = None,
                    needed_bytes: int | None = None) -> DiskFullError | None:
    """A `DiskFullError` naming `final`, the filesystem's free space and the size needed, if
    `error` is a full disk or quota (None otherwise). Call it before the staging is removed:
    the bytes written so far go into the message."""
    if isinstance(error, DiskFullError) or not _is_disk_full(error):
        return None
    final = Path(final)
    folder = final.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    usage = shutil.disk_usage(folder)
    written = staging.written_bytes() if staging is not None else None
    parts = [f"{_size(usage.free)} free of {_size(usage.total)} on the filesystem of {folder}"]
    if written is not None:
        parts.append(f"{_size(written)} had been written")
    if needed_bytes is not None:
        parts.append(f"the output needs about {_size(needed_bytes)}")
    return DiskFullError(f"no space left on device writing {final} ({'; '.join(parts)}): nothing "
                         "was published and its staging was removed; free space there or write the results "
                         "to a larger disk, then rerun")


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


def staging_siblings(final: str | os.PathLike) -> list[Path]:
    """The staging directories (`.{name}.{pid}-{random}.partial`) next to `final`, live or left by a dead process."""
    final = Path(final)
    pattern = re.compile(rf"\.{re.escape(final.name)}\.\d+-[0-9a-f]+\.partial")
    try:
        return sorted(Path(entry.path) for entry in os.scandir(final.parent) if pattern.fullmatch(entry.name))
    except FileNotFoundError:
        return []


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def clean_stale(final: str | os.PathLike) -> list[Path]:
    """Remove staging and old copies of `final` that interrupted runs left behind.

    Only siblings named by this module (`.{name}.{pid}-{random}.partial|.old`) are
    considered, and only those whose process is gone: a live process may still be writing
    its staging directory. Names with this process's own id are stale unless in use by
    a `staged_dir` or `publish` running now (in another thread).

    Returns:
        The paths removed.
    """
    final = Path(final)
    pattern = re.compile(rf"\.{re.escape(final.name)}\.(\d+)-[0-9a-f]+\.(?:partial|old)")
    removed = []
    try:
        entries = list(os.scandir(final.parent))
    except FileNotFoundError:
        return removed
    for entry in entries:
        if entry.name == f".{final.name}.lock":
            if _remove_unheld_lock(Path(entry.path)):
                removed.append(Path(entry.path))
            continue
        match = pattern.fullmatch(entry.name)
        if match is None:
            continue
        pid = int(match.group(1))
        with _lock:
            in_use = os.path.abspath(entry.path) in _active
        if in_use or (pid != os.getpid() and _pid_alive(pid)):
            continue
        remove_path(entry.path)
        removed.append(Path(entry.path))
    return removed


def _remove_unheld_lock(path: Path) -> bool:
    """Delete a claim's lock file that no process holds (its claimant died); True if deleted.

    The same protocol as `Claim.release`: lock it, check it is still the file at `path`,
    delete it while holding it. A lock held by anyone, this process included, is left.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.stat(path).st_ino != os.fstat(fd).st_ino:
            return False
        path.unlink()
        return True
    except OSError:  # held (BlockingIOError), gone meanwhile, or no locks on this filesystem
        return False
    finally:
        os.close(fd)


def relocate(paths: Mapping[str, Path], staging: str | os.PathLike, final: str | os.PathLike) -> dict[str, Path]:
    """Map paths written under `staging` to where they live once `staging` was published as `final`."""
    return {key: Path(final) / Path(path).relative_to(staging) for key, path in paths.items()}
