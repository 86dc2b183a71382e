"""What a ProxProp step lowers to for a GPU (exported on this CPU): solver calls, loops,
conditionals and product precisions, counted through the module's outlined functions."""

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

import proxprop_jax as pp
from benchmarks import lowering
from proxprop_jax import planner


def _gpu_counts(fn, *args, **constants):
  with planner.planning("gpu", **constants):
    return lowering.summary(lowering.count_ops(lowering.export_text(fn, *args)))


def _model_step(mode, solve_precision=pp.SOLVE_PRECISION):
  """A converted Linear → LayerNorm → Linear → BatchNorm → Linear step (rows 8: the first
  layer in batch space, the second in parameter space) and its arguments."""
  model = nnx.Sequential(nnx.Linear(24, 6, rngs=nnx.Rngs(0)), nnx.LayerNorm(6, rngs=nnx.Rngs(1)),
                         jax.nn.relu, nnx.Linear(6, 5, rngs=nnx.Rngs(2)),
                         nnx.BatchNorm(5, rngs=nnx.Rngs(3)), nnx.Linear(5, 3, rngs=nnx.Rngs(4)))
  pp.convert(model, mode=mode, tau_prox=0.5, solve_precision=solve_precision,
             exclude=("layers/5",))
  optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))

  def step(state, x, y):
    model, optimizer = nnx.merge(graphdef, state)
    loss_fn = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return nnx.state((model, optimizer)), loss

  return step, state, jnp.ones((8, 24)), jnp.arange(8) % 3


def test_counts_go_through_outlined_calls():
  # jnp.linalg.cholesky is outlined once as a private function and called twice.
  fn = lambda m: jnp.linalg.cholesky(m) + jnp.linalg.cholesky(2 * m)
  text = lowering.export_text(fn, jnp.eye(4))
  assert text.count("cusolver_potrf") == 1
  assert lowering.summary(lowering.count_ops(text))["cusolver"] == {"cusolver_potrf_ffi": 2}


def test_exact_step_has_no_conditional_no_eigendecomposition_and_closed_form_norms():
  counts = _gpu_counts(*_model_step("prox_exact"))
  # Two Linear layers, each factored twice (the shifted refactorisation, no lax.cond);
  # LayerNorm and BatchNorm solve their 2x2 systems in closed form.
  assert counts["cusolver"] == {"cusolver_potrf_ffi": 4}
  assert counts["conditional"] == 0 and counts["while"] == 0


def test_cg_loops_are_unrolled_only_when_planned_so():
  step, *args = _model_step("prox_cg3")
  rolled, unrolled = _gpu_counts(step, *args), _gpu_counts(step, *args, unroll_steps=10)
  assert rolled["while"] == 4  # two Linear and two norm layers, one CG loop each
  assert unrolled["while"] == 0 and unrolled["cusolver"] == {} == rolled["cusolver"]
  assert unrolled["products"] > rolled["products"]  # the loop bodies, written out


@pytest.mark.gpu
@pytest.mark.parametrize("solve_precision,kind", [("highest", "highest"),
                                                  ("bf16_bf16_f32_x3", "bf16_x3")])
def test_solve_products_run_at_the_solve_precision_on_a_gpu(solve_precision, kind):
  counts = _gpu_counts(*_model_step("prox_cg3", solve_precision))
  by_precision = counts["products_by_precision"]
  # The forward pass and the input cotangents keep the user's (default) precision.
  assert set(by_precision) == {"default", kind} and by_precision[kind] >= 8
