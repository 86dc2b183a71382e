"""`planner`: the plan is a printable value, its choices follow the cost model's logic."""

import jax
import jax.numpy as jnp
import pytest

import proxprop_jax as pp
from proxprop_jax import layers, planner
from proxprop_jax.modes import parse_mode

EXACT, CG3, CG50 = parse_mode("prox_exact"), parse_mode("prox_cg3"), parse_mode("prox_cg50")


def _dense(rows, features, out):
  return layers.Dense(True).problem((rows, features), (features, out), devices=1)


def test_plan_is_a_frozen_printable_value():
  plan = planner.plan(_dense(500, 784, 4000), EXACT, "cpu")
  assert plan == pp.Plan(plan.system, plan.solver, plan.multiply_a_first)
  assert "system=" in repr(plan) and hash(plan) == hash(pp.Plan(**vars(plan)))
  with pytest.raises(Exception):
    plan.system = "parameter"


@pytest.mark.parametrize("bad,match", [
    (dict(system="rows", solver="cg"), "Plan.system must be one of"),
    (dict(system="batch", solver="lu"), "Plan.solver must be one of"),
    (dict(system="gradient", solver="cg"), "solver 'none' goes with system 'gradient'"),
    (dict(system="batch", solver="none"), "solver 'none' goes with system 'gradient'"),
    (dict(system="parameter", solver="inverse", multiply_a_first=True), "multiply_a_first"),
    (dict(system="batch", solver="cg", multiply_a_first=True), "multiply_a_first"),
    (dict(system="batch", solver="cholesky", unroll=True), "unroll applies to the CG"),
])
def test_bad_plans_name_the_valid_choices(bad, match):
  with pytest.raises(ValueError, match=match):
    pp.Plan(**bad)


def test_the_system_with_fewer_unknowns_is_chosen():
  for backend in ("cpu", "accelerator"):
    # The paper MLP's first layer at batch 500: 500 rows against 785 parameters per unit.
    assert planner.plan(_dense(500, 784, 4000), EXACT, backend).system == "batch"
    # Many rows, few features: the 11 × 11 Gram.
    assert planner.plan(_dense(5000, 10, 8), EXACT, backend).system == "parameter"
    # The paper ConvNet's first conv: 500·32·32 rows, 76 parameters per channel.
    conv = layers.Conv(True, (5, 5), (1, 1), ((2, 2), (2, 2)), (1, 1))
    problem = conv.problem((500, 32, 32, 3), (5, 5, 3, 16), devices=1)
    assert planner.plan(problem, CG3, backend).system == "parameter"


def test_solvers_match_the_mode():
  problem = _dense(500, 784, 4000)
  for mode, allowed in ((EXACT, ("cholesky", "inverse")), (CG3, ("cg", "eig_cg")),
                        (CG50, ("cg", "eig_cg"))):
    assert planner.plan(problem, mode, "cpu").solver in allowed
  assert planner.plan(problem, parse_mode("gradient")) == pp.Plan("gradient", "none")


def test_many_cg_steps_on_cpu_go_to_the_eigenbasis():
  # CG with the formed matrix costs N products; one eigh pays off for large N.
  problem = _dense(200, 784, 4000)
  assert planner.plan(problem, parse_mode("prox_cg1"), "cpu").solver == "cg"
  assert planner.plan(problem, parse_mode("prox_cg200"), "cpu").solver == "eig_cg"


def test_multiply_a_first_only_when_it_is_the_smaller_product():
  # rows = 100 < p = 301 in both; k = 4000 > p against k = 10 < p.
  # (Only the explicit inverse and the eigenbasis multiply by a rows × rows matrix.)
  for mode in (EXACT, CG50):
    wide = planner.plan(_dense(100, 300, 4000), mode, "cpu")
    narrow = planner.plan(_dense(100, 300, 10), mode, "cpu")
    assert (wide.system, narrow.system) == ("batch", "batch")
    assert wide.multiply_a_first == (wide.solver in ("inverse", "eig_cg"))
    assert not narrow.multiply_a_first


def test_recording_sees_every_traced_layer_call():
  x, k1, k2 = jnp.ones((4, 30)), jnp.ones((30, 5)), jnp.ones((5, 3))
  forced = pp.Plan("parameter", "cg")

  def loss(k1, k2):
    h = pp.dense(x, k1, mode="prox_exact")
    return jnp.sum(pp.dense(h, k2, mode="prox_cg2", plan=forced))

  with planner.recording() as plans:
    jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(k1, k2)
  assert [(p.rows, p.params, p.columns) for p, _ in plans] == [(4, 5, 3), (4, 30, 5)]
  assert plans[0][1] == forced and plans[1][1].system == "batch"
  with planner.recording() as outside:
    pass
  assert outside == []


def test_describe_is_one_line_with_sizes_and_plan():
  line = planner.describe(_dense(500, 784, 4000), EXACT, "cpu")
  assert "\n" not in line and "rows=500" in line and "p=785" in line and "Plan(" in line


def test_systems_of_one_or_two_unknowns_are_solved_in_closed_form():
  norm = layers.NormAffine((1,), True, True).problem((64, 8), devices=1)  # 2x2 per feature
  scale_only = layers.NormAffine((1,), True, False).problem((64, 8), devices=1)
  for backend in ("cpu", "gpu"):
    assert planner.plan(norm, EXACT, backend) == pp.Plan("parameter", "closed_form")
    assert planner.plan(scale_only, EXACT, backend).solver == "closed_form"
    assert planner.plan(_dense(500, 784, 4000), EXACT, backend).solver != "closed_form"
    assert planner.plan(norm, CG3, backend).solver in ("cg", "eig_cg")  # CG stays CG


def test_planning_plans_for_another_backend_with_other_constants():
  problem = _dense(200, 784, 4000)
  cg10 = parse_mode("prox_cg10")
  assert planner.plan(problem, cg10, "cpu").solver == "eig_cg"
  with planner.planning("gpu"):
    # The H200's measured costs: ten products with the 200x200 matrix beat one eigh.
    assert planner.plan(problem, cg10) == pp.Plan("batch", "cg")
    with planner.planning("gpu", unroll_steps=10):
      assert planner.plan(problem, cg10) == pp.Plan("batch", "cg", unroll=True)
      assert not planner.plan(problem, parse_mode("prox_cg11")).unroll
  assert planner.plan(problem, cg10, "cpu").solver == "eig_cg"  # the block restored
  with pytest.raises(ValueError, match="unknown cost constants.*valid"):
    with planner.planning(unrol=3):
      pass


def test_a_solve_split_by_columns_applies_the_inverse():
  # Products split by columns; triangular solves would run whole on every device.
  assert planner.with_columns_split(pp.Plan("batch", "cholesky")) == pp.Plan("batch", "inverse")
  for kept in (pp.Plan("parameter", "inverse"), pp.Plan("batch", "cg", unroll=True),
               pp.Plan("parameter", "closed_form")):
    assert planner.with_columns_split(kept) == kept
