"""Prefix-shared passes (each sibling group's prompt run once, its KV cache repeated to the rollouts) against full
passes, for every tiny family: hidden states, gradients, the groups found, and the token positions processed."""

import pytest
import torch
from conftest import noise_image
from steps import cat, run_one_step
from trl.data_utils import prepare_multimodal_messages
from trl.trainer.utils import split_pixel_values_by_grid

from trl_vaopd.evaluation import tokenize_conversations
from trl_vaopd.prefix_sharing import (
    backbone_of,
    prefix_groups,
    prefix_sharing_support,
    shared_prefix_hidden_states,
)
from trl_vaopd.tiny_models import TINY_FAMILIES, build_model


# Float32 tolerance of the comparisons: the two paths sum the same products in another order (padding differs)
ATOL, RTOL = 1e-5, 1e-4
# Three prompts of different lengths (left padding), groups of 3, 2 and 4 siblings, and a text-only variant
QUESTIONS = ["What number?", "What number is shown in this small noisy picture?", "Which number is it, exactly?"]
GROUPS = [0, 0, 0, 1, 1, 2, 2, 2, 2]


def make_rows(processor, with_images: bool = True, seed: int = 0) -> dict:
    """A batch as the trainer holds it: left-padded prompts, right-padded completions of varied lengths."""
    conversations = [[{"role": "user", "content": QUESTIONS[g]}] for g in GROUPS]
    images = [[noise_image(10 + g)] for g in GROUPS] if with_images else None
    conversations = [
        prepare_multimodal_messages(c, images=images[i] if with_images else None) for i, c in enumerate(conversations)
    ]
    encoded = tokenize_conversations(processor, conversations)
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([5, 3, 7, 7, 1, 4, 6, 2, 7])
    completion = torch.randint(10, 400, (len(GROUPS), 7), generator=generator)
    mask = (torch.arange(7) < lengths[:, None]).long()
    rows = {
        "prompt_ids": encoded["input_ids"],
        "prompt_mask": encoded["attention_mask"],
        "completion_ids": completion * mask,
        "completion_mask": mask,
    }
    for key, value in encoded.items():
        if key in ("mm_token_type_ids", "token_type_ids"):
            rows[key] = torch.cat([value, value.new_zeros(completion.shape)], dim=1)
        elif key not in ("input_ids", "attention_mask"):
            rows[key] = value
    if with_images:
        rows = split_pixel_values_by_grid({**rows, "num_images": [1] * len(GROUPS)})
    return rows


def full_hidden_states(model, rows: dict) -> torch.Tensor:
    """The full pass, prompt + completion for every rollout, as TRL's trainers run it."""
    inputs = {k: v for k, v in rows.items() if k in ("mm_token_type_ids", "token_type_ids")}
    for key in ("pixel_values", "image_grid_thw"):
        if key in rows:
            inputs[key] = torch.cat(rows[key])
    prompt_len, length = rows["prompt_ids"].size(1), rows["completion_ids"].size(1)
    out = backbone_of(model)(
        input_ids=torch.cat([rows["prompt_ids"], rows["completion_ids"]], dim=1),
        attention_mask=torch.cat([rows["prompt_mask"], rows["completion_mask"]], dim=1),
        use_cache=False,
        **inputs,
    )
    return out.last_hidden_state[:, prompt_len - 1 : prompt_len - 1 + length]


def test_groups_are_consecutive_rollouts_with_the_same_prompt_and_image(processors):
    rows = make_rows(processors["qwen3_vl"])
    groups = prefix_groups(rows)
    assert groups.index.tolist() == GROUPS and groups.first.tolist() == [0, 3, 5]
    # The same question over another image is another prompt
    rows["pixel_values"][1] = rows["pixel_values"][1] + 1
    assert prefix_groups(rows).index.tolist() == [0, 1, 2, 3, 3, 4, 4, 4, 4]


