"""The demo's teacher and student: tiny Qwen3-VL models trained here, on CPU, and cached on disk, for either task.

* The tokenizer is a byte-level BPE trained on the task's corpus (`build_tokenizer(corpus=task_corpus())`), so every
  word and number of the reference answers is a single token.
* The teacher (hidden size 64, 3 layers, ~0.5M parameters) is trained supervised on the teacher's answers (each
  example in one of the task's phrasings, drawn at random) until it reads nearly every validation figure (97% greedy
  accuracy, checked every 50 steps), then frozen. Half of its examples carry the item's cue appended to the question
  (`"[Hint]: ..."`, as ViCuR's teacher reads it), so it can use a cue when one is given.
* The student (hidden size 32, 2 layers, ~0.16M parameters) is trained the same way on the student's answers (on the
  perimeter task, a style of its own) but stopped as soon as it reads a quarter of the validation figures: it has an
  answer format and the arithmetic, and an unreliable reading of the figure, so its accuracy starts far below the
  teacher's. On-policy distillation has to make it read (and, on the perimeter task, write like the teacher).
* Optionally (`DemoSetup.with_text_prior()`, not the default), both also learn a text-only prior, as real VLMs have:
  a share of their training examples (`TrainSpec.blind_rate`) shows the question without a readable figure, half
  with the image dropped from the prompt (the package's "drop" view) and half pixelated (its "pixelate" view), with
  the item's own answer as the target (see `TrainSpec`).

Both are reproducible from a seed and saved with `save_pretrained` under `$TRL_VAOPD_CACHE` (default
`~/.cache/trl_vaopd`)`/demo/<key>/`, where the key hashes every setting that changes the result (and a sample answer,
standing for the template); a later run with the same settings loads them instead of training.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..evaluation import answers_match, extract_answer
from ..tiny_models import _build_config, build_processor, build_tokenizer
from ..views import drop_image_parts, pixelate
from .task import (
    DEFAULT_TASK,
    RectangleItem,
    TaskConfig,
    answer_of,
    cue_text,
    reference_answer,
    render_image,
    split_items,
    task_corpus,
    variants,
)


__all__ = [
    "DemoModels",
    "completion_logits",
    "valid_token_mask",
    "DemoSetup",
    "ModelSpec",
    "TEXT_PRIOR_RATE",
    "TrainSpec",
    "build_demo_model",
    "build_demo_processor",
    "cache_root",
    "cpu_threads",
    "evaluate",
    "generate",
    "load_model",
    "prepare_models",
    "quick_setup",
    "supervised_train",
]

#: Format version of the cache: bump it when the training code changes in a way the settings do not capture
CACHE_VERSION = 2
FAMILY = "qwen3_vl"
VOCAB_SIZE = 1024
#: How ViCuR's teacher reads a cue (`VAOPDConfig.cue_template`'s default), in the teacher's training prompts too
CUE_TEMPLATE = "\n[Hint]: {cue}"
#: `DemoSetup.with_text_prior()`'s share of training examples without a readable figure
TEXT_PRIOR_RATE = 0.25
#: The views a text-prior example is shown under, drawn with equal probability
BLIND_VIEWS = ("drop", "pixelate")


@dataclass(frozen=True)
class ModelSpec:
    """Width and depth of a tiny Qwen3-VL (head dimension 16, 2x grouped-query attention)."""

    hidden: int
    layers: int
    vision_depth: int = 2
    mlp_ratio: int = 2
    vision_hidden: int | None = None  # the language model's width when None


@dataclass(frozen=True)
class TrainSpec:
    """A supervised run: AdamW with linear warm-up then cosine decay (or a constant rate), a loss on the answer tokens
    only, batches cycled through the training items in a seeded order.

    `view` is the image the model is trained on: `"original"`, `"pixelate"` (the detail removed) or `"empty"` (the
    canvas without the rectangle). `style` is whose answers it learns (`"teacher"` or `"student"`, the same on the
    area task), each example in a phrasing drawn at random; `cue_rate` is the share of examples whose question carries
    the item's cue. With `target_accuracy`, the run stops as soon as the greedy accuracy on the validation items,
    checked every `eval_every` steps, reaches it; `steps` is then a cap.

    `blind_rate` is the share of examples shown without a readable figure, each under one of `BLIND_VIEWS` drawn at
    random: `"drop"` (the image parts removed from the prompt, as the package's "drop" view does) or `"pixelate"` (the
    figure pixelated as the "pixelate" view does). Such an example keeps the item's own reference answer as its
    target, so the model learns to answer as well as it can without the figure, in the sense of the log loss it is
    trained and distilled with: the cross-entropy minimiser is the distribution of the answer given what the prompt
    shows. Without the image (the question text carries no information) that is the task generator's prior, the same
    for every item: widths and heights uniform over 1 to 9, the rest of the answer following from them in the style's
    phrasings (the area's mode is not unique: 6, 8, 12, 18 and 24 each have 4 of the 81 size pairs); with a pixelated
    figure it is the posterior given the blotch, which still hints at the size. A fixed "most likely answer" target
    would instead teach certainty in an answer that is wrong for 95% of the figures, which is no model's best
    prediction under the log loss, and has no unique choice on the area task. The views are drawn only when
    `blind_rate > 0`, so the default runs draw the same random numbers as before the option existed. The validation
    accuracy (for `target_accuracy`) is still measured on the figures.
    """

    steps: int
    batch_size: int = 32
    learning_rate: float = 3e-3
    weight_decay: float = 0.01
    warmup: float = 0.05
    schedule: str = "cosine"
    view: str = "original"
    target_accuracy: float | None = None
    eval_every: int = 50
    seed: int = 0
    style: str = "teacher"
    cue_rate: float = 0.0
    blind_rate: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.blind_rate <= 1.0:
            raise ValueError(f"TrainSpec.blind_rate must be in [0, 1], got {self.blind_rate}.")


@dataclass(frozen=True)
class DemoSetup:
    """Everything the cached teacher and student depend on (its `key()` names their cache directory)."""

    task: TaskConfig = field(default_factory=TaskConfig)
    teacher: ModelSpec = field(default_factory=lambda: ModelSpec(hidden=64, layers=3))
    student: ModelSpec = field(default_factory=lambda: ModelSpec(hidden=32, layers=2))
    # The teacher trains until it reads nearly every validation figure (at most `steps`)
    teacher_training: TrainSpec = field(
        default_factory=lambda: TrainSpec(steps=900, target_accuracy=0.97, eval_every=50, seed=0, cue_rate=0.5)
    )
    # The student trains only until it reads about a quarter of them: the skill exists but is unreliable
    student_training: TrainSpec = field(
        default_factory=lambda: TrainSpec(
            steps=1500, schedule="constant", target_accuracy=0.25, eval_every=10, seed=1, style="student"
        )
    )
    num_train: int = 20000
    num_validation: int = 128
    num_test: int = 256
    data_seed: int = 0
    model_seed: int = 0

    def key(self) -> str:
        # The answer templates are code, not settings: sample answers (a few phrasings of each style) stand for them
        sample = RectangleItem(3, 4, 0, 0, 0, 0)
        template = [
            reference_answer(sample, self.task, style, v)
            for style in ("teacher", "student")
            for v in range(min(16, variants(self.task, style)))
        ]
        payload = {"version": CACHE_VERSION, "family": FAMILY, "vocab": VOCAB_SIZE, "template": template}
        payload.update(asdict(self))
        for name in ("teacher_training", "student_training"):
            # Added after models were cached: in the key only when set, so the cached default models stay valid
            if not payload[name]["blind_rate"]:
                del payload[name]["blind_rate"]
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def with_text_prior(self, rate: float = TEXT_PRIOR_RATE) -> DemoSetup:
        """This setup with teacher and student that also learn a text-only prior: a share `rate` of both trainings'
        examples without a readable figure (`TrainSpec.blind_rate`); cached under a key of its own."""
        return replace(
            self,
            teacher_training=replace(self.teacher_training, blind_rate=rate),
            student_training=replace(self.student_training, blind_rate=rate),
        )


@contextmanager
def cpu_threads(threads: int | None = None) -> Iterator[None]:
    """Run torch with `threads` intra-op threads (default: `$TRL_VAOPD_DEMO_THREADS`, else 1), restoring the setting
    afterwards. The demo's models are so small that one thread per process is fastest on a laptop CPU: more threads
    mostly add synchronisation, and on a busy machine OpenMP's spinning threads slow every matrix product down by an
    order of magnitude."""
    if threads is None:
        threads = int(os.environ.get("TRL_VAOPD_DEMO_THREADS", "1"))
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def cache_root() -> Path:
    """Root of the demo cache: `$TRL_VAOPD_CACHE` or `~/.cache/trl_vaopd`."""
    return Path(os.environ.get("TRL_VAOPD_CACHE", Path.home() / ".cache" / "trl_vaopd"))


def build_demo_processor(task: TaskConfig = DEFAULT_TASK):
    """Qwen3-VL processor around a tokenizer trained on the task corpus."""
    tokenizer = build_tokenizer(corpus=task_corpus(task), vocab_size=VOCAB_SIZE)
    return build_processor(FAMILY, tokenizer, image_size=task.image_size)


def build_demo_model(processor, spec: ModelSpec, seed: int = 0):
    """A random tiny Qwen3-VL of the given width and depth, deterministic from `seed`."""
    from transformers import GenerationConfig, Qwen3VLForConditionalGeneration

    tokenizer = processor.tokenizer
    config = _build_config(FAMILY, tokenizer, "teacher", 32)
    heads = spec.hidden // 16
    text, vision = config.text_config, config.vision_config
    text.hidden_size = spec.hidden
    text.intermediate_size = spec.mlp_ratio * spec.hidden
    text.num_hidden_layers = spec.layers
    text.num_attention_heads = heads
    text.num_key_value_heads = max(1, heads // 2)
    if hasattr(text, "layer_types") and text.layer_types is not None:
        text.layer_types = [text.layer_types[0]] * spec.layers
    vision_hidden = spec.vision_hidden or spec.hidden
    vision.hidden_size = vision_hidden
    vision.intermediate_size = spec.mlp_ratio * vision_hidden
    vision.num_heads = vision_hidden // 16
    vision.depth = spec.vision_depth
    vision.out_hidden_size = spec.hidden
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3VLForConditionalGeneration(config)
    model.eval()
    pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config = GenerationConfig(bos_token_id=pad_id, eos_token_id=[eos_id, pad_id], pad_token_id=pad_id)
    return model


def load_model(path: str | os.PathLike):
    from transformers import Qwen3VLForConditionalGeneration

    with _quiet_transformers():
        model = Qwen3VLForConditionalGeneration.from_pretrained(path)
    model.eval()
    return model


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No "Loading weights" / "Writing model shards" bars for models this small."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


# ---------------------------------------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------------------------------------


def suppressed_token_ids(tokenizer) -> list[int]:
    """Vision placeholder tokens, never sampled: one in a completion would be read as an image slot on the next
    forward ("Image features and image tokens do not match")."""
    names = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<image>", "<|im_start|>")
    return [tokenizer.convert_tokens_to_ids(name) for name in names]


def _messages(question: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


@torch.no_grad()
def completion_logits(
    model, encoder: _Encoder, items, completions: torch.Tensor, view: str, completion_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """`(N, T, V)` float32 logits of `model` at the positions that predict `completions` after the prompts of `items`
    shown under `view` ("original", "pixelate" or "drop"); `completion_mask` masks padding after the first EOS."""
    prompts = encoder.prompts(items, view)
    mask = torch.ones_like(completions) if completion_mask is None else completion_mask
    logits = model(
        input_ids=torch.cat([prompts["input_ids"], completions], dim=1),
        attention_mask=torch.cat([prompts["attention_mask"], mask], dim=1),
        mm_token_type_ids=torch.cat([prompts["mm_token_type_ids"], torch.zeros_like(completions)], dim=1),
        pixel_values=prompts.get("pixel_values"),
        image_grid_thw=prompts.get("image_grid_thw"),
    ).logits
    start = prompts["input_ids"].size(1) - 1
    return logits[:, start : start + completions.size(1)].float()


def valid_token_mask(completions: torch.Tensor, stop_ids: Sequence[int]) -> torch.Tensor:
    """`(N, T)` mask of the valid completion tokens: up to and including the first of `stop_ids` (EOS, padding)."""
    is_stop = torch.isin(completions, torch.tensor(list(stop_ids)))
    first = torch.where(is_stop.any(1), is_stop.int().argmax(1), torch.full_like(is_stop[:, 0], completions.size(1)))
    return (torch.arange(completions.size(1)).unsqueeze(0) <= first.unsqueeze(1)).long()


class _Encoder:
    """Builds model inputs for task items: every image has the same size, so a prompt's tokens depend only on its
    question (and its cue, when the question carries one) and on whether the image is dropped.

    A view is `"original"`, `"pixelate"`, `"empty"` (the canvas without the rectangle) or `"drop"` (no image in the
    prompt, as the package's "drop" view); batch methods take one view for all items or one per item.
    """

    def __init__(self, processor, task: TaskConfig):
        self.processor, self.task = processor, task
        self.tokenizer = processor.tokenizer
        self.pad_id = self.tokenizer.pad_token_id
        self.eos_id = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.image_pad_id = self.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        self.suppress_ids = suppressed_token_ids(self.tokenizer)
        # The figure with the rectangle removed: nothing to read (unlike a pixelated or mean-colour view, whose
        # intensities still hint at the rectangle's size)
        self.empty = Image.new("RGB", (task.image_size, task.image_size), (255, 255, 255))
        self._prompt_ids: dict[tuple[str, bool], list[int]] = {}

    def prompt_ids(self, item: RectangleItem, cue: bool = False, drop: bool = False) -> list[int]:
        question = self.task.questions[item.question]
        if cue:
            question += CUE_TEMPLATE.format(cue=cue_text(item))
        if (question, drop) not in self._prompt_ids:
            messages = drop_image_parts(_messages(question)) if drop else _messages(question)
            text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            images = None if drop else [self.empty]
            ids = self.processor(text=[text], images=images, return_tensors="pt")["input_ids"][0].tolist()
            self._prompt_ids[question, drop] = ids
        return self._prompt_ids[question, drop]

    @staticmethod
    def views(items: Sequence[RectangleItem], view: str | Sequence[str]) -> list[str]:
        views = [view] * len(items) if isinstance(view, str) else list(view)
        if len(views) != len(items):
            raise ValueError(f"Got {len(views)} views for {len(items)} items.")
        unknown = set(views) - {"original", "pixelate", "empty", "drop"}
        if unknown:
            raise ValueError(f"Unknown view {sorted(unknown)[0]!r}")
        return views

    def images(
        self, items: Sequence[RectangleItem], view: str | Sequence[str] = "original"
    ) -> dict[str, torch.Tensor]:
        """`pixel_values` and `image_grid_thw` of the items' images under their views; nothing for dropped ones."""
        images = []
        for item, v in zip(items, self.views(items, view), strict=True):
            if v == "drop":
                continue
            image = self.empty if v == "empty" else render_image(item, self.task)
            images.append(pixelate(image) if v == "pixelate" else image)
        if not images:
            return {}
        out = self.processor.image_processor(images=images, return_tensors="pt")
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}

    def _pad_left(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, length - len(r) :] = torch.tensor(r)
            mask[i, length - len(r) :] = 1
        return ids, mask

    def prompts(
        self,
        items: Sequence[RectangleItem],
        view: str | Sequence[str] = "original",
        cues: Sequence[bool] | None = None,
    ) -> dict[str, torch.Tensor]:
        cues = cues if cues is not None else [False] * len(items)
        views = self.views(items, view)
        ids, mask = self._pad_left(
            [self.prompt_ids(item, cue, v == "drop") for item, cue, v in zip(items, cues, views, strict=True)]
        )
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "mm_token_type_ids": (ids == self.image_pad_id).long(),
            **self.images(items, view),
        }

    def supervised(
        self,
        items: Sequence[RectangleItem],
        view: str | Sequence[str] = "original",
        style: str = "teacher",
        phrasings: Sequence[int] | None = None,
        cues: Sequence[bool] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Prompt under its view (with its cue where `cues` says so) + reference answer in the `style`'s phrasing
        `phrasings[i]` + end of turn, left-padded, with `labels` on the answer tokens only."""
        phrasings = phrasings if phrasings is not None else [0] * len(items)
        cues = cues if cues is not None else [False] * len(items)
        views = self.views(items, view)
        rows, answer_lengths = [], []
        for item, variant, cue, v in zip(items, phrasings, cues, views, strict=True):
            answer = reference_answer(item, self.task, style, variant)
            answer_ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"] + [self.eos_id]
            rows.append(self.prompt_ids(item, cue, v == "drop") + answer_ids)
            answer_lengths.append(len(answer_ids))
        ids, mask = self._pad_left(rows)
        labels = torch.full_like(ids, -100)
        for i, n in enumerate(answer_lengths):
            labels[i, -n:] = ids[i, -n:]
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "mm_token_type_ids": (ids == self.image_pad_id).long(),
            "labels": labels,
            **self.images(items, views),
        }


def _answer_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1))


def _training_views(n: int, spec: TrainSpec, generator: torch.Generator) -> list[str]:
    """Each example's view: one of `BLIND_VIEWS` at random with probability `spec.blind_rate`, else `spec.view`."""
    blind = (torch.rand(n, generator=generator) < spec.blind_rate).tolist()
    which = torch.randint(len(BLIND_VIEWS), (n,), generator=generator).tolist()
    return [BLIND_VIEWS[w] if b else spec.view for b, w in zip(blind, which, strict=True)]


def supervised_train(
    model,
    processor,
    items: Sequence[RectangleItem],
    spec: TrainSpec,
    task: TaskConfig = DEFAULT_TASK,
    progress: bool = True,
    description: str = "supervised",
    validation: Sequence[RectangleItem] = (),
    callback: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
    """Train `model` in place on the reference answers of `items`.

    Returns `{"steps", "losses", "validation": [(step, accuracy), ...]}`.
    """
    from tqdm.auto import tqdm

    if spec.target_accuracy is not None and not validation:
        raise ValueError("A target accuracy needs validation items.")
    encoder = _Encoder(processor, task)
    generator = torch.Generator().manual_seed(spec.seed)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=spec.learning_rate,
        betas=(0.9, 0.98),
    )
    warmup = max(1, int(spec.warmup * spec.steps)) if spec.warmup else 0

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if spec.schedule == "constant":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, spec.steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    order = torch.randperm(len(items), generator=generator).tolist()
    position, losses, checks = 0, [], []
    model.train()
    bar = tqdm(range(spec.steps), desc=description, disable=not progress, leave=False)
    for step in bar:
        if position + spec.batch_size > len(order):
            order, position = torch.randperm(len(items), generator=generator).tolist(), 0
        batch_items = [items[i] for i in order[position : position + spec.batch_size]]
        position += spec.batch_size
        # Each example in a phrasing drawn at random, with its cue at the spec's rate
        phrasings = torch.randint(variants(task, spec.style), (len(batch_items),), generator=generator).tolist()
        cues = (torch.rand(len(batch_items), generator=generator) < spec.cue_rate).tolist()
        views = _training_views(len(batch_items), spec, generator) if spec.blind_rate else spec.view
        batch = encoder.supervised(batch_items, views, spec.style, phrasings, cues)
        loss = _answer_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if callback is not None:
            callback(step, losses[-1])
        postfix = {"loss": f"{sum(losses[-10:]) / len(losses[-10:]):.3f}"}
        if validation and ((step + 1) % spec.eval_every == 0 or step + 1 == spec.steps):
            accuracy = evaluate(model, processor, validation, task)["greedy"]
            model.train()
            checks.append((step + 1, accuracy))
            if spec.target_accuracy is not None and accuracy >= spec.target_accuracy:
                break
        if checks:
            postfix["val_acc"] = f"{checks[-1][1]:.0%}"
        if step % 5 == 0:
            bar.set_postfix(postfix)
    bar.close()
    model.eval()
    return {"steps": len(losses), "losses": losses, "validation": checks}


# ---------------------------------------------------------------------------------------------------------------------
# Generation and evaluation
# ---------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def generate(
    model,
    processor,
    items: Sequence[RectangleItem],
    task: TaskConfig = DEFAULT_TASK,
    temperature: float | None = None,
    num_samples: int = 1,
    batch_size: int = 128,
    view: str = "original",
    max_new_tokens: int | None = None,
    seed: int | None = None,
    return_ids: bool = False,
    cue: bool = False,
):
    """Completions for `items`: greedy when `temperature` is `None`, else `num_samples` samples per item (consecutive),
    at most the task's `max_answer_tokens` (or `max_new_tokens`) long; with `cue`, the questions carry the items' cues.

    Returns the decoded texts, or `(prompt batch list, completion id tensors)` pieces when `return_ids`.
    """
    max_new_tokens = max_new_tokens or task.max_answer_tokens
    encoder = _Encoder(processor, task)
    expanded = [item for item in items for _ in range(num_samples)]
    texts, pieces = [], []
    was_training = model.training
    model.eval()
    if seed is not None:
        torch.manual_seed(seed)
    for start in range(0, len(expanded), batch_size):
        chunk = expanded[start : start + batch_size]
        inputs = encoder.prompts(chunk, view, [cue] * len(chunk))
        kwargs: dict[str, Any] = {"do_sample": False, "suppress_tokens": encoder.suppress_ids}
        if temperature is not None:
            kwargs.update(do_sample=True, temperature=temperature, top_p=1.0, top_k=0)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, **kwargs)
        completion = out[:, inputs["input_ids"].size(1) :]
        texts.extend(processor.tokenizer.batch_decode(completion, skip_special_tokens=True))
        if return_ids:
            pieces.append((chunk, inputs, completion))
    if was_training:
        model.train()
    return pieces if return_ids else texts


