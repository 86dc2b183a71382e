"""The ``gpu`` marker (pyproject.toml) selects the GPU smoke set, run on a GPU machine with
``python -m pytest -m gpu -n 8 tests``. Every test compiles for the GPU there, so the set is
small, yet it holds each kind of check below; the whole suite is the CPU CI."""

import subprocess
import sys

from tests import helpers

EXACT_AND_CG = ("prox_exact", "prox_cg3")
# What the smoke set must hold, as parts of test ids: every layer kind in an exact and a CG
# mode (tests whose id names no mode run both), pp.convert, pp.diagnostics, a training step and
# the checks of the products' precisions.
COVERS = {
    "dense, every plan": ["test_direction.py::test_every_plan_matches_numpy[dense-"],
    "conv, every plan": ["test_direction.py::test_every_plan_matches_numpy[conv]"],
    "grouped conv, every plan": ["test_direction.py::test_every_plan_matches_numpy[grouped-conv]"],
    "LinearGeneral": ["test_general.py::test_direction_matches_numpy_per_system[LinearGeneral-"],
    "Einsum": ["test_general.py::test_direction_matches_numpy_per_system[Einsum-"],
    "Embed": [f"test_embed.py::test_direction_matches_numpy[{m}]" for m in EXACT_AND_CG],
    **{norm: [f"test_norms.py::test_direction_matches_numpy[{norm}-{m}]" for m in EXACT_AND_CG]
       for norm in ("LayerNorm", "RMSNorm", "GroupNorm", "BatchNorm-train")},
    "pp.convert": ["test_conversion.py::test_converted_linear_gives_the_numpy_direction",
                   "test_conversion.py::test_converted_conv_gives_the_numpy_direction"],
    "pp.diagnostics": ["test_diagnosis.py::test_prox_exact_solves_its_system_in_float32",
                       "test_diagnosis.py::test_cg_residual_falls_with_the_steps"],
    "a training step": ["test_nnx.py::test_training_step_lowers_the_loss"],
    "product precisions": ["test_ops.py::test_direction_products_run_at_solve_precision",
                           "test_general.py::test_direction_products_run_at_solve_precision",
                           "test_lowering.py::test_solve_products_run_at_the_solve_precision"],
}


def test_gpu_marker_selects_a_small_set_that_covers_every_kind():
  out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu",
                        "-p", "no:cacheprovider", "tests"], cwd=helpers.REPO,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  selected = [line for line in out.stdout.splitlines() if "::" in line]
  missing = {kind: [part for part in parts if not any(part in test for test in selected)]
             for kind, parts in COVERS.items()}
  missing = {kind: parts for kind, parts in missing.items() if parts}
  assert not missing, f"not marked gpu: {missing}"
  assert 40 <= len(selected) <= 60, len(selected)  # a smoke set: minutes on one GPU
