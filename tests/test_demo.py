"""The built-in demo: the synthetic task's properties, a fast smoke run of the demo pipeline, and the replication
script on a tiny budget."""

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trl_vaopd.demo.experiment import METHODS
from trl_vaopd.demo.models import build_demo_processor
from trl_vaopd.demo.task import (
    DEFAULT_TASK,
    RectangleItem,
    answer_segments,
    image_dependent_fraction,
    image_dependent_mask,
    reference_answer,
    render_image,
    sample_items,
    split_items,
    text_only_accuracy,
    to_rows,
)


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo_tokenizer():
    return build_demo_processor().tokenizer


@pytest.fixture(scope="module")
def quick_cache(tmp_path_factory):
    # Shared by the demo and replication smoke tests: the quick models are trained once
    return str(tmp_path_factory.mktemp("vaopd_cache"))


def _pixels(item):
    return np.asarray(render_image(item))


def test_items_and_images_are_deterministic_from_the_seed():
    a, b, c = sample_items(50, seed=3), sample_items(50, seed=3), sample_items(50, seed=4)
    assert a == b and a != c
    assert all(np.array_equal(_pixels(x), _pixels(y)) for x, y in zip(a, b, strict=True))
    rows_a, rows_b = to_rows(a[:5]), to_rows(b[:5])
    assert [r["solution"] for r in rows_a] == [r["solution"] for r in rows_b]
    assert split_items(200, 20, 30, seed=1) == split_items(200, 20, 30, seed=1)


def test_splits_hold_distinct_images():
    train, validation, test = split_items(3000, 128, 256, seed=0)
    key = lambda item: (item.width, item.height, item.x, item.y, item.hue)  # noqa: E731
    train_keys = {key(i) for i in train}
    assert not train_keys & {key(i) for i in test}
    assert not train_keys & {key(i) for i in validation}
    assert not {key(i) for i in validation} & {key(i) for i in test}


def test_the_image_decides_the_answer():
    item = RectangleItem(width=4, height=7, x=1, y=1, hue=200, question=0)
    pixels = _pixels(item)
    coloured = (pixels != 255).any(axis=2)
    # The rectangle covers exactly width x height units of `unit` pixels
    assert coloured.sum(axis=1).max() == 4 * DEFAULT_TASK.unit
    assert coloured.sum(axis=0).max() == 7 * DEFAULT_TASK.unit
    # Same question, other figures: other answers; the question text is the same
    others = [RectangleItem(w, h, 1, 1, 200, 0) for w, h in ((4, 7), (7, 4), (3, 5))]
    assert len({to_rows([o])[0]["prompt"][0]["content"] for o in others}) == 1
    assert [o.answer for o in others] == ["28", "28", "15"]
    assert not np.array_equal(_pixels(others[0]), _pixels(others[2]))


def test_text_alone_is_near_chance():
    train, _, test = split_items(5000, 0, 1000, seed=0)
    # The best any text-only predictor can do: always the most frequent area (4 of the 81 (width, height) pairs)
    counts = Counter(w * h for w in range(1, 10) for h in range(1, 10))
    chance = max(counts.values()) / 81
    assert chance < 0.05
    assert text_only_accuracy(train, test) < 2 * chance


def test_image_dependent_tokens_are_a_minority(demo_tokenizer):
    items = sample_items(40, seed=5)
    fraction = image_dependent_fraction(demo_tokenizer, items)
    assert 0.10 <= fraction <= 0.20, fraction
    # The comparison-based count agrees with the template's own annotation: 6 numbers, each a single token
    ids, depends = image_dependent_mask(demo_tokenizer, items[0])
    assert sum(depends) == sum(dependent for _, dependent in answer_segments(items[0])) == 6
    numbers = [demo_tokenizer.decode([i]).strip() for i, d in zip(ids, depends, strict=True) if d]
    assert numbers == [str(items[0].width), str(items[0].height)] * 2 + [items[0].answer] * 2
    assert reference_answer(items[0]).endswith(f"\\boxed{{{items[0].answer}}} .")


def test_teacher_and_student_are_reproducible_from_the_seed(tmp_path):
    from trl_vaopd.demo.models import cpu_threads, prepare_models, quick_setup

    # One thread, as the demo runs: tiny models on several threads crawl on a busy machine
    with cpu_threads(1), pytest.warns(UserWarning, match="did not reach"):  # 4 steps: the quick teacher can't read
        first = prepare_models(quick_setup(), cache_dir=tmp_path / "a", progress=False)
        second = prepare_models(quick_setup(), cache_dir=tmp_path / "b", progress=False)
    for name in ("teacher", "student"):
        a, b = getattr(first, name)().state_dict(), getattr(second, name)().state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert first.meta["teacher"]["validation"] == second.meta["teacher"]["validation"]
    assert first.directory.name == quick_setup().key() and not first.loaded_from_cache


@pytest.mark.filterwarnings("ignore:The teacher did not reach")
def test_quick_demo_pipeline(tmp_path, quick_cache, capsys):
    from trl_vaopd.demo import run_demo

    summary = run_demo(output_dir=str(tmp_path / "out"), quick=True, progress=False, cache_dir=quick_cache)
    printed = capsys.readouterr().out
    for key in ("student_accuracy_before", "student_accuracy_after", "teacher_accuracy", "mean_va", "va_top10_share"):
        assert key in summary
        assert 0.0 <= summary[key] <= 1.0 or key == "mean_va"
    for png in (summary["heatmap_png"], summary["curves_png"]):
        assert png in printed
        with Image.open(png) as image:
            assert image.format == "PNG" and min(image.size) > 100
    saved = json.loads(Path(summary["summary_json"]).read_text())
    assert saved["run"]["method"] == "vaopd" and saved["steps"] == 2
    assert "student before" in printed and "teacher" in printed
    # The second run finds the teacher and student in the cache
    again = run_demo(output_dir=str(tmp_path / "again"), quick=True, progress=False, cache_dir=quick_cache)
    assert again["models_from_cache"] and not summary["models_from_cache"]


@pytest.mark.filterwarnings("ignore:The teacher did not reach")
def test_replicate_script_on_a_tiny_budget(tmp_path, quick_cache, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    sys.modules.pop("replicate", None)
    import replicate

    out = tmp_path / "replication"
    argv = ["--tiny", "--seeds", "0", "--workers", "1", "--output_dir", str(out), "--cache_dir", quick_cache]
    report = replicate.main([*argv, "--no_progress"])
    assert set(report["methods"]) == set(METHODS)
    results = json.loads((out / "results.json").read_text())
    assert len(results["runs"]) == len(METHODS)
    for run in results["runs"]:
        assert run["spec"]["steps"] == 2 and len(run["curve"]) == 3  # steps 0, 1, 2
    table = (out / "results.md").read_text()
    assert "| VA-OPD |" in table and "top-10% VA tokens masked" in table
    with Image.open(out / "replication.png") as image:
        assert image.format == "PNG"
    # Resuming keeps the finished runs
    runs_before = {p.name: p.stat().st_mtime for p in (out / "runs").iterdir()}
    replicate.main([*argv, "--no_progress", "--methods", "opd"])
    assert {p.name: p.stat().st_mtime for p in (out / "runs").iterdir()} == runs_before
