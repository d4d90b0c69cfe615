"""The built-in demo: VA-OPD end to end on a laptop CPU, offline, in a few minutes.

`run_demo()` (what `python examples/train_vaopd.py` with no argument and `python -m trl_vaopd.demo` run):

1. builds the synthetic task (`trl_vaopd.demo.task`) and prepares, or loads from the cache, a tiny Qwen3-VL teacher
   that reads the figures and a narrower student that reads few of them (`trl_vaopd.demo.models`);
2. distils the student from the teacher with `VAOPDTrainer`, with progress bars;
3. prints a summary (the student's held-out accuracy before and after, the teacher's, the mean VA and the share of
   the VA mass in the top 10% of tokens) and writes a token-level VA heatmap and the training curves as PNG files,
   plus `summary.json`, under `output_dir`.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from .experiment import DistillSpec, run_distillation
from .models import DemoModels, DemoSetup, cpu_threads, generate, prepare_models, quick_setup
from .task import TaskConfig, answer_of, question_text, render_image


__all__ = ["DEMO_SPEC", "DEMO_TASK", "QUICK_SPEC", "plot_curves", "run_demo", "write_heatmap"]

#: The demo's distillation budget: 200 steps of 8 prompts x 4 rollouts, AdamW at 1e-3
#: The task the demo shows (docs/replication.md: the one where VA-OPD does best)
DEMO_TASK = "area"
DEMO_SPEC = DistillSpec(steps=200, eval_every=20)
#: A seconds-long budget for tests
QUICK_SPEC = DistillSpec(
    steps=2, prompts_per_step=2, eval_every=1, probe_size=4, final_samples=2, max_completion_length=48
)


def write_heatmap(models: DemoModels, student, path: Path) -> dict[str, Any]:
    """Token-level VA heatmap of the trained student's greedy response to a held-out figure (the first one it gets
    right, if any): the teacher's VA (what VA-OPD weights by) above the student's own gaps before and after
    distillation (its visual reliance)."""
    from ..diagnostics import score_many, va_heatmap_png
    from .models import is_correct

    task = models.setup.task
    processor = models.processor()
    items = models.test_items[:32]
    pieces = generate(student, processor, items, task, return_ids=True)
    completions = [c for _, _, chunk in pieces for c in chunk]
    texts = processor.tokenizer.batch_decode(completions, skip_special_tokens=True)
    index = next((i for i, (t, it) in enumerate(zip(texts, items, strict=True)) if is_correct(t, it, task)), 0)
    item, ids = items[index], completions[index].tolist()
    eos = {processor.tokenizer.convert_tokens_to_ids("<|im_end|>"), processor.tokenizer.pad_token_id}
    cut = next((i + 1 for i, t in enumerate(ids) if t in eos), len(ids))
    row = {
        "prompt": [{"role": "user", "content": question_text(item, task)}],
        "images": [render_image(item, task)],
        "response": ids[:cut],
    }
    scored = {
        "teacher VA (VA-OPD's weights)": score_many(models.teacher(), processor, [row])[0],
        "student before: its own gap": score_many(models.student(), processor, [row])[0],
        "student after: its own gap": score_many(student, processor, [row])[0],
    }
    title = f"Held-out figure: width {item.width}, height {item.height}, {task.kind} {answer_of(item, task)}"
    va_heatmap_png(scored, path, title=title)
    return {
        "item": asdict(item),
        "response": texts[index],
        "correct": is_correct(texts[index], item, task),
        "mean_va": {k: v.mean_va for k, v in scored.items()},
    }


def plot_curves(result: dict[str, Any], path: Path, teacher_accuracy: float | None = None) -> None:
    """Training curves: loss, the teacher's mean VA and top-10% share on the rollouts, and the student's probe
    accuracy and visual reliance."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    history, curve = result["history"], result["curve"]
    fig = Figure(figsize=(13, 3.6), dpi=120)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 4)
    axes[0].plot(history["step"], history["loss"], color="tab:blue", lw=1)
    axes[0].set(title="VA-OPD loss", xlabel="step")
    axes[1].plot(history["step"], history["va/mean"], color="tab:red", lw=1, label="mean VA per token")
    axes[1].set(title="teacher VA on the rollouts", xlabel="step")
    twin = axes[1].twinx()
    twin.plot(history["step"], history["va/top10_share"], color="tab:gray", lw=1, ls="--", label="top-10% share")
    twin.set_ylim(0, 1.05)
    handles = axes[1].get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    axes[1].legend(handles=handles, loc="upper left", fontsize=8, framealpha=0.9)
    steps = [c["step"] for c in curve]
    axes[2].plot(steps, [c["accuracy"] for c in curve], marker="o", color="tab:green", label="student")
    if teacher_accuracy is not None:
        axes[2].axhline(teacher_accuracy, color="black", ls=":", label="teacher")
    axes[2].set(title="greedy accuracy (validation probe)", xlabel="step", ylim=(0, 1.02))
    axes[2].legend(fontsize=8)
    axes[3].plot(steps, [c["visual_reliance"] for c in curve], marker="o", color="tab:purple")
    axes[3].set(title="student visual reliance", xlabel="step", ylabel="log-prob gap per token")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def run_demo(
    output_dir: str = "vaopd_demo",
    seed: int = 0,
    steps: int | None = None,
    quick: bool = False,
    progress: bool = True,
    cache_dir: str | None = None,
    threads: int | None = None,
    task: str = DEMO_TASK,
    model_seed: int = 0,
) -> dict[str, Any]:
    """Run the built-in demo and return its summary (also printed, and written to `output_dir/summary.json`).

    Args:
        output_dir: Where the PNG files and the summary go.
        seed: Seed of the distillation run (prompt order, sampling). The teacher and student are fixed by the setup.
        steps: Distillation steps; the demo's 200 when `None`.
        quick: A seconds-long smoke run (narrow one-layer models trained for a few steps, two distillation steps);
            its accuracies mean nothing.
        progress: Progress bars and messages.
        cache_dir: Root of the model cache; `$TRL_VAOPD_CACHE` or `~/.cache/trl_vaopd` when `None`.
        threads: Torch CPU threads during the run; `$TRL_VAOPD_DEMO_THREADS` or 1 when `None` (see `cpu_threads`).
        task: `"area"` or `"perimeter"` (`trl_vaopd.demo.task`).
        model_seed: Seed of the teacher's and student's initial weights (`DemoSetup.model_seed`). Another seed trains
            (and caches) other models, which read the figures as well or as badly as another machine's floating point
            makes them: the README's spread is over these seeds.

    Returns:
        The summary: accuracies of the student before and after and of the teacher, the mean VA and its top-10% share,
        wall time, file paths.
    """
    with cpu_threads(threads), warnings.catch_warnings():
        # Deprecation notices of the libraries underneath, not actionable by a demo user
        warnings.simplefilter("ignore", FutureWarning)
        return _run_demo(output_dir, seed, steps, quick, progress, cache_dir, task, model_seed)


