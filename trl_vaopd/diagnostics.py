"""Diagnostics of visual reliance: per-token visual advantage (VA) of any model, heatmaps, VA concentration, and a
training callback that tracks the student's own visual reliance.

The per-token VA of METHOD.md section 2 is defined with the teacher as scorer, but the same quantity measures any
model's reliance on fine visual detail: score a response under the original image and under a counterfactual view
(the image without its fine detail, or no image) and keep the positive log-probability gap of every token. This
module measures and draws it the ways the paper does:

- [`score_visual_advantage`] / [`score_many`]: per-token VA of (image, prompt, response) triples under any model;
- [`va_heatmap_html`] / [`va_heatmap_png`]: one response under several models side by side (the paper's Figure 6);
- [`va_concentration_curve`] / [`va_concentration`] / [`plot_va_concentration`]: the share of the VA mass held by
  the top tokens (the paper: about 93% in the top 10%);
- [`VisualRelianceCallback`]: during training, the student's own visual reliance on fresh rollouts and the teacher's
  VA on them, optionally with accuracy, and their trajectory (the paper's Figure 4b).
"""

from __future__ import annotations

import copy
import html
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import is_peft_model
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize, to_hex
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch
from matplotlib.ticker import MaxNLocator
from PIL import Image
from transformers import PreTrainedModel, ProcessorMixin, TrainerCallback
from trl.data_utils import prepare_multimodal_messages

from .chunked import OutputHead, token_logprobs
from .dataset_formats import row_images
from .evaluation import tokenize_conversations
from .objective import va_mass_share, visual_advantage
from .views import get_view


__all__ = [
    "ACCURACY_KEY",
    "RESPONSE_LENGTH_KEY",
    "STUDENT_RELIANCE_KEY",
    "TEACHER_VA_KEY",
    "TokenVA",
    "VisualRelianceCallback",
    "plot_reliance_trajectory",
    "plot_va_concentration",
    "score_many",
    "score_visual_advantage",
    "va_concentration",
    "va_concentration_curve",
    "va_heatmap_html",
    "va_heatmap_png",
]

#: Log keys of [`VisualRelianceCallback`]: the student's mean positive log-prob gap per token on its own rollouts,
#: the teacher's mean VA on the same rollouts, the accuracy of the rollouts and their mean length in tokens.
STUDENT_RELIANCE_KEY = "visual_reliance/student"
TEACHER_VA_KEY = "visual_reliance/teacher_va"
ACCURACY_KEY = "visual_reliance/accuracy"
RESPONSE_LENGTH_KEY = "visual_reliance/response_length"

ImageInput = Image.Image | Sequence[Image.Image] | None
Prompt = str | list[dict[str, Any]]
Response = str | Sequence[int]
#: A row to score: `(image, prompt, response)`, or a mapping with `"prompt"`, `"response"` and `"images"` or `"image"`
#: (a row of a VA-OPD dataset with a response added).
Row = tuple[ImageInput, Prompt, Response] | Mapping[str, Any]
VAValues = torch.Tensor | np.ndarray | Sequence[float] | Sequence["TokenVA"]


@dataclass(frozen=True)
class TokenVA:
    """Per-token visual advantage of one response under one scoring model.

    Attributes:
        tokens: the response tokens, each decoded on its own (special tokens such as the final EOS included).
        token_ids: `(T,)` their ids.
        logp_original: `(T,)` log-probabilities of the tokens given the original image.
        logp_counterfactual: `(T,)` the same under the counterfactual view.
        va: `(T,)` visual advantage `max(logp_original - logp_counterfactual, 0)`.
    """

    tokens: list[str]
    token_ids: torch.Tensor
    logp_original: torch.Tensor
    logp_counterfactual: torch.Tensor
    va: torch.Tensor

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def mean_va(self) -> float:
        """Mean VA per token of the response (the `m_k` of METHOD.md section 3 when the teacher scores)."""
        return float(self.va.double().mean()) if len(self) else 0.0


# ---------------------------------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------------------------------


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    # Scoring and sampling must not see dropout, and a model handed over by a trainer must go back to training
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _as_images(value: ImageInput) -> list[Image.Image]:
    if value is None:
        return []
    if isinstance(value, Image.Image):
        return [value]
    return list(value)


