"""Load a task: read its samples, choose them with the seed, tokenize them."""

from __future__ import annotations

import dataclasses
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..config import TaskConfig
from ..errors import TaskError
from .builtin import BUILTIN_TASKS
from .files import read_task_file
from .samples import TextSample, TokenizedSample, seeded_order

BUILTIN_PREFIX = "builtin:"
_MIN_TOKENS = 2  # one context token and one target at least


def load_task(task: TaskConfig, tokenizer: Any) -> list[TokenizedSample]:
    """The analysed samples of `task` (the first `n_samples` usable ones); see `_load_ordered`."""
    return _load_ordered(task, tokenizer)


def load_heldout(task: TaskConfig, tokenizer: Any) -> list[TokenizedSample]:
    """The held-out samples of `task`: the `n_heldout` usable ones right after the analysed ones.

    They come from the same seeded order, so they are disjoint by id from `load_task`'s
    samples, and the analysed set is the same whatever `n_heldout` is. Fewer than
    `n_heldout` (a `UserWarning`) when the source runs out; none when `n_heldout` is 0.

    Raises:
        TaskError: as `load_task`, or the source holds no sample beyond the analysed ones.
    """
    if task.n_heldout == 0:
        return []
    wanted = task.n_samples + task.n_heldout
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        samples = _load_ordered(dataclasses.replace(task, n_samples=wanted), tokenizer)
    heldout = samples[task.n_samples:]
    if not heldout:
        raise TaskError(
            f"task '{task.name}': {task.source!r} has no usable sample beyond the {len(samples)} analysed ones, so "
            f"none is left for tasks.{task.name}.n_heldout = {task.n_heldout}: lower n_samples or add samples"
        )
    if len(heldout) < task.n_heldout or caught:
        warnings.warn(f"task '{task.name}': asked for {task.n_heldout} held-out samples but only {len(heldout)} "
                      f"are left after the {task.n_samples} analysed ones; using {len(heldout)}",
                      UserWarning, stacklevel=2)
    return heldout


def _load_ordered(task: TaskConfig, tokenizer: Any) -> list[TokenizedSample]:
    """The first `task.n_samples` usable samples of `task`, in their seeded selection order.

    Candidates are taken in an order fixed by `task.seed` and the first
    `task.n_samples` usable ones are kept, so the chosen set depends only on
    (source, seed, n_samples, max_length). Unusable candidates (empty, under two
    tokens, no labelled token left after truncation) are skipped.

    Args:
        task: which text, how many samples, how long, which seed.
        tokenizer: a HuggingFace tokenizer (called as `tokenizer(text, add_special_tokens=...)`).

    Returns:
        Up to `task.n_samples` samples; fewer (with a `UserWarning`) when the source
        does not hold enough usable ones.

    Raises:
        TaskError: unknown built-in, missing or empty file, malformed content,
            duplicate ids, or no usable sample at all.
    """
    if task.source.startswith(BUILTIN_PREFIX):
        fetch, limit = _builtin_fetch(task), max(4 * task.n_samples, task.n_samples + 256)
    else:
        samples = read_task_file(task, _task_path(task))
        _check_unique_ids(task, samples)
        ordered = [samples[i] for i in seeded_order([s.id for s in samples], task.seed)]
        fetch, limit = (lambda m: ordered[:m]), len(ordered)
    kept, dropped, n_seen = _select(task, tokenizer, fetch, limit)
    if not kept:
        raise TaskError(
            f"task '{task.name}': source {task.source!r} has no usable sample ({_describe(dropped)} "
            f"among {n_seen}); a sample needs at least {_MIN_TOKENS} tokens and a labelled token "
            f"within max_length={task.max_length}"
        )
    if len(kept) < task.n_samples:
        warnings.warn(
            f"task '{task.name}': asked for {task.n_samples} samples but {task.source!r} has only "
            f"{len(kept)} usable{f' ({_describe(dropped)})' if dropped else ''}; using {len(kept)}",
            UserWarning,
            stacklevel=2,
        )
    return kept


