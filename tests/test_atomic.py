"""Atomic publication: an output path always holds a complete old or a complete new output.

Directory trees in these tests carry a MARKER (their generation), a MANIFEST listing
their files, and files whose content is the generation: a reader can tell a complete
tree from a missing, half-deleted or mixed one.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from fisher_pipeline import atomic
from fisher_pipeline.atomic import clean_stale, publish, staged_dir
from fisher_pipeline.store import open_store, verify_store

ROOT = Path(__file__).resolve().parents[1]


def write_tree(directory: Path, tag: str, n_files: int) -> None:
    """Fill `directory` with generation `tag`: files, then MANIFEST, then MARKER."""
    names = [f"{tag}-{i}" for i in range(n_files)]
    for name in names:
        (directory / name).write_text(tag)
    (directory / "MANIFEST").write_text("\n".join(names))
    (directory / "MARKER").write_text(tag)


def tree_tag(directory: Path) -> str:
    """The generation of the complete tree at `directory` (AssertionError if it is not one)."""
    assert directory.is_dir(), f"{directory} is missing"
    tag = (directory / "MARKER").read_text()
    names = (directory / "MANIFEST").read_text().split()
    assert names, f"{directory}: empty manifest"
    bad = [name for name in names if not (directory / name).exists() or (directory / name).read_text() != tag]
    assert not bad, f"{directory} (generation {tag}): {len(bad)} of {len(names)} listed files missing or foreign"
    return tag


def observe(final: Path) -> str | None:
    """One reader's look at `final`: None if consistent (or changed meanwhile), else the problem.

    A listed file that is missing or of another generation is a problem only if the
    MARKER still names the same generation afterwards (generations are never reused,
    so the same tree was at `final` throughout).
    """
    try:
        tag = (final / "MARKER").read_text()
        names = (final / "MANIFEST").read_text().split()
    except OSError as err:
        return f"unreadable: {err}"
    for name in names:
        try:
            content = (final / name).read_text()
        except FileNotFoundError:
            content = None
        if content != tag:
            try:
                again = (final / "MARKER").read_text()
            except OSError as err:
                return f"marker vanished: {err}"
            return f"generation {tag}: {name} is {content!r}" if again == tag else None
    return None


def siblings(final: Path) -> list[str]:
    return sorted(os.listdir(final.parent))


def test_publish_never_shows_a_missing_or_mixed_directory(tmp_path):
    final = tmp_path / "out"
    with staged_dir(final) as staging:
        write_tree(staging, "g0", 60)
    problems: list[str] = []
    looks = 0
    stop = threading.Event()

    def reader():
        nonlocal looks
        while not stop.is_set():
            problem = observe(final)
            looks += 1
            if problem:
                problems.append(problem)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for generation in range(1, 150):
            with staged_dir(final) as staging:
                write_tree(staging, f"g{generation}", 60)
            if len(problems) > 5:
                break
    finally:
        stop.set()
        thread.join()
    assert not problems, problems[:5]
    assert looks > 100
    assert tree_tag(final) == "g149"
    assert siblings(final) == ["out"]


def test_publish_cases_and_fallback(tmp_path, monkeypatch):
    final = tmp_path / "table.csv"
    staging = tmp_path / "new.csv"
    staging.write_text("new")
    publish(staging, final)  # nothing there yet
    assert final.read_text() == "new" and not staging.exists()
    staging.write_text("newer")
    publish(staging, final)  # a file over a file
    assert final.read_text() == "newer"
    with pytest.raises(FileNotFoundError):
        publish(tmp_path / "absent", final)
    # Without renameat2: rename aside, then into place; nothing left over.
    monkeypatch.setattr(atomic, "_renameat2", False)
    out = tmp_path / "out"
    for tag in ("a", "b"):
        with staged_dir(out) as staging:
            write_tree(staging, tag, 5)
    assert tree_tag(out) == "b"
    assert siblings(out) == ["out", "table.csv"]


def test_failed_stage_keeps_the_old_output(tmp_path):
    final = tmp_path / "out"
    with staged_dir(final) as staging:
        write_tree(staging, "old", 3)
    with pytest.raises(RuntimeError):
        with staged_dir(final) as staging:
            write_tree(staging, "new", 3)
            raise RuntimeError("phase failed")
    assert tree_tag(final) == "old"
    assert siblings(final) == ["out"]


_PUBLISHER = """
import sys
from pathlib import Path
from fisher_pipeline.atomic import staged_dir
final, tag, n_files = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
with staged_dir(final) as staging:
    for i in range(n_files):
        (staging / f"{tag}-{i}").write_text(tag)
    (staging / "MANIFEST").write_text("\\n".join(f"{tag}-{i}" for i in range(n_files)))
    (staging / "MARKER").write_text(tag)
    sys.stdout.write("ready\\n")
    sys.stdout.flush()
