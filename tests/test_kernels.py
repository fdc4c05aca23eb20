"""The compiled one-pass fold (`fisher_pipeline/kernels/fold.c`) against float64 numpy and
against the torch-operations path of the accumulator, and its build's failure modes."""

from __future__ import annotations

import logging
import os
import stat

import numpy as np
import pytest
import torch

from fisher_pipeline import kernels
from fisher_pipeline.accumulate import FisherAccumulator
from fisher_pipeline.layout import GroupSpec, Segment

pytestmark = pytest.mark.skipif(kernels.load() is None, reason="no working C compiler with OpenMP here")


def _reference(g: np.ndarray, skip: np.ndarray):
    """float64 numpy: sums over samples of g and g^2 (rows in `skip` contribute nothing)."""
    g64 = g.astype(np.float64)
    with np.errstate(over="ignore"):  # the planted float32 overflow of g^2
        squares = np.square(g).astype(np.float64)  # squared in float32, as the model's dtype
    keep = ~skip[:, None]
    return np.where(keep, g64.sum(0), 0), np.where(keep, squares.sum(0), 0), squares


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape, group_kind, copy_dtype", [
    ((8, 37, 96), kernels.GROUP_PER_ROW, torch.float16),
    ((5, 13, 200), kernels.GROUP_PER_COLUMN, torch.float32),
    ((3, 1, 77), kernels.GROUP_PER_COLUMN, None),  # a 1-D parameter's chunk
    ((1, 4, 3), kernels.GROUP_NONE, torch.float16),
])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_fold_equals_float64_numpy(shape, group_kind, copy_dtype, sign, threads):
    b, rows, columns = shape
    rng = np.random.default_rng(hash((shape, group_kind, threads)) % 2**32)
    g = (rng.standard_normal(shape) * rng.lognormal(0, 3, size=shape)).astype(np.float32)  # heavy-tailed
    skip = np.zeros(rows, dtype=bool)
    if rows > 3:  # a NaN and an inf row (the first sample's and the last's), and a float32 overflow of g^2
        g[0, 1, 2], g[-1, 3, 0] = np.nan, np.inf
        skip[[1, 3]] = True
    if rows > 5:
        g[b // 2, 5, columns - 1] = 3e19
        skip[5] = True
    total_g = torch.from_numpy(rng.standard_normal((rows, columns)))
    total_c = total_g.abs()
    start_g, start_c = total_g.numpy().copy(), total_c.numpy().copy()
    buffer = torch.zeros(b, rows + 9, columns, dtype=copy_dtype) if copy_dtype is not None else None
    copy = buffer[:, 4:4 + rows] if buffer is not None else None
    kernel = kernels.load()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        skipped, group, gate, saliency = kernel.fold(torch.from_numpy(g), total_g, total_c, sign, copy, group_kind)
    finally:
        torch.set_num_threads(old_threads)

    sum_g, sum_c, squares = _reference(g, skip)
    assert skipped == skip.sum()
    # float32 sums over the chunk's samples (as torch's path): within b float32 ulps of the
    # sum of |terms|, plus float64 rounding of the state
    with np.errstate(invalid="ignore"):
        scale_g = np.where(skip[:, None], 0, np.abs(g.astype(np.float64)).sum(0))
    for state, start, exact, scale in ((total_g, start_g, sum_g, scale_g), (total_c, start_c, sum_c, sum_c)):
        error = np.abs(state.numpy() - (start + sign * exact))
        assert (error <= 1.2e-7 * b * scale + 1e-15 * np.abs(start)).all(), error.max()
    if copy is not None:
        expected = torch.from_numpy(g).to(copy_dtype)
        written = copy.contiguous()
        assert torch.equal(written.isnan(), expected.isnan())
        same_bits = written.view(torch.int16 if copy_dtype == torch.float16 else torch.int32)
        wanted_bits = expected.view(same_bits.dtype)
        finite = ~expected.isnan()
        assert torch.equal(same_bits[finite], wanted_bits[finite]), "copy differs from torch's rounding"
        assert not buffer[:, :4].any() and not buffer[:, 4 + rows:].any(), "copy wrote outside its rows"
    if group_kind == kernels.GROUP_PER_ROW:  # float32 within a row of a chunk, as torch's path
        np.testing.assert_allclose(group.numpy(), squares.sum(2), rtol=1e-7 * columns)
    elif group_kind == kernels.GROUP_PER_COLUMN:
        np.testing.assert_allclose(group.numpy(), squares.sum(1), rtol=1e-7 * rows)
    else:
        assert group is None
    assert gate is None and saliency is None  # no weights given


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape, group_kind", [
    ((6, 37, 96), kernels.GROUP_PER_ROW),
    ((5, 13, 200), kernels.GROUP_PER_COLUMN),
    ((3, 1, 77), kernels.GROUP_PER_COLUMN),  # a 1-D parameter's chunk
])
def test_fold_gates_and_saliencies_equal_float64_numpy(shape, group_kind, threads):
    """With the parameter's rows, per-sample sums of g*w and (g*w)^2 per row / column; the
    state, group sums of g^2 and copy are those of the same call without weights."""
    b, rows, columns = shape
    rng = np.random.default_rng(hash((shape, group_kind, threads, "gates")) % 2**32)
    g = (rng.standard_normal(shape) * rng.lognormal(0, 2, size=shape)).astype(np.float32)
    w = (rng.standard_normal((rows, columns)) * rng.lognormal(0, 1, size=(rows, columns))).astype(np.float32)
    kernel = kernels.load()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        outputs = []
        for weights in (torch.from_numpy(w), None):
            total_g = torch.zeros(rows, columns, dtype=torch.float64)
            total_c = torch.zeros(rows, columns, dtype=torch.float64)
            copy = torch.empty(shape, dtype=torch.float16)
            folded = kernel.fold(torch.from_numpy(g), total_g, total_c, 1.0, copy, group_kind, weights)
            outputs.append((folded, total_g, total_c, copy, folded.group.clone()))
    finally:
        torch.set_num_threads(old_threads)
    (folded, *with_weights), (_, *without) = outputs
    for k, (mine, theirs) in enumerate(zip(with_weights, without, strict=True)):
        assert torch.equal(mine, theirs), k
    products = g.astype(np.float64) * w.astype(np.float64)
    axis = 2 if group_kind == kernels.GROUP_PER_ROW else 1
    terms = columns if axis == 2 else rows
    # float32 products and sums within a row (column) of a chunk: an ulp of the sum of |terms|
    # per term, and three for the rounding of g * w and of its square
    scale = np.abs(products).sum(axis)
    bound = 1.2e-7 * (terms + 3)
    np.testing.assert_array_less(np.abs(folded.gate.numpy() - products.sum(axis)), bound * scale + 1e-30)
    np.testing.assert_allclose(folded.saliency.numpy(), np.square(products).sum(axis), rtol=bound)
    wrong = np.square(g.astype(np.float64) * np.square(w.astype(np.float64))).sum(axis)  # w^2 for w
    assert not np.allclose(folded.saliency.numpy(), wrong, rtol=1e-3)


