"""ViCuR's privileged teacher (docs/methods/vicur.md, "The cue teacher" and "The objective"): the teacher reads a
cue the student never sees, in every view it runs; composed with VA-OPD and VGS; the sampled-token estimator; bad
input."""

import copy

import pytest
import torch
from conftest import cue, image_question_dataset, make_args
from steps import cat, check_step_against_reference, run_one_step

from trl_vaopd import VAOPDConfig, VAOPDTrainer
from trl_vaopd.privileged import with_cue
from trl_vaopd.tiny_models import build_model


CUES = {i: cue(i) for i in range(8)}


def cue_dataset(n: int = 8):
    return image_question_dataset(n, cues=True)


def test_with_cue_appends_the_hint_to_the_last_user_turn():
    prompt = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Find x."},
        {"role": "assistant", "content": "Which x?"},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "The one in the figure."}]},
    ]
    out = with_cue(prompt, "x is the chord's segment")
    assert out[:3] == prompt[:3] and prompt[3]["content"][-1]["text"] == "The one in the figure."  # a copy
    assert out[3]["content"][-1] == {"type": "text", "text": "\n[Hint]: x is the chord's segment"}
    assert with_cue(prompt[:2], "c", "{cue}!")[1]["content"] == "Find x.c!"
    with pytest.raises(ValueError, match="has none"):
        with_cue(prompt[:1], "c")


def test_the_teacher_reads_the_cue_in_every_view_and_the_student_never_does(processors, tmp_path):
    processor = processors["qwen3_vl"]
    seen = []

    def spy(trainer):
        score = trainer._score_views

        def recording(batch, max_rows):
            seen.append(batch)
            return score(batch, max_rows)

        trainer._score_views = recording

    trainer = VAOPDTrainer(
        model=build_model("qwen3_vl", processor, "student"),
        teacher_model=build_model("qwen3_vl", processor, "teacher", seed=1),
        args=make_args(tmp_path, method=["va_opd", "vgs", "vicur"], cue_recovery=False, counterfactual_view="drop"),
        train_dataset=cue_dataset(),
        processing_class=processor,
    )
    spy(trainer)
    trainer.train()
    decode = processor.tokenizer.batch_decode
    (teacher,) = seen
    for key in ("prompt_ids", "counterfactual_prompt_ids"):  # original view, and the text-only view
        texts = decode(teacher[key], skip_special_tokens=True)
        assert all(f"[Hint]: {CUES[int(t.split('picture ')[1][0])]}" in t for t in texts), texts
    for batch in trainer._buffered_inputs:  # what the student generated from and trains on, in both views
        for key in ("prompt_ids", "counterfactual_prompt_ids"):
            assert not any("[Hint]" in t for t in decode(batch[key])), key


def test_a_teacher_prompt_equal_to_the_student_prompt_reproduces_the_unprivileged_run(processors, tmp_path):
    dataset = image_question_dataset(8)
    dataset = dataset.add_column("teacher_prompt", dataset["prompt"])
    settings = dict(method=["va_opd", "vgs"], per_device_train_batch_size=4, gradient_accumulation_steps=2)
    plain, plain_delta, _, _ = run_one_step(processors, tmp_path / "plain", dataset=dataset, **settings)
    privileged, privileged_delta, _, _ = run_one_step(
        processors,
        tmp_path / "privileged",
        dataset=dataset,
        use_cues=True,
        teacher_prompt_column="teacher_prompt",
        **settings,
    )
    assert privileged.state.log_history[0]["loss"] == plain.state.log_history[0]["loss"]
    for key in ("vaopd_coefficients", "vgs_lp_mask", "teacher_hidden_states"):
        assert torch.equal(cat(privileged._buffered_inputs, key), cat(plain._buffered_inputs, key)), key
    for name, delta in plain_delta.items():
        assert torch.equal(privileged_delta[name], delta), name


@pytest.mark.parametrize(
    "method,view,per_device,accumulation",
    [
        (["va_opd", "vicur"], "pixelate", 2, 4),
        (["vgs", "vicur"], "drop", 8, 1),
        (["va_opd", "vgs", "vicur"], "drop", 2, 4),
        (["va_opd", "vgs", "vicur"], "pixelate", 4, 2),
    ],
)
def test_cue_step_is_minus_gradient_of_the_objective_with_the_privileged_teacher(
    processors, tmp_path, method, view, per_device, accumulation
):
    # The cue-recovery module starts as the identity (its W_o is zero), so the student's other parameters move as
    # the reference's, which has none; the last case runs with it
    _, ref, teacher, student = check_step_against_reference(
        processors,
        tmp_path,
        cues=CUES,
        method=method,
        cue_recovery=per_device == 4,
        counterfactual_view=view,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accumulation,
    )
    # The cue costs no pass: the teacher still runs once per view it needs
    assert teacher.rollouts == 2 * 8 and student.rollouts == (2 if "vgs" in method else 1) * 8
    assert ref["va"].max() > 0


