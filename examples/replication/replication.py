"""The small-scale replication of the papers' claims on the demo's two tasks, every method side by side.

Every method of `trl_vaopd.demo.experiment.METHODS` (standard OPD, VA-OPD, VA-OPD on the package's own VA variant, its
two single-component ablations, the three KL masks of the VA-OPD paper's analysis, VGS, VA-OPD + VGS, ViCuR with the
cue teacher alone, with the cue-recovery module, ViCuR + VA-OPD, and the three GRPO rows) is run for every seed with the same budget on one task (`area` or
`perimeter`, `trl_vaopd.demo.task`): the same cached teacher and student, the same prompts in the same order for a
given seed, the same rollouts per step, steps and optimiser. The results are written as JSON (every run in full), a
markdown table (means and sample standard deviations across seeds, differences to standard OPD paired by seed with
95% intervals, the task's regime) and a PNG figure (probe accuracy over steps, one line per method, a band over seeds).
Each method may have a learning rate of its own (`learning_rates`), and `run_lr_grid` chooses them by the fixed rule
of `lr_protocol` on tuning seeds, from the validation probe alone.

This is research code beside the examples, not part of the package: `examples/replicate.py` is its command line.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from analysis import kl_va_alignment
from lr_protocol import TUNED_METHODS, TUNING_SEEDS, learning_rate_choice, learning_rate_grid

from trl_vaopd.demo.experiment import METHODS, DistillSpec, run_distillation
from trl_vaopd.demo.models import DemoModels, DemoSetup, cpu_threads, prepare_models, quick_setup
from trl_vaopd.demo.task import TaskConfig, split_items, text_only_accuracy


__all__ = [
    "LABELS",
    "REPLICATION_SPECS",
    "aggregate",
    "markdown_report",
    "plot_replication",
    "replication_setup",
    "run_lr_grid",
    "run_replication",
]

#: Each task's budget per run: 150 steps x 8 prompts x 4 rollouts. The learning rate is the one of 5e-4, 1e-3, 2e-3
#: (and 4e-3 on the perimeter task) that gave standard OPD the best final probe accuracy on seed 0, chosen before any
#: other method ran (docs/replication.md)
REPLICATION_SPECS = {
    "area": DistillSpec(steps=150, eval_every=25, learning_rate=2e-3),
    "perimeter": DistillSpec(steps=150, eval_every=25, learning_rate=1e-3),
}

LABELS = {
    "opd": "Standard OPD",
    "vaopd": "VA-OPD",
    "vaopd_view_kl": "VA-OPD, teacher's view divergence as VA (package variant)",
    "weighting_only": "Rollout weighting only",
    "grouping_only": "Token grouping only",
    "mask_top10": "OPD, top-10% VA tokens masked",
    "mask_low10": "OPD, 10% lowest-VA tokens masked",
    "mask_random10": "OPD, 10% random tokens masked",
    "vgs": "VGS",
    "vaopd_vgs": "VA-OPD + VGS",
    "vicur_cue": "ViCuR, cue teacher alone",
    "vicur": "ViCuR, cue teacher + module",
    "vicur_vaopd": "ViCuR + VA-OPD",
    "grpo": "GRPO alone (accuracy reward)",
    "opd_grpo": "OPD + GRPO (0.3 OPD)",
    "vgs_grpo": "VGS + GRPO (0.3 VGS, the paper's mix)",
}
MASKS = ("mask_top10", "mask_low10", "mask_random10")
# Two-sided 95% quantiles of Student's t, by degrees of freedom (the normal quantile beyond the table)
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def replication_setup(task: str, quick: bool = False, text_prior: float | None = None) -> DemoSetup:
    """The teacher and student settings of a task: the demo's (or the tests' seconds-long ones with `quick`), with a
    text-only prior learned at rate `text_prior` when it is set (`DemoSetup.with_text_prior`)."""
    config = TaskConfig(kind=task)
    setup = quick_setup(config) if quick else DemoSetup(task=config)
    return setup.with_text_prior(text_prior) if text_prior else setup


def _models_record(setup: DemoSetup, models: DemoModels | None = None) -> dict[str, Any]:
    """Which models a run used: their cache key, the text-prior rate (`None` for the default models) and, once they are
    prepared, a fingerprint of their weights. The cache key names the settings; a machine with other floating point
    trains other weights from them, so only the fingerprint tells two such model pairs apart."""
    record = {"setup_key": setup.key(), "text_prior_rate": setup.teacher_training.blind_rate or None}
    if models is not None:
        digest = hashlib.sha256()
        for path in (models.teacher_path, models.student_path):
            digest.update((Path(path) / "model.safetensors").read_bytes())
        record["weights"] = digest.hexdigest()[:16]
    return record


def _describe(record: dict[str, Any]) -> str:
    kind = (
        f"text-prior models (rate {record['text_prior_rate']:g})"
        if record["text_prior_rate"]
        else "the default models"
    )
    return f"{kind}, cache key {record['setup_key'] or 'not recorded'}"


def _check_models(run_dir: Path, record: dict[str, Any]) -> None:
    """Refuse to resume into a directory whose runs used other models: one table must come from one model pair.
    Runs written before the record existed carry none; they all used the default models."""
    for path in sorted(run_dir.glob("*.json")):
        theirs = json.loads(path.read_text()).get("models", {"setup_key": None, "text_prior_rate": None})
        same_kind = theirs["text_prior_rate"] == record["text_prior_rate"]
        if not same_kind or theirs["setup_key"] not in (None, record["setup_key"]):
            raise ValueError(
                f"{run_dir} holds runs made with {_describe(theirs)} ({path.name}), but this call uses "
                f"{_describe(record)}: resuming would mix model kinds in one table. Use another --output_dir, or the "
                "same models (the same --text_prior and --tiny) as those runs."
            )
        if record.get("weights") and theirs.get("weights") not in (None, record["weights"]):
            raise ValueError(
                f"{run_dir} holds runs made with other weights under the same settings ({path.name}: weights "
                f"{theirs['weights']}, the cached models here: {record['weights']}; another machine trains other tiny "
                "models from the same settings). Resume on the machine (and model cache) that made those runs, or "
                "use another --output_dir."
            )


def _run_job(job: dict[str, Any]) -> dict[str, Any]:
    """One run, in a worker process: models come from the cache prepared by the parent. Tuning runs
    (`evaluate_test=False`) never read the test figures."""
    import torch  # noqa: F401  (imported before the thread setting)

    with cpu_threads(job["threads"]):
        models = prepare_models(job["setup"], cache_dir=job["cache_dir"], progress=False)
        with tempfile.TemporaryDirectory() as output_dir:
            result = run_distillation(
                models,
                job["method"],
                job["seed"],
                job["spec"],
                output_dir=output_dir,
                progress=False,
                evaluate_test=job["evaluate_test"],
            )
    result["models"] = _models_record(job["setup"], models)
    if job["evaluate_test"]:
        result["student_start"] = models.meta["student"]["heldout_accuracy"]
    return result


def _execute(jobs: list[dict[str, Any]], workers: int, description: str, progress: bool) -> None:
    """Run `jobs` (in `workers` processes when more than one), writing each result to its `path` as it finishes."""
    from tqdm.auto import tqdm

    bar = tqdm(total=len(jobs), desc=description, disable=not progress)

    def save(job: dict[str, Any], result: dict[str, Any]) -> None:
        Path(job["path"]).write_text(json.dumps(result, indent=1))
        bar.update(1)
        if progress:
            spec, final = job["spec"], result["final"]
            scores = (
                f"greedy {final['greedy']:.1%}, avg@{spec.final_samples} {final[f'avg@{spec.final_samples}']:.1%}"
                if final is not None
                else f"lr {spec.learning_rate:g}, final probe {result['curve'][-1]['accuracy']:.1%}"
            )
            tqdm.write(f"  {job['method']:<15} seed {job['seed']}: {scores} ({result['train_seconds']:.0f}s)")

    if workers > 1 and len(jobs) > 1:
        import multiprocessing

        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_run_job, job): job for job in jobs}
            for future in as_completed(futures):
                save(futures[future], future.result())
    else:
        for job in jobs:
            save(job, _run_job(job))
    bar.close()


def _pending(path: Path, spec: DistillSpec) -> bool:
    """Whether the run at `path` is still to do: missing, or made with another budget or learning rate."""
    return not (path.is_file() and json.loads(path.read_text()).get("spec") == asdict(spec))


def run_replication(
    output_dir: str | os.PathLike = "replication",
    task: str = "area",
    methods: Sequence[str] = tuple(METHODS),
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    spec: DistillSpec | None = None,
    setup: DemoSetup | None = None,
    cache_dir: str | None = None,
    workers: int = 1,
    threads: int | None = None,
    quick: bool = False,
    progress: bool = True,
    learning_rates: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Run every method for every seed on `task` (resuming: runs already in `output_dir/runs/` with the same budget
    and learning rate are kept), then write `results.json`, `results.md` and `replication.png` under `output_dir`.
    Returns the aggregate.

    Args:
        task: `"area"` or `"perimeter"`.
        spec: The budget; the task's `REPLICATION_SPECS` entry when `None`.
        setup: The teacher and student settings; `replication_setup(task, quick)` when `None`. A directory holds runs
            of one model pair: resuming with other models is refused.
        workers: Runs in parallel, in separate processes with `threads` torch threads each (1 by default): on a
            2-core machine, 2 workers use both cores.
        quick: The seconds-long setup of the tests (meaningless accuracies).
        learning_rates: A learning rate per method (e.g. `lr_choice.json`'s chosen ones); the others use `spec`'s.
    """
    unknown = [m for m in [*methods, *(learning_rates or {})] if m not in METHODS]
    if unknown:
        raise ValueError(f"Unknown methods {unknown}; expected some of {list(METHODS)}")
    if "opd" not in methods:
        raise ValueError("Standard OPD ('opd') is the baseline every method is compared with: include it.")
    start = time.perf_counter()
    out = Path(output_dir)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    setup = setup or replication_setup(task, quick)
    _check_models(out / "runs", _models_record(setup))  # the model kind, before any model is trained
    spec = spec or REPLICATION_SPECS[task]
    specs = {m: replace(spec, learning_rate=(learning_rates or {}).get(m, spec.learning_rate)) for m in methods}
    with cpu_threads(threads):
        models = prepare_models(setup, cache_dir=cache_dir, progress=progress)
    record = _models_record(setup, models)
    _check_models(out / "runs", record)
    jobs = []
    for seed in seeds:
        for method in methods:
            path = out / "runs" / f"{method}_seed{seed}.json"
            if _pending(path, specs[method]):
                job = {"method": method, "seed": seed, "spec": specs[method], "setup": setup, "cache_dir": cache_dir}
                jobs.append({**job, "threads": threads, "path": str(path), "evaluate_test": True})
    _execute(jobs, workers, f"replication runs ({task})", progress)

    runs = [
        json.loads((out / "runs" / f"{method}_seed{seed}.json").read_text()) for seed in seeds for method in methods
    ]
    report = aggregate(runs, models.meta, spec)
    report["task"] = task
    report["models"] = record
    with cpu_threads(threads):
        # The task's regime, on the starting student's rollouts: where the KL sits (and where VA sits)
        report["regime"] = kl_va_alignment(models, num_items=min(64, len(models.validation_items)))
    train, _, test = split_items(setup.num_train, setup.num_validation, setup.num_test, setup.data_seed, setup.task)
    report["regime"]["text_only_accuracy"] = text_only_accuracy(train, test, setup.task)
    report["wall_seconds_this_call"] = round(time.perf_counter() - start, 1)
    report["workers"] = workers
    (out / "results.json").write_text(json.dumps({**report, "runs": runs}, indent=1))
    (out / "results.md").write_text(markdown_report(report))
    plot_replication(runs, report, out / "replication.png")
    if progress:
        print(f"Wrote {out / 'results.md'}, {out / 'results.json'} and {out / 'replication.png'}")
    return report


