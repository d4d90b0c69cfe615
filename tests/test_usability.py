"""What a newcomer meets first: the example's `--help`, the README's offline and saving snippets run as written, a
saved student reloaded from another directory, the device and precision chosen from the hardware, "did you mean"
hints, and no deprecation warning from the package's own calls."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from conftest import image_question_dataset, make_args
from test_distributed import EXAMPLE, load_example, run
from transformers.testing_utils import CaptureLogger
from transformers.utils import is_torch_bf16_gpu_available
from transformers.utils import logging as hf_logging

from trl_vaopd import VAOPDConfig, VAOPDTrainer
from trl_vaopd.tiny_models import build_model, build_processor, build_tokenizer, save_tiny_vlm
from trl_vaopd.views import get_view


REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------------------- --help
def option_blocks(help_text: str) -> dict[str, str]:
    """Each option's entry in `--help`, by its first flag."""
    blocks, current = {}, None
    for line in help_text.splitlines():
        match = re.match(r"^  (--\w+)", line)
        if match:
            current = match.group(1)
            blocks[current] = line
        elif current and line.startswith("    "):
            blocks[current] += " " + line.strip()
        else:
            current = None
    return blocks


def test_help_runs_and_lists_the_package_options_first():
    help_text = run([sys.executable, EXAMPLE, "--help"])
    # The groups in order: the package's settings first, TRL's and transformers' training arguments last
    titles = [line for line in help_text.splitlines() if re.match(r"^\S.*:$", line)]
    assert titles == [
        "options:",
        "VAOPDConfig: the method and its settings (trl_vaopd):",
        "ScriptArguments: data and run mode (this script):",
        "ModelConfig: student, teacher, LoRA and quantization (trl):",
        "DistillationConfig / TrainingArguments: training (trl, transformers):",
    ]
    package = help_text[help_text.index("VAOPDConfig: the method") : help_text.index("ScriptArguments: data")]
    example = load_example()
    own = example.vaopd_fields()
    flags = own | {f"no_{f.name}" for f in fields(VAOPDConfig) if f.name in own and f.default is True}
    assert set(re.findall(r"^  --(\w+)", package, re.MULTILINE)) == flags
    blocks = option_blocks(help_text)
    assert len(blocks) > 200
    for block in blocks.values():
        assert block.count("(default:") <= 1, block  # each default shown once
    assert blocks["--cue_recovery_interval"].endswith("multiple of this. (default: 5)")
    assert blocks["--rollout_weighting"].endswith("None: the method's preset. (default: None)")
    assert blocks["--no_prefix_sharing"].endswith("Same as --prefix_sharing false.")


# ----------------------------------------------------------------------------------------------------- did you mean
@pytest.mark.parametrize(
    "build, message",
    [
        (lambda tmp: VAOPDConfig(output_dir=tmp, method="vaopd"), r"got \['vaopd'\]\. Did you mean 'va_opd'\?"),
        (lambda tmp: VAOPDConfig(output_dir=tmp, method=["va_opd", "VGS"]), r"Did you mean 'vgs'\?"),
        (lambda tmp: VAOPDConfig(output_dir=tmp, counterfactual_view="pixellate"), r"Did you mean 'pixelate'\?"),
        (
            lambda tmp: VAOPDConfig(output_dir=tmp, visual_advantage="Teacher-View-KL"),
            r"Did you mean 'teacher_view_kl'\?",
        ),
        (lambda tmp: get_view("blurr"), r"Unknown counterfactual_view 'blurr'\. Did you mean 'blur'\?"),
        (lambda tmp: build_processor("qwen3vl", build_tokenizer()), r"Did you mean 'qwen3_vl'\?"),
        (lambda tmp: save_tiny_vlm(tmp, family="qwen2.5_vl"), r"Did you mean 'qwen2_5_vl'\?"),
    ],
)
def test_mistyped_names_get_a_suggestion(tmp_path, build, message):
    with pytest.raises(ValueError, match=message):
        build(str(tmp_path))


def test_names_far_from_every_choice_get_no_suggestion(tmp_path):
    with pytest.raises(ValueError) as error:
        VAOPDConfig(output_dir=str(tmp_path), method="grpo")
    assert "Did you mean" not in str(error.value)


# ------------------------------------------------------------------------------------------ device and precision
def test_unset_device_and_precision_follow_the_hardware(tmp_path):
    logger = hf_logging.get_logger("trl_vaopd.config")
    hf_logging.warning_once.cache_clear()
    with CaptureLogger(logger) as captured:
        args = VAOPDConfig(output_dir=str(tmp_path))
        VAOPDConfig(output_dir=str(tmp_path))
    if torch.accelerator.is_available():
        assert not args.use_cpu and args.bf16 == is_torch_bf16_gpu_available()
    else:
        assert args.use_cpu and args.bf16 is False and args.device.type == "cpu"
    if not args.bf16:
        assert captured.out.count("training in float32") == 1  # said once
    # What the user sets is kept
    assert VAOPDConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False).bf16 is False
    assert VAOPDConfig(output_dir=str(tmp_path), use_cpu=True, bf16=True).bf16 is True


