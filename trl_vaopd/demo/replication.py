"""The small-scale replication of the paper's claims (METHOD.md section 8) on the demo task.

Every method of `experiment.METHODS` (standard OPD, VA-OPD, the two single-component ablations and the three KL
masks) is run for every seed with the same budget: the same cached teacher and student, the same prompts in the same
order for a given seed, the same rollouts per step, steps and optimiser. The results are written as JSON (every run
in full), a markdown table (means and sample standard deviations across seeds, and differences to standard OPD paired
by seed) and PNG plots.

`examples/replicate.py` is the command line; `run_replication` the function behind it.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .analysis import kl_va_alignment
from .experiment import METHODS, DistillSpec, run_distillation
from .models import DemoSetup, cpu_threads, prepare_models, quick_setup


__all__ = ["REPLICATION_SPEC", "aggregate", "markdown_report", "plot_replication", "run_replication"]

#: The replication's budget per run: 150 steps x 8 prompts x 4 rollouts, AdamW at 1e-3
REPLICATION_SPEC = DistillSpec(steps=150, eval_every=25)
#: Probe accuracy that counts as "reached" in the speed comparison
SPEED_THRESHOLD = 0.5

_LABELS = {
    "opd": "Standard OPD",
    "vaopd": "VA-OPD",
    "weighting_only": "Rollout weighting only",
    "grouping_only": "Token grouping only",
    "mask_top10": "OPD, top-10% VA tokens masked",
    "mask_low10": "OPD, 10% lowest-VA tokens masked",
    "mask_random10": "OPD, 10% random tokens masked",
}


def _run_job(job: dict[str, Any]) -> dict[str, Any]:
    """One (method, seed) run, in a worker process: models come from the cache prepared by the parent."""
    import torch  # noqa: F401  (imported before the thread setting)

    with cpu_threads(job["threads"]):
        models = prepare_models(job["setup"], cache_dir=job["cache_dir"], progress=False)
        with tempfile.TemporaryDirectory() as output_dir:
            result = run_distillation(
                models, job["method"], job["seed"], job["spec"], output_dir=output_dir, progress=False
            )
    result["student_start"] = models.meta["student"]["heldout_accuracy"]
    return result


def run_replication(
    output_dir: str | os.PathLike = "replication",
    methods: Sequence[str] = tuple(METHODS),
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    spec: DistillSpec = REPLICATION_SPEC,
    setup: DemoSetup | None = None,
    cache_dir: str | None = None,
    workers: int = 1,
    threads: int | None = None,
    quick: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Run every method for every seed (resuming: runs already in `output_dir/runs/` are kept), then write
    `results.json`, `results.md` and `replication.png` under `output_dir`. Returns the aggregate.

    Args:
        workers: Runs in parallel, in separate processes with `threads` torch threads each (1 by default): on a
            2-core machine, 2 workers use both cores.
        quick: The seconds-long setup of the tests (meaningless accuracies).
    """
    from tqdm.auto import tqdm

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"Unknown methods {unknown}; expected some of {list(METHODS)}")
    start = time.perf_counter()
    out = Path(output_dir)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    setup = setup or (quick_setup() if quick else DemoSetup())
    with cpu_threads(threads):
        models = prepare_models(setup, cache_dir=cache_dir, progress=progress)
    jobs = []
    for seed in seeds:
        for method in methods:
            path = out / "runs" / f"{method}_seed{seed}.json"
            if path.is_file() and json.loads(path.read_text()).get("spec") == asdict(spec):
                continue
            jobs.append(
                {
                    "method": method,
                    "seed": seed,
                    "spec": spec,
                    "setup": setup,
                    "cache_dir": cache_dir,
                    "threads": threads,
                    "path": str(path),
                }
            )
    bar = tqdm(total=len(jobs), desc="replication runs", disable=not progress)

    def save(job: dict[str, Any], result: dict[str, Any]) -> None:
        Path(job["path"]).write_text(json.dumps(result, indent=1))
        bar.update(1)
        if progress:
            tqdm.write(
                f"  {job['method']:<15} seed {job['seed']}: greedy {result['final']['greedy']:.1%}, "
                f"avg@{spec.final_samples} {result['final'][f'avg@{spec.final_samples}']:.1%} "
                f"({result['train_seconds']:.0f}s)"
            )

    if workers > 1 and len(jobs) > 1:
        import multiprocessing

        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_run_job, job): job for job in jobs}
            from concurrent.futures import as_completed

            for future in as_completed(futures):
                save(futures[future], future.result())
    else:
        for job in jobs:
            save(job, _run_job(job))
    bar.close()

    runs = [
        json.loads((out / "runs" / f"{method}_seed{seed}.json").read_text()) for seed in seeds for method in methods
    ]
    report = aggregate(runs, models.meta, spec)
    with cpu_threads(threads):
        # Where the KL sits relative to VA on the starting student's rollouts (explains the masking results)
        report["kl_va_alignment"] = kl_va_alignment(models, num_items=min(64, len(models.validation_items)))
    report["wall_seconds_this_call"] = round(time.perf_counter() - start, 1)
    report["workers"] = workers
    (out / "results.json").write_text(json.dumps({**report, "runs": runs}, indent=1))
    (out / "results.md").write_text(markdown_report(report))
    plot_replication(runs, report, out / "replication.png")
    if progress:
        tqdm.write(f"Wrote {out / 'results.md'}, {out / 'results.json'} and {out / 'replication.png'}")
    return report


