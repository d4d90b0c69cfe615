"""The demo's synthetic visual-reasoning tasks: a rectangle's area or perimeter, read off a tiny figure.

Every item is a 32x32 RGB image showing a filled rectangle, drawn from the top-left corner of the canvas, whose width
and height are whole numbers of grid units (1 to 9, one unit = 3 pixels), in a random hue, with a question in one of
four phrasings. The question text carries no information about the answer. Two tasks share these figures:

- **area** (`TaskConfig(kind="area")`, the default and the regime the demo was built in): one templated step-by-step
  answer, the same for teacher and student,

      Its width is 3 and its height is 4 . The area of a rectangle is its width times its height , so the area is
      3 times 4 = 12 . The answer is \\boxed{12} .

  Only the numbers read off the figure and the area change from image to image: 6 of the 42 answer tokens (14%).
  The student already writes the teacher's template, so nearly all of its KL to the teacher sits on these numbers.
- **perimeter** (`TaskConfig(kind="perimeter")`, the papers' regime): the teacher reasons in five to seven sentences
  (about 66 tokens) whose every word group has three phrasings, and prefers one of them (90% of the time), so the
  language part has real entropy; the student starts from a shorter style of its own (it prefers another phrasing
  of every group, and leaves out the optional sentences), so it must learn the language scaffolding and the looking
  at the same time, and most of its KL to the teacher sits on the words. The numbers read off the figure and those
  derived from them are about a tenth of the teacher's tokens. Every number in an answer depends on the image.

Each item also has a **cue** for ViCuR's teacher ("The rectangle is 3 grid units wide and 4 grid units tall."): the
visual evidence, recoverable from the figure, that does not state the answer.

Detail matters: the pixelate view of VA-OPD (10% per side, so 3x3 pixels for a 32x32 image) leaves a blotch of colour
from which the demo's default teacher cannot read the exact side lengths, so its visual advantage concentrates on the
tokens that state them. The blotch's intensities still carry the size: a teacher trained on pixelated figures too
(`DemoSetup.with_text_prior()`) reads most of them (`docs/replication.md`).

Everything is a pure function of a seed. The held-out test items are drawn first and the validation and training
items exclude their images, so no held-out figure is ever trained on (the hue makes images distinct; the size pairs
themselves are all seen in training).
"""

from __future__ import annotations

import colorsys
import hashlib
import itertools
import json
import random
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from string import Formatter

import numpy as np
from PIL import Image, ImageDraw


__all__ = [
    "DEFAULT_TASK",
    "PERIMETER_TASK",
    "TASK_KINDS",
    "RectangleItem",
    "TaskConfig",
    "answer_of",
    "answer_segments",
    "build_dataset",
    "cue_text",
    "image_dependent_fraction",
    "image_dependent_mask",
    "question_text",
    "reference_answer",
    "render_image",
    "sample_items",
    "split_items",
    "task_corpus",
    "text_only_accuracy",
    "to_rows",
    "variants",
]

#: The two tasks: what the question asks of the rectangle
TASK_KINDS = ("area", "perimeter")

QUESTIONS: dict[str, tuple[str, ...]] = {
    "area": (
        "What is the area of the rectangle?",
        "Find the area of the rectangle in the figure.",
        "The figure shows a rectangle. What is its area?",
        "How many unit squares does the rectangle cover?",
    ),
    "perimeter": (
        "What is the perimeter of the rectangle?",
        "Find the perimeter of the rectangle in the figure.",
        "The figure shows a rectangle. What is its perimeter?",
        "How long is the border of the rectangle?",
    ),
}

# The perimeter task's answers are built sentence by sentence, and each sentence word group by word group:
# `[a|b|c]` is a choice between phrasings, and an optional sentence may be left out. Placeholders: {w} width,
# {h} height, {s} width + height, {p} perimeter; every number in an answer depends on the image.
_PERIMETER_SENTENCES: tuple[tuple[str, bool], ...] = (  # (sentence, optional)
    (
        "[Let us|We will|We can] [work this out|solve this|figure this out] [step by step|carefully|in a few steps] .",
        True,
    ),
    (
        "[Looking at|Reading|From] the [figure|image|picture] , the [rectangle|shape|box] is {w} [units|squares|cells] "
        "[wide|across|in width] and {h} [units|squares|cells] [tall|high|in height] .",
        False,
    ),
    ("The perimeter of a rectangle is [twice|two times|double] the [sum|total] of its width and its height .", True),
    (
        "[Adding the width and the height gives|The width plus the height makes|Together the two sides come to] {s} .",
        False,
    ),
    ("[Twice|Two times|Double] {s} [is|gives|makes] {p} .", False),
    ("[So|Thus|Hence] the perimeter [of the rectangle|of the shape|of this figure] [is|equals|comes to] {p} .", False),
    ("[The answer is|The final answer is|All in all we get] \\boxed{{{p}}} .", False),
)
# Each style prefers its own phrasings: the teacher each word group's first phrasing, the student its last one, with
# probability 0.9 (the other phrasings share the rest); the teacher writes each optional sentence with probability
# 0.8, the student with 0.1. Both are distributions the other style covers, so a student sampling its own style is
# still scored by a teacher on familiar text, and reverse KL has a gradient toward the teacher's phrasings (a
# student certain of one phrasing would have almost none).
_PREFERENCE = 0.9
_OPTIONAL = {"teacher": 0.8, "student": 0.1}
_CHOICE = re.compile(r"\[([^\]]+)\]")
_CUE = "The rectangle is {w} grid units wide and {h} grid units tall."