@pytest.mark.parametrize("cues", [None, CUES])
def test_sampled_token_estimator_steps_along_the_papers_policy_gradient(processors, tmp_path, cues):
    trainer, ref, teacher, _ = check_step_against_reference(
        processors,
        tmp_path,
        cues=cues,
        method="opd" if cues is None else "vicur",
        cue_recovery=False,
        kl_estimator="sampled_token",
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
    )
    assert teacher.rollouts == 8  # plain OPD and ViCuR: one teacher view
    # Only the teacher's log-probs of the sampled tokens are kept for the loss, not its hidden states
    batch = trainer._buffered_inputs[0]
    assert "teacher_token_logprobs" in batch and "teacher_hidden_states" not in batch


def test_self_distillation_from_the_students_initial_weights(processors, tmp_path):
    processor = processors["qwen3_vl"]
    student = build_model("qwen3_vl", processor, "student")
    trainer = VAOPDTrainer(
        model=student,
        teacher_model=copy.deepcopy(student),  # a frozen copy of the initial weights, as the paper's ablation
        args=make_args(tmp_path, method="vicur", cue_recovery=False, learning_rate=1e-2, max_steps=2),
        train_dataset=cue_dataset(),
        processing_class=processor,
    )
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    # Without the cue the two models agree exactly at step 1, so any loss there comes from the cue alone
    assert logs[0]["loss"] > 0 and all(torch.isfinite(torch.tensor(e["loss"])) for e in logs)


def test_cue_column_survives_remove_unused_columns(processors, tmp_path):
    trainer, _, _, _ = run_one_step(
        processors,
        tmp_path,
        dataset=cue_dataset(),
        method="vicur",
        cue_recovery=False,
        remove_unused_columns=True,
    )
    assert trainer.state.log_history[0]["loss"] > 0


def _trainer(processors, tmp_path, dataset, **settings):
    processor = processors["qwen3_vl"]
    return VAOPDTrainer(
        model=build_model("qwen3_vl", processor, "student"),
        teacher_model=build_model("qwen3_vl", processor, "teacher", seed=1),
        args=make_args(tmp_path, **settings),
        train_dataset=dataset,
        processing_class=processor,
    )


def test_a_missing_cue_column_is_refused_by_name(processors, tmp_path):
    with pytest.raises(ValueError, match=r"cue_column='hint' is not a column of the dataset"):
        _trainer(processors, tmp_path, cue_dataset(), method="vicur", cue_column="hint")
    with pytest.raises(ValueError, match=r"teacher_prompt_column='teacher' is not a column"):
        _trainer(processors, tmp_path, cue_dataset(), use_cues=True, teacher_prompt_column="teacher")


def test_rows_with_empty_or_missing_cues_are_refused_with_their_indices(processors, tmp_path):
    cues = [CUES[i] for i in range(8)]
    cues[2], cues[5], cues[7] = "", None, "   "
    dataset = image_question_dataset(8).add_column("cue", cues)
    with pytest.raises(ValueError, match=r"3 row\(s\) have an empty or missing 'cue' \(indices: \[2, 5, 7\]"):
        _trainer(processors, tmp_path, dataset, method="vicur")


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"cue_template": "[Hint]: "}, "cue_template must contain '{cue}'"),
        ({"cue_recovery_interval": 0}, "cue_recovery_interval must be >= 1"),
        ({"kl_estimator": "k3"}, "kl_estimator must be one of full, sampled_token"),
        ({"kl_estimator": "sampled_token", "method": "vgs"}, "VGS needs the full-vocabulary terms"),
        ({"kl_estimator": "sampled_token", "beta": 0.5}, "beta=0.5 asks for another divergence"),
    ],
)
def test_settings_vicur_cannot_honour_are_refused(tmp_path, settings, message):
    with pytest.raises(ValueError, match=message):
        VAOPDConfig(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=4, **settings)


