"""Fault injection: what a user sees, and what is left on disk, when a run goes wrong outside
the code (docs/faults.md tabulates every probe).

Each probe asserts three things: nothing published is partial, nothing earlier is lost, and
the message names the cause. Two probes live beside the code they test, in
`test_atomic.py`: kills at random instants of a store's `close`
(`test_store_killed_during_close_holds_old_or_new_store`) and outputs naming a user's file
(`test_outputs_never_replace_a_file`).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from fisher_pipeline.__main__ import main
from fisher_pipeline.atomic import claim_holder, staged_dir, staging_siblings
from fisher_pipeline.errors import DiskFullError, StoreFormatError
from fisher_pipeline.phases import run_conflicts, run_importance
from fisher_pipeline.store import open_store, verify_store
from fisher_pipeline.store.integrity import MANIFEST
from fisher_pipeline.workflow_lock import RUN_CLAIM
from store_factory import make_store
from test_workflow_phases import snakemake, write_config

ROOT = Path(__file__).resolve().parents[1]
Q = "model.layers.0.self_attn.q_proj.weight"

#: Phase 1 from the command line whose first micro-batch waits until file argv[1] exists: a
#: writer that holds its output until the test lets it go (the code is the real one).
_HELD_PHASE1 = """
import os, sys, time
import fisher_pipeline.store.rows as rows
append = rows.SampleRows.append
def held(self, *args, **kwargs):
    while not os.path.exists(sys.argv[1]):
        time.sleep(0.05)
    return append(self, *args, **kwargs)
rows.SampleRows.append = held
from fisher_pipeline.__main__ import main
sys.exit(main(sys.argv[2:]))
"""

#: Phase 1 from the command line that fills the store's filesystem just before the store
#: closes (writes its statistics): the disk is really full, the code is the real one.
_FILL_THEN_CLOSE = """
import errno, sys
import fisher_pipeline.store.writer as writer
write_statistics = writer.StoreWriter._write_statistics
def fill_first(self, accumulator):
    with open(sys.argv[1], "wb") as filler:
        try:
            while True:
                filler.write(bytes(1 << 16))
                filler.flush()
        except OSError as err:
            assert err.errno == errno.ENOSPC, err
    return write_statistics(self, accumulator)
