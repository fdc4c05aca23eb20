"""config/README.md's key tables, made from the config schema (the one place each key is described).

Each `## \\`section\\`` of config/README.md holds its table between the markers
`<!-- keys: section -->` and `<!-- /keys -->`; `python -m fisher_pipeline config-docs`
rewrites them from `config_schema()` (every key's default and `description`), and
`--check` fails where the page is not current (a test runs it). The prose around the
tables is written by hand.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .config_schema import config_schema, yaml_flow
from .errors import ConfigError

#: The page the tables are written into, relative to the repository root.
CONFIG_README = Path("config/README.md")
_BLOCK = re.compile(r"(<!-- keys: (\w+) -->\n)(.*?)(<!-- /keys -->)", flags=re.DOTALL)


def section_keys(schema: Mapping[str, Any], section: str) -> Mapping[str, Any]:
    """Key -> its schema, of one top-level section (a task's keys for `tasks`)."""
    node = schema["properties"][section]
    return (node["additionalProperties"] if section == "tasks" else node)["properties"]


def key_table(keys: Mapping[str, Mapping[str, Any]]) -> str:
    """The markdown table `| key | default | meaning |` of one section's keys, in schema order."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for key, spec in keys.items():
        default = f"`{yaml_flow(spec['default'])}`" if "default" in spec else "(required)"
        meaning = " ".join(str(spec.get("description", "")).split()).replace("|", "\\|")
        if not meaning:
            raise ConfigError(f"config key {key!r} has no description in the schema: describe it there")
        rows.append(f"| `{key}` | {default} | {meaning} |")
    return "\n".join(rows) + "\n"


def render(text: str, schema: Mapping[str, Any] | None = None) -> str:
    """`text` (config/README.md) with every marked table rewritten from `schema`.

    Raises:
        ConfigError: a section of the schema has no marked table, or a marker names no section.
    """
    schema = schema or config_schema()
    sections = set(schema["properties"])
    seen = set()

    def table(match: re.Match) -> str:
        section = match.group(2)
        if section not in sections:
            raise ConfigError(f"{CONFIG_README}: <!-- keys: {section} --> names no config section")
        seen.add(section)
        return match.group(1) + key_table(section_keys(schema, section)) + match.group(4)

    rendered = _BLOCK.sub(table, text)
    missing = sorted(sections - seen)
    if missing:
        raise ConfigError(f"{CONFIG_README} has no table for section(s) {', '.join(missing)}: add a heading and "
                          f"the markers <!-- keys: NAME --> <!-- /keys --> for each")
    return rendered


def update(path: str | Path = CONFIG_README, check: bool = False) -> bool:
    """Rewrite the tables of `path` from the schema (or with `check`, only compare); return
    whether the file was current."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    rendered = render(text)
    if rendered != text and not check:
        staged = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        staged.write_text(rendered, encoding="utf-8")
        os.replace(staged, path)  # the page is whole at every instant
    return rendered == text
