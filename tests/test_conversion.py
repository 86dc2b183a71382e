"""pp.convert: same variables and forward pass, the counterparts' directions, the report,
include/exclude, shared and tied modules, retracing, and pp.set_tau."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import proxprop_jax as pp
from proxprop_jax import conversion
from tests import reference
from tests.helpers import gpu_marked

COUNTERPARTS = conversion.counterparts()

# One example per flax layer: (constructor args, kwargs, input shape or int ids).
EXAMPLES = {
    "Linear": (nnx.Linear, (6, 4), {}, (5, 6)),
    "Conv": (nnx.Conv, (3, 4, (3, 3)), {}, (2, 5, 5, 3)),
    "GroupedConv": (nnx.Conv, (4, 6, (3, 3)), {"feature_group_count": 2}, (2, 5, 5, 4)),
    "LinearGeneral": (nnx.LinearGeneral, (6, (2, 3)), {}, (5, 6)),
    "Einsum": (nnx.Einsum, ("btd,dk->btk", (6, 4), (4,)), {}, (2, 3, 6)),
    "Embed": (nnx.Embed, (10, 4), {}, "ids"),
    "LayerNorm": (nnx.LayerNorm, (6,), {}, (5, 6)),
    "RMSNorm": (nnx.RMSNorm, (6,), {}, (5, 6)),
    "GroupNorm": (nnx.GroupNorm, (6,), {"num_groups": 2}, (2, 4, 6)),
    "BatchNorm": (nnx.BatchNorm, (6,), {}, (5, 6)),
}
# The examples whose flax class has a ProxProp counterpart today.
CONVERTIBLE = [name for name, example in EXAMPLES.items() if example[0] in COUNTERPARTS]


def _input(shape, seed=1):
  if shape == "ids":
    return jnp.asarray([1, 3, 3, 0, 7, 3])
  return jax.random.normal(jax.random.key(seed), shape)


def _params_and_values(model):
  """``{id(Param): id(its array)}`` over the model's graph (nnx's own iteration)."""
  return {id(v): id(v.get_value()) for _, v in nnx.iter_graph(model)
          if isinstance(v, nnx.Param)}


def _other_state(model):
  return {id(v) for _, v in nnx.iter_graph(model)
          if isinstance(v, nnx.Variable) and not isinstance(v, (nnx.Param, pp.TauProx))}


class _Block(nnx.Module):
  """A transformer block from plain flax layers."""

  def __init__(self, rngs):
    self.norm = nnx.LayerNorm(8, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(2, 8, decode=False, rngs=rngs)
    self.mlp = nnx.Sequential(nnx.Linear(8, 16, rngs=rngs), jax.nn.gelu, nnx.Linear(16, 8, rngs=rngs))

  def __call__(self, x):
    x = x + self.attn(self.norm(x))
    return x + self.mlp(x)


class _Everything(nnx.Module):
  """Every layer type, in lists, dicts, a Sequential and attention, one module shared."""

  def __init__(self, rngs):
    self.embed = nnx.Embed(20, 8, rngs=rngs)
    self.blocks = nnx.List([_Block(rngs) for _ in range(2)])
    self.extra = nnx.Dict(rms=nnx.RMSNorm(8, rngs=rngs),
                          einsum=nnx.Einsum("btd,dk->btk", (8, 6), (6,), rngs=rngs))
    self.convs = nnx.Sequential(
        nnx.Conv(6, 6, (3,), rngs=rngs), jax.nn.relu,
        nnx.Conv(6, 6, (3,), feature_group_count=2, rngs=rngs),
        nnx.GroupNorm(6, num_groups=2, rngs=rngs),
        nnx.BatchNorm(6, use_running_average=True, rngs=rngs))
    self.head = nnx.Linear(6, 5, rngs=rngs)
    self.first_mlp_layer = self.blocks[0].mlp.layers[0]  # shared: a second path
    self.pos = nnx.Param(jnp.zeros((8,)))  # the model's own parameter

  def __call__(self, ids):
    x = self.embed(ids) + self.pos
    for block in self.blocks:
      x = block(x)
    return self.head(self.convs(self.extra["einsum"](self.extra["rms"](x))))


@pytest.mark.gpu
def test_every_layer_keeps_its_variables_forward_and_other_state():
  model = _Everything(nnx.Rngs(0))
  ids = jax.random.randint(jax.random.key(1), (2, 7), 0, 20)
  forward = nnx.jit(lambda m, ids: m(ids))
  before, params, state = forward(model, ids), _params_and_values(model), _other_state(model)
  pp.convert(model, mode="prox_cg3", tau_prox=0.5)
  assert _params_and_values(model) == params  # the same Param objects holding the same arrays
  assert _other_state(model) == state
  np.testing.assert_array_equal(forward(model, ids), before)
  for _, module in nnx.iter_graph(model):
    if type(module) in COUNTERPARTS:  # nothing convertible is left behind
      pytest.fail(f"{type(module).__name__} was not converted")
  assert model.first_mlp_layer is model.blocks[0].mlp.layers[0]
  assert isinstance(model.first_mlp_layer, pp.Linear)


def test_report_rows_name_every_parameter_holding_layer():
  model = _Everything(nnx.Rngs(0))
  flax_classes = {path: type(m) for path, m in nnx.iter_graph(model) if isinstance(m, nnx.Module)}
  total = sum(v.get_value().size for _, v in nnx.iter_graph(model) if isinstance(v, nnx.Param))
  report = pp.convert(model, mode="prox_exact", tau_prox=2.0)
  rows = {row.path: row for row in report.rows}
  assert sum(row.params for row in report.rows) == total  # every parameter in exactly one row
  for path, cls in flax_classes.items():
    key = "/".join(map(str, path))
    if cls in conversion.FLAX_LAYERS:
      row = rows[key]
      assert row.layer == f"nnx.{cls.__name__}"
      if cls in COUNTERPARTS:
        assert (row.status, row.mode, row.tau_prox) == ("converted", "prox_exact", 2.0)
      else:
        assert row.status == "skipped" and "no ProxProp counterpart" in row.note
  assert rows["(model)"].status == "skipped" and rows["(model)"].params == 8
  assert "shared: also at first_mlp_layer" in rows["blocks/0/mlp/layers/0"].note
  assert "first_mlp_layer" not in rows  # converted once, one row
  text, markdown = str(report), report.to_markdown()
  assert text.splitlines()[0].split() == ["path", "layer", "params", "status", "mode", "τ", "note"]
  assert len(markdown.splitlines()) == len(report.rows) + 4  # header, rule, rows, blank, summary
  assert f"of {total:,} parameters" in text and f"of {total:,} parameters" in markdown


@pytest.mark.parametrize("selector,converted", [
    ({"exclude": ("head",)}, {"blocks/0/mlp/layers/0", "blocks/0/mlp/layers/2"}),
    ({"exclude": "blocks/0"}, {"head"}),  # a container's path excludes what is inside
    ({"include": ("blocks/*/mlp/layers/2",)}, {"blocks/0/mlp/layers/2"}),
    ({"include": lambda path, m: getattr(m, "out_features", 0) == 16}, {"blocks/0/mlp/layers/0"}),
    ({"exclude": lambda path, m: path.endswith("2")}, {"blocks/0/mlp/layers/0", "head"}),
])
def test_include_and_exclude(selector, converted):
  model = nnx.Module()
  model.blocks = nnx.List([_Block(nnx.Rngs(0))])
  model.head = nnx.Linear(8, 3, rngs=nnx.Rngs(1))
  report = pp.convert(model, mode="prox_cg1", tau_prox=1.0, **selector)
  linear_rows = [r for r in report.rows if r.layer == "nnx.Linear"]
  assert {r.path for r in linear_rows if r.status == "converted"} == converted
  for row in linear_rows:
    if row.status != "converted":
      assert row.note.startswith("excluded" if "exclude" in selector else "not included")
  assert isinstance(model.head, pp.Linear) == ("head" in converted)


def test_tied_parameters_subclasses_and_prox_layers_are_reported():

  class MyLinear(nnx.Linear):
    pass

  model = nnx.Module()
  model.encode = nnx.Linear(4, 4, rngs=nnx.Rngs(0))
  model.decode = nnx.Linear(4, 4, rngs=nnx.Rngs(1))
  model.decode.kernel = model.encode.kernel  # tied
  model.custom = MyLinear(4, 4, rngs=nnx.Rngs(2))
  model.ready = pp.Linear(4, 4, mode="prox_cg2", tau_prox=3.0, rngs=nnx.Rngs(3))
  rows = {r.path: r for r in pp.convert(model, mode="prox_exact", tau_prox=1.0).rows}
  assert "tied parameter with decode" in rows["encode"].note
  assert "tied parameter with encode" in rows["decode"].note
  assert model.decode.kernel is model.encode.kernel
  assert rows["custom"].status == "skipped" and "subclasses nnx.Linear" in rows["custom"].note
  assert type(model.custom) is MyLinear
  assert (rows["ready"].status, rows["ready"].mode, rows["ready"].tau_prox) == (
      "ProxProp", "prox_cg2", 3.0)


def test_unsupported_options_are_skipped_with_the_reason():
  model = nnx.Module()
  model.dilated = nnx.Conv(2, 2, (3,), input_dilation=2, rngs=nnx.Rngs(0))
  model.custom_product = nnx.Linear(2, 2, dot_general=lambda *a, **k: jax.lax.dot_general(*a, **k),
                                    rngs=nnx.Rngs(0))
  rows = {r.path: r for r in pp.convert(model, mode="prox_cg1", tau_prox=1.0).rows}
  assert rows["dilated"].status == "skipped" and "input_dilation=1" in rows["dilated"].note
  assert rows["custom_product"].status == "skipped" and "dot_general" in rows["custom_product"].note
  assert type(model.dilated) is nnx.Conv and type(model.custom_product) is nnx.Linear


def test_bad_arguments_raise_before_anything_changes():
  model = nnx.Sequential(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="valid modes are"):
    pp.convert(model, mode="exact", tau_prox=1.0)
  with pytest.raises(ValueError, match="tau_prox must be a finite number > 0"):
    pp.convert(model, mode="prox_cg1", tau_prox=0.0)
  with pytest.raises(ValueError, match="exclude must be None, a path pattern"):
    pp.convert(model, mode="prox_cg1", tau_prox=1.0, exclude=3)
  assert type(model.layers[0]) is nnx.Linear
  with pytest.raises(ValueError, match="Build pp.Linear"):
    pp.convert(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), mode="prox_cg1", tau_prox=1.0)


# ------------------------------------------------------------------------ directions


def _sum_loss(c):
  return lambda m, x: jnp.sum(c * m(x))  # g = C


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("mode", gpu_marked(["gradient", "prox_exact", "prox_cg3"], "prox_exact",
                                            "prox_cg3"))
def test_converted_linear_gives_the_numpy_direction_and_pp_dense(mode):
  rng = np.random.default_rng(0)
  x, c = jnp.asarray(rng.normal(size=(7, 5))), jnp.asarray(rng.normal(size=(7, 3)))
  model = nnx.Sequential(nnx.Linear(5, 3, param_dtype=jnp.float64, rngs=nnx.Rngs(0)))
  pp.convert(model, mode=mode, tau_prox=0.5)
  grads = nnx.grad(_sum_loss(c))(model, x)
  got = np.concatenate([grads["layers"][0]["kernel"][...], grads["layers"][0]["bias"][...][None]])
  want = reference.direction(reference.with_ones(np.asarray(x), True), np.asarray(c), mode, 2.0)
  np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-12)
  layer = model.layers[0]
  dense = jax.vjp(lambda k, b: pp.dense(x, k, b, mode=mode, tau_prox=0.5),
                  layer.kernel[...], layer.bias[...])[1](c)
  np.testing.assert_allclose(got, np.concatenate([dense[0], dense[1][None]]), rtol=1e-12)


@pytest.mark.gpu
@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("mode", ["prox_exact", "prox_cg2"])
def test_converted_conv_gives_the_numpy_direction(mode):
  rng = np.random.default_rng(0)
  x, c = jnp.asarray(rng.normal(size=(2, 5, 5, 2))), jnp.asarray(rng.normal(size=(2, 5, 5, 3)))
  model = nnx.Sequential(nnx.Conv(2, 3, (3, 3), param_dtype=jnp.float64, rngs=nnx.Rngs(0)))
  pp.convert(model, mode=mode, tau_prox=0.5)
  grads = nnx.grad(_sum_loss(c))(model, x)["layers"][0]
  got = np.concatenate([np.asarray(grads["kernel"][...]).reshape(-1, 3), grads["bias"][...][None]])
  a, _ = reference.patches(x, (3, 3), (1, 1), [(1, 1), (1, 1)], (1, 1))
  want = reference.direction(reference.with_ones(a, True), np.asarray(c).reshape(-1, 3), mode, 2.0)
  np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-12)


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("name", CONVERTIBLE)
@pytest.mark.parametrize("mode", ["prox_exact", "prox_cg2"])
def test_converted_layer_equals_its_counterpart_built_directly(name, mode):
  # flax's norm layers promote their statistics to at least float32 implicitly, which the
  # x64 fixture's strict promotion rejects
  with jax.numpy_dtype_promotion("standard"):
    _check_converted_equals_direct(name, mode)


def _running_stats_in_float64(model):
  """BatchNorm's running statistics in float64, the dtype of the test's parameters and data.

  flax creates them in float32 whatever ``param_dtype``; the update of a float64 model would
  then write float64 statistics into float32 arrays (a FutureWarning now, an error in a
  coming JAX).
  """
  stats = nnx.state(model, nnx.BatchStat)
  nnx.update(model, jax.tree.map(lambda s: s.astype(jnp.float64), stats))


def _check_converted_equals_direct(name, mode):
  cls, args, kwargs, shape = EXAMPLES[name]
  kwargs = dict(kwargs, param_dtype=jnp.float64)
  model = nnx.Sequential(cls(*args, **kwargs, rngs=nnx.Rngs(0)))
  direct = nnx.Sequential(COUNTERPARTS[cls](*args, **kwargs, mode=mode, tau_prox=0.5,
                                            rngs=nnx.Rngs(0)))
  for m in (model, direct):
    _running_stats_in_float64(m)
  x = _input(shape)
  x = x if shape == "ids" else x.astype(jnp.float64)
  plain_out = model(x)
  pp.convert(model, mode=mode, tau_prox=0.5)
  np.testing.assert_array_equal(model(x), plain_out)
  np.testing.assert_array_equal(direct(x), plain_out)
  c = jax.random.normal(jax.random.key(2), plain_out.shape, jnp.float64)
  grad = nnx.jit(nnx.grad(_sum_loss(c)))
  got, want = grad(model, x), grad(direct, x)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


def test_a_jitted_step_retraces_after_convert_and_then_gives_the_direction():
  model = nnx.Sequential(nnx.Linear(4, 3, rngs=nnx.Rngs(0)))
  x, c = jax.random.normal(jax.random.key(0), (6, 4)), jax.random.normal(jax.random.key(1), (6, 3))
  traces = []

  @nnx.jit
  def step(model, x):
    traces.append(1)
    return nnx.grad(_sum_loss(c))(model, x)

  plain = step(model, x)
  step(model, x)
  pp.convert(model, mode="prox_exact", tau_prox=0.5)
  converted = step(model, x)
  step(model, x)
  assert len(traces) == 2  # one trace per graph structure
  want = jax.vjp(lambda k, b: pp.dense(x, k, b, mode="prox_exact", tau_prox=0.5),
                 model.layers[0].kernel[...], model.layers[0].bias[...])[1](c)
  np.testing.assert_allclose(converted["layers"][0]["kernel"][...], want[0], rtol=1e-5, atol=1e-7)
  assert not np.allclose(plain["layers"][0]["kernel"][...], want[0], rtol=1e-2)


@pytest.mark.gpu
def test_one_adam_step_of_a_converted_transformer_block_lowers_the_loss():
  model = nnx.Sequential(_Block(nnx.Rngs(0)), nnx.Linear(8, 4, rngs=nnx.Rngs(1)))
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)  # built before convert
  report = pp.convert(model, mode="prox_cg3", tau_prox=1.0, exclude=("layers/1",))
  assert len(report.converted) >= 2
  x = jax.random.normal(jax.random.key(0), (4, 5, 8))
  y = jax.random.randint(jax.random.key(1), (4, 5), 0, 4)
  loss_fn = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  before = float(step(model, optimizer))
  assert np.isfinite(before) and float(loss_fn(model)) < before


# --------------------------------------------------------------------------- set_tau


def _prox_model(tau=0.5, dtype=jnp.float32):
  model = nnx.Sequential(nnx.Linear(5, 3, param_dtype=dtype, rngs=nnx.Rngs(0)),
                         nnx.Linear(3, 2, param_dtype=dtype, rngs=nnx.Rngs(1)))
  pp.convert(model, mode="prox_exact", tau_prox=tau)
  return model


@pytest.mark.usefixtures("x64")
def test_set_tau_between_jitted_steps_does_not_retrace_and_uses_the_new_tau():
  rng = np.random.default_rng(0)
  x, c = jnp.asarray(rng.normal(size=(7, 5))), jnp.asarray(rng.normal(size=(7, 3)))
  model = nnx.Sequential(nnx.Linear(5, 3, param_dtype=jnp.float64, rngs=nnx.Rngs(0)))
  pp.convert(model, mode="prox_exact", tau_prox=0.5)
  traces = []

  @nnx.jit
  def step(model, x):
    traces.append(1)
    return nnx.grad(_sum_loss(c))(model, x)["layers"][0]["kernel"][...]

  a = reference.with_ones(np.asarray(x), True)
  for tau in (0.5, 0.05, 3.0):
    assert pp.set_tau(model, tau) == ["layers/0"]
    want = reference.direction(a, np.asarray(c), "prox_exact", 1 / tau)[:-1]
    np.testing.assert_allclose(step(model, x), want, rtol=1e-8)
  assert len(traces) == 1


def test_set_tau_follows_a_schedule_keeps_the_variable_and_filters():
  model = _prox_model()
  tau = model.layers[0].tau_prox
  value = tau.get_value()
  schedule = optax.exponential_decay(1.0, transition_steps=1, decay_rate=0.5)
  for step in range(3):
    pp.set_tau(model, schedule(step))
    for layer in model.layers:
      assert float(layer.tau_prox.get_value()) == float(schedule(step))
  new = model.layers[0].tau_prox.get_value()
  assert model.layers[0].tau_prox is tau
  assert (new.dtype, new.shape, new.weak_type) == (value.dtype, value.shape, value.weak_type)
  assert pp.set_tau(model, 0.3, exclude=("layers/1",)) == ["layers/0"]
  assert float(model.layers[1].tau_prox.get_value()) == 0.25
  optimizer = nnx.Optimizer(model, optax.sgd(1.0), wrt=nnx.Param)  # τ is not trained
  grads = nnx.grad(lambda m: jnp.sum(m(jnp.ones((2, 5)))))(model)
  optimizer.update(model, grads)
  assert float(model.layers[0].tau_prox.get_value()) == pytest.approx(0.3)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), None])
def test_set_tau_rejects_a_bad_tau(bad):
  model = _prox_model()
  with pytest.raises(ValueError, match="tau_prox must be a finite number > 0"):
    pp.set_tau(model, bad)
  assert float(model.layers[0].tau_prox.get_value()) == 0.5


def test_set_tau_without_a_matching_layer_says_where_the_layers_are():
  with pytest.raises(ValueError, match=r"no ProxProp layer matches.*\['layers/0', 'layers/1'\]"):
    pp.set_tau(_prox_model(), 0.1, include=("head",))


@pytest.mark.usefixtures("x64")
def test_a_traced_tau_inside_a_step_gives_the_closed_form():
  rng = np.random.default_rng(0)
  x, c = jnp.asarray(rng.normal(size=(7, 5))), jnp.asarray(rng.normal(size=(7, 3)))
  kernel, bias = jnp.asarray(rng.normal(size=(5, 3))), jnp.zeros(3)

  @jax.jit
  def direction(tau):
    return jax.vjp(lambda k, b: pp.dense(x, k, b, mode="prox_exact", tau_prox=tau),
                   kernel, bias)[1](c)

  model = _prox_model(dtype=jnp.float64)

  @nnx.jit
  def set_in_step(model, tau):
    pp.set_tau(model, tau)

  a = reference.with_ones(np.asarray(x), True)
  for tau in (0.5, 0.05):
    dk, db = direction(jnp.asarray(tau))
    want = reference.direction(a, np.asarray(c), "prox_exact", 1 / tau)
    np.testing.assert_allclose(np.concatenate([dk, db[None]]), want, rtol=1e-8)
    set_in_step(model, jnp.asarray(tau))
    assert float(model.layers[1].tau_prox.get_value()) == tau
