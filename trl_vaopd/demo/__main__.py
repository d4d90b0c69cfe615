"""`python -m trl_vaopd.demo [--output_dir DIR] [--task area|perimeter] [--seed N] [--model_seed N] [--steps N] [--quick]
[--no_progress]`: the demo.

`python -m trl_vaopd.demo regime [--task area|perimeter] [--text_prior [RATE]] [--items N] [--samples K]
[--output FILE]`: the regime at the start of distillation (`trl_vaopd.demo.regime`)."""

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from .models import TEXT_PRIOR_RATE
from .pipeline import DEMO_TASK, run_demo
from .task import TASK_KINDS


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["regime"]:
        return regime_main(argv[1:])
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


def regime_main(argv: list[str]) -> dict:
    """Measure the regime at the start of distillation on the cached (or newly trained) teacher and student."""
    from .models import DemoSetup, cpu_threads, prepare_models, quick_setup
    from .regime import measure_regime
    from .task import TaskConfig

    parser = argparse.ArgumentParser(prog="python -m trl_vaopd.demo regime", description=regime_main.__doc__)
    parser.add_argument("--task", default=DEMO_TASK, choices=TASK_KINDS, help="the synthetic task")
    parser.add_argument(
        "--text_prior",
        type=float,
        nargs="?",
        const=TEXT_PRIOR_RATE,
        default=None,
        help=f"models that also learn a text-only prior, on this share of examples (default {TEXT_PRIOR_RATE})",
    )
    parser.add_argument("--model_seed", type=int, default=0, help="seed of the teacher's and student's weights")
    parser.add_argument("--items", type=int, default=64, help="validation items")
    parser.add_argument("--samples", type=int, default=4, help="student rollouts per item")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature of the rollouts")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--output", default=None, help="also write the figures to this JSON file")
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run on meaningless models")
    parser.add_argument("--no_progress", action="store_true", help="no progress bars")
    parser.add_argument("--cache_dir", default=None, help="model cache root (default: $TRL_VAOPD_CACHE or ~/.cache)")
    args = parser.parse_args(argv)
    config = TaskConfig(kind=args.task)
    setup = replace(quick_setup(config) if args.quick else DemoSetup(task=config), model_seed=args.model_seed)
    if args.text_prior is not None:
        setup = setup.with_text_prior(args.text_prior)
    with cpu_threads():
        models = prepare_models(setup, cache_dir=args.cache_dir, progress=not args.no_progress)
        figures = measure_regime(models, args.items, args.samples, args.temperature, args.seed)
    result = {
        "task": args.task,
        "text_prior": args.text_prior or 0.0,
        "models": models.directory.name,
        "teacher_accuracy": models.meta["teacher"]["heldout_accuracy"],
        "student_accuracy": models.meta["student"]["heldout_accuracy"],
        **figures,
    }
    print(
        f"{args.task}, {'text-prior' if args.text_prior else 'default'} models ({models.directory.name}), "
        f"{figures['rollouts']} student rollouts, {figures['tokens']} tokens, mean per token:\n"
        f"  KL(p||q) {figures['kl']:.4f}   share on image-dependent tokens {figures['kl_share_image_dependent']:.1%} "
        f"(of the tokens: {figures['image_dependent_token_share']:.1%})"
    )
    for view, values in figures["views"].items():
        print(
            f"  {view:>8}: KL(pbar||qbar) {values['kl_counterfactual']:.4f}   KL(q*||q) {values['target_shift']:.4f}"
            f"   KL(q||qbar) {values['vds']:.4f}   argmax q* != argmax q on {values['target_flip']:.1%}"
        )
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
