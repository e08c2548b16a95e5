"""Hyper-parameter search with Optuna: ``medxfer tune`` (``run_study``).

search_space  ``tune.space`` parsed and checked against the config before any trial
objective     ``Objective``: one trial = one ``fit`` on train/val, reporting every epoch
storage       journal file / RDB URL; recovery of trials a killed worker left RUNNING
workers       one or more worker processes; exactly ``n_trials`` finished trials
report        trials.csv, summary.json, best.yaml, figures
study         ``run_study``: all of the above in order
"""

from __future__ import annotations

from medxfer.tune.objective import Objective
from medxfer.tune.search_space import Param, parse_space
from medxfer.tune.study import StudyOptions, run_study

__all__ = ["Objective", "Param", "StudyOptions", "parse_space", "run_study"]
