# Copyright 2026 The trl_vaopd authors. Licensed under the Apache License, Version 2.0.
"""
Spread of the built-in demo's figures: the accuracies `python examples/train_vaopd.py` prints depend on the tiny
teacher and student it trains on first use, and a machine with other floating point trains other ones. Each model seed
(`python -m trl_vaopd.demo --model_seed N`) stands for such a machine: its teacher and student are trained into an
empty cache, then distilled once per distillation seed (`--seed`, the later runs loading the cached models).

Every run is a fresh process with one torch thread. Writes every run's numbers and their summary (mean, standard
deviation, min and max) to `--output`, and prints the summary as a markdown table.

```bash
python benchmarks/demo_spread.py                                  # model seeds 0-4 x seeds 0 1, about 20 minutes on 2 cores
python benchmarks/demo_spread.py --model_seeds 0 1 2 --seeds 0
```
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from trl_vaopd.demo.pipeline import DEMO_TASK
from trl_vaopd.demo.task import TASK_KINDS


ROOT = Path(__file__).resolve().parents[1]
#: The summary fields whose spread is reported, with their labels
FIGURES = {
    "student_accuracy_before": "student before",
    "student_accuracy_after": "student after",
    "teacher_accuracy": "teacher",
    "student_avg@8_after": "student avg@8 after",
    "mean_va": "mean VA (nats/token)",
    "va_top10_share": "VA top-10% share",
}


def run_once(task: str, model_seed: int, seed: int, cache: str, workdir: str) -> dict:
    output_dir = Path(workdir) / f"model{model_seed}_seed{seed}"
    command = [
        sys.executable,
        "-m",
        "trl_vaopd.demo",
        "--no_progress",
        "--output_dir",
        str(output_dir),
        "--task",
        task,
    ]
    command += ["--model_seed", str(model_seed), "--seed", str(seed), "--cache_dir", cache]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    completed = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True)
    if completed.returncode:
        sys.stderr.write(completed.stdout[-4000:] + completed.stderr[-4000:])
        raise SystemExit(f"{' '.join(command)} failed with exit code {completed.returncode}")
    summary = json.loads((output_dir / "summary.json").read_text())
    return {
        "model_seed": model_seed,
        "seed": seed,
        "models_from_cache": summary["models_from_cache"],
        "load_average_before": load_before,
        **{key: summary[key] for key in FIGURES},
        "wall_seconds": summary["wall_seconds"],
    }


def spread(runs: list[dict]) -> dict[str, dict[str, float]]:
    """Mean, sample standard deviation, min and max of every figure over `runs`."""
    out = {}
    for key in FIGURES:
        values = [run[key] for run in runs]
        out[key] = {
            "mean": statistics.fmean(values),
            "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values),
            "max": max(values),
        }
    return out


def markdown(summary: dict[str, dict[str, float]], runs: int) -> str:
    lines = [f"| figure ({runs} runs) | mean | sd | min | max |", "|---|---|---|---|---|"]
    for key, label in FIGURES.items():
        stats = summary[key]
        fmt = (lambda v: f"{v:.4f}") if key == "mean_va" else (lambda v: f"{100 * v:.1f}%")
        lines.append(
            f"| {label} | {fmt(stats['mean'])} | {fmt(stats['sd'])} | {fmt(stats['min'])} | {fmt(stats['max'])} |"
        )
    return "\n".join(lines)


def cpu_model() -> str | None:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--task", default=DEMO_TASK, choices=TASK_KINDS)
    parser.add_argument("--model_seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "demo_spread.json"))
    args = parser.parse_args(argv)
    runs = []
    with tempfile.TemporaryDirectory() as workdir:
        for model_seed in args.model_seeds:
            cache = tempfile.mkdtemp(dir=workdir, prefix=f"cache{model_seed}_")
            for seed in args.seeds:
                start = time.perf_counter()
                runs.append(run_once(args.task, model_seed, seed, cache, workdir))
                print(
                    f"model seed {model_seed}, seed {seed}: {json.dumps(runs[-1])} ({time.perf_counter() - start:.0f}s)",
                    flush=True,
                )
    result = {
        "command": f"python -m trl_vaopd.demo --task {args.task} --model_seed M --seed S (one thread, fresh cache per "
        "model seed)",
        "task": args.task,
        "runs": runs,
        "all_runs": spread(runs),
        "per_model_seed": {str(m): spread([r for r in runs if r["model_seed"] == m]) for m in args.model_seeds},
        "cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result["all_runs"], len(runs)))
    print(f"Wrote {args.output}")
    return result


if __name__ == "__main__":
    main()
