"""End-to-end tests of VAOPDTrainer on tiny offline models: exactness, split invariance, budget, LoRA, resume."""

import re

import pytest
import torch
from conftest import image_question_dataset, make_args, noise_image

from trl_vaopd import VAOPDTrainer
from trl_vaopd.objective import rollout_weights, token_coefficients, uniform_rollout_weights, visual_advantage
from trl_vaopd.tiny_models import TINY_FAMILIES, build_model
from trl_vaopd.views import pixelate


def run_one_step(processors, tmp_path, family="qwen3_vl", **overrides):
    processor = processors[family]
    student = build_model(family, processor, "student", seed=0)
    teacher = build_model(family, processor, "teacher", seed=1)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    teacher_rows = []
    teacher.base_model.register_forward_pre_hook(
        lambda module, args, kwargs: teacher_rows.append(kwargs["input_ids"].size(0)), with_kwargs=True
    )
    trainer = VAOPDTrainer(
        model=student,
        teacher_model=teacher,
        args=make_args(tmp_path, **overrides),
        train_dataset=image_question_dataset(8),
        processing_class=processor,
    )
    trainer.train()
    delta = {n: p.detach() - before[n] for n, p in trainer.model.named_parameters()}
    return trainer, delta, list(teacher_rows)  # a copy: later reference forwards must not count


def _cat(batches, key):
    return torch.cat([b[key] for b in batches])


def reference_loss(processor, student, teacher, micro_batches, weighting=True, grouping=True):
    """METHOD.md's L on the whole generation batch, from full logits in float64, independent of the trainer's path."""
    tokenizer = processor.tokenizer
    prompt_ids, prompt_mask = _cat(micro_batches, "prompt_ids"), _cat(micro_batches, "prompt_mask")
    completion_ids, mask = _cat(micro_batches, "completion_ids"), _cat(micro_batches, "completion_mask")
    ids, attn = torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, mask], 1)
    mm = {k: _cat(micro_batches, k) for k in ("pixel_values", "image_grid_thw", "mm_token_type_ids")}
    prompts = [
        int(re.search(r"picture (\d+)", tokenizer.decode(p[m.bool()])).group(1))
        for p, m in zip(prompt_ids, prompt_mask, strict=True)
    ]
    cf_pixels = torch.cat(
        [
            processor.image_processor(images=[pixelate(noise_image(i))], return_tensors="pt")["pixel_values"]
            for i in prompts
        ]
    )
    start, end = prompt_ids.size(1) - 1, ids.size(1) - 1

    def logits(model, **override):
        return model(input_ids=ids, attention_mask=attn, **{**mm, **override}).logits[:, start:end].double()

    def token_logp(lg):
        return torch.log_softmax(lg, -1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)

    with torch.no_grad():
        teacher_logits = logits(teacher)
        va = visual_advantage(token_logp(teacher_logits), token_logp(logits(teacher, pixel_values=cf_pixels)), mask)
    mean_va = va.sum(1) / mask.sum(1).clamp(min=1)
    weights = rollout_weights(mean_va, prompts) if weighting else uniform_rollout_weights(prompts)
    coefficients = token_coefficients(va, mask, weights, group_tokens=grouping)
    log_ps = torch.log_softmax(logits(student), -1)
    log_pt = torch.log_softmax(teacher_logits, -1)
    kl = (log_ps.exp() * (log_ps - log_pt)).sum(-1)
    return (coefficients * kl * mask).sum() / len(set(prompts)), weights, coefficients


def _assert_grad_matches(processors, family, delta, loss_fn):
    student = build_model(family, processors[family], "student", seed=0)
    loss = loss_fn(student)
    loss.backward()
    # Per module, relative L2 error: an element-wise test would measure float32 rounding of `p_after - p_before`
    errors, norms = {}, {}
    for name, p in student.named_parameters():
        ref = p.grad.float() if p.grad is not None else torch.zeros_like(p)
        module = "vision" if ".visual." in name or "vision" in name else "language"
        errors[module] = errors.get(module, 0.0) + (delta[name] + ref).square().sum().item()
        norms[module] = norms.get(module, 0.0) + ref.square().sum().item()
    for module in errors:
        assert norms[module] > 0, f"no gradient reaches the {module} parameters"
        assert (errors[module] / norms[module]) ** 0.5 < 1e-3, (module, errors[module], norms[module])
    return loss


@pytest.mark.parametrize("per_device,accumulation", [(8, 1), (2, 4), (3, 1)])
def test_update_is_minus_gradient_of_method_loss_for_every_layout(processors, tmp_path, per_device, accumulation):
    if per_device == 3:
        # 3 x 1 does not hold whole sibling groups of 4: refused before any model is touched
        with pytest.raises(ValueError, match="whole groups of num_generations=4"):
            make_args(tmp_path, per_device_train_batch_size=3, gradient_accumulation_steps=accumulation)
        return
    trainer, delta, teacher_rows = run_one_step(
        processors, tmp_path, per_device_train_batch_size=per_device, gradient_accumulation_steps=accumulation
    )
    micro = trainer._buffered_inputs
    teacher = trainer.teacher_model
    loss = _assert_grad_matches(
        processors, "qwen3_vl", delta, lambda s: reference_loss(processors["qwen3_vl"], s, teacher, micro)[0]
    )
    assert trainer.state.log_history[0]["loss"] == pytest.approx(loss.item(), rel=1e-4)
    # Budget: the teacher scores each rollout under two views, and never again for the loss
    assert sum(teacher_rows) == 2 * 8
    coefficients = _cat(micro, "vaopd_coefficients")
    assert coefficients.sum().item() == pytest.approx(2.0, rel=1e-5)  # two prompts, each summing to one


