"""Pruning masks on disk and on a model: read phase 3's `masks.safetensors`, apply, undo.

The file holds one boolean tensor per (criterion, sparsity, parameter), named
`{criterion}/{sparsity}/{param}` (True = kept; `sparsity` as phase 3 names it, e.g.
`0.25`), and its settings as one JSON object in the safetensors metadata, under the key
`fisher_pipeline.masks` (one key: safetensors writes its metadata in hash-map order, so
several keys would give a different file, byte for byte, on every write).
Parameters are named as in `model.named_parameters()`; a parameter with no mask in the
file is left as it is.

    from fisher_pipeline import apply_masks
    with apply_masks(model, "results/masks/prose/masks.safetensors", "saliency", 0.5):
        logits = model(input_ids).logits        # the pruned model
    # the dense weights are back, bit for bit

`apply_masks` without `with` leaves the masks applied (`.restore()` undoes them).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import save_file
from torch import nn

from .errors import PhaseInputError

MASKS_FORMAT = "fisher_pipeline.masks/3"  # 3: safetensors, one file, criterion/sparsity/param keys
METADATA_KEY = "fisher_pipeline.masks"  # the settings, one JSON object


def sparsity_key(sparsity: float) -> str:
    """The name a sparsity is stored under (`0.5`, `0.25`): 6 significant digits."""
    return f"{float(sparsity):g}"


def mask_key(criterion: str, sparsity: float | str, param: str) -> str:
    """The tensor name of one mask in `masks.safetensors`."""
    key = sparsity if isinstance(sparsity, str) else sparsity_key(sparsity)
    return f"{criterion}/{key}/{param}"


def write_masks_file(masks: Mapping[str, np.ndarray], path: str | os.PathLike, metadata: Mapping[str, object]) -> Path:
    """Write boolean `masks` (tensor name -> array) and `metadata` (one JSON object, sorted keys):
    the same masks and settings give the same bytes."""
    path = Path(path)
    text = {METADATA_KEY: json.dumps(dict(metadata), sort_keys=True)}
    save_file({k: np.ascontiguousarray(v, dtype=bool) for k, v in masks.items()}, str(path), metadata=text)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)  # safetensors creates the file readable by its owner only
    return path


class MasksFile:
    """A `masks.safetensors` opened lazily: settings from its metadata, masks read one by one."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if self.path.is_dir():
            self.path = self.path / "masks.safetensors"
        if not self.path.is_file():
            raise PhaseInputError(f"no masks file at {self.path}: run phase 3 (`masks`) for this task first")
        try:
            self._file = safe_open(str(self.path), framework="numpy")
            raw = self._file.metadata() or {}
        except Exception as err:  # safetensors raises its own error types for damaged headers
            raise PhaseInputError(f"{self.path} is not a masks file from phase 3 ({err})") from None
        self.metadata = _decode(raw.get(METADATA_KEY, "{}"))
        if self.metadata.get("format") != MASKS_FORMAT:
            raise PhaseInputError(f"{self.path} is not a {MASKS_FORMAT} file (format "
                                  f"{self.metadata.get('format')!r}): rerun phase 3 (`masks`)")
        self._keys = set(self._file.keys())

    @property
    def criteria(self) -> list[str]:
        return list(self.metadata["criteria"])

    @property
    def sparsities(self) -> list[str]:
        """Sparsity names, as stored (`0.25`)."""
        return list(self.metadata["sparsities"])

    @property
    def params(self) -> list[str]:
        """Masked parameters, by name."""
        return list(self.metadata["params"])

    def read(self, criterion: str, sparsity: float | str, param: str) -> np.ndarray:
        """One mask (bool, the parameter's shape)."""
        key = mask_key(criterion, sparsity, param)
        if key not in self._keys:
            raise PhaseInputError(
                f"{self.path} has no mask {key!r}: it holds criteria {self.criteria} at sparsities "
                f"{self.sparsities}; rerun phase 3 with that criterion and sparsity"
            )
        return self._file.get_tensor(key)

    def masks(self, criterion: str, sparsity: float | str) -> dict[str, np.ndarray]:
        """Every parameter's mask for one criterion and sparsity."""
        return {param: self.read(criterion, sparsity, param) for param in self.params}


class AppliedMasks:
    """Masks applied in place to a model's parameters; `restore()` puts the dense weights back.

    The original values of every masked parameter are kept (a copy of those parameters
    only), so restoring is exact, bit for bit. Usable as a context manager.
    """

    def __init__(self, originals: dict[str, tuple[nn.Parameter, torch.Tensor]]):
        self._originals = originals

    def restore(self) -> None:
        with torch.no_grad():
            for param, original in self._originals.values():
                param.copy_(original)
        self._originals = {}

    def __enter__(self) -> AppliedMasks:
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def apply_masks(model: nn.Module, masks: str | os.PathLike | Mapping[str, np.ndarray | torch.Tensor],
                criterion: str | None = None, sparsity: float | str | None = None) -> AppliedMasks:
    """Zero the pruned elements of `model`'s parameters in place.

    Args:
        model: the model whose `named_parameters()` the masks name.
        masks: a `masks.safetensors` path (or its folder), or parameter name -> bool mask.
        criterion, sparsity: which masks of the file (default: the file's default criterion;
            a file with one sparsity needs none).

    Returns:
        the applied masks; `.restore()` (or leaving a `with` block) undoes them exactly.

    Raises:
        PhaseInputError: unknown criterion / sparsity, a parameter the model lacks, or a shape mismatch.
    """
    if not isinstance(masks, Mapping):
        file = MasksFile(masks)
        criterion = criterion or file.metadata["criterion"]
        if sparsity is None:
            if len(file.sparsities) != 1:
                raise PhaseInputError(f"{file.path} holds sparsities {file.sparsities}: name one (sparsity=...)")
            sparsity = file.sparsities[0]
        masks = file.masks(criterion, sparsity)
    params = dict(model.named_parameters())
    originals: dict[str, tuple[nn.Parameter, torch.Tensor]] = {}
    applied = AppliedMasks(originals)
    with torch.no_grad():
        for name, mask in masks.items():
            param = params.get(name)
            if param is None:
                applied.restore()
                raise PhaseInputError(f"the masks name parameter {name!r}, which {type(model).__name__} does not "
                                      "have: were they made for another model?")
            keep = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask)
            if tuple(keep.shape) != tuple(param.shape):
                applied.restore()
                raise PhaseInputError(f"mask of {name} has shape {tuple(keep.shape)}, the parameter "
                                      f"{tuple(param.shape)}: were the masks made for another model?")
            originals[name] = (param, param.detach().clone())
            param.masked_fill_(~keep.to(device=param.device, dtype=torch.bool), 0.0)
    return applied


def _decode(value: str) -> dict:
    try:
        decoded = json.loads(value)
    except json.JSONDecodeError:
        return {}
    return decoded if isinstance(decoded, dict) else {}