def _conversation(prompt: Prompt, images: list[Image.Image]) -> list[dict[str, Any]]:
    """A prompt (plain question or conversation) with `images` placed as TRL places them during training."""
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    else:
        # An image already inside the prompt would be left in place by the counterfactual view, hiding any VA
        if any(
            isinstance(part, Mapping) and part.get("image") is not None
            for message in prompt
            if isinstance(message.get("content"), list)
            for part in message["content"]
        ):
            raise ValueError(
                "The prompt holds an image of its own. Pass the images separately (the `image` of a row, or its "
                "`images` column) so that the counterfactual view can replace them."
            )
        messages = copy.deepcopy(prompt)
    return prepare_multimodal_messages(messages, images=images)


def _parse_row(row: Row) -> tuple[list[Image.Image], Prompt, Response]:
    if isinstance(row, Mapping):
        return row_images(row), row["prompt"], row["response"]
    image, prompt, response = row
    return _as_images(image), prompt, response


def _tokenizer(processor: Any) -> Any:
    return getattr(processor, "tokenizer", processor)


def _response_ids(tokenizer: Any, response: Response) -> list[int]:
    if isinstance(response, str):
        # Scored like a finished response: the tokens the model would have sampled, then its end-of-turn token
        ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    else:
        ids = [int(i) for i in response]
    if not ids:
        raise ValueError("A response to score needs at least one token.")
    return ids


def _model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    parameter = next(model.parameters())
    return parameter.device, parameter.dtype