@dataclass(frozen=True)
class TaskConfig:
    """Settings of a synthetic task; its `fingerprint` keys the model cache.

    Attributes:
        kind: `"area"` (one answer template for teacher and student) or `"perimeter"` (a long-reasoning teacher in
            four phrasings, a student with a style of its own).
        image_size: Side of the square images, in pixels.
        unit: Pixels per grid unit.
        min_side / max_side: Range of the width and height, in units (inclusive).
        margin: Minimum distance between the rectangle and the image border, in pixels.
        jitter: `None` places the rectangle anywhere it fits; an integer places its top-left corner within `jitter`
            pixels of (`margin`, `margin`).
        questions: The question phrasings; the kind's when `None`.
        max_answer_tokens: Generation budget of an answer (the longest reference answer fits).
    """

    kind: str = "area"
    image_size: int = 32
    unit: int = 3
    min_side: int = 1
    max_side: int = 9
    margin: int = 1
    jitter: int | None = 0
    questions: tuple[str, ...] | None = None
    max_answer_tokens: int | None = None

    def __post_init__(self):
        if self.kind not in TASK_KINDS:
            raise ValueError(f"kind must be one of {TASK_KINDS}, got {self.kind!r}.")
        if self.max_side * self.unit + 2 * self.margin > self.image_size:
            raise ValueError("The largest rectangle does not fit in the image.")
        if not 1 <= self.min_side <= self.max_side:
            raise ValueError("Need 1 <= min_side <= max_side.")
        # Frozen: defaults that depend on the kind are filled in here
        if self.questions is None:
            object.__setattr__(self, "questions", QUESTIONS[self.kind])
        if self.max_answer_tokens is None:
            object.__setattr__(self, "max_answer_tokens", 64 if self.kind == "area" else 96)

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


#: The demo's task settings: the area task
DEFAULT_TASK = TaskConfig()
#: The long-reasoning task
PERIMETER_TASK = TaskConfig(kind="perimeter")


@dataclass(frozen=True)
class RectangleItem:
    """One task item: the rectangle's size (units), position (pixels), hue (degrees) and question index."""

    width: int
    height: int
    x: int
    y: int
    hue: int
    question: int

    @property
    def area(self) -> int:
        return self.width * self.height

    @property
    def perimeter(self) -> int:
        return 2 * (self.width + self.height)


def render_image(item: RectangleItem, config: TaskConfig = DEFAULT_TASK) -> Image.Image:
    """The figure: a white canvas with the filled rectangle."""
    image = Image.new("RGB", (config.image_size, config.image_size), (255, 255, 255))
    x1 = item.x + item.width * config.unit - 1
    y1 = item.y + item.height * config.unit - 1
    colour = tuple(round(255 * c) for c in colorsys.hsv_to_rgb(item.hue / 360, 0.85, 0.8))
    ImageDraw.Draw(image).rectangle([item.x, item.y, x1, y1], fill=colour)
    return image


def question_text(item: RectangleItem, config: TaskConfig = DEFAULT_TASK) -> str:
    return config.questions[item.question]


def answer_of(item: RectangleItem, config: TaskConfig = DEFAULT_TASK) -> str:
    """The reference answer: the rectangle's area or perimeter."""
    return str(item.area if config.kind == "area" else item.perimeter)


def variants(config: TaskConfig = DEFAULT_TASK, style: str = "teacher") -> int:
    """How many phrasings of the answer a `"teacher"` or `"student"` writes (supervised training draws one at random;
    on the perimeter task, phrasing `v` is drawn from the seed `v` with the style's preferences)."""
    if style not in ("teacher", "student"):
        raise ValueError(f"style must be 'teacher' or 'student', got {style!r}.")
    return 1 if config.kind == "area" else 2**31 - 1


