"""Distillation with a verifiable reward: GRPO's policy term mixed into every method (`docs/methods/rewards.md`).

TRL's definitions, checked analytically and against an independent float64 recomputation of the whole generation
batch (`tests/reference.py`, `grpo_reference`), under every split of the batch."""

import math

import pytest
import torch
from conftest import image_question_dataset, make_args
from steps import cat, check_step_against_reference, run_one_step, token_reward

from trl_vaopd import VAOPDTrainer
from trl_vaopd.objective import group_advantages, policy_coefficients, policy_token_loss, vaopd_loss
from trl_vaopd.rewards import compute_rewards, resolve_reward_funcs
from trl_vaopd.tiny_models import build_model


# ------------------------------------------------------------------------------------------------------ pure functions
def test_group_advantages_follow_trls_definition():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0], dtype=torch.float64)
    advantages, std = group_advantages(rewards, 4, "group")
    spread = math.sqrt(1 / 3)  # unbiased: 4 values, two 1s and two 0s
    expected = torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0], dtype=torch.float64)
    expected[:4] /= spread + 1e-4
    torch.testing.assert_close(advantages, expected)
    torch.testing.assert_close(std[[0, 4]], torch.tensor([spread, 0.0], dtype=torch.float64))
    unscaled, _ = group_advantages(rewards, 4, "none")
    torch.testing.assert_close(unscaled, torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0], dtype=torch.float64))
    batch, batch_std = group_advantages(rewards, 4, "batch")
    torch.testing.assert_close(batch_std, rewards.std().expand(8))
    torch.testing.assert_close(
        batch, (rewards - torch.tensor([0.5] * 4 + [2.0] * 4).double()) / (rewards.std() + 1e-4)
    )


def test_an_unscorable_rollout_leaves_the_baseline_and_gets_no_advantage():
    rewards = torch.tensor([1.0, math.nan, 0.0, 2.0], dtype=torch.float64)
    advantages, _ = group_advantages(rewards, 4, "none")
    torch.testing.assert_close(advantages, torch.tensor([0.0, 0.0, -1.0, 1.0], dtype=torch.float64))


def test_group_advantages_refuse_single_rollouts_and_unknown_scaling():
    with pytest.raises(ValueError, match="num_generations >= 2"):
        group_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="scale_rewards must be one of group, batch, none"):
        group_advantages(torch.zeros(4), 2, "std")


def test_policy_coefficients_give_each_loss_types_mean():
    lengths = torch.tensor([4, 2, 3, 1])
    mask = (torch.arange(4) < lengths.unsqueeze(1)).double()
    values = torch.rand(4, 4, dtype=torch.float64) * mask
    expected = {
        "grpo": (values.sum(1) / lengths).mean(),
        "dapo": values.sum() / lengths.sum(),
        "dr_grpo": values.sum() / (4 * 6),
    }
    for loss_type, value in expected.items():
        c = policy_coefficients(mask, 2, loss_type, num_responses=4, num_tokens=10, max_completion_length=6)
        torch.testing.assert_close(vaopd_loss(values, c, num_prompts=2), value, msg=loss_type)
    with pytest.raises(ValueError, match="loss_type must be one of grpo, dapo, dr_grpo"):
        policy_coefficients(mask, 2, "bnpo", 4, 10, 6)


def test_the_policy_term_is_minus_the_advantage_with_the_gradient_of_log_p():
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]], requires_grad=True)
    mask = torch.tensor([[1, 1], [1, 0]])
    advantages = torch.tensor([2.0, -1.0])
    loss = policy_token_loss(logp, advantages, mask)
    torch.testing.assert_close(loss.detach(), torch.tensor([[-2.0, -2.0], [1.0, 0.0]]))
    loss.sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-2.0, -2.0], [1.0, 0.0]]))


def test_reward_functions_are_called_as_trl_calls_them_and_bad_values_refused():
    seen = {}

    def record(prompts, completions, completion_ids, answer, **kwargs):
        seen.update(prompts=prompts, completions=completions, answer=answer, extra=sorted(kwargs))
        return [1.0, None]

    inputs = [{"prompt": "p0", "answer": "1", "images": []}, {"prompt": "p1", "answer": "2", "images": []}]
    rewards = compute_rewards([record], ["record"], inputs, ["a", "b"], [[1], [2]], trainer_state=None)
    assert seen == {
        "prompts": ["p0", "p1"],
        "completions": ["a", "b"],
        "answer": ["1", "2"],
        "extra": ["images", "trainer_state"],
    }
    assert rewards[0, 0] == 1.0 and math.isnan(rewards[1, 0])
    with pytest.raises(ValueError, match="'short' returned 1 values for 2 completions"):
        compute_rewards([lambda **k: [1.0]], ["short"], inputs, ["a", "b"], [[1], [2]])
    with pytest.raises(
        ValueError, match=r"'nan' returned NaN for 1 completion\(s\) \(first indices in the batch: \[1\]\)"
    ):
        compute_rewards([lambda **k: [1.0, math.nan]], ["nan"], inputs, ["a", "b"], [[1], [2]])


