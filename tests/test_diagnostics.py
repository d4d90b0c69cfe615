"""Tests of the visual-reliance diagnostics: scoring against a float64 full-logit reference, concentration curves,
heatmap files, and the callback inside a real VAOPDTrainer run."""

import copy
import html
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import image_question_dataset, make_args, noise_image
from datasets import Dataset
from PIL import Image
from transformers import TrainerCallback

from trl_vaopd import VAOPDConfig, VAOPDTrainer
from trl_vaopd.diagnostics import (
    ACCURACY_KEY,
    RESPONSE_LENGTH_KEY,
    STUDENT_RELIANCE_KEY,
    TEACHER_VA_KEY,
    TokenVA,
    VisualRelianceCallback,
    plot_va_concentration,
    score_many,
    score_visual_advantage,
    va_concentration,
    va_concentration_curve,
    va_heatmap_html,
    va_heatmap_png,
)
from trl_vaopd.evaluation import answers_match, extract_answer
from trl_vaopd.objective import va_mass_share
from trl_vaopd.tiny_models import build_model
from trl_vaopd.views import blur, pixelate


RESPONSE = "The number shown in the picture is seven, so the answer is 7."
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def reference_logprobs(model, processor, images, prompt, response, temperature=1.0):
    """Log-probs of `response` + EOS after the chat-formatted prompt: one unpadded sequence, full logits, float64."""
    content = [{"type": "image", "image": image} for image in images] + [{"type": "text", "text": prompt}]
    inputs = processor.apply_chat_template(
        [{"role": "user", "content": content}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    tokenizer = processor.tokenizer
    response_ids = torch.tensor(
        [tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]]
    )
    prompt_len, n = inputs["input_ids"].size(1), response_ids.size(1)
    ids = torch.cat([inputs["input_ids"], response_ids], dim=1)
    extra = {
        k: v.double() if v.is_floating_point() else v
        for k, v in inputs.items()
        if k not in ("input_ids", "attention_mask")
    }
    if "mm_token_type_ids" in extra:
        extra["mm_token_type_ids"] = torch.cat([extra["mm_token_type_ids"], torch.zeros_like(response_ids)], dim=1)
    with torch.no_grad():
        logits = copy.deepcopy(model).double()(input_ids=ids, attention_mask=torch.ones_like(ids), **extra).logits
    logp = torch.log_softmax(logits[0, prompt_len - 1 : prompt_len - 1 + n] / temperature, dim=-1)
    return response_ids[0], logp.gather(-1, response_ids[0].unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize(
    "family,view,temperature",
    [
        ("qwen3_vl", "pixelate", 1.0),
        ("qwen3_vl", "drop", 1.0),
        ("qwen3_vl", "blur", 2.0),
        ("qwen2_5_vl", "pixelate", 1.0),
        ("llava", "pixelate", 1.0),
    ],
)
def test_score_matches_float64_full_logits(processors, family, view, temperature):
    processor = processors[family]
    model = build_model(family, processor, "teacher", seed=1)
    image, prompt = noise_image(3), "What number is shown?"
    result = score_visual_advantage(model, processor, image, prompt, RESPONSE, view=view, temperature=temperature)

    ids, logp_original = reference_logprobs(model, processor, [image], prompt, RESPONSE, temperature)
    counterfactual_images = {"pixelate": [pixelate(image, 0.1)], "drop": [], "blur": [blur(image)]}[view]
    _, logp_counterfactual = reference_logprobs(model, processor, counterfactual_images, prompt, RESPONSE, temperature)
    expected_va = (logp_original - logp_counterfactual).clamp(min=0)

    assert torch.equal(result.token_ids, ids)
    assert "".join(result.tokens) == RESPONSE + processor.tokenizer.eos_token
    torch.testing.assert_close(result.logp_original.double(), logp_original, atol=2e-5, rtol=0)
    torch.testing.assert_close(result.logp_counterfactual.double(), logp_counterfactual, atol=2e-5, rtol=0)
    torch.testing.assert_close(result.va.double(), expected_va, atol=2e-5, rtol=0)
    assert expected_va.max() > 1e-3, "the reference should see some visual advantage"
    assert result.mean_va == pytest.approx(expected_va.mean().item(), abs=2e-5)


def test_score_many_batches_like_single_rows(processors):
    processor = processors["qwen3_vl"]
    model = build_model("qwen3_vl", processor, "teacher", seed=1)
    dataset_row = {**image_question_dataset(1)[0], "response": "Seven."}  # conversational prompt, `images` column
    sampled_ids = processor.tokenizer("The answer is 12", add_special_tokens=False)["input_ids"]  # no EOS: truncated
    rows = [
        (noise_image(5), "How many dots are there?", RESPONSE),
        dataset_row,
        ([noise_image(6)], "Count the objects in the picture and write the total.", sampled_ids),
    ]
    model.train()  # a model handed over mid-training: scored in eval mode, then given back in train mode
    batched = score_many(model, processor, rows, batch_size=2)
    assert model.training
    singles = [score_many(model, processor, [row])[0] for row in rows]
    for together, alone in zip(batched, singles, strict=True):
        assert together.tokens == alone.tokens
        for field in ("logp_original", "logp_counterfactual", "va"):
            torch.testing.assert_close(getattr(together, field), getattr(alone, field), atol=1e-5, rtol=0)
        assert not together.va.requires_grad
    # Token ids are scored as given; strings get the EOS of a finished response
    assert batched[2].token_ids.tolist() == sampled_ids
    assert batched[1].tokens[-1] == processor.tokenizer.eos_token
    # An image inside the prompt would survive the counterfactual view: refused
    embedded = [
        {"role": "user", "content": [{"type": "image", "image": noise_image(0)}, {"type": "text", "text": "?"}]}
    ]
    with pytest.raises(ValueError, match="holds an image of its own"):
        score_many(model, processor, [(None, embedded, "Seven.")])


def test_concentration_curve_and_number():
    va = torch.from_numpy(np.random.default_rng(0).pareto(1.5, 500))
    fractions, shares = va_concentration_curve(va)
    assert fractions[0] == 0 and shares[0] == 0
    assert fractions[-1] == 1 and shares[-1] == pytest.approx(1.0)
    assert np.all(np.diff(shares) >= 0)
    assert va_concentration(va, 0.1) == va_mass_share(va, torch.ones_like(va), 0.1)
    assert np.interp(0.1, fractions, shares) == pytest.approx(va_concentration(va, 0.1))

    # One token of ten holds 90% of the mass; a list of TokenVA pools its responses' tokens
    def token_va(values):
        values = torch.tensor(values, dtype=torch.float32)
        return TokenVA([f"t{i}" for i in range(len(values))], torch.arange(len(values)), values, values * 0, values)

    results = [token_va([9.0, 0.5, 0.5]), token_va([0.0] * 7)]
    assert va_concentration(results, 0.1) == pytest.approx(0.9)
    _, pooled = va_concentration_curve(torch.tensor([9.0, 0.5, 0.5] + [0.0] * 7), [0.1, 0.2, 0.5])
    _, from_results = va_concentration_curve(results, [0.1, 0.2, 0.5])
    np.testing.assert_allclose(from_results, pooled)
    np.testing.assert_allclose(pooled, [0.9, 0.95, 1.0])
    # Uniform VA gives the diagonal (up to the ceil of the token count); no mass gives zeros
    _, uniform = va_concentration_curve(torch.ones(100), [0.1, 0.5, 1.0])
    np.testing.assert_allclose(uniform, [0.1, 0.5, 1.0])
    assert va_concentration_curve(torch.zeros(10))[1].max() == 0


def _luminance(hex_colour):
    r, g, b = (int(hex_colour[i : i + 2], 16) / 255 for i in (1, 3, 5))
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def test_heatmaps(processors, tmp_path):
    processor = processors["qwen3_vl"]
    image, prompt = noise_image(0), "What number is shown?"
    response = "First, look at the image.\n" + RESPONSE + " The area is $x^2$ and $$y$$."  # LaTeX is shown as text
    results = {
        name: score_visual_advantage(
            build_model("qwen3_vl", processor, size, seed=seed), processor, image, prompt, response
        )
        for name, size, seed in (
            ("base student", "student", 0),
            ("OPD student", "student", 2),
            ("VA-OPD <student>", "teacher", 1),
        )
    }

    path = va_heatmap_png(results, tmp_path / "figures" / "heatmap.png", title="VA heatmap")
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as png:
        assert png.width > 600 and png.height > 300

    page = va_heatmap_html(results, title="VA heatmap")
    for name, result in results.items():
        assert html.escape(name) in page
        for token in result.tokens:
            assert html.escape(token) in page
    # Darker = higher VA, on one scale shared by every panel
    backgrounds = re.findall(r"<span title=\"VA [^\"]*\" style=\"background: (#[0-9a-f]{6})", page)
    values = torch.cat([r.va for r in results.values()]).tolist()
    assert len(backgrounds) == len(values)
    order = np.argsort(values, kind="stable")
    luminance = np.array([_luminance(backgrounds[i]) for i in order])
    assert np.all(np.diff(luminance) <= 1e-9)
    assert _luminance(backgrounds[int(np.argmax(values))]) < 0.3  # the top token sits at the dark end

    curve = plot_va_concentration({name: [r] for name, r in results.items()}, tmp_path / "concentration.png")
    assert curve.read_bytes()[:8] == PNG_MAGIC


class _ModeSpy(TrainerCallback):
    """Records the model's mode right after the VisualRelianceCallback ran in the same event."""

    def __init__(self):
        self.modes = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.modes.append(model.training)


def _train(processor, teacher, tmp_path, callbacks):
    student = build_model("qwen3_vl", processor, "student", seed=0)
    args = VAOPDConfig(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=8,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
    )
    trainer = VAOPDTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=_answer_dataset(),
        processing_class=processor,
        callbacks=callbacks,
    )
    trainer.train()
    return trainer


def _answer_dataset():
    return image_question_dataset(8).map(lambda row, i: {"answer": str(i)}, with_indices=True)


def _accuracy(rows, responses):
    correct = [answers_match(extract_answer(r), row["answer"]) for row, r in zip(rows, responses, strict=True)]
    return sum(correct) / len(correct)


def test_callback_in_real_training(processors, tmp_path):
    processor = processors["qwen3_vl"]
    probe = Dataset.from_list([_answer_dataset()[i] for i in range(3)])
    teacher = build_model("qwen3_vl", processor, "teacher", seed=1)
    callback = VisualRelianceCallback(
        processor, probe, teacher, every_n_steps=1, accuracy_fn=_accuracy, max_new_tokens=6
    )
    spy = _ModeSpy()
    trainer = _train(processor, teacher, tmp_path / "with", [callback, spy])

    assert [r["step"] for r in callback.trajectory] == [0, 1, 2]
    logged = [entry for entry in trainer.state.log_history if STUDENT_RELIANCE_KEY in entry]
    assert logged == callback.trajectory
    for record in callback.trajectory:
        assert record[STUDENT_RELIANCE_KEY] >= 0 and math.isfinite(record[STUDENT_RELIANCE_KEY])
        assert record[TEACHER_VA_KEY] > 0
        assert 0 <= record[ACCURACY_KEY] <= 1
        assert 1 <= record[RESPONSE_LENGTH_KEY] <= 6
    assert spy.modes == [True, True], "the callback must give the student back in train mode"
    # The trainer's own metrics are still logged alongside
    assert sum("va/mean" in entry for entry in trainer.state.log_history) == 2

    # A measurement is reproducible: the same seed on the untrained student gives the step-0 record
    fresh = VisualRelianceCallback(processor, probe, teacher, accuracy_fn=_accuracy, max_new_tokens=6)
    again = fresh.measure(build_model("qwen3_vl", processor, "student", seed=0), step=0)
    for key in (STUDENT_RELIANCE_KEY, TEACHER_VA_KEY, RESPONSE_LENGTH_KEY):
        assert again[key] == pytest.approx(callback.trajectory[0][key], abs=1e-6)

    # Training is the same with or without the callback: its sampling leaves the training RNG untouched
    baseline = _train(processor, teacher, tmp_path / "without", [])
    for (name, p), q in zip(trainer.model.named_parameters(), baseline.model.parameters(), strict=True):
        assert torch.equal(p, q), name
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses == [e["loss"] for e in baseline.state.log_history if "loss" in e]

    path = callback.plot_trajectory(tmp_path / "trajectory.png")
    assert path.read_bytes()[:8] == PNG_MAGIC


def _tensorboard_scalars(directory) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files under `directory`: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, list[tuple[int, float]]] = {}
    for events in Path(directory).rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in accumulator.Scalars(tag))
    return scalars


