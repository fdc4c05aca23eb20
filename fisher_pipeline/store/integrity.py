"""Integrity of a published store: the record of its files, checked when it is opened and read.

zarr reads a missing chunk file as the array's fill value (zeros), and our statistics are
stored uncompressed, without a checksum: a store that lost or damaged a file would still
open and give numbers, computed on zeros nobody wrote. So every writer records, just
before it publishes, the size and CRC-32 of every file of the store in `integrity.json`
(`write_manifest`). Then:

- `open_checked` compares the files on disk with the record: a missing, truncated or
  unrecorded file is an error at once (a directory listing, milliseconds);
- every read goes through `CheckedStore`, which checks a file's CRC the first time any
  part of it is read: a damaged chunk is an error naming the array and the chunk, never
  a number;
- `verify_store` checks every file of a store (`python -m fisher_pipeline verify PATH`).

A store without the record (written before format version 4) opens with a warning: its
damage cannot be detected.
"""

from __future__ import annotations

import asyncio
import json
import os
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import zarr
from zarr.storage import LocalStore

from ..errors import StoreFormatError

#: The record's file name, in the store's root folder.
MANIFEST = "integrity.json"
MANIFEST_VERSION = 1
_READ_BLOCK = 16 << 20


def _crc32_file(path: str | os.PathLike) -> tuple[int, int]:
    """(size, CRC-32) of the file at `path`, read in 16 MB blocks (zlib releases the GIL)."""
    crc, size = 0, 0
    with open(path, "rb") as file:
        while block := file.read(_READ_BLOCK):
            crc = zlib.crc32(block, crc)
            size += len(block)
    return size, crc


def _hidden(key: str) -> bool:
    """Whether store key `key` is a hidden name no zarr reader asks for (Snakemake's
    `.snakemake_timestamp` in a directory output, a desktop's `.DS_Store`): not recorded, not checked."""
    return any(part.startswith(".") for part in key.split("/"))


def _store_files(folder: Path) -> dict[str, os.DirEntry]:
    """Every file under `folder` but the record itself and hidden names, keyed by its path
    relative to `folder` (posix). Plain strings, not `Path`s: a store has thousands of files."""
    files = {}
    stack = [("", os.fspath(folder))]
    while stack:
        prefix, directory = stack.pop()
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    stack.append((f"{prefix}{entry.name}/", entry.path))
                else:
                    files[prefix + entry.name] = entry
    files.pop(MANIFEST, None)
    return files


def write_manifest(folder: str | os.PathLike, threads: int = 4) -> dict[str, list[int]]:
    """Record the size and CRC-32 of every file of the finished store at `folder` in `integrity.json`.

    Call it last, after every other file (consolidated metadata included) is written.

    Returns:
        key (path in the store) -> [size, crc32].
    """
    folder = Path(folder)
    files = _store_files(folder)
    keys = sorted(files)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        sums = list(pool.map(lambda key: _crc32_file(files[key].path), keys))
    record = {key: [size, crc] for key, (size, crc) in zip(keys, sums, strict=True)}
    document = {"version": MANIFEST_VERSION, "checksum": "crc32", "files": record}
    (folder / MANIFEST).write_text(json.dumps(document, separators=(",", ":")))
    return record


def read_manifest(folder: str | os.PathLike) -> dict[str, tuple[int, int]] | None:
    """The record of the store at `folder` (key -> (size, crc32)), or None if it has none."""
    path = Path(folder) / MANIFEST
    try:
        document = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except ValueError as err:
        raise StoreFormatError(f"{path} is damaged ({err})") from None
    if not isinstance(document, dict) or document.get("version") != MANIFEST_VERSION:
        raise StoreFormatError(f"{path} is not an integrity record of version {MANIFEST_VERSION}")
    return {key: (int(size), int(crc)) for key, (size, crc) in document["files"].items()}


def describe_key(key: str) -> str:
    """A store key in words: `chunk (3, 0) of array per_sample/w` or `metadata of fisher/w`."""
    if "/c/" in key:
        array, chunk = key.split("/c/", 1)
        return f"chunk ({', '.join(chunk.split('/'))}) of array {array}"
    if key == "c" or key.startswith("c/"):  # an array at the root (none of ours)
        return f"chunk {key}"
    node = key.rsplit("/", 1)[0] if "/" in key else "the root group"
    return f"metadata of {node}" if key.endswith("zarr.json") else f"file {key}"


