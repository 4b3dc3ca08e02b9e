"""What each workflow job imports before it starts working: rules that run no network load no torch, and the
classifier jobs load neither smp/timm nor torchvision (seconds of start-up per job; README "Where the demo's time
goes"). Each check runs the scripts' own import statements in a fresh interpreter."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"

TORCH_FREE_SCRIPTS = [
    "compare_with_qupath",
    "copy_selected_masks",
    "cut_patches",
    "export_model",
    "extract_fragments",
    "extract_nuclei",
    "generate_demo_slide",
    "import_public_dataset",
    "normalize_stain",
    "plot_prediction_overlay",
    "plot_training_curves",
    "rasterize_annotations",
    "select_segmentation",
    "tabulate_finetune",
    "tabulate_instances",
    "tabulate_label_agreement",
    "tabulate_segmentation",
    "tabulate_students",
    "tabulate_teachers",
]
"""Scripts whose rule runs no network: they read stores, pixels and tables only."""

CLASSIFIER_SCRIPTS = ["classify_slide", "evaluate_classifier", "finetune_student", "train_classifier"]
"""Scripts that run the nucleus classifiers (RCCNet, VGG-4): torch, but no segmentation or torchvision stack."""


def _cellkd_imports(script: str) -> list[str]:
    """The script's ``from cellkd... import ...`` / ``import cellkd...`` statements, as source lines."""
    tree = ast.parse((SCRIPTS / f"{script}.py").read_text(encoding="utf-8"))
    return [
        ast.unparse(node)
        for node in tree.body
        if (isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cellkd"))
        or (isinstance(node, ast.Import) and any(a.name.startswith("cellkd") for a in node.names))
    ]


def _first_import_loading(statements: list[str], modules: tuple[str, ...], then: str = "") -> str:
    """Run ``statements`` (then ``then``) in a fresh interpreter; the first one after which any of ``modules`` is
    loaded, as "statement: module", or "" when none is."""
    code = "import sys\nmodules = " + repr(modules) + "\n"
    for statement in [*statements, then]:
        code += f"{statement}\nhit = [m for m in modules if m in sys.modules]\n"
        code += f"if hit: print({statement!r} + ': ' + hit[0]); sys.exit(0)\n"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, env=env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_every_script_is_in_one_import_check_or_knowingly_needs_the_segmentation_stack() -> None:
    segmentation = {"evaluate_segmentation", "segment_slide", "train_segmentation"}  # smp builds their models
    listed = set(TORCH_FREE_SCRIPTS) | set(CLASSIFIER_SCRIPTS) | segmentation
    assert {p.stem for p in SCRIPTS.glob("*.py")} == listed


def test_rules_that_run_no_network_import_no_torch() -> None:
    statements = [s for script in TORCH_FREE_SCRIPTS for s in _cellkd_imports(script)]
    assert statements
    assert _first_import_loading(statements, ("torch",)) == ""


@pytest.mark.parametrize("script", CLASSIFIER_SCRIPTS)
def test_classifier_jobs_load_no_segmentation_stack_nor_torchvision(script: str) -> None:
    # Then what they all import when they run (predict_logits) and build the demo's classifiers: neither may pull
    # the stack in.
    build = (
        "from cellkd.training.classifier import predict_logits; "
        "from cellkd.models import create_model; create_model('rccnet'); create_model('vgg4')"
    )
    heavy = ("segmentation_models_pytorch", "timm", "torchvision")
    assert _first_import_loading(_cellkd_imports(script), heavy, then=build) == ""


@pytest.mark.parametrize("script", CLASSIFIER_SCRIPTS)
def test_classifier_jobs_load_no_scipy_stats(script: str) -> None:
    # scipy.stats serves only the seed intervals of the tables: 0.7 CPU s of start-up per job otherwise
    assert _first_import_loading(_cellkd_imports(script), ("scipy.stats",)) == ""