"""


def test_kill_during_publish_leaves_old_or_new_tree(tmp_path):
    final, n_files = tmp_path / "out", 600
    with staged_dir(final) as staging:
        write_tree(staging, "t-1", n_files)
    # How long a publish (swap, then deletion of the old tree) takes on this machine, which
    # varies a lot with load: the kills are spread over that window, not a fixed one.
    proc = subprocess.Popen([sys.executable, "-c", _PUBLISHER, str(final), "t-1", str(n_files)], cwd=ROOT,
                            stdout=subprocess.PIPE)
    assert proc.stdout.readline() == b"ready\n"
    started = time.perf_counter()
    proc.wait()
    proc.stdout.close()
    window = time.perf_counter() - started
    before = "t-1"
    rng = random.Random(0)
    outcomes = {"old": 0, "new": 0, "leftovers": 0}
    trial = 0
    while trial < 20 or (outcomes["leftovers"] == 0 and trial < 80):
        tag = f"t{trial}"
        trial += 1
        proc = subprocess.Popen([sys.executable, "-c", _PUBLISHER, str(final), tag, str(n_files)], cwd=ROOT,
                                stdout=subprocess.PIPE)
        assert proc.stdout.readline() == b"ready\n"  # the staging tree is complete; publish begins
        time.sleep(rng.uniform(0, window))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        after = tree_tag(final)
        assert after in (before, tag), (before, tag, after)
        outcomes["old" if after == before else "new"] += 1
        outcomes["leftovers"] += bool(clean_stale(final))
        assert siblings(final) == ["out"], f"trial {trial}: {siblings(final)} after clean_stale"
        before = after
    # Some kills must have hit the deletion of the old tree, or the test proves nothing.
    assert outcomes["leftovers"] > 0, outcomes


def test_clean_stale_removes_dead_leftovers_only(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True).stdout)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        names = {
            "dead_partial": f".out.{dead}-0a1b2c3d.partial",
            "dead_old": f".out.{dead}-0a1b2c3e.old",
            "own_stale": f".out.{os.getpid()}-0a1b2c3f.partial",
            "live_partial": f".out.{live.pid}-0a1b2c3d.partial",
            "other_output": f".other.{dead}-0a1b2c3d.partial",
            "foreign": "out.backup",
            "store_partial": "out.partial",
        }
        for name in names.values():
            (tmp_path / name).mkdir()
            (tmp_path / name / "data").write_text("x")
        (tmp_path / f".out.{dead}-0a1b2c40.old").write_text("an old file output")
        with staged_dir(final) as active:  # cleans at entry; our live staging must survive a second clean
            write_tree(active, "new", 2)
            assert clean_stale(final) == []
            assert active.exists()
        remaining = set(os.listdir(tmp_path))
        for key in ("dead_partial", "dead_old", "own_stale"):
            assert names[key] not in remaining, key
        assert f".out.{dead}-0a1b2c40.old" not in remaining
        for key in ("live_partial", "other_output", "foreign", "store_partial"):
            assert names[key] in remaining, key
        assert tree_tag(final) == "new"
    finally:
        live.kill()
        live.wait()
    assert clean_stale(final) == [tmp_path / names["live_partial"]]  # its writer is gone now


# --- the phase 1 store --------------------------------------------------------------

def _layout(extra: int):
    """The tiny Llama layout plus `extra` small tensors (a store of many files deletes slowly)."""
    from store_factory import GroupSpec, llama_layout

    shapes, specs = llama_layout()
    for i in range(extra):
        shapes[f"extra.{i}.weight"] = (4,)
        specs[f"extra.{i}.weight"] = GroupSpec.whole((4,))
    return shapes, specs


def _write_store(path: str, seed: int, extra: int, ready=None) -> None:
    """Write a store over `path`; `ready` is told once its metadata is consolidated (close() publishes next)."""
    from store_factory import make_store

    if ready is not None:
        import fisher_pipeline.store.writer

        consolidate = fisher_pipeline.store.writer.consolidate

        def consolidate_then_signal(*args, **kwargs):
            result = consolidate(*args, **kwargs)
            ready.send(True)
            return result

        fisher_pipeline.store.writer.consolidate = consolidate_then_signal
    shapes, specs = _layout(extra)
    make_store(path, seed=seed, shapes=shapes, specs=specs, per_sample=("model.layers.0.self_attn.q_proj.weight",))


def _arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array the store's metadata lists, read in full (absent chunks read as fill values)."""
    store = open_store(path)
    return {key: np.asarray(array[...]) for key, array in store.root.members(max_depth=None)
            if isinstance(array, zarr.Array)}


