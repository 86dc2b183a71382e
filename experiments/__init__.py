"""The paper's experiments.

``python -m experiments.cifar`` (one run), ``python -m experiments.paper`` (the paper's grid,
figures and table), ``python -m experiments.plot`` (plots any runs).

Modules: ``config`` (RunConfig, its flags, the paper's grid), ``models`` (the paper's models),
``optimizers``, ``data`` (digits, CIFAR-10), ``train`` (one run), ``records`` (the run
folder's files), ``cli`` (exit statuses, Ctrl-C), ``plots`` (figures and tables).
"""
