"""Privileged teacher prompts (ViCuR): the teacher sees a text cue the student does not.

See `docs/methods/vicur.md`, "The cue teacher".

A cue describes the question-relevant visual evidence of the row's own image ("The diagram shows a circle with two
intersecting chords..."). The teacher's prompt is the student's with the cue appended to the last user turn in the
OPSD hint format (`"[Hint]: <cue>"`), or a full teacher prompt given per row. The student's prompt never holds either.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from datasets import Dataset


__all__ = ["DEFAULT_CUE_TEMPLATE", "teacher_prompt", "validate_privileged_columns", "with_cue"]

#: How a cue is appended to the last user turn: the OPSD hint format, on a line of its own.
DEFAULT_CUE_TEMPLATE = "\n[Hint]: {cue}"


def with_cue(prompt: Sequence[dict[str, Any]], cue: str, template: str = DEFAULT_CUE_TEMPLATE) -> list[dict[str, Any]]:
    """A copy of the conversation with `template.format(cue=cue)` appended to its last user turn.

    Plain-string content gets the text appended; content given as parts gets a text part appended (chat templates
    render parts one after the other). The other turns are unchanged.
    """
    messages = copy.deepcopy(list(prompt))
    users = [i for i, message in enumerate(messages) if message.get("role") == "user"]
    if not users:
        raise ValueError(f"A cue goes into the last user turn, but the prompt has none: {prompt!r:.200}")
    message = messages[users[-1]]
    hint = template.format(cue=cue)
    if isinstance(message["content"], str):
        message["content"] += hint
    else:
        message["content"] = [*message["content"], {"type": "text", "text": hint}]
    return messages


def teacher_prompt(
    row: dict[str, Any], cue_column: str, teacher_prompt_column: str | None, template: str = DEFAULT_CUE_TEMPLATE
) -> list[dict[str, Any]]:
    """The teacher's prompt for one dataset row: its full teacher prompt, or its prompt with its cue appended."""
    if teacher_prompt_column is not None:
        return copy.deepcopy(row[teacher_prompt_column])
    return with_cue(row["prompt"], row[cue_column], template)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip()) or (isinstance(value, list) and not value)


def validate_privileged_columns(dataset: Dataset, cue_column: str, teacher_prompt_column: str | None) -> None:
    """Check, before any compute, that every row has what the privileged teacher needs.

    Raises:
        ValueError: if the column is not in the dataset, or some rows have an empty or missing cue (or teacher
            prompt), naming the column, the row indices and the fix.
    """
    column = teacher_prompt_column if teacher_prompt_column is not None else cue_column
    setting = "teacher_prompt_column" if teacher_prompt_column is not None else "cue_column"
    if column not in dataset.column_names:
        raise ValueError(
            f"VAOPDConfig.{setting}={column!r} is not a column of the dataset (columns: {dataset.column_names}). The "
            "privileged teacher needs a cue per row: name the right column, write one with "
            "trl_vaopd.cues.generate_cues, or turn cues off (use_cues=False)."
        )
    empty = [i for i, value in enumerate(dataset[column]) if _missing(value)]
    if empty:
        raise ValueError(
            f"{len(empty)} row(s) have an empty or missing {column!r} (indices: {empty[:20]}"
            f"{', ...' if len(empty) > 20 else ''}). Every row needs one for the privileged teacher: fill them (e.g. "
            f"with trl_vaopd.cues.generate_cues) or drop them with dataset.filter(...)."
        )
