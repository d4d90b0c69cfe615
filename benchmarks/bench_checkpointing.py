#!/usr/bin/env python
"""What gradient checkpointing costs and saves in a VA-OPD run: student step time and peak memory, with and without.

transformers runs a checkpointed student without a KV cache, so with `gradient_checkpointing=True` the student cannot
share its sibling groups' prompts (`trl_vaopd.prefix_sharing`): its loss pass runs every rollout's prompt in full, and
its backward recomputes the forward. Three VA-OPD runs on the same models, data and forced completion lengths, side by
side in lock-step (`bench_vaopd.run_group`), show the two effects apart:

* `off`: checkpointing off, prefix sharing on (`VAOPDConfig` with `gradient_checkpointing=False`);
* `on`: checkpointing on (the student falls back to full passes; the teacher still shares its prompts);
* `off_unshared`: checkpointing off and `prefix_sharing=False`: full passes without recomputation.

The prompt is the benchmark's long one (a 320-pixel image: about 4x the completion, mostly image tokens); on CPU the
student (width 256, 12 layers) is larger than the teacher (64, 2 layers), so that its activations, which
checkpointing drops, show in the peak memory. Step times are process CPU time (one torch thread) on CPU, wall time on GPU; "student" is the student's
forward outside generation plus the backward, as in `bench_vaopd.py`. Peak memory: on CPU the peak RSS of separate
2-step runs with fixed malloc thresholds, on GPU the allocator peak.

Usage (CPU, about 5 minutes on 2 shared cores):
    python benchmarks/bench_checkpointing.py
    python benchmarks/bench_checkpointing.py --device cuda --real-shapes   # Qwen3-VL-2B / 8B shapes, bf16

Writes `<out>/checkpointing.json` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from bench_vaopd import (
    REAL_SHAPES,
    SHARING_SHAPES,
    RunSpec,
    _mib,
    machine,
    run_group,
    summarise,
    tiny_shape,
)


# name -> (trainer of bench_vaopd.SETTINGS, gradient checkpointing)
RUNS = {"off": ("vaopd", False), "on": ("vaopd", True), "off_unshared": ("vaopd_unshared", False)}


def base(opts) -> RunSpec:
    image_size, length = SHARING_SHAPES["long_prompt"]
    if opts.real_shapes:
        return RunSpec(
            trainer="vaopd", student=REAL_SHAPES["student"], teacher=REAL_SHAPES["teacher"], rollouts=16, per_device=8,
            k=4, length=512, warmup=1, steps=opts.steps or 3, image_size=448, device=opts.device, dtype="bfloat16",
            threads=0,
        )  # fmt: skip
    # A student wider and deeper than the teacher: the comparison is about the student's passes, and its activations
    # must outweigh the teacher's scoring for the peak memory to show them
    return RunSpec(
        trainer="vaopd", student=tiny_shape(256, layers=12), teacher=tiny_shape(64, layers=2), rollouts=16,
        per_device=8, k=4, length=length, warmup=1, steps=opts.steps or 4, image_size=image_size, device=opts.device,
        threads=1 if opts.device == "cpu" else 0,
    )  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--real-shapes", action="store_true", help="Qwen3-VL-2B student / 8B teacher shapes, bf16")
    parser.add_argument("--steps", type=int, default=None, help="measured steps per run")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    opts = parser.parse_args(argv)
    cpu = opts.device == "cpu"
    clock = "cpu" if cpu else "wall"
    spec = base(opts)
    specs = {
        name: replace(spec, trainer=trainer, gradient_checkpointing=checkpointing, tag=name)
        for name, (trainer, checkpointing) in RUNS.items()
    }
    started = time.perf_counter()
    # On GPU three runs would not fit side by side: one at a time there, timed runs give the allocator peak
    groups = [list(specs.values())] if cpu else [[s] for s in specs.values()]
    timed = [raw for group in groups for raw in run_group(group)]
    memory = None
    if cpu:
        memory = run_group([replace(s, purpose="memory", warmup=0, steps=2) for s in specs.values()])
    results = {
        name: summarise(s, [raw], clock, [memory[i]] if memory else None)
        for i, (name, s, raw) in enumerate(zip(specs, specs.values(), timed, strict=True))
    }

    off = results["off"]
    rows = []
    for name, r in results.items():
        student = r["group_medians_s"]["student"]
        rows.append(
            {
                "run": name,
                "gradient_checkpointing": RUNS[name][1],
                "student_prefix_sharing": name == "off",
                "step_s": r["median_step_time_s"],
                "student_s": student,
                "peak_memory_mib": _mib(r["memory"]["memory_peak_bytes"]),
                "added_by_training_mib": _mib(r["memory"]["memory_added_bytes"]),
                "step_vs_off": r["median_step_time_s"] / off["median_step_time_s"],
                "student_vs_off": student / off["group_medians_s"]["student"],
                "peak_memory_vs_off": r["memory"]["memory_peak_bytes"] / off["memory"]["memory_peak_bytes"],
                "student_positions_per_rollout": r["student_positions_per_rollout"],
            }
        )
    report = {"machine": machine(opts.device), "options": vars(opts), "total_wall_s": time.perf_counter() - started}
    report.update(rows=rows, results=results)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "checkpointing.json").write_text(json.dumps(report, indent=1, default=str))

    print(
        f"| run | student step ({clock}) | / off | whole step | / off | peak memory | / off | memory added by training |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['run']} | {row['student_s']:.3f} s | {row['student_vs_off']:.2f} | {row['step_s']:.3f} s | "
            f"{row['step_vs_off']:.2f} | {row['peak_memory_mib']:.0f} MiB | {row['peak_memory_vs_off']:.3f} | "
            f"{row['added_by_training_mib']:.0f} MiB |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
