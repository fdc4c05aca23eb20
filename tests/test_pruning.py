"""Masks applied to a model and undone, and held-out losses, against plain references.

`apply_masks` zeroes exactly the pruned elements and puts the dense weights back bit for
bit; `heldout_losses` (the LM head only on labelled positions) equals the token-sum loss
of the full logits on every family.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fisher_pipeline import apply_masks
from fisher_pipeline.data.samples import TokenizedSample
from fisher_pipeline.engine.loss import collate, per_sample_loss
from fisher_pipeline.errors import PhaseInputError
from fisher_pipeline.evaluation import heldout_losses
from fisher_pipeline.pruning import MASKS_FORMAT, MasksFile, mask_key, write_masks_file
from tiny_models import FAMILIES, VOCAB, build_tiny


def random_samples(n: int, seed: int, completion_only: bool = True) -> list[TokenizedSample]:
    """Samples of random length; some label only a completion (a prompt/completion task)."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        length = int(rng.integers(4, 30))
        mask = np.ones(length, dtype=bool)
        if completion_only and i % 2:
            mask[: int(rng.integers(1, length - 1))] = False
        mask[0] = False
        samples.append(TokenizedSample(f"s:{i}", torch.tensor(rng.integers(1, VOCAB, length)), torch.tensor(mask)))
    return samples


def reference_losses(model, samples) -> tuple[np.ndarray, np.ndarray]:
    """Batch-1 token-sum losses from the full logits."""
    losses, counts = [], []
    with torch.no_grad():
        for sample in samples:
            batch = collate([sample], pad_id=0)
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            losses.append(float(per_sample_loss(logits.double(), batch.input_ids, batch.label_mask)[0]))
            counts.append(int(batch.label_mask[0, 1:].sum()))
    return np.array(losses), np.array(counts)


@pytest.mark.parametrize("family", FAMILIES)
def test_heldout_losses_equal_full_logits_loss(family):
    model = build_tiny(family)
    samples = random_samples(7, seed=1)
    losses, counts = heldout_losses(model, samples, pad_id=0, batch_size=3)
    expected, expected_counts = reference_losses(model, samples)
    np.testing.assert_array_equal(counts.numpy(), expected_counts)
    np.testing.assert_allclose(losses.numpy(), expected, rtol=2e-5, err_msg=family)


def random_masks(model, seed: int, density: float = 0.6) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.random(tuple(p.shape)) < density for name, p in model.named_parameters() if "layers" in name
            or ".h." in name}


def test_apply_masks_zeroes_pruned_elements_and_restores_bit_for_bit():
    model = build_tiny("llama")
    dense = {name: p.detach().clone() for name, p in model.named_parameters()}
    for seed in range(3):
        masks = random_masks(model, seed)
        with apply_masks(model, masks):
            for name, p in model.named_parameters():
                if name in masks:
                    keep = torch.from_numpy(masks[name])
                    assert torch.equal(p[keep], dense[name][keep]) and not p[~keep].any(), name
                else:
                    assert torch.equal(p, dense[name]), name
        for name, p in model.named_parameters():
            assert torch.equal(p, dense[name]), f"{name} not restored after masks {seed}"


def test_apply_masks_from_file_and_its_errors(tmp_path):
    model = build_tiny("llama")
    masks = random_masks(model, 0)
    tensors = {mask_key(c, s, p): m for c in ("saliency", "random") for s in ("0.5",) for p, m in masks.items()}
    path = write_masks_file(tensors, tmp_path / "masks.safetensors",
                            {"format": MASKS_FORMAT, "criterion": "saliency", "criteria": ["saliency", "random"],
                             "sparsities": ["0.5"], "params": sorted(masks)})
    file = MasksFile(tmp_path)  # the folder is enough
    assert file.criteria == ["saliency", "random"] and file.sparsities == ["0.5"]
    applied = apply_masks(model, path)  # default criterion, the only sparsity; left applied
    name = sorted(masks)[0]
    assert not dict(model.named_parameters())[name][torch.from_numpy(~masks[name])].any()
    applied.restore()
    with pytest.raises(PhaseInputError, match=r"has no mask 'fisher/0.5/.*it holds criteria \['saliency', 'random'\]"):
        apply_masks(model, path, "fisher", 0.5)
    with pytest.raises(PhaseInputError, match=r"name parameter 'nope.weight'.*another model"):
        apply_masks(model, {"nope.weight": np.ones(3, bool)})
    with pytest.raises(PhaseInputError, match=r"mask of .* has shape \(2, 2\).*another model"):
        apply_masks(model, {name: np.ones((2, 2), bool)})
    with pytest.raises(PhaseInputError, match=r"no masks file at .*run phase 3"):
        MasksFile(tmp_path / "missing")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(PhaseInputError, match=r"is not a masks file from phase 3"):
        MasksFile(tmp_path / "bad.safetensors")


def test_masks_file_is_readable_like_any_output(tmp_path):
    import os

    path = write_masks_file({"c/0.5/w": np.ones(3, bool)}, tmp_path / "m.safetensors", {"format": MASKS_FORMAT})
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_masks_file_bytes_depend_only_on_masks_and_settings(tmp_path):
    """The same masks and settings give the same file, byte for byte, however often they are
    written (safetensors writes several metadata keys in hash-map order, different each time:
    a SLURM run and a local run of one config gave different files); a file without our
    settings is refused with the step that writes one."""
    masks = {f"saliency/0.5/w{i}": np.arange(12).reshape(3, 4) % (i + 2) == 0 for i in range(3)}
    settings = {"format": MASKS_FORMAT, **{f"key_{letter}": letter * 3 for letter in "abcdefghij"}}
    written = [write_masks_file(masks, tmp_path / f"{k}.safetensors", settings).read_bytes() for k in range(6)]
    assert all(data == written[0] for data in written)
    assert MasksFile(tmp_path / "0.safetensors").metadata == settings
    from safetensors.numpy import save_file

    save_file({"saliency/0.5/w0": np.ones(3, bool)}, str(tmp_path / "other.safetensors"), metadata={"format": "x"})
    with pytest.raises(PhaseInputError, match=r"is not a fisher_pipeline.masks/3 file .*rerun phase 3"):
        MasksFile(tmp_path / "other.safetensors")