# ---------------------------------------------------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------------------------------------------------


def _stats(values: Sequence[float | None]) -> dict[str, float | int | None]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def _steps_to(curve: list[dict[str, float]], threshold: float) -> float | None:
    for point in curve:
        if point["accuracy"] >= threshold:
            return point["step"]
    return None


def _curve_mean(curve: list[dict[str, float]], key: str) -> float:
    return statistics.fmean(point[key] for point in curve)


def aggregate(runs: list[dict[str, Any]], meta: dict[str, Any], spec: DistillSpec) -> dict[str, Any]:
    """Per-method means and standard deviations across seeds, and differences to standard OPD paired by seed."""
    k = spec.final_samples
    by_method: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        by_method.setdefault(run["method"], []).append(run)

    def metrics(run: dict[str, Any]) -> dict[str, float | None]:
        curve = run["curve"]
        return {
            "greedy": run["final"]["greedy"],
            f"avg@{k}": run["final"][f"avg@{k}"],
            "probe_auc": _curve_mean(curve, "accuracy"),
            "steps_to_threshold": _steps_to(curve, SPEED_THRESHOLD),
            "reliance_start": curve[0]["visual_reliance"],
            "reliance_end": curve[-1]["visual_reliance"],
            "reliance_change": curve[-1]["visual_reliance"] - curve[0]["visual_reliance"],
            "va_mean": run["va_mean"],
            "va_top10_share": run["va_top10_share"],
            "masked_va_share": run.get("masked_va_share"),
            "train_seconds": run["train_seconds"],
        }

    per_run = {m: {r["seed"]: metrics(r) for r in rs} for m, rs in by_method.items()}
    table = {}
    for method, seeds in per_run.items():
        keys = next(iter(seeds.values())).keys()
        row = {key: _stats([s[key] for s in seeds.values()]) for key in keys}
        # Runs that never reached the threshold are counted as not reaching it, not as missing
        row["reached_threshold"] = sum(s["steps_to_threshold"] is not None for s in seeds.values())
        if method != "opd" and "opd" in per_run:
            paired = [s for s in seeds if s in per_run["opd"]]
            for key in ("greedy", f"avg@{k}", "probe_auc", "reliance_change"):
                row[f"{key}_minus_opd"] = _stats([seeds[s][key] - per_run["opd"][s][key] for s in paired])
        table[method] = row
    return {
        "spec": asdict(spec),
        "seeds": sorted({r["seed"] for r in runs}),
        "threshold": SPEED_THRESHOLD,
        "teacher": meta["teacher"],
        "student": meta["student"],
        "setup_key": meta.get("key"),
        "num_test": meta["setup"]["num_test"],
        "methods": table,
    }