writer.StoreWriter._write_statistics = fill_first
from fisher_pipeline.__main__ import main
sys.exit(main(sys.argv[2:]))
"""


def _phase1_config(tiny_model_dir, folder: Path, n_samples: int = 12) -> Path:
    config = folder / "config.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"path": str(tiny_model_dir("llama"))},
        "tasks": {"arithmetic": {"source": "builtin:arithmetic", "n_samples": n_samples, "max_length": 48}},
        "fisher": {"batch_size": 1, "per_sample_params": "attention", "fisher_m2_params": ""},
    }))
    return config


def _phase1_argv(config: Path, out: Path) -> list[str]:
    return ["fisher", "--config", str(config), "--task", "arithmetic", "--out", str(out), "--threads", "1", "--quiet"]


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if " ERROR " in line]


@pytest.fixture
def small_fs(tmp_path):
    """Factory: a tmpfs of `size_mb` MB mounted in tmp_path (root only; skipped elsewhere)."""
    mounted = []

    def mount(size_mb: int) -> Path:
        if os.geteuid() != 0:
            pytest.skip("a small filesystem is mounted with `mount -t tmpfs`, which needs root")
        folder = tmp_path / f"fs{len(mounted)}"
        folder.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(folder)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)


# --- two writers of one store --------------------------------------------------------------
def test_two_writers_of_one_store_one_wins_whole(tiny_model_dir, tmp_path):
    """Two phase 1 processes write one store: the second fails at once naming the path and
    the first process; the first publishes a whole store."""
    config = _phase1_config(tiny_model_dir, tmp_path)
    out = tmp_path / "arithmetic.zarr"
    go = tmp_path / "go"
    first = subprocess.Popen([sys.executable, "-c", _HELD_PHASE1, str(go), *_phase1_argv(config, out)], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not staging_siblings(out) and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)  # the first writer has claimed the path once its staging exists
    assert first.poll() is None, "the first writer ended before the second started"
    second = subprocess.run([sys.executable, "-m", "fisher_pipeline", *_phase1_argv(config, out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert first.poll() is None
    go.write_text("")
    stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-3000:]
    assert second.returncode == 2, second.stderr[-3000:]
    errors = _error_lines(second.stderr)
    assert len(errors) == 1, second.stderr
    assert re.search(rf"{re.escape(str(out))} is being written by another process \(pid {first.pid} on .*, since "
                     r"[\d-]+ [\d:]+: .* fisher --config .*\): wait for it to finish, or stop it", errors[0]), errors[0]
    report = verify_store(out)
    assert report.ok, report.problems
    store = open_store(out)
    assert store.n_samples == 12 and store.per_sample(store.per_sample_names[0]).shape[0] == 12
    assert sorted(os.listdir(tmp_path)) == ["arithmetic.zarr", "config.yaml", "go"]  # no staging, no claim left


# --- a full disk ------------------------------------------------------------------------------
def test_disk_full_while_the_store_closes(tiny_model_dir, tmp_path, small_fs):
    """The filesystem fills as the store closes: exit 2, one line with the path, the free
    space and the size needed; the earlier store intact; no staging left."""
    fs = small_fs(24)
    config = _phase1_config(tiny_model_dir, tmp_path)
    out = fs / "arithmetic.zarr"
    assert main(_phase1_argv(config, out)) == 0
    record = (out / MANIFEST).read_bytes()
    filler = fs / "filler"
    result = subprocess.run([sys.executable, "-c", _FILL_THEN_CLOSE, str(filler), *_phase1_argv(config, out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = _error_lines(result.stderr)
    assert len(errors) == 1, result.stderr
    assert re.search(rf"no space left on device writing {re.escape(str(out))} \(\d+ B free of [\d.]+ MB on the "
                     rf"filesystem of {re.escape(str(fs))}; [\d.]+ [KM]B had been written; the output needs about "
                     r"[\d.]+ [KM]B\): nothing was published and its staging was removed; free space there",
                     errors[0]), errors[0]
    assert sorted(os.listdir(fs)) == ["arithmetic.zarr", "filler"]  # no staging, no claim
    filler.unlink()
    assert (out / MANIFEST).read_bytes() == record and verify_store(out).ok  # the earlier store, whole


def test_disk_full_named_while_a_temporary_file_vanishes(tmp_path, monkeypatch):
    """zarr returns a write's error while its other writes run on: a temporary file listed
    in the staging can be gone when the bytes written are counted. The message is still the
    full disk's, not the vanished file's."""
    import errno

    from fisher_pipeline import atomic

    final = tmp_path / "store.zarr"
    files = atomic._files

    def listed_then_vanished(folder):
        entries = list(files(folder))
        for entry in entries:
            if entry.name.endswith(".partial"):
                os.unlink(entry.path)  # the other writer cleans up after the listing
        return iter(entries)

    with pytest.raises(DiskFullError, match=rf"writing {re.escape(str(final))} \(.*; 5 B had been written\)"):
        with staged_dir(final) as staging:
            (staging / "kept").write_bytes(b"12345")
            (staging / "zarr.0123.partial").write_bytes(b"temporary")
            monkeypatch.setattr(atomic, "_files", listed_then_vanished)
            raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.undo()
    assert not final.exists() and os.listdir(tmp_path) == []


def test_disk_full_in_a_phase_output(small_fs):
    """A phase's output that does not fit: the message names it and the space; nothing is published."""
    fs = small_fs(4)
    final = fs / "importance" / "prose"
    with staged_dir(final) as staging:
        (staging / "old.csv").write_text("the earlier output")
    with pytest.raises(DiskFullError, match=rf"writing {re.escape(str(final))} \(\d+ B free of 4.2 MB on the "
                                            r"filesystem of .*; 4.\d MB had been written\)"):
        with staged_dir(final) as staging:
            with open(staging / "big.npy", "wb") as file:
                file.write(bytes(8 << 20))
    assert os.listdir(final) == ["old.csv"]
    assert sorted(os.listdir(final.parent)) == ["prose"]