def _to_model(inputs: Mapping[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # Processors return float32 pixels; a bf16 model needs them in its own dtype
    device, dtype = _model_device_dtype(model)
    return {
        k: v.to(device, dtype) if v.is_floating_point() else v.to(device)
        for k, v in inputs.items()
        if isinstance(v, torch.Tensor)
    }


def _response_logprobs(
    model: torch.nn.Module,
    processor: ProcessorMixin,
    conversations: list[list[dict[str, Any]]],
    responses: list[list[int]],
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(N, T)` log-probabilities of the response tokens after each prompt, and the `(N, T)` response mask."""
    inputs = _to_model(tokenize_conversations(processor, conversations), model)
    prompt_ids, prompt_mask = inputs.pop("input_ids"), inputs.pop("attention_mask")
    n, prompt_len = prompt_ids.shape
    length = max(len(r) for r in responses)
    pad_id = _tokenizer(processor).pad_token_id
    response_ids = torch.full((n, length), pad_id, dtype=prompt_ids.dtype, device=prompt_ids.device)
    response_mask = torch.zeros_like(response_ids)
    for i, ids in enumerate(responses):
        response_ids[i, : len(ids)] = torch.tensor(ids)
        response_mask[i, : len(ids)] = 1
    # Per-token fields (mm_token_type_ids, token_type_ids) mark the response as text, as TRL extends them
    for key, value in inputs.items():
        if value.shape == prompt_ids.shape:
            inputs[key] = torch.cat([value, value.new_zeros(response_ids.shape)], dim=1)
    # The multimodal backbone (vision injection included) without the LM head: the head runs on the response
    # positions only, in vocabulary tiles, like the trainer's teacher scoring
    unwrapped = model.get_base_model() if is_peft_model(model) else model
    hidden = unwrapped.base_model(
        input_ids=torch.cat([prompt_ids, response_ids], dim=1),
        attention_mask=torch.cat([prompt_mask, response_mask], dim=1),
        use_cache=False,
        **inputs,
    ).last_hidden_state
    # Position p predicts token p + 1: the last prompt position predicts the first response token
    hidden = hidden[:, prompt_len - 1 : prompt_len - 1 + length]
    return token_logprobs(hidden, OutputHead.of(model), response_ids, response_mask, temperature), response_mask


def score_many(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    rows: Sequence[Row],
    *,
    view: str | Callable[[Image.Image], Image.Image] = "pixelate",
    pixelate_ratio: float = 0.1,
    temperature: float = 1.0,
    batch_size: int = 8,
) -> list[TokenVA]:
    """Per-token visual advantage of many responses under one model, in batches.

    Each row is scored twice with the same prompt and response: with its image(s), and with the counterfactual view
    of each image (`"drop"`: no image at all). The gap is METHOD.md's VA with `model` as the scorer: the teacher's VA
    when `model` is the teacher, a student's own visual reliance when it is a student.

    Args:
        model: any vision-language model whose `base_model` returns `last_hidden_state` (the models TRL's
            `DistillationTrainer` supports), possibly a PEFT model. Run in eval mode without gradients; its mode is
            restored afterwards.
        processor: the model's processor (with a chat template).
        rows: `(image, prompt, response)` triples or mappings with `"prompt"`, `"response"` and `"images"` /
            `"image"`. The image may be one PIL image, a list or `None`; the prompt a question string (placed after
            the image in one user turn) or a conversation in the VA-OPD dataset format; the response a string
            (tokenised without special tokens, then the tokenizer's EOS appended, as a finished response) or the token
            ids to score as they are (e.g. sampled completions).
        view: counterfactual view: `"pixelate"`, `"blur"`, `"blank"`, `"drop"` or a callable image -> image.
        pixelate_ratio: side-length ratio of the `"pixelate"` view.
        temperature: probability temperature of the log-probabilities (METHOD.md: 1).
        batch_size: rows per forward pass.

    Returns:
        One [`TokenVA`] per row, in order, on CPU.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    counterfactual = get_view(view, pixelate_ratio)
    tokenizer = _tokenizer(processor)
    parsed = [_parse_row(row) for row in rows]
    results: list[TokenVA] = []
    with _eval_mode(model), torch.no_grad():
        for start in range(0, len(parsed), batch_size):
            batch = parsed[start : start + batch_size]
            responses = [_response_ids(tokenizer, response) for _, _, response in batch]
            originals = [_conversation(prompt, images) for images, prompt, _ in batch]
            views = [
                _conversation(prompt, [counterfactual(i) for i in images] if counterfactual.keeps_layout else [])
                for images, prompt, _ in batch
            ]
            logp_original, mask = _response_logprobs(model, processor, originals, responses, temperature)
            logp_counterfactual, _ = _response_logprobs(model, processor, views, responses, temperature)
            va = visual_advantage(logp_original, logp_counterfactual, mask)
            for i, ids in enumerate(responses):
                n = len(ids)
                results.append(
                    TokenVA(
                        tokens=tokenizer.batch_decode([[t] for t in ids]),
                        token_ids=torch.tensor(ids),
                        logp_original=logp_original[i, :n].cpu(),
                        logp_counterfactual=logp_counterfactual[i, :n].cpu(),
                        va=va[i, :n].cpu(),
                    )
                )
    return results


def score_visual_advantage(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    image: ImageInput,
    prompt: Prompt,
    response: Response,
    view: str | Callable[[Image.Image], Image.Image] = "pixelate",
    pixelate_ratio: float = 0.1,
    temperature: float = 1.0,
) -> TokenVA:
    """Per-token visual advantage of one response under `model`; see [`score_many`] for the arguments."""
    return score_many(
        model,
        processor,
        [(image, prompt, response)],
        view=view,
        pixelate_ratio=pixelate_ratio,
        temperature=temperature,
    )[0]


# ---------------------------------------------------------------------------------------------------------------------
# VA concentration
# ---------------------------------------------------------------------------------------------------------------------


def _pooled_va(values: VAValues) -> torch.Tensor:
    """All VA values as one 1-D float64 tensor (the valid tokens of every response)."""
    if isinstance(values, torch.Tensor):
        return values.detach().double().flatten().cpu()
    if isinstance(values, np.ndarray):
        return torch.from_numpy(values).double().flatten()
    items = list(values)
    if items and isinstance(items[0], TokenVA):
        return torch.cat([item.va.double() for item in items])
    return torch.tensor(items, dtype=torch.float64)


def va_concentration(values: VAValues, fraction: float = 0.1) -> float:
    """Share of the total VA mass held by the top `ceil(fraction * n)` of `n` tokens (paper: ~0.93 at 0.1).

    `values` are the VA values of valid tokens (any shape, pooled), or a list of [`TokenVA`]. `0.0` without VA mass.
    """
    va = _pooled_va(values)
    return va_mass_share(va, torch.ones_like(va, dtype=torch.bool), fraction)


def va_concentration_curve(
    values: VAValues, fractions: Sequence[float] | np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The VA concentration curve: for each fraction `x` of tokens, the share of the VA mass held by the top `x`.

    Args:
        values: VA values of valid tokens (pooled), or a list of [`TokenVA`].
        fractions: fractions in `[0, 1]`; 101 evenly spaced by default.

    Returns:
        `(fractions, shares)` as float arrays. The curve starts at `(0, 0)`, ends at `(1, 1)` (unless there is no VA
        mass at all, where every share is 0), and is non-decreasing; a uniform VA gives the diagonal.
    """
    xs = np.linspace(0.0, 1.0, 101) if fractions is None else np.asarray(fractions, dtype=np.float64)
    if xs.ndim != 1 or ((xs < 0) | (xs > 1)).any():
        raise ValueError("fractions must be a 1-D sequence of values in [0, 1].")
    va = _pooled_va(values)
    # The top 0% holds no mass; `va_mass_share` takes fractions in (0, 1] only
    shares = np.array([va_concentration(va, float(x)) if x > 0 else 0.0 for x in xs])
    return xs, shares


def plot_va_concentration(
    values: VAValues | Mapping[str, VAValues],
    path: str | Path,
    *,
    fractions: Sequence[float] | np.ndarray | None = None,
    highlight: float = 0.1,
    title: str = "VA concentration",
) -> Path:
    """Plot VA concentration curves (one per entry of a mapping `name -> values`) against the uniform diagonal.

    The share at `highlight` (default: the top 10% of tokens) is marked and given in the legend. Returns `path`.
    """
    series = dict(values) if isinstance(values, Mapping) else {"VA": values}
    fig = Figure(figsize=(5.2, 4.2), dpi=150, layout="constrained")
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="uniform VA")
    for index, (name, vals) in enumerate(series.items()):
        colour = colormaps["tab10"](index)
        xs, shares = va_concentration_curve(vals, fractions)
        share = va_concentration(vals, highlight)
        ax.plot(xs, shares, color=colour, linewidth=2, label=f"{name}: top {highlight:.0%} hold {share:.0%}")
        ax.plot([highlight], [share], "o", color=colour, markersize=6)
    ax.axvline(highlight, color="0.8", linewidth=1, zorder=0)
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="fraction of tokens (highest VA first)", ylabel="share of VA mass")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------------------------------
# Heatmaps
# ---------------------------------------------------------------------------------------------------------------------


def _colour_scale(results: Mapping[str, TokenVA], vmax: float | None) -> Normalize:
    # One scale for every panel, so the same colour means the same VA whatever the model
    if not results:
        raise ValueError("A heatmap needs at least one scored response (a mapping name -> TokenVA).")
    if vmax is None:
        vmax = max((float(r.va.max()) for r in results.values() if len(r)), default=0.0)
    return Normalize(0.0, vmax if vmax > 0 else 1.0, clip=True)


def _ink(background: tuple[float, ...]) -> str:
    # Dark text on light boxes, white on dark ones (relative luminance, sRGB weights)
    r, g, b = background[:3]
    return "white" if 0.2126 * r + 0.7152 * g + 0.0722 * b < 0.5 else "black"


def _summary(result: TokenVA) -> str:
    return f"mean VA {result.mean_va:.3g} nats/token, top 10% of tokens hold {va_concentration([result]):.0%}"


def va_heatmap_html(
    results: Mapping[str, TokenVA], *, title: str | None = None, vmax: float | None = None, cmap: str = "Reds"
) -> str:
    """A token-level VA heatmap as self-contained HTML: one panel per model, darker = higher VA.

    Args:
        results: model name -> [`TokenVA`] of the same response (e.g. base, OPD and VA-OPD students).
        title: optional heading.
        vmax: VA at the dark end of the shared colour scale; the largest VA over all panels by default.
        cmap: a matplotlib colormap name that runs from light to dark.

    Returns:
        An HTML fragment (inline styles only), for `IPython.display.HTML` or a file. Hovering a token shows its VA
        and both log-probabilities.
    """
    norm, colours = _colour_scale(results, vmax), colormaps[cmap]
    parts = ['<div class="va-heatmap" style="font-family: sans-serif; max-width: 60em;">']
    if title:
        parts.append(f'<h3 style="margin: 0 0 0.5em 0;">{html.escape(title)}</h3>')
    for name, result in results.items():
        parts.append(
            f'<div style="margin: 0.8em 0 0.3em 0;"><b>{html.escape(name)}</b> '
            f'<span style="color: #666;">({html.escape(_summary(result))})</span></div>'
        )
        spans = []
        for token, va, lo, lc in zip(
            result.tokens,
            result.va.tolist(),
            result.logp_original.tolist(),
            result.logp_counterfactual.tolist(),
            strict=True,
        ):
            background = colours(norm(va))
            tip = f"VA {va:.4f} | log p original {lo:.3f} | counterfactual {lc:.3f}"
            spans.append(
                f'<span title="{html.escape(tip)}" style="background: {to_hex(background)}; '
                f"color: {_ink(background)}; padding: 2px 0; border-radius: 3px; "
                f'box-shadow: inset 0 0 0 1px #ddd;">{html.escape(token)}</span>'
            )
        # Spans joined without whitespace: any space shown is the tokens' own (pre-wrap keeps spaces and newlines)
        parts.append(
            '<div style="font-family: monospace; font-size: 14px; line-height: 2.1; white-space: pre-wrap;">'
            + "".join(spans)
            + "</div>"
        )
    stops = ", ".join(to_hex(colours(x)) for x in np.linspace(0, 1, 11))
    parts.append(
        '<div style="margin-top: 0.8em; font-size: 12px; color: #444;">visual advantage (nats): 0 '
        f'<span style="display: inline-block; width: 16em; height: 0.9em; vertical-align: middle; '
        f'background: linear-gradient(to right, {stops}); border: 1px solid #aaa;"></span> {norm.vmax:.3g}</div>'
    )
    parts.append("</div>")
    return "\n".join(parts)


# Layout of the PNG heatmap, in a monospace grid: one character cell is the unit of width, one text line of height
_FONT = {"family": "DejaVu Sans Mono", "size": 11}
_CHAR_INCHES = 0.602 * _FONT["size"] / 72  # advance width of DejaVu Sans Mono
_LINE_INCHES = 2.0 * _FONT["size"] / 72
_BOX_PAD = 0.35  # characters of padding around each token's text, inside its box


def _display_token(token: str) -> tuple[str, bool]:
    """The text shown in a token's box, and whether a word gap precedes the box (the token starts with a space)."""
    text = token.replace("\n", "↵").replace("\t", "⇥")
    stripped = text.lstrip(" ")
    return (stripped or "␣"), stripped != text


def _wrap(tokens: Sequence[str], width: int) -> list[tuple[float, int, str]]:
    """`(x, line, text)` of each token box, wrapped into lines of `width` characters; a newline token ends its line."""
    boxes, x, line = [], 0.0, 0
    for token in tokens:
        text, word_start = _display_token(token)
        if len(text) > width - 1:
            text = text[: width - 2] + "…"
        gap = 0.6 if word_start and x > 0 else 0.1 if x > 0 else 0.0
        if x + gap + len(text) + 2 * _BOX_PAD > width:
            x, line, gap = 0.0, line + 1, 0.0
        boxes.append((x + gap, line, text))
        x += gap + len(text) + 2 * _BOX_PAD
        if "\n" in token:
            x, line = 0.0, line + 1
    return boxes


def va_heatmap_png(
    results: Mapping[str, TokenVA],
    path: str | Path,
    *,
    title: str | None = None,
    vmax: float | None = None,
    cmap: str = "Reds",
    width_chars: int = 72,
    dpi: int = 150,
) -> Path:
    """A token-level VA heatmap as a PNG (the paper's Figure 6): one panel per model, darker = higher VA.

    Tokens are drawn as boxes in reading order, wrapped at `width_chars` characters; a token that starts a word is
    set off by a gap, word pieces sit together. All panels share one colour scale, shown by a colour bar.

    Args:
        results: model name -> [`TokenVA`] of the same response.
        path: where to write the PNG.
        title: optional figure title.
        vmax: VA at the dark end of the scale; the largest VA over all panels by default.
        cmap: a matplotlib colormap name that runs from light to dark.
        width_chars: line width, in characters.
        dpi: resolution.

    Returns:
        `path` as a `Path`.
    """
    norm, colours = _colour_scale(results, vmax), colormaps[cmap]
    layouts = {name: _wrap(result.tokens, width_chars) for name, result in results.items()}
    margin, header, colourbar = 0.3, 0.5, 0.75  # inches
    panel_heights = [
        header + (1 + max((line for _, line, _ in boxes), default=0)) * _LINE_INCHES for boxes in layouts.values()
    ]
    top = 0.45 if title else 0.1
    width = width_chars * _CHAR_INCHES + 2 * margin
    height = top + sum(panel_heights) + colourbar + 0.15
    fig = Figure(figsize=(width, height), dpi=dpi)
    if title:
        fig.suptitle(title, fontsize=13, fontweight="bold", y=1 - 0.1 / height, va="top")

    y_top = height - top  # inches from the bottom of the figure
    for (name, result), boxes, panel in zip(results.items(), layouts.values(), panel_heights, strict=True):
        text_height = panel - header
        ax = fig.add_axes(
            (margin / width, (y_top - panel) / height, width_chars * _CHAR_INCHES / width, text_height / height)
        )
        lines = text_height / _LINE_INCHES
        ax.set(xlim=(0, width_chars), ylim=(lines, 0))
        ax.axis("off")
        ax.text(
            0,
            -header / _LINE_INCHES * 0.45,
            name,
            fontsize=12,
            fontweight="bold",
            va="center",
            ha="left",
            parse_math=False,
        )
        ax.text(
            width_chars,
            -header / _LINE_INCHES * 0.45,
            _summary(result),
            fontsize=9,
            color="0.35",
            va="center",
            ha="right",
        )
        for (x, line, text), va in zip(boxes, result.va.tolist(), strict=True):
            background = colours(norm(va))
            ax.add_patch(
                FancyBboxPatch(
                    (x, line + 0.12),
                    len(text) + 2 * _BOX_PAD,
                    0.76,
                    boxstyle="round,pad=0,rounding_size=0.15",
                    facecolor=background,
                    edgecolor="0.82",
                    linewidth=0.5,
                )
            )
            # parse_math off: LaTeX in responses ("$x^2$") is text to show, not mathtext to render
            ax.text(
                x + _BOX_PAD,
                line + 0.5,
                text,
                color=_ink(background),
                va="center",
                ha="left",
                fontdict=_FONT,
                parse_math=False,
            )
        y_top -= panel

    cax = fig.add_axes(
        (
            margin / width + 0.25 * width_chars * _CHAR_INCHES / width,
            0.42 / height,
            0.5 * width_chars * _CHAR_INCHES / width,
            0.14 / height,
        )
    )
    bar = fig.colorbar(ScalarMappable(norm=norm, cmap=colours), cax=cax, orientation="horizontal")
    bar.set_label(
        "visual advantage (nats): log p(token | image) - log p(token | counterfactual), clipped at 0", fontsize=8
    )
    bar.ax.tick_params(labelsize=8)
    return _save(fig, path)


def _save(fig: Figure, path: str | Path) -> Path:
    # Agg canvas on a bare Figure: no pyplot, so no global figure registry to leak and no GUI backend in a trainer
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, facecolor="white")
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Visual reliance through training
# ---------------------------------------------------------------------------------------------------------------------


def _eos_ids(model: PreTrainedModel, tokenizer: Any) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return set(eos) if isinstance(eos, (list, tuple)) else {int(eos)}


def _cut_at_eos(ids: list[int], eos: set[int]) -> list[int]:
    # METHOD.md's valid tokens: up to and including the first EOS; a truncated response keeps every token
    for position, token in enumerate(ids):
        if token in eos:
            return ids[: position + 1]
    return ids


class VisualRelianceCallback(TrainerCallback):
    """Track the student's own visual reliance on fresh rollouts through training (the paper's Figure 4b).

    Every `every_n_steps` optimizer steps (and once before training, with `measure_at_start`), the callback samples
    one response from the current student for each row of a small fixed probe set, then measures on these rollouts:

    - `visual_reliance/student`: the student's own mean positive log-prob gap per token between the original image and
      the counterfactual view (the VA formula with the student as scorer), pooled over all rollout tokens;
    - `visual_reliance/teacher_va`: the teacher's mean VA per token on the same rollouts (when a teacher is given);
    - `visual_reliance/accuracy`: `accuracy_fn(probe_rows, responses)` (when given);
    - `visual_reliance/response_length`: the mean rollout length in tokens.

    Each measurement is appended to `trajectory` and to the trainer's `state.log_history` as its own entry with the
    step, like an evaluation entry. (A callback cannot add to the trainer's pending training logs: `Trainer.log`
    hands the logs to callbacks only after recording them, and calling the trainer's `log` would flush the metrics
    the trainer is still averaging.) Reporting integrations therefore do not receive these values; read them from
    `trajectory` or `state.log_history`.

    Sampling runs under `torch.no_grad()` in eval mode, restores the model's mode afterwards, and uses a forked RNG
    seeded with `seed` at every measurement: the same random stream each time (less noise between measurements), and
    the training's random state is left untouched, so training is identical with or without the callback. Every
    process measures the same probe set.

    Args:
        processor: the student's processor (teacher and student share the vocabulary, as distillation requires).
        probe_rows: the fixed probe set: mappings with `"prompt"` (question string or conversation) and `"images"` or
            `"image"`, e.g. rows of a VA-OPD dataset (`dataset.select(range(8))`); other columns (such as `"answer"`)
            are passed on to `accuracy_fn`.
        teacher: the teacher model, for the teacher-scored VA; `None` skips it.
        every_n_steps: measurement period in optimizer steps.
        accuracy_fn: optional `accuracy_fn(probe_rows, responses) -> float`, with the decoded responses (special
            tokens removed), e.g. built on `trl_vaopd.evaluation.answers_match`.
        view, pixelate_ratio, temperature: counterfactual view and probability temperature of the scoring, as in
            [`score_many`]; use the trainer's `counterfactual_view`, `pixelate_ratio` and `divergence_temperature`.
        max_new_tokens, sampling_temperature, top_p: sampling of the probe rollouts; the trainer's
            `max_completion_length`, `temperature` and `top_p` measure what training sees.
        batch_size: rows per generation and scoring call.
        seed: seed of the probe rollouts.
        measure_at_start: also measure before the first step (step 0 of the trajectory).
    """

    def __init__(
        self,
        processor: ProcessorMixin,
        probe_rows: Sequence[Mapping[str, Any]],
        teacher: PreTrainedModel | None = None,
        *,
        every_n_steps: int = 10,
        accuracy_fn: Callable[[Sequence[Mapping[str, Any]], list[str]], float] | None = None,
        view: str | Callable[[Image.Image], Image.Image] = "pixelate",
        pixelate_ratio: float = 0.1,
        temperature: float = 1.0,
        max_new_tokens: int = 256,
        sampling_temperature: float = 0.7,
        top_p: float = 0.95,
        batch_size: int = 8,
        seed: int = 0,
        measure_at_start: bool = True,
    ):
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}.")
        if not probe_rows:
            raise ValueError("probe_rows must hold at least one (image, prompt) row.")
        self.processor = processor
        self.probe_rows = list(probe_rows)
        self.teacher = teacher
        self.every_n_steps = every_n_steps
        self.accuracy_fn = accuracy_fn
        self.view = view
        self.pixelate_ratio = pixelate_ratio
        self.temperature = temperature
        self.max_new_tokens = max_new_tokens
        self.sampling_temperature = sampling_temperature
        self.top_p = top_p
        self.batch_size = batch_size
        self.seed = seed
        self.measure_at_start = measure_at_start
        self.trajectory: list[dict[str, float]] = []

    def _sample(self, model: PreTrainedModel) -> list[list[int]]:
        """One response per probe row from `model`, cut after the first EOS."""
        tokenizer = _tokenizer(self.processor)
        eos = _eos_ids(model, tokenizer)
        device, _ = _model_device_dtype(model)
        completions: list[list[int]] = []
        with (
            _eval_mode(model),
            torch.no_grad(),
            torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
        ):
            torch.manual_seed(self.seed)
            for start in range(0, len(self.probe_rows), self.batch_size):
                rows = self.probe_rows[start : start + self.batch_size]
                conversations = [_conversation(row["prompt"], row_images(row)) for row in rows]
                inputs = _to_model(tokenize_conversations(self.processor, conversations), model)
                output = model.generate(
                    **inputs,
                    do_sample=True,
                    temperature=self.sampling_temperature,
                    top_p=self.top_p,
                    max_new_tokens=self.max_new_tokens,
                    # Trainers switch the cache off for gradient checkpointing; sampling without it is quadratic
                    use_cache=True,
                )
                new_tokens = output[:, inputs["input_ids"].size(1) :].tolist()
                completions.extend(_cut_at_eos(ids, eos) for ids in new_tokens)
        return completions

    def _scores(self, model: PreTrainedModel, completions: list[list[int]]) -> list[TokenVA]:
        rows = [(row_images(row), row["prompt"], ids) for row, ids in zip(self.probe_rows, completions, strict=True)]
        return score_many(
            model,
            self.processor,
            rows,
            view=self.view,
            pixelate_ratio=self.pixelate_ratio,
            temperature=self.temperature,
            batch_size=self.batch_size,
        )

    def measure(self, model: PreTrainedModel, step: int = 0) -> dict[str, float]:
        """Sample the probe rollouts from `model`, score them, append the record to `trajectory` and return it."""
        completions = self._sample(model)
        record: dict[str, float] = {
            "step": step,
            STUDENT_RELIANCE_KEY: float(_pooled_va(self._scores(model, completions)).mean()),
            RESPONSE_LENGTH_KEY: float(np.mean([len(ids) for ids in completions])),
        }
        if self.teacher is not None:
            record[TEACHER_VA_KEY] = float(_pooled_va(self._scores(self.teacher, completions)).mean())
        if self.accuracy_fn is not None:
            responses = _tokenizer(self.processor).batch_decode(completions, skip_special_tokens=True)
            record[ACCURACY_KEY] = float(self.accuracy_fn(self.probe_rows, responses))
        self.trajectory.append(record)
        return record

    def _measure_and_log(self, state: Any, model: PreTrainedModel | None) -> None:
        if model is None:
            raise ValueError("VisualRelianceCallback needs the trainer's `model`, which Trainer passes to callbacks.")
        # A copy: the trainer owns its log history, the callback its trajectory
        state.log_history.append(dict(self.measure(model, state.global_step)))

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.measure_at_start:
            self._measure_and_log(state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every_n_steps == 0:
            self._measure_and_log(state, model)

    def plot_trajectory(self, path: str | Path, label: str = "student", title: str | None = None) -> Path:
        """Plot this run's trajectory; see [`plot_reliance_trajectory`]."""
        return plot_reliance_trajectory({label: self.trajectory}, path, title=title)


def _arrow(ax: Any, start: tuple[float, float], end: tuple[float, float], colour: Any) -> None:
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=10, color=colour, linewidth=1.2))


def plot_reliance_trajectory(
    trajectories: Mapping[str, Sequence[Mapping[str, float]]], path: str | Path, *, title: str | None = None
) -> Path:
    """Plot visual-reliance trajectories of one or more runs (e.g. standard OPD and VA-OPD), as in Figure 4b.

    Left: the student's own visual reliance and the teacher's VA on the student's rollouts against the training step
    (and the accuracy, on a second axis, when measured). Right: the run's path through the (student visual reliance,
    accuracy) plane, or (student visual reliance, teacher VA) without accuracy, with arrows in training order and the
    first and last steps labelled: under VA-OPD the paper sees reliance and accuracy rise together.

    Args:
        trajectories: run name -> records of [`VisualRelianceCallback.trajectory`].
        path: where to write the PNG.
        title: optional figure title.

    Returns:
        `path` as a `Path`.
    """
    records = [r for run in trajectories.values() for r in run]
    if not records:
        raise ValueError("Nothing to plot: the trajectories hold no measurement.")
    has_accuracy = all(ACCURACY_KEY in r for r in records)
    has_teacher = all(TEACHER_VA_KEY in r for r in records)
    y_key = ACCURACY_KEY if has_accuracy else TEACHER_VA_KEY if has_teacher else None
    # Run names only label the lines when there is more than one run to tell apart
    prefix = (lambda name: f"{name}: ") if len(trajectories) > 1 else (lambda name: "")

    fig = Figure(figsize=(11 if y_key else 5.5, 4.2), dpi=150, layout="constrained")
    axes = fig.subplots(1, 2 if y_key else 1, squeeze=False)[0]
    steps_ax = axes[0]
    accuracy_ax = steps_ax.twinx() if has_accuracy else None
    for index, (name, run) in enumerate(trajectories.items()):
        colour = colormaps["tab10"](index)
        steps = [r["step"] for r in run]
        steps_ax.plot(
            steps, [r[STUDENT_RELIANCE_KEY] for r in run], "o-", color=colour, label=f"{prefix(name)}student reliance"
        )
        if has_teacher:
            steps_ax.plot(
                steps,
                [r[TEACHER_VA_KEY] for r in run],
                "s--",
                color=colour,
                alpha=0.6,
                label=f"{prefix(name)}teacher VA",
            )
        if accuracy_ax is not None:
            accuracy_ax.plot(
                steps, [r[ACCURACY_KEY] for r in run], "^:", color=colour, alpha=0.8, label=f"{prefix(name)}accuracy"
            )
    steps_ax.set(xlabel="optimizer step", ylabel="mean positive log-prob gap (nats/token)")
    steps_ax.set_ylim(bottom=0)
    steps_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    steps_ax.set_title("Visual reliance on the student's rollouts", fontsize=10)
    steps_ax.grid(alpha=0.3)
    handles, labels = steps_ax.get_legend_handles_labels()
    if accuracy_ax is not None:
        accuracy_ax.set_ylabel("accuracy (right axis)")
        accuracy_ax.set_ylim(-0.03, 1.03)
        more = accuracy_ax.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    steps_ax.legend(handles, labels, fontsize=7, loc="best")

    if y_key is not None:
        plane = axes[1]
        for index, (name, run) in enumerate(trajectories.items()):
            colour = colormaps["tab10"](index)
            points = [(r[STUDENT_RELIANCE_KEY], r[y_key]) for r in run]
            xs, ys = zip(*points, strict=True)
            plane.plot(xs, ys, "o", color=colour, label=name, markersize=5)
            for start, end in zip(points[:-1], points[1:], strict=True):
                _arrow(plane, start, end, colour)
            # First step labelled below the point, last above, so that they do not collide when the path is short
            for record, point, offset in ((run[0], points[0], (4, -11)), (run[-1], points[-1], (4, 5))):
                plane.annotate(
                    f"step {record['step']}",
                    point,
                    textcoords="offset points",
                    xytext=offset,
                    fontsize=7,
                    color=colour,
                )
        plane.set_xlim(left=0)
        if has_accuracy:
            plane.set(ylabel="accuracy", ylim=(-0.03, 1.03))
        else:
            plane.set(ylabel="teacher VA (nats/token)", ylim=(0, None))
        plane.set_xlabel("student visual reliance (nats/token)")
        plane.set_title("Trajectory through training", fontsize=10)
        plane.grid(alpha=0.3)
        plane.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=12, fontweight="bold")
    return _save(fig, path)
