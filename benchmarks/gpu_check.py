"""GPU check: every method at the real Qwen3-VL-2B / 8B sizes next to TRL's OPD, with nothing from outside.

On one GPU, with no network and no model hub, in an estimated 5 minutes on an H100 (not yet run on one; budget 8):

1. builds the student (Qwen3-VL-2B's shape: 28 x 2048, 2.1 B parameters) and the teacher (Qwen3-VL-8B's: 36 x 4096,
   8.8 B parameters) from their configs (`trl_vaopd.model_shapes.REAL_SHAPES`), random weights, bf16, directly on the
   GPU; the tokenizer and processor are `trl_vaopd.tiny_models`' offline ones (the models' vocabulary of 151,936 rows
   exceeds the tokenizer's, as a padded head does);
2. checks prefix sharing: the hidden states of `trl_vaopd.prefix_sharing.shared_prefix_hidden_states` (each sibling
   group's prompt run once) against the full pass, teacher and student, in bf16 tolerance;
3. trains, one run at a time on the same prompts, images and forced completion lengths (every rollout exactly
   `--length` tokens), TRL's `DistillationTrainer` (`trl_opd`) and `VAOPDTrainer` with `opd`, `va_opd`, `vgs`,
   `["va_opd", "vgs"]`, `vicur`, `["va_opd", "vicur"]` and `va_opd` without prefix sharing; the student is rebuilt for
   every run, the teacher is shared;
4. writes to `--out` (JSON): per run the step times (CUDA-synchronised; warm-up steps left out), the CUDA allocator's
   peak (reset per run; the teacher's weights included, as in training), the teacher's rows per rollout, the losses;
   the step-time and peak-memory ratios to `trl_opd`; the prefix-sharing errors. It exits non-zero if a check fails.

Run (from the repository root):

    python benchmarks/gpu_check.py --device cuda --out $OUT/gpu_check.json
    python benchmarks/gpu_check.py --device cpu --tiny --out /tmp/gpu_check.json   # tiny shapes, CPU, ~1 minute

Needs: torch (CUDA for `--device cuda`), and the package's requirements: transformers >= 5.19, trl >= 1.16, peft,
accelerate, datasets, pillow, tokenizers, numpy. Nothing else (no math-verify, matplotlib, vLLM or DeepSpeed; no
network). On a machine without some of them, install them from wheels carried with the working tree (see
benchmarks/README.md, "GPU check").
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path


for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_name, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the package, when not installed

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
from datasets import Dataset  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from trl import DistillationConfig, DistillationTrainer  # noqa: E402
from trl.data_utils import prepare_multimodal_messages  # noqa: E402
from trl.trainer.utils import split_pixel_values_by_grid  # noqa: E402

from trl_vaopd import VAOPDConfig, VAOPDTrainer  # noqa: E402
from trl_vaopd.evaluation import tokenize_conversations  # noqa: E402
from trl_vaopd.model_shapes import REAL_SHAPES, build_qwen3_vl, param_bytes, special_token_ids, tiny_shape  # noqa: E402
from trl_vaopd.prefix_sharing import backbone_of, cache_keyword, prefix_groups, shared_prefix_hidden_states  # noqa: E402
from trl_vaopd.tiny_models import build_processor, build_tokenizer  # noqa: E402


#: The runs, in order: TRL's OPD, then `VAOPDTrainer` with each method (its `VAOPDConfig` settings)
RUNS: dict[str, dict | None] = {
    "trl_opd": None,
    "opd": {"method": "opd"},
    "va_opd": {"method": "va_opd"},
    "vgs": {"method": "vgs"},
    "va_opd+vgs": {"method": ["va_opd", "vgs"]},
    "vicur": {"method": "vicur"},
    "va_opd+vicur": {"method": ["va_opd", "vicur"]},
    "va_opd_unshared": {"method": "va_opd", "prefix_sharing": False},
}


@dataclass
class Budget:
    """The work of the check: prompts x K rollouts per optimizer step, forced completion length, steps."""

    prompts: int = 2
    k: int = 4
    per_device: int = 4  # micro-batch (rollouts); the rest of the generation batch is gradient accumulation
    length: int = 256
    image_size: int = 512  # 256 visual tokens per image
    warmup: int = 1
    steps: int = 2

    @property
    def rollouts(self) -> int:
        return self.prompts * self.k


def noise_image(index: int, size: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(index).integers(0, 256, (size, size, 3), dtype=np.uint8))


def dataset(budget: Budget, repeat: int) -> Dataset:
    """Enough prompts for every step; each repeated `repeat` times (TRL's trainer samples one response per row)."""
    rows = [
        {
            "prompt": [{"role": "user", "content": f"Find x in figure {i}. Give the answer as a number."}],
            "images": [noise_image(i, budget.image_size)],
            "cue": f"Figure {i} shows a triangle with sides 3, 4 and x.",  # what ViCuR's teacher reads besides
        }
        for i in range(budget.prompts * (budget.warmup + budget.steps))
    ]
    return Dataset.from_list([row for row in rows for _ in range(repeat)])


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step, synchronised with the device."""

    def __init__(self, device: str):
        self.device, self.times, self._start = device, [], 0.0

    def _sync(self):
        if self.device != "cpu":
            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        self.times.append(time.perf_counter() - self._start)


class RowCounter:
    """Rows the teacher's backbone runs: full passes or cache continuations (rollouts), and shared prompts."""

    def __init__(self, model):
        self.rollout_rows = self.prompt_rows = 0
        self.handle = backbone_of(model).register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs):
        rows = kwargs["input_ids"].size(0) if kwargs.get("input_ids") is not None else 0
        if kwargs.get("use_cache") and kwargs.get(cache_keyword(module)) is None:
            self.prompt_rows += rows
        else:
            self.rollout_rows += rows