def _run_demo(output_dir, seed, steps, quick, progress, cache_dir, task, model_seed) -> dict[str, Any]:
    from tqdm.auto import tqdm

    start = time.perf_counter()
    out = Path(output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    config = TaskConfig(kind=task)
    setup = replace(quick_setup(config) if quick else DemoSetup(task=config), model_seed=model_seed)
    spec = QUICK_SPEC if quick else DEMO_SPEC
    if steps is not None:
        spec = DistillSpec(**{**asdict(spec), "steps": steps})
    models = prepare_models(setup, cache_dir=cache_dir, progress=progress)
    prepared = time.perf_counter()

    if progress:
        tqdm.write(
            f"Distilling the student with VA-OPD: {spec.steps} steps x {spec.prompts_per_step} prompts x "
            f"{spec.num_generations} rollouts"
        )
    result = run_distillation(
        models, "vaopd", seed, spec, output_dir=str(out / "trainer"), progress=progress, keep_trainer=True
    )
    trainer = result.pop("trainer")
    student = trainer.model
    student.eval()
    with torch.no_grad():
        heatmap = write_heatmap(models, student, out / "va_heatmap.png")
    teacher_accuracy = models.meta["teacher"]["heldout_accuracy"]
    plot_curves(result, out / "training_curves.png", teacher_accuracy)

    summary = {
        "student_accuracy_before": models.meta["student"]["heldout_accuracy"],
        "student_accuracy_after": result["final"]["greedy"],
        "teacher_accuracy": teacher_accuracy,
        "student_avg@8_after": result["final"].get(f"avg@{spec.final_samples}"),
        "mean_va": result["va_mean"],
        "va_top10_share": result["va_top10_share"],
        "steps": spec.steps,
        "rollouts_per_step": spec.prompts_per_step * spec.num_generations,
        "heldout_items": len(models.test_items),
        "task": task,
        "seed": seed,
        "model_seed": model_seed,
        "models_from_cache": models.loaded_from_cache,
        "cache_dir": str(models.directory),
        "prepare_seconds": round(prepared - start, 1),
        "distill_seconds": result["train_seconds"],
        "wall_seconds": round(time.perf_counter() - start, 1),
        "heatmap_png": str(out / "va_heatmap.png"),
        "curves_png": str(out / "training_curves.png"),
        "heatmap_response": heatmap["response"],
    }
    (out / "summary.json").write_text(json.dumps({**summary, "run": result}, indent=2))
    summary["summary_json"] = str(out / "summary.json")
    print(format_summary(summary))
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    lines = [
        "",
        "VA-OPD demo" + (" (models loaded from the cache)" if summary["models_from_cache"] else ""),
        f"  task: the rectangle's {summary['task']} (trl_vaopd.demo.task); model seed {summary['model_seed']}, "
        f"distillation seed {summary['seed']}",
        f"  held-out greedy accuracy ({summary['heldout_items']} figures):",
        f"    student before   {summary['student_accuracy_before']:6.1%}",
        f"    student after    {summary['student_accuracy_after']:6.1%}   "
        f"({summary['steps']} VA-OPD steps x {summary['rollouts_per_step']} rollouts)",
        f"    teacher          {summary['teacher_accuracy']:6.1%}",
        f"  teacher VA on the student's rollouts: mean {summary['mean_va']:.4f} nats per token, "
        f"top-10% of tokens hold {summary['va_top10_share']:.2%} of the VA mass",
        f"  wall time {summary['wall_seconds']:.0f}s (preparation {summary['prepare_seconds']:.0f}s, "
        f"distillation {summary['distill_seconds']:.0f}s)",
        f"  VA heatmap:       {summary['heatmap_png']}",
        f"  training curves:  {summary['curves_png']}",
        f"  summary:          {summary['summary_json']}",
    ]
    return "\n".join(lines)
