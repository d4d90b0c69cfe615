"""`VAOPDTrainer`: TRL's `DistillationTrainer` with vision-aware objectives (VA-OPD, VGS, and their composition).

The adapter changes four things of its base and nothing else:
1. sampling: each prompt is repeated `num_generations` times inside the generation batch;
2. scoring: once per generation batch, the teacher scores every rollout under the views the run needs (the original
   image, and the counterfactual view when a component needs it), in calls of at most a micro-batch of rows cut
   along sibling groups, so each group's prompt runs once per view. Its hidden states are kept for the loss, and the
   pure objective functions turn its log-probabilities into visual advantages, rollout weights (over complete sibling
   groups, across processes), per-token coefficients and, for VGS, the language-prior mask and per-token gamma
   (quantiles over the whole generation batch);
3. loss: the student runs once per view the objective needs (twice for VGS), and the per-token divergences against the
   kept teacher states are weighted by those coefficients: the teacher never runs again for the loss;
4. metrics: VA concentration, group shares, per-group KL and the VGS terms, logged through the base's `_metrics`.

With `reward_funcs`, the scoring also computes GRPO's group advantages from the rewards of the whole generation batch,
and the loss mixes in the policy term (`trl_vaopd.objective.policy`).
"""

from __future__ import annotations

import copy
import os
import textwrap
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any, NamedTuple

import numpy as np
import torch
from accelerate.logging import get_logger
from datasets import IterableDataset
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTuner
from peft.utils.other import set_additional_trainable_modules
from PIL import Image
from trl import DistillationTrainer
from trl.data_utils import prepare_multimodal_messages
from trl.models import prepare_deepspeed
from trl.trainer.utils import (
    RepeatSampler,
    create_model_from_path,
    pad,
    split_pixel_values_by_grid,
    split_tensor_dict,
    unsplit_pixel_values_by_grid,
)

from .chunked import OutputHead, per_token_divergence, token_logprobs, vgs_divergences
from .config import VAOPDConfig
from .cue_recovery import add_cue_recovery, cue_recovery_modules_to_save, has_cue_recovery
from .dataset_formats import row_images, validate_vaopd_dataset
from .objective import (
    adaptive_gamma,
    group_advantages,
    high_va_mask,
    lp_mask,
    mask_coefficients,
    policy_coefficients,
    policy_token_loss,
    rollout_weights,
    sampled_token_kl,
    token_coefficients,
    token_mean_coefficients,
    uniform_rollout_weights,
    va_mass_share,
    va_token_mask,
    valid_quantile,
    vaopd_loss,
    vgs_loss,
    vgs_token_loss,
    view_kl_advantage,
    visual_advantage,
)
from .prefix_sharing import call_slices, prefix_groups, prefix_sharing_support, shared_prefix_hidden_states
from .privileged import teacher_prompt, validate_privileged_columns
from .rewards import compute_rewards, resolve_reward_funcs
from .views import CounterfactualView, drop_image_parts, get_view, rows_without_text
from .vocabulary import compared_vocab_size, load_tokenizer_of


__all__ = ["TeacherScores", "VAOPDTrainer"]

logger = get_logger(__name__)

# Model inputs besides the token ids that `DistillationTrainer` carries per rollout for VLMs
_MULTIMODAL_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "pixel_attention_mask",
    "spatial_shapes",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)
# Keys the scoring adds to each rollout of the generation batch, consumed by `_compute_loss`
_TEACHER_HIDDEN = "teacher_hidden_states"
_TEACHER_CF_HIDDEN = "teacher_counterfactual_hidden_states"
_TEACHER_LOGP = "teacher_token_logprobs"
_COEFFICIENTS = "vaopd_coefficients"
_HIGH_MASK = "vaopd_high_mask"
_NUM_PROMPTS = "vaopd_num_prompts"
_ADVANTAGES = "grpo_advantages"
_POLICY_COEFFICIENTS = "grpo_coefficients"
_LP_MASK = "vgs_lp_mask"
_GAMMA = "vgs_gamma"
# The counterfactual view's model inputs, per rollout: its pixel values (views that keep the image) or its text-only
# prompt ("drop"); the completion and every other input are the original view's
_CF_PIXELS = "counterfactual_pixel_values"
_CF_PROMPT_IDS = "counterfactual_prompt_ids"
_CF_PROMPT_MASK = "counterfactual_prompt_mask"


def _take_rows(batch: dict[str, Any], rows: slice | list[int]) -> dict[str, Any]:
    """The `rows` of a batch: per-rollout values (tensors with a batch dim, per-row lists) are indexed, scalars shared."""

    def take(v):
        if isinstance(v, list):
            return v[rows] if isinstance(rows, slice) else [v[i] for i in rows]
        if isinstance(v, torch.Tensor) and v.ndim > 0:
            return v[rows]
        return v

    return {k: take(v) for k, v in batch.items()}


