"""Analytic tests of the VA-OPD objective (docs/methods/va_opd.md, "Visual advantage" to "Worked example")."""

import math

import pytest
import torch

from trl_vaopd.objective import (
    high_va_mask,
    mask_coefficients,
    rollout_weights,
    token_coefficients,
    token_mean_coefficients,
    uniform_rollout_weights,
    va_mass_share,
    va_token_mask,
    vaopd_loss,
    view_kl_advantage,
    visual_advantage,
)


def test_visual_advantage_is_positive_gap_on_valid_tokens_and_detached():
    lo = torch.tensor([[-1.0, -2.0, -0.5, -math.inf]], requires_grad=True)
    lc = torch.tensor([[-3.0, -1.0, -0.5, -1.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    va = visual_advantage(lo, lc, mask)
    assert torch.equal(va, torch.tensor([[2.0, 0.0, 0.0, 0.0]]))
    assert not va.requires_grad


def test_visual_advantage_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="equal shapes"):
        visual_advantage(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3))


def test_view_kl_advantage_scores_a_right_and_a_wrong_sampled_token_alike():
    # docs/methods/va_opd.md, "Variant: the teacher's view divergence": the teacher is sure of token 0 with the image
    # (logits 3, 0, 0) and undecided without it (uniform). The student sampled token 0 (right) at the first position
    # and token 1 (wrong) at the second, from the same teacher distributions
    log_q = torch.log_softmax(torch.tensor([[[3.0, 0.0, 0.0]] * 2], dtype=torch.float64), dim=-1)
    log_qbar = torch.log_softmax(torch.zeros(1, 2, 3, dtype=torch.float64), dim=-1)
    sampled = torch.tensor([[0, 1]])
    mask = torch.ones(1, 2)

    def token(logp):
        return logp.gather(-1, sampled.unsqueeze(-1)).squeeze(-1)

    paper = visual_advantage(token(log_q), token(log_qbar), mask)
    assert paper[0].tolist() == pytest.approx([1.003689, 0.0], abs=1e-6)  # high if right, 0 if wrong
    view_kl = (log_q.exp() * (log_q - log_qbar)).sum(-1)
    assert view_kl_advantage(view_kl, mask)[0].tolist() == pytest.approx([0.732018, 0.732018], abs=1e-6)


def test_view_kl_advantage_is_zero_on_invalid_positions_clipped_and_detached():
    view_kl = torch.tensor([[0.5, -1e-8, float("nan")]], requires_grad=True)
    va = view_kl_advantage(view_kl, torch.tensor([[1, 1, 0]]))
    assert va.tolist() == [[0.5, 0.0, 0.0]] and not va.requires_grad  # rounding below 0 clipped, padding 0
    with pytest.raises(ValueError, match="equal shapes"):
        view_kl_advantage(torch.zeros(2, 3), torch.ones(2, 4))


def test_rollout_weights_reproduce_the_papers_method_figure():
    w = rollout_weights(torch.tensor([0.045, 0.030, 0.020, 0.010], dtype=torch.float64), [0, 0, 0, 0])
    assert torch.allclose(w, torch.tensor([0.656, 0.206, 0.095, 0.044], dtype=torch.float64), atol=5e-4)


def test_rollout_weights_match_a_direct_float64_computation():
    m = torch.tensor([0.3, 0.1, 0.7, 0.2, 5.0, 1.0], dtype=torch.float64)
    groups = torch.tensor([7, 7, 7, 3, 3, 3])
    w = rollout_weights(m, groups, temperature=0.5, eps=1e-6)
    for g in (7, 3):
        sel = groups == g
        mg = m[sel]
        z = (mg - mg.mean()) / (mg.std(unbiased=False) + 1e-6)
        assert torch.allclose(w[sel], torch.softmax(z / 0.5, dim=0))


def test_rollout_weights_equal_means_singletons_and_sums():
    w = rollout_weights(torch.tensor([0.2, 0.2, 0.2, 0.9]), ["a", "a", "a", "b"])
    assert torch.allclose(w, torch.tensor([1 / 3, 1 / 3, 1 / 3, 1.0]))


def test_rollout_weights_groups_need_not_be_contiguous():
    m = torch.tensor([0.045, 0.5, 0.030, 0.020, 0.7, 0.010], dtype=torch.float64)
    w = rollout_weights(m, [0, 1, 0, 0, 1, 0])
    assert torch.allclose(w[[0, 2, 3, 5]], torch.tensor([0.656, 0.206, 0.095, 0.044], dtype=torch.float64), atol=5e-4)
    assert torch.allclose(w[[1, 4]].sum(), torch.tensor(1.0, dtype=torch.float64))


@pytest.mark.parametrize("bad", [{"temperature": 0.0}, {"eps": 0.0}])
def test_rollout_weights_reject_bad_settings(bad):
    with pytest.raises(ValueError):
        rollout_weights(torch.ones(2), [0, 0], **bad)


def test_uniform_weights():
    assert torch.allclose(
        uniform_rollout_weights([1, 1, 2, 1]), torch.tensor([1 / 3, 1 / 3, 1.0, 1 / 3], dtype=torch.float64)
    )


def test_high_group_takes_ceil_fraction_with_ties_broken_by_position():
    va = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    mask = torch.ones_like(va)
    # ceil(0.2 * 10) = 2 tokens; three tie at 3.0, the two earliest win
    assert high_va_mask(va, mask, 0.2).nonzero()[:, 1].tolist() == [1, 2]


def test_high_group_ignores_invalid_positions():
    va = torch.tensor([[0.1, 0.2, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 0, 0]])
    assert high_va_mask(va, mask, 0.2).tolist() == [[False, True, False, False]]


def test_high_group_size_is_robust_to_float_rounding():
    # 0.1 * 30 is 3.0000000000000004 in floating point: ceil must still give 3
    va = torch.arange(30.0).unsqueeze(0)
    assert int(high_va_mask(va, torch.ones_like(va), 0.1).sum()) == 3


def test_token_coefficients_reproduce_the_worked_example_loss():
    a = torch.tensor([[5.0, 1, 1, 1, 1], [1, 5, 1, 1, 1], [2, 0, 0, 0, 0]])
    kl = torch.tensor([[10.0, 2, 2, 2, 2], [2, 20, 2, 2, 2], [3, 0, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    mean_va = a.sum(1) / mask.sum(1)
    w = rollout_weights(mean_va, ["a", "a", "b"])
    assert torch.allclose(w, torch.tensor([0.5, 0.5, 1.0]))
    c = token_coefficients(a, mask, w)
    per_response = (c * kl).sum(1)
    assert torch.allclose(per_response, torch.tensor([3.0, 5.5, 3.0]))
    assert torch.isclose(vaopd_loss(kl, c, num_prompts=2), torch.tensor(5.75))


def test_coefficients_sum_to_weights_per_response_and_one_per_prompt():
    gen = torch.Generator().manual_seed(0)
    va = torch.rand(8, 13, generator=gen)
    lengths = torch.tensor([13, 1, 5, 0, 7, 2, 13, 4])
    mask = (torch.arange(13) < lengths.unsqueeze(1)).long()
    groups = [0, 0, 0, 0, 1, 1, 1, 1]
    w = rollout_weights(va.sum(1) / mask.sum(1).clamp(min=1), groups)
    c = token_coefficients(va, mask, w)
    expected = torch.where(lengths > 0, w, torch.zeros_like(w))
    assert torch.allclose(c.sum(1), expected.to(c.dtype))
    assert torch.all(c[mask == 0] == 0)


def test_single_token_and_full_high_fraction_put_all_weight_on_high_group():
    va = torch.tensor([[0.5, 0.0, 0.0], [0.1, 0.2, 0.3]])
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]])
    c1 = token_coefficients(va, mask, torch.tensor([0.7, 1.0]))
    assert torch.allclose(c1[0], torch.tensor([0.7, 0.0, 0.0]))
    c2 = token_coefficients(va, mask, torch.tensor([0.7, 1.0]), high_fraction=1.0)
    assert torch.allclose(c2[1], torch.full((3,), 1 / 3))


def test_empty_response_gets_no_coefficients():
    c = token_coefficients(torch.zeros(1, 4), torch.zeros(1, 4), torch.ones(1))
    assert torch.equal(c, torch.zeros(1, 4))


def test_both_switches_off_is_standard_opd():
    gen = torch.Generator().manual_seed(1)
    kl = torch.rand(6, 9, generator=gen)
    va = torch.rand(6, 9, generator=gen)
    lengths = torch.tensor([9, 3, 5, 9, 1, 6])
    mask = (torch.arange(9) < lengths.unsqueeze(1)).float()
    groups = [0, 0, 0, 1, 1, 1]
    c = token_coefficients(va, mask, uniform_rollout_weights(groups), group_tokens=False)
    loss = vaopd_loss(kl, c, num_prompts=2)
    # Eq. 1: mean token KL within each response, then mean over responses
    per_response = (kl * mask).sum(1) / mask.sum(1)
    assert torch.isclose(loss, per_response.mean().to(loss.dtype))


def test_token_mean_is_the_plain_mean_over_every_token_of_the_batch():
    gen = torch.Generator().manual_seed(1)
    kl = torch.rand(6, 9, generator=gen, dtype=torch.float64)
    lengths = torch.tensor([9, 3, 5, 9, 1, 6])
    mask = (torch.arange(9) < lengths.unsqueeze(1)).double()
    groups = [0, 0, 0, 1, 1, 1]
    c = token_coefficients(torch.zeros_like(kl), mask, uniform_rollout_weights(groups), group_tokens=False)
    # The batch split in two (two processes or micro-batches), normalised by the whole batch's counts
    halves = [token_mean_coefficients(c[r], mask[r], 6, int(mask.sum())) for r in (slice(0, 2), slice(2, 6))]
    loss = sum(vaopd_loss(kl[r], h, num_prompts=2) for r, h in zip((slice(0, 2), slice(2, 6)), halves, strict=True))
    # verl's token-mean: every valid token of the batch alike, 33 of them
    assert torch.isclose(loss, (kl * mask).sum() / 33)
    assert not torch.isclose(loss, ((kl * mask).sum(1) / mask.sum(1)).mean())


def test_token_mean_scales_each_response_by_its_length_over_the_mean():
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.float64)
    c = torch.tensor([[0.1, 0.1, 0.2, 0.2], [0.2, 0.2, 0.0, 0.0]], dtype=torch.float64)  # weights 0.6 and 0.4
    out = token_mean_coefficients(c, mask, num_responses=2, num_tokens=6)
    torch.testing.assert_close(out.sum(dim=1), torch.tensor([0.6 * 4 / 3, 0.4 * 2 / 3], dtype=torch.float64))
    torch.testing.assert_close(out / c.clamp(min=1e-12) * (c > 0), (c > 0) * torch.tensor([[4 / 3], [2 / 3]]).double())
    with pytest.raises(ValueError, match="must be > 0"):
        token_mean_coefficients(c, mask, num_responses=2, num_tokens=0)


