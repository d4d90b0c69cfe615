"""Smoke test of benchmarks/bench_vaopd.py on its tiny budget: the report's schema and the counted forwards.

Timings are not checked (they depend on the machine); the counts are exact, whatever the micro-batch /
gradient-accumulation layout: the teacher backbone processes one row per rollout in TRL's DistillationTrainer and
under standard OPD, two with VA-OPD and VGS (original and counterfactual view); the student backbone (outside
generation) one row per rollout, two with VGS.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest


SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_vaopd.py"
EXPECTED = {"trl_opd": 1, "vaopd_off": 1, "vaopd": 2, "vgs": 2, "vaopd_vgs": 2, "vicur": 1, "vgs_grpo": 2}
EXPECTED_STUDENT = {"trl_opd": 1, "vaopd_off": 1, "vaopd": 1, "vgs": 2, "vaopd_vgs": 2, "vicur": 1, "vgs_grpo": 2}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads((out / "results.json").read_text()), proc.stdout, out


def test_headline_ratios_are_printed_last(quick_run):
    report, stdout, _ = quick_run
    lines = stdout.strip().splitlines()
    for i, trainer in enumerate(("vgs", "vaopd_vgs", "vicur", "vgs_grpo")):
        step, peak = lines[-10 + 2 * i], lines[-9 + 2 * i]
        ratios = report["analysis"]["method_ratios"][trainer]
        assert step == f"step_time_ratio {trainer}/opd = {ratios['step_time_ratio']:.2f}"
        assert peak == f"peak_memory_ratio {trainer}/opd = {ratios['peak_memory_ratio']:.2f}"
    last = lines[-2:]
    assert re.fullmatch(r"step_time_ratio vaopd/opd = \d+\.\d\d", last[0]), last
    assert re.fullmatch(r"peak_memory_ratio vaopd/opd = \d+\.\d\d", last[1]), last
    assert float(last[0].split("= ")[1]) == pytest.approx(report["analysis"]["step_time_ratio"], abs=0.006)
    assert float(last[1].split("= ")[1]) == pytest.approx(report["analysis"]["peak_memory_ratio"], abs=0.006)


def test_report_schema(quick_run):
    report, _, out = quick_run
    assert (out / "results.md").read_text().startswith("# VA-OPD and VGS vs OPD")
    assert {"machine", "options", "results", "analysis", "total_wall_s"} <= report.keys()
    assert {"cpu", "logical_cpus", "torch", "transformers", "trl"} <= report["machine"].keys()
    analysis = report["analysis"]
    for key in ("step_time_ratio", "floor_ratio", "floor_gap", "peak_memory_ratio", "added_memory_ratio"):
        assert isinstance(analysis[key], float) and analysis[key] == analysis[key], key  # a number, not NaN
    assert {
        "teacher_forwards_exact",
        "student_forwards_exact",
        "completion_lengths_forced",
        "step_time_ratio_le_1.15",
        "step_time_within_5pct_of_floor",
        "peak_memory_ratio_le_1.05",
        "peak_memory_flat_in_vocab",
    } <= analysis["targets"].keys()

    base = {r["trainer"]: r for r in report["results"] if r["tag"] == "base"}
    assert base.keys() == set(EXPECTED)
    for result in report["results"]:
        for clock in ("wall", "cpu"):
            timing = result["timing"][clock]
            assert timing["median_step_s"] > 0
            assert set(timing["groups_s"]) == {"generation", "teacher", "student", "objective", "optimizer", "other"}
            assert len(timing["step_s"]) == result["config"]["measured_steps"] * result["config"]["repetitions"]
        memory = result["memory"]
        assert memory["memory_peak_bytes"] >= memory["memory_before_train_bytes"] > 0
        assert memory["student_param_bytes"] > 0 and memory["teacher_param_bytes"] > memory["student_param_bytes"]
        assert memory["training_state_bytes"] == 3 * memory["student_param_bytes"]  # fp32 grads + two AdamW moments
    # VAOPDTrainer keeps the teacher's hidden states of the whole generation batch, VGS those of both views
    config = base["vaopd"]["config"]
    hidden_bytes = config["rollouts_per_step"] * config["completion_length"] * config["teacher"]["hidden"] * 4
    assert base["vaopd"]["memory"]["teacher_cache_bytes"] == hidden_bytes
    assert base["vaopd_vgs"]["memory"]["teacher_cache_bytes"] == 2 * hidden_bytes
    assert base["trl_opd"]["memory"]["teacher_cache_bytes"] == 0


def test_forwards_are_counted_exactly_for_every_layout(quick_run):
    report, _, _ = quick_run
    layouts = {"trl_opd": set(), "vaopd": set(), "vaopd_vgs": set()}
    for result in report["results"]:
        config = result["config"]
        # Exact integers: rows the teacher backbone processed vs rollouts generated, over every step of the run
        assert result["teacher_rows"] == EXPECTED[result["trainer"]] * result["rollouts"], result["tag"]
        assert result["rollouts"] > 0
        assert result["teacher_forwards_per_rollout"] == EXPECTED[result["trainer"]]
        assert result["student_rows"] == EXPECTED_STUDENT[result["trainer"]] * result["rollouts"], result["tag"]
        # Every rollout has exactly the forced length, in all three trainers
        assert result["completion_lengths_seen"] == [config["completion_length"]]
        if result["trainer"] in layouts:
            layouts[result["trainer"]].add(
                (config["per_device_train_batch_size"], config["gradient_accumulation_steps"])
            )
    # Several micro-batch x accumulation layouts, one of them with micro-batches smaller than a sibling group
    for trainer, seen in layouts.items():
        assert len(seen) >= 3, (trainer, seen)
        assert any(per_device < report["results"][0]["config"]["k"] for per_device, _ in seen), seen
    assert report["analysis"]["targets"]["teacher_forwards_exact"] is True
    assert report["analysis"]["targets"]["student_forwards_exact"] is True


def test_token_positions_show_the_shared_prompts(quick_run):
    report, _, _ = quick_run
    base = {r["trainer"]: r for r in report["results"] if r["tag"] == "base"}
    prompt, length = base["trl_opd"]["prompt_tokens_per_rollout"], base["trl_opd"]["config"]["completion_length"]
    assert prompt > 0 and base["vaopd"]["prompt_tokens_per_rollout"] == prompt  # the same prompts everywhere
    # TRL's trainer runs prompt + completion once per rollout in each model
    assert base["trl_opd"]["teacher_positions_per_rollout"] == base["trl_opd"]["student_positions_per_rollout"]
    assert base["trl_opd"]["teacher_positions_per_rollout"] == prompt + length
    # VAOPDTrainer runs each group's prompt once per call: 2 views, fewer than 2 (P + C); the student under P + C
    assert base["vaopd"]["teacher_prompt_rows"] > 0 and base["vaopd"]["student_prompt_rows"] > 0
    assert length * 2 < base["vaopd"]["teacher_positions_per_rollout"] < 2 * (prompt + length)
    assert length < base["vaopd"]["student_positions_per_rollout"] < prompt + length
    assert report["analysis"]["targets"]["completion_lengths_forced"] is True
