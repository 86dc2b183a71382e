"""How far each mode's direction is from float64, at each ``solve_precision`` setting.

    python -m benchmarks.accuracy [--batch-size 500] [--taus 0.05,1,100]
                                  [--settings highest,default,...] [--json PATH]

On GPUs and TPUs a float32 product at DEFAULT precision runs in TF32 / one bfloat16 pass; the
library computes the direction at ``solve_precision`` (default HIGHEST); 3- and 6-pass
algorithms (``lax.DotAlgorithmPreset``, e.g. ``tf32_tf32_f32_x3``) split each float32 input
into two or three narrower parts and run on tensor cores. For the paper's MLP
first layer (3072 → 4000, the batch-space system) and the ConvNet's first conv (3 → 16, 5x5,
the parameter-space system) it computes ``pp.dense`` / ``pp.conv``'s direction on the default
device in float32 at both settings and the same direction in float64 on the CPU (the library's
own float64 path, which the tests check against NumPy), and prints a Markdown table of the
relative error ‖D − D₆₄‖/‖D₆₄‖ per layer, mode, τ and setting. On a CPU every setting it runs
gives the same numbers (XLA's CPU backend ignores them); one it cannot run shows "–".
"""

from __future__ import annotations

import argparse
import json

import jax

jax.config.update("jax_enable_x64", True)  # for the float64 reference; inputs are typed

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import proxprop_jax as pp  # noqa: E402

MODES = ("prox_exact", "prox_cg3", "prox_cg10")
#: The solve_precision settings compared by default: true float32, the backend's default
#: (TF32 on a GPU) and the 3- and 6-pass algorithms of tensor cores.
SETTINGS = ("highest", "default", "tf32_tf32_f32_x3", "bf16_bf16_f32_x3", "bf16_bf16_f32_x6")


def layers(batch_size: int) -> dict:
  """``{name: (op, x shape, kernel shape)}``: the two layers measured."""
  return {
      "MLP 3072→4000 (batch space)": (pp.dense, (batch_size, 3072), (3072, 4000)),
      "ConvNet conv1 3→16, 5x5 (parameter space)": (
          lambda x, k, **kw: pp.conv(x, k, padding="SAME", **kw),
          (batch_size, 32, 32, 3), (5, 5, 3, 16)),
  }


def direction(op, x, kernel, g, mode, tau, solve_precision):
  """The layer's direction for the output cotangent ``g``."""
  def loss(kernel, x, g):  # the data are arguments: closed over, XLA would constant-fold AᵀA
    return jnp.sum(op(x, kernel, mode=mode, tau_prox=tau, solve_precision=solve_precision) * g)
  return jax.jit(jax.grad(loss))(kernel, x, g)


def measure(batch_size: int, taus, settings=SETTINGS) -> list[dict]:
  rows = []
  cpu = jax.devices("cpu")[0]
  for name, (op, x_shape, k_shape) in layers(batch_size).items():
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.nn.relu(jax.random.normal(keys[0], x_shape, jnp.float32))
    kernel = 0.02 * jax.random.normal(keys[1], k_shape, jnp.float32)
    out_shape = jax.eval_shape(lambda x, k: op(x, k, mode="gradient"), x, kernel).shape
    g = jax.random.normal(keys[2], out_shape, jnp.float32) / batch_size
    x64, kernel64, g64 = (jax.device_put(a.astype(jnp.float64), cpu) for a in (x, kernel, g))
    for mode in MODES:
      for tau in taus:
        with jax.default_device(cpu):
          reference = np.asarray(direction(op, x64, kernel64, g64, mode, tau,
                                           jax.lax.Precision.HIGHEST))
        row = dict(layer=name, mode=mode, tau=tau)
        for setting in settings:
          try:
            d = np.asarray(direction(op, x, kernel, g, mode, tau, setting), np.float64)
            row[setting] = float(np.linalg.norm(d - reference) / np.linalg.norm(reference))
          except Exception as e:  # e.g. an algorithm this backend does not run
            row[setting] = None
            print(f"  {setting}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
        rows.append(row)
        print(f"  {name} {mode} τ={tau:g}: " + ", ".join(
            f"{s} {_fmt(row[s])}" for s in settings), flush=True)
  return rows


def _fmt(error) -> str:
  return "–" if error is None else f"{error:.1e}"


def table(rows, settings=SETTINGS) -> str:
  lines = ["| layer | mode | τ | " + " | ".join(settings) + " |",
           "|---|---|---|" + "---|" * len(settings)]
  lines += [f"| {r['layer']} | {r['mode']} | {r['tau']:g} | "
            + " | ".join(_fmt(r[s]) for s in settings) + " |" for r in rows]
  return "\n".join(lines) + "\n"


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.accuracy",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--batch-size", type=int, default=500)
  parser.add_argument("--taus", default="0.05,1,100", help="comma-separated τ values")
  parser.add_argument("--settings", default=",".join(SETTINGS),
                      help="comma-separated solve_precision names (a lax.Precision or a "
                           "lax.DotAlgorithmPreset)")
  parser.add_argument("--json", default=None, help="also write the rows to this file")
  args = parser.parse_args(argv)
  taus = [float(t) for t in args.taus.split(",")]
  settings = tuple(s.strip() for s in args.settings.split(",") if s.strip())
  device = jax.devices()[0]
  print(f"direction vs float64 on the CPU; float32 on {device.device_kind} ({device.platform}), "
        f"batch {args.batch_size}")
  rows = measure(args.batch_size, taus, settings)
  print(table(rows, settings), end="")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(device=device.device_kind, rows=rows), f, indent=1)


if __name__ == "__main__":
  main()
