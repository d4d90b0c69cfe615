"""Prefix-shared passes (each sibling group's prompt run once, its KV cache repeated to the rollouts) against full
passes, for every tiny family: hidden states, gradients, the groups found, and the token positions processed."""

import pytest
import torch
from conftest import noise_image
from steps import Passes, cat, run_one_step
from trl.data_utils import prepare_multimodal_messages
from trl.trainer.utils import split_pixel_values_by_grid

from trl_vaopd.evaluation import tokenize_conversations
from trl_vaopd.prefix_sharing import (
    backbone_of,
    call_slices,
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
    for key in ("pixel_values", "image_grid_thw", "image_sizes", "image_position_ids"):
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
    model.config.model_type = "outside_the_table"
    assert "outside_the_table is not among the families" in prefix_sharing_support(model)


# ------------------------------------------------------------------------------------------------- in the trainer
@pytest.mark.parametrize(
    "family,method,per_device,accumulation",
    [
        ("qwen3_vl", ["va_opd"], 8, 1),  # two groups per micro-batch
        ("qwen3_vl", ["va_opd", "vgs"], 2, 4),  # siblings split across micro-batches
        ("qwen2_5_vl", ["va_opd", "vgs"], 4, 2),
        ("qwen2_vl", ["va_opd"], 4, 2),
        ("qwen3_vl_moe", ["va_opd"], 4, 2),
        ("llava", ["va_opd"], 4, 2),
        ("llava_next", ["va_opd"], 4, 2),
        ("llava_onevision", ["va_opd"], 4, 2),
        ("gemma3", ["va_opd", "vgs"], 4, 2),
        ("idefics3", ["va_opd"], 4, 2),
        ("internvl", ["va_opd"], 4, 2),
        ("glm4v", ["va_opd"], 4, 2),
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
    # The same rollouts scored, with fewer token positions: each group's prompt runs once per call, and teacher calls
    # of a micro-batch of rows are cut along sibling groups (with micro-batches of 2, two siblings per piece)
    assert teacher.rollouts == full_teacher.rollouts and student.rollouts == full_student.rollouts
    assert student.positions < full_student.positions and teacher.positions < full_teacher.positions
    assert teacher.max_rows == full_teacher.max_rows == per_device
    assert full_teacher.prompts == full_student.prompts == 0


def test_counted_positions_are_each_groups_prompt_once_and_every_completion(processors, tmp_path):
    trainer, _, teacher, student = run_one_step(processors, tmp_path, method="va_opd")  # 8 x 1: two groups
    (batch,) = trainer._buffered_inputs
    groups = prefix_groups(split_pixel_values_by_grid(batch))
    prompts = batch["prompt_mask"][groups.first].sum().item()  # one prompt per sibling group
    completions = batch["completion_mask"].sum().item()
    # The teacher scores one view of the micro-batch per call (both groups): each group's prompt once per view
    assert teacher.prompts == 2 * groups.num_groups and teacher.positions == 2 * (prompts + completions)
    assert student.prompts == groups.num_groups and student.positions == prompts + completions


def test_calls_are_cut_between_groups_unless_a_group_is_larger_than_a_call():
    assert call_slices([4, 4, 4], 8) == [slice(0, 8), slice(8, 12)]
    # Half a call is not made of whole groups: the next group waits for the next call
    assert call_slices([4, 4, 4], 6) == [slice(0, 4), slice(4, 8), slice(8, 12)]
    assert call_slices([2, 2, 2], 3) == [slice(0, 2), slice(2, 4), slice(4, 6)]
    # A process's share of the generation batch starting and ending inside groups: the pieces are groups of their own
    assert call_slices([2, 4, 2], 6) == [slice(0, 6), slice(6, 8)]
    # Groups larger than a call: pieces of a whole call, the remainder shared with the next group when it fits
    assert call_slices([4, 4], 2) == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)]
    assert call_slices([5, 1], 2) == [slice(0, 2), slice(2, 4), slice(4, 6)]
    assert call_slices([1] * 5, 2) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    with pytest.raises(ValueError, match="max_rows=0"):
        call_slices([4], 0)


# (K, per-device batch, accumulation, method): per-device batches of K, 2K and 3K/2 rollouts for K = 2, 4 and 8 under
# VA-OPD, and one layout under VA-OPD + VGS, whose student runs both views too
GRID = [(2, 2, 2), (2, 4, 1), (2, 3, 2), (4, 4, 2), (4, 8, 1), (4, 6, 2), (8, 8, 1), (8, 16, 1), (8, 12, 2)]
LAYOUTS = [(*layout, ["va_opd"]) for layout in GRID] + [(4, 6, 2, ["va_opd", "vgs"])]


@pytest.mark.parametrize(
    "k,per_device,accumulation,method", LAYOUTS, ids=[f"K{k}-{m}x{a}-{'+'.join(x)}" for k, m, a, x in LAYOUTS]
)
def test_every_layout_runs_each_groups_prompt_once_per_view_and_pass(
    processors, tmp_path, k, per_device, accumulation, method
):
    trainer, _, teacher, student = run_one_step(
        processors,
        tmp_path,
        method=method,
        num_generations=k,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accumulation,
    )
    micro = trainer._buffered_inputs
    prompts = cat(micro, "prompt_mask").sum(dim=1)  # P of each rollout; siblings are consecutive, shuffled whole
    completions = int(cat(micro, "completion_mask").sum())
    n = prompts.numel()
    ids = cat(micro, "prompt_ids")
    assert n == per_device * accumulation and all(torch.equal(ids[i], ids[i - i % k]) for i in range(n))
    group_prompts = int(prompts[::k].sum())
    # The teacher: each group's prompt once per view, every completion once per view, 2 (P/K + C) per rollout; a call
    # never holds more rows than a micro-batch (the base trainer's teacher call)
    assert teacher.prompts == 2 * (n // k)
    assert teacher.positions == 2 * (group_prompts + completions)
    assert teacher.max_rows <= per_device
    # The student: micro-batches of whole groups run P/K + C per rollout; a group cut by a micro-batch boundary (3K/2)
    # runs its prompt once per piece, one extra prompt pass per cut
    pieces = [i for i in range(n) if i % k == 0 or i % per_device == 0]
    views = 2 if "vgs" in method else 1
    assert student.prompts == views * len(pieces)
    assert student.positions == views * (int(prompts[pieces].sum()) + completions)
    assert len(pieces) == n // k + (0 if per_device % k == 0 else accumulation - 1)


@pytest.mark.parametrize("method", [["va_opd"], ["va_opd", "vgs"]])
def test_a_larger_teacher_batch_makes_fewer_calls_over_the_same_positions(processors, tmp_path, method):
    """`teacher_batch_size` trades calls for rows per call: at 2 x 2 (K = 2, 4 rollouts per step) the default scores a
    micro-batch (one group) per call, each view apart, 2 views x 2 groups x (prompt + completions) = 8 calls; 8 rows
    hold both views of the whole generation batch in 2 calls. The same positions run, and the step is the same."""
    layout = dict(method=method, num_generations=2, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    steps = {
        size: run_one_step(processors, tmp_path / str(size), teacher_batch_size=size, **layout) for size in (None, 8)
    }
    (default, default_delta, default_teacher, _), (larger, larger_delta, larger_teacher, _) = steps[None], steps[8]
    assert (default_teacher.calls, default_teacher.max_rows) == (8, 2)
    assert (larger_teacher.calls, larger_teacher.max_rows) == (2, 8)
    assert larger_teacher.positions == default_teacher.positions and larger_teacher.prompts == default_teacher.prompts
    assert larger.state.log_history[0]["loss"] == pytest.approx(default.state.log_history[0]["loss"], rel=RTOL)
    for name, delta in default_delta.items():
        torch.testing.assert_close(larger_delta[name], delta, atol=ATOL, rtol=1e-3, msg=name)


def test_both_views_in_one_call_are_different_prompts(processors, tmp_path):
    """A call holding both views of its rollouts (twice its rows fit) runs each view's prompt of each group once: the
    counterfactual copy of a group differs in pixels, so it is a prefix group of its own, and the scores are those of
    one call per view."""
    trainer, _, _, _ = run_one_step(processors, tmp_path, method=["va_opd", "vgs"], per_device_train_batch_size=4,
                                    gradient_accumulation_steps=2)  # fmt: skip
    passes = Passes(trainer._teacher_module)
    passes.active = True
    batch = trainer._buffered_inputs[0]  # one group of 4, with its counterfactual pixels (VGS keeps them)
    completions = int(batch["completion_mask"].sum())
    scores = {}
    for max_rows in (8, 4):  # both views in one call of 8 rows; one call of 4 rows per view
        passes.prompts = passes.positions = passes.max_rows = 0
        scores[max_rows] = trainer._score_views(batch, max_rows)
        assert passes.prompts == 2  # not 1: the two views' prompts differ in pixels
        assert passes.positions == 2 * (int(batch["prompt_mask"][0].sum()) + completions)
        assert passes.max_rows == max_rows
    for field in ("logp", "cf_logp", "cf_hidden", "view_kl"):
        torch.testing.assert_close(getattr(scores[8], field), getattr(scores[4], field), atol=ATOL, rtol=RTOL)
    assert not torch.allclose(scores[8].logp, scores[8].cf_logp)


def test_a_student_with_gradient_checkpointing_falls_back_and_says_so(processors, tmp_path, caplog):
    import logging

    with caplog.at_level(logging.INFO):
        trainer, _, teacher, student = run_one_step(processors, tmp_path, gradient_checkpointing=True)
    assert student.prompts == 0 and teacher.prompts > 0  # the student runs full passes, the teacher still shares
    assert "the student runs every rollout's prompt in full: gradient checkpointing" in caplog.text
    assert "the teacher runs each sibling group's prompt once" in caplog.text
