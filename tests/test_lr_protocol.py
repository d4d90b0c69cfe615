"""The replication's per-method learning-rate rule (`examples/replication/lr_protocol.py`) on made-up probe figures,
and `examples/replicate.py`'s `--lr_grid`, `--learning_rates_from`, `--learning_rates` and `--text_prior` on a tiny
budget."""

import json
import sys
from pathlib import Path

import pytest

from trl_vaopd.demo.models import TEXT_PRIOR_RATE, quick_setup
from trl_vaopd.demo.task import TaskConfig


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "replication"))

from lr_protocol import (  # noqa: E402
    BORROWED,
    RULE_VERSION,
    TUNED_METHODS,
    choose_learning_rate,
    learning_rate_choice,
    learning_rate_grid,
    learning_rates_from_choice,
)


def figures(*counts):
    """Probe accuracies from counts of right figures out of 64."""
    return [c / 64 for c in counts]


def test_the_rule_picks_the_best_mean_beyond_one_figure():
    # 1e-3 leads by 1.5 figures on the mean: not a tie
    scores = {1e-3: figures(42, 41), 2e-3: figures(40, 40), 4e-3: figures(30, 20)}
    assert choose_learning_rate(scores, default=2e-3, probe_size=64) == 1e-3


def test_within_one_figure_the_default_wins():
    # Exactly one figure behind on the mean is tied; the task's OPD rate is then closest to itself
    scores = {1e-3: figures(42, 42), 2e-3: figures(41, 41), 4e-3: figures(10, 12)}
    assert choose_learning_rate(scores, default=2e-3, probe_size=64) == 2e-3
    # Half a figure more behind is not tied
    scores[2e-3] = figures(41, 40)
    assert choose_learning_rate(scores, default=2e-3, probe_size=64) == 1e-3
    # The tie is one figure of the probe, whatever its size: on a 16-figure probe 2e-3 is a figure behind
    assert choose_learning_rate({1e-3: [10 / 16], 2e-3: [9 / 16]}, default=2e-3, probe_size=16) == 2e-3


def test_among_tied_rates_the_closest_in_log_ratio_then_the_smaller_wins():
    # Half and twice the default are tied and equally far from it in log ratio: the smaller wins
    scores = {1e-3: figures(42, 42), 2e-3: figures(30, 30), 4e-3: figures(43, 42)}
    assert choose_learning_rate(scores, default=2e-3, probe_size=64) == 1e-3
    # Closer in log ratio beats better within the tie: 3e-3 is log(1.5) from 2e-3, 1e-3 is log(2)
    scores = {1e-3: figures(43, 43), 3e-3: figures(42, 42)}
    assert choose_learning_rate(scores, default=2e-3, probe_size=64) == 3e-3


def test_the_rule_refuses_unfinished_grids():
    with pytest.raises(ValueError, match="same number of tuning runs"):
        choose_learning_rate({1e-3: figures(40, 41), 2e-3: figures(40)}, default=2e-3, probe_size=64)
    with pytest.raises(ValueError, match="at least one learning rate"):
        choose_learning_rate({}, default=2e-3, probe_size=64)


def _run(method, lr, seed, right, steps=150):
    return {
        "method": method,
        "seed": seed,
        "spec": {"steps": steps, "learning_rate": lr},
        "curve": [{"step": 0, "accuracy": 0.25, "visual_reliance": 0.0}, {"step": steps, "accuracy": right / 64}],
    }


