"""Token heatmaps of VA: one response under several models side by side (the paper's Figure 6), as HTML and PNG."""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize, to_hex
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.patches import FancyBboxPatch
from matplotlib.textpath import TextToPath

from .concentration import va_concentration
from .figures import save_figure
from .scoring import TokenVA


__all__ = ["va_heatmap_html", "va_heatmap_png"]


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


_NAME_FONT = FontProperties(size=12, weight="bold")
_SUMMARY_FONT = FontProperties(size=9)
_SUMMARY_LINE_INCHES = 0.2
_COLOURBAR_LABEL = "visual advantage (nats): log p(token | image) - log p(token | counterfactual), clipped at 0"


def _text_inches(text: str, font: FontProperties) -> float:
    """The width of `text` set in `font`, in inches: layouts decide from it what fits on a line."""
    return TextToPath().get_text_width_height_descent(text, font, ismath=False)[0] / 72


def _summary_lines(name: str, summary: str, width: float) -> list[str] | None:
    """`None` when a panel's name and summary fit side by side on `width` inches, else the summary's lines under the
    name (split at its comma when it is wider than the panel itself)."""
    if _text_inches(name, _NAME_FONT) + 2 * _CHAR_INCHES + _text_inches(summary, _SUMMARY_FONT) <= width:
        return None
    if _text_inches(summary, _SUMMARY_FONT) <= width:
        return [summary]
    head, _, tail = summary.partition(", ")
    return [f"{head},", tail]


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
    text_width = width_chars * _CHAR_INCHES
    # A summary that does not fit beside its panel's name goes under it; a colour-bar label wider than the figure
    # is broken after its first colon
    summaries = {name: _summary_lines(name, _summary(result), text_width) for name, result in results.items()}
    headers = [header + _SUMMARY_LINE_INCHES * len(lines or []) for lines in summaries.values()]
    panel_heights = [
        head + (1 + max((line for _, line, _ in boxes), default=0)) * _LINE_INCHES
        for head, boxes in zip(headers, layouts.values(), strict=True)
    ]
    label = _COLOURBAR_LABEL
    if _text_inches(label, FontProperties(size=8)) > text_width + 2 * margin - 0.1:
        label = label.replace(": ", ":\n", 1)
        colourbar += 0.15
    top = 0.45 if title else 0.1
    width = text_width + 2 * margin
    height = top + sum(panel_heights) + colourbar + 0.15
    fig = Figure(figsize=(width, height), dpi=dpi)
    if title:
        fig.suptitle(title, fontsize=13, fontweight="bold", y=1 - 0.1 / height, va="top")

    y_top = height - top  # inches from the bottom of the figure
    for (name, result), boxes, panel, head in zip(
        results.items(), layouts.values(), panel_heights, headers, strict=True
    ):
        text_height = panel - head
        ax = fig.add_axes((margin / width, (y_top - panel) / height, text_width / width, text_height / height))
        lines = text_height / _LINE_INCHES
        ax.set(xlim=(0, width_chars), ylim=(lines, 0))
        ax.axis("off")

        # Header rows, in data units above the panel's first line of tokens: the name, then the summary beside it or
        # under it
        name_y = -(head - 0.55 * header) / _LINE_INCHES
        ax.text(0, name_y, name, fontproperties=_NAME_FONT, va="center", ha="left", parse_math=False)
        if summaries[name] is None:
            ax.text(
                width_chars,
                name_y,
                _summary(result),
                fontproperties=_SUMMARY_FONT,
                va="center",
                ha="right",
                color="0.35",
            )
        for i, line in enumerate(summaries[name] or []):
            y = name_y + (0.26 + _SUMMARY_LINE_INCHES * i) / _LINE_INCHES
            ax.text(0, y, line, fontproperties=_SUMMARY_FONT, va="center", ha="left", color="0.35")
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
            margin / width + 0.25 * text_width / width,
            (colourbar - 0.33) / height,
            0.5 * text_width / width,
            0.14 / height,
        )
    )
    bar = fig.colorbar(ScalarMappable(norm=norm, cmap=colours), cax=cax, orientation="horizontal")
    bar.set_label(label, fontsize=8)
    bar.ax.tick_params(labelsize=8)
    return save_figure(fig, path)