def _perimeter_template(style: str, variant: int) -> str:
    """The answer template of the perimeter phrasing drawn from the seed `variant` with the style's preferences."""
    rng = random.Random(variant)

    def choose(match: re.Match) -> str:
        options = match.group(1).split("|")
        favourite = 0 if style == "teacher" else len(options) - 1
        if rng.random() < _PREFERENCE:
            return options[favourite]
        return rng.choice(options[:favourite] + options[favourite + 1 :])

    sentences = []
    for sentence, optional in _PERIMETER_SENTENCES:
        keep = not optional or rng.random() < _OPTIONAL[style]
        text = _CHOICE.sub(choose, sentence)  # drawn whether kept or not: a phrasing's seed fixes every choice
        if keep:
            sentences.append(text)
    return " ".join(sentences)


def _phrasings(sentence: str) -> list[str]:
    """Every phrasing of a sentence with `[a|b]` word groups."""
    groups = [match.group(1).split("|") for match in _CHOICE.finditer(sentence)]
    pieces = _CHOICE.split(sentence)[::2]
    return [
        "".join(p + c for p, c in zip(pieces, [*combination, ""], strict=True))
        for combination in itertools.product(*groups)
    ]


def _template_segments(template: str, values: dict[str, str]) -> list[tuple[str, bool]]:
    # Text between the placeholders is image-independent, every placeholder's value depends on the image
    segments = []
    for text, field, _, _ in Formatter().parse(template):
        if text:
            segments.append((text, False))
        if field is not None:
            segments.append((values[field], True))
    return segments


def answer_segments(
    item: RectangleItem, config: TaskConfig = DEFAULT_TASK, style: str = "teacher", variant: int = 0
) -> list[tuple[str, bool]]:
    """A reference answer as `(text, depends_on_image)` segments; concatenated they give `reference_answer`."""
    w, h = str(item.width), str(item.height)
    if config.kind == "area":
        a = str(item.area)
        return [
            ("Its width is", False),
            (" " + w, True),
            (" and its height is", False),
            (" " + h, True),
            (" . The area of a rectangle is its width times its height , so the area is", False),
            (" " + w, True),
            (" times", False),
            (" " + h, True),
            (" =", False),
            (" " + a, True),
            (" . The answer is \\boxed{", False),
            (a, True),
            ("} .", False),
        ]
    if not 0 <= variant < variants(config, style):
        raise ValueError(f"variant must be in [0, {variants(config, style)}), got {variant}.")
    values = {"w": w, "h": h, "s": str(item.width + item.height), "p": str(item.perimeter)}
    return _template_segments(_perimeter_template(style, variant), values)


def reference_answer(
    item: RectangleItem, config: TaskConfig = DEFAULT_TASK, style: str = "teacher", variant: int = 0
) -> str:
    return "".join(text for text, _ in answer_segments(item, config, style, variant))


def cue_text(item: RectangleItem) -> str:
    """ViCuR's cue: the visual evidence (the side lengths, recoverable from the figure), not the answer."""
    return _CUE.format(w=item.width, h=item.height)


def _item_key(item: RectangleItem) -> tuple[int, int, int, int, int]:
    # The image is a function of these; the question phrasing is not part of it
    return (item.width, item.height, item.x, item.y, item.hue)


def sample_items(
    n: int,
    seed: int,
    config: TaskConfig = DEFAULT_TASK,
    exclude: Iterable[RectangleItem] = (),
) -> list[RectangleItem]:
    """`n` items drawn from `seed`, uniform over sizes, positions, colours and phrasings; images in `exclude` are
    skipped (held-out images never reappear in a training stream)."""
    rng = np.random.default_rng(seed)
    excluded = {_item_key(item) for item in exclude}
    items: list[RectangleItem] = []
    while len(items) < n:
        w, h = (int(v) for v in rng.integers(config.min_side, config.max_side + 1, size=2))
        x_max = config.image_size - config.margin - w * config.unit
        y_max = config.image_size - config.margin - h * config.unit
        if config.jitter is not None:
            x_max, y_max = (min(m, config.margin + config.jitter) for m in (x_max, y_max))
        x = int(rng.integers(config.margin, x_max + 1))
        y = int(rng.integers(config.margin, y_max + 1))
        item = RectangleItem(w, h, x, y, int(rng.integers(360)), int(rng.integers(len(config.questions))))
        if _item_key(item) not in excluded:
            items.append(item)
    return items


def split_items(
    num_train: int, num_validation: int, num_test: int, seed: int = 0, config: TaskConfig = DEFAULT_TASK
) -> tuple[list[RectangleItem], list[RectangleItem], list[RectangleItem]]:
    """Train, validation and held-out test items with pairwise distinct images, deterministic from `seed`."""
    test = sample_items(num_test, seed * 3 + 1, config)
    validation = sample_items(num_validation, seed * 3 + 2, config, exclude=test)
    train = sample_items(num_train, seed * 3 + 3, config, exclude=[*test, *validation])
    return train, validation, test