class CheckedStore(LocalStore):
    """A read-only zarr store over a local folder that checks every file against the
    store's record the first time any byte of it is read.

    A file the record lists that is missing, of another size or another CRC raises
    `StoreFormatError` naming the store, the array, the chunk and `remedy`; a file the
    record does not list (never written by the writer) raises too. Keys the record lacks
    and the folder lacks are chunks never written (zarr's fill value, as written).

    Args:
        root: the store's folder.
        manifest: its record (`read_manifest`).
        remedy: what the user should do, appended to every error.
    """

    def __init__(self, root: str | os.PathLike, *, manifest: dict[str, tuple[int, int]], remedy: str = "",
                 read_only: bool = True):
        super().__init__(root, read_only=read_only)
        self.manifest = manifest
        self.remedy = remedy
        self._checked: set[str] = set()
        self._checks: dict[str, asyncio.Future] = {}

    def with_read_only(self, read_only: bool = False) -> CheckedStore:
        return type(self)(self.root, manifest=self.manifest, remedy=self.remedy, read_only=read_only)

    def damage(self, key: str, what: str) -> StoreFormatError:
        """The error for file `key` of this store, `what` being its damage in words."""
        return StoreFormatError(f"store {self.root} is damaged: {describe_key(key)} {what}; "
                                f"{self.remedy}".rstrip("; "))

    async def get(self, key, prototype=None, byte_range=None):
        expected = self.manifest.get(key)
        if expected is None:
            value = await super().get(key, prototype, byte_range)
            if value is not None and key != MANIFEST and not _hidden(key):
                raise self.damage(key, "is not in the store's integrity record (a file its writer never wrote)")
            return value
        if key not in self._checked:
            check = self._checks.get(key)
            if check is None:  # the first read of this file: read it whole and check it, once
                check = asyncio.ensure_future(self._check(key, prototype, expected))
                self._checks[key] = check
            whole = await check
            if byte_range is None:
                return whole
        value = await super().get(key, prototype, byte_range)
        if value is None:
            raise self.damage(key, "is missing (it was removed while the store was open)")
        return value

    async def _check(self, key, prototype, expected: tuple[int, int]):
        try:
            whole = await super().get(key, prototype, None)
            if whole is None:
                raise self.damage(key, "is missing")
            size, crc = expected
            if len(whole) != size:
                raise self.damage(key, f"is {len(whole)} bytes long where {size} were written (truncated or "
                                       "overwritten)")
            found = await asyncio.to_thread(zlib.crc32, whole.as_numpy_array())
            if found != crc:
                raise self.damage(key, "does not hold the bytes that were written (its CRC-32 differs)")
            self._checked.add(key)
            return whole
        finally:
            self._checks.pop(key, None)

    async def get_partial_values(self, prototype, key_ranges):
        return [await self.get(key, prototype, byte_range) for key, byte_range in key_ranges]


def check_presence(folder: Path, manifest: dict[str, tuple[int, int]], remedy: str) -> None:
    """Compare the files of the store at `folder` with its record: names and sizes (no reading).

    Raises:
        StoreFormatError: naming the first missing, resized or unrecorded files and `remedy`.
    """
    on_disk = _store_files(folder)
    missing = sorted(set(manifest) - set(on_disk))
    resized = sorted(key for key, entry in on_disk.items()
                     if key in manifest and entry.stat(follow_symlinks=False).st_size != manifest[key][0])
    extra = sorted(set(on_disk) - set(manifest))
    problems = []
    for keys, what in ((missing, "missing"), (resized, "of another size than written"),
                       (extra, "not written by its writer")):
        if keys:
            shown = "; ".join(describe_key(key) for key in keys[:3])
            more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            problems.append(f"{len(keys)} file(s) {what}: {shown}{more}")
    if problems:
        raise StoreFormatError(f"store {folder} is damaged: {'; '.join(problems)}; {remedy}".rstrip("; "))


def open_checked(path: Path, remedy: str) -> tuple[zarr.Group, CheckedStore | None]:
    """Open the store at `path` read-only through its integrity record (`check_presence`, then `CheckedStore`).

    A store without a record opens as a plain folder: the caller decides, from its format
    version, whether that is an error or a warning (`unrecorded_store`).

    Returns:
        The root group (consolidated metadata), and the checked store (None without a record).
    """
    manifest = read_manifest(path)
    if manifest is None:
        checked, store = None, LocalStore(path, read_only=True)
    else:
        check_presence(path, manifest, remedy)
        checked = store = CheckedStore(path, manifest=manifest, remedy=remedy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        root = zarr.open_consolidated(store, mode="r")
    return root, checked


def unrecorded_store(path: Path, remedy: str, recorded: bool) -> None:
    """A store without integrity record: an error where its format promises one (`recorded`), else a warning."""
    if recorded:
        raise StoreFormatError(f"store {path} has no {MANIFEST} (its record of files was lost: the store cannot "
                               f"prove it is whole); {remedy}".rstrip("; "))
    warnings.warn(f"store {path} has no integrity record (written by an older fisher_pipeline): a missing or "
                  f"damaged chunk in it cannot be detected; {remedy} to add one", stacklevel=3)


@dataclass
class VerifyReport:
    """What `verify_store` found: files checked, bytes read, and each problem in words."""

    path: Path
    files: int = 0
    bytes: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_store(path: str | os.PathLike, threads: int = 2) -> VerifyReport:
    """Check every file of the store at `path` against its record: present, same size, same CRC-32.

    Also checks that the record lists every file, and that zarr can read the metadata.
    """
    path = Path(path)
    report = VerifyReport(path)
    if not path.is_dir():
        report.problems.append(f"{path} is not a store folder")
        return report
    manifest = read_manifest(path)
    if manifest is None:
        report.problems.append(f"no {MANIFEST}: the store has no record of its files (written before format "
                               "version 4, or the record was lost), so it cannot be verified")
        return report
    on_disk = _store_files(path)
    for key in sorted(set(manifest) - set(on_disk)):
        report.problems.append(f"{describe_key(key)} is missing")
    for key in sorted(set(on_disk) - set(manifest)):
        report.problems.append(f"{describe_key(key)} is not in the record (never written by its writer)")
    present = sorted(set(manifest) & set(on_disk))
    with ThreadPoolExecutor(max_workers=threads) as pool:
        sums = list(pool.map(lambda key: _crc32_file(on_disk[key].path), present))
    for key, (size, crc) in zip(present, sums, strict=True):
        report.files += 1
        report.bytes += size
        if size != manifest[key][0]:
            report.problems.append(f"{describe_key(key)} is {size} bytes, {manifest[key][0]} were written")
        elif crc != manifest[key][1]:
            report.problems.append(f"{describe_key(key)} is damaged (CRC-32 differs from the record)")
    if report.ok:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                zarr.open_consolidated(path, mode="r")
        except Exception as err:  # noqa: BLE001 - any failure to read the metadata is the finding
            report.problems.append(f"zarr cannot read the metadata ({err})")
    return report