# ------------------------------------------------------------------------------------------------------ warnings
def test_a_training_step_raises_no_deprecation_from_the_package(tmp_path, processors):
    processor = processors["qwen3_vl"]
    student = build_model("qwen3_vl", processor, "student", seed=0)
    teacher = build_model("qwen3_vl", processor, "teacher", seed=1)
    generic = hf_logging.get_logger("transformers.utils.generic")
    hf_logging.warning_once.cache_clear()
    with warnings.catch_warnings(record=True) as caught, CaptureLogger(generic) as logged:
        warnings.simplefilter("always")
        trainer = VAOPDTrainer(
            model=student,
            teacher_model=teacher,
            args=make_args(tmp_path),
            train_dataset=image_question_dataset(),
            processing_class=processor,
        )
        trainer.train()
    # Both models ran their passes on shared prompts, whose continuation passes the cache
    assert {("teacher", None), ("student", None)} <= trainer._announced_paths
    future = {str(w.message) for w in caught if issubclass(w.category, FutureWarning)}
    # Deprecations TRL triggers in transformers 5.25 (its config's `gradient_checkpointing` default, its
    # `unwrap_model_for_generation`), not the package's calls
    trl_own = ("`gradient_checkpointing` is deprecated", "`is_gradient_checkpointing` is deprecated")
    assert {m for m in future if not m.startswith(trl_own)} == set()
    assert "past_key_values" not in logged.out