def test_both_switches_off_is_standard_opd(processors, tmp_path):
    trainer, delta, _ = run_one_step(
        processors,
        tmp_path,
        rollout_weighting=False,
        token_grouping=False,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
    )
    micro, teacher = trainer._buffered_inputs, trainer.teacher_model
    _assert_grad_matches(
        processors,
        "qwen3_vl",
        delta,
        lambda s: reference_loss(processors["qwen3_vl"], s, teacher, micro, weighting=False, grouping=False)[0],
    )
    logs = trainer.state.log_history[0]
    assert logs["weights/max"] == logs["weights/min"] == pytest.approx(0.25)


def test_logs_va_metrics(processors, tmp_path):
    trainer, _, _ = run_one_step(processors, tmp_path)
    logs = trainer.state.log_history[0]
    for key in ("va/mean", "va/top10_share", "va/high_group_share", "kl/high", "kl/low", "weights/max", "weights/min"):
        assert key in logs, key
    assert logs["va/mean"] > 0
    assert 0.1 <= logs["va/top10_share"] <= 1.0
    assert 0.2 <= logs["va/high_group_share"] <= 1.0
    assert 0 < logs["weights/min"] <= 0.25 <= logs["weights/max"] < 1


@pytest.mark.parametrize("family", [f for f in TINY_FAMILIES if f != "qwen3_vl"])
def test_trains_on_other_families(processors, tmp_path, family):
    trainer, delta, teacher_rows = run_one_step(
        processors,
        tmp_path,
        family=family,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=1e-3,
    )
    logs = trainer.state.log_history[0]
    assert torch.isfinite(torch.tensor(logs["loss"])) and logs["loss"] > 0
    assert logs["va/mean"] > 0
    assert any(d.abs().max() > 0 for d in delta.values())
    assert sum(teacher_rows) == 2 * 8


@pytest.mark.parametrize("view", ["drop", "blank", "blur"])
def test_other_views_train(processors, tmp_path, view):
    trainer, _, teacher_rows = run_one_step(processors, tmp_path, counterfactual_view=view, learning_rate=1e-3)
    assert trainer.state.log_history[0]["va/mean"] > 0
    assert sum(teacher_rows) == 2 * 8


def test_size_changing_custom_view_is_refused(processors, tmp_path):
    processor = processors["qwen3_vl"]
    trainer = VAOPDTrainer(
        model=build_model("qwen3_vl", processor, "student"),
        teacher_model=build_model("qwen3_vl", processor, "teacher", seed=1),
        args=make_args(tmp_path),
        train_dataset=image_question_dataset(8),
        processing_class=processor,
        counterfactual_view=lambda image: image.resize((64, 64)),
    )
    with pytest.raises(ValueError, match="changed the image size"):
        trainer.train()


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_lora_student_trains_adapter_only_and_reloads(processors, tmp_path, family):
    from peft import LoraConfig, PeftModel

    processor = processors[family]
    trainer = VAOPDTrainer(
        model=build_model(family, processor, "student"),
        teacher_model=build_model(family, processor, "teacher", seed=1),
        args=make_args(
            tmp_path, learning_rate=1e-2, max_steps=2, per_device_train_batch_size=4, gradient_accumulation_steps=2
        ),
        train_dataset=image_question_dataset(8),
        processing_class=processor,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    trainer.save_model(str(tmp_path / "adapter"))
    reloaded = PeftModel.from_pretrained(build_model(family, processor, "student"), str(tmp_path / "adapter"))
    ids = torch.tensor([[5, 6, 7, 8]])
    trainer.model.eval()
    assert torch.allclose(reloaded(input_ids=ids).logits, trainer.model(input_ids=ids).logits, atol=1e-6)


def test_checkpoint_and_resume(processors, tmp_path):
    processor = processors["qwen3_vl"]

    def trainer(max_steps):
        return VAOPDTrainer(
            model=build_model("qwen3_vl", processor, "student"),
            teacher_model=build_model("qwen3_vl", processor, "teacher", seed=1),
            args=make_args(tmp_path, max_steps=max_steps, save_strategy="steps", save_steps=1, learning_rate=1e-3),
            train_dataset=image_question_dataset(8),
            processing_class=processor,
        )

    trainer(1).train()
    assert (tmp_path / "checkpoint-1").is_dir()
    resumed = trainer(2)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))
    assert resumed.state.global_step == 2
    assert torch.isfinite(torch.tensor(resumed.state.log_history[-2]["loss"]))


def test_evaluation_scores_complete_sibling_groups(processors, tmp_path):
    processor = processors["qwen3_vl"]
    trainer = VAOPDTrainer(
        model=build_model("qwen3_vl", processor, "student"),
        teacher_model=build_model("qwen3_vl", processor, "teacher", seed=1),
        args=make_args(tmp_path, learning_rate=1e-3, per_device_eval_batch_size=4),
        train_dataset=image_question_dataset(8),
        eval_dataset=image_question_dataset(3),
        processing_class=processor,
    )
    metrics = trainer.evaluate()
    # 3 prompts x 4 siblings, one prompt per eval batch of 4 rollouts
    assert metrics["eval_weights/max"] > 0.25 > metrics["eval_weights/min"] > 0
    assert metrics["eval_va/mean"] > 0 and metrics["eval_loss"] > 0