def test_the_choice_covers_the_borrowing_rows_and_keeps_every_run():
    grid = learning_rate_grid(1e-3)
    assert grid == (5e-4, 1e-3, 2e-3)
    opd = dict(zip(grid, [(30, 31), (40, 41), (39, 40)], strict=True))  # 2e-3 is tied with 1e-3: 1e-3
    vaopd = dict(zip(grid, [(44, 44), (40, 40), (38, 39)], strict=True))  # 5e-4 by 4 figures
    runs = [
        _run(method, lr, seed, counts[i])
        for method, table in (("opd", opd), ("vaopd", vaopd))
        for lr, counts in table.items()
        for i, seed in enumerate((100, 101))
    ]
    choice = learning_rate_choice(runs, default=1e-3, probe_size=64, methods=["opd", "vaopd"])
    assert choice["rule_version"] == RULE_VERSION
    assert choice["chosen"] == {
        "opd": 1e-3,
        "vaopd": 5e-4,
        "mask_top10": 1e-3,
        "mask_low10": 1e-3,
        "mask_random10": 1e-3,
        "weighting_only": 5e-4,
        "grouping_only": 5e-4,
    }
    assert choice["mean_final_probe_accuracy"]["opd"] == {"0.0005": 30.5 / 64, "0.001": 40.5 / 64, "0.002": 39.5 / 64}
    assert len(choice["runs"]) == 12 and choice["runs"][0]["final_probe_accuracy"] == 30 / 64
    # Every row of the evaluation table is tuned or borrows a tuned row's rate
    assert set(BORROWED.values()) <= set(TUNED_METHODS) and not set(BORROWED) & set(TUNED_METHODS)
    unfinished = {**_run("opd", 1e-3, 100, 40), "spec": {"steps": 300, "learning_rate": 1e-3}}
    with pytest.raises(ValueError, match="no final probe"):
        learning_rate_choice([unfinished], default=1e-3, probe_size=64, methods=["opd"])


def test_a_choice_is_read_back_only_for_its_task_and_models(tmp_path):
    path = tmp_path / "lr_choice.json"
    choice = {"rule_version": RULE_VERSION, "task": "area", "setup_key": "k1", "text_prior_rate": 0.25}
    path.write_text(json.dumps({**choice, "chosen": {"opd": 1e-3, "mask_top10": 1e-3}}))
    assert learning_rates_from_choice(path, "area", "k1") == {"opd": 1e-3, "mask_top10": 1e-3}
    with pytest.raises(ValueError, match="learning rates of the area task, not of the perimeter task"):
        learning_rates_from_choice(path, "perimeter", "k1")
    with pytest.raises(ValueError, match="cache key k1 .*but these runs use k2"):
        learning_rates_from_choice(path, "area", "k2")
    path.write_text(json.dumps({**choice, "rule_version": 0, "chosen": {}}))
    with pytest.raises(ValueError, match="version 0 of the learning-rate rule"):
        learning_rates_from_choice(path, "area", "k1")


@pytest.fixture(scope="module")
def replicate(tmp_path_factory):
    sys.path.insert(0, str(ROOT / "examples"))
    sys.modules.pop("replicate", None)
    import replicate

    return replicate, str(tmp_path_factory.mktemp("vaopd_cache"))


