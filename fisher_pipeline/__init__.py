"""fisher_pipeline: diagonal Fisher information and per-sample gradients of language models."""

__version__ = "0.1.0"

__all__ = ["apply_masks", "__version__"]


def __getattr__(name: str):
    # Lazily: `import fisher_pipeline` stays light (no torch) for config checks and --help.
    if name == "apply_masks":
        from .pruning import apply_masks

        return apply_masks
    raise AttributeError(f"module 'fisher_pipeline' has no attribute {name!r}")
