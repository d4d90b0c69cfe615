"""Tests for the Geometry3K / ViRL39K formatters, the dataset loader and the dataset validation (all offline)."""

import io
import json
import shutil
import socket
import time
import zipfile
from pathlib import Path

import datasets
import pytest
from datasets import Dataset, Sequence
from datasets import Image as ImageFeature
from PIL import Image

from trl_vaopd.dataset_formats import (
    DEFAULT_INSTRUCTION,
    DatasetUnavailableError,
    format_geometry3k,
    format_virl39k,
    load_vaopd_dataset,
    validate_vaopd_dataset,
)


FIXTURES = Path(__file__).parent / "fixtures"


def _fixture_rows(name):
    return json.loads((FIXTURES / name).read_text())


def _diagram(color="white", mode="RGB"):
    return Image.new(mode, (24, 16), color)


def _user_text(row):
    (message,) = row["prompt"]
    assert message["role"] == "user"
    return message["content"]


@pytest.fixture
def virl_release(tmp_path):
    """A directory laid out like a downloaded ViRL39K release: 39Krelease.parquet, images.zip and images/."""
    rows = _fixture_rows("virl39k_rows.json")
    for row in rows:
        for index, relative in enumerate(row["image"]):
            path = tmp_path / relative
            path.parent.mkdir(exist_ok=True)
            _diagram(("red", "green", "blue")[index % 3]).save(path)
    with zipfile.ZipFile(tmp_path / "images.zip", "w") as archive:
        for path in (tmp_path / "images").iterdir():
            archive.write(path, f"images/{path.name}")
    Dataset.from_list(rows).to_parquet(tmp_path / "39Krelease.parquet")
    return tmp_path