def test_reward_names_resolve_with_a_did_you_mean():
    from trl_vaopd.evaluation import accuracy_reward

    funcs, names = resolve_reward_funcs(["accuracy", token_reward])
    assert funcs == [accuracy_reward, token_reward] and names == ["accuracy_reward", "token_reward"]
    with pytest.raises(ValueError, match="Did you mean 'accuracy'"):
        resolve_reward_funcs("acuracy")


# ------------------------------------------------------------------------------------------------------- the trainer
@pytest.mark.parametrize(
    "loss_type,scale_rewards,per_device,accumulation",
    [("dapo", "group", 8, 1), ("dapo", "group", 2, 4), ("grpo", "batch", 4, 2), ("dr_grpo", "none", 8, 1)],
)
def test_pure_grpo_step_is_minus_the_gradient_of_trls_grpo_loss(
    processors, tmp_path, loss_type, scale_rewards, per_device, accumulation
):
    eos = processors["qwen3_vl"].tokenizer.eos_token_id
    trainer, ref, _, _ = check_step_against_reference(
        processors,
        tmp_path,
        rewards=True,
        method="opd",
        distillation_weight=0.0,
        loss_type=loss_type,
        scale_rewards=scale_rewards,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accumulation,
        generation_kwargs={"sequence_bias": [[[eos], 3.0]]},  # completions of different lengths
    )
    assert ref["grpo"]["advantages"].abs().sum() > 0  # rewards differ within groups: the test can fail
    torch.testing.assert_close(
        cat(trainer._buffered_inputs, "grpo_advantages").double(), ref["grpo"]["advantages"], rtol=1e-5, atol=1e-6
    )
    logs = trainer.state.log_history[0]
    assert logs["loss/policy"] == pytest.approx(ref["grpo"]["loss"].item(), rel=1e-4, abs=1e-6)
    assert logs["reward"] == pytest.approx(ref["grpo"]["rewards"].mean().item())
    assert logs["rewards/token_reward/mean"] == pytest.approx(ref["grpo"]["rewards"].mean().item())


@pytest.mark.parametrize(
    "method,view,per_device,accumulation",
    [
        ("vgs", "drop", 8, 1),
        ("vgs", "drop", 2, 4),
        ("va_opd", "pixelate", 4, 2),
        (["va_opd", "vgs"], "pixelate", 8, 1),
    ],
)
def test_mixed_objective_step_matches_the_reference_under_every_split(
    processors, tmp_path, method, view, per_device, accumulation
):
    # The VGS paper's recipe: (1 - alpha) GRPO + alpha distillation, alpha = 0.3
    trainer, ref, _, _ = check_step_against_reference(
        processors,
        tmp_path,
        rewards=True,
        method=method,
        counterfactual_view=view,
        distillation_weight=0.3,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accumulation,
    )
    logs = trainer.state.log_history[0]
    assert logs["loss/distillation"] == pytest.approx(ref["distillation_loss"].item(), rel=1e-4)
    assert logs["loss/policy"] == pytest.approx(ref["grpo"]["loss"].item(), rel=1e-4, abs=1e-6)
    for key in ("reward", "reward_std", "frac_reward_zero_std", "rewards/token_reward/mean"):
        assert key in logs, key


def test_vicur_with_rewards_matches_the_reference(processors, tmp_path):
    from test_vicur import CUES

    check_step_against_reference(
        processors, tmp_path, cues=CUES, rewards=True, method="vicur", cue_recovery=False, distillation_weight=0.5
    )


@pytest.mark.parametrize(
    "method",
    ["opd", "va_opd", "vgs", ["va_opd", "vgs"], "vicur", ["va_opd", "vicur"], ["va_opd", "vgs", "vicur"]],
    ids=lambda m: "+".join(m) if isinstance(m, list) else m,
)
def test_every_method_trains_with_rewards(processors, tmp_path, method):
    trainer, delta, _, _ = run_one_step(
        processors,
        tmp_path,
        dataset=image_question_dataset(8, cues=True),
        reward_funcs=[token_reward],
        method=method,
        distillation_weight=0.5,
        learning_rate=1e-2,
    )
    logs = trainer.state.log_history[0]
    assert math.isfinite(logs["loss"]) and math.isfinite(logs["loss/policy"]) and logs["loss/distillation"] >= 0
    assert any(d.abs().max() > 0 for d in delta.values())


