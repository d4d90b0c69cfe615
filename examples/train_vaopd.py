# Copyright 2026 The trl_vaopd authors. Licensed under the Apache License, Version 2.0.
"""
Visual-Advantage On-Policy Distillation (VA-OPD) of a vision-language student from a larger teacher.

With no arguments, the built-in offline demo (`trl_vaopd.demo.pipeline.run_demo`): a synthetic task whose answers are
read off the image, a tiny teacher trained to read it and a weaker student (both cached after the first run), a VA-OPD
run of 200 steps x 8 prompts x 4 rollouts, then accuracies before and after, the VA statistics, a token VA heatmap and
training curves. No download; on an idle 2-vCPU machine 260 s from an empty cache (the tiny models are trained
first), 140 s with them cached:

```bash
python examples/train_vaopd.py
```

`--tiny` runs tiny random models on noise images for a few steps (seconds), honouring every other argument (and
`--config` file), and saves the student in `--output_dir` like any run:

```bash
python examples/train_vaopd.py --tiny --max_steps 8 --output_dir trl_vaopd_outputs/tiny
python examples/train_vaopd.py --config examples/recipes/tiny_cpu.yaml
accelerate launch --multi_gpu --num_processes 2 examples/train_vaopd.py --config examples/recipes/tiny_cpu.yaml
```

The paper's run, Qwen3-VL-8B -> Qwen3-VL-2B on Geometry3K, 16 prompts x 4 responses per step on 8 GPUs:

```bash
accelerate launch --config_file examples/accelerate_configs/multi_gpu.yaml \
    examples/train_vaopd.py --config examples/recipes/qwen3_vl_8b_to_2b_geometry3k.yaml

# Teacher and student sharded with DeepSpeed ZeRO-3 (ZeRO-2 shards the student's optimizer state only):
accelerate launch --config_file examples/accelerate_configs/deepspeed_zero3.yaml \
    examples/train_vaopd.py --config examples/recipes/qwen3_vl_8b_to_2b_geometry3k.yaml
```

The method is one setting (`--method opd`, `va_opd`, `vgs`, or several to compose them), e.g. VGS as its paper runs
it, or VA-OPD and VGS together:

```bash
python examples/train_vaopd.py --tiny --method vgs --counterfactual_view drop
python examples/train_vaopd.py --config examples/recipes/qwen3_vl_8b_to_2b_geometry3k.yaml --method va_opd vgs
python examples/train_vaopd.py --tiny --method va_opd vicur   # the teacher reads each row's cue
```

ViCuR needs a `cue` column: `examples/write_cues.py` writes one with any VLM, and
`examples/recipes/qwen3_vl_2b_vicur_geometry3k.yaml` is the paper's self-distillation recipe.

Any recipe value can be overridden on the command line, e.g. one GPU with LoRA, or QLoRA (4-bit student, the
teacher stays unquantized):

```bash
python examples/train_vaopd.py --config examples/recipes/qwen3_vl_8b_to_2b_geometry3k.yaml \
    --per_device_train_batch_size 4 --gradient_accumulation_steps 16 \
    --use_peft --lora_r 64 --lora_alpha 128 --learning_rate 1e-5 [--load_in_4bit]
```

Arguments come from three dataclasses parsed by `trl.TrlParser`: `VAOPDConfig` (training and VA-OPD settings, including
`--teacher_model_name_or_path`), `trl.ModelConfig` (student name, dtype, LoRA / QLoRA flags) and `ScriptArguments`
below (dataset, image pixel budget, `--tiny`). `--help` lists them in groups, the package's own settings first.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field, fields

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor
from trl import ModelConfig, TrlParser, get_peft_config, get_quantization_config

from trl_vaopd import VAOPDConfig, VAOPDTrainer
from trl_vaopd.process_exit import end_run
from trl_vaopd.rewards import REWARD_FUNCS
from trl_vaopd.tiny_models import TINY_FAMILIES, save_tiny_vlm


# The VA-OPD paper's models (`docs/methods/va_opd.md`, "The paper's recipe and claims")
DEFAULT_STUDENT = "Qwen/Qwen3-VL-2B-Instruct"
DEFAULT_TEACHER = "Qwen/Qwen3-VL-8B-Instruct"

# Metrics printed at the end of a run
SUMMARY_KEYS = (
    "loss",
    "va/mean",
    "va/top10_share",
    "va/high_group_share",
    "weights/max",
    "weights/min",
    "kl/high",
    "kl/low",
    "vgs/standard",
    "vgs/visual",
    "vgs/language",
    "vgs/lp_share",
    "reward",
    "loss/distillation",
    "loss/policy",
)


@dataclass
class ScriptArguments:
    """Data and run-mode arguments of `train_vaopd.py` (models and training live in `ModelConfig` / `VAOPDConfig`)."""

    dataset_name: str = field(
        default="geometry3k",
        metadata={"help": "Dataset name or local path, resolved by `trl_vaopd.dataset_formats.load_vaopd_dataset`."},
    )
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_image_root: str | None = field(
        default=None,
        metadata={"help": "Directory of the images of datasets that ship them separately (ViRL39K's images.zip)."},
    )
    dataset_test_split: str | None = field(
        default=None,
        metadata={"help": "Split to evaluate on (only read when `eval_strategy` is not 'no')."},
    )
    image_min_pixels: int | None = field(
        default=None,
        metadata={"help": "Minimum pixels per image for Qwen-VL processors (`size.shortest_edge`); paper: 262144."},
    )
    image_max_pixels: int | None = field(
        default=None,
        metadata={"help": "Maximum pixels per image for Qwen-VL processors (`size.longest_edge`); paper: 4194304."},
    )
    tiny: bool = field(
        default=False,
        metadata={
            "help": "Offline demo: tiny random models from `trl_vaopd.tiny_models` and a synthetic image-question "
            "dataset replace the model names and the dataset; tiny-run defaults apply to every argument not given."
        },
    )
    tiny_family: str = field(
        default="qwen3_vl",
        metadata={"help": "Family of the tiny models.", "choices": list(TINY_FAMILIES)},
    )
    tiny_num_prompts: int = field(default=16, metadata={"help": "Number of synthetic prompts of the tiny dataset."})
    reward_funcs: list[str] | None = field(
        default=None,
        metadata={
            "help": "Verifiable rewards mixed in as GRPO's policy term (see --distillation_weight), by name: "
            f"{', '.join(REWARD_FUNCS)} (math-verify against the dataset's `answer` column)."
        },
    )


def tiny_defaults() -> dict:
    """Defaults of the built-in tiny run: a few short VA-OPD steps (`VAOPDConfig` picks the device and precision)."""
    return {
        "output_dir": "trl_vaopd_outputs/tiny-vaopd",
        "max_steps": 4,
        "per_device_train_batch_size": 8,  # 2 prompts x 4 sibling responses per process
        "gradient_accumulation_steps": 1,
        "num_generations": 4,
        "max_completion_length": 16,
        "learning_rate": 1e-3,
        "lr_scheduler_type": "constant",
        "logging_steps": 1,
        "save_strategy": "no",  # no intermediate checkpoint: the student is saved at the end
        "report_to": "none",
        "gradient_checkpointing": False,
        "seed": 0,
    }


def vaopd_fields() -> set[str]:
    """`VAOPDConfig`'s own settings: the fields its class declares (new ones, and TRL's it redefines)."""
    return {f.name for f in fields(VAOPDConfig) if f.name in VAOPDConfig.__annotations__}


def group_options(parser: TrlParser) -> None:
    """Sort the options into titled groups, the package's own first, instead of argparse's single list of a thousand
    lines in which they come after every TrainingArguments option."""
    groups = {
        "VAOPDConfig: the method and its settings (trl_vaopd)": vaopd_fields(),
        "ScriptArguments: data and run mode (this script)": {f.name for f in fields(ScriptArguments)},
        "ModelConfig: student, teacher, LoRA and quantization (trl)": {f.name for f in fields(ModelConfig)}
        | {"teacher_model_name_or_path", "teacher_model_revision"},
    }
    rest = parser.add_argument_group("DistillationConfig / TrainingArguments: training (trl, transformers)")
    titled = {title: parser.add_argument_group(title) for title in groups}
    for action in list(parser._optionals._group_actions):
        if action.dest == "help":
            continue
        if action.option_strings[0].startswith("--no_"):
            # HfArgumentParser's complement of a flag that defaults to True: say so, not the flag's help and default
            action.help, action.default = f"Same as --{action.dest} false.", argparse.SUPPRESS
        title = next((title for title, names in groups.items() if action.dest in names), None)
        parser._optionals._group_actions.remove(action)
        (titled[title] if title else rest)._group_actions.append(action)
    parser._action_groups = [*parser._action_groups[:2], *titled.values(), rest]


def make_parser(defaults: dict | None = None) -> TrlParser:
    parser = TrlParser(
        (ScriptArguments, VAOPDConfig, ModelConfig),
        usage="%(prog)s [--config RECIPE.yaml] [--tiny] [--OPTION VALUE ...]",
        description="Vision-aware on-policy distillation of a VLM student from a teacher (trl_vaopd). No argument: "
        "the built-in offline demo. --tiny: tiny random models, no download. --config: a YAML recipe "
        "(examples/recipes/), which the command line overrides.",
    )
    group_options(parser)
    if defaults:
        parser.set_defaults_with_config(**defaults)
    return parser


def wants_tiny(argv: list[str]) -> bool:
    """Whether `--tiny` is on, from the command line or else from the `--config` YAML, before the full parse (which
    builds `VAOPDConfig` from the tiny defaults, so they must be in place first)."""
    import yaml
    from transformers.hf_argparser import string_to_bool

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--tiny", type=string_to_bool, nargs="?", const=True, default=None)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.tiny is not None:
        return known.tiny
    if known.config is not None:
        with open(known.config) as f:
            return bool((yaml.safe_load(f) or {}).get("tiny", False))
    return False


def parse_args(argv: list[str]) -> tuple[ScriptArguments, VAOPDConfig, ModelConfig]:
    """Parse `argv`: defaults (the tiny run's with `--tiny`), then a `--config` YAML, then command-line overrides."""
    parser = make_parser(tiny_defaults() if wants_tiny(argv) else None)
    return parser.parse_args_and_config(argv)


def tiny_dataset(num_prompts: int, seed: int = 0):
    """Image-question prompts: a noise image with a number drawn on it ("What number is shown in the picture?"), with a
    cue for ViCuR's teacher."""
    import numpy as np
    from datasets import Dataset
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(num_prompts):
        image = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
        number = int(rng.integers(0, 100))
        ImageDraw.Draw(image).text((8, 10), str(number), fill=(255, 255, 255))
        rows.append(
            {
                "prompt": [{"role": "user", "content": "What number is shown in the picture?"}],
                "images": [image],
                "answer": str(number),
                # For ViCuR (`--method vicur`): what the image shows, without the answer
                "cue": "A number is written in white in the upper left part of a square of coloured noise.",
            }
        )
    return Dataset.from_list(rows)


@contextmanager
def without_zero3_init(training_args: VAOPDConfig):
    """Build models unpartitioned. Under ZeRO-3, transformers creates every model inside `deepspeed.zero.Init`: a
    collective that shards the weights as they are created, so the main process could neither build alone nor save
    full weights."""
    plugin = training_args.deepspeed_plugin
    if plugin is None:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def tiny_model_paths(script_args: ScriptArguments, training_args: VAOPDConfig) -> tuple[str, str]:
    """Save the tiny student (seed 0) and wider teacher (seed 1) under the output dir; the main process writes."""
    root = os.path.join(training_args.output_dir, "tiny_models", script_args.tiny_family)
    paths = {size: os.path.join(root, size) for size in ("student", "teacher")}
    with training_args.main_process_first(desc="saving the tiny models"), without_zero3_init(training_args):
        for seed, (size, path) in enumerate(paths.items()):
            if not os.path.exists(os.path.join(path, "config.json")):
                save_tiny_vlm(path, family=script_args.tiny_family, size=size, seed=seed)
    return paths["student"], paths["teacher"]


def kbit_device_map() -> dict | None:
    """Each process loads its quantized student on its own GPU (bitsandbytes cannot be moved after loading)."""
    if torch.cuda.is_available():
        from accelerate import PartialState

        return {"": PartialState().local_process_index}
    return None


def load_models(student_name: str, teacher_name: str, script_args, training_args, model_args):
    """Student (optionally 4/8-bit), frozen teacher (never quantized) and the student's processor, by name or path."""
    dtype = model_args.dtype if model_args.dtype in ("auto", None) else getattr(torch, model_args.dtype)
    common = {"trust_remote_code": training_args.trust_remote_code, "dtype": dtype}
    if model_args.attn_implementation is not None:
        common["attn_implementation"] = model_args.attn_implementation
    quantization_config = get_quantization_config(model_args)
    student_kwargs = dict(common, revision=model_args.model_revision)
    if quantization_config is not None:
        student_kwargs.update(quantization_config=quantization_config, device_map=kbit_device_map())
    student = AutoModelForImageTextToText.from_pretrained(student_name, **student_kwargs)
    teacher = AutoModelForImageTextToText.from_pretrained(
        teacher_name, revision=training_args.teacher_model_revision, **common
    )
    processor_kwargs = {}
    if script_args.image_min_pixels is not None or script_args.image_max_pixels is not None:
        size = {}
        if script_args.image_min_pixels is not None:
            size["shortest_edge"] = script_args.image_min_pixels
        if script_args.image_max_pixels is not None:
            size["longest_edge"] = script_args.image_max_pixels
        processor_kwargs["size"] = size
    processor = AutoProcessor.from_pretrained(
        student_name,
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        padding_side="left",
        truncation_side="left",
        **processor_kwargs,
    )
    return student, teacher, processor


def load_datasets(script_args: ScriptArguments, training_args: VAOPDConfig):
    if script_args.tiny:
        return tiny_dataset(script_args.tiny_num_prompts, training_args.seed), None
    from trl_vaopd.dataset_formats import load_vaopd_dataset

    def load(split: str):
        return load_vaopd_dataset(script_args.dataset_name, split=split, image_root=script_args.dataset_image_root)

    train = load(script_args.dataset_train_split)
    evaluation = None
    if training_args.eval_strategy != "no":
        if script_args.dataset_test_split is None:
            raise ValueError("`eval_strategy` is set but no `--dataset_test_split` was given.")
        evaluation = load(script_args.dataset_test_split)
    return train, evaluation


def summarize(log_history: list[dict]) -> dict[str, float]:
    """Mean over the logged training steps of the loss and the VA metrics."""
    steps = [entry for entry in log_history if "loss" in entry]
    summary = {}
    for key in SUMMARY_KEYS:
        values = [entry[key] for entry in steps if entry.get(key) is not None and not math.isnan(entry[key])]
        if values:
            summary[key] = sum(values) / len(values)
    return summary


def main(script_args: ScriptArguments, training_args: VAOPDConfig, model_args: ModelConfig) -> VAOPDTrainer:
    if script_args.tiny:
        student_name, teacher_name = tiny_model_paths(script_args, training_args)
    else:
        student_name = model_args.model_name_or_path or DEFAULT_STUDENT
        teacher_name = training_args.teacher_model_name_or_path or DEFAULT_TEACHER
    student, teacher, processor = load_models(student_name, teacher_name, script_args, training_args, model_args)

    peft_config = get_peft_config(model_args)
    if peft_config is not None and peft_config.target_modules is None:
        # No PEFT default exists for VLM families: adapt every linear layer (PEFT leaves out the output head)
        peft_config.target_modules = "all-linear"

    train_dataset, eval_dataset = load_datasets(script_args, training_args)
    trainer = VAOPDTrainer(
        model=student,
        teacher_model=teacher,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processor,
        peft_config=peft_config,
        reward_funcs=script_args.reward_funcs,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)

    summary = summarize(trainer.state.log_history)
    trainer.save_model(training_args.output_dir)
    if trainer.accelerator.is_main_process:
        processor.save_pretrained(training_args.output_dir)
        method = " + ".join(training_args.method)
        finished = f"{method} finished after {trainer.state.global_step} steps"
        if summary:
            print(f"{finished}; mean over the logged steps:")
            for key, value in summary.items():
                print(f"  {key:<20} {value:.6g}")
        else:
            print(f"{finished}; no step was logged (logging_steps={training_args.logging_steps:g}).")
        print(f"The student is saved in {os.path.abspath(training_args.output_dir)}.")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=None if script_args.tiny else script_args.dataset_name)
    return trainer


if __name__ == "__main__":
    if len(sys.argv) == 1:
        # No argument at all: the built-in offline demo
        from trl_vaopd.demo.pipeline import run_demo

        run_demo()
    else:
        # Every rank waits for the others, then leaves without the interpreter's teardown, where gloo aborts now and then
        end_run(main(*parse_args(sys.argv[1:])).accelerator)
