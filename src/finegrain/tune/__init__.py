"""Hyperparameter search over ``RunConfig`` fields (Optuna, imported only when a study runs)."""

from finegrain.tune.space import Dimension, parse_dimension, parse_space

__all__ = ["Dimension", "parse_dimension", "parse_space", "run_study"]


def __getattr__(name: str):
    # run_study pulls in the training stack; load it on first use, not on `import finegrain.tune`.
    if name == "run_study":
        from finegrain.tune.study import run_study

        return run_study
    raise AttributeError(f"module 'finegrain.tune' has no attribute {name!r}")