def run(
    name: str, budget: Budget, shapes, tokenizer, processor, teacher, device: str, dtype, gradient_checkpointing: bool
) -> dict:
    settings = RUNS[name]
    student = build_qwen3_vl(shapes["student"], tokenizer, seed=0, device=device, dtype=dtype)
    common = dict(
        max_steps=budget.warmup + budget.steps,
        per_device_train_batch_size=budget.per_device,
        gradient_accumulation_steps=budget.rollouts // budget.per_device,
        max_completion_length=budget.length,
        # Every rollout exactly `length` tokens: no special token (EOS included) can be sampled before the limit
        generation_kwargs={"min_new_tokens": budget.length, "suppress_tokens": special_token_ids(tokenizer)},
        temperature=1.0,
        top_p=1.0,
        learning_rate=1e-6,
        shuffle_dataset=False,
        report_to=[],
        use_cpu=device == "cpu",
        bf16=dtype == torch.bfloat16,
        # Off by default: with it, transformers runs the student without a KV cache, so prefix sharing cannot
        # share the student's prompts (the teacher's still are)
        gradient_checkpointing=gradient_checkpointing,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    timer, counter = StepTimer(device), RowCounter(teacher)
    with tempfile.TemporaryDirectory() as output_dir:
        if settings is None:
            args = DistillationConfig(output_dir=output_dir, **common)
            trainer_cls, data = DistillationTrainer, dataset(budget, repeat=budget.k)
        else:
            args = VAOPDConfig(output_dir=output_dir, num_generations=budget.k, **common, **settings)
            trainer_cls, data = VAOPDTrainer, dataset(budget, repeat=1)
        trainer = trainer_cls(
            model=student,
            teacher_model=teacher,
            args=args,
            train_dataset=data,
            processing_class=processor,
            callbacks=[timer],
        )
        if device != "cpu":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        start = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() if device != "cpu" else None
    counter.handle.remove()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    rollouts = budget.rollouts * (budget.warmup + budget.steps)
    result = {
        "run": name,
        "settings": settings,
        "step_s": timer.times,
        "median_step_s": statistics.median(timer.times[budget.warmup :]),
        "wall_s": wall,
        "peak_bytes": peak,
        "added_bytes": None if peak is None else peak - before,
        "student_param_bytes": param_bytes(student),
        "teacher_rollout_rows_per_rollout": counter.rollout_rows / rollouts,
        "teacher_prompt_rows_per_rollout": counter.prompt_rows / rollouts,
        "losses": losses,
    }
    del trainer, student
    gc.collect()
    if device != "cpu":
        torch.cuda.empty_cache()
    return result


def prefix_rows(processor, budget: Budget, device: str) -> dict:
    """`budget.prompts` groups of `budget.k` rollouts (one noise image each, random completions of up to
    `budget.length` tokens) as the trainer hands them to the teacher, on `device`."""
    tokenizer = processor.tokenizer
    conversations = []
    for i in range(budget.prompts):
        for _ in range(budget.k):
            image = noise_image(100 + i, budget.image_size)
            prompt = [{"role": "user", "content": f"Which number is in picture {i}?" + " Look closely." * i}]
            conversations.append(prepare_multimodal_messages(prompt, images=[image]))
    encoded = tokenize_conversations(processor, conversations)
    n = len(conversations)
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, budget.length + 1, (n,), generator=generator)
    mask = (torch.arange(budget.length) < lengths[:, None]).long()
    completion = torch.randint(10, len(tokenizer) - 20, (n, budget.length), generator=generator) * mask
    rows = {
        "prompt_ids": encoded["input_ids"],
        "prompt_mask": encoded["attention_mask"],
        "completion_ids": completion,
        "completion_mask": mask,
    }
    for key, value in encoded.items():
        if key == "mm_token_type_ids":
            rows[key] = torch.cat([value, value.new_zeros(completion.shape)], dim=1)
        elif key not in ("input_ids", "attention_mask"):
            rows[key] = value
    rows = split_pixel_values_by_grid({**rows, "num_images": [1] * n})
    on_device = {}
    for key, value in rows.items():
        if torch.is_tensor(value):
            value = value.to(device)
        elif isinstance(value, list) and value and torch.is_tensor(value[0]):
            value = [t.to(device) for t in value]
        on_device[key] = value
    return on_device