def is_correct(text: str, item: RectangleItem, task: TaskConfig = DEFAULT_TASK) -> bool:
    return answers_match(extract_answer(text), answer_of(item, task))


def evaluate(
    model,
    processor,
    items: Sequence[RectangleItem],
    task: TaskConfig = DEFAULT_TASK,
    samples: int = 0,
    temperature: float = 1.0,
    view: str = "original",
    seed: int = 0,
    cue: bool = False,
) -> dict[str, float]:
    """Greedy accuracy, and with `samples > 0` avg@`samples` at `temperature` (the paper: avg@8 at 1.0); with `cue`,
    the questions carry the items' cues."""
    greedy = generate(model, processor, items, task, view=view, cue=cue)
    result = {"greedy": sum(is_correct(t, it, task) for t, it in zip(greedy, items, strict=True)) / len(items)}
    if samples:
        sampled = generate(
            model, processor, items, task, temperature=temperature, num_samples=samples, seed=seed, cue=cue
        )
        expanded = [item for item in items for _ in range(samples)]
        correct = sum(is_correct(t, it, task) for t, it in zip(sampled, expanded, strict=True))
        result[f"avg@{samples}"] = correct / len(expanded)
    return result


# ---------------------------------------------------------------------------------------------------------------------
# Preparation and cache
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class DemoModels:
    """The cached teacher and student (directories with the model and the processor), the task's train, validation
    and held-out test items, and what their preparation measured (`meta`)."""

    directory: Path
    setup: DemoSetup
    train_items: list[RectangleItem]
    validation_items: list[RectangleItem]
    test_items: list[RectangleItem]
    meta: dict[str, Any]
    loaded_from_cache: bool

    @property
    def teacher_path(self) -> str:
        return str(self.directory / "teacher")

    @property
    def student_path(self) -> str:
        return str(self.directory / "student")

    def processor(self):
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(self.teacher_path, padding_side="left")

    def teacher(self):
        return load_model(self.teacher_path)

    def student(self):
        return load_model(self.student_path)


