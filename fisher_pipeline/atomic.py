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

Names of our own siblings of `final` (both carry the writing process's id, so that
`clean_stale` can tell leftovers of dead processes from work in progress):

    .{name}.{pid}-{random}.partial    staging directory being written (`staged_dir`)
    .{name}.{pid}-{random}.old        previous output being deleted after a publish

Processes are judged alive or dead on this machine (their pid namespace): one output
path must not be written by processes on two machines at once, which Snakemake ensures.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import re
import secrets
import shutil
import sys
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputPathError

__all__ = ["check_output_dir", "clean_stale", "exchange", "publish", "relocate", "remove_path", "staged_dir"]

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


@contextmanager
def staged_dir(final: str | os.PathLike, partial: str | os.PathLike | None = None) -> Iterator[Path]:
    """Yield an empty staging directory next to `final`; publish it on success.

    On an exception (KeyboardInterrupt included) the staging directory is removed and
    `final` is left as it was; a killed process leaves its staging directory, named with
    its pid, for the next `clean_stale`. Leftovers of earlier interrupted runs are removed first
    (`clean_stale`).

    Args:
        final: the output directory.
        partial: a fixed staging path to use instead of a fresh `.{name}.{pid}-{random}.partial`
            (the caller owns that name; anything already there is removed).
    """
    final = Path(final)
    check_output_dir(final)  # before any work: never after it
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(final)
    staging = Path(partial) if partial is not None else _sibling(final, "partial")
    _use(staging)
    try:
        if partial is not None:
            remove_path(staging)
        staging.mkdir()
        try:
            yield staging
            publish(staging, final)
        except BaseException:
            remove_path(staging)  # the unpublished output (or, if publish failed late, the old one)
            raise
    finally:
        _done(staging)


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


def relocate(paths: Mapping[str, Path], staging: str | os.PathLike, final: str | os.PathLike) -> dict[str, Path]:
    """Map paths written under `staging` to where they live once `staging` was published as `final`."""
    return {key: Path(final) / Path(path).relative_to(staging) for key, path in paths.items()}