def _fmt(stat: dict[str, Any] | None, percent: bool = True, signed: bool = False, digits: int = 1) -> str:
    if not stat or stat.get("mean") is None:
        return "-"
    scale = 100 if percent else 1
    sign = "+" if signed else ""
    return f"{stat['mean'] * scale:{sign}.{digits}f} ± {stat['std'] * scale:.{digits}f}"


def markdown_report(report: dict[str, Any]) -> str:
    """The results as markdown: budget, the main table, the masking table and the paired differences."""
    spec, table = report["spec"], report["methods"]
    k = spec["final_samples"]
    n_seeds = len(report["seeds"])
    teacher, student = report["teacher"], report["student"]
    lines = [
        f"Seeds {', '.join(map(str, report['seeds']))}; per run {spec['steps']} steps x {spec['prompts_per_step']} "
        f"prompts x {spec['num_generations']} rollouts ({spec['steps'] * spec['prompts_per_step']} prompts, "
        f"{spec['steps'] * spec['prompts_per_step'] * spec['num_generations']} rollouts), AdamW lr "
        f"{spec['learning_rate']:g} (cosine, {spec['warmup_ratio']:.0%} warm-up), sampling temperature "
        f"{spec['temperature']:g}, top-p {spec['top_p']:g}. Teacher: {teacher['heldout_accuracy']:.1%} held-out greedy "
        f"accuracy; student at the start: {student['heldout_accuracy']:.1%}. Held-out accuracy on "
        f"the {report['num_test']} test figures: greedy, and avg@{k} at temperature 1. Means ± sample standard "
        "deviations over "
        f"{n_seeds} seeds.",
        "",
        f"| Method | Greedy acc. (%) | avg@{k} (%) | Mean probe acc. over training (%) | Steps to "
        f"{report['threshold']:.0%} probe acc. | Student visual reliance: start → end (nats/token) | Teacher VA "
        "top-10% share (%) |",
        "|---|---|---|---|---|---|---|",
    ]
    main = [m for m in ("opd", "vaopd", "weighting_only", "grouping_only") if m in table]
    masks = [m for m in ("mask_top10", "mask_low10", "mask_random10") if m in table]

    def speed(row: dict[str, Any]) -> str:
        reached = row["reached_threshold"]
        if reached == 0:
            return f"not reached (0/{row['greedy']['n']})"
        return f"{_fmt(row['steps_to_threshold'], percent=False, digits=0)} ({reached}/{row['greedy']['n']} reached)"

    for method in main + masks:
        row = table[method]
        reliance = (
            f"{row['reliance_start']['mean']:.3f} → {row['reliance_end']['mean']:.3f} "
            f"(change {_fmt(row['reliance_change'], percent=False, signed=True, digits=3)})"
        )
        lines.append(
            f"| {_LABELS[method]} | {_fmt(row['greedy'])} | {_fmt(row[f'avg@{k}'])} | {_fmt(row['probe_auc'])} | "
            f"{speed(row)} | {reliance} | {_fmt(row['va_top10_share'], digits=2)} |"
        )
    others = [m for m in main + masks if m != "opd" and "greedy_minus_opd" in table[m]]
    if others:
        lines += [
            "",
            "Differences to standard OPD, paired by seed (mean ± standard deviation of the per-seed differences, "
            "in points):",
            "",
            f"| Method | Δ greedy | Δ avg@{k} | Δ mean probe acc. | Δ reliance change (nats/token) |",
            "|---|---|---|---|---|",
        ]
        for method in others:
            row = table[method]
            lines.append(
                f"| {_LABELS[method]} | {_fmt(row['greedy_minus_opd'], signed=True)} | "
                f"{_fmt(row[f'avg@{k}_minus_opd'], signed=True)} | {_fmt(row['probe_auc_minus_opd'], signed=True)} | "
                f"{_fmt(row['reliance_change_minus_opd'], percent=False, signed=True, digits=3)} |"
            )
    if masks:
        lines += ["", "Share of the teacher's VA mass on the masked tokens (over training):", ""]
        lines += [f"- {_LABELS[m]}: {_fmt(table[m]['masked_va_share'])}%" for m in masks]
    alignment = report.get("kl_va_alignment")
    if alignment:
        right, wrong = alignment["width_right"], alignment["width_wrong"]

        def nats(value: float | None) -> str:
            return "-" if value is None else f"{value:.2f}"

        lines += [
            "",
            f"KL versus VA on {alignment['rollouts']} rollouts of the starting student (temperature "
            f"{alignment['temperature']:g}), per token, KL = KL(student || teacher) on the original image:",
            "",
            f"- share of the KL mass on each response's 10% highest-VA tokens: {alignment['kl_share_top10_va']:.1%}; "
            f"10% lowest-VA tokens: {alignment['kl_share_low10_va']:.1%}; 10% random tokens: "
            f"{alignment['kl_share_random10']:.1%}; the number tokens: {alignment['kl_share_numbers']:.1%}",
            f"- the stated width, when right ({right['count']} rollouts): VA {nats(right['va'])}, KL "
            f"{nats(right['kl'])} nats; when wrong ({wrong['count']}): VA {nats(wrong['va'])}, KL {nats(wrong['kl'])} "
            "nats",
        ]
    return "\n".join(lines) + "\n"


