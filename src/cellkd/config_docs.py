"""Render the workflow config's JSON schema as a per-key Markdown reference (``config/README.md``).

``schemas/config.schema.yaml`` is the single source of truth for the config keys, their types,
constraints, defaults and meaning. This module turns it into one section per top-level key, each
with a table of every key below it in dotted form (``segmentation.inference.tile``; items of an
array of objects as ``classes[].name``). Regenerate the reference after editing the schema::

    python -m cellkd.config_docs > config/README.md

``tests/test_config_docs.py`` fails when the committed file no longer matches the schema.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

DEFAULT_SCHEMA = Path(__file__).resolve().parents[2] / "schemas/config.schema.yaml"
"""The repository's config schema (used when ``--schema`` is not given)."""

COMMAND = "python -m cellkd.config_docs > config/README.md"
"""The command that regenerates ``config/README.md``."""

_INLINE_DEFAULT_MAX = 40
"""Defaults holding objects whose JSON is longer than this go in a YAML block below the table."""

_YAML_LINE_MAX = 110
"""Longest one-line flow-style item in a default's YAML block; longer items are written in block style."""

_Row = tuple[str, str, str, str]


def _code(text: str) -> str:
    """Inline code span that survives backticks inside ``text``."""
    fence = "``" if "`" in text else "`"
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _cell(text: str) -> str:
    """One-line table cell text: whitespace collapsed, ``|`` escaped."""
    return " ".join(text.split()).replace("|", "\\|")


def _scalar(value: Any) -> str:
    """An enum/bound value as plain text: strings bare, everything else as JSON (``null``, ``true``, ``0.5``)."""
    return value if isinstance(value, str) else json.dumps(value)


def _types(node: Mapping[str, Any]) -> list[str]:
    declared = node.get("type")
    if declared is None:
        return []
    return [declared] if isinstance(declared, str) else list(declared)


def _one_sided(low: Any, high: Any, at_least: str = "≥", at_most: str = "≤") -> str:
    """``≥ low`` when only ``low`` is set, ``≤ high`` when only ``high`` is; ``""`` when neither is."""
    if low is not None:
        return f"{at_least} {low}"
    if high is not None:
        return f"{at_most} {high}"
    return ""


def _number_range(node: Mapping[str, Any]) -> str:
    """``≥ 1``, ``< 1``, ``in (0, 1]`` from minimum/maximum and their exclusive forms; ``""`` if unbounded."""
    low, low_open = node.get("minimum"), False
    if "exclusiveMinimum" in node:
        low, low_open = node["exclusiveMinimum"], True
    high, high_open = node.get("maximum"), False
    if "exclusiveMaximum" in node:
        high, high_open = node["exclusiveMaximum"], True
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{_scalar(low)}, {_scalar(high)}{')' if high_open else ']'}"
    return _one_sided(
        None if low is None else _scalar(low),
        None if high is None else _scalar(high),
        ">" if low_open else "≥",
        "<" if high_open else "≤",
    )


def _count(low: int | None, high: int | None, noun: str) -> str:
    """``3 items``, ``≥ 1 item``, ``2–5 items``; ``""`` when neither bound is set."""
    plural = noun if high == 1 or (high is None and low == 1) else f"{noun}s"
    if low is not None and low == high:
        return f"{low} {plural}"
    if low is not None and high is not None:
        return f"{low}–{high} {plural}"
    bound = _one_sided(low, high)
    return f"{bound} {plural}" if bound else ""


def _string_constraints(node: Mapping[str, Any]) -> list[str]:
    parts = []
    low, high = node.get("minLength"), node.get("maxLength")
    if low == 1 and high is None:
        parts.append("non-empty")
    elif low is not None or high is not None:
        parts.append(_count(low, high, "character"))
    if "pattern" in node:
        parts.append(f"matching {_code(node['pattern'])}")
    return parts


def _array_constraints(node: Mapping[str, Any]) -> list[str]:
    parts = []
    count = _count(node.get("minItems"), node.get("maxItems"), "item")
    if count:
        parts.append(count)
    if node.get("uniqueItems"):
        parts.append("unique")
    return parts


def _describe_one(name: str, node: Mapping[str, Any]) -> str:
    """One JSON type with the constraints that apply to it, e.g. ``integer ≥ 1`` or ``array of string, 3 items``."""
    if name in ("integer", "number"):
        bounds = _number_range(node)
        return f"{name} {bounds}" if bounds else name
    if name == "string":
        return ", ".join([name, *_string_constraints(node)])
    if name == "array":
        items = node.get("items")
        head = "array"
        if isinstance(items, Mapping):
            inner = describe_type(items)
            head = f"array of ({inner})" if " " in inner else f"array of {inner}"
        return ", ".join([head, *_array_constraints(node)])
    return name


def describe_type(node: Mapping[str, Any]) -> str:
    """Compact type of a schema node: JSON type plus constraints (``number in (0, 1]``, ``one of raw, macenko``)."""
    if "const" in node:
        return f"= {_scalar(node['const'])}"
    if "enum" in node:
        return "one of " + ", ".join(_scalar(v) for v in node["enum"])
    for keyword in ("oneOf", "anyOf"):
        if keyword in node:
            return " or ".join(describe_type(sub) for sub in node[keyword])
    types = _types(node)
    if not types:
        if "properties" in node:
            return "object"
        if "items" in node:
            return _describe_one("array", node)
        return "any"
    described = [_describe_one(t, node) for t in types if t != "null"]
    if "null" in types:
        described.append("null")
    return " or ".join(described)


