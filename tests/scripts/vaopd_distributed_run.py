"""One short VA-OPD run on tiny models, launched by `tests/test_distributed.py` under `accelerate launch`.

Every process builds the same tiny Qwen3-VL student (seed 0) and teacher (seed 1) and the same noise-image prompts
(`conftest.image_question_dataset`), trains, and the main process writes, with `torch.save`, to `--out`:

- `ranks`: per process, in process order, the generation batch as scored (`scored`: the rollouts in sampling order,
  the student's prompts, and the per-token teacher log-probabilities of both views `VAOPDTrainer._score_views`
  returned), the micro-batches the loss consumed (`micro_batches`: `trainer._buffered_inputs`, with the
  `vaopd_coefficients` and, for VGS, the `vgs_lp_mask` and `vgs_gamma`), and what the teacher's and the student's
  backbones computed in the scoring and loss passes (`passes`: prompts, rollouts, token positions, most rows in a
  call, counted as in `tests/steps.py`);
- `settings`: the objective's settings (method switches and hyperparameters), for the reference;
- `log_history`, `before` / `after` (full student parameters, gathered under ZeRO-3), `trainable` (names),
  `teacher_sharding` (the teacher's size, and the part of it the main process holds), `world_size`, `distributed_type`.

    accelerate launch --multi_gpu --num_processes 2 tests/scripts/vaopd_distributed_run.py --out run.pt
"""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import contextmanager


os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for conftest

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from conftest import image_question_dataset, pad_output_head  # noqa: E402
from steps import Passes, count_passes, token_reward  # noqa: E402

from trl_vaopd import VAOPDConfig, VAOPDTrainer  # noqa: E402
from trl_vaopd.process_exit import end_run  # noqa: E402
from trl_vaopd.tiny_models import build_model, build_processor, build_tokenizer  # noqa: E402


# Per-rollout values kept from each batch (teacher hidden states are large and not needed)
_KEPT = (
    "prompt_ids",
    "prompt_mask",
    "completion_ids",
    "completion_mask",
    "pixel_values",
    "image_grid_thw",
    "mm_token_type_ids",
    "vaopd_coefficients",
    "vaopd_high_mask",
    "vaopd_num_prompts",
    "vgs_lp_mask",
    "vgs_gamma",
    "grpo_advantages",
    "counterfactual_prompt_mask",
)
# The settings the float64 reference needs (a plain dict: the config itself holds the process state)
_OBJECTIVE_SETTINGS = (
    "counterfactual_view",
    "pixelate_ratio",
    "rollout_weighting",
    "token_grouping",
    "vgs",
    "va_high_fraction",
    "va_high_weight",
    "va_weight_temperature",
    "va_eps",
    "vgs_gamma",
    "vgs_lambda",
    "vgs_eta",
    "vgs_lp_quantile",
    "vgs_adaptive_gamma",
    "vgs_adaptive_gamma_quantiles",
    "loss_aggregation",
    "distillation_weight",
    "loss_type",
    "scale_rewards",
    "temperature",
    "max_completion_length",
)


def to_cpu(batch: dict) -> dict:
    return {k: v.detach().cpu().clone() for k, v in batch.items() if k in _KEPT and isinstance(v, torch.Tensor)}