@pytest.mark.parametrize("shape, group_kind", [
    ((4, 70, 33), kernels.GROUP_PER_COLUMN),  # more rows than the kernel's column blocks
    ((4, 5, 33), kernels.GROUP_PER_COLUMN),  # fewer
    ((4, 70, 33), kernels.GROUP_PER_ROW),
    ((4, 70, 33), kernels.GROUP_NONE),
])
def test_fold_gives_the_same_bits_whatever_the_thread_count(shape, group_kind):
    """A store must not depend on the machine's cores (a SLURM job and a workstation run of
    one config give the same masks): every output of one chunk, bit for bit, at 1 to 5 threads."""
    b, rows, columns = shape
    rng = np.random.default_rng(7)
    g = torch.from_numpy((rng.standard_normal(shape) * rng.lognormal(0, 2, size=shape)).astype(np.float32))
    w = torch.from_numpy(rng.standard_normal((rows, columns)).astype(np.float32))
    kernel = kernels.load()
    old_threads = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3, 5):
            torch.set_num_threads(threads)
            total_g = torch.zeros(rows, columns, dtype=torch.float64)
            total_c = torch.zeros(rows, columns, dtype=torch.float64)
            folded = kernel.fold(g, total_g, total_c, 1.0, None, group_kind,
                                 w if group_kind != kernels.GROUP_NONE else None)
            results.append([total_g, total_c] + [t.clone() for t in (folded.group, folded.gate, folded.saliency)
                                                 if t is not None])
    finally:
        torch.set_num_threads(old_threads)
    for threads, other in zip((2, 3, 5), results[1:], strict=True):
        for k, (mine, reference) in enumerate(zip(other, results[0], strict=True)):
            assert torch.equal(mine, reference), f"output {k} differs between 1 and {threads} threads"