def _same(found: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> bool:
    return found.keys() == expected.keys() and all(np.array_equal(found[k], expected[k]) for k in expected)


def test_store_killed_during_close_holds_old_or_new_store(tmp_path):
    """A big old store (slow to delete) is rewritten by a small new one, killed during close()."""
    final, old_copy, new_copy = tmp_path / "task.zarr", tmp_path / "old.zarr", tmp_path / "new.zarr"
    _write_store(str(old_copy), seed=0, extra=150)
    _write_store(str(new_copy), seed=1, extra=0)
    old, new = _arrays(old_copy), _arrays(new_copy)
    assert len(old) > 500
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["store_factory", "fisher_pipeline.store.writer", "test_atomic"])
    rng = random.Random(1)
    outcomes, state = {"old": 0, "new": 0}, "new"
    for trial in range(10):
        if state == "new":  # put the big old store back
            atomic.remove_path(final)
            shutil.copytree(old_copy, final)
        receive, send = context.Pipe(duplex=False)
        process = context.Process(target=_write_store, args=(str(final), 1, 0, send))
        process.start()
        send.close()
        assert receive.poll(120) and receive.recv(), "the writer did not reach close()"
        time.sleep(rng.uniform(0, 0.04))
        process.kill()
        process.join()
        receive.close()
        assert verify_store(final).ok, verify_store(final).problems  # every file as its writer recorded it
        found = _arrays(final)  # the store opens: it is there, with readable metadata
        state = "old" if _same(found, old) else "new" if _same(found, new) else None
        if state is None:
            broken = [k for k in found if k in old and not np.array_equal(found[k], old[k])]
            zeros = [k for k in broken if not found[k].any()]
            pytest.fail(f"trial {trial}: {final} is neither the old nor the new store: {len(broken)} arrays "
                        f"differ from the old one ({len(zeros)} all zeros, e.g. {broken[:3]})")
        outcomes[state] += 1
        clean_stale(final)
        assert set(siblings(final)) <= {final.name, old_copy.name, new_copy.name}
    # A rerun after the kills completes and leaves nothing named .partial or .old.
    _write_store(str(final), seed=1, extra=0)
    assert _same(_arrays(final), new)
    assert siblings(final) == ["new.zarr", "old.zarr", "task.zarr"]


def test_outputs_never_replace_a_file(tmp_path, caplog):
    """An output path naming a user's file (or a link to one) is refused before any work, and
    at publish time too (the file may appear while the output is written); the file stays."""
    from fisher_pipeline.__main__ import main
    from fisher_pipeline.errors import OutputPathError
    from store_factory import make_store

    user_file = tmp_path / "notes.txt"
    user_file.write_text("mine")
    with pytest.raises(OutputPathError, match=rf"^{re.escape(str(user_file))} is a file: an output directory would "
                                              r"replace it and delete it\. Move or remove it"):
        with staged_dir(user_file) as staging:
            (staging / "x").write_text("new")
    link = tmp_path / "link"
    link.symlink_to(user_file)
    with pytest.raises(OutputPathError, match="is a link to a file"):
        with staged_dir(link):
            pass
    staging = tmp_path / "staged"
    staging.mkdir()
    (staging / "x").write_text("new")
    with pytest.raises(OutputPathError):
        publish(staging, user_file)
    with pytest.raises(OutputPathError):  # a phase 1 store
        make_store(user_file, n_samples=2)
    assert user_file.read_text() == "mine" and link.read_text() == "mine" and (staging / "x").exists()
    # the CLI: one line, exit status 2, the file intact
    store = make_store(tmp_path / "a.zarr", n_samples=3, task="a")
    caplog.clear()
    assert main(["importance", "--config-json", "{}", "--store", str(store), "--out", str(user_file)]) == 2
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [
        f"{user_file} is a file: an output directory would replace it and delete it. Move or remove it, or name "
        "another output path"]
    assert user_file.read_text() == "mine"
    # a file over a file (the prepared model's files) is still a plain atomic replace
    (tmp_path / "new.txt").write_text("new")
    publish(tmp_path / "new.txt", user_file)
    assert user_file.read_text() == "new"
