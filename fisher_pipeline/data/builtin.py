"""Built-in tasks: arithmetic word problems, stdlib source code, Python documentation prose.

Every task is a function `(n, seed) -> list[TextSample]` returning up to `n` samples,
deterministic for a seed. The list for `n` is always a prefix of the list for any larger
`n`, so a caller short of usable samples can ask for more without changing the ones it
already has. Code and prose come from text that ships with Python itself, so no
download is needed and the text is real, not written for this package.
"""

from __future__ import annotations

import ast
import os
import random
import re
import sysconfig
import textwrap
import warnings
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path

from .samples import TextSample, seeded_order

# ---------------------------------------------------------------- arithmetic

_NAMES = ("Ada", "Ben", "Chloe", "Dev", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kemi", "Liam")
_ITEMS = (
    "apples", "books", "marbles", "stamps", "pencils", "cookies", "shells", "coins", "stickers", "cards",
)
_CONTAINERS = ("box", "bag", "crate", "jar", "basket", "shelf")


def _add(rng: random.Random) -> tuple[str, list[str], int]:
    name, other, item = rng.choice(_NAMES), rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    question = f"{name} has {a} {item}. {other} gives {name} {b} more. How many {item} does {name} have now?"
    return question, [f"{a} + {b} = {a + b}."], a + b


def _subtract(rng: random.Random) -> tuple[str, list[str], int]:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a = rng.randint(10, 200)
    b = rng.randint(1, a - 1)
    question = f"{name} had {a} {item} and gave away {b} of them. How many {item} are left?"
    return question, [f"{a} - {b} = {a - b}."], a - b


def _multiply(rng: random.Random) -> tuple[str, list[str], int]:
    item, box = rng.choice(_ITEMS), rng.choice(_CONTAINERS)
    a, b = rng.randint(2, 25), rng.randint(2, 25)
    question = f"Each {box} holds {a} {item}. How many {item} are in {b} such {box}s?"
    return question, [f"{b} * {a} = {a * b}."], a * b


def _buy_and_give(rng: random.Random) -> tuple[str, list[str], int]:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    packs, per_pack = rng.randint(2, 12), rng.randint(2, 12)
    total = packs * per_pack
    given = rng.randint(1, total - 1)
    question = (
        f"{name} buys {packs} packs of {item} with {per_pack} {item} in each pack, "
        f"then gives {given} {item} to a friend. How many {item} does {name} keep?"
    )
    steps = [f"{name} buys {packs} * {per_pack} = {total} {item}.", f"{total} - {given} = {total - given}."]
    return question, steps, total - given


def _share_after_adding(rng: random.Random) -> tuple[str, list[str], int]:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    friends = rng.randint(2, 9)
    share = rng.randint(2, 20)
    found = rng.randint(1, friends * share - 1)
    had = friends * share - found
    question = (
        f"{name} has {had} {item} and finds {found} more. {name} shares them equally among "
        f"{friends} friends. How many {item} does each friend get?"
    )
    steps = [f"{had} + {found} = {had + found}.", f"{had + found} / {friends} = {share}."]
    return question, steps, share


def _expression(rng: random.Random) -> tuple[str, list[str], int]:
    a, b, c = rng.randint(2, 50), rng.randint(2, 12), rng.randint(2, 12)
    if rng.random() < 0.5:
        question = f"What is {a} + {b} * {c}?"
        steps = [f"First, {b} * {c} = {b * c}.", f"Then {a} + {b * c} = {a + b * c}."]
        return question, steps, a + b * c
    a += b  # keep a - b positive
    question = f"What is ({a} - {b}) * {c}?"
    steps = [f"First, {a} - {b} = {a - b}.", f"Then {a - b} * {c} = {(a - b) * c}."]
    return question, steps, (a - b) * c


def _three_steps(rng: random.Random) -> tuple[str, list[str], int]:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    start, per_day, days = rng.randint(5, 60), rng.randint(2, 15), rng.randint(2, 7)
    earned = per_day * days
    lost = rng.randint(1, start + earned - 1)
    question = (
        f"{name} starts with {start} {item}, collects {per_day} {item} a day for {days} days, "
        f"and then loses {lost}. How many {item} does {name} have?"
    )
    steps = [
        f"{name} collects {per_day} * {days} = {earned} {item}.",
        f"{start} + {earned} = {start + earned}.",
        f"{start + earned} - {lost} = {start + earned - lost}.",
    ]
    return question, steps, start + earned - lost


_PROBLEMS = (_add, _subtract, _multiply, _buy_and_give, _share_after_adding, _expression, _three_steps)


def arithmetic(n: int, seed: int) -> list[TextSample]:
    """`n` word problems (prompt) with worked answers (completion) drawn from `seed`."""
    rng = random.Random(seed)
    samples = []
    for k in range(n):
        question, steps, answer = rng.choice(_PROBLEMS)(rng)
        # Leading space: BPE vocabularies hold words with their preceding space.
        completion = " " + " ".join(steps) + f" The answer is {answer}."
        prompt = f"Question: {question}\nAnswer:"
        samples.append(TextSample(id=f"arithmetic:{seed}:{k}", prompt=prompt, completion=completion))
    return samples


# ---------------------------------------------------------------- code

_SKIPPED_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__", "lib-dynload"}
_MAX_FILE_BYTES = 200_000  # bigger files are mostly data tables and are slow to parse
_FUNCTIONS_PER_FILE = 3  # a cap, so samples spread over many modules
_CODE_CHARS = (200, 2000)


@lru_cache(maxsize=1)
def _stdlib_files() -> tuple[tuple[str, Path], ...]:
    """(module name, path) of the stdlib's own .py files, sorted by module name."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _SKIPPED_DIRS and not d.startswith("config-")]
        for file in files:
            path = Path(folder, file)
            if file.endswith(".py") and path.stat().st_size <= _MAX_FILE_BYTES:
                parts = path.relative_to(root).with_suffix("").parts
                module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
                found.append((module, path))
    return tuple(sorted(found))


def _functions(body: list[ast.stmt], prefix: str = "") -> Iterator[tuple[str, ast.AST]]:
    """(qualname, node) of functions defined directly in `body` or in its classes."""
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield prefix + node.name, node
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node.body, f"{prefix}{node.name}.")


def _module_functions(module: str, path: Path) -> list[TextSample]:
    """Functions of one stdlib file whose source has a reasonable length."""
    try:
        source = path.read_text(encoding="utf-8")
        with warnings.catch_warnings():  # old escape sequences in a few modules
            warnings.simplefilter("ignore")
            tree = ast.parse(source)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    lines = source.splitlines(keepends=True)
    samples, seen = [], set()
    for qualname, node in _functions(tree.body):
        if qualname in seen:  # property setters, overloads: keep the first, ids stay unique
            continue
        seen.add(qualname)
        # Slicing whole lines (decorators included) and dedenting gives what
        # ast.get_source_segment(padded=True) gives, without re-splitting the file per call.
        start = min([d.lineno for d in node.decorator_list] + [node.lineno])
        code = textwrap.dedent("".join(lines[start - 1 : node.end_lineno])).rstrip()
        if _CODE_CHARS[0] <= len(code) <= _CODE_CHARS[1]:
            samples.append(TextSample(id=f"code:{module}:{qualname}", text=code))
    return samples


def code(n: int, seed: int) -> list[TextSample]:
    """`n` function definitions from the Python standard library, chosen by `seed`.

    Files are visited in a seeded order and parsed only until `n` functions are found
    (parsing the whole stdlib takes many seconds); at most a few functions per file.
    """
    files = _stdlib_files()
    samples: list[TextSample] = []
    for index in seeded_order([module for module, _ in files], seed):
        if len(samples) >= n:
            break
        functions = _module_functions(*files[index])
        order = seeded_order([f.id for f in functions], seed)
        samples.extend(functions[i] for i in order[:_FUNCTIONS_PER_FILE])
    return samples[:n]


# ---------------------------------------------------------------- prose

_MIN_PROSE_CHARS = 200
_MIN_LETTER_FRACTION = 0.85  # letters and spaces; lower means grammar rules, tables, code


def _is_prose(paragraph: str) -> bool:
    """Whether a documentation paragraph reads as running text (not code, grammar, tables)."""
    if paragraph[:1].isspace() or paragraph.startswith((">>>", "*", "-", "+", "=")):
        return False
    flat = " ".join(paragraph.split())
    letters = sum(ch.isalpha() or ch == " " for ch in flat)
    return len(flat) >= _MIN_PROSE_CHARS and letters / len(flat) >= _MIN_LETTER_FRACTION and flat[-1] in ".:)"


@lru_cache(maxsize=1)
def _prose_paragraphs() -> tuple[TextSample, ...]:
    """Every prose paragraph of the bundled Python documentation topics."""
    from pydoc_data.topics import topics  # ~0.5 MB of text: import only when asked

    samples = []
    for topic in sorted(topics):
        for index, paragraph in enumerate(re.split(r"\n[ \t]*\n", topics[topic])):
            if _is_prose(paragraph):
                # Join the 70-column line wrapping back into running text.
                samples.append(TextSample(id=f"prose:{topic}:{index}", text=" ".join(paragraph.split())))
    return tuple(samples)


def prose(n: int, seed: int) -> list[TextSample]:
    """`n` paragraphs of the Python documentation, chosen by `seed`."""
    paragraphs = _prose_paragraphs()
    return [paragraphs[i] for i in seeded_order([p.id for p in paragraphs], seed)[:n]]


#: Built-in task name -> sample function `(n, seed) -> list[TextSample]`.
BUILTIN_TASKS: dict[str, Callable[[int, int], list[TextSample]]] = {
    "arithmetic": arithmetic,
    "code": code,
    "prose": prose,
}