def test_a_read_only_results_folder_is_named(store, small_fs, caplog):
    """Outputs on a read-only filesystem: one line naming the output and the cause."""
    fs = small_fs(4)
    subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=True)
    out = fs / "importance" / "prose"
    caplog.clear()
    assert main(["importance", "--config-json", "{}", "--store", str(store), "--out", str(out)]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors == [f"cannot create or open {out}: Read-only file system"], errors


# --- damaged stores ---------------------------------------------------------------------------
def _chunk(store: Path, array: str) -> Path:
    files = sorted(p for p in (store / array / "c").rglob("*") if p.is_file())
    assert files, array
    return files[0]


def _flip(path: Path, at: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.fixture
def store(tmp_path) -> Path:
    return make_store(tmp_path / "prose.zarr", n_samples=9, task="prose", per_sample=(Q,))


def test_missing_truncated_or_foreign_files_are_refused_on_open(store):
    chunk = _chunk(store, f"fisher/{Q}")
    data = chunk.read_bytes()
    chunk.unlink()  # zarr alone would read zeros
    with pytest.raises(StoreFormatError, match=rf"store {re.escape(str(store))} is damaged: 1 file\(s\) missing: "
                                               rf"chunk \(0, 0\) of array fisher/{re.escape(Q)}; rerun phase 1"):
        open_store(store)
    chunk.write_bytes(data[:-4])
    with pytest.raises(StoreFormatError, match=rf"1 file\(s\) of another size than written: chunk \(0, 0\) of "
                                               rf"array fisher/{re.escape(Q)}"):
        open_store(store)
    chunk.write_bytes(data)
    (store / ".snakemake_timestamp").write_text("")  # Snakemake marks a finished directory output so
    (store / "fisher" / ".DS_Store").write_text("")  # hidden names: never zarr's, never checked
    open_store(store).fisher(Q)
    assert verify_store(store).ok
    extra = store / "per_sample" / Q / "c" / "9" / "0" / "0"
    extra.parent.mkdir(parents=True)
    extra.write_bytes(b"x")
    with pytest.raises(StoreFormatError, match=r"1 file\(s\) not written by its writer: chunk \(9, 0, 0\)"):
        open_store(store)
    extra.unlink()
    (store / MANIFEST).unlink()
    with pytest.raises(StoreFormatError, match=rf"store {re.escape(str(store))} has no {MANIFEST}"):
        open_store(store)


def test_damaged_bytes_are_refused_when_read_naming_array_and_chunk(store):
    _flip(_chunk(store, f"fisher/{Q}"), 5)
    opened = open_store(store)  # the same names and sizes: opening cannot tell
    with pytest.raises(StoreFormatError, match=rf"store {re.escape(str(store))} is damaged: chunk \(0, 0\) of array "
                                               rf"fisher/{re.escape(Q)} does not hold the bytes that were written "
                                               r"\(its CRC-32 differs\); rerun phase 1 for task 'prose'"):
        opened.fisher(Q)
    np.testing.assert_array_equal(opened.grad_mean(Q).shape, opened.geometry[Q].shape)  # other arrays read
    shard = _chunk(store, f"per_sample/{Q}")
    _flip(shard, 3)
    with pytest.raises(StoreFormatError, match=rf"chunk \(0, 0, 0\) of array per_sample/{re.escape(Q)} does not"):
        open_store(store).per_sample(Q, rows=slice(0, 1))  # one row read: its shard file is checked whole


def test_phases_stop_on_a_damaged_store(store, tmp_path, caplog):
    """Phases that exited 0 on zeros (a Fisher or per-sample chunk gone or damaged) now stop."""
    _flip(_chunk(store, f"group/{Q}"), 5)  # the head and neuron sums importance reads
    with pytest.raises(StoreFormatError, match=rf"chunk \(0\) of array group/{re.escape(Q)} does not hold"):
        run_importance(store, tmp_path / "importance")
    other = make_store(tmp_path / "code.zarr", n_samples=9, task="code", per_sample=(Q,), seed=1)
    _chunk(other, f"per_sample/{Q}").unlink()
    with pytest.raises(StoreFormatError, match=r"1 file\(s\) missing: chunk \(0, 0, 0\) of array per_sample/"):
        run_conflicts({"prose": make_store(tmp_path / "p2.zarr", n_samples=9, task="prose", per_sample=(Q,)),
                       "code": other}, tmp_path / "conflicts")
    assert not (tmp_path / "importance").exists() and not (tmp_path / "conflicts").exists()


def test_verify_command_checks_every_file(store, tmp_path, capsys, caplog):
    assert main(["verify", str(store)]) == 0
    assert re.fullmatch(rf"{re.escape(str(store))}: ok \(\d+ files, [\d.]+ GB checked in [\d.]+ s\)\n",
                        capsys.readouterr().out)
    _flip(_chunk(store, f"group/{Q}"))
    (_chunk(store, f"gate/{Q}")).unlink()
    caplog.clear()
    assert main(["verify", str(store)]) == 2
    out = capsys.readouterr().out
    assert f"{store}: DAMAGED, 2 problem(s):" in out
    assert f"chunk (0, 0) of array gate/{Q} is missing" in out
    assert f"chunk (0) of array group/{Q} is damaged (CRC-32 differs from the record)" in out
    assert "1 of 1 store(s) damaged" in caplog.text and "rerun phase 1" in caplog.text


# --- two workflow runs in one folder ----------------------------------------------------------
_HOLD_RUN = """
import sys, time
from fisher_pipeline import workflow_lock
workflow_lock.hold(sys.argv[1])
print("held", flush=True)
time.sleep(600)
"""


def test_a_second_workflow_run_is_refused_naming_the_first(tiny_model_dir, tmp_path):
    """A real run claims its folder when it starts; another snakemake there stops at once
    naming it (not Snakemake's advice to --rerun-incomplete), and a killed run's claim dies with it."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    config = write_config(tmp_path / "config.yaml", Path(tiny_model_dir("llama")),
                          tasks={"prose": {"source": "builtin:prose", "n_samples": 400, "max_length": 48}},
                          fisher={"batch_size": 1, "engine": "loop"})
    target = "results/fisher/prose.zarr"
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--directory",
               str(workdir), "--configfile", str(config), "--cores", "1", target]
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"}, start_new_session=True)
    try:
        deadline = time.time() + 120
        while first.poll() is None and time.time() < deadline and not staging_siblings(workdir / target):
            time.sleep(0.1)  # its phase 1 job is running
        assert first.poll() is None and staging_siblings(workdir / target), "the first run ended or never began"
        holder = claim_holder(workdir / RUN_CLAIM)
        assert holder is not None and f"pid {first.pid} " in holder
        for dry in ("-n", "--quiet"):
            output = snakemake(workdir, config, dry, "--cores", "1", "--", target, expect_failure=True)
            assert f"another snakemake run is working in {workdir} (pid {first.pid} on" in output, output[-3000:]
            assert "Wait for it to finish, or stop it" in output
            assert "IncompleteFilesException" not in output
        assert first.poll() is None
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert claim_holder(workdir / RUN_CLAIM) is None  # the claim died with the run
    # The killed run published nothing: a new run plans its job again.
    output = snakemake(workdir, config, "-n", "--cores", "1", "--", target)
    assert "another snakemake run" not in output and "fisher        1" in output


def test_a_workflow_run_waits_for_no_claim_it_holds_itself(tiny_model_dir, tmp_path):
    """The claim is taken by a real run (onstart), not by a dry run: a dry run leaves none,
    and a process holding the claim is named to any snakemake in the folder."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    config = write_config(tmp_path / "config.yaml", Path(tiny_model_dir("llama")))
    snakemake(workdir, config, "-n", "--cores", "1")
    assert claim_holder(workdir / RUN_CLAIM) is None
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_RUN, str(workdir)], stdout=subprocess.PIPE, text=True,
                              cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        output = snakemake(workdir, config, "-n", "--cores", "1", expect_failure=True)
        assert f"another snakemake run is working in {workdir} (pid {holder.pid} on" in output
    finally:
        holder.kill()
        holder.wait()
    snakemake(workdir, config, "-n", "--cores", "1")


def test_claims_record_their_process(tmp_path):
    """The claim file holds who writes (for the other process's message) and goes with its release."""
    from fisher_pipeline.atomic import Claim

    claim = Claim(tmp_path / "out")
    recorded = json.loads((tmp_path / ".out.lock").read_text())
    assert recorded["pid"] == os.getpid() and recorded["host"] and recorded["since"]
    assert f"pid {os.getpid()} on" in claim_holder(tmp_path / "out")
    claim.release()
    assert claim_holder(tmp_path / "out") is None and not (tmp_path / ".out.lock").exists()