def quick_setup(task: TaskConfig = DEFAULT_TASK) -> DemoSetup:
    """A seconds-long setup for tests: narrow one-layer models, a handful of training steps, small splits (the
    accuracies mean nothing)."""
    return DemoSetup(
        task=task,
        teacher=ModelSpec(hidden=32, layers=1, vision_depth=1),
        student=ModelSpec(hidden=16, layers=1, vision_depth=1),
        teacher_training=TrainSpec(steps=4, batch_size=8, eval_every=2, target_accuracy=0.97, cue_rate=0.5),
        student_training=TrainSpec(steps=2, batch_size=8, seed=1, style="student"),
        num_train=64,
        num_validation=8,
        num_test=16,
    )


def split_items_for(setup: DemoSetup) -> tuple[list[RectangleItem], list[RectangleItem], list[RectangleItem]]:
    return split_items(setup.num_train, setup.num_validation, setup.num_test, setup.data_seed, setup.task)


def _num_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _train_and_save(setup: DemoSetup, directory: Path, progress: bool) -> dict[str, Any]:
    from tqdm.auto import tqdm

    task = setup.task
    processor = build_demo_processor(task)
    train_items, validation_items, test_items = split_items_for(setup)
    meta: dict[str, Any] = {"setup": asdict(setup), "key": setup.key()}
    runs = [
        ("teacher", setup.teacher, setup.teacher_training, setup.model_seed),
        ("student", setup.student, setup.student_training, setup.model_seed + 1),
    ]
    for name, spec, training, seed in runs:
        start = time.perf_counter()
        model = build_demo_model(processor, spec, seed)
        if progress:
            goal = (
                f"until it reads {training.target_accuracy:.0%} of the validation figures"
                if training.target_accuracy is not None
                else f"for {training.steps} steps"
            )
            tqdm.write(f"Training the {name} ({_num_params(model) / 1e3:.0f}k parameters) {goal}")
        log = supervised_train(
            model, processor, train_items, training, task, progress, f"{name} training", validation_items
        )
        seconds = time.perf_counter() - start
        accuracy = evaluate(model, processor, test_items, task)["greedy"]
        blind = evaluate(model, processor, test_items, task, view="pixelate")["greedy"]
        dropped = evaluate(model, processor, test_items, task, view="drop")["greedy"]
        with_cue = evaluate(model, processor, test_items, task, cue=True)["greedy"]
        meta[name] = {
            "parameters": _num_params(model),
            "train_steps": log["steps"],
            "train_seconds": round(seconds, 1),
            "final_loss": log["losses"][-1] if log["losses"] else None,
            "validation": log["validation"],
            "heldout_accuracy": accuracy,
            "heldout_accuracy_pixelated": blind,
            "heldout_accuracy_dropped": dropped,
            "heldout_accuracy_with_cue": with_cue,
        }
        reached = [acc for _, acc in log["validation"] if training.target_accuracy and acc >= training.target_accuracy]
        if training.target_accuracy is not None and not reached:
            warnings.warn(
                f"The {name} did not reach {training.target_accuracy:.0%} validation accuracy within "
                f"{training.steps} steps (last check: {log['validation'][-1][1] if log['validation'] else 0:.1%}).",
                stacklevel=2,
            )
        if progress:
            tqdm.write(
                f"  {name}: {log['steps']} steps in {seconds:.0f}s, held-out accuracy {accuracy:.1%} "
                f"({blind:.1%} with pixelated figures)"
            )
        with _quiet_transformers():
            model.save_pretrained(directory / name)
            processor.save_pretrained(directory / name)
    return meta