@pytest.mark.parametrize("method", [["va_opd"], ["va_opd", "vgs"]])
def test_every_metric_reaches_a_tracker_at_its_step(processors, tmp_path, monkeypatch, method):
    """A real backend that writes locally (TensorBoard): the callback's measurements and the trainer's VA (and VGS)
    metrics are in its event files, at the steps they belong to."""
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))  # where transformers' TensorBoard writes
    processor = processors["qwen3_vl"]
    probe = Dataset.from_list([_answer_dataset()[i] for i in range(2)])
    teacher = build_model("qwen3_vl", processor, "teacher", seed=1)
    callback = VisualRelianceCallback(
        processor, probe, teacher, every_n_steps=2, accuracy_fn=_accuracy, max_new_tokens=4
    )
    trainer = VAOPDTrainer(
        model=build_model("qwen3_vl", processor, "student", seed=0),
        teacher_model=teacher,
        args=make_args(
            tmp_path,
            method=method,
            max_steps=3,
            learning_rate=1e-3,
            report_to=["tensorboard"],
            per_device_train_batch_size=4,
            gradient_accumulation_steps=2,
        ),
        train_dataset=_answer_dataset(),
        processing_class=processor,
    )
    trainer.add_callback(callback)  # bound to the trainer when added, as when passed to the constructor
    trainer.train()
    scalars = _tensorboard_scalars(tmp_path / "tb")
    for key in (STUDENT_RELIANCE_KEY, TEACHER_VA_KEY, ACCURACY_KEY, RESPONSE_LENGTH_KEY):
        steps = [step for step, _ in scalars[f"train/{key}"]]
        assert steps == [0, 2], key  # before training and every 2 steps
        measured = {r["step"]: r[key] for r in callback.trajectory}
        assert all(value == pytest.approx(measured[step]) for step, value in scalars[f"train/{key}"])
    metrics = ["va/mean", "va/top10_share", "va/high_group_share", "weights/max", "kl/high", "kl/low", "loss"]
    if "vgs" in method:
        metrics += ["vgs/standard", "vgs/visual", "vgs/language", "vgs/lp_share", "vgs/vds"]
        metrics += ["vgs/target_shift", "vgs/target_flip_share"]  # VGS's failure mode, visible
    logged = {e["step"]: e for e in trainer.state.log_history if "loss" in e}
    for key in metrics:
        assert [step for step, _ in scalars[f"train/{key}"]] == [1, 2, 3], key
        assert all(value == pytest.approx(logged[step][key]) for step, value in scalars[f"train/{key}"]), key
