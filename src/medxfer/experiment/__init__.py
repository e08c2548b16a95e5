"""One command for the whole study (``medxfer run``): stages, done-markers, a matrix of cells.

spec     experiment files: a config plus ``stages``, ``matrix``, ``report``; cells
stages   audit, gan, tune, train, prune, evaluate, report: each a call into its package
runner   every cell, every stage in order; skip complete stages, resume killed ones
"""

from __future__ import annotations

from medxfer.experiment.runner import run_experiment
from medxfer.experiment.spec import STAGES, Cell, Experiment, load_experiment

__all__ = ["STAGES", "Cell", "Experiment", "load_experiment", "run_experiment"]
