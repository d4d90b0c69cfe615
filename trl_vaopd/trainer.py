"""`VAOPDTrainer`: TRL's `DistillationTrainer` with the VA-OPD objective.

The adapter changes four things of its base and nothing else:
1. sampling: each prompt is repeated `num_generations` times inside the generation batch;
2. scoring: once per generation batch, the teacher scores every rollout under the original image and the
   counterfactual view (both views in one batched call), giving visual advantages, rollout weights (over complete
   sibling groups, across processes) and per-token coefficients; the original view's hidden states are kept;
3. loss: the per-token divergence against those kept teacher states, weighted by the coefficients, so the teacher
   runs exactly once more per rollout than in `DistillationTrainer` (the counterfactual view);
4. metrics: VA concentration, group shares and per-group KL, logged through the base's `_metrics`.
"""

from __future__ import annotations

import copy
import textwrap
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from datasets import IterableDataset
from PIL import Image
from trl import DistillationTrainer
from trl.data_utils import prepare_multimodal_messages
from trl.trainer.utils import (
    RepeatSampler,
    pad,
    split_pixel_values_by_grid,
    unsplit_pixel_values_by_grid,
)

from .chunked import OutputHead, per_token_divergence, token_logprobs
from .config import VAOPDConfig
from .dataset_formats import row_images, validate_vaopd_dataset
from .objective import (
    high_va_mask,
    rollout_weights,
    token_coefficients,
    uniform_rollout_weights,
    va_mass_share,
    vaopd_loss,
    visual_advantage,
)
from .views import CounterfactualView, get_view


__all__ = ["VAOPDTrainer"]

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
_COEFFICIENTS = "vaopd_coefficients"
_HIGH_MASK = "vaopd_high_mask"
_NUM_PROMPTS = "vaopd_num_prompts"


def _slice_rows(batch: dict[str, Any], start: int, end: int) -> dict[str, Any]:
    # Per-rollout values (tensors with a batch dim, per-row lists) are sliced; scalars are shared
    return {
        k: v[start:end] if isinstance(v, list) or (isinstance(v, torch.Tensor) and v.ndim > 0) else v
        for k, v in batch.items()
    }


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


