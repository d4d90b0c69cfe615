# Copyright 2026 The trl_vaopd authors. Licensed under the Apache License, Version 2.0.
"""
The papers' claims at small scale, on the demo's two tasks, every method side by side, offline, on a CPU.

Two synthetic tasks (`trl_vaopd.demo.task`): **area** (the student already writes the teacher's template, so the KL
sits on the numbers read off the figure) and **perimeter** (the papers' regime: a long-reasoning teacher in four
phrasings, a student with a style of its own, the text tokens carrying most of the KL). On each, every method of
`trl_vaopd.demo.experiment.METHODS` for every seed with matched prompts, rollouts, steps and optimiser, from the same
cached teacher and student: standard OPD, VA-OPD, rollout weighting only, token grouping only, the three masking
variants, VGS, VA-OPD + VGS, ViCuR with the cue teacher alone, with the cue-recovery module, ViCuR + VA-OPD, and
GRPO on the answer's accuracy alone, mixed into OPD and into VGS (the VGS paper's alpha = 0.3).

Reports held-out accuracy (greedy, and avg@8 at temperature 1), steps to reach OPD's final accuracy, the student's
own visual reliance along training, the teacher's VA concentration, paired differences to OPD with 95% intervals and
the task's regime (where the KL sits on the starting student's rollouts); writes `results.json`, `results.md` and
`replication.png` under `--output_dir/<task>/`.

```bash
python examples/replicate.py                              # both tasks, 15 methods x 5 seeds (hours on 2 cores; resumable)
python examples/replicate.py --tasks perimeter --methods opd vaopd vgs --seeds 0 1 2
python examples/replicate.py --tiny                       # seconds: the pipeline on a meaningless budget (tests)
```

Runs already in `--output_dir/<task>/runs/` with the same budget are kept, so an interrupted replication resumes.
The harness lives in `examples/replication/` (research code, not part of the package).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent / "replication"))

from replication import REPLICATION_SPECS, run_replication  # noqa: E402

from trl_vaopd.demo.experiment import METHODS, DistillSpec  # noqa: E402
from trl_vaopd.demo.pipeline import QUICK_SPEC  # noqa: E402
from trl_vaopd.demo.task import TASK_KINDS  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--output_dir", default="replication")
    parser.add_argument("--tasks", nargs="+", default=list(TASK_KINDS), choices=list(TASK_KINDS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default: the task's budget)")
    parser.add_argument("--learning_rate", type=float, default=None)
    parser.add_argument("--workers", type=int, default=2, help="runs in parallel (one process and thread each)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process (default 1)")
    parser.add_argument("--cache_dir", default=None, help="model cache root (default: $TRL_VAOPD_CACHE or ~/.cache)")
    parser.add_argument("--tiny", action="store_true", help="seconds-long smoke run with meaningless numbers")
    parser.add_argument("--no_progress", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Run the replication of every task asked for; returns `{task: report}`."""
    args = parse_args(argv)
    overrides = {"steps": args.steps, "learning_rate": args.learning_rate}
    reports = {}
    for task in args.tasks:
        spec = QUICK_SPEC if args.tiny else REPLICATION_SPECS[task]
        spec = DistillSpec(**{**asdict(spec), **{k: v for k, v in overrides.items() if v is not None}})
        reports[task] = run_replication(
            output_dir=Path(args.output_dir) / task,
            task=task,
            methods=args.methods,
            seeds=args.seeds,
            spec=spec,
            cache_dir=args.cache_dir,
            workers=args.workers,
            threads=args.threads,
            quick=args.tiny,
            progress=not args.no_progress,
        )
        print((Path(args.output_dir) / task / "results.md").read_text())
    return reports


if __name__ == "__main__":
    main()
