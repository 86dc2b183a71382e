"""The paper's experiments: ``python -m experiments.cifar``, ``experiments.paper``, ``experiments.plot``."""