def _valid_positions(hidden: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Each rollout's hidden states at its valid positions only, as views of one packed tensor (no padding kept)."""
    return list(torch.split(hidden[mask.bool()], mask.sum(dim=1).tolist()))


def _concat_rows(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in first.items():
        if isinstance(v, list):
            out[k] = v + second[k]
        elif isinstance(v, torch.Tensor) and v.ndim > 0:
            out[k] = torch.cat([v, second[k]])
        else:
            out[k] = v
    return out


class TeacherScores(NamedTuple):
    """What the teacher's scoring of a generation batch keeps, per rollout (counterfactual fields `None` when the run
    does not need them, hidden states of a view only when the loss needs them)."""

    logp: torch.Tensor
    """`(N, T)` log-probabilities of the sampled tokens, original view."""
    hidden: torch.Tensor
    """`(N, T, H_t)` hidden states, original view (the KL target)."""
    cf_logp: torch.Tensor | None
    """`(N, T)` log-probabilities of the same tokens under the counterfactual view (the paper's VA)."""
    cf_hidden: torch.Tensor | None
    """`(N, T, H_t)` hidden states under the counterfactual view (VGS's `qbar`)."""
    view_kl: torch.Tensor | None
    """`(N, T)` the teacher's `KL(q || qbar)` between its two views' next-token distributions (VGS's VDS, and the
    `visual_advantage="teacher_view_kl"` VA)."""


class VAOPDTrainer(DistillationTrainer):
    """
    Trainer for vision-aware on-policy distillation of vision-language models: standard OPD, Visual-Advantage OPD
    (VA-OPD), Visual Gradient Steering (VGS), or VA-OPD and VGS together, chosen by `VAOPDConfig.method`.

    A drop-in replacement for [`~trl.DistillationTrainer`] with the same constructor: the student samples
    `num_generations` responses per (image, question) prompt and the frozen teacher scores every sampled token. With
    VA-OPD it scores them twice (original image and a counterfactual view without fine detail), and the student
    minimises the per-token KL to the teacher on the original image, reweighted by the tokens' visual advantage: sibling
    rollouts by their relative mean VA, and within each response the high-VA and low-VA tokens averaged separately.
    With VGS both models also run under the counterfactual view, and the loss is split into a language-prior and a
    visual-grounding part, steered toward the visual one.

    Example:

    ```python
    >>> from trl_vaopd import VAOPDConfig, VAOPDTrainer

    >>> trainer = VAOPDTrainer(
    ...     model="Qwen/Qwen3-VL-2B-Instruct",
    ...     teacher_model="Qwen/Qwen3-VL-8B-Instruct",
    ...     args=VAOPDConfig(output_dir="qwen3-vl-2b-vaopd", method=["va_opd", "vgs"]),
    ...     train_dataset=dataset,  # columns "prompt" (conversational) and "images"
    ... )
    >>> trainer.train()
    ```

    Args:
        model, teacher_model, train_dataset, eval_dataset, processing_class, callbacks, optimizers,
        quantization_config, peft_config:
            As in [`~trl.DistillationTrainer`]. The teacher is required, the processing class must be a multimodal
            processor, every row must hold at least one image (`images` or `image` column), and train datasets must
            be map-style (the sibling layout needs an indexable dataset). The teacher must share the student's
            tokenizer; output heads padded to different sizes are compared over the tokenizer's tokens.
        args ([`VAOPDConfig`], *optional*):
            Configuration; a default `VAOPDConfig` when `None`.
        tools:
            Not supported: tool calls inject new tokens and images into completions, which the two-view scoring
            does not model. Passing tools raises.
        counterfactual_view (`Callable[[PIL.Image.Image], PIL.Image.Image]`, *optional*):
            A custom pixel view (same output size as input), overriding `args.counterfactual_view`.
        reward_funcs (`Callable`, `str` or a list of them, *optional*):
            Verifiable rewards with TRL's reward signature (`"accuracy"`: `trl_vaopd.evaluation.accuracy_reward`),
            mixed in as GRPO's policy term with weight `1 - args.distillation_weight`
            (`docs/methods/rewards.md`).
    """

    _tag_names = ["trl", "distillation", "vaopd", "trl-vaopd"]
    _name = "VA-OPD"
    _paper = {
        "title": "Visual-Advantage On-Policy Distillation for Vision-Language Models",
        "id": "2605.21924",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @article{liu2026visual,
                title        = {{Visual-Advantage On-Policy Distillation for Vision-Language Models}},
                author       = {Ruiqi Liu and Xiaolei Lv and Gengsheng Li and Ximo Zhu and Zhiheng Wang and Zhengbo Zhang and Junkai Chen and Zhiheng Li and Bo Li and Jun Gao and Shu Wu},
                year         = 2026,
                eprint       = {arXiv:2605.21924},
            }"""),
    }

    def __init__(
        self,
        model,
        teacher_model=None,
        args: VAOPDConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
        tools: list[Callable] | None = None,
        counterfactual_view: Callable[[Image.Image], Image.Image] | None = None,
        reward_funcs: Callable | str | list[Callable | str] | None = None,
    ):
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = VAOPDConfig(f"{str(name).split('/')[-1]}-VA-OPD")
        elif not isinstance(args, VAOPDConfig):
            raise TypeError(
                f"VAOPDTrainer needs a VAOPDConfig, got {type(args).__name__}. Build `VAOPDConfig(...)` with the same "
                "arguments: it extends DistillationConfig."
            )
        # Everything that can be checked without models is checked before any model is loaded
        if teacher_model is None:
            raise ValueError("VAOPDTrainer needs a `teacher_model` (a model or a hub name / local path).")
        self.reward_funcs, self.reward_func_names = resolve_reward_funcs(reward_funcs)
        self._check_rewards(args)
        if tools:
            raise ValueError(
                "VAOPDTrainer does not support `tools`: tool results add tokens and images to completions that the "
                "two-view teacher scoring does not model. Remove `tools`, or use trl.DistillationTrainer."
            )
        for split, dataset in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
            datasets = dataset.values() if isinstance(dataset, dict) else [dataset]
            for ds in datasets:
                if isinstance(ds, IterableDataset):
                    raise ValueError(
                        f"VAOPDTrainer needs a map-style `{split}` (datasets.Dataset): the sibling rollouts of a "
                        "prompt are laid out by an index sampler. Convert it with `Dataset.from_generator` or "
                        "`dataset.take(n)` followed by `Dataset.from_list`."
                    )
                if ds is not None:
                    validate_vaopd_dataset(ds)
                    if args.use_cues:
                        validate_privileged_columns(ds, args.cue_column, args.teacher_prompt_column)
        self.counterfactual_view: CounterfactualView = get_view(
            counterfactual_view if counterfactual_view is not None else args.counterfactual_view,
            args.pixelate_ratio,
        )
        if args.needs_counterfactual and not self.counterfactual_view.keeps_layout:
            self._check_text_without_images(args, train_dataset, eval_dataset)
        if args.needs_counterfactual and self.counterfactual_view.keeps_layout and train_dataset:
            # A pixel view that changes the size or returns no image would only be refused mid-step: try it on the
            # first row's images now, before any compute
            for image in row_images(train_dataset[0]):
                self.counterfactual_view(image)
        teacher_model, teacher_tokenizer = self._load_teacher(teacher_model, args)

        # The base would refuse teachers whose output head is padded to another size than the student's: the teacher
        # is set up below instead, once the student's tokenizer is known
        super().__init__(
            model=model,
            teacher_model=None,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
            quantization_config=quantization_config,
            peft_config=peft_config,
        )
        if not self._is_vlm:
            raise ValueError(
                "VAOPDTrainer needs a multimodal processor (a transformers ProcessorMixin, e.g. AutoProcessor of a "
                f"VLM), got {type(self.processing_class).__name__}. Pass `processing_class=AutoProcessor...`."
            )
        self._check_eval_batch()
        if isinstance(self.model, PeftModel):
            self._record_absolute_base_paths()
        student_rows = OutputHead.of(self.accelerator.unwrap_model(self.model)).num_rows
        teacher_rows = OutputHead.of(teacher_model).num_rows
        self._vocab_size = compared_vocab_size(student_rows, teacher_rows, self._tokenizer, teacher_tokenizer)
        if self._vocab_size is not None and student_rows > self._vocab_size:
            # Padding rows are no token: the student must not sample them, and they are not compared
            padding = list(range(self._vocab_size, student_rows))
            self.generation_config.suppress_tokens = [*(self.generation_config.suppress_tokens or []), *padding]
        if self.is_deepspeed_enabled:
            self.teacher_model = prepare_deepspeed(teacher_model, self.accelerator)
        else:
            self.teacher_model = self.accelerator.prepare_model(teacher_model, evaluation_mode=True)
        # Resolved once: unwrapping and reading the head on every call is measurable overhead (benchmarks/README.md)
        self._teacher_module = self.accelerator.unwrap_model(self.teacher_model)
        self._teacher_head = OutputHead.of(self._teacher_module, self._vocab_size)
        self.model.add_model_tags([name.replace("_", "-") for name in args.method])
        self._announced_paths: set[tuple[str, str | None]] = set()
        if args.cue_recovery or has_cue_recovery(self.model):
            self._attach_cue_recovery()
        for callback in self.callback_handler.callbacks:
            self._bind(callback)

    def add_callback(self, callback) -> None:
        super().add_callback(callback)
        self._bind(self.callback_handler.callbacks[-1])

    def _bind(self, callback) -> None:
        # Callbacks that measure during training (`VisualRelianceCallback`) report through the trainer's callbacks
        if hasattr(callback, "bind_trainer"):
            callback.bind_trainer(self)

    def _record_absolute_base_paths(self) -> None:
        """A saved adapter names its base as the student was loaded; a relative local path would reload only from the
        working directory of the training run, so a local base is recorded by its absolute path."""
        for config in self.model.peft_config.values():
            path = config.base_model_name_or_path
            if path and os.path.isdir(path):
                config.base_model_name_or_path = os.path.abspath(path)

    def _attach_cue_recovery(self) -> None:
        """Give the student ViCuR's cue-recovery module (kept if it has one), trainable next to a PEFT adapter too.

        Attached after the base has loaded (and possibly wrapped) the student, so a student given by name gets it
        as well; the optimizer, DDP and DeepSpeed are set up later, in `train()`, and include it.
        """
        args, model = self.args, self.model
        base = model.get_base_model() if isinstance(model, PeftModel) else model
        if has_cue_recovery(base):
            # Layers, not intervals: a checkpoint with one module layer records any interval past its depth
            layers = base.config.cue_recovery["layers"]
            if layers != list(range(0, base.config.get_text_config().num_hidden_layers, args.cue_recovery_interval)):
                raise ValueError(
                    f"The student already carries a cue-recovery module after layers {layers} (every "
                    f"{base.config.cue_recovery['interval']} layers), but VAOPDConfig.cue_recovery_interval="
                    f"{args.cue_recovery_interval}. Set cue_recovery_interval={base.config.cue_recovery['interval']}, "
                    "or pass the student without the module."
                )
        if args.use_vllm:
            raise ValueError(
                "The student carries a cue-recovery module, which vLLM would not run: its rollouts would be "
                "off-policy. Set use_vllm=False."
            )
        add_cue_recovery(base, args.cue_recovery_interval)
        if isinstance(model, PeftModel):
            # The adapter's `modules_to_save` keeps the module trainable and saves it with the adapter
            adapter = model.active_adapter
            config = model.peft_config[adapter]
            config.modules_to_save = [*(config.modules_to_save or []), *cue_recovery_modules_to_save(base)]
            set_additional_trainable_modules(model.base_model, config, BaseTuner.get_model_config(model), adapter)

    def _check_rewards(self, args: VAOPDConfig) -> None:
        """Settings of the policy term that no rollout can fix, refused before any model is loaded."""
        if args.distillation_weight < 1.0 and not self.reward_funcs:
            raise ValueError(
                f"VAOPDConfig.distillation_weight={args.distillation_weight} mixes in GRPO's policy term, which needs "
                "rewards: pass `reward_funcs=` to the trainer (e.g. 'accuracy', or `--reward_funcs accuracy`), or "
                "set distillation_weight=1.0."
            )
        if not self.reward_funcs:
            return
        if args.num_generations < 2:
            raise ValueError(
                f"Rewards need num_generations >= 2: GRPO's advantages are relative to the sibling group, and "
                f"num_generations={args.num_generations} gives none to compare with. Raise num_generations."
            )
        if args.reward_weights is not None and len(args.reward_weights) != len(self.reward_funcs):
            raise ValueError(
                f"VAOPDConfig.reward_weights has {len(args.reward_weights)} entries for {len(self.reward_funcs)} "
                f"reward functions ({', '.join(self.reward_func_names)}); give one weight per function."
            )

    @staticmethod
    def _check_text_without_images(args: VAOPDConfig, *datasets) -> None:
        """The "drop" view shows the prompts (the student's, and the teacher's own) without their images: refuse rows
        that would have no text left, before any compute."""
        columns = ["prompt"]
        if args.use_cues and args.teacher_prompt_column:
            columns.append(args.teacher_prompt_column)
        for dataset in datasets:
            for ds in dataset.values() if isinstance(dataset, dict) else [dataset]:
                for column in columns if ds is not None else []:
                    empty = rows_without_text(ds[column])
                    if empty:
                        raise ValueError(
                            f"counterfactual_view='drop' shows the prompts without their images, but {len(empty)} "
                            f"row(s) of the '{column}' column hold nothing else (first indices: {empty[:5]}). Add "
                            "the question's text to those rows, or use a pixel view such as "
                            "counterfactual_view='pixelate'."
                        )

    @staticmethod
    def _load_teacher(teacher_model, args: VAOPDConfig):
        """The teacher model (loaded as `DistillationTrainer` loads it, when given by name or path) and its tokenizer
        (`None` when it was passed as a model object)."""
        if not isinstance(teacher_model, str):
            if args.teacher_model_init_kwargs is not None:
                raise ValueError(
                    "VAOPDConfig.teacher_model_init_kwargs is set, but the teacher_model is already instantiated. "
                    "Pass the teacher by name or path, or drop teacher_model_init_kwargs."
                )
            return teacher_model, None
        kwargs = dict(args.teacher_model_init_kwargs or {})
        if args.teacher_model_revision is not None:
            kwargs.setdefault("revision", args.teacher_model_revision)
        # Distributed training requires device_map=None ("auto" fails)
        if args.distributed_state.distributed_type in ["MULTI_GPU", "DEEPSPEED"]:
            kwargs["device_map"] = None
        kwargs.setdefault("trust_remote_code", args.trust_remote_code)
        tokenizer = load_tokenizer_of(teacher_model, kwargs.get("revision"), kwargs["trust_remote_code"])
        return create_model_from_path(teacher_model, **kwargs), tokenizer

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        # The privileged teacher's column must survive `remove_unused_columns=True`
        if self.args.use_cues:
            self._signature_columns = [
                *self._signature_columns,
                self.args.teacher_prompt_column or self.args.cue_column,
            ]

    # ------------------------------------------------------------------ sampling
    @property
    def _generation_batch_size(self) -> int:
        args = self.args
        return args.per_device_train_batch_size * self.accelerator.num_processes * args.gradient_accumulation_steps

    def _check_eval_batch(self) -> None:
        if self.eval_dataset is None:
            return
        global_eval_batch = self.args.per_device_eval_batch_size * self.accelerator.num_processes
        if global_eval_batch % self.args.num_generations:
            raise ValueError(
                f"The global evaluation batch (per_device_eval_batch_size={self.args.per_device_eval_batch_size} x "
                f"{self.accelerator.num_processes} processes = {global_eval_batch}) must hold whole groups of "
                f"num_generations={self.args.num_generations} siblings; change per_device_eval_batch_size."
            )

    def _get_train_sampler(self, dataset=None):
        # Each prompt appears `num_generations` times in a row, and the batch of generation is reused across the
        # gradient-accumulation window, as in GRPO
        dataset = self.train_dataset if dataset is None else dataset
        return RepeatSampler(
            data_source=dataset,
            mini_repeat_count=self.args.num_generations,
            batch_size=self._generation_batch_size // self.args.num_generations,
            repeat_count=self.args.gradient_accumulation_steps,
            shuffle=self.shuffle_dataset,
            seed=self.args.seed,
        )

    def _get_eval_sampler(self, eval_dataset):
        # Whole global eval batches only, so every batch holds complete sibling groups
        prompts_per_batch = self.args.per_device_eval_batch_size * self.accelerator.num_processes
        return RepeatSampler(
            data_source=eval_dataset,
            mini_repeat_count=self.args.num_generations,
            batch_size=prompts_per_batch // self.args.num_generations,
            seed=self.args.seed,
        )

    def _prepare_inputs(self, generation_batch):
        # As the base, with one change: the generation batch is shuffled by sibling group, not by rollout, so the
        # siblings of a prompt stay together in a micro-batch and the student can run their shared prompt once. The
        # gradient of the accumulated micro-batches does not depend on the order.
        if not self.model.training:
            return super()._prepare_inputs(generation_batch)
        accumulation = self.args.gradient_accumulation_steps
        if self._step % accumulation == 0 or self._buffered_inputs is None:
            batch = split_pixel_values_by_grid(self._generate_and_score_completions(generation_batch))
            groups = prefix_groups(batch)
            order = torch.randperm(groups.num_groups).tolist()
            rows = [i for g in order for i in (groups.index == g).nonzero().flatten().tolist()]
            micro_batches = split_tensor_dict(_take_rows(batch, rows), accumulation)
            self._buffered_inputs = [unsplit_pixel_values_by_grid(b) for b in micro_batches]
        return self._buffered_inputs[self._step % accumulation]

    # ------------------------------------------------------------------ views
    def _prompt_inputs(
        self, conversations: list[list[dict[str, Any]]], completion_ids: torch.Tensor
    ) -> dict[str, Any]:
        """Model inputs of `conversations` (image parts inserted, or none) ahead of the batch's completions.

        Tokenized with the trainer's chat template, as the base tokenizes the student's prompts: left-padded prompt ids
        and mask, the processor's multimodal fields, and per-token type fields extended by zeros over the completion.
        """
        prompt_ids, _, fields = self._tokenize_prompts(conversations)
        ids = [torch.tensor(p) for p in prompt_ids]
        out = {
            "prompt_ids": pad(ids, padding_value=self._tokenizer.pad_token_id, padding_side="left"),
            "prompt_mask": pad([torch.ones_like(t) for t in ids], padding_value=0, padding_side="left"),
        }
        for key, value in fields.items():
            if key in ("token_type_ids", "mm_token_type_ids"):
                types = pad([torch.as_tensor(v) for v in value], padding_value=0, padding_side="left")
                out[key] = torch.cat([types, types.new_zeros(completion_ids.shape)], dim=1)
            elif key in _MULTIMODAL_KEYS:
                # Some processors return a list of per-image tensors (the base converts them the same way)
                is_list = isinstance(value, list)
                out[key] = (
                    torch.stack(value)
                    if is_list and torch.is_tensor(value[0])
                    else torch.as_tensor(np.array(value) if is_list else value)
                )
        return {k: v.to(completion_ids.device) for k, v in out.items()}

    def _counterfactual_inputs(
        self, conversations: list[list[dict[str, Any]]], inputs: list[dict[str, Any]], rows: dict[str, Any]
    ) -> dict[str, Any]:
        """The counterfactual view of some rollouts' prompts (`conversations`, the rows of `inputs`), as per-rollout
        batch entries (`_CF_*` keys) beside the original view's inputs `rows`."""
        view = self.counterfactual_view
        if not view.keeps_layout:
            text_only = self._prompt_inputs([drop_image_parts(c) for c in conversations], rows["completion_ids"])
            return {_CF_PROMPT_IDS: text_only["prompt_ids"], _CF_PROMPT_MASK: text_only["prompt_mask"]}
        prompts = [
            prepare_multimodal_messages(copy.deepcopy(c), images=[view(img) for img in row_images(x)])
            for c, x in zip(conversations, inputs, strict=True)
        ]
        fields = self._prompt_inputs(prompts, rows["completion_ids"])
        for key in ("image_grid_thw", "image_sizes", "spatial_shapes", "pixel_attention_mask"):
            if key in rows and not torch.equal(fields[key], rows[key]):
                raise ValueError(
                    f"The counterfactual view {view.name!r} changed the processed image layout ({key} differs from the "
                    "original's), so the two views would not share token positions. Use a view that keeps the image "
                    "size and aspect, or counterfactual_view='drop'."
                )
        cf_pixels = fields["pixel_values"].to(rows["pixel_values"].dtype)
        if cf_pixels.shape != rows["pixel_values"].shape:
            raise ValueError(
                f"The counterfactual view {view.name!r} changed the number of visual patches "
                f"({tuple(cf_pixels.shape)} vs {tuple(rows['pixel_values'].shape)}); use a size-preserving view."
            )
        # Split per rollout like the original pixels, so the base's shuffling and micro-batching carry them along
        return {_CF_PIXELS: split_pixel_values_by_grid({**rows, "pixel_values": cf_pixels})["pixel_values"]}

    def _teacher_batch(self, inputs: list[dict[str, Any]], batch: dict[str, Any]) -> dict[str, Any]:
        """The rollouts as the privileged teacher sees them: its own prompt (the cue appended, or the row's teacher
        prompt) before the same completion tokens, with the same images, in every view the run needs."""
        args = self.args
        conversations = [
            teacher_prompt(x, args.cue_column, args.teacher_prompt_column, args.cue_template) for x in inputs
        ]
        with_images = [
            prepare_multimodal_messages(copy.deepcopy(c), images=row_images(x))
            for c, x in zip(conversations, inputs, strict=True)
        ]
        rows = {**batch, **self._prompt_inputs(with_images, batch["completion_ids"])}
        # A pixel view's pixels do not depend on the text: the student's counterfactual pixels serve the teacher too
        if args.needs_counterfactual and not self.counterfactual_view.keeps_layout:
            rows.update(self._counterfactual_inputs(conversations, inputs, rows))
        return rows

    @staticmethod
    def _counterfactual_rows(rows: dict[str, Any]) -> dict[str, Any]:
        """The counterfactual view of some rollouts, from their `_CF_*` entries."""
        if _CF_PIXELS in rows:
            return {**rows, "pixel_values": rows[_CF_PIXELS]}
        keys = ("completion_ids", "completion_mask")
        return {
            "prompt_ids": rows[_CF_PROMPT_IDS],
            "prompt_mask": rows[_CF_PROMPT_MASK],
            **{k: rows[k] for k in keys},
        }

    def _hidden_states(self, model: torch.nn.Module, rows: dict[str, Any], role: str) -> torch.Tensor:
        """Last hidden states `(rows, completion_len, H)` of `model` aligned to the completion tokens of `rows`.

        Sibling rollouts that share a prompt run it once (`trl_vaopd.prefix_sharing`) where that is exact; elsewhere,
        and with `prefix_sharing=False`, every rollout runs prompt and completion in full. Which path runs, and why,
        is logged once per role ("teacher", "student").
        """
        reason = self._prefix_sharing_reason(model, role)
        self._announce_path(role, reason)
        if reason is None:
            # Images per rollout, whether `rows` holds them merged or already split (a view's pixels)
            rows = split_pixel_values_by_grid(unsplit_pixel_values_by_grid(rows))
            return shared_prefix_hidden_states(model, rows, prefix_groups(rows))
        rows = unsplit_pixel_values_by_grid(rows)
        input_ids = torch.cat([rows["prompt_ids"], rows["completion_ids"]], dim=1)
        attention_mask = torch.cat([rows["prompt_mask"], rows["completion_mask"]], dim=1)
        multimodal = {k: rows[k] for k in _MULTIMODAL_KEYS if k in rows}
        return self._get_last_hidden_state(
            model, input_ids, attention_mask, rows["completion_ids"].size(1), **multimodal
        )

    def _prefix_sharing_reason(self, model: torch.nn.Module, role: str) -> str | None:
        """`None` when `model`'s passes share each sibling group's prompt, else why they run full passes."""
        if not self.args.prefix_sharing:
            return "prefix_sharing=False"
        checkpointing = role == "student" and model.training and self.args.gradient_checkpointing
        return prefix_sharing_support(model, gradient_checkpointing=checkpointing)

    def _announce_path(self, role: str, reason: str | None) -> None:
        if (role, reason) in self._announced_paths:
            return
        self._announced_paths.add((role, reason))
        if reason is None:
            logger.info(f"VAOPDTrainer: the {role} runs each sibling group's prompt once (prefix sharing).")
        else:
            logger.warning(f"VAOPDTrainer: the {role} runs every rollout's prompt in full: {reason}.")

    # ------------------------------------------------------------------ scoring
    def _teacher_hidden(self, rows: dict[str, Any]) -> torch.Tensor:
        """Teacher hidden states of `rows`, through the teacher's wrapper so that ZeRO-3 gathers its shards."""
        self.teacher_model.eval()
        with torch.no_grad():
            return self._forward_redirection(
                self.teacher_model, self._teacher_module, self._hidden_states, self._teacher_module, rows, "teacher"
            )

    @torch.no_grad()
    def _score_views(self, batch: dict[str, Any], max_rows: int) -> TeacherScores:
        """The teacher's scores of every rollout under the views the run needs, in calls of at most `max_rows` rows.

        Calls are cut along sibling groups (`call_slices`), so each group's prompt runs once per view wherever a group
        fits in a call. A call holds both views of its rollouts when they share a token layout and twice its rows fit,
        else one view: the teacher never holds more than `max_rows` rows at once.
        """
        args = self.args
        head, temperature = self._teacher_head, args.divergence_temperature
        with_counterfactual, keep_cf_hidden = args.needs_counterfactual, args.vgs
        # The counterfactual view's states feed the sampled tokens' log-probs (the paper's VA) and the two views'
        # divergence (VGS's VDS, the view-KL VA), each only where used; computed call by call, so the states need not
        # be kept
        view_kl_va = args.visual_advantage == "teacher_view_kl"
        with_cf_logp = with_counterfactual and not view_kl_va
        with_view_kl = with_counterfactual and (args.vgs or view_kl_va)
        batch = split_pixel_values_by_grid(batch)
        n = batch["completion_ids"].size(0)
        # Full passes cost the same however the rows are cut: then only the call size matters
        shares = self._prefix_sharing_reason(self._teacher_module, "teacher") is None
        sizes = prefix_groups(batch).sizes if shares else [1] * n
        logp, hidden, cf_logp, cf_hidden, view_kl = [], [], [], [], []
        for call in call_slices(sizes, max_rows):
            original = _take_rows(batch, call)
            tokens, mask = original["completion_ids"], original["completion_mask"]
            rows = call.stop - call.start
            if not with_counterfactual:
                hidden_o = self._teacher_hidden(original)
            elif self.counterfactual_view.keeps_layout and 2 * rows <= max_rows:
                # One call scores both views; their prompts differ in pixels, so they are different prefix groups
                both = self._teacher_hidden(_concat_rows(original, self._counterfactual_rows(original)))
                hidden_o, hidden_c = both[:rows], both[rows:]
            else:
                hidden_o = self._teacher_hidden(original)
                hidden_c = self._teacher_hidden(self._counterfactual_rows(original))
            logp.append(token_logprobs(hidden_o, head, tokens, mask, temperature))
            hidden.append(hidden_o)
            if with_cf_logp:
                cf_logp.append(token_logprobs(hidden_c, head, tokens, mask, temperature))
            if with_view_kl:
                # The teacher against itself on TRL's chunked divergence kernel: the reverse KL KL(q || qbar)
                view_kl.append(per_token_divergence(hidden_o, hidden_c, head, head, mask, 1.0, temperature)[0])
            if keep_cf_hidden:
                cf_hidden.append(hidden_c)
        return TeacherScores(
            logp=torch.cat(logp),
            hidden=torch.cat(hidden),
            cf_logp=torch.cat(cf_logp) if cf_logp else None,
            cf_hidden=torch.cat(cf_hidden) if cf_hidden else None,
            view_kl=torch.cat(view_kl) if view_kl else None,
        )

    def _sibling_groups(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        """Global sibling-group id of each local rollout, checked against the prompts actually sampled."""
        n_local = prompt_ids.size(0)
        k = self.args.num_generations
        first = self.accelerator.process_index * n_local
        groups = torch.arange(first, first + n_local, device=prompt_ids.device) // k
        # Python's hash of a tuple of ints is the same on every process, so it fingerprints the prompt
        fingerprints = torch.tensor(
            [hash(tuple(ids[m.bool()].tolist())) for ids, m in zip(prompt_ids, prompt_mask, strict=True)],
            device=prompt_ids.device,
        )
        all_fingerprints = self.accelerator.gather(fingerprints).view(-1, k)
        if all_fingerprints.size(0) * k != n_local * self.accelerator.num_processes or not bool(
            (all_fingerprints == all_fingerprints[:, :1]).all()
        ):
            raise RuntimeError(
                "Sibling rollouts of a prompt are not laid out in consecutive groups of num_generations across the "
                "generation batch, so rollout weights cannot be computed over complete groups. This happens with a "
                "custom sampler or dataloader; keep VAOPDTrainer's sampler."
            )
        return groups

    def _gather_rows(self, values: torch.Tensor) -> torch.Tensor:
        """`(N, T)` per-token values of the whole generation batch: every process's rollouts, padded to a common T."""
        return self.accelerator.gather(self.accelerator.pad_across_processes(values, dim=1))

    def _local_rows(self, gathered: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """This process's rows of a `_gather_rows` result, cut back to its own width."""
        first = self.accelerator.process_index * like.size(0)
        return gathered[first : first + like.size(0), : like.size(1)]

    def _tie_breaker(self, like: torch.Tensor) -> torch.Tensor:
        """Uniform noise for the masking analysis, drawn for the whole generation batch from `(seed, step)`: the same
        for every split of the batch and after resuming from a checkpoint."""
        generator = torch.Generator().manual_seed(self.args.seed * 1_000_003 + self.state.global_step)
        rows = like.size(0) * self.accelerator.num_processes
        width = int(self.accelerator.gather(torch.tensor([like.size(1)], device=like.device)).max())
        noise = torch.rand((rows, width), generator=generator).to(like.device)
        return self._local_rows(noise, like)

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        mode = "train" if self.model.training else "eval"
        args = self.args
        batch = super()._generate_and_score_completions(inputs)
        if args.needs_counterfactual:
            batch.update(self._counterfactual_inputs([x["prompt"] for x in inputs], inputs, batch))
        # By default a teacher call holds at most a micro-batch of rows, as the base trainer's teacher call in its loss
        micro_batch = args.per_device_train_batch_size if mode == "train" else args.per_device_eval_batch_size
        teacher_batch = self._teacher_batch(inputs, batch) if args.use_cues else batch
        scores = self._score_views(teacher_batch, args.teacher_batch_size or micro_batch)
        if not args.vgs:
            # Only VGS's student runs the counterfactual view: its inputs need not stay for the loss
            for key in (_CF_PIXELS, _CF_PROMPT_IDS, _CF_PROMPT_MASK):
                batch.pop(key, None)
        mask = batch["completion_mask"]
        va = None
        if args.visual_advantage == "teacher_view_kl":
            va = view_kl_advantage(scores.view_kl, mask)
        elif scores.cf_logp is not None:
            va = visual_advantage(scores.logp, scores.cf_logp, mask)

        # Rollout weights need every sibling: gather the per-rollout mean VA of the whole generation batch
        groups = self._sibling_groups(batch["prompt_ids"], batch["prompt_mask"])
        all_groups = self.accelerator.gather(groups)
        if args.rollout_weighting:
            mean_va = va.sum(dim=1) / mask.sum(dim=1).clamp(min=1)
            all_weights = rollout_weights(
                self.accelerator.gather(mean_va).double(), all_groups, args.va_weight_temperature, args.va_eps
            )
        else:
            all_weights = uniform_rollout_weights(all_groups.cpu()).to(mask.device)
        n_local = mask.size(0)
        first = self.accelerator.process_index * n_local
        weights = all_weights[first : first + n_local]
        coefficients = token_coefficients(
            va if va is not None else torch.zeros(mask.shape, device=mask.device),
            mask,
            weights,
            args.va_high_fraction,
            args.va_high_weight,
            group_tokens=args.token_grouping,
        )
        if args.va_token_mask is not None:
            masked = va_token_mask(va, mask, args.va_token_mask, args.va_token_mask_fraction, self._tie_breaker(mask))
            coefficients = mask_coefficients(coefficients, mask, masked)
            self._log_pooled_share(mode, "mask/va_share", va, masked)
        # Counted over the whole generation batch, so every split of it sums to the same loss
        counts = self.accelerator.gather(torch.stack([mask.new_tensor(mask.size(0)), mask.sum()])).view(-1, 2)
        responses, tokens = counts.sum(dim=0).tolist()
        if args.loss_aggregation == "token_mean":
            coefficients = token_mean_coefficients(coefficients, mask, responses, tokens)
        if self.reward_funcs:
            batch.update(self._policy_inputs(mode, inputs, batch, responses, tokens))
        if args.kl_estimator == "sampled_token":
            batch[_TEACHER_LOGP] = scores.logp
        else:
            batch[_TEACHER_HIDDEN] = _valid_positions(scores.hidden, mask)
        batch[_COEFFICIENTS] = coefficients.float()
        batch[_NUM_PROMPTS] = torch.tensor(float(all_groups.unique().numel()), device=mask.device)
        if va is not None:
            high = high_va_mask(va, mask, args.va_high_fraction)
            batch[_HIGH_MASK] = high
            self._log_va_metrics(mode, va, mask, high)
        self._metrics[mode]["weights/max"].append(all_weights.max().item())
        self._metrics[mode]["weights/min"].append(all_weights.min().item())
        if args.vgs:
            batch.update(self._vgs_token_settings(mode, scores, mask))
        return batch

    def _policy_inputs(
        self,
        mode: str,
        inputs: list[dict[str, Any]],
        batch: dict[str, Any],
        responses: int,
        tokens: int,
    ) -> dict[str, torch.Tensor]:
        """GRPO's advantages and the policy term's coefficients of this process's rollouts, from the rewards of the
        whole generation batch (advantages are relative to complete sibling groups, gathered across processes)."""
        args = self.args
        mask = batch["completion_mask"]
        ids = [c[m.bool()].tolist() for c, m in zip(batch["completion_ids"], mask, strict=True)]
        texts = self._tokenizer.batch_decode(ids, skip_special_tokens=True)
        conversational = isinstance(inputs[0]["prompt"], list)
        completions = [[{"role": "assistant", "content": t}] for t in texts] if conversational else texts
        local = compute_rewards(
            self.reward_funcs, self.reward_func_names, inputs, completions, ids, trainer_state=self.state
        )
        rewards_per_func = self.accelerator.gather(local.to(mask.device))
        weights = torch.tensor(args.reward_weights or [1.0] * len(self.reward_funcs), dtype=torch.float64)
        rewards = (rewards_per_func * weights.to(rewards_per_func.device)).nansum(dim=1)
        rewards[rewards_per_func.isnan().all(dim=1)] = torch.nan  # unscorable: out of the baseline, advantage 0
        advantages, std = group_advantages(rewards, args.num_generations, args.scale_rewards)
        metrics = self._metrics[mode]
        for j, name in enumerate(self.reward_func_names):
            metrics[f"rewards/{name}/mean"].append(torch.nanmean(rewards_per_func[:, j]).item())
        metrics["reward"].append(torch.nanmean(rewards).item())
        metrics["reward_std"].append(rewards[~rewards.isnan()].std().item() if (~rewards.isnan()).sum() > 1 else 0.0)
        metrics["frac_reward_zero_std"].append(torch.isclose(std, torch.zeros_like(std)).float().mean().item())
        first = self.accelerator.process_index * mask.size(0)
        coefficients = policy_coefficients(
            mask, args.num_generations, args.loss_type, responses, tokens, args.max_completion_length
        )
        return {
            _ADVANTAGES: advantages[first : first + mask.size(0)].float(),
            _POLICY_COEFFICIENTS: coefficients.float(),
        }

    def _vgs_token_settings(self, mode: str, scores: TeacherScores, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """VGS's per-token language-prior mask and gamma, from quantiles of VDS over the whole generation batch."""
        args = self.args
        # VDS = KL(q || qbar): the teacher's own divergence between its two views, scored with the views
        vds = scores.view_kl
        all_vds, all_mask = self._gather_rows(vds), self._gather_rows(mask)
        lp = self._local_rows(lp_mask(all_vds, all_mask, args.vgs_lp_quantile), mask)
        if args.vgs_adaptive_gamma:
            gamma = self._local_rows(
                adaptive_gamma(all_vds, all_mask, args.vgs_gamma, args.vgs_adaptive_gamma_quantiles), mask
            )
        else:
            gamma = torch.where(mask.bool(), args.vgs_gamma, 0.0).double()
        metrics = self._metrics[mode]
        valid = all_mask.bool()
        metrics["vgs/vds"].append(all_vds[valid].mean().item() if valid.any() else 0.0)
        metrics["vgs/lp_threshold"].append(valid_quantile(all_vds, all_mask, args.vgs_lp_quantile).item())
        return {_TEACHER_CF_HIDDEN: _valid_positions(scores.cf_hidden, mask), _LP_MASK: lp, _GAMMA: gamma.float()}

    def _log_pooled_share(self, mode: str, key: str, va: torch.Tensor, selected: torch.Tensor) -> None:
        """Share of the whole generation batch's VA mass on the `selected` tokens."""
        all_va, all_selected = self._gather_rows(va), self._gather_rows(selected)
        total = all_va.sum()
        self._metrics[mode][key].append((all_va[all_selected].sum() / total).item() if total > 0 else 0.0)

    def _log_va_metrics(self, mode: str, va: torch.Tensor, mask: torch.Tensor, high: torch.Tensor) -> None:
        # Pool the whole generation batch: shares are ratios of global sums, not means of per-process ratios
        va_all, mask_all = self._gather_rows(va), self._gather_rows(mask)
        total = va_all[mask_all.bool()].sum()
        metrics = self._metrics[mode]
        metrics["va/mean"].append((total / mask_all.sum().clamp(min=1)).item())
        metrics["va/top10_share"].append(va_mass_share(va_all, mask_all, 0.1))
        self._log_pooled_share(mode, "va/high_group_share", va, high)

    # ------------------------------------------------------------------ loss
    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        args = self.args
        mask = inputs["completion_mask"]
        student_hidden = self._hidden_states(unwrapped_student, inputs, "student")
        student_head = OutputHead.of(unwrapped_student, self._vocab_size)
        # The optimiser sees the sum over accumulation steps and the mean over processes of these losses: scaling by
        # the process count makes that the gradient of L over the whole generation batch
        num_prompts = inputs[_NUM_PROMPTS].item() / self.accelerator.num_processes
        if args.vgs:
            # pbar needs a gradient only for the language-prior term
            with nullcontext() if args.vgs_lambda > 0 else torch.no_grad():
                student_cf_hidden = self._hidden_states(
                    unwrapped_student, self._counterfactual_rows(inputs), "student"
                )
            standard, visual, language, entropy, shift, flip = vgs_divergences(
                student_hidden,
                student_cf_hidden,
                torch.cat(inputs[_TEACHER_HIDDEN]),
                torch.cat(inputs[_TEACHER_CF_HIDDEN]),
                student_head,
                self._teacher_head,
                mask,
                args.divergence_temperature,
            )
            lp = inputs[_LP_MASK]
            token_loss = vgs_token_loss(standard, visual, language, inputs[_GAMMA], lp, args.vgs_lambda)
            loss = vgs_loss(token_loss, inputs[_COEFFICIENTS], num_prompts, args.vgs_eta)
            terms = torch.stack([standard, visual, language]).detach()
            self._vgs_sums = torch.stack(
                [*terms.sum(dim=(1, 2)), (language.detach() * lp).sum(), lp.sum(), shift.sum(), flip.sum()]
            ).float()
        elif args.kl_estimator == "sampled_token":
            student_logp, entropy = token_logprobs(
                student_hidden,
                student_head,
                inputs["completion_ids"],
                mask,
                args.divergence_temperature,
                with_entropy=True,
            )
            standard = sampled_token_kl(student_logp, inputs[_TEACHER_LOGP], mask)
            loss = vaopd_loss(standard, inputs[_COEFFICIENTS], num_prompts)
        else:
            standard, entropy = per_token_divergence(
                student_hidden,
                torch.cat(inputs[_TEACHER_HIDDEN]),
                student_head,
                self._teacher_head,
                mask,
                args.beta,
                args.divergence_temperature,
            )
            loss = vaopd_loss(standard, inputs[_COEFFICIENTS], num_prompts)
        if self.reward_funcs and args.distillation_weight < 1.0:
            # On-policy, at the sampling temperature as TRL's GRPO scores its rollouts
            student_logp = token_logprobs(
                student_hidden, student_head, inputs["completion_ids"], mask, args.temperature
            )
            policy_terms = policy_token_loss(student_logp, inputs[_ADVANTAGES], mask)
            policy = vaopd_loss(policy_terms, inputs[_POLICY_COEFFICIENTS], num_prompts)
            self._loss_parts = torch.stack([loss.detach(), policy.detach()]).float()
            loss = args.distillation_weight * loss + (1.0 - args.distillation_weight) * policy
        valid = mask.bool()
        high = inputs.get(_HIGH_MASK, torch.zeros_like(valid))
        low = valid & ~high
        kl = standard.detach()
        self._kl_group_sums = torch.stack([kl[high].sum(), high.sum(), kl[low].sum(), low.sum()]).float()
        return loss, entropy.sum(), valid.sum()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        output = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # Gathered here, outside the wrapped forward, like the base's entropy metric. A plain gather: in evaluation,
        # gather_for_metrics would trim these vectors as if their entries were samples of the last batch
        mode = "train" if self.model.training else "eval"
        metrics = self._metrics[mode]
        sums = self.accelerator.gather(self._kl_group_sums).view(-1, 4).sum(dim=0)
        if _HIGH_MASK in inputs:
            metrics["kl/high"].append((sums[0] / sums[1].clamp(min=1)).item())
            metrics["kl/low"].append((sums[2] / sums[3].clamp(min=1)).item())
        if self.reward_funcs and self.args.distillation_weight < 1.0:
            # Each micro-batch holds its share of the whole batch's loss: times the accumulation steps, the mean over
            # the logged micro-batches is the generation batch's value of each part
            steps = self.args.gradient_accumulation_steps if mode == "train" else 1
            parts = self.accelerator.gather(self._loss_parts).view(-1, 2).mean(dim=0) * steps
            metrics["loss/distillation"].append(parts[0].item())
            metrics["loss/policy"].append(parts[1].item())
        if self.args.vgs:
            vgs = self.accelerator.gather(self._vgs_sums).view(-1, 7).sum(dim=0)
            tokens = sums[1] + sums[3]
            for i, name in enumerate(("standard", "visual", "language")):
                metrics[f"vgs/{name}"].append((vgs[i] / tokens.clamp(min=1)).item())
            metrics["vgs/language_masked"].append((vgs[3] / vgs[4].clamp(min=1)).item())
            metrics["vgs/lp_share"].append((vgs[4] / tokens.clamp(min=1)).item())
            # Where the visual target left the teacher (docs/methods/vgs.md, "When VGS fails")
            metrics["vgs/target_shift"].append((vgs[5] / tokens.clamp(min=1)).item())
            metrics["vgs/target_flip_share"].append((vgs[6] / tokens.clamp(min=1)).item())
        return output