def prepare_models(
    setup: DemoSetup | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    force: bool = False,
) -> DemoModels:
    """Load the teacher and student for `setup` from the cache, or train and cache them (a few minutes on a CPU).

    Args:
        setup: The settings; the default demo setup when `None`.
        cache_dir: Cache root; `$TRL_VAOPD_CACHE` or `~/.cache/trl_vaopd` when `None`. Models live in
            `<cache_dir>/demo/<setup.key()>/`.
        progress: Show progress bars and messages.
        force: Retrain even when the cache holds the models.
    """
    from tqdm.auto import tqdm

    setup = setup or DemoSetup()
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    directory = root / "demo" / setup.key()
    meta_file = directory / "meta.json"
    splits = split_items_for(setup)
    if meta_file.is_file() and not force:
        meta = json.loads(meta_file.read_text())
        if progress:
            tqdm.write(f"Loaded the cached teacher and student from {directory}")
        return DemoModels(directory, setup, *splits, meta, loaded_from_cache=True)
    directory.parent.mkdir(parents=True, exist_ok=True)
    # Written to a temporary directory and renamed at the end, so an interrupted run leaves no half-written cache
    staging = Path(tempfile.mkdtemp(prefix=f".{setup.key()}-", dir=directory.parent))
    try:
        meta = _train_and_save(setup, staging, progress)
        (staging / "meta.json").write_text(json.dumps(meta, indent=2))
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(staging, directory)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    if progress:
        tqdm.write(f"Cached the teacher and student in {directory}")
    return DemoModels(directory, setup, *splits, meta, loaded_from_cache=False)
