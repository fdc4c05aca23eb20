"""Tests of fisher_pipeline.data: built-in tasks, task files, selection, tokenization, errors."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import torch

from fisher_pipeline.config import TaskConfig
from fisher_pipeline.data import BUILTIN_TASKS, TextSample, TokenizedSample, load_task
from fisher_pipeline.errors import ConfigError, TaskError


def task(source: str | Path, **options) -> TaskConfig:
    return TaskConfig(name="t", source=str(source), **options)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def by_id(samples: list[TokenizedSample]) -> dict[str, list[int]]:
    return {s.id: s.input_ids.tolist() for s in samples}


# ---------------------------------------------------------------- built-in tasks


@pytest.mark.parametrize("name", sorted(BUILTIN_TASKS))
def test_builtin_gives_n_unique_deterministic_samples(name):
    samples = BUILTIN_TASKS[name](12, 0)
    assert len(samples) == 12
    assert len({s.id for s in samples}) == 12
    assert all(s.id.startswith(f"{name}:") for s in samples)
    assert samples == BUILTIN_TASKS[name](12, 0)
    # Prefix property: asking for more never changes the first ones.
    assert BUILTIN_TASKS[name](5, 0) == samples[:5]
    other = BUILTIN_TASKS[name](12, 1)
    assert [(s.text, s.prompt) for s in other] != [(s.text, s.prompt) for s in samples]


@pytest.mark.parametrize("name", sorted(BUILTIN_TASKS))
def test_load_builtin_task(name, tiny_tokenizer):
    samples = load_task(task(f"builtin:{name}", n_samples=6, max_length=48), tiny_tokenizer)
    assert len(samples) == 6 and len({s.id for s in samples}) == 6
    assert all(s.input_ids.dtype == torch.int64 and s.label_mask.dtype == torch.bool for s in samples)
    assert all(len(s.input_ids) <= 48 and not s.label_mask[0] and s.n_tokens > 0 for s in samples)
    again = load_task(task(f"builtin:{name}", n_samples=6, max_length=48), tiny_tokenizer)
    assert by_id(again) == by_id(samples)


def test_arithmetic_label_mask_is_exactly_the_completion(tiny_tokenizer):
    raw = BUILTIN_TASKS["arithmetic"](10, 3)
    samples = load_task(task("builtin:arithmetic", n_samples=10, seed=3, max_length=1024), tiny_tokenizer)
    assert len(samples) == 10
    for text, sample in zip(raw, samples, strict=True):
        assert sample.id == text.id
        prompt_ids = tiny_tokenizer(text.prompt, add_special_tokens=True)["input_ids"]
        completion_ids = tiny_tokenizer(text.completion, add_special_tokens=False)["input_ids"]
        assert sample.input_ids[~sample.label_mask].tolist() == prompt_ids
        assert sample.input_ids[sample.label_mask].tolist() == completion_ids
        assert sample.label_mask.tolist() == [False] * len(prompt_ids) + [True] * len(completion_ids)


def test_arithmetic_worked_answers_are_correct():
    samples = BUILTIN_TASKS["arithmetic"](200, 7)
    ops = set()
    for s in samples:
        steps = re.findall(r"(\d+) ([-+*/]) (\d+) = (\d+)", s.completion)
        assert steps, s.completion
        for a, op, b, result in steps:
            ops.add(op)
            a, b = int(a), int(b)
            assert {"+": a + b, "-": a - b, "*": a * b, "/": a / b}[op] == int(result), s.completion
        assert s.completion.endswith(f"The answer is {steps[-1][3]}.")
    assert {"+", "-", "*"} <= ops
    assert any(len(re.findall(r" = ", s.completion)) >= 2 for s in samples)  # multi-step ones exist


def test_code_samples_are_stdlib_functions():
    for s in BUILTIN_TASKS["code"](10, 0):
        assert 200 <= len(s.text) <= 2000
        tree = ast.parse(s.text)
        assert isinstance(tree.body[0], (ast.FunctionDef, ast.AsyncFunctionDef))
        assert s.id.split(":")[-1].split(".")[-1] == tree.body[0].name


def test_prose_samples_are_documentation_paragraphs():
    from pydoc_data.topics import topics

    for s in BUILTIN_TASKS["prose"](10, 0):
        _, topic, _ = s.id.split(":")
        assert len(s.text) >= 200 and "\n" not in s.text
        assert s.text in " ".join(topics[topic].split())  # the paragraph, line wrapping undone


# ---------------------------------------------------------------- task files


def test_jsonl_text_and_pairs(tmp_path, tiny_tokenizer):
    path = tmp_path / "mix.jsonl"
    path.write_text(
        json.dumps({"text": "The quick brown fox jumps over the lazy dog."}) + "\n\n"
        + json.dumps({"prompt": "Question: 1 + 2?", "completion": " The answer is 3."}) + "\n"
        + json.dumps({"id": "named", "text": "Fisher information of a model."}) + "\n"
    )
    samples = {s.id: s for s in load_task(task(path, n_samples=3), tiny_tokenizer)}
    assert set(samples) == {"mix:1", "mix:3", "named"}  # line numbers count the blank line
    plain, pair = samples["mix:1"], samples["mix:3"]
    assert plain.label_mask.tolist() == [False] + [True] * (len(plain.input_ids) - 1)
    completion_ids = tiny_tokenizer(" The answer is 3.", add_special_tokens=False)["input_ids"]
    assert pair.n_tokens == len(completion_ids)
    assert pair.input_ids[pair.label_mask].tolist() == completion_ids


def test_text_file_paragraphs_and_chunks(tmp_path, tiny_tokenizer):
    long = " ".join(["word"] * 100)  # 499 chars > 4 * max_length = 64
    path = tmp_path / "notes.txt"
    path.write_text(f"First paragraph here.\nStill the first.\n\n   \n{long}\n\nLast one.\n")
    with pytest.warns(UserWarning, match="asked for 100 samples"):
        samples = load_task(task(path, n_samples=100, max_length=16), tiny_tokenizer)
    ids = {s.id for s in samples}
    assert {"notes:1:1", "notes:3:1"} <= ids
    pieces = sorted(i for i in ids if i.startswith("notes:2:"))
    assert len(pieces) >= 8  # 499 chars in pieces of at most 64
    assert all(len(s.input_ids) <= 16 for s in samples)


def test_csv_column_and_id_column(tmp_path, tiny_tokenizer):
    path = tmp_path / "table.csv"
    path.write_text('label,body\nx,"Hello, world, with a comma."\ny,Second row of text.\n')
    samples = load_task(task(path, column="body", n_samples=2), tiny_tokenizer)
    assert {s.id for s in samples} == {"table:1", "table:2"}
    hello = next(s for s in samples if s.id == "table:1")
    assert hello.input_ids.tolist() == tiny_tokenizer("Hello, world, with a comma.")["input_ids"]

    path.write_text("id,text\nalpha,Some text here.\nbeta,More text here.\n")
    assert {s.id for s in load_task(task(path, n_samples=2), tiny_tokenizer)} == {"alpha", "beta"}


def test_format_option_overrides_suffix(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "data.log", [{"text": "Some text here."}, {"text": "More text."}])
    assert len(load_task(task(path, format="jsonl", n_samples=2), tiny_tokenizer)) == 2


@pytest.mark.parametrize("fmt", ["jsonl", "text", "csv"])
def test_ids_survive_appending(fmt, tmp_path, tiny_tokenizer):
    lines = [f"Sample number {k} says something." for k in range(8)]
    path = tmp_path / {"jsonl": "a.jsonl", "text": "a.txt", "csv": "a.csv"}[fmt]

    def write(rows):
        if fmt == "jsonl":
            write_jsonl(path, [{"text": r} for r in rows])
        elif fmt == "text":
            path.write_text("\n\n".join(rows) + "\n")
        else:
            path.write_text("text\n" + "\n".join(rows) + "\n")

    write(lines)
    before = by_id(load_task(task(path, n_samples=8), tiny_tokenizer))
    write(lines + ["An appended sample."])
    after = by_id(load_task(task(path, n_samples=9), tiny_tokenizer))
    assert len(after) == 9 and all(after[i] == ids for i, ids in before.items())


def test_file_selection_is_seeded(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "many.jsonl", [{"text": f"Line {k} of the file."} for k in range(40)])
    first = [s.id for s in load_task(task(path, n_samples=10, seed=0), tiny_tokenizer)]
    assert first == [s.id for s in load_task(task(path, n_samples=10, seed=0), tiny_tokenizer)]
    assert first != [s.id for s in load_task(task(path, n_samples=10, seed=1), tiny_tokenizer)]
    assert first != [f"many:{k}" for k in range(1, 11)]  # shuffled, not file order
    # A larger n extends the selection instead of redrawing it.
    assert [s.id for s in load_task(task(path, n_samples=20, seed=0), tiny_tokenizer)][:10] == first


# ---------------------------------------------------------------- truncation and masks


def test_truncation_and_first_position_unlabelled(tmp_path, tiny_tokenizer):
    path = write_jsonl(
        tmp_path / "long.jsonl",
        [
            {"text": "The quick brown fox jumps over the lazy dog. " * 10},
            {"prompt": "Question: what is 2 + 2?", "completion": " Two plus two is four." * 10},
            {"prompt": "", "completion": "The answer is 4."},
        ],
    )
    samples = {s.id: s for s in load_task(task(path, n_samples=3, max_length=24), tiny_tokenizer)}
    assert all(len(s.input_ids) == len(s.label_mask) <= 24 and not s.label_mask[0] for s in samples.values())
    assert len(samples["long:1"].input_ids) == 24 and samples["long:1"].n_tokens == 23
    prompt_len = len(tiny_tokenizer("Question: what is 2 + 2?")["input_ids"])
    assert prompt_len < 24 and len(samples["long:2"].input_ids) == 24
    assert samples["long:2"].n_tokens == 24 - prompt_len
    completion_len = len(tiny_tokenizer("The answer is 4.", add_special_tokens=False)["input_ids"])
    assert samples["long:3"].label_mask.tolist() == [False] + [True] * completion_len  # BOS-only prompt
    # A prompt that fills max_length leaves nothing to label: dropped, with the reason.
    with pytest.warns(UserWarning, match=r"only 2 usable \(1 no completion token within max_length\)"):
        load_task(task(path, n_samples=3, max_length=prompt_len), tiny_tokenizer)


def test_tokenized_sample_rejects_labelled_first_position():
    with pytest.raises(ValueError, match=r"label_mask\[0\]"):
        TokenizedSample("x", torch.tensor([1, 2]), torch.tensor([True, True]))
    with pytest.raises(ValueError, match="either 'text' or both"):
        TextSample("x", prompt="only a prompt")


# ---------------------------------------------------------------- bad inputs


def test_missing_path(tmp_path, tiny_tokenizer):
    with pytest.raises(TaskError, match=r"nope\.jsonl does not exist.*tasks\.t\.source"):
        load_task(task(tmp_path / "nope.jsonl"), tiny_tokenizer)


@pytest.mark.parametrize("name, content", [("e.jsonl", ""), ("e.txt", "\n  \n"), ("e.csv", "text\n")])
def test_empty_file(name, content, tmp_path, tiny_tokenizer):
    (tmp_path / name).write_text(content)
    with pytest.raises(TaskError, match=rf"{re.escape(name)} is empty"):
        load_task(task(tmp_path / name), tiny_tokenizer)


def test_malformed_jsonl_line_is_named(tmp_path, tiny_tokenizer):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n\n{"text": "broken"\n')
    with pytest.raises(TaskError, match=r"bad\.jsonl line 3 is not valid JSON"):
        load_task(task(path), tiny_tokenizer)
    path.write_text('{"text": "fine"}\n{"prompt": "no completion"}\n')
    with pytest.raises(TaskError, match=r"line 2 has keys \['prompt'\].*both 'prompt' and 'completion'"):
        load_task(task(path), tiny_tokenizer)


def test_csv_missing_column(tmp_path, tiny_tokenizer):
    path = tmp_path / "t.csv"
    path.write_text("title,body\na,b\n")
    expected = r"no column 'text'; available columns: 'title', 'body'.*tasks\.t\.column"
    with pytest.raises(TaskError, match=expected):
        load_task(task(path), tiny_tokenizer)


def test_unknown_suffix(tmp_path, tiny_tokenizer):
    path = tmp_path / "data.xml"
    path.write_text("<a/>")
    with pytest.raises(TaskError, match=r"\.jsonl.*\.txt.*\.csv.*tasks\.t\.format"):
        load_task(task(path), tiny_tokenizer)


def test_unknown_builtin(tiny_tokenizer):
    expected = "unknown built-in task 'poetry'; built-ins: builtin:arithmetic, builtin:code, builtin:prose"
    with pytest.raises(TaskError, match=expected):
        load_task(task("builtin:poetry"), tiny_tokenizer)


def test_fewer_samples_than_asked_warns_and_uses_all(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "few.jsonl", [{"text": "Some text."}, {"text": ""}, {"text": "More text."}])
    expected = r"task 't': asked for 10 samples but .* only 2 usable \(1 empty text\)"
    with pytest.warns(UserWarning, match=expected):
        samples = load_task(task(path, n_samples=10), tiny_tokenizer)
    assert {s.id for s in samples} == {"few:1", "few:3"}


def test_no_usable_sample_is_an_error(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "useless.jsonl", [{"text": "   "}, {"text": ""}])
    with pytest.raises(TaskError, match=r"no usable sample \(2 empty texts? among 2\)"):
        load_task(task(path, max_length=2), tiny_tokenizer)
    with pytest.raises(ConfigError, match=r"tasks.t.max_length = 1: must be >= 2"):
        task(path, max_length=1)  # one token has no next token to predict
    expected = r"task 't': source 'builtin:arithmetic' has no usable sample.*completion token"
    with pytest.raises(TaskError, match=expected):
        load_task(task("builtin:arithmetic", n_samples=2, max_length=4), tiny_tokenizer)


def test_duplicate_ids(tmp_path, tiny_tokenizer, monkeypatch):
    records = [{"id": "a", "text": "One."}, {"id": "b", "text": "Two."}, {"id": "a", "text": "Three."}]
    path = write_jsonl(tmp_path / "dup.jsonl", records)
    with pytest.raises(TaskError, match=r"line 3: duplicate id 'a' \(also on line 1\)"):
        load_task(task(path), tiny_tokenizer)
    path = tmp_path / "dup.csv"
    path.write_text("id,text\nx,One.\nx,Two.\n")
    with pytest.raises(TaskError, match=r"duplicate id 'x'"):
        load_task(task(path), tiny_tokenizer)
    # Built-ins are checked too (a buggy generator must not slip through).
    monkeypatch.setitem(BUILTIN_TASKS, "twins", lambda n, seed: [TextSample("same", text="Some text.")] * n)
    with pytest.raises(TaskError, match=r"duplicate sample id 'same'"):
        load_task(task("builtin:twins", n_samples=2), tiny_tokenizer)


# ---------------------------------------------------------------- held-out samples


@pytest.mark.parametrize("source", ["builtin:arithmetic", "builtin:prose", "file"])
def test_heldout_follows_the_analysed_samples_disjoint_by_id(source, tmp_path, tiny_tokenizer):
    """Held-out samples are the next usable ones of the same seeded order: analysed + held-out
    equals a bigger analysed set, and `n_heldout` never changes the analysed set."""
    from fisher_pipeline.data.tasks import load_heldout

    if source == "file":
        source = write_jsonl(tmp_path / "t.jsonl", [{"text": f"sample number {i} says {i * 7}"} for i in range(30)])
    analysed = load_task(task(source, n_samples=6, seed=3), tiny_tokenizer)
    heldout = load_heldout(task(source, n_samples=6, n_heldout=5, seed=3), tiny_tokenizer)
    assert len(heldout) == 5
    assert not {s.id for s in analysed} & {s.id for s in heldout}
    together = load_task(task(source, n_samples=11, seed=3), tiny_tokenizer)
    assert by_id(together) == by_id(analysed) | by_id(heldout)
    assert [s.id for s in together] == [s.id for s in analysed + heldout]
    assert by_id(load_task(task(source, n_samples=6, n_heldout=0, seed=3), tiny_tokenizer)) == by_id(analysed)
    assert load_heldout(task(source, n_samples=6, n_heldout=0, seed=3), tiny_tokenizer) == []


def test_heldout_short_source_warns_or_fails(tmp_path, tiny_tokenizer):
    from fisher_pipeline.data.tasks import load_heldout

    path = write_jsonl(tmp_path / "t.jsonl", [{"text": f"sample number {i}"} for i in range(8)])
    with pytest.warns(UserWarning, match=r"asked for 5 held-out samples but only 3 are left after the 5 analysed"):
        assert len(load_heldout(task(path, n_samples=5, n_heldout=5), tiny_tokenizer)) == 3
    with pytest.raises(TaskError, match=r"no usable sample beyond the 8 analysed.*n_heldout = 2: lower n_samples"):
        load_heldout(task(path, n_samples=8, n_heldout=2), tiny_tokenizer)
