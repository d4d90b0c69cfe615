"""Write ViCuR's cue column for a dataset with any vision-language model (`docs/methods/vicur.md`, "Writing cues").

A cue is a short text describing the question-relevant visual evidence of the row's own image, without the answer:
the privileged teacher reads it, the student never does. The ViCuR paper builds cues with "an LLM-based pipeline with
sampling" and publishes neither pipeline nor model; `generate_cues` is that pipeline for Hugging Face users: one
instruction per row (the row's question inserted), batched sampling, a progress bar, and a progress file that lets an
interrupted run resume where it stopped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from tqdm.auto import tqdm

from .dataset_formats import row_images, validate_vaopd_dataset
from .evaluation import make_hf_generate


__all__ = ["DEFAULT_CUE_INSTRUCTION", "generate_cues", "question_of"]

#: The instruction each row's question is inserted into (`{question}`)
DEFAULT_CUE_INSTRUCTION = (
    "Look at the image and describe the visual evidence needed to answer the question below: the objects, labels, "
    "numbers, lengths and relations the image shows that matter for it. Describe only what is visible. Do not solve "
    "the problem and do not state the answer.\n\nQuestion: {question}"
)


def question_of(prompt: list[dict[str, Any]]) -> str:
    """The text of a conversational prompt's last user turn (plain-string content or its text parts)."""
    users = [m for m in prompt if m.get("role") == "user"]
    if not users:
        raise ValueError(f"The prompt has no user turn: {prompt!r:.200}")
    content = users[-1]["content"]
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if part.get("type") == "text")


def _read_progress(path: Path, settings: dict[str, Any]) -> dict[int, str]:
    if not path.is_file():
        path.write_text(json.dumps({"settings": settings}) + "\n")
        return {}
    lines = path.read_text().splitlines()
    saved = json.loads(lines[0])["settings"] if lines else None
    if saved != settings:
        raise ValueError(
            f"The progress file {str(path)!r} was written with other settings ({saved}), not {settings}. Resume with "
            "the same settings, or pass another progress_file (or delete this one) to start over."
        )
    done = {}
    for line in lines[1:]:
        if line.strip():  # a line cut by an interruption is not valid JSON: that batch is generated again
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[record["index"]] = record["cue"]
    return done


def generate_cues(
    dataset: Dataset,
    model: Any,
    processor: Any,
    *,
    instruction: str = DEFAULT_CUE_INSTRUCTION,
    column: str = "cue",
    batch_size: int = 8,
    max_new_tokens: int = 256,
    temperature: float = 0.7,
    top_p: float = 0.95,
    seed: int = 0,
    progress_file: str | os.PathLike | None = None,
    show_progress: bool = True,
) -> Dataset:
    """The dataset with a `column` of cues written by `model` (a `transformers` VLM) for each row's image and question.

    Args:
        dataset: Rows in the trainer's format (conversational `prompt`, `images` or `image`).
        model, processor: Any vision-language model with its processor (a stronger model, or the teacher itself).
        instruction: What the model is asked; `{question}` is replaced by the row's question (its last user turn).
        column: The column to write; it must not exist yet.
        batch_size: Rows per `generate` call.
        max_new_tokens, temperature, top_p: Sampling settings. Each batch samples from its own seed
            (`seed + first row index`), so a resumed run writes what an uninterrupted one would.
        progress_file: A JSON-lines file that records every cue as it is written; rerunning with the same file (and
            settings) skips the rows it holds. `None` keeps no record.
        show_progress: Show a progress bar.

    Returns:
        `dataset` with the new column.
    """
    validate_vaopd_dataset(dataset)
    if column in dataset.column_names:
        raise ValueError(f"The dataset already has a {column!r} column; pass another `column` or remove it first.")
    if "{question}" not in instruction:
        raise ValueError("The cue instruction must contain '{question}', where each row's question goes.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    settings = {"instruction": instruction, "max_new_tokens": max_new_tokens, "temperature": temperature,
                "top_p": top_p, "seed": seed, "batch_size": batch_size, "rows": len(dataset)}  # fmt: skip
    path = Path(progress_file) if progress_file is not None else None
    done = _read_progress(path, settings) if path is not None else {}
    generate = make_hf_generate(model, processor, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    starts = range(0, len(dataset), batch_size)
    bar = tqdm(total=len(starts), desc="Writing cues", disable=not show_progress)
    for start in starts:
        indices = list(range(start, min(start + batch_size, len(dataset))))
        if all(i in done for i in indices):
            bar.update()
            continue
        rows = [
            {
                "prompt": [{"role": "user", "content": instruction.format(question=question_of(row["prompt"]))}],
                "images": row_images(row),
            }
            for row in dataset.select(indices)
        ]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + start)
            cues = generate(rows)
        for i, cue in zip(indices, cues, strict=True):
            done[i] = cue.strip()
        if path is not None:
            with path.open("a") as f:
                f.writelines(json.dumps({"index": i, "cue": done[i]}) + "\n" for i in indices)
        bar.update()
    bar.close()
    return dataset.add_column(column, [done[i] for i in range(len(dataset))])
