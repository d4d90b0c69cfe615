"""Counterfactual image views: the image with its fine-grained detail removed.

See `docs/methods/va_opd.md`, "The two teacher views".

The teacher scores every sampled token under the original image and under one of these views; the positive gap is
the token's visual advantage. Pixel views keep the image size, so the processor yields the same image grid and the
two teacher inputs differ only in pixel values. The "drop" view removes the image altogether (a text-only
counterfactual) and changes the token layout by design.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageFilter, ImageStat

from .names import did_you_mean


__all__ = [
    "VIEW_NAMES",
    "CounterfactualView",
    "blank",
    "blur",
    "drop_image_parts",
    "get_view",
    "pixelate",
    "rows_without_text",
]

VIEW_NAMES = ("pixelate", "blur", "blank", "drop")


def _working_copy(image: Image.Image) -> Image.Image:
    # Palette and bilevel images cannot be resampled bilinearly; work in RGB(A) and convert back at the end
    if image.mode in ("1", "P"):
        return image.convert("RGBA" if "transparency" in image.info else "RGB")
    return image


def pixelate(image: Image.Image, ratio: float = 0.1) -> Image.Image:
    """Bilinear downsample each side to `ratio` (floor, at least 1 pixel), then nearest-neighbour upsample back.

    The result has the original size and mode.
    """
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"pixelate ratio must be in (0, 1], got {ratio}.")
    width, height = image.size
    small = (max(1, math.floor(width * ratio)), max(1, math.floor(height * ratio)))
    work = _working_copy(image)
    out = work.resize(small, Image.Resampling.BILINEAR).resize((width, height), Image.Resampling.NEAREST)
    return out if out.mode == image.mode else out.convert(image.mode)


def blur(image: Image.Image, radius_fraction: float = 0.05) -> Image.Image:
    """Gaussian blur with a radius of `radius_fraction` of the longer side; same size and mode."""
    if radius_fraction <= 0:
        raise ValueError(f"blur radius_fraction must be > 0, got {radius_fraction}.")
    work = _working_copy(image)
    out = work.filter(ImageFilter.GaussianBlur(radius=radius_fraction * max(image.size)))
    return out if out.mode == image.mode else out.convert(image.mode)


def blank(image: Image.Image) -> Image.Image:
    """The image's mean colour everywhere; same size and mode."""
    work = _working_copy(image)
    colour = tuple(round(c) for c in ImageStat.Stat(work).mean)
    out = Image.new(work.mode, work.size, colour if len(colour) > 1 else colour[0])
    return out if out.mode == image.mode else out.convert(image.mode)


@dataclass(frozen=True)
class CounterfactualView:
    """A named counterfactual view.

    Attributes:
        name: the view's name ("pixelate", "blur", "blank", "drop" or the user callable's name).
        transform: image -> image, or `None` for "drop" (the image is removed from the prompt).
    """

    name: str
    transform: Callable[[Image.Image], Image.Image] | None

    @property
    def keeps_layout(self) -> bool:
        """Whether the view keeps the image, hence the prompt's token layout (every view but "drop")."""
        return self.transform is not None

    def __call__(self, image: Image.Image) -> Image.Image:
        """Apply a pixel view, refusing any output whose size differs from the input's."""
        if self.transform is None:
            raise ValueError('The "drop" view removes the image; it has no pixel transform to apply.')
        out = self.transform(image)
        if not isinstance(out, Image.Image):
            raise TypeError(f"Counterfactual view {self.name!r} must return a PIL image, got {type(out).__name__}.")
        if out.size != image.size:
            raise ValueError(
                f"Counterfactual view {self.name!r} changed the image size from {image.size} to {out.size}. A pixel "
                "view must keep the size so that the processor yields the same image grid and token layout as the "
                "original; resize the result back to the input size, or use counterfactual_view='drop' for a "
                "text-only counterfactual."
            )
        return out


def get_view(view: str | Callable[[Image.Image], Image.Image], pixelate_ratio: float = 0.1) -> CounterfactualView:
    """Resolve a view name ("pixelate", "blur", "blank", "drop") or a user callable image -> image."""
    if callable(view):
        return CounterfactualView(getattr(view, "__name__", type(view).__name__), view)
    if view == "pixelate":
        return CounterfactualView("pixelate", lambda image: pixelate(image, pixelate_ratio))
    if view == "blur":
        return CounterfactualView("blur", blur)
    if view == "blank":
        return CounterfactualView("blank", blank)
    if view == "drop":
        return CounterfactualView("drop", None)
    raise ValueError(
        f"Unknown counterfactual_view {view!r}.{did_you_mean(view, VIEW_NAMES)} Use one of {', '.join(VIEW_NAMES)}, "
        "or pass a callable image -> image (same size) as the trainer's `counterfactual_view` argument."
    )


def drop_image_parts(conversation: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The "drop" view of a conversational prompt, as new messages: its `{"type": "image"}` parts removed with the
    images (plain-text content, where TRL would insert the images, is kept as it is)."""
    return [
        {
            **m,
            "content": [dict(p) for p in m["content"] if p.get("type") != "image"]
            if isinstance(m["content"], list)
            else m["content"],
        }
        for m in conversation
    ]


def _has_text(conversation: list[dict[str, Any]]) -> bool:
    for message in conversation:
        content = message["content"]
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if any(p.get("type") == "text" and str(p.get("text") or "").strip() for p in parts):
            return True
    return False


def rows_without_text(prompts: list[list[dict[str, Any]]]) -> list[int]:
    """Indices of the prompts that hold no text besides their images: the "drop" view cannot express them."""
    return [i for i, prompt in enumerate(prompts) if not _has_text(prompt)]
