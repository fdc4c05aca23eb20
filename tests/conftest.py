"""Shared test fixtures."""

from __future__ import annotations

import pytest

_TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Question: Ada has 12 apples. How many apples does Ada have now? Answer: The answer is 12.",
    "def add(a, b):\n    return a + b",
    "Fisher information measures how much a sample tells about the parameters of a model.",
    "Paragraphs of text, code and arithmetic: 1 + 2 = 3, 4 * 5 = 20, 9 - 7 = 2.",
]


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE tokenizer (vocab 300) trained in memory; prepends BOS `<s>` like Llama.

    Byte-level, so any text tokenizes without unknown tokens; the BOS makes
    `add_special_tokens` observable in tests.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_TRAINING_TEXT, trainer=trainer)
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", backend.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """Factory: a saved tiny random model of `family` (safetensors + the tiny tokenizer)."""
    from tiny_models import build_tiny

    made: dict[str, object] = {}

    def make(family: str = "llama"):
        if family not in made:
            path = tmp_path_factory.mktemp(f"model-{family}")
            model = build_tiny(family, attn_implementation="sdpa", vocab_size=len(tiny_tokenizer),
                               pad_token_id=tiny_tokenizer.pad_token_id)
            model.save_pretrained(path)
            tiny_tokenizer.save_pretrained(path)
            made[family] = path
        return made[family]

    return make


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_model_dir) -> dict:
    """A completed workflow run (`--cores 2`) on two tasks of a tiny Llama, shared by every test
    module that reads it (phases as rules, the sharded run's reference, the SLURM run's local
    reference): one run per session. Tests only read it or dry-run in it."""
    from test_workflow_phases import snakemake, write_config

    workdir = tmp_path_factory.mktemp("workflow")
    model = tiny_model_dir("llama")
    configfile = write_config(workdir / "tiny.yaml", model)
    snakemake(workdir, configfile, "--cores", "2")
    return {"workdir": workdir, "configfile": configfile, "model": model}

