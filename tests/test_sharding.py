"""Sharded parameters (FSDP, tensor parallelism) and spread solves on 8 fake CPU devices.

`_sharding_worker.py` (two parts, run at once in subprocesses) computes the directions of a
model holding every ProxProp layer kind with its parameters split as flax annotations say,
and compares them with one device on the whole batch; these tests assert on what it
measured. See the worker's docstring for the model and the shardings.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from tests import _sharding_worker as worker
from tests import helpers

HERE = os.path.dirname(os.path.abspath(__file__))
KINDS = {"Embed", "LayerNorm", "LinearGeneral", "Einsum", "Linear", "Conv", "BatchNorm"}
FLOAT64_RTOL = 1e-10
TIMEOUT_S = 600


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
  """``{part: the JSON it wrote}`` for both parts of the worker, run in parallel."""
  tmp = tmp_path_factory.mktemp("sharding")
  env = dict(os.environ, XLA_FLAGS=helpers.xla_flags("--xla_llvm_disable_expensive_passes=true"),
             JAX_PLATFORMS="cpu")
  env.pop("JAX_ENABLE_X64", None)
  procs = {}
  for part in ("shardings", "others"):
    log = open(tmp / f"{part}.log", "w")
    procs[part] = (subprocess.Popen(
        [sys.executable, os.path.join(HERE, "_sharding_worker.py"), "--part", part, "--out",
         str(tmp / f"{part}.json")], stdout=log, stderr=subprocess.STDOUT, env=env), log)
  failed = []
  for part, (proc, log) in procs.items():
    try:
      code = proc.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
      proc.kill()
      code = "timeout"
    log.close()
    if code != 0:
      failed.append(f"--- {part} ({code}):\n" + (tmp / f"{part}.log").read_text()[-3000:])
  if failed:
    pytest.fail("the sharding worker failed:\n" + "\n".join(failed))
  return {part: json.loads((tmp / f"{part}.json").read_text()) for part in procs}


def _merged(measured, key):
  """``measured[part][key]`` of both parts in one dict."""
  return {k: v for part in measured.values() for k, v in part[key].items()}


def test_directions_equal_one_device_for_every_layer_kind_and_sharding(measured):
  runs = _merged(measured, "directions")
  assert set(runs) == {f"{mode}/{sharding}" for part in worker.RUNS.values()
                       for mode, sharding in part}
  for key, errors in runs.items():
    assert set(errors) == KINDS, key
    assert max(errors.values()) <= FLOAT64_RTOL, (key, errors)


def test_float32_on_explicit_axes_is_no_further_from_float64_than_one_float32_device(measured):
  sharded, one_device = (measured["others"]["float32"][k] for k in ("explicit", "one_device"))
  assert set(sharded) == KINDS
  for kind in KINDS:
    # One float32 device is ~1e-7..1e-4 from float64 (its own rounding); a sharded run sums
    # in another order, so it may be as far, not further (2x: two roundings' worth).
    assert sharded[kind] <= 2 * one_device[kind], (kind, sharded, one_device)
    assert one_device[kind] > 0  # the float32 run really ran in float32


def _kernel_forms(shape, layer):
  """A kernel's whole shape and its system columns ``(p, k)``, ``(B, p, k)`` (bias row too)."""
  blocks = {"heads": 4}.get(layer, 1)
  features = {"q": 2, "heads": 1}.get(layer, 1)  # trailing dims that are output columns
  k = math.prod(shape[len(shape) - features:]) // (blocks if layer != "heads" else 1)
  p0 = math.prod(shape) // (k * blocks)
  forms = {tuple(shape)}
  for p in (p0, p0 + 1):
    forms |= {(p, k), (blocks, p, k), (1, p, k)}
  return forms


def _gathered(collectives):
  return {tuple(shape) for op, shapes, _ in collectives if op == "all-gather" for shape in shapes}


def test_tensor_parallel_layers_never_all_gather_a_whole_kernel(measured):
  data, collectives = measured["shardings"], _merged(measured, "collectives")
  forms = {layer: _kernel_forms(shape, layer) for layer, shape in data["shapes"].items()}
  for key in ("prox_cg3/tp", "prox_cg3/both", "prox_exact/both"):
    gathered = _gathered(collectives[key])
    assert gathered, key  # the program communicates (the HLO was read)
    for layer, shapes in forms.items():
      assert not gathered & shapes, (key, layer, gathered & shapes)
  # Positive control: FSDP all-gathers every whole kernel for the forward pass (as FSDP does),
  # so the check above sees whole kernels when they are gathered.
  fsdp = _gathered(collectives["prox_cg3/fsdp"])
  assert all(tuple(shape) in fsdp for shape in data["shapes"].values()), fsdp


def test_row_parallel_layers_reduce_the_row_gram_once(measured):
  """``mlp2`` (56 → 16, row-parallel, batch space: 48 rows < 57 parameters) sums its
  ``AAᵀ`` (48 × 48; XLA forms the rows each data shard holds) over ``model``: an all-reduce
  of its rows over groups of 2 devices."""
  reduced = {(tuple(shape), group) for op, shapes, group in
             measured["shardings"]["collectives"]["prox_cg3/tp"] if op == "all-reduce"
             for shape in shapes}
  assert any(shape[-1] == 48 and shape[-2] in (12, 48) and group == 2
             for shape, group in reduced), reduced


def test_per_device_parameter_and_direction_memory_falls_as_one_over_devices(measured):
  total = measured["shardings"]["param_bytes"]
  splits = {"prox_cg3/fsdp": 4, "prox_cg3/tp": 2, "prox_cg3/both": 8, "prox_exact/both": 8}
  memories = _merged(measured, "memory")
  assert set(memories) == set(splits)
  for key, memory in memories.items():
    # XLA's outputs are the directions: split exactly like the parameters (plus the output
    # tuple's table of 8-byte buffer addresses).
    assert 0 <= memory["output"] - memory["param_shards"] <= 8 * memory["outputs"], (key, memory)
    assert memory["argument"] >= memory["param_shards"]
    # Biases and norms are split over fewer axes than kernels: within 25% of 1/devices.
    assert memory["param_shards"] <= 1.25 * total / splits[key], (key, memory, total)


def test_distributed_solves_give_the_same_direction_with_fewer_flops_per_device(measured):
  runs = measured["others"]["distributed"]
  for key, run in runs.items():
    assert run["error"] <= FLOAT64_RTOL, (key, run)
  gradient = runs["gradient/replicated"]["flops"]
  replicated, distributed = (runs[f"prox_cg3/{k}"]["flops"] - gradient
                             for k in ("replicated", "distributed"))
  # XLA's cost analysis per device: the CG of both layers is shared by 8 devices; what stays
  # (the row Gram of the global batch, the bias rows, the gathers) keeps it above 1/8.
  assert 0 < distributed <= 0.4 * replicated, (replicated, distributed)


def test_settings_that_cannot_work_are_clear_errors(measured):
  errors = measured["others"]["errors"]
  assert "jit + sharding" in errors["pmap_axis"] and "axis_name=None" in errors["pmap_axis"]
  assert "True or False" in errors["not_bool"]
  assert "no columns to share" in errors["matrix_free"] and "pp.Linear" in errors["matrix_free"]
  assert "('data', 'model')" in errors["batch_axes"] and "'batch'" in errors["batch_axes"]
  assert "out_sharding" in errors["explicit_row_parallel"], errors["explicit_row_parallel"]
  assert errors["explicit_row_parallel_fixed"] <= 1e-5
