"""benchmarks/cost_model.py: the composition of measured costs into a step is checked analytically (unit costs, so
every term is a count), and the script prints its full-depth table from a stored report without measuring."""

import json
import subprocess
import sys
from pathlib import Path

import pytest


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
cost_model = pytest.importorskip("cost_model")

P_TEXT, IMAGE_TOKENS, C, K, ROWS = 20, 16, 30, 4, 8


def unit_costs(**ones: float) -> dict:
    """A measured-costs dict with every cost 0 except those named, so a step counts what they count."""
    model = {f"layer_{mode}_{term}": 0.0 for mode in ("fwd", "fwd_bwd") for term in ("a", "b")}
    model |= {f"vision_{mode}_{part}": 0.0 for mode in ("fwd", "fwd_bwd") for part in ("block", "rest")}
    model |= {"call_fwd": 0.0, "call_fwd_bwd": 0.0}
    m = {
        "student": dict(model),
        "teacher": dict(model),
        "heads": {"divergence": 0.0, "teacher_logprob": 0.0, "vgs": 0.0, "student_head_fwd": 0.0},
        "module_per_row": 0.0,
        "view_per_image": {"128": 0.0},
        "sharing_per_pass": {"128": 0.0},
    }
    for key, value in ones.items():
        for part in ("student", "teacher", "heads"):
            if key in m[part]:
                m[part][key] = value
        if key in ("view_per_image", "sharing_per_pass"):
            m[key]["128"] = value
    return m


def scenario() -> dict:
    s = cost_model.scenario(P_TEXT, 128, C, K, 128)
    s["image_tokens"] = IMAGE_TOKENS
    return {**s, "student_layers": 1, "teacher_layers": 1, "student_vision_depth": 1, "teacher_vision_depth": 1}


@pytest.mark.parametrize("shared", [False, True])
def test_positions_per_rollout_follow_the_method_table(shared):
    """With one unit per token of a teacher layer, the teacher's cost is its positions: `P + C` per pass unshared,
    `P / K + C` shared; VA-OPD runs two passes, the drop view leaves out the image and its two markers."""
    m, s = unit_costs(layer_fwd_a=1.0), {**scenario(), "rows": ROWS}
    p = P_TEXT + IMAGE_TOKENS
    per_pass = (p / K + C) if shared else (p + C)
    assert cost_model.step("trl_opd", m, s, shared)["teacher"] == pytest.approx(p + C)
    assert cost_model.step("opd", m, s, shared)["teacher"] == pytest.approx(per_pass)
    assert cost_model.step("va_opd", m, s, shared)["teacher"] == pytest.approx(2 * per_pass)
    dropped = ((p - IMAGE_TOKENS - 2) / K + C) if shared else (p - IMAGE_TOKENS - 2 + C)
    assert cost_model.step("vgs_drop", m, s, shared)["teacher"] == pytest.approx(per_pass + dropped)


def test_calls_sharing_work_and_views_are_counted_per_rollout():
    """A pass is one backbone call per micro-batch of `rows` rollouts, a shared pass two plus its sharing work; the
    pixelate view is prepared once per rollout, the drop view not at all."""
    s = {**scenario(), "rows": ROWS}
    calls = unit_costs(call_fwd=1.0, call_fwd_bwd=10.0)
    assert cost_model.step("trl_opd", calls, s, True)["teacher"] == pytest.approx(1 / ROWS)  # TRL never shares
    assert cost_model.step("va_opd", calls, s, False)["teacher"] == pytest.approx(2 / ROWS)
    assert cost_model.step("va_opd", calls, s, True)["teacher"] == pytest.approx(4 / ROWS)
    assert cost_model.step("vgs", calls, s, True)["student"] == pytest.approx(2 * 2 * 10 / ROWS)
    sharing = unit_costs(sharing_per_pass=1.0)
    assert cost_model.step("va_opd", sharing, s, False)["teacher"] == 0
    assert cost_model.step("va_opd", sharing, s, True)["teacher"] == pytest.approx(2 / ROWS)
    views = unit_costs(view_per_image=1.0)
    assert cost_model.step("va_opd", views, s, True)["teacher"] == pytest.approx(1.0)
    assert cost_model.step("vgs_drop", views, s, True)["teacher"] == 0
    assert cost_model.step("opd", views, s, True)["teacher"] == 0


def test_prints_the_full_depth_table_from_a_stored_report(tmp_path):
    """`--reuse` composes the stored measurements without measuring: every method at every shape, TRL's OPD unshared
    at exactly 1, and sharing never dearer than not sharing."""
    out = tmp_path / "cost_model.json"
    stored = BENCHMARKS / "results" / "cost_model.json"
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "cost_model.py"), "--reuse", str(stored), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    table = json.loads(out.read_text())["full_depth"]["table"]
    assert len(table) == 2 * 3 * len(cost_model.METHODS)
    for row in table:
        assert f"| {row['method']} | {row['step_ratio_shared']:.3f} |" in proc.stdout
        assert row["step_ratio_shared"] <= row["step_ratio_unshared"]
        if row["method"] == "opd":
            assert row["step_ratio_unshared"] == pytest.approx(1.0)
