"""The built-in demo: the synthetic task's properties, a fast smoke run of the demo pipeline, and the replication
script on a tiny budget."""

import json
import statistics
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
    PERIMETER_TASK,
    RectangleItem,
    answer_of,
    answer_segments,
    cue_text,
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
    assert [answer_of(o) for o in others] == ["28", "28", "15"]
    assert [answer_of(o, PERIMETER_TASK) for o in others] == ["22", "22", "16"]
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
    assert numbers == [str(items[0].width), str(items[0].height)] * 2 + [answer_of(items[0])] * 2
    assert reference_answer(items[0]).endswith(f"\\boxed{{{answer_of(items[0])}}} .")


@pytest.fixture(scope="module")
def perimeter_tokenizer():
    return build_demo_processor(PERIMETER_TASK).tokenizer


def test_perimeter_task_is_in_the_papers_regime_by_construction(perimeter_tokenizer):
    items = sample_items(60, seed=5, config=PERIMETER_TASK)
    # A tenth of the teacher's tokens depend on the image (the numbers), a minority of the student's too
    teacher_share = image_dependent_fraction(perimeter_tokenizer, items, PERIMETER_TASK, "teacher")
    student_share = image_dependent_fraction(perimeter_tokenizer, items, PERIMETER_TASK, "student")
    assert 0.08 <= teacher_share <= 0.13 and 0.12 <= student_share <= 0.18, (teacher_share, student_share)
    # Every number in an answer depends on the image: the comparison-based mask and the template agree
    for variant in range(5):
        ids, depends = image_dependent_mask(perimeter_tokenizer, items[1], PERIMETER_TASK, "teacher", variant)
        words = [perimeter_tokenizer.decode([i]).strip() for i in ids]
        assert [w for w, d in zip(words, depends, strict=True) if d] == [w for w in words if w.isdigit()]
        segments = answer_segments(items[1], PERIMETER_TASK, "teacher", variant)
        assert sum(depends) == sum(dependent for _, dependent in segments)
    # The teacher's language has entropy: many distinct answers for one figure, its favourite phrasing most often
    teacher = [reference_answer(items[0], PERIMETER_TASK, "teacher", v) for v in range(400)]
    assert len(set(teacher)) > 100
    favourite = sum(t.startswith(("Looking at the figure", "Let us work this out")) for t in teacher) / 400
    assert 0.6 < favourite < 0.9, favourite
    # The student starts from a shorter style of its own: other favourite phrasings, the optional sentences left out
    student = [reference_answer(items[0], PERIMETER_TASK, "student", v) for v in range(400)]
    assert sum(t.startswith(("Looking at the figure", "Let us work this out")) for t in student) / 400 < 0.05
    assert statistics.fmean(map(len, student)) < 0.85 * statistics.fmean(map(len, teacher))
    assert all(t.endswith(f"\\boxed{{{answer_of(items[0], PERIMETER_TASK)}}} .") for t in [*student, *teacher])


def test_perimeter_text_alone_is_near_chance():
    train, _, test = split_items(5000, 0, 1000, seed=0, config=PERIMETER_TASK)
    # Chance: always the most frequent perimeter, 2 x 10 (9 of the 81 (width, height) pairs)
    counts = Counter(2 * (w + h) for w in range(1, 10) for h in range(1, 10))
    chance = max(counts.values()) / 81
    assert chance == pytest.approx(9 / 81)
    assert text_only_accuracy(train, test, PERIMETER_TASK) < 1.25 * chance


def test_cue_describes_the_visual_evidence_without_the_answer():
    for w in range(1, 10):
        for h in range(1, 10):
            item = RectangleItem(w, h, 1, 2, 30, 1)
            cue = cue_text(item)
            stated = {int(token) for token in cue.rstrip(".").split() if token.isdigit()}
            assert stated == {w, h}  # the side lengths, which the figure shows
            assert item.perimeter not in stated  # the perimeter's answer is never stated
            assert not {"area", "perimeter", "answer"} & set(cue.lower().split())
    # A function of the figure's content: same sizes, same cue, whatever the hue, position or phrasing
    assert cue_text(RectangleItem(3, 4, 1, 1, 10, 0)) == cue_text(RectangleItem(3, 4, 2, 1, 200, 3))
    assert cue_text(RectangleItem(3, 4, 1, 1, 10, 0)) != cue_text(RectangleItem(4, 3, 1, 1, 10, 0))
    assert to_rows([RectangleItem(3, 4, 1, 1, 10, 0)])[0]["cue"] == cue_text(RectangleItem(3, 4, 1, 1, 10, 0))


@pytest.mark.filterwarnings("ignore:The teacher did not reach")
def test_the_perimeter_task_holds_the_papers_premise_on_the_starting_students_rollouts(monkeypatch):
    """Measured as the replication measures it (`examples/replication/analysis.py`), on the real teacher and student
    (trained into the demo cache on first use, about 2 minutes on one core)."""
    from trl_vaopd.demo.models import DemoSetup, cpu_threads, prepare_models

    monkeypatch.syspath_prepend(str(ROOT / "examples" / "replication"))
    from analysis import kl_va_alignment

    with cpu_threads(1):
        models = prepare_models(DemoSetup(task=PERIMETER_TASK), progress=False)
        regime = kl_va_alignment(models, num_items=32)
    # A teacher that reads, a student that mostly does not
    assert models.meta["teacher"]["heldout_accuracy"] >= 0.95 and models.meta["student"]["heldout_accuracy"] <= 0.5
    # The image-dependent tokens are a small minority of the student's tokens and hold well under half of its KL
    assert 0.1 <= regime["number_token_share"] <= 0.2, regime
    assert regime["kl_share_numbers"] < 0.4, regime


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
    reports = replicate.main([*argv, "--no_progress"])
    assert set(reports) == {"area", "perimeter"}
    for task, report in reports.items():
        assert report["task"] == task and set(report["methods"]) == set(METHODS)
        results = json.loads((out / task / "results.json").read_text())
        assert len(results["runs"]) == len(METHODS)
        for run in results["runs"]:
            assert run["spec"]["steps"] == 2 and len(run["curve"]) == 3  # steps 0, 1, 2
        regime = report["regime"]
        for key in ("kl_share_numbers", "number_token_share", "kl_share_top10_va", "text_only_accuracy"):
            assert 0.0 <= regime[key] <= 1.0, key
        table = (out / task / "results.md").read_text()
        assert f"Task: {task}." in table
        for label in ("| VA-OPD |", "| VGS |", "| ViCuR, cue teacher + module |", "top-10% VA tokens masked"):
            assert label in table
        with Image.open(out / task / "replication.png") as image:
            assert image.format == "PNG"
    # Resuming keeps the finished runs
    runs_before = {p.name: p.stat().st_mtime for p in (out / "area" / "runs").iterdir()}
    replicate.main([*argv, "--no_progress", "--methods", "opd", "--tasks", "area"])
    assert {p.name: p.stat().st_mtime for p in (out / "area" / "runs").iterdir()} == runs_before
