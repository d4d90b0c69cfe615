"""The demo's synthetic visual-reasoning task: the area of a rectangle read off a tiny figure.

Every item is a 32x32 RGB image showing a filled rectangle, drawn from the top-left corner of the canvas, whose width
and height are whole numbers of grid units (1 to 9, one unit = 3 pixels), in a random hue, with the question "What is
the area of the rectangle?" in one of four phrasings. The reference answer is a templated step-by-step solution:

    Its width is 3 and its height is 4 . The area of a rectangle is its width times its height , so the area is
    3 times 4 = 12 . The answer is \\boxed{12} .

Only the numbers read off the figure (the width and the height) and the area derived from them change from image to
image: 6 of the 42 answer tokens (14%, the end-of-turn token included) with the demo's tokenizer; the rest is phrasing
and arithmetic. The question text carries no information about the answer, so a text-only model can do no better
than always guessing the most frequent area (4 of the 81 size pairs, 4.9%).

Detail matters: the pixelate view of VA-OPD (10% per side, so 3x3 pixels for a 32x32 image) leaves a blotch of colour
from which the exact side lengths cannot be read, so the teacher's visual advantage concentrates on the tokens that
state them.

Everything is a pure function of a seed. The held-out test items are drawn first and the validation and training
items exclude their images, so no held-out figure is ever trained on (the hue makes images distinct; the size pairs
themselves are all seen in training).
"""

from __future__ import annotations

import colorsys
import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image, ImageDraw


__all__ = [
    "DEFAULT_TASK",
    "RectangleItem",
    "TaskConfig",
    "answer_segments",
    "build_dataset",
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
]

QUESTIONS: tuple[str, ...] = (
    "What is the area of the rectangle?",
    "Find the area of the rectangle in the figure.",
    "The figure shows a rectangle. What is its area?",
    "How many unit squares does the rectangle cover?",
)


@dataclass(frozen=True)
class TaskConfig:
    """Settings of the synthetic task; its `fingerprint` keys the model cache.

    Attributes:
        image_size: Side of the square images, in pixels.
        unit: Pixels per grid unit.
        min_side / max_side: Range of the width and height, in units (inclusive).
        margin: Minimum distance between the rectangle and the image border, in pixels.
        jitter: `None` places the rectangle anywhere it fits; an integer places its top-left corner within `jitter`
            pixels of (`margin`, `margin`).
    """

    image_size: int = 32
    unit: int = 3
    min_side: int = 1
    max_side: int = 9
    margin: int = 1
    jitter: int | None = 0
    questions: tuple[str, ...] = field(default=QUESTIONS)

    def __post_init__(self):
        if self.max_side * self.unit + 2 * self.margin > self.image_size:
            raise ValueError("The largest rectangle does not fit in the image.")
        if not 1 <= self.min_side <= self.max_side:
            raise ValueError("Need 1 <= min_side <= max_side.")

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


#: The demo's task settings
DEFAULT_TASK = TaskConfig()


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
    def answer(self) -> str:
        return str(self.area)


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


def answer_segments(item: RectangleItem) -> list[tuple[str, bool]]:
    """The reference answer as `(text, depends_on_image)` segments; concatenated they give `reference_answer`."""
    w, h, a = str(item.width), str(item.height), str(item.area)
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


def reference_answer(item: RectangleItem) -> str:
    return "".join(text for text, _ in answer_segments(item))


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
    """Rows in the trainer's format: conversational `prompt`, `images`, plus `answer`, `solution` and the sizes."""
    return [
        {
            "prompt": [{"role": "user", "content": question_text(item, config)}],
            "images": [render_image(item, config)],
            "answer": item.answer,
            "solution": reference_answer(item),
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
    """Every question and every reference answer the task can produce, to train the demo tokenizer on."""
    texts = list(config.questions)
    for w in range(config.min_side, config.max_side + 1):
        for h in range(config.min_side, config.max_side + 1):
            texts.append(reference_answer(RectangleItem(w, h, 0, 0, 0, 0)))
    # Every side and area as a whole token, with and without the leading space of running text
    numbers = sorted({w * h for w in range(1, config.max_side + 1) for h in range(1, config.max_side + 1)})
    texts += [f"{{{n}}} {n}" for n in numbers]
    # Repeated so the template's merges win over rare ones
    return texts * 4


def image_dependent_mask(tokenizer, item: RectangleItem) -> tuple[list[int], list[bool]]:
    """Token ids of the reference answer and, per token, whether it depends on the image.

    Computed by comparison, not from the template's annotation: a token depends on the image when the same question
    with some other figure (every other width and height) gives a different token at that position.
    """
    ids = tokenizer(reference_answer(item), add_special_tokens=False)["input_ids"]
    depends = [False] * len(ids)
    for w in range(1, 10):
        for h in range(1, 10):
            other = tokenizer(
                reference_answer(RectangleItem(w, h, item.x, item.y, item.hue, item.question)),
                add_special_tokens=False,
            )["input_ids"]
            if len(other) != len(ids):
                raise ValueError("Numbers must be single tokens for a position-wise comparison.")
            depends = [d or a != b for d, a, b in zip(depends, ids, other, strict=True)]
    return ids, depends


def image_dependent_fraction(tokenizer, items: Sequence[RectangleItem], count_eos: bool = True) -> float:
    """Mean fraction of image-dependent tokens in the reference answers (the end-of-turn token counted as a
    non-dependent answer token when `count_eos`, as it is in the student's completions)."""
    fractions = []
    for item in items:
        _, depends = image_dependent_mask(tokenizer, item)
        fractions.append(sum(depends) / (len(depends) + int(count_eos)))
    return float(np.mean(fractions))


def text_only_accuracy(train: Sequence[RectangleItem], test: Sequence[RectangleItem]) -> float:
    """Accuracy of the best text-only predictor learnt from `train`: the most frequent answer for each question text."""
    by_question: dict[int, Counter] = {}
    for item in train:
        by_question.setdefault(item.question, Counter())[item.area] += 1
    overall = Counter(item.area for item in train).most_common(1)[0][0]
    correct = 0
    for item in test:
        counts = by_question.get(item.question)
        guess = counts.most_common(1)[0][0] if counts else overall
        correct += guess == item.area
    return correct / max(1, len(test))
