"""The replication's per-method learning-rate protocol, fixed before any of its runs (docs/replication.md,
"Learning rates: one per method, by a rule fixed in advance").

Rule (version `RULE_VERSION`):

- Models: the text-prior models (`DemoSetup.with_text_prior(0.25)`) of each task.
- Grid: `{lr / 2, lr, 2 lr}` around the task's OPD learning rate (`REPLICATION_SPECS`: area 2e-3, perimeter 1e-3).
- Tuned rows: `TUNED_METHODS`. The masking-analysis rows use OPD's chosen learning rate (they are analyses of OPD);
  rollout weighting only and token grouping only use VA-OPD's (ablations of it): `BORROWED`.
- Tuning seeds `TUNING_SEEDS` (100 and 101), disjoint from the evaluation seeds 0-4, each at the full budget.
- Criterion: the mean over the tuning seeds of the final greedy accuracy on the validation probe (64 validation
  figures, disjoint from the 256 test figures; the tuning runs never read the test figures). Every learning rate
  within one probe figure (`1 / probe_size`) of the best counts as tied; among tied ones the one closest to the task's
  OPD learning rate in log ratio wins, then the smaller.

`choose_learning_rate` is the rule; `learning_rate_choice` applies it to the tuning runs and names what
`lr_choice.json` holds; `learning_rates_from_choice` reads such a file back for the evaluation runs.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


__all__ = [
    "BORROWED",
    "RULE",
    "RULE_VERSION",
    "TUNED_METHODS",
    "TUNING_SEEDS",
    "choose_learning_rate",
    "learning_rate_choice",
    "learning_rate_grid",
    "learning_rates_from_choice",
]

RULE_VERSION = 1
RULE = (
    "grid {lr/2, lr, 2 lr} around the task's OPD lr; tuning seeds 100 and 101 at the full budget; criterion: the mean "
    "over the tuning seeds of the final greedy accuracy on the validation probe; lrs within one probe figure of the "
    "best are tied, among them the closest to the task's OPD lr in log ratio wins, then the smaller; the masking rows "
    "use OPD's lr, weighting_only and grouping_only VA-OPD's; the test figures are never read while tuning"
)
TUNED_METHODS = (
    "opd",
    "vaopd",
    "vaopd_view_kl",
    "vgs",
    "vaopd_vgs",
    "vicur_cue",
    "vicur",
    "vicur_vaopd",
    "grpo",
    "opd_grpo",
    "vgs_grpo",
)
#: Rows that take the learning rate chosen for another: the masking analyses of OPD, the ablations of VA-OPD
BORROWED = {
    "mask_top10": "opd",
    "mask_low10": "opd",
    "mask_random10": "opd",
    "weighting_only": "vaopd",
    "grouping_only": "vaopd",
}
TUNING_SEEDS = (100, 101)


def learning_rate_grid(default: float) -> tuple[float, float, float]:
    """The three learning rates tried for every tuned row: half, once and twice the task's OPD learning rate."""
    return (default / 2, default, default * 2)


def choose_learning_rate(scores: Mapping[float, Sequence[float]], default: float, probe_size: int) -> float:
    """The rule: `scores` maps each learning rate tried to its final probe accuracies (one per tuning seed).

    The best mean wins, except that every learning rate within one probe figure (`1 / probe_size`) of the best counts
    as tied; among tied ones the one closest to `default` in log ratio wins, then the smaller.
    """
    if not scores:
        raise ValueError("choose_learning_rate needs the probe accuracies of at least one learning rate.")
    counts = {len(values) for values in scores.values()}
    if 0 in counts or len(counts) > 1:
        raise ValueError(
            f"Every learning rate needs the same number of tuning runs (one per seed), got {sorted(counts)}: finish "
            "the missing tuning runs (the grid resumes) before choosing."
        )
    means = {lr: statistics.fmean(values) for lr, values in scores.items()}
    best = max(means.values())
    # Accuracies are multiples of 1/(probe_size * seeds): the tolerance only absorbs floating point
    tied = [lr for lr, mean in means.items() if mean >= best - 1 / probe_size - 1e-9]
    return min(tied, key=lambda lr: (abs(math.log(lr / default)), lr))


def learning_rate_choice(
    runs: Sequence[Mapping[str, Any]], default: float, probe_size: int, methods: Sequence[str]
) -> dict[str, Any]:
    """Apply the rule to tuning runs (each with `method`, `learning_rate`, `seed` and its probe `curve`).

    Returns what `lr_choice.json` holds besides the run context: every run's probe figures, each tuned method's mean
    per learning rate, the chosen learning rate per method (the borrowing rows included when their source was tuned)
    and the rule's version.
    """
    scores: dict[str, dict[float, list[float]]] = {}
    figures = []
    for run in runs:
        final = run["curve"][-1]
        if final["step"] != run["spec"]["steps"]:
            raise ValueError(f"The tuning run {run['method']} (seed {run['seed']}) has no final probe.")
        lr = run["spec"]["learning_rate"]
        scores.setdefault(run["method"], {}).setdefault(lr, []).append(final["accuracy"])
        figures.append(
            {
                "method": run["method"],
                "learning_rate": lr,
                "seed": run["seed"],
                "final_probe_accuracy": final["accuracy"],
                "probe_curve": [{"step": p["step"], "accuracy": p["accuracy"]} for p in run["curve"]],
            }
        )
    chosen = {m: choose_learning_rate(scores[m], default, probe_size) for m in methods if m in scores}
    chosen.update({m: chosen[source] for m, source in BORROWED.items() if source in chosen})
    return {
        "rule_version": RULE_VERSION,
        "rule": RULE,
        "default_learning_rate": default,
        "probe_size": probe_size,
        "mean_final_probe_accuracy": {
            m: {f"{lr:g}": statistics.fmean(values) for lr, values in sorted(by_lr.items())}
            for m, by_lr in scores.items()
        },
        "chosen": chosen,
        "borrowed": {m: source for m, source in BORROWED.items() if m in chosen},
        "runs": figures,
    }


def learning_rates_from_choice(path: str | os.PathLike, task: str, setup_key: str) -> dict[str, float]:
    """The chosen learning rate per method from a `lr_choice.json`, checked against the task and the models the
    evaluation runs use (a learning rate chosen on other models is refused)."""
    choice = json.loads(Path(path).read_text())
    if choice.get("rule_version") != RULE_VERSION:
        raise ValueError(
            f"{path} was written by version {choice.get('rule_version')} of the learning-rate rule, this code applies "
            f"version {RULE_VERSION}: rerun the grid (--lr_grid) into a new output directory."
        )
    if choice["task"] != task:
        raise ValueError(f"{path} holds the learning rates of the {choice['task']} task, not of the {task} task.")
    if choice["setup_key"] != setup_key:
        raise ValueError(
            f"{path} was chosen on the models with cache key {choice['setup_key']} (text prior "
            f"{choice['text_prior_rate']}), but these runs use {setup_key}: pass the same --text_prior (and --tiny) "
            "as the grid run."
        )
    return dict(choice["chosen"])