def to_rows(items: Sequence[RectangleItem], config: TaskConfig = DEFAULT_TASK) -> list[dict]:
    """Rows in the trainer's format: conversational `prompt`, `images`, `cue`, plus `answer`, `solution` (the
    teacher's first phrasing) and the sizes."""
    return [
        {
            "prompt": [{"role": "user", "content": question_text(item, config)}],
            "images": [render_image(item, config)],
            "cue": cue_text(item),
            "answer": answer_of(item, config),
            "solution": reference_answer(item, config),
            "width": item.width,
            "height": item.height,
        }
        for item in items
    ]


def build_dataset(items: Sequence[RectangleItem], config: TaskConfig = DEFAULT_TASK):
    """A `datasets.Dataset` of `to_rows(items)`, ready for `VAOPDTrainer`."""
    from datasets import Dataset

    return Dataset.from_list(to_rows(items, config))


def task_corpus(config: TaskConfig = DEFAULT_TASK) -> list[str]:
    """Every question and cue, every answer of the area task and every phrasing of the perimeter task's sentences, to
    train the demo tokenizer on."""
    texts = list(config.questions) + ["[Hint]:"]
    for w in range(config.min_side, config.max_side + 1):
        for h in range(config.min_side, config.max_side + 1):
            item = RectangleItem(w, h, 0, 0, 0, 0)
            texts.append(cue_text(item))
            texts.append(reference_answer(item, config))
    if config.kind == "perimeter":
        # Every phrasing of every sentence (the answers are too many to list), opening an answer and within one
        for sentence, _ in _PERIMETER_SENTENCES:
            for text in _phrasings(sentence):
                filled = text.format(w=3, h=4, s=7, p=14)
                texts += [filled, " " + filled]
    # Every side, sum, area and perimeter as a whole token, with and without the leading space of running text
    numbers = sorted(
        {w * h for w in range(1, config.max_side + 1) for h in range(1, config.max_side + 1)}
        | set(range(1, 4 * config.max_side + 1))
    )
    texts += [f"{{{n}}} {n}" for n in numbers]
    # Repeated so the templates' merges win over rare ones
    return texts * 4


def image_dependent_mask(
    tokenizer, item: RectangleItem, config: TaskConfig = DEFAULT_TASK, style: str = "teacher", variant: int = 0
) -> tuple[list[int], list[bool]]:
    """Token ids of a reference answer and, per token, whether it depends on the image.

    Computed by comparison, not from the template's annotation: a token depends on the image when the same answer for
    some other figure (every other width and height) gives a different token at that position.
    """
    ids = tokenizer(reference_answer(item, config, style, variant), add_special_tokens=False)["input_ids"]
    depends = [False] * len(ids)
    for w in range(config.min_side, config.max_side + 1):
        for h in range(config.min_side, config.max_side + 1):
            other = RectangleItem(w, h, item.x, item.y, item.hue, item.question)
            other_ids = tokenizer(reference_answer(other, config, style, variant), add_special_tokens=False)[
                "input_ids"
            ]
            if len(other_ids) != len(ids):
                raise ValueError("Numbers must be single tokens for a position-wise comparison.")
            depends = [d or a != b for d, a, b in zip(depends, ids, other_ids, strict=True)]
    return ids, depends


def image_dependent_fraction(
    tokenizer,
    items: Sequence[RectangleItem],
    config: TaskConfig = DEFAULT_TASK,
    style: str = "teacher",
    count_eos: bool = True,
) -> float:
    """Mean fraction of image-dependent tokens in the reference answers of `items`, the i-th item's answer in the
    style's phrasing `i mod variants` (with a stride, so a few items cover the teacher's compositions evenly), the
    end-of-turn token counted as a non-dependent answer token when `count_eos`, as it is in completions."""
    fractions = []
    n = variants(config, style)
    for i, item in enumerate(items):
        _, depends = image_dependent_mask(tokenizer, item, config, style, (i * 7919) % n)
        fractions.append(sum(depends) / (len(depends) + int(count_eos)))
    return float(np.mean(fractions))


def text_only_accuracy(
    train: Sequence[RectangleItem], test: Sequence[RectangleItem], config: TaskConfig = DEFAULT_TASK
) -> float:
    """Accuracy of the best text-only predictor learnt from `train`: the most frequent answer for each question text."""
    by_question: dict[int, Counter] = {}
    for item in train:
        by_question.setdefault(item.question, Counter())[answer_of(item, config)] += 1
    overall = Counter(answer_of(item, config) for item in train).most_common(1)[0][0]
    correct = 0
    for item in test:
        counts = by_question.get(item.question)
        guess = counts.most_common(1)[0][0] if counts else overall
        correct += guess == answer_of(item, config)
    return correct / max(1, len(test))
