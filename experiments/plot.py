"""Plots any set of runs and prints their results table.

    python -m experiments.plot runs/digits/mlp_backprop runs/digits/mlp_prox_cg3 --out mlp.png
"""

from __future__ import annotations

import argparse

from experiments import plots


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m experiments.plot", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                      help="folders written by experiments.cifar")
  parser.add_argument("--out", default="runs.png", help="image file (.png, .pdf, .svg)")
  args = parser.parse_args(argv)
  runs = [plots.load_run(d) for d in args.run_dirs]
  plots.runs_figure(runs).savefig(args.out, dpi=120)
  print(plots.results_table(runs), end="")
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
