"""A compiled one-pass fold of per-sample gradient chunks on the CPU (`fold.c`), and its build.

Part of phase 1's overhead over a plain backward is memory traffic: eager
torch reads each chunk of per-sample gradients `[b, r, c]` five times (sum over samples,
square, sum of squares, per-sample group sums, the float16 copy; with the parameter's
values, the per-sample group sums of `g * w` and `(g * w)^2` too) and each read comes
from L3 or DRAM. `fold.c` does all of it in one read of each row, with the row's running
sums in L1, and adds straight into the float64 state. Sums over a chunk's samples are
float32, as in the torch path; across chunks and micro-batches, float64.

The kernel is compiled on first use with the system C compiler (`$CC`, else `cc`) and
OpenMP, for this CPU (`-march=native`), into a per-user cache (`$FISHER_PIPELINE_CACHE`,
else `$XDG_CACHE_HOME/fisher_pipeline`, else `~/.cache/fisher_pipeline`) keyed by the
source, the compiler and the CPU, so nodes of a cluster sharing a home folder each get
their own build. It is loaded after torch, so it shares torch's OpenMP runtime (one
pool of threads, not two competing for the cores). Where no compiler works, `load()`
returns None with a logged reason and the accumulator uses torch operations: the same
statistics, slower (`fisher.fold_kernel: torch` forces that path).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path
from typing import NamedTuple

import torch

from ..scratch import Scratch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("fold.c")
# -fassociative-math vectorises the reductions; no -ffinite-math-only: non-finite rows must be seen.
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-fno-math-errno", "-fassociative-math",
         "-fno-signed-zeros", "-fno-trapping-math")

COPY_KINDS = {None: 0, torch.float32: 1, torch.float16: 2}
GROUP_NONE, GROUP_PER_ROW, GROUP_PER_COLUMN = 0, 1, 2


class KernelBuildError(RuntimeError):
    """The fold kernel could not be compiled or loaded."""


def cache_dir() -> Path:
    """Where compiled kernels are kept."""
    if os.environ.get("FISHER_PIPELINE_CACHE"):
        return Path(os.environ["FISHER_PIPELINE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fisher_pipeline"


def _cpu_identity() -> str:
    """The CPU's model and instruction-set flags (what `-march=native` compiles for)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine() + platform.processor()
    wanted = [line for line in lines if line.startswith(("model name", "flags", "Features", "CPU part"))]
    return "\n".join(dict.fromkeys(wanted))  # one copy per distinct line, not one per core


