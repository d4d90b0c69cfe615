"""One real training step of `VAOPDTrainer` on the tiny models, and its check against the float64 reference."""

import pytest
import torch
from conftest import image_question_dataset, make_args
from reference import reference, rollouts_of

from trl_vaopd import VAOPDTrainer
from trl_vaopd.tiny_models import build_model


def count_rows(model, counts: list[int]) -> None:
    """Append the rows of every training-style forward (no KV cache) of `model`'s backbone to `counts`."""

    def hook(module, args, kwargs):
        if kwargs.get("use_cache") is False:
            counts.append(kwargs["input_ids"].size(0))

    model.base_model.register_forward_pre_hook(hook, with_kwargs=True)


def run_one_step(processors, tmp_path, family="qwen3_vl", dataset=None, **overrides):
    """One real `train()` step on the tiny pair of `family`: the trainer, the update of every parameter, and the rows
    the teacher's and the student's backbones processed outside generation."""
    processor = processors[family]
    student = build_model(family, processor, "student", seed=0)
    teacher = build_model(family, processor, "teacher", seed=1)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    teacher_rows, student_rows = [], []
    count_rows(teacher, teacher_rows)
    count_rows(student, student_rows)
    trainer = VAOPDTrainer(
        model=student,
        teacher_model=teacher,
        args=make_args(tmp_path, **overrides),
        train_dataset=image_question_dataset(8) if dataset is None else dataset,
        processing_class=processor,
    )
    trainer.train()
    delta = {n: p.detach() - before[n] for n, p in trainer.model.named_parameters()}
    # Copies: later reference forwards must not count
    return trainer, delta, list(teacher_rows), list(student_rows)


def cat(batches, key):
    return torch.cat([b[key] for b in batches])


def assert_update_is_minus_gradient(delta, student):
    # Per module, relative L2 error: an element-wise test would measure float32 rounding of `p_after - p_before`
    errors, norms = {}, {}
    for name, p in student.named_parameters():
        ref = p.grad.float() if p.grad is not None else torch.zeros_like(p, dtype=torch.float32)
        module = "vision" if ".visual." in name or "vision" in name else "language"
        errors[module] = errors.get(module, 0.0) + (delta[name] + ref).square().sum().item()
        norms[module] = norms.get(module, 0.0) + ref.square().sum().item()
    for module in errors:
        assert norms[module] > 0, f"no gradient reaches the {module} parameters"
        assert (errors[module] / norms[module]) ** 0.5 < 1e-3, (module, errors[module], norms[module])


def check_step_against_reference(processors, tmp_path, cues=None, **overrides):
    """One real `train()` step on the tiny Qwen3-VL pair: its update is minus the gradient of the float64 objective of
    the whole generation batch, and the per-token quantities it scored equal the reference's. With `cues` (picture ->
    cue) the dataset carries them and the reference's teacher reads them."""
    dataset = None if cues is None else image_question_dataset(8).add_column("cue", [cues[i] for i in range(8)])
    trainer, delta, teacher_rows, student_rows = run_one_step(processors, tmp_path, dataset=dataset, **overrides)
    processor = processors["qwen3_vl"]
    micro = trainer._buffered_inputs
    rows = rollouts_of(micro, processor.tokenizer)
    student = build_model("qwen3_vl", processor, "student", seed=0)
    teacher = build_model("qwen3_vl", processor, "teacher", seed=1)
    ref = reference(rows, student, teacher, processor, trainer.args, cues)
    ref["loss"].backward()
    assert_update_is_minus_gradient(delta, student)
    assert trainer.state.log_history[0]["loss"] == pytest.approx(ref["loss"].item(), rel=1e-4)
    width = ref["mask"].size(1)
    torch.testing.assert_close(
        cat(micro, "vaopd_coefficients")[:, :width].double(), ref["coefficients"], rtol=1e-4, atol=1e-7
    )
    if trainer.args.vgs:
        assert torch.equal(cat(micro, "vgs_lp_mask")[:, :width], ref["lp"])
        torch.testing.assert_close(cat(micro, "vgs_gamma")[:, :width].double(), ref["gamma"])
    return trainer, ref, teacher_rows, student_rows