class VAOPDTrainer(DistillationTrainer):
    """
    Trainer for Visual-Advantage On-Policy Distillation (VA-OPD) of vision-language models.

    A drop-in replacement for [`~trl.DistillationTrainer`] with the same constructor: the student samples
    `num_generations` responses per (image, question) prompt, the frozen teacher scores every sampled token twice
    (original image and a counterfactual view without fine detail), and the student minimises the per-token KL to the
    teacher on the original image, reweighted by the tokens' visual advantage: sibling rollouts by their relative mean
    VA, and within each response the high-VA and low-VA tokens averaged separately.

    Example:

    ```python
    >>> from trl_vaopd import VAOPDConfig, VAOPDTrainer

    >>> trainer = VAOPDTrainer(
    ...     model="Qwen/Qwen3-VL-2B-Instruct",
    ...     teacher_model="Qwen/Qwen3-VL-8B-Instruct",
    ...     args=VAOPDConfig(output_dir="qwen3-vl-2b-vaopd"),
    ...     train_dataset=dataset,  # columns "prompt" (conversational) and "images"
    ... )
    >>> trainer.train()
    ```

    Args:
        model, teacher_model, train_dataset, eval_dataset, processing_class, callbacks, optimizers,
        quantization_config, peft_config:
            As in [`~trl.DistillationTrainer`]. The teacher is required, the processing class must be a multimodal
            processor, every row must hold at least one image (`images` or `image` column), and train datasets must
            be map-style (the sibling layout needs an indexable dataset).
        args ([`VAOPDConfig`], *optional*):
            Configuration; a default `VAOPDConfig` when `None`.
        tools:
            Not supported: tool calls inject new tokens and images into completions, which the two-view scoring
            does not model. Passing tools raises.
        counterfactual_view (`Callable[[PIL.Image.Image], PIL.Image.Image]`, *optional*):
            A custom pixel view (same output size as input), overriding `args.counterfactual_view`.
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
        self.counterfactual_view: CounterfactualView = get_view(
            counterfactual_view if counterfactual_view is not None else args.counterfactual_view,
            args.pixelate_ratio,
        )

        super().__init__(
            model=model,
            teacher_model=teacher_model,
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
        # Resolved once: unwrapping and reading the head on every call is measurable overhead (benchmarks/README.md)
        self._teacher_module = self.accelerator.unwrap_model(self.teacher_model)
        self._teacher_head = OutputHead.of(self._teacher_module)

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

    # ------------------------------------------------------------------ scoring
    def _counterfactual_batch(self, inputs: list[dict[str, Any]], batch: dict[str, Any]) -> dict[str, Any]:
        """The generation batch with the counterfactual view in place of each image."""
        view = self.counterfactual_view
        rows = [copy.deepcopy(x["prompt"]) for x in inputs]
        if view.keeps_layout:
            prompts = [
                prepare_multimodal_messages(prompt, images=[view(img) for img in row_images(x)])
                for prompt, x in zip(rows, inputs, strict=True)
            ]
        else:
            prompts = rows
        prompt_ids, _, fields = self._tokenize_prompts(prompts)
        if view.keeps_layout:
            for key in ("image_grid_thw", "image_sizes", "spatial_shapes", "pixel_attention_mask"):
                if key in batch and not torch.equal(torch.as_tensor(fields[key]).cpu(), batch[key].cpu()):
                    raise ValueError(
                        f"The counterfactual view {view.name!r} changed the processed image layout ({key} differs "
                        "from the original's), so the two teacher views would not share token positions. Use a view "
                        "that keeps the image size and aspect, or counterfactual_view='drop'."
                    )
            # Some processors return lists here (the base converts them the same way before generating)
            cf_pixels = fields["pixel_values"]
            cf_pixels = torch.as_tensor(np.array(cf_pixels) if isinstance(cf_pixels, list) else cf_pixels)
            cf_pixels = cf_pixels.to(batch["pixel_values"].device, batch["pixel_values"].dtype)
            if cf_pixels.shape != batch["pixel_values"].shape:
                raise ValueError(
                    f"The counterfactual view {view.name!r} changed the number of visual patches "
                    f"({tuple(cf_pixels.shape)} vs {tuple(batch['pixel_values'].shape)}); use a size-preserving view."
                )
            return {**batch, "pixel_values": cf_pixels}
        device = batch["prompt_ids"].device
        ids = [torch.tensor(p) for p in prompt_ids]
        return {
            "prompt_ids": pad(ids, padding_value=self._tokenizer.pad_token_id, padding_side="left").to(device),
            "prompt_mask": pad([torch.ones_like(t) for t in ids], padding_value=0, padding_side="left").to(device),
            "completion_ids": batch["completion_ids"],
            "completion_mask": batch["completion_mask"],
        }

    def _teacher_hidden(self, batch: dict[str, Any]) -> torch.Tensor:
        """Teacher hidden states `(rows, completion_len, H)` aligned to the completion tokens of `batch`."""
        batch = unsplit_pixel_values_by_grid(batch)
        input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
        attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
        multimodal = {k: batch[k] for k in _MULTIMODAL_KEYS if k in batch}
        self.teacher_model.eval()
        unwrapped_teacher = self._teacher_module
        with torch.no_grad():
            # Through the teacher's wrapper, so ZeRO-3 gathers its shards for the forward
            return self._forward_redirection(
                self.teacher_model,
                unwrapped_teacher,
                self._get_last_hidden_state,
                unwrapped_teacher,
                input_ids,
                attention_mask,
                batch["completion_ids"].size(1),
                **multimodal,
            )

    def _score_views(
        self, batch: dict[str, Any], counterfactual: dict[str, Any], rows_per_call: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Teacher log-probs of the sampled tokens under both views, and the original view's hidden states."""
        head = self._teacher_head
        temperature = self.args.divergence_temperature
        batch, counterfactual = split_pixel_values_by_grid(batch), split_pixel_values_by_grid(counterfactual)
        n = batch["completion_ids"].size(0)
        logp_original, logp_counterfactual, hidden_original = [], [], []
        for start in range(0, n, rows_per_call):
            end = min(start + rows_per_call, n)
            original, view = _slice_rows(batch, start, end), _slice_rows(counterfactual, start, end)
            tokens, mask = original["completion_ids"], original["completion_mask"]
            if self.counterfactual_view.keeps_layout:
                # Same token layout: one teacher call scores both views
                hidden = self._teacher_hidden(_concat_rows(original, view))
                hidden_o, hidden_c = hidden[: end - start], hidden[end - start :]
            else:
                hidden_o, hidden_c = self._teacher_hidden(original), self._teacher_hidden(view)
            logp_original.append(token_logprobs(hidden_o, head, tokens, mask, temperature))
            logp_counterfactual.append(token_logprobs(hidden_c, head, tokens, mask, temperature))
            hidden_original.append(hidden_o)
        return torch.cat(logp_original), torch.cat(logp_counterfactual), torch.cat(hidden_original)

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

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        mode = "train" if self.model.training else "eval"
        batch = super()._generate_and_score_completions(inputs)
        counterfactual = self._counterfactual_batch(inputs, batch)
        micro_batch = (
            self.args.per_device_train_batch_size if mode == "train" else self.args.per_device_eval_batch_size
        )
        # Both views of half a micro-batch per call: the teacher holds as many rows at once as in the base trainer
        rows_per_call = max(1, micro_batch // 2) if self.counterfactual_view.keeps_layout else micro_batch
        logp_original, logp_counterfactual, teacher_hidden = self._score_views(batch, counterfactual, rows_per_call)
        mask = batch["completion_mask"]
        va = visual_advantage(logp_original, logp_counterfactual, mask)

        # Rollout weights need every sibling: gather the per-rollout mean VA of the whole generation batch
        groups = self._sibling_groups(batch["prompt_ids"], batch["prompt_mask"])
        mean_va = va.sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        all_mean_va, all_groups = self.accelerator.gather(mean_va), self.accelerator.gather(groups)
        if self.args.rollout_weighting:
            all_weights = rollout_weights(
                all_mean_va.double(), all_groups, self.args.va_weight_temperature, self.args.va_eps
            )
        else:
            all_weights = uniform_rollout_weights(all_groups.cpu()).to(all_mean_va.device)
        n_local = mask.size(0)
        first = self.accelerator.process_index * n_local
        weights = all_weights[first : first + n_local]
        coefficients = token_coefficients(
            va,
            mask,
            weights,
            self.args.va_high_fraction,
            self.args.va_high_weight,
            group_tokens=self.args.token_grouping,
        )
        high = high_va_mask(va, mask, self.args.va_high_fraction)
        num_prompts = all_groups.unique().numel()

        self._log_va_metrics(mode, va, mask, high, all_weights)
        batch[_TEACHER_HIDDEN] = teacher_hidden
        batch[_COEFFICIENTS] = coefficients.float()
        batch[_HIGH_MASK] = high
        batch[_NUM_PROMPTS] = torch.tensor(float(num_prompts), device=mask.device)
        return batch

    def _log_va_metrics(
        self, mode: str, va: torch.Tensor, mask: torch.Tensor, high: torch.Tensor, all_weights: torch.Tensor
    ) -> None:
        # Pool the whole generation batch: shares are ratios of global sums, not means of per-process ratios
        va_all = self.accelerator.gather(self.accelerator.pad_across_processes(va, dim=1))
        mask_all = self.accelerator.gather(self.accelerator.pad_across_processes(mask, dim=1))
        high_all = self.accelerator.gather(self.accelerator.pad_across_processes(high, dim=1))
        total = va_all[mask_all.bool()].sum()
        metrics = self._metrics[mode]
        metrics["va/mean"].append((total / mask_all.sum().clamp(min=1)).item())
        metrics["va/top10_share"].append(va_mass_share(va_all, mask_all, 0.1))
        metrics["va/high_group_share"].append((va_all[high_all].sum() / total).item() if total > 0 else 0.0)
        metrics["weights/max"].append(all_weights.max().item())
        metrics["weights/min"].append(all_weights.min().item())

    # ------------------------------------------------------------------ loss
    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        multimodal = {k: inputs[k] for k in _MULTIMODAL_KEYS if k in inputs}
        student_hidden = self._get_last_hidden_state(
            unwrapped_student, input_ids, attention_mask, inputs["completion_ids"].size(1), **multimodal
        )
        mask = inputs["completion_mask"]
        divergence, entropy = per_token_divergence(
            student_hidden,
            inputs[_TEACHER_HIDDEN],
            OutputHead.of(unwrapped_student),
            self._teacher_head,
            mask,
            self.args.beta,
            self.args.divergence_temperature,
        )
        # The optimiser sees the sum over accumulation steps and the mean over processes of these losses: scaling by
        # the process count makes that the gradient of L over the whole generation batch
        loss = vaopd_loss(
            divergence, inputs[_COEFFICIENTS], inputs[_NUM_PROMPTS].item() / self.accelerator.num_processes
        )
        high, valid = inputs[_HIGH_MASK], mask.bool()
        low = valid & ~high
        kl = divergence.detach()
        self._kl_group_sums = torch.stack([kl[high].sum(), high.sum(), kl[low].sum(), low.sum()]).float()
        return loss, entropy.sum(), valid.sum()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        output = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # Gathered here, outside the wrapped forward, like the base's entropy metric. A plain gather: in evaluation,
        # gather_for_metrics would trim this 4-vector as if its entries were samples of the last batch
        sums = self.accelerator.gather(self._kl_group_sums).view(-1, 4).sum(dim=0)
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["kl/high"].append((sums[0] / sums[1].clamp(min=1)).item())
        self._metrics[mode]["kl/low"].append((sums[2] / sums[3].clamp(min=1)).item())
        return output
