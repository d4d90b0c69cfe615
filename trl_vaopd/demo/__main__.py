"""`python -m trl_vaopd.demo [--output_dir DIR] [--task area|perimeter] [--seed N] [--model_seed N] [--steps N] [--quick]
[--no_progress]`."""

import argparse

from .pipeline import DEMO_TASK, run_demo
from .task import TASK_KINDS


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m trl_vaopd.demo", description=run_demo.__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="vaopd_demo", help="where the PNG files and summary.json go")
    parser.add_argument("--task", default=DEMO_TASK, choices=TASK_KINDS, help="the synthetic task")
    parser.add_argument("--seed", type=int, default=0, help="seed of the distillation run")
    parser.add_argument("--model_seed", type=int, default=0, help="seed of the teacher's and student's weights")
    parser.add_argument("--steps", type=int, default=None, help="distillation steps (default: the demo's)")
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run with meaningless accuracies")
    parser.add_argument("--no_progress", action="store_true", help="no progress bars")
    parser.add_argument("--cache_dir", default=None, help="model cache root (default: $TRL_VAOPD_CACHE or ~/.cache)")
    args = parser.parse_args(argv)
    return run_demo(
        output_dir=args.output_dir,
        seed=args.seed,
        steps=args.steps,
        quick=args.quick,
        progress=not args.no_progress,
        cache_dir=args.cache_dir,
        task=args.task,
        model_seed=args.model_seed,
    )


if __name__ == "__main__":
    main()
