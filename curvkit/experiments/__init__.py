"""Experiments: sweep configs, the sweep runner, quantities and paper figures.

``curvkit sweep CONFIG`` runs :func:`run_sweep`; ``curvkit figures RESULTS`` runs
:func:`make_figures`. Configs live in the repository's ``experiments/configs/``.
"""

from curvkit.experiments.config import ConfigError, SweepConfig, load_config, parse_config
from curvkit.experiments.runner import expand_grid, run_sweep, shard_points


def make_figures(*args, **kwargs):
    """Lazy alias of :func:`curvkit.experiments.figures.make_figures` (imports matplotlib)."""
    from curvkit.experiments.figures import make_figures as _make

    return _make(*args, **kwargs)


__all__ = [
    "ConfigError",
    "SweepConfig",
    "expand_grid",
    "load_config",
    "make_figures",
    "parse_config",
    "run_sweep",
    "shard_points",
]