def build(compiler: str | None = None) -> Path:
    """Compile `fold.c` into the cache (if not there already); the path of the shared library.

    Raises:
        KernelBuildError: no compiler, or it failed (its message included).
    """
    compiler = compiler or os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        raise KernelBuildError(f"no C compiler {compiler!r} on PATH (set CC, or install gcc)")
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        raise KernelBuildError(f"{compiler} --version failed: {error}") from error
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, version.encode(), " ".join(FLAGS).encode(),
                                     _cpu_identity().encode()])).hexdigest()[:20]
    target = cache_dir() / f"fold-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Compile beside the target and rename: concurrent jobs each build, the last rename wins,
    # and nobody ever loads a half-written library.
    fd, partial = tempfile.mkstemp(prefix=".fold-", suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", partial], capture_output=True, text=True)
        if result.returncode != 0:
            raise KernelBuildError(f"{compiler} failed on {SOURCE.name}:\n{result.stderr.strip()}")
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


class Folded(NamedTuple):
    """What one `FoldKernel.fold` call gives back besides the state it added to.

    Attributes:
        skipped: rows left out of the state as non-finite.
        group: per-sample sums of `g^2` per row `[b, R]` or per column `[b, C]` (float64),
            or None without a group kind.
        gate, saliency: the same sums of `g * w` and `(g * w)^2`, or None without weights.
    """

    skipped: int
    group: torch.Tensor | None
    gate: torch.Tensor | None
    saliency: torch.Tensor | None


class FoldKernel:
    """The loaded `fold_chunk` of `fold.c` with reused scratch memory (not thread-safe)."""

    def __init__(self, library: Path):
        loaded = ctypes.CDLL(str(library))
        self._function = loaded.fold_chunk  # ctypes releases the GIL during the call
        self._column_blocks = loaded.column_blocks  # row blocks with their own column sums (not per thread)
        self._column_blocks.restype = ctypes.c_int64
        self._column_blocks.argtypes = [ctypes.c_int64, ctypes.c_int]
        self._function.restype = ctypes.c_int64
        self._function.argtypes = [
            ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,  # g, w, b, R, C
            ctypes.c_void_p, ctypes.c_void_p, ctypes.c_double,  # total_g, total_c, sign
            ctypes.c_void_p, ctypes.c_int64, ctypes.c_int,  # copy, copy_stride, copy_kind
            ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,  # group, gate, saliency, group_kind
            ctypes.c_void_p, ctypes.c_int,  # scratch, threads
        ]
        self._scratch = Scratch()
        self._group = Scratch()
        self._gate = Scratch()
        self._saliency = Scratch()

    def fold(self, grads: torch.Tensor, total_g: torch.Tensor | None, total_c: torch.Tensor | None,
             sign: float = 1.0, copy: torch.Tensor | None = None, group_kind: int = GROUP_NONE,
             weights: torch.Tensor | None = None) -> Folded:
        """One pass over `grads` `[b, R, C]` (float32, contiguous, CPU).

        Args:
            total_g, total_c: float64 `[R, C]` contiguous state rows (or both None: no fold);
                `+= sign * sum_i g_i` and `+= sign * sum_i g_i^2` for each row whose
                `g^2` summed over samples and columns is finite.
            copy: `[b, R, C]` float32/float16 view (rows contiguous) given a copy of `grads`.
            group_kind: GROUP_PER_ROW gives `[b, R]` sums of `g^2` over columns,
                GROUP_PER_COLUMN `[b, C]` sums over rows (float64; valid until the next call).
            weights: the parameter's values at these rows, `R * C` contiguous float32
                elements (needs a group kind): the same per-sample sums of `g * w` and
                `(g * w)^2` are given too.

        Returns:
            `Folded`: rows skipped as non-finite, and the per-sample group sums.
        """
        b, rows, columns = grads.shape
        if grads.dtype != torch.float32 or not grads.is_contiguous() or grads.device.type != "cpu":
            raise ValueError("the fold kernel takes a contiguous float32 CPU tensor [b, R, C]")
        if (total_g is None) != (total_c is None):
            raise ValueError("give both state tensors or neither")
        for state in (total_g, total_c):
            if state is not None and (state.dtype != torch.float64 or not state.is_contiguous()
                                      or state.numel() != rows * columns):
                raise ValueError(f"state rows must be contiguous float64 with {rows * columns} elements")
        if copy is not None and (copy.shape != grads.shape or copy.stride(2) != 1 or copy.dtype not in COPY_KINDS
                                 or (rows > 1 and copy.stride(1) != columns)):
            raise ValueError("the copy must be a float32/float16 [b, R, C] view with contiguous rows")
        if weights is not None:
            if group_kind == GROUP_NONE:
                raise ValueError("weights give per-sample group sums: they need a group kind")
            if (weights.dtype != torch.float32 or not weights.is_contiguous() or weights.device.type != "cpu"
                    or weights.numel() != rows * columns):
                raise ValueError(f"the weights must be {rows * columns} contiguous float32 CPU elements")
        threads = torch.get_num_threads()
        outputs: list[torch.Tensor | None] = [None, None, None]
        if group_kind != GROUP_NONE:
            width = rows if group_kind == GROUP_PER_ROW else columns
            wanted = (self._group, self._gate, self._saliency) if weights is not None else (self._group,)
            for k, scratch in enumerate(wanted):
                outputs[k] = scratch.view(b, width, like=_FLOAT64)
        parts = 3 if weights is not None else 1
        blocks = self._column_blocks(rows, group_kind)
        scratch = self._scratch.view(threads * 2 * columns + blocks * parts * b * columns)  # float32
        group, gate, saliency = outputs
        skipped = self._function(
            grads.data_ptr(), weights.data_ptr() if weights is not None else None, b, rows, columns,
            total_g.data_ptr() if total_g is not None else None,
            total_c.data_ptr() if total_c is not None else None, float(sign),
            copy.data_ptr() if copy is not None else None, copy.stride(0) if copy is not None else 0,
            COPY_KINDS[copy.dtype if copy is not None else None],
            *(t.data_ptr() if t is not None else None for t in outputs), group_kind,
            scratch.data_ptr(), threads,
        )
        return Folded(int(skipped), group, gate, saliency)


_FLOAT64 = torch.empty(0, dtype=torch.float64)


@cache
def _library() -> Path | None:
    try:
        library = build()
        ctypes.CDLL(str(library))
        return library
    except (KernelBuildError, OSError) as error:
        log.warning("fold kernel unavailable, using torch operations (slower): %s", error)
        return None


def load() -> FoldKernel | None:
    """A kernel with its own scratch memory, built on first use; None (reason logged once) if it cannot be."""
    library = _library()
    return FoldKernel(library) if library is not None else None