def test_a_lora_student_trains_its_adapter_only_under_the_mix(processors, tmp_path):
    from peft import LoraConfig

    processor = processors["qwen3_vl"]
    trainer = VAOPDTrainer(
        model=build_model("qwen3_vl", processor, "student"),
        teacher_model=build_model("qwen3_vl", processor, "teacher", seed=1),
        args=make_args(
            tmp_path, method="vgs", counterfactual_view="drop", distillation_weight=0.3, learning_rate=1e-2
        ),
        train_dataset=image_question_dataset(8),
        processing_class=processor,
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
        reward_funcs=[token_reward],
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    moved = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all("lora_" in n for n in moved)
    assert "loss/policy" in trainer.state.log_history[0]


def test_rewards_at_distillation_weight_one_are_logged_only(processors, tmp_path):
    _, plain, _, _ = run_one_step(processors, tmp_path / "a", method="opd")
    trainer, logged, _, _ = run_one_step(processors, tmp_path / "b", method="opd", reward_funcs=[token_reward])
    for name, delta in plain.items():
        assert torch.equal(logged[name], delta), name
    assert "reward" in trainer.state.log_history[0] and "loss/policy" not in trainer.state.log_history[0]


def test_the_rewards_metrics_reach_tensorboard(processors, tmp_path, monkeypatch):
    from test_diagnostics import _tensorboard_scalars

    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))  # where transformers' TensorBoard writes
    trainer, _, _, _ = run_one_step(
        processors, tmp_path, reward_funcs=[token_reward], distillation_weight=0.5, report_to=["tensorboard"]
    )
    scalars = _tensorboard_scalars(tmp_path / "tb")
    logs = trainer.state.log_history[0]
    tags = (
        "reward",
        "reward_std",
        "frac_reward_zero_std",
        "rewards/token_reward/mean",
        "loss/policy",
        "loss/distillation",
    )
    for tag in tags:
        assert scalars[f"train/{tag}"][0][1] == pytest.approx(logs[tag]), tag


def test_grpo_alone_raises_a_dense_reward(processors, tmp_path):
    """Real training: 24 steps of pure GRPO on a reward the tiny student can learn (the share of its tokens from the
    lower half of the vocabulary) take the sampled reward from about a half to most tokens."""
    processor = processors["qwen3_vl"]
    half = len(processor.tokenizer) // 2

    def low_ids(completion_ids, **kwargs):
        return [sum(t < half for t in ids) / max(1, len(ids)) for ids in completion_ids]

    trainer = VAOPDTrainer(
        model=build_model("qwen3_vl", processor, "student"),
        teacher_model=build_model("qwen3_vl", processor, "teacher", seed=1),
        args=make_args(
            tmp_path, method="opd", distillation_weight=0.0, max_steps=24, optim="adamw_torch", learning_rate=3e-2,
            max_completion_length=8, temperature=1.0,
        ),
        train_dataset=image_question_dataset(48),
        processing_class=processor,
        reward_funcs=[low_ids],
    )  # fmt: skip
    trainer.train()
    rewards = [entry["reward"] for entry in trainer.state.log_history if "reward" in entry]
    assert sum(rewards[:4]) / 4 < 0.6 and sum(rewards[-4:]) / 4 > 0.85, rewards


# ----------------------------------------------------------------------------------------------------------- refusals
def trainer_with(tmp_path, processors, reward_funcs, **settings):
    processor = processors["qwen3_vl"]
    return VAOPDTrainer(
        model=build_model("qwen3_vl", processor, "student"),
        teacher_model=build_model("qwen3_vl", processor, "teacher", seed=1),
        args=make_args(tmp_path, **settings),
        train_dataset=image_question_dataset(8),
        processing_class=processor,
        reward_funcs=reward_funcs,
    )


def test_bad_settings_are_refused_before_any_model_is_loaded(tmp_path, processors):
    with pytest.raises(ValueError, match=r"distillation_weight must be in \[0, 1\], got 1.5"):
        make_args(tmp_path, distillation_weight=1.5)
    with pytest.raises(ValueError, match="'bnpo' normalises by each micro-batch's tokens"):
        make_args(tmp_path, loss_type="bnpo")
    with pytest.raises(ValueError, match="distillation_weight=0.5 mixes in GRPO's policy term, which needs rewards"):
        VAOPDTrainer(
            model="never-loaded", teacher_model="never-loaded", args=make_args(tmp_path, distillation_weight=0.5)
        )
    with pytest.raises(ValueError, match="Rewards need num_generations >= 2"):
        VAOPDTrainer(
            model="never-loaded", teacher_model="never-loaded", reward_funcs="accuracy",
            args=make_args(tmp_path, num_generations=1, per_device_train_batch_size=2),
        )  # fmt: skip
    with pytest.raises(ValueError, match="reward_weights has 2 entries for 1 reward functions"):
        VAOPDTrainer(
            model="never-loaded", teacher_model="never-loaded", reward_funcs=[token_reward],
            args=make_args(tmp_path, reward_weights=[1.0, 2.0]),
        )  # fmt: skip


def test_a_reward_function_returning_the_wrong_count_is_refused_before_the_update(tmp_path, processors):
    def short(completions, **kwargs):
        return [1.0] * (len(completions) - 1)

    trainer = trainer_with(tmp_path, processors, [short], distillation_weight=0.5)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    with pytest.raises(ValueError, match="'short' returned 7 values for 8 completions"):
        trainer.train()
    assert all(torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())
