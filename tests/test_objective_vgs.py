"""Analytic tests of the VGS objective (docs/methods/vgs.md): the worked example, gradient routing, quantile masks."""

import pytest
import torch

from trl_vaopd.objective import (
    adaptive_gamma,
    lp_mask,
    token_coefficients,
    uniform_rollout_weights,
    valid_quantile,
    vgs_loss,
    vgs_token_loss,
    vgs_token_terms,
)


def _worked_example():
    def logits(*values):
        return torch.tensor([[values]], dtype=torch.float64)

    return logits(1, 0, -1), logits(0.5, 0.5, 0), logits(2, 0, 0), logits(0, 1, 0)


def test_worked_example_of_the_vgs_page():
    terms = vgs_token_terms(*_worked_example(), torch.ones(1, 1))
    assert terms.standard.item() == pytest.approx(0.076667, abs=1e-6)
    assert terms.language.item() == pytest.approx(0.093425, abs=1e-6)
    assert terms.visual.item() == pytest.approx(0.250739, abs=1e-6)
    assert terms.vds.item() == pytest.approx(0.779365, abs=1e-6)
    loss = {m: vgs_token_loss(*terms[:3], 2.0, torch.tensor([[m]]), 0.01).item() for m in (True, False)}
    assert loss[True] == pytest.approx(0.579080, abs=1e-6)
    assert loss[False] == pytest.approx(0.578146, abs=1e-6)


def test_visual_target_of_the_worked_example():
    s, s_cf, t, t_cf = _worked_example()
    log_pbar, log_q, log_qbar = (torch.log_softmax(x, -1) for x in (s_cf, t, t_cf))
    q_star = torch.softmax(log_pbar + log_q - log_qbar, -1)
    assert torch.allclose(q_star, torch.tensor([[[0.883492, 0.043986, 0.072521]]], dtype=torch.float64), atol=1e-6)


def test_each_term_has_gradient_through_its_own_student_distribution_only():
    s, s_cf, t, t_cf = (x.requires_grad_() for x in _worked_example())
    terms = vgs_token_terms(s, s_cf, t, t_cf, torch.ones(1, 1))
    for term, moves in (("standard", "p"), ("visual", "p"), ("language", "pbar")):
        grads = torch.autograd.grad(
            getattr(terms, term).sum(), (s, s_cf, t, t_cf), allow_unused=True, retain_graph=True
        )
        nonzero = [g is not None and g.abs().sum().item() > 0 for g in grads]
        assert nonzero == [moves == "p", moves == "pbar", False, False], term
    assert not terms.vds.requires_grad


def test_terms_are_zero_on_invalid_positions_even_with_non_finite_logits():
    gen = torch.Generator().manual_seed(0)
    logits = [torch.randn(2, 3, 5, generator=gen, dtype=torch.float64) for _ in range(4)]
    logits[0][1, 2] = float("nan")
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    for value in vgs_token_terms(*logits, mask):
        assert torch.all(value[mask == 0] == 0) and torch.isfinite(value).all()


def test_valid_quantile_is_torch_quantile_over_the_valid_tokens():
    gen = torch.Generator().manual_seed(1)
    values = torch.rand(4, 7, generator=gen, dtype=torch.float64)
    mask = torch.rand(4, 7, generator=gen) > 0.3
    for q in (0.1, 0.4, 0.7, 0.95):
        assert valid_quantile(values, mask, q).item() == pytest.approx(torch.quantile(values[mask], q).item())
    assert valid_quantile(values, torch.zeros_like(mask), 0.7).item() == 0.0
    with pytest.raises(ValueError, match="quantile must be in"):
        valid_quantile(values, mask, 1.0)


def test_lp_mask_keeps_the_tokens_above_the_quantile_of_the_whole_batch():
    # VDS 1..10 on valid tokens: Q_0.7 = 7.3, so 8, 9 and 10 are masked in, wherever they sit
    vds = torch.tensor([[1.0, 8.0, 3.0, 99.0], [10.0, 2.0, 9.0, 4.0], [5.0, 6.0, 7.0, 99.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 0]])
    lp = lp_mask(vds, mask, 0.7)
    assert sorted(vds[lp].tolist()) == [8.0, 9.0, 10.0]
    # A micro-batch alone would draw another line: the quantile must be taken over the gathered batch
    assert lp_mask(vds[1:2], mask[1:2], 0.7).sum() == 1


def test_adaptive_gamma_steps_at_the_two_quantiles():
    vds = torch.arange(1.0, 11.0).view(2, 5)
    mask = torch.ones(2, 5)
    gamma = adaptive_gamma(vds, mask, 2.0, (0.4, 0.7))  # Q_0.4 = 4.6, Q_0.7 = 7.3
    assert gamma.flatten().tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    with pytest.raises(ValueError, match="0 < low < high < 1"):
        adaptive_gamma(vds, mask, 2.0, (0.7, 0.4))


def test_vgs_loss_is_eta_times_the_sequence_then_response_then_prompt_mean():
    token_loss = torch.tensor([[1.0, 3.0, 0.0], [2.0, 0.0, 0.0], [4.0, 4.0, 4.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1]])
    groups = [0, 0, 1]  # prompt 0 has two responses, prompt 1 one
    coefficients = token_coefficients(torch.zeros(3, 3), mask, uniform_rollout_weights(groups), group_tokens=False)
    expected = 0.41 * (((2.0 + 2.0) / 2 + 4.0) / 2)
    assert vgs_loss(token_loss, coefficients, 2, 0.41).item() == pytest.approx(expected)
    with pytest.raises(ValueError, match="eta must be > 0"):
        vgs_loss(token_loss, coefficients, 2, 0.0)