@contextmanager
def gathered(params):
    """Full values of (possibly ZeRO-3 partitioned) parameters; a collective under ZeRO-3."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield


def snapshot(model) -> dict[str, torch.Tensor]:
    named = list(model.named_parameters())
    with gathered([p for _, p in named]):
        return {name: p.detach().float().cpu().clone() for name, p in named}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--per_device", type=int, default=2)
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--num_prompts", type=int, default=8)
    parser.add_argument("--max_steps", type=int, default=1)
    parser.add_argument("--max_completion_length", type=int, default=6)
    parser.add_argument("--optim", default="sgd")
    parser.add_argument("--learning_rate", type=float, default=1.0)
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--method", nargs="+", default=["va_opd"])
    parser.add_argument("--view", default="pixelate")
    # Output heads padded beyond the tokenizer to different sizes (student +5 rows, teacher +11)
    parser.add_argument("--pad_heads", action="store_true")
    # ViCuR: a cue column (`conftest.cue`) for the teacher, and the student's cue-recovery module
    parser.add_argument("--cues", action="store_true")
    parser.add_argument("--cue_recovery", action="store_true")
    parser.add_argument("--loss_aggregation", default=None)
    # A verifiable reward (`steps.token_reward`) mixed in at this weight of the distillation loss
    parser.add_argument("--rewards", action="store_true")
    parser.add_argument("--distillation_weight", type=float, default=1.0)
    # A random tiny model almost never samples EOS; a logit bias gives completions of varied lengths (and masks)
    parser.add_argument("--eos_bias", type=float, default=3.0)
    cli = parser.parse_args()

    # Models first, outside any ZeRO-3 init context (the config below switches it on under DeepSpeed)
    processor = build_processor("qwen3_vl", build_tokenizer())
    student = build_model("qwen3_vl", processor, "student", seed=0)
    teacher = build_model("qwen3_vl", processor, "teacher", seed=1)
    if cli.pad_heads:
        student, teacher = pad_output_head(student, 5, seed=2), pad_output_head(teacher, 11, seed=3)
    args = VAOPDConfig(
        output_dir=cli.output_dir,
        use_cpu=True,
        bf16=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        seed=0,
        gradient_checkpointing=False,
        per_device_train_batch_size=cli.per_device,
        gradient_accumulation_steps=cli.accumulation,
        num_generations=4,
        max_completion_length=cli.max_completion_length,
        max_steps=cli.max_steps,
        # Plain SGD, constant lr and no clipping: one step moves the parameters by exactly -lr * grad
        optim=cli.optim,
        learning_rate=cli.learning_rate,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        generation_kwargs={"sequence_bias": [[[processor.tokenizer.eos_token_id], cli.eos_bias]]},
        method=cli.method,
        counterfactual_view=cli.view,
        use_cues=cli.cues,
        cue_recovery=cli.cue_recovery,
        loss_aggregation=cli.loss_aggregation,
        distillation_weight=cli.distillation_weight,
    )
    peft_config = None
    if cli.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    trainer = VAOPDTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=image_question_dataset(cli.num_prompts, cues=cli.cues),
        processing_class=processor,
        peft_config=peft_config,
        reward_funcs=[token_reward] if cli.rewards else None,
    )

    # Spy on the scoring: the generation batch in sampling order (the student's prompts and completions) and the
    # teacher's log-probs of both views (under its own prompt, with the cue when there is one)
    scored, logps = [], []
    score_views, generate_and_score = trainer._score_views, trainer._generate_and_score_completions

    def recording_score_views(batch, max_rows):
        scores = score_views(batch, max_rows)
        logps.append((scores.logp.detach().cpu().clone(), scores.cf_logp.detach().cpu().clone()))
        return scores

    def recording_generate_and_score(inputs):
        batch = generate_and_score(inputs)
        logp_original, logp_counterfactual = logps.pop()
        scored.append({**to_cpu(batch), "logp_original": logp_original, "logp_counterfactual": logp_counterfactual})
        return batch

    trainer._score_views = recording_score_views
    trainer._generate_and_score_completions = recording_generate_and_score
    passes = {"teacher": Passes(teacher), "student": Passes(student)}
    count_passes(trainer, *passes.values())

    before = snapshot(trainer.model)
    trainer.train()
    after = snapshot(trainer.model)

    teacher_params = list(trainer.accelerator.unwrap_model(trainer.teacher_model).parameters())
    local = {
        "scored": scored,
        "micro_batches": [to_cpu(b) for b in trainer._buffered_inputs],
        "passes": {
            role: {key: getattr(p, key) for key in ("prompts", "rollouts", "positions", "max_rows")}
            for role, p in passes.items()
        },
    }
    ranks = [None] * trainer.accelerator.num_processes
    dist.all_gather_object(ranks, local)
    if trainer.accelerator.is_main_process:
        torch.save(
            {
                "ranks": ranks,
                "log_history": trainer.state.log_history,
                "before": before,
                "after": after,
                "trainable": sorted(n for n, p in trainer.model.named_parameters() if p.requires_grad),
                # ZeRO-3 keeps each process's partition of a parameter in `ds_tensor` (all of it for the small
                # parameters it leaves unpartitioned)
                "teacher_sharding": {
                    "numel": sum(p.ds_numel if hasattr(p, "ds_id") else p.numel() for p in teacher_params),
                    "local_numel": sum(
                        p.ds_tensor.numel() if hasattr(p, "ds_id") else p.numel() for p in teacher_params
                    ),
                },
                "settings": {name: getattr(args, name) for name in _OBJECTIVE_SETTINGS},
                "pad_heads": cli.pad_heads,
                "cues": cli.cues,
                "rewards": cli.rewards,
                "world_size": trainer.accelerator.num_processes,
                "distributed_type": str(trainer.accelerator.distributed_type),
            },
            cli.out,
        )
    end_run(trainer.accelerator)


if __name__ == "__main__":
    main()
