"""End-to-end tests of VAOPDTrainer on tiny offline models: exactness of every method, split invariance, budget,
LoRA, resume."""

import pytest
import torch
from conftest import image_question_dataset, make_args, pad_output_head, with_image_parts
from reference import reference, rollouts_of
from steps import assert_update_is_minus_gradient, cat, check_step_against_reference, run_one_step

from trl_vaopd import VAOPDTrainer
from trl_vaopd.objective import view_kl_advantage
from trl_vaopd.tiny_models import TINY_FAMILIES, build_model


@pytest.mark.parametrize(
    "per_device,accumulation,aggregation",
    [
        (8, 1, "response_mean"),
        (2, 4, "response_mean"),
        (3, 1, "response_mean"),
        (8, 1, "token_mean"),
        (2, 4, "token_mean"),
    ],
)
def test_update_is_minus_gradient_of_method_loss_for_every_layout(
    processors, tmp_path, per_device, accumulation, aggregation
):
    if per_device == 3:
        # 3 x 1 does not hold whole sibling groups of 4: refused before any model is touched
        with pytest.raises(ValueError, match="whole groups of num_generations=4"):
            make_args(tmp_path, per_device_train_batch_size=3, gradient_accumulation_steps=accumulation)
        return
    # Token-mean differs from the response mean only with responses of different lengths: EOS made likelier
    eos = processors["qwen3_vl"].tokenizer.eos_token_id
    trainer, ref, teacher, student = check_step_against_reference(
        processors,
        tmp_path,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accumulation,
        loss_aggregation=aggregation,
        generation_kwargs={"sequence_bias": [[[eos], 3.0]]} if aggregation == "token_mean" else None,
    )
    # Budget: the teacher scores each rollout under two views, and never again for the loss; the student runs once
    assert teacher.rollouts == 2 * 8 and student.rollouts == 8
    coefficients = cat(trainer._buffered_inputs, "vaopd_coefficients")
    mask = cat(trainer._buffered_inputs, "completion_mask")
    if aggregation == "response_mean":
        assert coefficients.sum().item() == pytest.approx(2.0, rel=1e-5)  # two prompts, each summing to one
    else:
        # Each response's weight times its length over the mean length: two prompts' worth again, length-weighted
        weights = ref["weights"]
        lengths = ref["mask"].sum(dim=1)
        expected = (weights * lengths).sum() * 8 / lengths.sum()
        assert coefficients.sum().item() == pytest.approx(expected.item(), rel=1e-5)
        assert mask.sum() == lengths.sum() and not torch.allclose(lengths.double(), lengths.double().mean())


@pytest.mark.parametrize(
    "method,view,per_device,accumulation",
    [
        ("vgs", "drop", 8, 1),
        ("vgs", "drop", 2, 4),
        ("vgs", "pixelate", 4, 2),
        (["va_opd", "vgs"], "pixelate", 8, 1),
        (["va_opd", "vgs"], "drop", 2, 4),
    ],
)
def test_vgs_update_is_minus_gradient_of_its_objective_for_every_layout(
    processors, tmp_path, method, view, per_device, accumulation
):
    trainer, ref, teacher, student = check_step_against_reference(
        processors,
        tmp_path,
        method=method,
        counterfactual_view=view,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accumulation,
    )
    # Budget (docs/methods/vgs.md, "Cost"): two teacher passes per rollout, with and without the image, and two
    # student passes
    assert teacher.rollouts == 2 * 8 and student.rollouts == 2 * 8
    # The LP mask (checked above against the quantile over the whole generation batch) holds some tokens, not all
    assert 0 < ref["lp"].sum() < ref["mask"].sum()
    logs = trainer.state.log_history[0]
    for name in ("standard", "visual", "language"):
        expected = (getattr(ref["terms"], name).sum() / ref["mask"].sum()).item()
        assert logs[f"vgs/{name}"] == pytest.approx(expected, rel=1e-4)
    assert logs["vgs/lp_share"] == pytest.approx(ref["lp"].sum().item() / ref["mask"].sum().item())
    # The visual target's diagnostics (how far q* moved from q, where their top tokens differ), against float64
    tokens = ref["mask"].sum().item()
    assert logs["vgs/target_shift"] == pytest.approx(ref["terms"].target_shift.sum().item() / tokens, rel=1e-4)
    assert logs["vgs/target_flip_share"] == pytest.approx(ref["terms"].target_flip.sum().item() / tokens)


def test_adaptive_gamma_matches_the_reference(processors, tmp_path):
    _, ref, _, _ = check_step_against_reference(
        processors,
        tmp_path,
        method="vgs",
        vgs_adaptive_gamma=True,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
    )
    assert set(ref["gamma"][ref["mask"].bool()].unique().tolist()) == {0.0, 1.0, 2.0}


