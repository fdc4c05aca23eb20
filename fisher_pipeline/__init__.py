"""fisher_pipeline: diagonal Fisher information and per-sample gradients of language models."""

__version__ = "0.1.0"