@pytest.mark.filterwarnings("ignore:The teacher did not reach")
def test_lr_grid_then_evaluation_on_text_prior_models(tmp_path, replicate):
    replicate, cache = replicate
    out = tmp_path / "rerun"
    common = ["--tiny", "--tasks", "area", "--workers", "1", "--output_dir", str(out), "--cache_dir", cache]
    common += ["--no_progress"]
    key = quick_setup(TaskConfig(kind="area")).with_text_prior(TEXT_PRIOR_RATE).key()

    grid = replicate.main(
        [*common, "--text_prior", "--lr_grid", "--methods", "opd", "vaopd_view_kl", "--seeds", "100"]
    )
    choice_file = out / "area" / "lr_choice.json"
    choice = json.loads(choice_file.read_text())
    assert grid["area"] == choice
    assert choice["task"] == "area" and choice["setup_key"] == key and choice["text_prior_rate"] == TEXT_PRIOR_RATE
    assert choice["grid"] == [5e-4, 1e-3, 2e-3] and choice["seeds"] == [100]
    assert {(r["method"], r["learning_rate"]) for r in choice["runs"]} == {
        (m, lr) for m in ("opd", "vaopd_view_kl") for lr in choice["grid"]
    }
    for method in ("opd", "vaopd_view_kl"):
        scores = {r["learning_rate"]: [r["final_probe_accuracy"]] for r in choice["runs"] if r["method"] == method}
        assert choice["chosen"][method] == choose_learning_rate(scores, 1e-3, probe_size=4)
    assert choice["chosen"]["mask_top10"] == choice["chosen"]["opd"] and "weighting_only" not in choice["chosen"]
    # The tuning runs never read the test figures
    for path in (out / "area" / "lr_grid" / "runs").iterdir():
        run = json.loads(path.read_text())
        assert run["final"] is None and "student_start" not in run and run["models"]["setup_key"] == key

    argv = [*common, "--text_prior", "--methods", "opd", "vaopd_view_kl", "mask_top10", "--seeds", "0"]
    argv += ["--learning_rates_from", str(choice_file), "--learning_rates", "mask_top10=3e-3"]
    report = replicate.main(argv)["area"]
    expected = {**{m: choice["chosen"][m] for m in ("opd", "vaopd_view_kl")}, "mask_top10": 3e-3}
    assert report["learning_rates"] == expected
    weights = report["models"].pop("weights")
    assert report["models"] == {"setup_key": key, "text_prior_rate": TEXT_PRIOR_RATE} and len(weights) == 16
    for method, lr in expected.items():
        run = json.loads((out / "area" / "runs" / f"{method}_seed0.json").read_text())
        assert run["spec"]["learning_rate"] == lr and run["final"]["greedy"] is not None
    table = (out / "area" / "results.md").read_text()
    assert f"text-prior models (rate 0.25), cache key {key}" in table
    assert "| VA-OPD, teacher's view divergence as VA (package variant) |" in table
    # VA's size beside its concentration: the teacher's mean VA of each row
    assert "Teacher mean VA (nats/token) |" in table
    assert f"{report['methods']['opd']['va_mean']['mean']:.3f} ± " in table
    assert "AdamW lr per method (Standard OPD" in table  # mask_top10's 3e-3 is off the grid

    # Today's models into the same directory: refused, by the choice file and by the runs already there
    with pytest.raises(ValueError, match="pass the same --text_prior"):
        replicate.main([a for a in argv if a != "--text_prior"])
    with pytest.raises(ValueError, match="no lr_choice.json for \\['perimeter'\\]"):
        replicate.main([*argv, "--tasks", "area", "perimeter"])
    with pytest.raises(ValueError, match="not found; --lr_grid writes"):
        replicate.main([*common, "--learning_rates_from", str(out / "perimeter" / "lr_choice.json")])
    with pytest.raises(ValueError, match=r"holds runs made with text-prior models \(rate 0.25\).*the default models"):
        replicate.main([*common, "--methods", "opd", "--seeds", "0"])
    # Runs of other weights under the same settings (another machine's models): refused on resume
    run_file = out / "area" / "runs" / "opd_seed0.json"
    run = json.loads(run_file.read_text())
    assert run["models"]["weights"] == weights
    run_file.write_text(json.dumps({**run, "models": {**run["models"], "weights": "0" * 16}}))
    with pytest.raises(ValueError, match=f"other weights under the same settings.*the cached models here: {weights}"):
        replicate.main(argv)


def test_bad_learning_rate_settings_are_refused(replicate, capsys):
    replicate, _ = replicate
    for argv, message in (
        (["--learning_rates", "opd=fast"], "is not a number"),
        (["--learning_rates", "sgd=1e-3"], "METHOD=LR with METHOD one of"),
        (["--learning_rates", "opd=-1e-3"], "must be positive"),
        (["--lr_grid", "--learning_rates", "opd=1e-3"], "--lr_grid chooses the learning rates"),
        (["--text_prior", "1.5"], "--text_prior must be in (0, 1]"),
    ):
        with pytest.raises(SystemExit):
            replicate.parse_args(argv)
        assert message in capsys.readouterr().err