def _is_object(node: Mapping[str, Any]) -> bool:
    return "properties" in node or "object" in _types(node)


def _object_items(node: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The item schema of an array of objects, or ``None``."""
    items = node.get("items")
    if isinstance(items, Mapping) and ("array" in _types(node) or not _types(node)) and _is_object(items):
        return items
    return None


def _has_objects(value: Any) -> bool:
    if isinstance(value, Mapping):
        return True
    return isinstance(value, list) and any(_has_objects(v) for v in value)


def _default_is_block(value: Any) -> bool:
    return _has_objects(value) and len(json.dumps(value)) > _INLINE_DEFAULT_MAX


def _walk(path: str, node: Mapping[str, Any], required: bool, blocks: list[tuple[str, Any]]) -> Iterator[_Row]:
    """The row of ``node`` (type, default, description) followed by the rows of every key below it."""
    kind = describe_type(node)
    if required:
        kind += " (required)"
    if "default" not in node:
        default = "—"
    elif _default_is_block(node["default"]):
        default = "see below"
        blocks.append((path, node["default"]))
    else:
        default = _code(json.dumps(node["default"]))
    yield path, kind, default, node.get("description", "")
    yield from _children(path, node, blocks)


def _children(path: str, node: Mapping[str, Any], blocks: list[tuple[str, Any]]) -> Iterator[_Row]:
    """Rows for the properties of an object node, or of the items of an array of objects."""
    items = _object_items(node)
    if items is not None:
        yield from _children(f"{path}[]", items, blocks)
        return
    required = set(node.get("required", ()))
    for key, child in node.get("properties", {}).items():
        yield from _walk(f"{path}.{key}", child, key in required, blocks)


def _yaml_block(value: Any) -> str:
    """Fenced YAML of a default; a list gets one flow-style item per line (as in workflow_config.yaml) if they fit."""
    text = yaml.safe_dump(value, default_flow_style=None, sort_keys=False, allow_unicode=True).rstrip("\n")
    if isinstance(value, list):
        flow = [
            "- "
            + yaml.safe_dump(item, default_flow_style=True, sort_keys=False, allow_unicode=True, width=1000).strip()
            for item in value
        ]
        if all(len(line) <= _YAML_LINE_MAX and "\n" not in line for line in flow):
            text = "\n".join(flow)
    return f"```yaml\n{text}\n```"


def _section(key: str, node: Mapping[str, Any], required: bool) -> str:
    """``## `key``` with the key's table (and default blocks for long lists of objects)."""
    lines = [f"## {_code(key)}", ""]
    blocks: list[tuple[str, Any]] = []
    if _is_object(node):
        # An object's own row would only repeat the section: its description stands above the table instead.
        if node.get("description"):
            lines += [" ".join(node["description"].split()), ""]
        rows = list(_children(key, node, blocks))
    else:
        rows = list(_walk(key, node, required, blocks))
    if rows:
        lines += ["| key | type | default | description |", "| --- | --- | --- | --- |"]
        lines += [f"| {_cell(_code(p))} | {_cell(t)} | {_cell(d)} | {_cell(text)} |" for p, t, d, text in rows]
    for path, value in blocks:
        lines += ["", f"Default of {_code(path)}:", "", _yaml_block(value)]
    return "\n".join(lines)


def schema_markdown(schema: Mapping[str, Any]) -> str:
    """Markdown reference of a config JSON schema: one section and table per top-level key, in schema order."""
    properties: Mapping[str, Any] = schema.get("properties", {})
    required = set(schema.get("required", ()))
    intro = (
        "This file is generated from `schemas/config.schema.yaml` by "
        f"`{COMMAND}`; do not edit it by hand: edit the schema and regenerate it."
    )
    parts = ["# Configuration reference", "", intro, ""]
    if schema.get("description"):
        parts += [" ".join(schema["description"].split()), ""]
    usage = (
        "Keys are set in `workflow_config.yaml` (or with snakemake's `--config` / `--configfile`). "
        "A key that is left out takes the default shown; nested keys are written in dotted form "
        "(`a.b.c` is `c` inside `b` inside `a`) and `a[].b` is key `b` of every item of the list `a`."
    )
    if schema.get("additionalProperties") is False:
        usage += " Keys not listed here are rejected."
    parts += [usage, ""]
    if properties:
        parts += ["Sections: " + ", ".join(f"[{_code(k)}](#{k.lower()})" for k in properties), ""]
    for key, node in properties.items():
        parts += [_section(key, node, key in required), ""]
    return "\n".join(parts).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    """Print the Markdown reference of ``--schema`` (default: the repository's config schema) to stdout."""
    parser = argparse.ArgumentParser(prog="python -m cellkd.config_docs", description=__doc__.splitlines()[0])
    parser.add_argument("--schema", type=Path, default=DEFAULT_SCHEMA, help="config JSON schema (YAML)")
    args = parser.parse_args(argv)
    schema = yaml.safe_load(args.schema.read_text(encoding="utf-8"))
    text = schema_markdown(schema)
    stream = getattr(sys.stdout, "buffer", None)
    if stream is None:
        sys.stdout.write(text)
    else:  # UTF-8 whatever the locale: the reference uses ≥, ≤ and –.
        sys.stdout.flush()
        stream.write(text.encode("utf-8"))
        stream.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