def plot_replication(runs: list[dict[str, Any]], report: dict[str, Any], path: str | os.PathLike) -> None:
    """Probe accuracy and student visual reliance along training (mean across seeds, shaded min-max), per method."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(14, 4.2), dpi=120)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    colours = {
        "opd": "tab:blue",
        "vaopd": "tab:red",
        "weighting_only": "tab:orange",
        "grouping_only": "tab:purple",
        "mask_top10": "black",
        "mask_low10": "tab:green",
        "mask_random10": "tab:gray",
    }
    groups = [
        ("opd", "vaopd", "weighting_only", "grouping_only"),
        ("opd", "mask_top10", "mask_low10", "mask_random10"),
    ]
    titles = ["probe accuracy: VA-OPD and ablations", "probe accuracy: KL masking (on standard OPD)"]
    by_method: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        by_method.setdefault(run["method"], []).append(run)

    def band(ax, method: str, key: str) -> None:
        method_runs = by_method.get(method)
        if not method_runs:
            return
        steps = [p["step"] for p in method_runs[0]["curve"]]
        values = [[p[key] for p in r["curve"]] for r in method_runs]
        mean = [statistics.fmean(col) for col in zip(*values, strict=True)]
        ax.plot(steps, mean, color=colours[method], label=_LABELS[method], marker="o", ms=3)
        ax.fill_between(
            steps,
            [min(col) for col in zip(*values, strict=True)],
            [max(col) for col in zip(*values, strict=True)],
            color=colours[method],
            alpha=0.12,
        )

    for ax, group, title in zip(axes[:2], groups, titles, strict=True):
        for method in group:
            band(ax, method, "accuracy")
        ax.axhline(report["teacher"]["heldout_accuracy"], color="black", ls=":", lw=1, label="teacher")
        ax.set(title=title, xlabel="step", ylabel="greedy accuracy", ylim=(0, 1.02))
        ax.legend(fontsize=7, loc="upper left")
    for method in ("opd", "vaopd", "mask_top10"):
        band(axes[2], method, "visual_reliance")
    axes[2].set(title="student visual reliance (own rollouts)", xlabel="step", ylabel="log-prob gap per token")
    axes[2].legend(fontsize=7, loc="upper left")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
