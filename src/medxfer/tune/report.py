"""After the study: trials.csv, summary.json, best.yaml and the Optuna figures.

``best.yaml`` is the full resolved config with the best values applied and the full training
budget (not the per-trial ``tune.epochs`` / ``tune.train_subset``): ``medxfer train --config
best.yaml`` trains it.
"""

from __future__ import annotations

import csv
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from medxfer.config import ExperimentConfig, save_config
from medxfer.tune.objective import best_config


def counts(study: optuna.Study) -> dict[str, int]:
    trials = study.get_trials(deepcopy=False)
    surplus = sum(bool(t.user_attrs.get("surplus")) for t in trials)
    out = {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState}
    out["fail"] -= surplus
    return {
        "complete": out["complete"],
        "pruned": out["pruned"],
        "failed": out["fail"],
        "running": out["running"],
        "waiting": out["waiting"],
        "surplus": surplus,
    }


def _row(t: FrozenTrial, keys: list[str], attrs: list[str]) -> dict[str, Any]:
    duration = t.duration.total_seconds() if t.duration is not None else None
    row: dict[str, Any] = {
        "number": t.number,
        "state": t.state.name,
        "value": t.value,
        "datetime_start": t.datetime_start,
        "datetime_complete": t.datetime_complete,
        "duration_s": duration,
        "epochs_reported": len(t.intermediate_values),
    }
    row |= {f"params_{k}": t.params.get(k) for k in keys}
    row |= {f"user_attrs_{k}": t.user_attrs.get(k) for k in attrs}
    row["retry_of"] = t.system_attrs.get("failed_trial")
    return row


def write_trials_csv(study: optuna.Study, path: Path) -> None:
    """One row per trial (the columns of ``study.trials_dataframe()``, without pandas)."""
    trials = study.get_trials(deepcopy=False)
    keys = sorted({k for t in trials for k in t.params})
    attrs = sorted({k for t in trials for k in t.user_attrs})
    rows = [_row(t, keys, attrs) for t in trials]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["number"])
        writer.writeheader()
        writer.writerows(rows)


def _figure_makers(study: optuna.Study) -> dict[str, Callable[[], Any]]:
    from optuna.visualization import matplotlib as vis

    return {
        "optimization_history": lambda: vis.plot_optimization_history(study),
        "param_importances": lambda: vis.plot_param_importances(study),
        "parallel_coordinate": lambda: vis.plot_parallel_coordinate(study),
        "intermediate_values": lambda: vis.plot_intermediate_values(study),
    }


def save_figures(study: optuna.Study, folder: Path) -> tuple[list[str], dict[str, str]]:
    """Write the Optuna matplotlib figures; return (written, skipped name -> reason)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    n_params = len({k for t in complete for k in t.params})
    written, skipped = [], {}
    for name, make in _figure_makers(study).items():
        if not complete:
            skipped[name] = "no complete trial"
            continue
        if name == "param_importances" and (len(complete) < 2 or n_params < 2):
            skipped[name] = "needs >= 2 complete trials and > 1 parameter"
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = make()
            fig = ax.flatten()[0].figure if hasattr(ax, "flatten") else ax.figure
            fig.savefig(folder / f"{name}.png", dpi=120, bbox_inches="tight")
            plt.close(fig)
            written.append(f"{name}.png")
        except Exception as err:  # a figure never fails the study
            skipped[name] = f"{type(err).__name__}: {err}"
            plt.close("all")
    return written, skipped


def _best(study: optuna.Study) -> dict[str, Any] | None:
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return None
    t = study.best_trial
    return {"number": t.number, "value": t.value, "params": t.params,
            "trial_dir": t.user_attrs.get("trial_dir")}  # fmt: skip


def write_reports(
    study: optuna.Study,
    cfg: ExperimentConfig,
    study_dir: Path,
    n_trials: int,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """Write trials.csv, best.yaml, figures/ and summary.json; return the summary."""
    write_trials_csv(study, study_dir / "trials.csv")
    best = _best(study)
    summary: dict[str, Any] = {"study_name": study.study_name, "study_dir": str(study_dir),
                               "n_trials": n_trials, **counts(study), **extra}  # fmt: skip
    summary["best"] = best
    if best is not None:
        save_config(best_config(cfg, best["params"]), study_dir / "best.yaml")
        summary["best_config"] = str(study_dir / "best.yaml")
    written, skipped = save_figures(study, study_dir / "figures")
    summary["figures"] = written
    summary["figures_skipped"] = skipped
    (study_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