def test_uniform_weights_with_grouping_differ_from_standard_opd():
    kl = torch.tensor([[10.0, 1, 1, 1, 1]])
    va = torch.tensor([[5.0, 0, 0, 0, 0]])
    mask = torch.ones(1, 5)
    grouped = vaopd_loss(kl, token_coefficients(va, mask, torch.ones(1)), 1)
    plain = vaopd_loss(kl, token_coefficients(va, mask, torch.ones(1), group_tokens=False), 1)
    assert torch.isclose(grouped, torch.tensor(0.5 * 10 + 0.5 * 1.0))
    assert torch.isclose(plain, torch.tensor(14 / 5))


def test_coefficients_carry_no_gradient_into_the_loss():
    kl = torch.rand(2, 3, requires_grad=True)
    c = torch.rand(2, 3, requires_grad=True)
    vaopd_loss(kl, c, 1).backward()
    assert c.grad is None
    assert torch.allclose(kl.grad, c.detach())


@pytest.mark.parametrize("kwargs", [{"high_fraction": 0.0}, {"high_fraction": 1.5}, {"high_weight": -0.1}])
def test_token_coefficients_reject_out_of_range(kwargs):
    with pytest.raises(ValueError):
        token_coefficients(torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1), **kwargs)


def test_va_mass_share():
    va = torch.tensor([[10.0, 0, 0, 0, 0, 0, 0, 0, 0, 0], [0.0] * 9 + [10.0]])
    mask = torch.ones_like(va)
    assert va_mass_share(va, mask, 0.1) == pytest.approx(1.0)
    assert va_mass_share(torch.ones(1, 10), torch.ones(1, 10), 0.1) == pytest.approx(0.1)
    assert va_mass_share(torch.zeros(1, 4), torch.ones(1, 4), 0.1) == 0.0