# ---------------------------------------------------------------------------------------------- saving and loading
def test_a_saved_lora_student_reloads_from_another_directory(tmp_path, monkeypatch):
    from peft import LoraConfig, PeftConfig, PeftModel
    from transformers import AutoModelForImageTextToText

    monkeypatch.chdir(tmp_path)
    save_tiny_vlm("models/student", size="student", seed=0)
    save_tiny_vlm("models/teacher", size="teacher", seed=1)
    trainer = VAOPDTrainer(
        model="models/student",  # relative, as a newcomer writes it
        teacher_model="models/teacher",
        args=make_args(Path("out")),
        train_dataset=image_question_dataset(),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    trainer.train()
    trainer.save_model()
    recorded = PeftConfig.from_pretrained("out").base_model_name_or_path
    assert recorded == str(tmp_path / "models" / "student")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    adapter = tmp_path / "out"
    base = AutoModelForImageTextToText.from_pretrained(PeftConfig.from_pretrained(adapter).base_model_name_or_path)
    reloaded = PeftModel.from_pretrained(base, adapter).eval()
    trained = trainer.model.eval()
    lora_b = [p for n, p in trained.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # the adapter trained away from its zero start
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, trained(input_ids=ids).logits)


def test_tiny_example_saves_the_student_and_summarises_with_no_logged_step(tmp_path, monkeypatch, capsys):
    from transformers import AutoModelForImageTextToText

    monkeypatch.chdir(tmp_path)
    example = load_example()
    argv = ["--tiny", "--max_steps", "1", "--logging_steps", "5", "--output_dir", "out"]
    trainer = example.main(*example.parse_args(argv))
    printed = capsys.readouterr().out
    assert "va_opd finished after 1 steps; no step was logged (logging_steps=5)." in printed
    assert "mean over the logged steps" not in printed
    assert f"The student is saved in {tmp_path / 'out'}." in printed
    saved = AutoModelForImageTextToText.from_pretrained(tmp_path / "out")
    for name, value in saved.state_dict().items():
        assert torch.equal(value, trainer.model.state_dict()[name]), name


# ---------------------------------------------------------------------------------------------------------- README
def readme_blocks(*sections: str) -> list[tuple[str, str]]:
    """The fenced (language, code) blocks of the README sections titled `sections`, in order."""
    blocks, section, fence = [], None, None
    for line in (REPO / "README.md").read_text().splitlines(keepends=True):
        if fence is not None:
            if line.startswith("```"):
                if section in sections:
                    blocks.append(fence)
                fence = None
            else:
                fence = (fence[0], fence[1] + line)
        elif line.startswith("```"):
            fence = (line[3:].strip(), "")
        elif line.startswith("#"):
            section = line.lstrip("#").strip()
    return [block for block in blocks if block[0] in ("python", "bash")]


def test_the_readme_offline_and_saving_snippets_run_as_written(tmp_path):
    """Every block of "Without the model hub" then "Saving and loading a student", in a scratch directory that has the
    repository's `examples/`; the loading block runs again from another directory, on the same relative paths made
    absolute."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "examples").symlink_to(REPO / "examples")
    blocks = readme_blocks("Without the model hub", "Saving and loading a student")
    assert [language for language, _ in blocks] == ["python", "bash", "python"]
    (_, train), (_, commands), (_, load) = blocks
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))

    def shell(command: str, cwd: Path) -> None:
        proc = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{command}\n{(proc.stdout + proc.stderr)[-4000:]}"

    shell(f"{sys.executable} - <<'EOF'\n{train}EOF", work)
    for command in commands.strip().splitlines():
        shell(command, work)
    check = "\nassert type(lora_student).__name__.startswith('PeftModel') and vicur_student.config.cue_recovery\n"
    shell(f"{sys.executable} - <<'EOF'\n{load}{check}EOF", work)
    # From another directory, the outputs named by their absolute paths: the adapters find their local bases
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shell(
        f"{sys.executable} - <<'EOF'\n{load.replace('trl_vaopd_outputs/', f'{work}/trl_vaopd_outputs/')}EOF", elsewhere
    )


def test_the_readme_diagnostics_snippet_runs_as_written(tmp_path):
    """ "Did the student learn to look?": the heatmap, a short training run with the callback, its trajectory plot."""
    blocks = readme_blocks("Did the student learn to look?")
    assert [language for language, _ in blocks] == ["python"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, "-c", blocks[0][1]], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "'visual_reliance/teacher_va'" in proc.stdout
    for figure in ("va_heatmap.png", "reliance.png"):
        assert (tmp_path / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", figure


# ---------------------------------------------------------------------------------------------------------- figures
def drawn_texts(fig) -> list:
    """`(text, extent)` of every non-empty text `fig` draws (tick labels outside the axes' range are not drawn)."""
    from unittest import mock

    from matplotlib.text import Text

    texts, draw = [], Text.draw

    def recorded(self, renderer):
        draw(self, renderer)
        if self.get_visible() and self.get_text().strip():
            texts.append((self.get_text(), self.get_window_extent(renderer)))

    with mock.patch.object(Text, "draw", recorded):
        fig.canvas.draw()
    return texts


def overlapping_texts(fig) -> list[tuple[str, str]]:
    """Pairs of drawn texts of `fig` whose extents overlap (by more than a pixel)."""
    texts = [(text, box.padded(-1)) for text, box in drawn_texts(fig)]
    return [(a, b) for i, (a, box) in enumerate(texts) for b, other in texts[i + 1 :] if box.overlaps(other)]


@pytest.fixture
def drawn(monkeypatch):
    """The figures the diagnostics save, kept for inspection."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    import trl_vaopd.diagnostics.figures as figures

    kept, save = [], figures.save_figure

    def keep(fig, path):
        FigureCanvasAgg(fig)
        kept.append(fig)
        return save(fig, path)

    for module in ("heatmaps", "reliance"):
        monkeypatch.setattr(f"trl_vaopd.diagnostics.{module}.save_figure", keep)
    return kept


@pytest.mark.parametrize("width_chars", [72, 40])
def test_heatmap_headers_never_overlap(tmp_path, drawn, width_chars):
    from trl_vaopd.diagnostics import va_heatmap_png
    from trl_vaopd.diagnostics.scoring import TokenVA

    tokens = [" The", " number", " shown", " is", " 4", "0", "."]
    va = torch.linspace(0, 0.01, len(tokens))
    result = TokenVA(tokens, torch.arange(len(tokens)), va, torch.zeros_like(va), va)
    names = ["base", "teacher VA (VA-OPD's weights)", "Qwen3-VL-2B after 200 VA-OPD steps"]
    va_heatmap_png(dict.fromkeys(names, result), tmp_path / "heatmap.png", title="title", width_chars=width_chars)
    (fig,) = drawn
    assert overlapping_texts(fig) == []
    # Nothing drawn outside the figure (the colour bar's label included)
    for text, box in drawn_texts(fig):
        assert box.x0 >= 0 and box.x1 <= fig.bbox.width, text


def test_reliance_trajectories_that_end_together_keep_their_labels_apart(tmp_path, drawn):
    from trl_vaopd.diagnostics import plot_reliance_trajectory

    def run(shift: float):
        return [
            {"step": s, "visual_reliance/student": 0.001 * s + shift, "visual_reliance/teacher_va": 0.01,
             "visual_reliance/accuracy": 0.0}
            for s in range(4)
        ]  # fmt: skip

    plot_reliance_trajectory({"standard OPD": run(0.0), "VA-OPD": run(1e-5)}, tmp_path / "reliance.png", title="t")
    (fig,) = drawn
    assert overlapping_texts(fig) == []