def prefix_check(models: dict, processor, budget: Budget, device: str) -> dict:
    """Shared-prefix hidden states against the full pass: relative error over the valid completion positions."""
    rows = prefix_rows(processor, budget, device)
    valid = rows["completion_mask"].bool()
    report = {}
    for name, model in models.items():
        with torch.no_grad():
            inputs = {k: torch.cat(rows[k]) for k in ("pixel_values", "image_grid_thw")}
            if "mm_token_type_ids" in rows:
                inputs["mm_token_type_ids"] = rows["mm_token_type_ids"]
            prompt_len = rows["prompt_ids"].size(1)
            full = backbone_of(model)(
                input_ids=torch.cat([rows["prompt_ids"], rows["completion_ids"]], dim=1),
                attention_mask=torch.cat([rows["prompt_mask"], rows["completion_mask"]], dim=1),
                use_cache=False,
                **inputs,
            ).last_hidden_state[:, prompt_len - 1 : prompt_len - 1 + budget.length]
            shared = shared_prefix_hidden_states(model, rows, prefix_groups(rows))
        full, shared = full[valid].float(), shared[valid].float()
        report[name] = {
            "relative_error": ((shared - full).norm() / full.norm()).item(),
            "max_abs_error": (shared - full).abs().max().item(),
            "positions": int(valid.sum()),
            "groups": int(prefix_groups(rows).first.numel()),
        }
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, one measured step (a smoke run, CPU)")
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--length", type=int, help="forced completion tokens (default 256; --tiny 8)")
    parser.add_argument("--steps", type=int, help="measured steps per run, after one warm-up (default 2; --tiny 1)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="the student's, in every run")
    parser.add_argument("--runs", default=",".join(RUNS), help="comma-separated subset of " + ", ".join(RUNS))
    opts = parser.parse_args(argv)
    if opts.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device (use --device cpu --tiny for the smoke run)")
    runs = opts.runs.split(",")
    unknown = [r for r in runs if r not in RUNS]
    if unknown or "trl_opd" not in runs:
        parser.error(f"--runs: unknown {unknown}; it must include trl_opd (the ratios' reference)")

    start = time.perf_counter()
    if opts.tiny:
        budget = Budget(length=8, image_size=64, steps=1)
        shapes = {"student": tiny_shape(64), "teacher": tiny_shape(128)}
    else:
        budget = Budget()
        shapes = REAL_SHAPES
    budget.length = opts.length or budget.length
    budget.steps = opts.steps or budget.steps
    # bf16 as users train on GPUs; float32 on CPU, where the smoke run checks the code path, not the numbers
    dtype = torch.bfloat16 if opts.device == "cuda" else torch.float32
    tolerance = 3e-2 if dtype == torch.bfloat16 else 1e-4
    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    processor = build_processor("qwen3_vl", tokenizer, image_size=budget.image_size)
    teacher = build_qwen3_vl(shapes["teacher"], tokenizer, seed=1, device=opts.device, dtype=dtype)

    student = build_qwen3_vl(shapes["student"], tokenizer, seed=0, device=opts.device, dtype=dtype)
    prefix = prefix_check({"teacher": teacher, "student": student}, processor, budget, opts.device)
    del student
    gc.collect()
    print(json.dumps({"prefix_sharing": prefix}), flush=True)

    results = []
    for name in runs:
        results.append(
            run(name, budget, shapes, tokenizer, processor, teacher, opts.device, dtype, opts.gradient_checkpointing)
        )
        r = results[-1]
        peak = "" if r["peak_bytes"] is None else f", peak {r['peak_bytes'] / 2**30:.2f} GiB"
        print(f"{name}: median step {r['median_step_s']:.3f} s{peak}, losses {r['losses']}", flush=True)

    reference = results[runs.index("trl_opd")]
    ratios = {
        r["run"]: {
            "step_time_ratio": r["median_step_s"] / reference["median_step_s"],
            "peak_memory_ratio": None if r["peak_bytes"] is None else r["peak_bytes"] / reference["peak_bytes"],
        }
        for r in results
    }
    checks = {
        "prefix_sharing_equal": all(v["relative_error"] <= tolerance for v in prefix.values()),
        "losses_finite": all(all(np.isfinite(loss) for loss in r["losses"]) and r["losses"] for r in results),
    }
    report = {
        "machine": {
            "device": torch.cuda.get_device_name() if opts.device == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": trl.__version__,
            "python": platform.python_version(),
        },
        "options": {**vars(opts), "dtype": str(dtype), "budget": asdict(budget)},
        "shapes": {k: v.describe() for k, v in shapes.items()},
        "teacher_param_bytes": param_bytes(teacher),
        "prefix_sharing": {"tolerance": tolerance, **prefix},
        "runs": results,
        "ratios_to_trl_opd": ratios,
        "checks": checks,
        "total_wall_s": time.perf_counter() - start,
    }
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps(report, indent=2))
    for name, ratio in ratios.items():
        peak = "" if ratio["peak_memory_ratio"] is None else f", peak memory {ratio['peak_memory_ratio']:.3f}"
        print(f"{name}/trl_opd: step time {ratio['step_time_ratio']:.3f}{peak}")
    print(f"checks: {checks}; {report['total_wall_s']:.0f} s; written to {opts.out}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
