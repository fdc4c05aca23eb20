"""Phase 6's score interval: the first-order bootstrap it reports against the full bootstrap of the pair matrix.

    .venv/bin/python benchmarks/qkov_interval.py                       # the default run's stores, arithmetic -> code
    .venv/bin/python benchmarks/qkov_interval.py --stores DIR --task-a A --task-b B

Phase 6 never forms the unsigned score's pair matrix M: its interval resamples samples of
A and of B through M's row and column sums (`qkov.compute._score_interval`). Here M is
formed for every cell (float64, the phase's metric `1 / max(F_A, eps)`, mean over the
slice), and on the phase's own draws the 95% percentile interval of the full bootstrap
`c^T M d / (N_A N_B)` is set beside the first-order one. Reported over cells: how far each
end moves, in units of the full interval's width, and the ratio of the widths.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from harness import ROOT


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stores", default=str(ROOT / "results" / "fisher"))
    parser.add_argument("--task-a", default="arithmetic")
    parser.add_argument("--task-b", default="code")
    parser.add_argument("--n-bootstrap", type=int, default=200, help="draws, as qkov.n_bootstrap")
    args = parser.parse_args()

    from fisher_pipeline.phases.qkov import QkovOptions
    from fisher_pipeline.phases.qkov.compute import _score_interval, qkov_cells
    from fisher_pipeline.sample_pairs import pair_matrices
    from fisher_pipeline.store import FisherStore

    options = QkovOptions(n_bootstrap=args.n_bootstrap)
    store_a = FisherStore(Path(args.stores) / f"{args.task_a}.zarr")
    store_b = FisherStore(Path(args.stores) / f"{args.task_b}.zarr")
    cells = qkov_cells(store_a)
    params = dict.fromkeys(cell[0] for cell in cells)
    weights = {p: 1.0 / np.maximum(store_a.fisher(p).astype(np.float64), options.eps) for p in params}
    matrices = pair_matrices(store_a, store_b, cells, "square", "abs", weights, dtype="float64")
    n_a, n_b = store_a.n_samples, store_b.n_samples
    rng = np.random.default_rng(0)  # the phase's draws
    draws_a = rng.multinomial(n_a, np.full(n_a, 1 / n_a), size=options.n_bootstrap)
    draws_b = rng.multinomial(n_b, np.full(n_b, 1 / n_b), size=options.n_bootstrap)
    shifts, ratios = [], []
    for cell in cells:
        matrix = matrices[cell]
        ours = _score_interval(matrix.sum(1), matrix.sum(0), draws_a, draws_b)
        full = np.percentile(np.einsum("ri,ij,rj->r", draws_a, matrix, draws_b) / matrix.size, [2.5, 97.5])
        width = full[1] - full[0]
        shifts += [abs(ours["score_ci_low"] - full[0]) / width, abs(ours["score_ci_high"] - full[1]) / width]
        ratios.append((ours["score_ci_high"] - ours["score_ci_low"]) / width)
    shifts, ratios = np.array(shifts), np.array(ratios)
    print(f"{args.task_a} -> {args.task_b}: {len(cells)} cells, N = {n_a} x {n_b}, {options.n_bootstrap} draws")
    print(f"end shift / full width: median {np.median(shifts):.3f}, 90th percentile {np.percentile(shifts, 90):.3f}, "
          f"max {shifts.max():.3f}")
    print(f"width ratio (first order / full): median {np.median(ratios):.3f}, "
          f"5th-95th percentile {np.percentile(ratios, 5):.3f}-{np.percentile(ratios, 95):.3f}")


if __name__ == "__main__":
    main()
