"""benchmarks/gpu_check.py end to end on CPU with tiny shapes (`--device cpu --tiny`), so the GPU check cannot rot:
every run trains, the report holds its ratios, and the teacher's passes per rollout follow the method table."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
# Teacher passes per rollout (full passes or cache continuations), and whether each sibling group's prompt is shared
TEACHER_PASSES = {
    "trl_opd": (1, False),
    "opd": (1, True),
    "va_opd": (2, True),
    "vgs": (2, True),
    "va_opd+vgs": (2, True),
    "vicur": (1, True),
    "va_opd+vicur": (2, True),
    "va_opd_unshared": (2, False),
}
K = 4


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "gpu_check.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(out.read_text()), proc.stdout


def test_every_run_trains_and_is_compared_with_trl_opd(report):
    data, stdout = report
    assert data["checks"] == {"prefix_sharing_equal": True, "losses_finite": True}
    runs = {r["run"]: r for r in data["runs"]}
    assert list(runs) == list(TEACHER_PASSES)
    budget = data["options"]["budget"]
    for name, run in runs.items():
        assert len(run["step_s"]) == budget["warmup"] + budget["steps"] and run["median_step_s"] > 0
        assert len(run["losses"]) == budget["warmup"] + budget["steps"]
        passes, shared = TEACHER_PASSES[name]
        assert run["teacher_rollout_rows_per_rollout"] == passes
        # A shared prompt runs once per pass and group, or once per part of a group that the scoring splits
        prompts = run["teacher_prompt_rows_per_rollout"]
        assert passes / K <= prompts <= passes / 2 if shared else prompts == 0
        assert data["ratios_to_trl_opd"][name]["step_time_ratio"] == pytest.approx(
            run["median_step_s"] / runs["trl_opd"]["median_step_s"]
        )
        assert f"{name}/trl_opd: step time" in stdout


def test_prefix_sharing_is_checked_on_both_models(report):
    data, _ = report
    prefix = data["prefix_sharing"]
    assert prefix["tolerance"] == 1e-4  # float32 on CPU
    for name in ("teacher", "student"):
        assert prefix[name]["relative_error"] <= 1e-4
        assert prefix[name]["groups"] == 2 and prefix[name]["positions"] > 0