def test_va_token_mask_takes_the_chosen_tokens_out_with_random_ties():
    va = torch.tensor([[0.5, 3.0, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1] * 10 + [0]])  # 10 valid tokens: ceil(0.2 * 10) = 2 masked
    ties = torch.rand(1, 11, generator=torch.Generator().manual_seed(0))
    assert va_token_mask(va, mask, "top", 0.2, ties).nonzero()[:, 1].tolist() == [1, 4]
    low = va_token_mask(va, mask, "low", 0.2, ties)
    assert low.sum() == 2 and (va[low] == 0).all() and not low[0, 10]
    # Among the eight zero-VA tokens, which two go depends on the tie breaker, not on position
    picks = {
        tuple(
            va_token_mask(va, mask, "low", 0.2, torch.rand(1, 11, generator=torch.Generator().manual_seed(s)))
            .nonzero()[:, 1]
            .tolist()
        )
        for s in range(20)
    }
    assert len(picks) > 3
    assert va_token_mask(va, mask, "random", 0.2, ties).sum() == 2
    one = torch.tensor([[1] + [0] * 10])
    assert not va_token_mask(va, one, "top", 0.5, ties).any()  # a response keeps at least one token


def test_mask_coefficients_average_the_kept_tokens_with_the_rollout_weight():
    coefficients = torch.tensor([[0.1, 0.1, 0.1, 0.1, 0.0], [0.5, 0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 0, 0, 0, 0]])
    masked = torch.tensor([[False, True, False, False, False], [False] * 5])
    out = mask_coefficients(coefficients, mask, masked)
    assert torch.allclose(out[0], torch.tensor([0.4 / 3, 0, 0.4 / 3, 0.4 / 3, 0], dtype=torch.float64))
    assert torch.allclose(out[1], coefficients[1])


def test_va_token_mask_rejects_bad_settings():
    va, mask, ties = torch.zeros(1, 3), torch.ones(1, 3), torch.rand(1, 3)
    with pytest.raises(ValueError, match="mode must be one of"):
        va_token_mask(va, mask, "middle", 0.1, ties)
    with pytest.raises(ValueError, match="fraction must be in"):
        va_token_mask(va, mask, "top", 1.0, ties)