@pytest.fixture
def no_network(monkeypatch):
    """Make any connection attempt fail loudly and record it."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access is disabled in tests")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts


# --- Geometry3K ------------------------------------------------------------------------------------------------------


def test_format_geometry3k_hub_schema():
    row = {**_fixture_rows("geometry3k_rows.json")[0], "images": [_diagram(mode="RGBA")]}

    formatted = format_geometry3k(row)

    assert formatted["prompt"] == [
        {"role": "user", "content": f"Find x. Round to the nearest tenth.\n{DEFAULT_INSTRUCTION}"}
    ]
    assert "<image>" not in _user_text(formatted)
    assert len(formatted["images"]) == 1 and formatted["images"][0].mode == "RGB"
    assert formatted["answer"] == "5.4"


def test_format_geometry3k_instruction_and_system_prompt_are_configurable():
    row = {**_fixture_rows("geometry3k_rows.json")[2], "images": [_diagram()]}

    formatted = format_geometry3k(row, instruction=None, system_prompt="You are a careful geometer.")

    assert formatted["prompt"] == [
        {"role": "system", "content": "You are a careful geometer."},
        {"role": "user", "content": r"Find m \angle 2."},
    ]


def test_format_geometry3k_raw_intergps_letter_answer(tmp_path):
    # Raw InterGPS data.json fields: the answer is a letter indexing `choices`, the diagram a file next to it.
    _diagram().save(tmp_path / "img_diagram.png")
    row = {
        "id": 7,
        "problem_text": "Find y.",
        "choices": ["3", "6", "9", "12"],
        "answer": "C",
        "image": "img_diagram.png",
    }

    formatted = format_geometry3k(row, image_root=tmp_path, instruction="")

    assert _user_text(formatted) == "Find y."
    assert formatted["answer"] == "9"
    assert formatted["images"][0].size == (24, 16)


def test_load_geometry3k_from_a_downloaded_snapshot_directory(tmp_path):
    # `hf download hiyouga/geometry3k --repo-type dataset` gives data/<split>-*.parquet with embedded images.
    (tmp_path / "data").mkdir()
    for split, rows in (
        ("train", _fixture_rows("geometry3k_rows.json")[:2]),
        ("test", _fixture_rows("geometry3k_rows.json")[2:]),
    ):
        split_set = Dataset.from_list([{**row, "images": [_diagram()]} for row in rows])
        split_set = split_set.cast_column("images", Sequence(ImageFeature()))
        split_set.to_parquet(tmp_path / "data" / f"{split}-00000-of-00001.parquet")

    dataset = load_vaopd_dataset(str(tmp_path), split="train")

    assert len(dataset) == 2
    assert set(dataset.column_names) == {"prompt", "images", "answer", "id", "choices", "ground_truth"}
    assert "problem" not in dataset.column_names
    assert dataset["answer"] == ["5.4", r"4\sqrt{3}"]
    assert dataset["ground_truth"] == ["B", "C"]
    first = dataset[0]
    assert _user_text(first).startswith("Find x.")
    assert isinstance(first["images"][0], Image.Image) and first["images"][0].mode == "RGB"


# --- ViRL39K ---------------------------------------------------------------------------------------------------------


def test_format_virl39k_release_schema(virl_release):
    rows = _fixture_rows("virl39k_rows.json")

    single = format_virl39k(rows[0], image_root=virl_release)
    multi = format_virl39k(rows[1], virl_release)

    assert _user_text(single) == f"What is the perimeter of the rectangle shown in the figure?\n{DEFAULT_INSTRUCTION}"
    assert single["answer"] == "24"  # the release wraps answers in \boxed{}
    assert len(single["images"]) == 1 and single["images"][0].mode == "RGB"
    assert _user_text(multi).startswith("Which figure has more sides?\nA. The first\nB. The second\n")
    assert "<image>" not in _user_text(multi)
    assert len(multi["images"]) == 2
    assert format_virl39k(rows[2], virl_release)["answer"] == r"\frac{3}{4}"


def _png_bytes():
    buffer = io.BytesIO()
    _diagram("red", mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    "make_image",
    [
        pytest.param(lambda root: _diagram(mode="P"), id="pil"),
        pytest.param(lambda root: _png_bytes(), id="bytes"),
        pytest.param(lambda root: {"bytes": _png_bytes(), "path": "ignored.png"}, id="datasets-bytes-dict"),
        pytest.param(
            lambda root: {"bytes": None, "path": str(root / "images/fixture-0001-0.jpg")}, id="datasets-path-dict"
        ),
        pytest.param(lambda root: str(root / "images/fixture-0001-0.jpg"), id="absolute-path"),
    ],
)
def test_format_virl39k_accepts_every_image_representation(virl_release, make_image):
    row = {**_fixture_rows("virl39k_rows.json")[0], "image": [make_image(virl_release)]}

    (image,) = format_virl39k(row)["images"]

    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (24, 16)


def test_format_virl39k_missing_image_explains_image_root(tmp_path):
    row = _fixture_rows("virl39k_rows.json")[0]
    with pytest.raises(FileNotFoundError, match="image_root"):
        format_virl39k(row, image_root=tmp_path)


def test_load_virl39k_from_a_downloaded_release_directory(virl_release):
    # The directory also holds images/ and images.zip; the loader must read the parquet file, not an image folder.
    dataset = load_vaopd_dataset(str(virl_release))

    assert len(dataset) == 3
    assert set(dataset.column_names) == {
        "prompt",
        "images",
        "answer",
        "PassRate_32BTrained",
        "PassRate_7BBase",
        "category",
        "source",
        "qid",
    }
    assert dataset["answer"] == ["24", "B", r"\frac{3}{4}"]
    assert dataset["qid"] == ["fixture-0001", "fixture-0002", "fixture-0003"]
    assert [len(images) for images in dataset["images"]] == [1, 2, 1]


def test_load_virl39k_from_a_local_json_file(virl_release):
    json_path = virl_release / "virl39k_rows.json"
    shutil.copy(FIXTURES / "virl39k_rows.json", json_path)

    # The format is inferred from the `question` column, image_root defaults to the file's directory.
    dataset = load_vaopd_dataset(str(json_path), split="validation")

    assert dataset["answer"] == ["24", "B", r"\frac{3}{4}"]
    assert _user_text(dataset[2]).endswith(DEFAULT_INSTRUCTION)


def test_load_with_builder_name_and_data_files(virl_release):
    dataset = load_vaopd_dataset(
        "json",
        data_files=str(FIXTURES / "virl39k_rows.json"),
        image_root=virl_release,
        dataset_format="virl39k",
        instruction=None,
    )
    assert _user_text(dataset[0]) == "What is the perimeter of the rectangle shown in the figure?"


def test_load_rejects_an_unknown_schema(tmp_path):
    path = tmp_path / "other.json"
    path.write_text(json.dumps([{"text": "hello", "label": 1}]))
    with pytest.raises(ValueError, match="dataset_format"):
        load_vaopd_dataset(str(path))


def test_load_returns_an_already_formatted_dataset_unchanged(tmp_path):
    path = tmp_path / "formatted.parquet"
    Dataset.from_list(
        [{"prompt": [{"role": "user", "content": "Q"}], "images": [_diagram()], "answer": "1"}]
    ).to_parquet(path)
    dataset = load_vaopd_dataset(str(path))
    assert dataset.column_names == ["prompt", "images", "answer"]
    assert _user_text(dataset[0]) == "Q"


# --- Hub access while offline ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "hub_id"),
    [
        ("geometry3k", "hiyouga/geometry3k"),
        ("hiyouga/geometry3k", "hiyouga/geometry3k"),
        ("virl39k", "TIGER-Lab/ViRL39K"),
    ],
)
def test_offline_hub_load_fails_fast_with_a_clear_error(monkeypatch, tmp_path, no_network, name, hub_id):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline_flag_before = datasets.config.HF_HUB_OFFLINE

    start = time.monotonic()
    with pytest.raises(DatasetUnavailableError) as error:
        load_vaopd_dataset(name, image_root=tmp_path, cache_dir=str(tmp_path / "cache"))

    assert time.monotonic() - start < 10
    assert no_network == []
    assert isinstance(error.value, ConnectionError)
    message = str(error.value)
    assert hub_id in message and "offline" in message and "local path" in message
    assert offline_flag_before == datasets.config.HF_HUB_OFFLINE  # the temporary offline switch is undone


def test_virl39k_from_the_hub_needs_image_root_before_downloading(no_network):
    with pytest.raises(ValueError, match=r"images\.zip"):
        load_vaopd_dataset("TIGER-Lab/ViRL39K")
    assert no_network == []


# --- Validation ------------------------------------------------------------------------------------------------------


def _trainer_dataset(**columns):
    base = {"prompt": [[{"role": "user", "content": "Q1"}], [{"role": "user", "content": "Q2"}]]}
    return Dataset.from_dict({**base, **columns})


def test_validate_accepts_images_and_image_columns():
    validate_vaopd_dataset(_trainer_dataset(images=[[_diagram()], [_diagram(), _diagram()]]))
    validate_vaopd_dataset(_trainer_dataset(image=[_diagram(), _diagram()]))
    # after select/shuffle the check follows the indices mapping
    validate_vaopd_dataset(_trainer_dataset(images=[[], [_diagram()]]).select([1]))


def test_validate_requires_a_prompt_column():
    with pytest.raises(ValueError, match=r"'prompt' column.*load_vaopd_dataset"):
        validate_vaopd_dataset(Dataset.from_dict({"question": ["Q"], "images": [[_diagram()]]}))


def test_validate_requires_an_image_column():
    with pytest.raises(ValueError, match=r"neither an 'images' nor an 'image' column.*add an 'images' column"):
        validate_vaopd_dataset(_trainer_dataset(answer=["1", "2"]))


@pytest.mark.parametrize(
    ("column", "values"),
    [("images", [[_diagram()], []]), ("images", [[_diagram()], None]), ("image", [_diagram(), None])],
)
def test_validate_rejects_rows_without_images(column, values):
    with pytest.raises(
        ValueError, match=rf"1 row\(s\) have no image in the '{column}' column \(first indices: \[1\]\).*filter"
    ):
        validate_vaopd_dataset(_trainer_dataset(**{column: values}))


@pytest.mark.parametrize("column", ["video", "videos"])
def test_validate_rejects_video_columns(column):
    dataset = _trainer_dataset(images=[[_diagram()], [_diagram()]], **{column: ["a.mp4", "b.mp4"]})
    with pytest.raises(ValueError, match=rf"'{column}' column.*image inputs only.*remove_columns"):
        validate_vaopd_dataset(dataset)