def _builtin_fetch(task: TaskConfig) -> Callable[[int], list[TextSample]]:
    """`m -> first m candidates` of the built-in task named in `task.source`."""
    name = task.source[len(BUILTIN_PREFIX) :]
    if name not in BUILTIN_TASKS:
        raise TaskError(
            f"tasks.{task.name}.source = {task.source!r}: unknown built-in task {name!r}; "
            f"built-ins: {', '.join(BUILTIN_PREFIX + n for n in BUILTIN_TASKS)}"
        )
    return lambda m: BUILTIN_TASKS[name](m, task.seed)


def _task_path(task: TaskConfig) -> Path:
    """The existing file named by `task.source`."""
    path = Path(task.source).expanduser()
    if not path.exists():
        raise TaskError(
            f"task '{task.name}': task file {path} does not exist (relative paths start at "
            f"{Path.cwd()}); fix tasks.{task.name}.source or use a built-in such as 'builtin:prose'"
        )
    if not path.is_file():
        raise TaskError(
            f"task '{task.name}': {path} is not a file; tasks.{task.name}.source must name a file"
        )
    return path


def _select(
    task: TaskConfig, tokenizer: Any, fetch: Callable[[int], list[TextSample]], limit: int
) -> tuple[list[TokenizedSample], Counter, int]:
    """First `task.n_samples` usable candidates, the drop reasons, and candidates seen.

    `fetch(m)` returns the first `m` candidates (a prefix of any longer fetch); it is
    asked for more, up to `limit`, while too many candidates turn out unusable.
    """
    kept: list[TokenizedSample] = []
    dropped: Counter = Counter()
    request, n_seen = min(task.n_samples, limit), 0
    while True:
        candidates = fetch(request)
        _check_unique_ids(task, candidates)
        for sample in candidates[n_seen:]:
            n_seen += 1
            result = tokenize_sample(sample, tokenizer, task.max_length)
            if isinstance(result, str):
                dropped[result] += 1
                continue
            kept.append(result)
            if len(kept) == task.n_samples:
                return kept, dropped, n_seen
        if len(candidates) < request or request >= limit:  # source exhausted, or searched enough
            return kept, dropped, n_seen
        request = min(4 * request, limit)


def tokenize_sample(sample: TextSample, tokenizer: Any, max_length: int) -> TokenizedSample | str:
    """`sample` tokenized and truncated to `max_length`, or why it cannot be used.

    Plain text: every token but the first is labelled. Prompt/completion: prompt ids
    (with the tokenizer's special tokens) then completion ids (without), and only the
    completion positions are labelled; the two strings are joined as given.
    """
    if sample.is_pair:
        if not sample.completion.strip():
            return "empty completion"
        prompt_ids = list(tokenizer(sample.prompt, add_special_tokens=True)["input_ids"])
        completion_ids = list(tokenizer(sample.completion, add_special_tokens=False)["input_ids"])
        ids = (prompt_ids + completion_ids)[:max_length]
        mask = ([False] * len(prompt_ids) + [True] * len(completion_ids))[:max_length]
    else:
        if not sample.text.strip():
            return "empty text"
        ids = list(tokenizer(sample.text, add_special_tokens=True)["input_ids"])[:max_length]
        mask = [True] * len(ids)
    if len(ids) < _MIN_TOKENS:
        return f"fewer than {_MIN_TOKENS} tokens"
    mask[0] = False  # no token precedes position 0, so nothing predicts it
    if not any(mask):
        return "no completion token within max_length"
    return TokenizedSample(
        id=sample.id,
        input_ids=torch.tensor(ids, dtype=torch.int64),
        label_mask=torch.tensor(mask, dtype=torch.bool),
    )


def _check_unique_ids(task: TaskConfig, samples: list[TextSample]) -> None:
    """Raise `TaskError` naming the first id that occurs twice."""
    seen: set[str] = set()
    for sample in samples:
        if sample.id in seen:
            raise TaskError(
                f"task '{task.name}': duplicate sample id {sample.id!r} in {task.source!r}; "
                "ids must be unique"
            )
        seen.add(sample.id)


def _describe(dropped: Counter) -> str:
    """'3 empty text, 1 fewer than 2 tokens' from drop reasons."""
    ranked = sorted(dropped.items(), key=lambda item: (-item[1], item[0]))
    return ", ".join(f"{count} {reason}" for reason, count in ranked)