def test_fold_without_state_only_copies_and_groups():
    g = torch.randn(4, 6, 10)
    copy = torch.empty(4, 6, 10, dtype=torch.float16)
    skipped, group, _, _ = kernels.load().fold(g, None, None, 1.0, copy, kernels.GROUP_PER_ROW)
    assert skipped == 0
    assert torch.equal(copy, g.half())
    torch.testing.assert_close(group, g.double().square().sum(2), rtol=1e-6, atol=0)


def _feed(accumulator: FisherAccumulator, batches: list[dict[str, torch.Tensor]],
          chunk_rows: int) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """Micro-batches through `accumulator`; the per-sample copies of each, and all gates `[N, G]`."""
    copies, gates = [], []
    for batch in batches:
        n = next(iter(batch.values())).shape[0]
        accumulator.begin(n)
        for name, grads in batch.items():
            for start in range(0, grads.shape[1], chunk_rows):
                stop = min(start + chunk_rows, grads.shape[1])
                accumulator.add(name, start, stop, grads[:, start:stop].clone())
        copies.append({k: v.clone() for k, v in accumulator.commit().items()})
        gates.append(accumulator.sample_gates)
    return copies, {name: torch.cat([g[name] for g in gates]) for name in gates[0]}


def test_accumulator_with_kernel_equals_torch_path_and_numpy():
    """Three micro-batches through both paths (2-D weights grouped by row and by column, a
    1-D weight, an M2 parameter that stays on torch): every statistic and stored copy."""
    shapes = {"rows": (12, 7), "columns": (5, 9), "vector": (11,), "with_m2": (6, 4)}
    specs = {
        "rows": GroupSpec.heads(0, ("h", 3, 4)),
        # a group met again (as Phi-3's gate and up rows of one neuron): labels 0 0 0 1 1 1 0 0 0
        "columns": GroupSpec(1, (Segment("a", 0, 1, 3), Segment("b", 0, 1, 3), Segment("a", 0, 1, 3))),
        "vector": GroupSpec(0, (Segment("n", 0, 1, 6), Segment("n", 1, 1, 5))),
        "with_m2": GroupSpec.heads(0, ("x", 2, 3)),
    }
    gen = torch.Generator().manual_seed(7)
    batches = [{name: torch.randn(n, *shape, generator=gen) * 3 for name, shape in shapes.items()} for n in (4, 4, 3)]
    common = dict(shapes=shapes, specs=specs, m2_names={"with_m2"}, per_sample_names={"rows", "vector"},
                  per_sample_dtype=torch.float16)
    weights = {name: torch.randn(shape, generator=gen) for name, shape in shapes.items()}
    common["weights"] = weights
    fast = FisherAccumulator(**common, fold_kernel="auto")
    slow = FisherAccumulator(**common, fold_kernel="torch")
    assert fast._kernel is not None and slow._kernel is None
    (fast_copies, fast_gates), (slow_copies, slow_gates) = _feed(fast, batches, 5), _feed(slow, batches, 5)

    everything = {name: torch.cat([b[name] for b in batches]).double() for name in shapes}
    for name, values in everything.items():
        squares = values.float().square().double()
        rtol = 1e-6  # both paths sum over a chunk's samples in float32, then in float64
        torch.testing.assert_close(fast.fisher[name].mean, squares.mean(0), rtol=rtol, atol=0)
        torch.testing.assert_close(fast.grad[name].mean, values.mean(0), rtol=rtol, atol=rtol * values.abs().max())
        per_sample_groups = specs[name].reduce(squares)
        torch.testing.assert_close(fast.group[name].mean, per_sample_groups.mean(0), rtol=rtol, atol=0)
        torch.testing.assert_close(fast.group[name].m2, ((per_sample_groups - per_sample_groups.mean(0)) ** 2).sum(0),
                                   rtol=1e-4, atol=0)
        products = values.float().mul(weights[name]).double()  # g * w in float32, as both paths
        gates = specs[name].reduce(products)
        saliencies = 0.5 * specs[name].reduce(products.square())
        # gates are signed sums: float32 rounding relative to the sum of |g * w| of each group
        gate_scale = specs[name].reduce(products.abs())
        for got in (fast_gates[name], slow_gates[name]):
            assert ((got - gates).abs() <= 1e-6 * gate_scale + 1e-30).all(), name
        torch.testing.assert_close(fast.saliency[name].mean, saliencies.mean(0), rtol=rtol, atol=0)
        torch.testing.assert_close(fast.saliency[name].m2, ((saliencies - saliencies.mean(0)) ** 2).sum(0),
                                   rtol=1e-4, atol=0)
        for state in ("fisher", "grad", "group", "saliency"):  # the torch path: float32 sums, same to ~1e-6
            torch.testing.assert_close(getattr(fast, state)[name].mean, getattr(slow, state)[name].mean,
                                       rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(fast.saliency[name].m2, slow.saliency[name].m2, rtol=1e-5, atol=0)
    torch.testing.assert_close(fast.fisher["with_m2"].m2, slow.fisher["with_m2"].m2, rtol=0, atol=0)
    for mine, theirs in zip(fast_copies, slow_copies, strict=True):
        assert mine.keys() == theirs.keys() == {"rows", "vector"}
        for name in mine:
            assert torch.equal(mine[name], theirs[name])


def test_accumulator_kernel_undo_takes_out_exactly_what_was_folded():
    """A micro-batch with a NaN in one row of one chunk: the finite rows are folded, then
    an undo pass removes them, and the statistics return to the state before the batch."""
    shapes, specs = {"w": (8, 5)}, {"w": GroupSpec.heads(0, ("a", 2, 4))}
    acc = FisherAccumulator(shapes, specs, set(), set(), fold_kernel="auto", weights={"w": torch.randn(8, 5)})
    gen = torch.Generator().manual_seed(1)
    good = torch.randn(3, 8, 5, generator=gen)
    acc.begin(3)
    acc.add("w", 0, 8, good.clone())
    acc.commit()
    before = (acc.fisher["w"].total.clone(), acc.grad["w"].total.clone())
    bad = torch.randn(3, 8, 5, generator=gen)
    bad[1, 6, 2] = float("nan")
    acc.begin(3)
    acc.add("w", 0, 4, bad[:, :4].clone())
    acc.add("w", 4, 8, bad[:, 4:].clone())
    assert acc.non_finite_samples() == {1: "w"}
    with pytest.raises(ValueError, match="non-finite per-sample gradients"):
        acc.commit()
    folded = acc.folded()
    assert folded == [("w", 0, 4), ("w", 4, 8)]  # the second chunk's finite rows went in
    assert not torch.equal(acc.fisher["w"].total, before[0])
    acc.begin(3, undo=folded)
    acc.add("w", 0, 4, bad[:, :4].clone())
    acc.add("w", 4, 8, bad[:, 4:].clone())
    torch.testing.assert_close(acc.fisher["w"].total, before[0], rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(acc.grad["w"].total, before[1], rtol=1e-12, atol=1e-15)
    assert acc.count == 3


def test_fold_rejects_what_it_cannot_read():
    kernel = kernels.load()
    with pytest.raises(ValueError, match="contiguous float32 CPU tensor"):
        kernel.fold(torch.zeros(2, 3, 4, dtype=torch.float64), None, None)
    with pytest.raises(ValueError, match="contiguous float32 CPU tensor"):
        kernel.fold(torch.zeros(2, 4, 3).transpose(1, 2), None, None)
    with pytest.raises(ValueError, match="both state tensors or neither"):
        kernel.fold(torch.zeros(2, 3, 4), torch.zeros(3, 4, dtype=torch.float64), None)
    with pytest.raises(ValueError, match="contiguous float64 with 12 elements"):
        wrong = torch.zeros(3, 5, dtype=torch.float64)
        kernel.fold(torch.zeros(2, 3, 4), wrong, wrong.clone())
    with pytest.raises(ValueError, match="float32/float16 \\[b, R, C\\] view"):
        kernel.fold(torch.zeros(2, 3, 4), None, None, copy=torch.zeros(2, 3, 4, dtype=torch.bfloat16))


def test_bad_fold_kernel_value_is_named():
    with pytest.raises(ValueError, match="fold_kernel must be 'auto' or 'torch', not 'fast'"):
        FisherAccumulator({"w": (2,)}, {"w": GroupSpec.whole((2,))}, set(), set(),
                          fold_kernel="fast", weights={"w": torch.ones(2)})


@pytest.fixture
def fresh_build(tmp_path, monkeypatch):
    """An empty kernel cache, and no memory of an earlier load."""
    monkeypatch.setenv("FISHER_PIPELINE_CACHE", str(tmp_path / "cache"))
    kernels._library.cache_clear()
    yield tmp_path / "cache"
    kernels._library.cache_clear()


def test_build_is_cached_by_source_compiler_and_cpu(fresh_build):
    first = kernels.build()
    assert first.parent == fresh_build and first.name.startswith("fold-")
    stamp = first.stat().st_mtime_ns
    assert kernels.build() == first and first.stat().st_mtime_ns == stamp  # not rebuilt
    assert [p.name for p in fresh_build.iterdir()] == [first.name]  # no partial files left


def test_missing_compiler_falls_back_to_torch_with_the_reason(fresh_build, monkeypatch, caplog):
    monkeypatch.setenv("CC", "no-such-cc")
    with caplog.at_level(logging.WARNING, logger="fisher_pipeline.kernels"):
        acc = FisherAccumulator({"w": (2, 3)}, {"w": GroupSpec.whole((2, 3))}, set(), set(),
                                weights={"w": torch.ones(2, 3)})
    assert acc._kernel is None
    assert "no C compiler 'no-such-cc' on PATH (set CC, or install gcc)" in caplog.text
    assert "using torch operations" in caplog.text
    acc.begin(2)
    acc.add("w", 0, 2, torch.ones(2, 2, 3))
    acc.commit()
    assert torch.equal(acc.fisher["w"].mean, torch.ones(2, 3, dtype=torch.float64))


def test_failing_compiler_is_reported_with_its_output(fresh_build, tmp_path):
    fake = tmp_path / "fake-cc"
    fake.write_text("#!/bin/sh\nif [ \"$1\" = --version ]; then echo fake 1.0; exit 0; fi\n"
                    "echo 'fold.c:1: error: no OpenMP here' >&2\nexit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    with pytest.raises(kernels.KernelBuildError, match="failed on fold.c:\nfold.c:1: error: no OpenMP here"):
        kernels.build(str(fake))
    assert not any(p.name.startswith(".fold-") for p in fresh_build.iterdir()), "partial library left behind"
    assert os.environ.get("CC") != str(fake)