def test_opd_runs_the_teacher_once_per_rollout_and_is_standard_opd(processors, tmp_path):
    trainer, _, teacher, student = check_step_against_reference(
        processors, tmp_path, method="opd", per_device_train_batch_size=4, gradient_accumulation_steps=2
    )
    assert teacher.rollouts == 8 and student.rollouts == 8  # as trl.DistillationTrainer
    logs = trainer.state.log_history[0]
    assert logs["weights/max"] == logs["weights/min"] == pytest.approx(0.25)
    assert "va/mean" not in logs  # no counterfactual view, hence no VA


def test_both_switches_off_is_standard_opd(processors, tmp_path):
    trainer, _, teacher, _ = check_step_against_reference(
        processors,
        tmp_path,
        rollout_weighting=False,
        token_grouping=False,
        log_va_metrics=True,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
    )
    logs = trainer.state.log_history[0]
    assert logs["weights/max"] == logs["weights/min"] == pytest.approx(0.25)
    assert logs["va/mean"] > 0 and teacher.rollouts == 2 * 8  # the VA metrics cost the counterfactual pass


def test_logs_va_metrics(processors, tmp_path):
    trainer, _, _, _ = run_one_step(processors, tmp_path)
    logs = trainer.state.log_history[0]
    for key in ("va/mean", "va/top10_share", "va/high_group_share", "kl/high", "kl/low", "weights/max", "weights/min"):
        assert key in logs, key
    assert logs["va/mean"] > 0
    assert 0.1 <= logs["va/top10_share"] <= 1.0
    assert 0.2 <= logs["va/high_group_share"] <= 1.0
    assert 0 < logs["weights/min"] <= 0.25 <= logs["weights/max"] < 1


@pytest.mark.parametrize("method,view", [("vgs", "drop"), (["va_opd", "vicur"], "drop"), ("va_opd", "pixelate")])
def test_both_prompt_formats_train_the_same_step_under_every_view(processors, tmp_path, method, view):
    plain = image_question_dataset(8, cues=True)
    _, delta, _, _ = run_one_step(processors, tmp_path / "a", dataset=plain, method=method, counterfactual_view=view)
    _, parts, _, _ = run_one_step(
        processors, tmp_path / "b", dataset=with_image_parts(plain), method=method, counterfactual_view=view
    )
    for name, value in delta.items():
        torch.testing.assert_close(parts[name], value, msg=name)


@pytest.mark.parametrize("image_parts", [False, True], ids=["plain", "image-parts"])
@pytest.mark.parametrize("family", ["qwen3_vl", "gemma3"])
def test_the_drop_view_refuses_prompts_that_are_only_images_before_compute(processors, tmp_path, family, image_parts):
    # An image-only prompt: an image part alone, or plain-text content that is empty (TRL inserts the image there)
    only_image = [{"type": "image"}] if image_parts else ""
    dataset = image_question_dataset(8)
    dataset = (with_image_parts(dataset) if image_parts else dataset).map(
        lambda row, i: {"prompt": [{"role": "user", "content": only_image}]} if i in (2, 5) else row,
        with_indices=True,
    )
    processor = processors[family]
    with pytest.raises(
        ValueError, match=r"2 row\(s\) of the 'prompt' column hold nothing else \(first indices: \[2, 5\]\)"
    ):
        VAOPDTrainer(
            model=build_model(family, processor, "student"),
            teacher_model=build_model(family, processor, "teacher", seed=1),
            args=make_args(tmp_path, method="vgs", counterfactual_view="drop"),
            train_dataset=dataset,
            processing_class=processor,
        )


# VA-OPD alone trains under every view on every family in `test_families.py`
@pytest.mark.parametrize("method,view", [("vgs", "drop"), (["va_opd", "vgs"], "pixelate")])
@pytest.mark.parametrize("family", [f for f in TINY_FAMILIES if f != "qwen3_vl"])
def test_trains_on_other_families(processors, tmp_path, family, method, view):
    trainer, delta, teacher, student = run_one_step(
        processors,
        tmp_path,
        family=family,
        method=method,
        counterfactual_view=view,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=1e-3,
    )
    logs = trainer.state.log_history[0]
    assert torch.isfinite(torch.tensor(logs["loss"])) and logs["loss"] > 0
    assert logs["va/mean"] > 0
    assert any(d.abs().max() > 0 for d in delta.values())
    assert teacher.rollouts == 2 * 8
    assert student.rollouts == 2 * 8  # VGS's student scores both views


def test_size_changing_custom_view_is_refused(processors, tmp_path):
    processor = processors["qwen3_vl"]
    with pytest.raises(ValueError, match="changed the image size"):
        VAOPDTrainer(
            model=build_model("qwen3_vl", processor, "student"),
            teacher_model=build_model("qwen3_vl", processor, "teacher", seed=1),
            args=make_args(tmp_path),
            train_dataset=image_question_dataset(8),
            processing_class=processor,
            counterfactual_view=lambda image: image.resize((64, 64)),
        )


