"""Writing ViCuR's cue column with a VLM: every row gets a cue, an interrupted run resumes to the same column, bad
input is refused; the dataset formatters keep a cue column."""

import json

import pytest
from conftest import image_question_dataset

from trl_vaopd.cues import generate_cues, question_of
from trl_vaopd.tiny_models import build_model


@pytest.fixture(scope="module")
def writer(processors):
    processor = processors["qwen3_vl"]
    return build_model("qwen3_vl", processor, "teacher", seed=1), processor


def test_question_of_reads_the_last_user_turn():
    prompt = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Find x."}]},
    ]
    assert question_of(prompt) == "Find x."
    assert question_of([{"role": "user", "content": "Find y."}]) == "Find y."


def test_every_row_gets_a_cue_and_a_resumed_run_writes_the_same_column(writer, tmp_path):
    model, processor = writer
    dataset = image_question_dataset(7)
    settings = dict(batch_size=3, max_new_tokens=5, show_progress=False)
    whole = generate_cues(dataset, model, processor, progress_file=tmp_path / "whole.jsonl", **settings)
    assert whole.column_names == [*dataset.column_names, "cue"]
    assert all(isinstance(c, str) and c for c in whole["cue"])
    # An interruption after the first batch, half a line written: the rerun keeps the batch and redoes the rest
    lines = (tmp_path / "whole.jsonl").read_text().splitlines()
    (tmp_path / "cut.jsonl").write_text("\n".join(lines[:4]) + "\n" + lines[4][:10])
    calls = []
    original = model.generate

    def counting(*args, **kwargs):
        calls.append(kwargs.get("input_ids", args[0] if args else None).size(0))
        return original(*args, **kwargs)

    model.generate = counting
    try:
        resumed = generate_cues(dataset, model, processor, progress_file=tmp_path / "cut.jsonl", **settings)
    finally:
        model.generate = original
    assert resumed["cue"] == whole["cue"]
    assert calls == [3, 1]  # the second and third batches only
    assert len((tmp_path / "cut.jsonl").read_text().splitlines()) >= 8


def test_the_instruction_holds_the_rows_question(writer, monkeypatch):
    import trl_vaopd.cues as cues

    seen = []

    def fake_generate(model, processor, **kwargs):
        def generate(rows):
            seen.extend(rows)
            return ["evidence"] * len(rows)

        return generate

    monkeypatch.setattr(cues, "make_hf_generate", fake_generate)
    out = generate_cues(image_question_dataset(2), *writer, instruction="Q: {question} Describe.", show_progress=False)
    assert out["cue"] == ["evidence", "evidence"]
    assert seen[1]["prompt"][0]["content"] == "Q: What number is shown in picture 1? Look closely. Describe."
    assert len(seen[1]["images"]) == 1


def test_bad_input_is_refused(writer, tmp_path):
    dataset = image_question_dataset(2)
    with pytest.raises(ValueError, match="already has a 'cue' column"):
        generate_cues(dataset.add_column("cue", ["a", "b"]), *writer)
    with pytest.raises(ValueError, match="must contain '\\{question\\}'"):
        generate_cues(dataset, *writer, instruction="Describe the image.")
    with pytest.raises(ValueError, match="no 'prompt' column"):
        generate_cues(dataset.remove_columns("prompt"), *writer)
    (tmp_path / "p.jsonl").write_text(json.dumps({"settings": {"seed": 99}}) + "\n")
    with pytest.raises(ValueError, match="written with other settings"):
        generate_cues(dataset, *writer, progress_file=tmp_path / "p.jsonl", show_progress=False)


@pytest.mark.parametrize("name", ["geometry3k", "virl39k"])
def test_formatters_keep_a_cue_column(tmp_path, name):
    from conftest import noise_image
    from datasets import Dataset

    from trl_vaopd.dataset_formats import load_vaopd_dataset

    if name == "geometry3k":
        rows = [
            {"images": [noise_image(i)], "problem": f"<image>Find x {i}.", "answer": "3", "cue": f"a {i}"}
            for i in range(2)
        ]
    else:
        rows = [
            {"image": [noise_image(i)], "question": f"<image>What is {i}?", "answer": "\\boxed{1}", "cue": f"a {i}"}
            for i in range(2)
        ]
    path = tmp_path / "data.parquet"
    Dataset.from_list(rows).to_parquet(str(path))
    dataset = load_vaopd_dataset(str(path), dataset_format=name)
    assert dataset["cue"] == ["a 0", "a 1"] and "prompt" in dataset.column_names