def run_lr_grid(
    output_dir: str | os.PathLike = "replication",
    task: str = "area",
    methods: Sequence[str] = TUNED_METHODS,
    seeds: Sequence[int] = TUNING_SEEDS,
    spec: DistillSpec | None = None,
    setup: DemoSetup | None = None,
    cache_dir: str | None = None,
    workers: int = 1,
    threads: int | None = None,
    quick: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """The learning-rate search of `lr_protocol`: every method at each rate of `learning_rate_grid(spec's rate)` for
    every tuning seed, the test figures never read (runs in `output_dir/lr_grid/runs/`, resuming), then the rule's
    choice written to `output_dir/lr_choice.json` and returned.

    Args:
        methods: Rows to tune, some of `lr_protocol.TUNED_METHODS` (the others borrow a tuned row's rate).
        seeds: The tuning seeds; they must not be evaluation seeds (0-4).
        Others: as `run_replication`.
    """
    untuned = [m for m in methods if m not in TUNED_METHODS]
    if untuned:
        raise ValueError(
            f"{untuned} are not tuned by the learning-rate rule (the masking rows use OPD's rate, weighting_only and "
            f"grouping_only VA-OPD's): tune some of {list(TUNED_METHODS)}."
        )
    if set(seeds) & set(range(5)):
        raise ValueError(
            f"Tuning seeds {sorted(set(seeds) & set(range(5)))} are evaluation seeds (0-4): tune on others, such as "
            f"{list(TUNING_SEEDS)}."
        )
    out = Path(output_dir)
    run_dir = out / "lr_grid" / "runs"
    run_dir.mkdir(parents=True, exist_ok=True)
    setup = setup or replication_setup(task, quick)
    _check_models(run_dir, _models_record(setup))  # the model kind, before any model is trained
    spec = spec or REPLICATION_SPECS[task]
    with cpu_threads(threads):
        models = prepare_models(setup, cache_dir=cache_dir, progress=progress)
    record = _models_record(setup, models)
    _check_models(run_dir, record)
    grid = learning_rate_grid(spec.learning_rate)
    jobs, paths = [], []
    # Seed-major, so that a cut budget keeps whole seeds
    for seed in seeds:
        for method in methods:
            for lr in grid:
                run_spec = replace(spec, learning_rate=lr)
                path = run_dir / f"{method}_lr{lr:g}_seed{seed}.json"
                paths.append(path)
                if _pending(path, run_spec):
                    job = {"method": method, "seed": seed, "spec": run_spec, "setup": setup, "cache_dir": cache_dir}
                    jobs.append({**job, "threads": threads, "path": str(path), "evaluate_test": False})
    _execute(jobs, workers, f"learning-rate grid ({task})", progress)
    runs = [json.loads(path.read_text()) for path in paths]
    choice = {
        "task": task,
        **record,
        "grid": list(grid),
        "seeds": list(seeds),
        **learning_rate_choice(runs, spec.learning_rate, spec.probe_size, methods),
    }
    (out / "lr_choice.json").write_text(json.dumps(choice, indent=1))
    if progress:
        print(f"Wrote {out / 'lr_choice.json'}: " + ", ".join(f"{m} {lr:g}" for m, lr in choice["chosen"].items()))
    return choice


# ---------------------------------------------------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------------------------------------------------


def _stats(values: Sequence[float | None]) -> dict[str, float | int | None]:
    """Mean, sample standard deviation and the half-width of the 95% t interval of the mean."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return {"mean": None, "std": None, "ci95": None, "n": 0}
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    t = _T95.get(len(values) - 1, 1.96)
    return {
        "mean": statistics.fmean(values),
        "std": std,
        "ci95": t * std / math.sqrt(len(values)) if len(values) > 1 else None,
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
    """Per-method means and spreads across seeds, and differences to standard OPD paired by seed.

    "Steps to OPD's final accuracy": the first probe step at which a method's probe accuracy reaches the final probe
    accuracy of standard OPD with the same seed (the VA-OPD paper's speed claim).
    """
    k = spec.final_samples
    by_method: dict[str, dict[int, dict[str, Any]]] = {}
    for run in runs:
        by_method.setdefault(run["method"], {})[run["seed"]] = run
    opd_final = {seed: run["curve"][-1]["accuracy"] for seed, run in by_method["opd"].items()}

    def metrics(run: dict[str, Any]) -> dict[str, float | None]:
        curve = run["curve"]
        return {
            "greedy": run["final"]["greedy"],
            f"avg@{k}": run["final"][f"avg@{k}"],
            "probe_auc": _curve_mean(curve, "accuracy"),
            "steps_to_opd_final": _steps_to(curve, opd_final[run["seed"]]) if run["seed"] in opd_final else None,
            "reliance_start": curve[0]["visual_reliance"],
            "reliance_end": curve[-1]["visual_reliance"],
            "reliance_change": curve[-1]["visual_reliance"] - curve[0]["visual_reliance"],
            "va_mean": run["va_mean"],
            "va_top10_share": run["va_top10_share"],
            "masked_va_share": run.get("masked_va_share"),
            "train_seconds": run["train_seconds"],
        }

    per_run = {m: {seed: metrics(r) for seed, r in rs.items()} for m, rs in by_method.items()}
    table = {}
    for method, seeds in per_run.items():
        keys = next(iter(seeds.values())).keys()
        row = {key: _stats([s[key] for s in seeds.values()]) for key in keys}
        # Runs that never got there count as not reaching it, not as missing
        row["reached_opd_final"] = sum(s["steps_to_opd_final"] is not None for s in seeds.values())
        if method != "opd":
            paired = [s for s in seeds if s in per_run["opd"]]
            for key in ("greedy", f"avg@{k}", "probe_auc", "reliance_change"):
                row[f"{key}_minus_opd"] = _stats([seeds[s][key] - per_run["opd"][s][key] for s in paired])
        table[method] = row
    return {
        "spec": asdict(spec),
        "seeds": sorted({r["seed"] for r in runs}),
        "teacher": meta["teacher"],
        "student": meta["student"],
        "setup_key": meta.get("key"),
        "num_test": meta["setup"]["num_test"],
        # Each method's runs share one learning rate (`run_replication`'s `learning_rates`)
        "learning_rates": {m: next(iter(rs.values()))["spec"]["learning_rate"] for m, rs in by_method.items()},
        "methods": table,
    }


def _fmt(stat: dict[str, Any] | None, percent: bool = True, signed: bool = False, digits: int = 1) -> str:
    if not stat or stat.get("mean") is None:
        return "-"
    scale = 100 if percent else 1
    sign = "+" if signed else ""
    return f"{stat['mean'] * scale:{sign}.{digits}f} ± {stat['std'] * scale:.{digits}f}"


def _interval(stat: dict[str, Any] | None, percent: bool = True, digits: int = 1) -> str:
    """Mean and 95% interval of a paired difference, as `+1.2 [-0.3, +2.7]`."""
    if not stat or stat.get("mean") is None or stat.get("ci95") is None:
        return "-"
    scale = 100 if percent else 1
    mean, half = stat["mean"] * scale, stat["ci95"] * scale
    return f"{mean:+.{digits}f} [{mean - half:+.{digits}f}, {mean + half:+.{digits}f}]"


def markdown_report(report: dict[str, Any]) -> str:
    """The results as markdown: budget, the main table, the paired differences, the masking shares, the regime."""
    spec, table = report["spec"], report["methods"]
    k = spec["final_samples"]
    teacher, student = report["teacher"], report["student"]
    order = [m for m in LABELS if m in table]
    rates = report.get("learning_rates") or {m: spec["learning_rate"] for m in order}
    if len(set(rates.values())) == 1:
        lr = f"AdamW lr {next(iter(rates.values())):g}"
    else:
        lr = "AdamW lr per method (" + ", ".join(f"{LABELS[m]} {rates[m]:g}" for m in order) + ")"
    models = report.get("models")
    models = f" Models: {_describe(models)}." if models else ""
    lines = [
        f"Task: {report['task']}.{models} Seeds {', '.join(map(str, report['seeds']))}; per run {spec['steps']} "
        f"steps x {spec['prompts_per_step']} prompts x {spec['num_generations']} rollouts, {lr} "
        f"(cosine, {spec['warmup_ratio']:.0%} warm-up), sampling temperature {spec['temperature']:g}, top-p "
        f"{spec['top_p']:g}. Teacher: {teacher['heldout_accuracy']:.1%} held-out greedy accuracy "
        f"({teacher.get('heldout_accuracy_with_cue', float('nan')):.1%} reading the cue); student at the start: "
        f"{student['heldout_accuracy']:.1%}. Held-out accuracy on the {report['num_test']} test figures: greedy, and "
        f"avg@{k} at temperature 1. Means ± sample standard deviations over {len(report['seeds'])} seeds.",
        "",
        f"| Method | Greedy acc. (%) | avg@{k} (%) | Mean probe acc. over training (%) | Steps to OPD's final probe "
        "acc. | Student visual reliance: start → end (nats/token) | Teacher VA top-10% share (%) | Teacher mean VA "
        "(nats/token) |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def speed(row: dict[str, Any]) -> str:
        reached = row["reached_opd_final"]
        if reached == 0:
            return f"not reached (0/{row['greedy']['n']})"
        return f"{_fmt(row['steps_to_opd_final'], percent=False, digits=0)} ({reached}/{row['greedy']['n']})"

    for method in order:
        row = table[method]
        reliance = (
            f"{row['reliance_start']['mean']:.3f} → {row['reliance_end']['mean']:.3f} "
            f"(change {_fmt(row['reliance_change'], percent=False, signed=True, digits=3)})"
        )
        lines.append(
            f"| {LABELS[method]} | {_fmt(row['greedy'])} | {_fmt(row[f'avg@{k}'])} | {_fmt(row['probe_auc'])} | "
            f"{speed(row)} | {reliance} | {_fmt(row['va_top10_share'], digits=2)} | "
            f"{_fmt(row['va_mean'], percent=False, digits=3)} |"
        )
    others = [m for m in order if m != "opd"]
    if others:
        lines += [
            "",
            "Differences to standard OPD, paired by seed: mean [95% interval] of the per-seed differences, in points "
            "(reliance change in nats/token):",
            "",
            f"| Method | Δ greedy | Δ avg@{k} | Δ mean probe acc. | Δ reliance change |",
            "|---|---|---|---|---|",
        ]
        for method in others:
            row = table[method]
            lines.append(
                f"| {LABELS[method]} | {_interval(row['greedy_minus_opd'])} | {_interval(row[f'avg@{k}_minus_opd'])} | "
                f"{_interval(row['probe_auc_minus_opd'])} | "
                f"{_interval(row['reliance_change_minus_opd'], percent=False, digits=3)} |"
            )
    masks = [m for m in MASKS if m in table]
    if masks:
        lines += ["", "Share of the teacher's VA mass on the masked tokens (over training):", ""]
        lines += [f"- {LABELS[m]}: {_fmt(table[m]['masked_va_share'])}%" for m in masks]
    regime = report.get("regime")
    if regime:
        right, wrong = regime["width_right"], regime["width_wrong"]

        def nats(value: float | None) -> str:
            return "-" if value is None else f"{value:.2f}"

        lines += [
            "",
            f"The task's regime, on {regime['rollouts']} rollouts of the starting student (temperature "
            f"{regime['temperature']:g}); KL = KL(student || teacher) per token on the original image:",
            "",
            f"- share of the KL mass on the image-dependent tokens (the numbers): {regime['kl_share_numbers']:.1%}; "
            f"their share of the tokens: {regime['number_token_share']:.1%}; mean KL per token "
            f"{regime['mean_kl_per_token']:.3f} nats",
            f"- text-only accuracy (the best answer per question text): {regime['text_only_accuracy']:.1%}",
            f"- share of the KL mass on each response's 10% highest-VA tokens: {regime['kl_share_top10_va']:.1%}; "
            f"10% lowest-VA tokens: {regime['kl_share_low10_va']:.1%}; 10% random tokens: "
            f"{regime['kl_share_random10']:.1%}",
            f"- the stated width, when right ({right['count']} rollouts): VA {nats(right['va'])}, KL "
            f"{nats(right['kl'])} nats; when wrong ({wrong['count']}): VA {nats(wrong['va'])}, KL {nats(wrong['kl'])} "
            "nats",
        ]
    return "\n".join(lines) + "\n"


def plot_replication(runs: list[dict[str, Any]], report: dict[str, Any], path: str | os.PathLike) -> None:
    """Probe accuracy over steps, one line per method (mean across seeds) with a band (min to max across seeds)."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 5.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    by_method: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        by_method.setdefault(run["method"], []).append(run)
    palette = colormaps["tab20"]
    for index, method in enumerate(m for m in LABELS if m in by_method):
        method_runs = by_method[method]
        steps = [p["step"] for p in method_runs[0]["curve"]]
        values = [[p["accuracy"] for p in r["curve"]] for r in method_runs]
        columns = list(zip(*values, strict=True))
        colour = "black" if method == "opd" else palette(index / len(LABELS))
        width = 2.2 if method in ("opd", "vaopd") else 1.2
        ax.plot(steps, [statistics.fmean(c) for c in columns], color=colour, lw=width, marker="o", ms=3,
                label=LABELS[method])  # fmt: skip
        ax.fill_between(steps, [min(c) for c in columns], [max(c) for c in columns], color=colour, alpha=0.08)
    ax.axhline(report["teacher"]["heldout_accuracy"], color="black", ls=":", lw=1, label="teacher")
    ax.set(
        title=f"{report['task']} task: probe accuracy over training (mean over {len(report['seeds'])} seeds, band: min-max)",
        xlabel="step",
        ylabel="greedy accuracy on the probe set",
        ylim=(0, 1.02),
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")  # a long legend would otherwise clip the title