@pytest.mark.parametrize("method", ["va_opd", ["va_opd", "vgs"]])
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_lora_student_trains_adapter_only_and_reloads(processors, tmp_path, family, method):
    from peft import LoraConfig, PeftModel

    processor = processors[family]
    trainer = VAOPDTrainer(
        model=build_model(family, processor, "student"),
        teacher_model=build_model(family, processor, "teacher", seed=1),
        args=make_args(
            tmp_path,
            method=method,
            learning_rate=1e-2,
            max_steps=2,
            per_device_train_batch_size=4,
            gradient_accumulation_steps=2,
        ),
        train_dataset=image_question_dataset(8),
        processing_class=processor,
        # Every linear layer: Gemma 4 wraps its vision tower's `q_proj` and `v_proj` (`Gemma4ClippableLinear`), which
        # PEFT refuses when targeted by those names
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
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


@pytest.mark.parametrize(
    "settings",
    [
        {"method": "va_opd"},
        {"method": ["va_opd", "vgs"], "counterfactual_view": "drop"},
        {"method": "opd", "va_token_mask": "random"},
        {"method": ["va_opd", "vicur"]},  # the cue teacher and the student's cue-recovery module
    ],
)
def test_resuming_from_a_checkpoint_is_exact(processors, tmp_path, settings):
    processor = processors["qwen3_vl"]

    def trainer(output_dir):
        args = make_args(
            output_dir,
            max_steps=3,
            save_strategy="steps",
            save_steps=1,
            optim="adamw_torch",  # optimizer state must be restored too
            learning_rate=1e-2,
            per_device_train_batch_size=4,
            gradient_accumulation_steps=2,
            **settings,
        )
        return VAOPDTrainer(
            model=build_model("qwen3_vl", processor, "student"),
            teacher_model=build_model("qwen3_vl", processor, "teacher", seed=1),
            args=args,
            train_dataset=image_question_dataset(8, cues=True),
            processing_class=processor,
        )

    straight = trainer(tmp_path / "straight")
    straight.train()
    resumed = trainer(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "straight" / "checkpoint-1"))
    assert resumed.state.global_step == 3
    # Steps 2 and 3 repeat the uninterrupted run's: same rollouts, same losses, same weights (the resumed history
    # starts with the checkpoint's step 1)
    losses = [[e["loss"] for e in t.state.log_history if "loss" in e] for t in (straight, resumed)]
    assert len(losses[0]) == 3 and losses[1] == losses[0]
    for (name, p), q in zip(straight.model.named_parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(p, q), name


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


def _canned_completions(tokenizer, n: int = 8) -> list[list[int]]:
    """Fixed completions of varied lengths, some ending with EOS: a stand-in for any generator's output."""
    words = tokenizer.encode("The number shown in the picture is seven.")
    return [words[: 1 + i % 5] + ([tokenizer.eos_token_id] if i % 2 else []) for i in range(n)]


@pytest.mark.parametrize("method", ["va_opd", ["va_opd", "vgs"]])
def test_padded_heads_train_like_heads_cut_to_the_tokenizer(processors, tmp_path, method):
    processor = processors["qwen3_vl"]
    size = len(processor.tokenizer)
    canned = _canned_completions(processor.tokenizer)

    def step(student, teacher, directory, completions=None):
        args = make_args(
            tmp_path / directory, method=method, per_device_train_batch_size=4, gradient_accumulation_steps=2
        )
        trainer = VAOPDTrainer(
            model=student,
            teacher_model=teacher,
            args=args,
            train_dataset=image_question_dataset(8),
            processing_class=processor,
        )
        if completions is not None:
            trainer._generate_single_turn = lambda prompt_ids, *args, **kwargs: [list(c) for c in completions]
        before = {n: p.detach().clone() for n, p in student.named_parameters()}
        trainer.train()
        return trainer, {n: p.detach() - before[n] for n, p in trainer.model.named_parameters()}

    def padded_pair():
        # Student and teacher padded to different sizes, as Qwen2.5-VL-3B (151936 rows) and 7B (152064)
        student = pad_output_head(build_model("qwen3_vl", processor, "student"), 5, seed=2)
        return student, pad_output_head(build_model("qwen3_vl", processor, "teacher", seed=1), 11, seed=3)

    cut, cut_delta = step(
        build_model("qwen3_vl", processor, "student"),
        build_model("qwen3_vl", processor, "teacher", seed=1),
        "cut",
        canned,
    )
    padded, padded_delta = step(*padded_pair(), "padded", canned)
    assert padded._vocab_size == size and cut._vocab_size is None
    assert padded.state.log_history[0]["loss"] == pytest.approx(cut.state.log_history[0]["loss"], rel=1e-5)
    for name, delta in cut_delta.items():
        torch.testing.assert_close(padded_delta[name][: delta.size(0)], delta, rtol=1e-4, atol=1e-7)
        assert not padded_delta[name][delta.size(0) :].any()  # padding rows get no gradient

    # Sampling from the padded student: its padding rows dominate the raw logits, yet none is ever sampled
    sampled, _ = step(*padded_pair(), "sampled")
    completions = cat(sampled._buffered_inputs, "completion_ids")
    assert completions.max() < size


def keep_outputs(monkeypatch, *methods: str) -> dict:
    """The last output of each of `VAOPDTrainer`'s `methods` during a run, by name (e.g. `_score_views`: the teacher's
    scores; `_generate_and_score_completions`: the generation batch in sampling order, before the shuffle)."""
    kept = {}

    def keeping(name, method):
        def kept_method(self, *args):
            kept[name] = method(self, *args)
            return kept[name]

        return kept_method

    for name in methods:
        monkeypatch.setattr(VAOPDTrainer, name, keeping(name, getattr(VAOPDTrainer, name)))
    return kept


@pytest.mark.parametrize(
    "settings, sampled_token_logp, view_kl",
    [({"method": "opd"}, False, False), ({"method": "va_opd"}, True, False), ({"method": "vgs"}, True, True)],
)
def test_the_teacher_scores_only_what_the_run_uses(
    processors, tmp_path, monkeypatch, settings, sampled_token_logp, view_kl
):
    # The counterfactual view's log-probs of the sampled tokens feed the paper's VA; its KL to the original view feeds
    # VGS's VDS and the teacher_view_kl VA (tested below), and runs only for them
    kept = keep_outputs(monkeypatch, "_score_views")
    run_one_step(processors, tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=2, **settings)
    scores = kept["_score_views"]
    assert (scores.cf_logp is not None, scores.view_kl is not None) == (sampled_token_logp, view_kl)


@pytest.mark.parametrize("method", ["va_opd", ["va_opd", "vgs"]])
def test_teacher_view_kl_variant_is_minus_gradient_of_its_objective_at_no_extra_pass(
    processors, tmp_path, monkeypatch, method
):
    kept = keep_outputs(monkeypatch, "_generate_and_score_completions", "_score_views")
    trainer, delta, teacher, student = run_one_step(
        processors,
        tmp_path,
        method=method,
        visual_advantage="teacher_view_kl",
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
    )
    # The same passes as with the paper's VA: the view KL comes from the two teacher views already scored
    assert teacher.rollouts == 2 * 8 and student.rollouts == (2 * 8 if trainer.args.vgs else 8)
    # Only the variant's inputs were computed: no sampled-token log-probs of the counterfactual view
    scores, batch = kept["_score_views"], kept["_generate_and_score_completions"]
    assert scores.cf_logp is None and scores.view_kl is not None

    processor = processors["qwen3_vl"]
    rows = rollouts_of([batch], processor.tokenizer)
    width = max(row.completion.numel() for row in rows)
    run_va = view_kl_advantage(scores.view_kl, batch["completion_mask"])[:, :width]
    ref_student = build_model("qwen3_vl", processor, "student", seed=0)
    ref_teacher = build_model("qwen3_vl", processor, "teacher", seed=1)
    # The weights and groups follow the run's own VA: the tiny teacher's view KLs are about 1e-3 nats, so float32
    # rounding (1e-6) of them moves the siblings' z-scores visibly; the VA itself is checked against float64 here
    ref = reference(rows, ref_student, ref_teacher, processor, trainer.args, va=run_va)
    valid = ref["mask"].bool()
    # The float64 KL(q || qbar) of the teacher's full distributions: positive wherever the views differ, whichever
    # token was sampled
    torch.testing.assert_close(run_va.double(), ref["va"], rtol=0, atol=2e-6)
    assert (ref["va"][valid] > 0).all()
    ref["loss"].backward()
    assert_update_is_minus_gradient(delta, ref_student)
    logs = trainer.state.log_history[0]
    assert logs["loss"] == pytest.approx(ref["loss"].item(), rel=1e-4)
    assert logs["va/mean"] == pytest.approx(run_va[valid].mean().item(), rel=1e-5)  # the metrics report the variant
    torch.testing.assert_close(
        batch["vaopd_coefficients"][:, :width].double(), ref["coefficients"], rtol=1e-4, atol=1e-7
    )
    assert 0.25 < logs["weights/max"] and logs["weights/min"] < 0.25  # the rollouts are weighted
    if trainer.args.vgs:
        assert torch.equal(batch["vgs_lp_mask"][:, :width], ref["lp"])
