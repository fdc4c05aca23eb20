"""Task data: built-in and user text, chosen by seed and tokenized for causal LMs."""

from .builtin import BUILTIN_TASKS
from .samples import TextSample, TokenizedSample
from .tasks import load_task

__all__ = ["BUILTIN_TASKS", "TextSample", "TokenizedSample", "load_task"]
