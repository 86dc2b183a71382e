"""The paper's experiments.

``python -m experiments.cifar`` (one run), ``python -m experiments.paper`` (the paper's grid,
figures and table), ``python -m experiments.plot`` (plots any runs).
"""
