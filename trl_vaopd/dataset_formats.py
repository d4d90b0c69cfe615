"""Turn public visual-reasoning datasets into the format the VA-OPD trainer consumes, and validate that format.

Every formatted row has

- `prompt`: a conversational prompt, `[{"role": "user", "content": "<question>"}]` (optionally preceded by a system
  message), whose content is plain text: TRL inserts the image parts itself from the `images` column;
- `images`: a list of RGB `PIL.Image.Image`;
- `answer`: the reference answer as a string, ready for [`trl_vaopd.evaluation.accuracy_reward`];

and keeps the dataset's other columns (ids, categories, pass rates, ...) unchanged.

Supported schemas:

- **Geometry3K** as published by `hiyouga/geometry3k` (converted from the InterGPS release): `images` (list with one
  diagram), `problem` (`"<image>"` followed by the question), `answer` (the text of the correct choice), and in the
  current revision also `id`, `choices` and `ground_truth` (the correct letter). The raw InterGPS `data.json` layout
  (`problem_text`, `choices`, `answer` as a letter) is accepted too; its letter is mapped to the choice text so
  that both layouts yield the same free-form reference.
- **ViRL39K** as published by `TIGER-Lab/ViRL39K`: one parquet file, `39Krelease.parquet`, with `question` (often
  prefixed by `"<image>"`), `answer` (wrapped in `\\boxed{}`), `image` (list of paths such as
  `"images/<name>.jpg"`, relative to the repository root), `qid`, `category`, `source`, `PassRate_32BTrained` and
  `PassRate_7BBase`. The images are not in the parquet file but in `images.zip`, which must be unzipped next to it
  (or anywhere, passing that directory as `image_root`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import partial
from io import BytesIO
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset
from PIL import Image

from .evaluation import last_boxed_content


__all__ = [
    "DEFAULT_INSTRUCTION",
    "DatasetUnavailableError",
    "format_geometry3k",
    "format_virl39k",
    "load_vaopd_dataset",
    "row_images",
    "validate_vaopd_dataset",
]

DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
"""Appended to every question: the usual instruction for these benchmarks, and the answer format
[`trl_vaopd.evaluation.extract_answer`] reads first."""

_HUB_IDS = {"geometry3k": "hiyouga/geometry3k", "virl39k": "TIGER-Lab/ViRL39K"}
# Short names and Hub ids (compared case-insensitively) -> dataset format.
_FORMAT_BY_NAME = {**{alias: alias for alias in _HUB_IDS}, **{hub.lower(): alias for alias, hub in _HUB_IDS.items()}}
# The ViRL39K repository also holds images.zip, which the automatic builder tries to read as data; the questions
# live in this single file.
_VIRL39K_DATA_FILE = "39Krelease.parquet"
_IMAGE_PLACEHOLDER = re.compile(r"<image>[ \t]*")
_CHOICE_INDEX = {"A": 0, "B": 1, "C": 2, "D": 3}
_DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
_TRUE_VALUES = {"1", "ON", "YES", "TRUE"}


class DatasetUnavailableError(ConnectionError):
    """The dataset could not be fetched from the Hugging Face Hub (offline mode, or the Hub is unreachable)."""


# ---------------------------------------------------------------------------------------------------------------------
# Row formatters
# ---------------------------------------------------------------------------------------------------------------------


def _build_prompt(question: str, instruction: str | None, system_prompt: str | None) -> list[dict[str, str]]:
    # The placeholder marks where the image went in the original release; TRL adds the image to the message itself.
    text = _IMAGE_PLACEHOLDER.sub("", question).strip()
    if instruction:
        text = f"{text}\n{instruction}"
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": text})
    return messages


def _load_image(value: Any, image_root: str | os.PathLike | None) -> Image.Image:
    """Load one image given as a PIL image, raw bytes, a path, or a `datasets` image dict `{"bytes", "path"}`."""
    if isinstance(value, Image.Image):
        return value if value.mode == "RGB" else value.convert("RGB")
    if isinstance(value, Mapping):
        value = value["bytes"] if value.get("bytes") is not None else value.get("path")
    if isinstance(value, bytes):
        with Image.open(BytesIO(value)) as image:
            return image.convert("RGB")
    if isinstance(value, (str, os.PathLike)):
        path = Path(value)
        if not path.is_absolute() and image_root is not None:
            path = Path(image_root) / path
        if not path.is_file():
            raise FileNotFoundError(
                f"Image {str(value)!r} not found (looked for {str(path)!r}). Relative image paths are resolved "
                "against `image_root`: for ViRL39K, download images.zip from the dataset repository, unzip it and "
                "pass the directory that contains the extracted `images/` folder as `image_root`."
            )
        # convert() reads the pixels, so the file is closed when the block exits (no leaked handles on 39K rows).
        with Image.open(path) as image:
            return image.convert("RGB")
    raise TypeError(f"Unsupported image value of type {type(value).__name__}: {value!r:.100}")


def _load_images(value: Any, image_root: str | os.PathLike | None) -> list[Image.Image]:
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else [value]
    return [_load_image(item, image_root) for item in items]


def format_geometry3k(
    row: Mapping[str, Any],
    *,
    image_root: str | os.PathLike | None = None,
    instruction: str | None = DEFAULT_INSTRUCTION,
    system_prompt: str | None = None,
) -> dict[str, Any]:
    """Format one Geometry3K row (`hiyouga/geometry3k` schema, or raw InterGPS) for the VA-OPD trainer.

    Args:
        row: A row with `problem` (or `problem_text`), `images` (or `image`) and `answer`. When `answer` is a choice
            letter (raw InterGPS layout, no `ground_truth` column), it is replaced by the text of that choice.
        image_root: Directory against which relative image paths are resolved.
        instruction: Text appended to the question on a new line; `None` or `""` appends nothing.
        system_prompt: Optional system message placed before the question.

    Returns:
        `{"prompt": [...], "images": [PIL.Image, ...], "answer": str}`.
    """
    question = row["problem"] if "problem" in row else row["problem_text"]
    answer = str(row["answer"]).strip()
    choices = row.get("choices")
    if "ground_truth" not in row and choices and answer in _CHOICE_INDEX and _CHOICE_INDEX[answer] < len(choices):
        answer = str(choices[_CHOICE_INDEX[answer]]).strip()
    return {
        "prompt": _build_prompt(question, instruction, system_prompt),
        "images": _load_images(row["images"] if "images" in row else row.get("image"), image_root),
        "answer": answer,
    }


def format_virl39k(
    row: Mapping[str, Any],
    image_root: str | os.PathLike | None = None,
    *,
    instruction: str | None = DEFAULT_INSTRUCTION,
    system_prompt: str | None = None,
) -> dict[str, Any]:
    r"""Format one ViRL39K row (`TIGER-Lab/ViRL39K` schema) for the VA-OPD trainer.

    Args:
        row: A row with `question`, `answer` and `image`. Images may be paths (as released), PIL images, raw bytes
            or `{"bytes": ..., "path": ...}` dicts (as `datasets` yields them), alone or in a list.
        image_root: Directory against which relative image paths are resolved: the directory that contains the
            `images/` folder extracted from the release's `images.zip`.
        instruction: Text appended to the question on a new line; `None` or `""` appends nothing.
        system_prompt: Optional system message placed before the question.

    Returns:
        `{"prompt": [...], "images": [PIL.Image, ...], "answer": str}`, where the answer is the content of the
        release's `\boxed{...}` reference.
    """
    reference = str(row["answer"])
    boxed = last_boxed_content(reference)
    return {
        "prompt": _build_prompt(row["question"], instruction, system_prompt),
        "images": _load_images(row["image"] if "image" in row else row.get("images"), image_root),
        "answer": (boxed if boxed is not None else reference).strip(),
    }


_FORMATTERS = {"geometry3k": format_geometry3k, "virl39k": format_virl39k}
# Source columns replaced by the formatted ones; every other column is passed through.
_CONSUMED_COLUMNS = {
    "geometry3k": ("problem", "problem_text", "image", "images"),
    "virl39k": ("question", "image", "images"),
}


# ---------------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------------


def _offline_requested() -> bool:
    # huggingface_hub and datasets read these variables once, at import time; reading them again here honours a
    # value set afterwards (in a notebook, or by a test) instead of silently going to the network.
    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(variable, "").upper() in _TRUE_VALUES:
            return True
    return bool(datasets.config.HF_HUB_OFFLINE)


@contextmanager
def _datasets_offline_mode() -> Iterator[None]:
    """Put `datasets` in offline mode for the duration of the block: it then only looks at its local cache."""
    previous = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = previous


def _load_remote(name: str, split: str, load_kwargs: dict[str, Any]) -> Dataset:
    """`datasets.load_dataset` for a Hub id or builder name, turning network failures into an actionable error."""
    try:
        if _offline_requested():
            with _datasets_offline_mode():
                return datasets.load_dataset(name, split=split, **load_kwargs)
        return datasets.load_dataset(name, split=split, **load_kwargs)
    except ConnectionError as error:  # what `datasets` raises for offline mode and unreachable hosts
        raise DatasetUnavailableError(
            f"Could not load the dataset {name!r} from the Hugging Face Hub: this machine appears to be offline "
            f"({error}) and no cached copy was found. Download it on a machine with network access, e.g. "
            f"`hf download {name} --repo-type dataset --local-dir <dir>`, copy the directory here and pass its "
            "local path: `load_vaopd_dataset('<dir>', ...)`, or `load_vaopd_dataset('parquet', data_files=..., "
            "dataset_format=...)` for individual files."
        ) from error


def _load_local(path: Path, split: str, load_kwargs: dict[str, Any]) -> Dataset:
    """Load a local data file, a downloaded ViRL39K release directory, or any directory `load_dataset` understands."""
    if path.is_dir() and (path / _VIRL39K_DATA_FILE).is_file():
        # A ViRL39K snapshot also holds images/ and images.zip, which `load_dataset(dir)` would read as an image
        # folder, dropping every text column.
        path = path / _VIRL39K_DATA_FILE
    if path.is_file():
        builder = _DATA_FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(
                f"Cannot infer the file format of {str(path)!r}; supported extensions are "
                f"{sorted(_DATA_FILE_BUILDERS)}. Use load_vaopd_dataset('<builder>', data_files=...) instead."
            )
        # A single file has no split names of its own; label it with the requested split.
        return datasets.load_dataset(builder, data_files={split: str(path)}, split=split, **load_kwargs)
    return datasets.load_dataset(str(path), split=split, **load_kwargs)


def _infer_format(columns: list[str]) -> str | None:
    if "prompt" in columns:
        return None  # already in the trainer's format
    if "problem" in columns or "problem_text" in columns:
        return "geometry3k"
    if "question" in columns:
        return "virl39k"
    raise ValueError(
        f"Cannot tell which schema this dataset follows (columns: {columns}). Pass "
        f"dataset_format={sorted(_FORMATTERS)}, or format it yourself into prompt/images/answer columns."
    )


def load_vaopd_dataset(
    name: str,
    split: str = "train",
    image_root: str | os.PathLike | None = None,
    *,
    dataset_format: str | None = None,
    instruction: str | None = DEFAULT_INSTRUCTION,
    system_prompt: str | None = None,
    **load_kwargs: Any,
) -> Dataset:
    """Load a supported dataset and format it for the VA-OPD trainer.

    Args:
        name: Where to load from:
            - `"geometry3k"` or `"hiyouga/geometry3k"`, `"virl39k"` or `"TIGER-Lab/ViRL39K"` (Hugging Face Hub);
            - a local data file (`.parquet`, `.json`, `.jsonl`, `.csv`, `.arrow`);
            - a local directory: a downloaded snapshot of either repository, or any directory `datasets.load_dataset`
              understands;
            - a `datasets` builder name such as `"parquet"` or `"json"`, with `data_files=` in `load_kwargs`.
        split: Split to load. A single local file is labelled with this split.
        image_root: Directory against which relative image paths are resolved. Required for ViRL39K from the Hub,
            whose images ship separately in `images.zip`; for a local file or directory it defaults to the directory
            holding the data.
        dataset_format: `"geometry3k"` or `"virl39k"`. Inferred from `name` for the Hub datasets, otherwise from the
            columns (`problem` -> Geometry3K, `question` -> ViRL39K, `prompt` -> already formatted, returned as is).
        instruction: Text appended to every question; `None` or `""` appends nothing.
        system_prompt: Optional system message placed before every question.
        **load_kwargs: Passed to `datasets.load_dataset` (`data_files`, `revision`, `cache_dir`, ...).

    Returns:
        A `datasets.Dataset` with `prompt`, `images` and `answer` columns plus the source's other columns,
        checked with [`validate_vaopd_dataset`].

    Raises:
        DatasetUnavailableError: If a Hub dataset cannot be fetched because the machine is offline
            (`HF_HUB_OFFLINE=1`) or the Hub is unreachable, and no cached copy exists.
        ValueError: If the schema cannot be determined, ViRL39K is requested from the Hub without `image_root`, or
            the formatted dataset fails validation.
    """
    known = _FORMAT_BY_NAME.get(name.lower())
    local_path = Path(name).expanduser()
    if known is not None and not local_path.exists():
        dataset_format = dataset_format or known
        if known == "virl39k":
            if image_root is None:
                # Checked before downloading anything: without the images the rows cannot be formatted.
                raise ValueError(
                    "ViRL39K ships its images separately, in images.zip in the TIGER-Lab/ViRL39K repository. "
                    "Download and unzip it, then pass the directory containing the extracted `images/` folder as "
                    "`image_root`."
                )
            load_kwargs.setdefault("data_files", _VIRL39K_DATA_FILE)
        dataset = _load_remote(_HUB_IDS[known], split, load_kwargs)
    elif local_path.exists():
        dataset = _load_local(local_path, split, load_kwargs)
        if image_root is None:
            image_root = local_path if local_path.is_dir() else local_path.parent
    else:  # a builder name ("parquet", "json", ...) or another Hub dataset in a supported schema
        dataset = _load_remote(name, split, load_kwargs)

    if dataset_format is None:
        dataset_format = _infer_format(dataset.column_names)
    if dataset_format is not None:
        if dataset_format not in _FORMATTERS:
            raise ValueError(f"Unknown dataset_format {dataset_format!r}; expected one of {sorted(_FORMATTERS)}.")
        formatter = partial(
            _FORMATTERS[dataset_format], image_root=image_root, instruction=instruction, system_prompt=system_prompt
        )
        consumed = [column for column in _CONSUMED_COLUMNS[dataset_format] if column in dataset.column_names]
        dataset = dataset.map(formatter, remove_columns=consumed, desc=f"Formatting {name} ({dataset_format})")
    validate_vaopd_dataset(dataset)
    return dataset


# ---------------------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------------------


def _rows_without_images(dataset: Dataset, column: str) -> list[int]:
    # Read the Arrow column directly: decoding every image just to count them would dominate start-up time.
    values = dataset.with_format("arrow")[column]
    if pa.types.is_list(values.type) or pa.types.is_large_list(values.type):
        missing = pc.equal(pc.fill_null(pc.list_value_length(values), 0), 0)
    else:
        missing = pc.is_null(values)
    return pc.indices_nonzero(missing).to_pylist()


def row_images(row: dict[str, Any]) -> list[Image.Image]:
    """The images of one trainer-format row, from its `images` list or its single `image` (TRL accepts both)."""
    if row.get("images") is not None:
        return list(row["images"])
    return [row["image"]] if row.get("image") is not None else []


def validate_vaopd_dataset(dataset: Dataset) -> None:
    """Check that a dataset has the columns and images the VA-OPD trainer needs, before any compute is spent.

    Args:
        dataset: The training or evaluation dataset.

    Raises:
        ValueError: If there is no `prompt` column, a `video`/`videos` column is present (videos are not supported),
            there is neither an `images` nor an `image` column, or some rows have no image. The message names the
            column and how to fix it.
    """
    columns = dataset.column_names
    if "prompt" not in columns:
        raise ValueError(
            f"The dataset has no 'prompt' column (columns: {columns}). VA-OPD expects conversational prompts such as "
            "[{'role': 'user', 'content': 'question'}] in a 'prompt' column; load_vaopd_dataset, format_geometry3k "
            "and format_virl39k in trl_vaopd.dataset_formats produce them."
        )
    for video_column in ("video", "videos"):
        if video_column in columns:
            raise ValueError(
                f"The dataset has a '{video_column}' column, but VA-OPD supports image inputs only. Remove it with "
                f"dataset.remove_columns('{video_column}'), or pass frames as images in an 'images' column."
            )
    image_column = "images" if "images" in columns else "image" if "image" in columns else None
    if image_column is None:
        raise ValueError(
            f"The dataset has neither an 'images' nor an 'image' column (columns: {columns}). VA-OPD distils from a "
            "teacher looking at the image, so every row needs at least one: add an 'images' column holding a list "
            "of PIL images per row."
        )
    empty = _rows_without_images(dataset, image_column)
    if empty:
        raise ValueError(
            f"{len(empty)} row(s) have no image in the '{image_column}' column (first indices: {empty[:5]}). VA-OPD "
            f"needs at least one image per row; drop them with "
            f"dataset.filter(lambda row: bool(row['{image_column}'])) or supply the missing images."
        )
