# Copyright 2026 The trl_vaopd authors. Licensed under the Apache License, Version 2.0.
"""
The papers' claims at small scale, on the demo's two tasks, every method side by side, offline, on a CPU.

Two synthetic tasks (`trl_vaopd.demo.task`): **area** (the student already writes the teacher's template, so the KL
sits on the numbers read off the figure) and **perimeter** (the papers' regime: a long-reasoning teacher in four
phrasings, a student with a style of its own, the text tokens carrying most of the KL). On each, every method of
`trl_vaopd.demo.experiment.METHODS` for every seed with matched prompts, rollouts, steps and optimiser, from the same
cached teacher and student: standard OPD, VA-OPD, VA-OPD on the package's own VA variant (the teacher's view
divergence), rollout weighting only, token grouping only, the three masking variants, VGS, VA-OPD + VGS, ViCuR with
the cue teacher alone, with the cue-recovery module, ViCuR + VA-OPD, and GRPO on the answer's accuracy alone, mixed
into OPD and into VGS (the VGS paper's alpha = 0.3).

Reports held-out accuracy (greedy, and avg@8 at temperature 1), steps to reach OPD's final accuracy, the student's
own visual reliance along training, the teacher's VA concentration, paired differences to OPD with 95% intervals and
the task's regime (where the KL sits on the starting student's rollouts); writes `results.json`, `results.md` and
`replication.png` under `--output_dir/<task>/`.

Models: the demo's default models, or with `--text_prior [RATE]` (default rate 0.25) ones that also learned a text-only
prior (`DemoSetup.with_text_prior`). An output directory holds runs of one model pair; resuming with others is refused.

Learning rates: the task's (`REPLICATION_SPECS`, or `--learning_rate`) for every method, overridden per method by
`--learning_rates METHOD=LR ...` or by the file `--lr_grid` writes. `--lr_grid` applies the fixed rule of
`examples/replication/lr_protocol.py` (docs/replication.md, "Learning rates"): each tuned row at half, once and
twice the task's OPD learning rate on tuning seeds 100 and 101 (by default), chosen by the final validation-probe
accuracy (the test figures are never read); it writes `--output_dir/<task>/lr_choice.json`, which
`--learning_rates_from` reads for the evaluation runs (seeds 0-4).

```bash
python examples/replicate.py                              # both tasks, 16 methods x 5 seeds (hours on 2 cores; resumable)
python examples/replicate.py --tasks perimeter --methods opd vaopd vgs --seeds 0 1 2
python examples/replicate.py --tiny                       # seconds: the pipeline on a meaningless budget (tests)
# The rerun (docs/replication.md): the learning-rate grid, then the evaluation at the chosen rates
python examples/replicate.py --text_prior --lr_grid --output_dir docs/replication/text_prior
python examples/replicate.py --text_prior --output_dir docs/replication/text_prior \
    --learning_rates_from docs/replication/text_prior/area/lr_choice.json docs/replication/text_prior/perimeter/lr_choice.json
```

Runs already in `--output_dir/<task>/runs/` (`lr_grid/runs/`) with the same budget and learning rate are kept, so an
interrupted replication resumes. The harness lives in `examples/replication/` (research code, not part of the
package).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent / "replication"))

from lr_protocol import TUNED_METHODS, TUNING_SEEDS, learning_rates_from_choice  # noqa: E402
from replication import REPLICATION_SPECS, replication_setup, run_lr_grid, run_replication  # noqa: E402

from trl_vaopd.demo.experiment import METHODS, DistillSpec  # noqa: E402
from trl_vaopd.demo.models import TEXT_PRIOR_RATE  # noqa: E402
from trl_vaopd.demo.pipeline import QUICK_SPEC  # noqa: E402
from trl_vaopd.demo.task import TASK_KINDS  # noqa: E402


def _method_rate(text: str) -> tuple[str, float]:
    method, _, rate = text.partition("=")
    if method not in METHODS or not rate:
        raise argparse.ArgumentTypeError(f"expected METHOD=LR with METHOD one of {list(METHODS)}, got {text!r}")
    try:
        value = float(rate)
    except ValueError:
        raise argparse.ArgumentTypeError(f"the learning rate of {text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"the learning rate of {text!r} must be positive")
    return method, value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--output_dir", default="replication")
    parser.add_argument("--tasks", nargs="+", default=list(TASK_KINDS), choices=list(TASK_KINDS))
    parser.add_argument(
        "--methods", nargs="+", default=None, choices=list(METHODS),
        help="default: every method (with --lr_grid: the rows the rule tunes)",
    )  # fmt: skip
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="default: 0-4 (with --lr_grid: 100 101)")
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default: the task's budget)")
    parser.add_argument("--learning_rate", type=float, default=None, help="every method's (default: the task's)")
    parser.add_argument(
        "--learning_rates", nargs="+", type=_method_rate, default=[], metavar="METHOD=LR",
        help="a learning rate per method, over --learning_rate and --learning_rates_from",
    )  # fmt: skip
    parser.add_argument(
        "--learning_rates_from", nargs="+", default=None, metavar="LR_CHOICE_JSON",
        help="the lr_choice.json of each task that runs (written by --lr_grid on the same models)",
    )  # fmt: skip
    parser.add_argument(
        "--lr_grid", action="store_true",
        help="run the learning-rate search of the fixed rule and write <output_dir>/<task>/lr_choice.json",
    )  # fmt: skip
    parser.add_argument(
        "--text_prior", nargs="?", type=float, const=TEXT_PRIOR_RATE, default=None, metavar="RATE",
        help=f"models that also learned a text-only prior at RATE (default {TEXT_PRIOR_RATE})",
    )  # fmt: skip
    parser.add_argument("--workers", type=int, default=2, help="runs in parallel (one process and thread each)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process (default 1)")
    parser.add_argument("--cache_dir", default=None, help="model cache root (default: $TRL_VAOPD_CACHE or ~/.cache)")
    parser.add_argument("--tiny", action="store_true", help="seconds-long smoke run with meaningless numbers")
    parser.add_argument("--no_progress", action="store_true")
    args = parser.parse_args(argv)
    if args.lr_grid and (args.learning_rates or args.learning_rates_from):
        parser.error("--lr_grid chooses the learning rates: drop --learning_rates and --learning_rates_from.")
    if args.text_prior is not None and not 0 < args.text_prior <= 1:
        parser.error(f"--text_prior must be in (0, 1], got {args.text_prior}.")
    return args


def _choice_files(paths: list[str], tasks: list[str]) -> dict[str, str]:
    """`lr_choice.json` per task, each file naming its task; every task that runs needs one."""
    absent = [p for p in paths if not Path(p).is_file()]
    if absent:
        raise ValueError(
            f"--learning_rates_from: {absent} not found; --lr_grid writes <output_dir>/<task>/lr_choice.json."
        )
    by_task = {json.loads(Path(p).read_text())["task"]: p for p in paths}
    missing = [t for t in tasks if t not in by_task]
    if missing:
        raise ValueError(
            f"--learning_rates_from has no lr_choice.json for {missing} (it got {by_task or paths}): pass one per task "
            "that runs (--lr_grid writes <output_dir>/<task>/lr_choice.json)."
        )
    return by_task


def main(argv: list[str] | None = None) -> dict:
    """Run the replication (or with `--lr_grid` the learning-rate search) of every task asked for; returns
    `{task: report}` (`{task: learning-rate choice}`)."""
    args = parse_args(argv)
    overrides = {"steps": args.steps, "learning_rate": args.learning_rate}
    choices = _choice_files(args.learning_rates_from, args.tasks) if args.learning_rates_from else {}
    reports = {}
    for task in args.tasks:
        spec = QUICK_SPEC if args.tiny else REPLICATION_SPECS[task]
        spec = DistillSpec(**{**asdict(spec), **{k: v for k, v in overrides.items() if v is not None}})
        setup = replication_setup(task, args.tiny, args.text_prior)
        common = {
            "output_dir": Path(args.output_dir) / task,
            "task": task,
            "spec": spec,
            "setup": setup,
            "cache_dir": args.cache_dir,
            "workers": args.workers,
            "threads": args.threads,
            "progress": not args.no_progress,
        }
        if args.lr_grid:
            methods, seeds = args.methods or list(TUNED_METHODS), args.seeds or list(TUNING_SEEDS)
            reports[task] = run_lr_grid(methods=methods, seeds=seeds, **common)
            continue
        rates = learning_rates_from_choice(choices[task], task, setup.key()) if task in choices else {}
        rates.update(dict(args.learning_rates))
        reports[task] = run_replication(
            methods=args.methods or list(METHODS), seeds=args.seeds or [0, 1, 2, 3, 4], learning_rates=rates, **common
        )
        print((Path(args.output_dir) / task / "results.md").read_text())
    return reports


if __name__ == "__main__":
    main()