def test_vicur_presets_the_cue_teacher_and_the_module(tmp_path):
    args = VAOPDConfig(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=4, method="vicur")
    assert args.use_cues and args.cue_recovery and not (args.rollout_weighting or args.token_grouping or args.vgs)
    assert args.cue_column == "cue" and args.cue_recovery_interval == 5
    assert args.loss_aggregation == "token_mean"  # the authors' verl recipe
    composed = VAOPDConfig(
        output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=4, method=["va_opd", "vicur"]
    )
    assert composed.use_cues and composed.rollout_weighting and composed.token_grouping
    assert composed.loss_aggregation == "response_mean"  # VA-OPD's weights and groups are per response
    explicit = VAOPDConfig(
        output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=4, method="vicur",
        loss_aggregation="response_mean",
    )  # fmt: skip
    assert explicit.loss_aggregation == "response_mean"
    with pytest.raises(ValueError, match="loss_aggregation must be one of response_mean, token_mean"):
        VAOPDConfig(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=4, loss_aggregation="mean")


# ------------------------------------------------------------------------------------------- the cue-recovery module
def module_parameters(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".sink_" in n}


def full_sequence_inputs(batch: dict) -> dict:
    """Model inputs of a trained micro-batch's prompts and completions, as one sequence per rollout."""
    return {
        "input_ids": torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1),
        "attention_mask": torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1),
        "pixel_values": batch["pixel_values"],
        "image_grid_thw": batch["image_grid_thw"],
        "mm_token_type_ids": batch["mm_token_type_ids"],
    }


def test_the_module_trains_with_the_student_and_is_saved_with_it(processors, tmp_path):
    from trl_vaopd.cue_recovery import has_cue_recovery, load_with_cue_recovery

    trainer = _trainer(
        processors, tmp_path, cue_dataset(), method="vicur", max_steps=2, learning_rate=1e-2, optim="adamw_torch"
    )
    assert has_cue_recovery(trainer.model) and not has_cue_recovery(trainer.teacher_model)
    before = module_parameters(trainer.model)
    assert before and all("o_proj" not in n or not p.any() for n, p in before.items())  # W_o starts at zero
    trainer.train()
    after = module_parameters(trainer.model)
    assert all(
        not torch.equal(after[n], before[n]) for n in before if not n.endswith(("norm_q.weight", "norm_kv.weight"))
    )
    trainer.save_model(str(tmp_path / "student"))
    loaded = load_with_cue_recovery(tmp_path / "student")
    inputs = full_sequence_inputs(trainer._buffered_inputs[0])
    trainer.model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, trainer.model(**inputs).logits)


def test_the_module_trains_next_to_a_lora_adapter_and_reloads_with_it(processors, tmp_path):
    from peft import LoraConfig, PeftModel

    from trl_vaopd.cue_recovery import add_cue_recovery

    processor = processors["qwen3_vl"]
    trainer = VAOPDTrainer(
        model=build_model("qwen3_vl", processor, "student"),
        teacher_model=build_model("qwen3_vl", processor, "teacher", seed=1),
        args=make_args(tmp_path, method="vicur", max_steps=2, learning_rate=1e-2),
        train_dataset=cue_dataset(),
        processing_class=processor,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    assert any("lora_" in n for n in changed) and any(".sink_" in n for n in changed)
    assert all("lora_" in n or ".sink_" in n for n in changed)  # nothing else moved
    trainer.save_model(str(tmp_path / "adapter"))
    base = add_cue_recovery(build_model("qwen3_vl", processor, "student"), interval=5)
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    inputs = full_sequence_inputs(trainer._buffered_inputs[0])
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, trainer.model(**inputs).logits)


def test_the_update_with_the_module_does_not_depend_on_the_split(processors, tmp_path):
    settings = dict(method=["va_opd", "vgs", "vicur"], counterfactual_view="drop", learning_rate=1e-2)
    _, whole, _, _ = run_one_step(processors, tmp_path / "a", dataset=cue_dataset(), **settings)
    _, split, _, _ = run_one_step(
        processors,
        tmp_path / "b",
        dataset=cue_dataset(),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=4,
        **settings,
    )
    assert any(d.abs().max() > 0 for n, d in whole.items() if ".sink_" in n)
    for name, delta in whole.items():
        torch.testing.assert_close(split[name], delta, atol=1e-6, rtol=1e-4, msg=name)


def test_a_student_module_at_another_interval_is_refused(processors, tmp_path):
    from trl_vaopd.cue_recovery import add_cue_recovery

    processor = processors["qwen3_vl"]
    with pytest.raises(
        ValueError, match=r"already carries a cue-recovery module after layers \[0, 1\] \(every 1 layers"
    ):
        VAOPDTrainer(
            model=add_cue_recovery(build_model("qwen3_vl", processor, "student"), interval=1),
            teacher_model=build_model("qwen3_vl", processor, "teacher", seed=1),
            args=make_args(tmp_path, method="vicur"),
            train_dataset=cue_dataset(),
            processing_class=processor,
        )