@pytest.mark.parametrize("with_images", [True, False], ids=["images", "text-only"])
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_shared_prefix_hidden_states_equal_the_full_pass(processors, family, with_images):
    processor = processors[family]
    model = build_model(family, processor, "teacher", seed=1)
    rows = make_rows(processor, with_images)
    assert prefix_sharing_support(model) is None
    with torch.no_grad():
        full = full_hidden_states(model, rows)
        # A multimodal forward first, leaving the Qwen models' `rope_deltas` behind: the shared pass must not use them
        shared = shared_prefix_hidden_states(model, rows, prefix_groups(rows))
    valid = rows["completion_mask"].bool()
    torch.testing.assert_close(shared[valid], full[valid], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_gradients_through_the_shared_prefix_equal_the_full_pass(processors, family):
    processor = processors[family]
    rows = make_rows(processor)
    valid = rows["completion_mask"].bool()
    width = backbone_of(build_model(family, processor)).config.get_text_config().hidden_size
    weights = torch.randn(int(valid.sum()), width, generator=torch.Generator().manual_seed(0))
    grads = []
    for path in (full_hidden_states, lambda m, r: shared_prefix_hidden_states(m, r, prefix_groups(r))):
        model = build_model(family, processor, "student", seed=0)
        (path(model, rows)[valid] * weights).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any("visual" in n or "vision" in n for n in grads[0])
    for name, grad in grads[0].items():
        # A gradient sums many products: its rounding error scales with its largest entries, not with each entry
        scale = grad.abs().max().item()
        torch.testing.assert_close(grads[1][name], grad, atol=ATOL * max(1.0, scale), rtol=RTOL, msg=name)


def test_token_positions_processed(processors):
    """`P / K + C` positions per rollout instead of `P + C`: each group's prompt once, every completion once."""
    processor = processors["qwen3_vl"]
    model = build_model("qwen3_vl", processor, "teacher", seed=1)
    rows = make_rows(processor)
    counts = []

    def count(module, args, kwargs):  # the non-padding positions of the current input
        counts.append(int(kwargs["attention_mask"][:, -kwargs["input_ids"].size(1) :].sum()))

    backbone_of(model).register_forward_pre_hook(count, with_kwargs=True)
    with torch.no_grad():
        shared_prefix_hidden_states(model, rows, prefix_groups(rows))
        full_hidden_states(model, rows)
    prompts = rows["prompt_mask"].sum(dim=1).tolist()
    completions = int(rows["completion_mask"].sum())
    shared_prompt, shared_completion, full = counts
    assert shared_prompt == prompts[0] + prompts[3] + prompts[5]  # one prompt per group
    assert shared_completion == completions
    assert full == sum(prompts) + completions


def test_families_and_settings_without_exact_sharing_say_why(processors):
    model = build_model("qwen3_vl", processors["qwen3_vl"])
    assert "gradient checkpointing" in prefix_sharing_support(model, gradient_checkpointing=True)
    model.config.model_type = "idefics3"
    assert "idefics3 is not among the families" in prefix_sharing_support(model)


# ------------------------------------------------------------------------------------------------- in the trainer
@pytest.mark.parametrize(
    "family,method,per_device,accumulation",
    [
        ("qwen3_vl", ["va_opd"], 8, 1),  # two groups per micro-batch
        ("qwen3_vl", ["va_opd", "vgs"], 2, 4),  # siblings split across micro-batches
        ("qwen2_5_vl", ["va_opd", "vgs"], 4, 2),
        ("llava", ["va_opd"], 4, 2),
    ],
)
def test_sharing_gives_the_unshared_scores_loss_and_update(
    processors, tmp_path, family, method, per_device, accumulation
):
    settings = dict(
        family=family, method=method, per_device_train_batch_size=per_device, gradient_accumulation_steps=accumulation
    )
    full, full_delta, full_teacher, full_student = run_one_step(
        processors, tmp_path / "full", prefix_sharing=False, **settings
    )
    shared, shared_delta, teacher, student = run_one_step(processors, tmp_path / "shared", **settings)
    # Same rollouts (the order of the micro-batches differs: sibling groups are shuffled whole)
    for key in ("completion_ids", "prompt_ids"):
        assert sorted(map(tuple, cat(shared._buffered_inputs, key).tolist())) == sorted(
            map(tuple, cat(full._buffered_inputs, key).tolist())
        )
    logs, full_logs = shared.state.log_history[0], full.state.log_history[0]
    for key in ("loss", "va/mean", "va/top10_share", "weights/max", "weights/min") + (
        ("vgs/visual",) if "vgs" in method else ()
    ):
        assert logs[key] == pytest.approx(full_logs[key], rel=RTOL, abs=ATOL), key
    for name, delta in full_delta.items():
        torch.testing.assert_close(shared_delta[name], delta, atol=ATOL, rtol=1e-3, msg=name)
    # The same rollouts scored, with fewer token positions: each group's prompt runs once per call. A teacher call
    # holds both views of half a micro-batch, as without sharing: with micro-batches of 2, one rollout per view
    assert teacher.rollouts == full_teacher.rollouts and student.rollouts == full_student.rollouts
    assert student.positions < full_student.positions
    assert (teacher.positions < full_teacher.positions) == (per_device >= 4)
    assert full_teacher.prompts == full_student.prompts == 0


def test_counted_positions_are_each_groups_prompt_once_and_every_completion(processors, tmp_path):
    trainer, _, teacher, student = run_one_step(processors, tmp_path, method="va_opd")  # 8 x 1: two groups
    (batch,) = trainer._buffered_inputs
    groups = prefix_groups(split_pixel_values_by_grid(batch))
    prompts = batch["prompt_mask"][groups.first].sum().item()  # one prompt per sibling group
    completions = batch["completion_mask"].sum().item()
    # The teacher scores both views of half a micro-batch per call (one group here): each view's prompt once
    assert teacher.prompts == 2 * groups.num_groups and teacher.positions == 2 * (prompts + completions)
    assert student.prompts == groups.num_groups and student.positions == prompts + completions


def test_a_student_with_gradient_checkpointing_falls_back_and_says_so(processors, tmp_path, caplog):
    import logging

    with caplog.at_level(logging.INFO):
        trainer, _, teacher, student = run_one_step(processors, tmp_path, gradient_checkpointing=True)
    assert student.prompts == 0 and teacher.prompts > 0  # the student runs full passes, the teacher still shares
    assert "the student runs every rollout's prompt in full: gradient checkpointing" in caplog.text
    assert "the teacher runs each sibling group's prompt once" in caplog.text
