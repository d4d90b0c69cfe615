# Copyright 2026 The trl_vaopd authors. Licensed under the Apache License, Version 2.0.
"""
The paper's claims at small scale, on the built-in task, offline, on a CPU.

Standard OPD, VA-OPD, the two single-component ablations (rollout weighting only, token grouping only) and the masking
analysis (the top-10% VA tokens of each response taken out of the KL of standard OPD, versus the 10% lowest-VA and
10% random tokens), each for every seed with matched rollouts, steps and optimiser, from the same cached teacher and
student as the demo (`python examples/train_vaopd.py`). Reports held-out accuracy (greedy, and avg@8 at temperature
1), the student's own visual reliance (its log-prob gap with vs without image detail on its own rollouts) along
training, and the teacher's VA concentration; writes `results.json`, `results.md` (the table of
`docs/replication.md`) and `replication.png` under `--output_dir`.

```bash
python examples/replicate.py                      # 7 methods x 5 seeds, about 25 minutes on 2 CPU cores
python examples/replicate.py --workers 1          # one run at a time
python examples/replicate.py --methods opd vaopd --seeds 0 1 2 3 4 5 6 7 8 9
python examples/replicate.py --tiny               # seconds: the pipeline on a meaningless budget (tests)
```

Runs already in `--output_dir/runs/` with the same budget are kept, so an interrupted replication resumes.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict

from trl_vaopd.demo.experiment import METHODS, DistillSpec
from trl_vaopd.demo.pipeline import QUICK_SPEC
from trl_vaopd.demo.replication import REPLICATION_SPEC, run_replication


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--output_dir", default="replication")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--steps", type=int, default=None, help=f"steps per run (default {REPLICATION_SPEC.steps})")
    parser.add_argument("--learning_rate", type=float, default=None)
    parser.add_argument("--workers", type=int, default=2, help="runs in parallel (one process and thread each)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process (default 1)")
    parser.add_argument("--cache_dir", default=None, help="model cache root (default: $TRL_VAOPD_CACHE or ~/.cache)")
    parser.add_argument("--tiny", action="store_true", help="seconds-long smoke run with meaningless numbers")
    parser.add_argument("--no_progress", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    spec = QUICK_SPEC if args.tiny else REPLICATION_SPEC
    overrides = {"steps": args.steps, "learning_rate": args.learning_rate}
    spec = DistillSpec(**{**asdict(spec), **{k: v for k, v in overrides.items() if v is not None}})
    report = run_replication(
        output_dir=args.output_dir,
        methods=args.methods,
        seeds=args.seeds,
        spec=spec,
        cache_dir=args.cache_dir,
        workers=args.workers,
        threads=args.threads,
        quick=args.tiny,
        progress=not args.no_progress,
    )
    from pathlib import Path

    print((Path(args.output_dir) / "results.md").read_text())
    return report


if __name__ == "__main__":
    main()
