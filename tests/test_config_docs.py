"""The generated config reference (config/README.md) matches the schema and documents every key."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from cellkd.config_docs import main, schema_markdown

REPO = Path(__file__).resolve().parents[1]
SCHEMA_PATH = REPO / "schemas" / "config.schema.yaml"
README = REPO / "config" / "README.md"


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return yaml.safe_load(SCHEMA_PATH.read_text(encoding="utf-8"))


def _leaf_paths(node: Mapping[str, Any], prefix: str) -> Iterator[str]:
    """Every leaf key below ``node``: objects recurse as ``a.b``, arrays of objects as ``a[].b``."""
    if "properties" in node:
        for key, child in node["properties"].items():
            yield from _leaf_paths(child, f"{prefix}.{key}" if prefix else key)
    elif isinstance(node.get("items"), Mapping) and "properties" in node["items"]:
        yield from _leaf_paths(node["items"], f"{prefix}[]")
    else:
        yield prefix


def _nodes(node: Mapping[str, Any], prefix: str) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """Every key below ``node`` with its schema, named as the reference names it (``a.b``, ``a[].b``)."""
    for key, child in node.get("properties", {}).items():
        path = f"{prefix}.{key}" if prefix else key
        yield path, child
        yield from _nodes(child, path)
    items = node.get("items")
    if isinstance(items, Mapping) and "properties" in items:
        yield from _nodes(items, f"{prefix}[]")


def _default_cells(markdown: str) -> dict[str, str]:
    """Key path -> default cell of every table row of the reference."""
    cells = {}
    for line in markdown.splitlines():
        if line.startswith("| `"):
            path, _, default = line.split(" | ")[:3]
            cells[path.strip("| `")] = default
    return cells


def test_main_without_arguments_documents_the_repository_schema(
    schema: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([]) == 0
    assert capsys.readouterr().out == schema_markdown(schema)


def test_every_documented_default_is_the_schema_default(schema: dict[str, Any]) -> None:
    markdown = schema_markdown(schema)
    cells = _default_cells(markdown)
    checked = []
    for path, node in _nodes(schema, ""):
        if path not in cells or "default" not in node:
            continue
        if cells[path] == "see below":  # a long list of objects: a YAML block after the table
            block = markdown.split(f"Default of `{path}`:\n\n```yaml\n", 1)[1].split("\n```", 1)[0]
            shown = yaml.safe_load(block)
        else:
            shown = json.loads(cells[path].strip("`"))
        assert shown == node["default"], f"{path}: the reference shows {shown!r}, the schema sets {node['default']!r}"
        checked.append(path)
    # Guard the walk: scalars, nested keys, list items and the YAML block are all reached.
    assert {"seed", "segmentation.inference.tile", "classes[].color", "classes"} <= set(checked)


def test_committed_reference_is_up_to_date(schema: dict[str, Any]) -> None:
    expected = schema_markdown(schema)
    actual = README.read_text(encoding="utf-8") if README.is_file() else ""
    assert actual == expected, (
        "config/README.md is stale (or missing): regenerate it with `python -m cellkd.config_docs > config/README.md`"
    )


def test_every_leaf_key_is_documented(schema: dict[str, Any]) -> None:
    markdown = schema_markdown(schema)
    leaves = list(_leaf_paths(schema, ""))
    # Guard the walker itself: nested objects and arrays of objects must both be reached.
    assert {"seed", "segmentation.inference.tile", "classes[].color", "public_datasets[].kind"} <= set(leaves)
    missing = [path for path in leaves if f"| `{path}` |" not in markdown]
    assert not missing, f"schema keys without a row in the reference: {missing}"
    for key in schema["properties"]:
        assert f"\n## `{key}`\n" in markdown


def test_main_prints_the_reference(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    toy = {"type": "object", "properties": {"level": {"type": "integer", "maximum": 2, "default": 0}}}
    path = tmp_path / "toy.schema.yaml"
    path.write_text(yaml.safe_dump(toy), encoding="utf-8")
    assert main(["--schema", str(path)]) == 0
    out = capsys.readouterr().out
    assert out == schema_markdown(toy)
    assert "| `level` | integer ≤ 2 | `0` |  |" in out


TOY_SCHEMA: dict[str, Any] = {
    "description": "Toy   config\n  for the test.",
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "mode": {
            "enum": ["fast", "slow"],
            "default": "fast",
            "description": "Speed | quality\n   trade-off.",
        },
        "opts": {
            "type": "object",
            "default": {},
            "description": "Tuning options.",
            "properties": {
                "n": {"type": "integer", "minimum": 1, "default": 4, "description": "Count."},
                "p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1, "default": 0.5, "description": "P."},
                "sizes": {
                    "type": "array",
                    "items": {"type": "integer"},
                    "minItems": 3,
                    "maxItems": 3,
                    "default": [1, 2, 3],
                    "description": "Sizes.",
                },
                "ref": {"type": ["string", "null"], "default": None, "description": "Reference."},
            },
        },
        "things": {
            "type": "array",
            "minItems": 1,
            "description": "Things.",
            "default": [{"name": "the first thing of the list"}, {"name": "the second thing"}],
            "items": {
                "type": "object",
                "required": ["name"],
                "properties": {"name": {"type": "string", "minLength": 1, "description": "Name."}},
            },
        },
    },
}


def test_toy_schema_cells() -> None:
    markdown = schema_markdown(TOY_SCHEMA)
    assert markdown.startswith("# Configuration reference\n")
    assert "`python -m cellkd.config_docs > config/README.md`" in markdown
    assert "\nToy config for the test.\n" in markdown
    assert '| `mode` | one of fast, slow | `"fast"` | Speed \\| quality trade-off. |' in markdown
    assert "| `opts.n` | integer ≥ 1 | `4` | Count. |" in markdown
    assert "| `opts.p` | number in (0, 1] | `0.5` | P. |" in markdown
    assert "| `opts.sizes` | array of integer, 3 items | `[1, 2, 3]` | Sizes. |" in markdown
    assert "| `opts.ref` | string or null | `null` | Reference. |" in markdown
    assert "| `things` | array of object, ≥ 1 item | see below | Things. |" in markdown
    assert "| `things[].name` | string, non-empty (required) | — | Name. |" in markdown
    # An object section has its description above the table and no row of its own.
    assert "## `opts`\n\nTuning options.\n\n| key |" in markdown
    assert "| `opts` |" not in markdown
    # The long list-of-objects default is a YAML block after the table, not a cell.
    assert (
        "Default of `things`:\n\n```yaml\n- {name: the first thing of the list}\n- {name: the second thing}\n```"
        in markdown
    )
    # Schema order, and the same text every time.
    assert markdown.index("## `mode`") < markdown.index("## `opts`") < markdown.index("## `things`")
    assert schema_markdown(TOY_SCHEMA) == markdown
