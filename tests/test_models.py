"""experiments/models.py: the registry, the paper's two models, their init and the loss."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import proxprop_jax as pp
from experiments import models


@pytest.mark.parametrize("name", ["convnet", "mlp"])
def test_models_share_init_and_use_prox_layers_only_for_hidden_layers(name):
  shape = (8, 8, 1)
  plain = models.build(name, mode="backprop", input_shape=shape, seed=1)
  prox = models.build(name, mode="prox_cg3", input_shape=shape, tau_prox=0.5, seed=1)
  assert jax.tree.all(jax.tree.map(np.array_equal, nnx.state(plain, nnx.Param),
                                   nnx.state(prox, nnx.Param)))
  layers = [m for _, m in nnx.iter_graph(prox) if isinstance(m, (nnx.Linear, nnx.Conv))]
  head = prox.head
  hidden = [l for l in layers if l is not head]
  assert len(layers) == 4 and len(hidden) == 3
  assert all(isinstance(l, (pp.Linear, pp.Conv)) and l.mode == "prox_cg3" and l.tau_prox == 0.5
             for l in hidden)
  assert type(head) is nnx.Linear
  assert not any(isinstance(m, (pp.Linear, pp.Conv)) for _, m in nnx.iter_graph(plain))
  assert prox(jnp.zeros((2,) + shape)).shape == (2, 10)


def test_torch_default_init_bounds_for_kernel_and_bias():
  model = models.build("convnet", mode="backprop", input_shape=(32, 32, 3), seed=0)
  assert model.head.kernel.shape == (1280, 10)  # 8 * 8 * 20 for CIFAR-sized input
  for layer, fan_in in [(model.conv1, 5 * 5 * 3), (model.conv3, 5 * 5 * 20),
                        (model.head, 1280)]:
    bound = 1 / math.sqrt(fan_in)
    for p in (layer.kernel[...], layer.bias[...]):
      assert np.abs(p).max() <= bound
    # Uniform over the whole interval: the largest of many draws is close to the bound.
    assert np.abs(layer.kernel[...]).max() > 0.95 * bound
  assert np.abs(model.conv3.bias[...]).max() > 0.5 / math.sqrt(5 * 5 * 20)


def test_paper_sizes_by_default_and_smaller_variants_on_request():
  mlp = nnx.eval_shape(lambda: models.build("mlp", mode="backprop", input_shape=(32, 32, 3)))
  assert [l.kernel.shape for l in mlp.hidden] + [mlp.head.kernel.shape] == [
      (3072, 4000), (4000, 1000), (1000, 4000), (4000, 10)]
  small = models.build("mlp", mode="prox_exact", input_shape=(16,), hidden_sizes=(32, 24))
  assert [l.kernel.shape for l in small.hidden] == [(16, 32), (32, 24)]
  conv = models.build("convnet", mode="gradient", input_shape=(8, 8, 3), channels=(4, 6, 6),
                      kernel_size=3)
  assert [c.kernel.shape for c in (conv.conv1, conv.conv2, conv.conv3)] == [
      (3, 3, 3, 4), (3, 3, 4, 6), (3, 3, 6, 6)]
  assert conv.head.kernel.shape == (2 * 2 * 6, 10)
  # The bias bound follows the conv's own fan-in (3*3*4 for conv2), not the paper's 5*5.
  assert np.abs(conv.conv2.bias[...]).max() <= 1 / math.sqrt(3 * 3 * 4)


def test_prox_linear_chooses_the_hidden_dense_class():
  matrix_free = pp.prox_module(nnx.Linear)
  model = models.build("mlp", mode="prox_cg3", input_shape=(16,), hidden_sizes=(8,),
                       prox_linear=matrix_free)
  assert type(model.hidden[0]) is matrix_free and type(model.head) is nnx.Linear


def test_registry_builds_a_registered_model_and_names_the_valid_ones():
  assert {"mlp", "convnet"} <= set(models.MODELS)
  with pytest.raises(ValueError, match="unknown model 'resnet18'; valid: .*convnet.*mlp"):
    models.build("resnet18", mode="backprop", input_shape=(8, 8, 1))

  @models.register("_tiny_for_test")
  class Tiny(nnx.Module):

    def __init__(self, input_shape, num_classes, layers, width=4):
      self.body = layers.linear(math.prod(input_shape), width)
      self.head = layers.linear(width, num_classes, hidden=False)

    def __call__(self, x):
      return self.head(nnx.relu(self.body(x.reshape(x.shape[0], -1))))

  try:
    model = models.build("_tiny_for_test", mode="prox_exact", input_shape=(3,), num_classes=2,
                         width=5)
    assert isinstance(model, Tiny) and isinstance(model.body, pp.Linear)
    assert model(jnp.ones((4, 3))).shape == (4, 2)
    with pytest.raises(ValueError, match="already registered"):
      models.register("_tiny_for_test")(Tiny)
  finally:
    del models.MODELS["_tiny_for_test"]


def test_cross_entropy_equals_the_float64_formula():
  rng = np.random.default_rng(0)
  logits, labels = rng.normal(size=(7, 10)) * 5, rng.integers(0, 10, size=7)
  shifted = logits - logits.max(1, keepdims=True)
  expected = -(shifted - np.log(np.exp(shifted).sum(1, keepdims=True)))[np.arange(7), labels]
  got = models.cross_entropy(jnp.asarray(logits, jnp.float32), jnp.asarray(labels))
  assert float(got) == pytest.approx(expected.mean(), rel=1e-6)


@pytest.mark.parametrize("name", ["resnet", "vit"])
@pytest.mark.parametrize("shape", [(8, 8, 1), (32, 32, 3)])
def test_converted_models_keep_the_plain_models_parameters_and_forward(name, shape):
  plain = models.build(name, mode="backprop", input_shape=shape, seed=2)
  prox = models.build(name, mode="prox_cg3", input_shape=shape, tau_prox=0.5, seed=2)
  assert jax.tree.all(jax.tree.map(np.array_equal, nnx.state(plain, nnx.Param),
                                   nnx.state(prox, nnx.Param)))
  x = jax.random.uniform(jax.random.key(0), (4,) + shape)
  for mode in ("train", "eval"):
    for m in (plain, prox):
      getattr(m, mode)()
    out = prox(x)
    assert out.shape == (4, 10)
    np.testing.assert_allclose(out, plain(x), rtol=1e-6, atol=1e-6)
  # Every layer with parameters is a ProxProp layer, the head included (but not the ViT's
  # position embedding, a bare parameter).
  with_params = [m for _, m in nnx.iter_graph(prox) if isinstance(m, nnx.Module)
                 and any(isinstance(v, nnx.Param) for v in vars(m).values())]
  converted = [m for m in with_params if isinstance(m, pp.ProxLayer)]
  assert prox.head in converted and len(converted) == len(with_params) - (name == "vit")
  assert all(m.mode == "prox_cg3" and float(m.tau_prox[...]) == 0.5 for m in converted)
  kept = models.build(name, mode="prox_cg3", input_shape=shape, plain_head=True)
  assert not isinstance(kept.head, pp.ProxLayer)
