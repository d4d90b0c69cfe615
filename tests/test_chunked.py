"""The chunked per-token divergences and log-probs against explicit float64 full-logit references."""

import pytest
import torch

from trl_vaopd import chunked
from trl_vaopd.chunked import OutputHead, per_token_divergence, token_logprobs, vgs_divergences
from trl_vaopd.objective import vaopd_loss, vgs_token_terms, view_kl_advantage


def _setup(seed=0, n=3, t=5, hs=6, ht=8, vocab=37):
    gen = torch.Generator().manual_seed(seed)
    hidden_s = torch.randn(n, t, hs, generator=gen, dtype=torch.float64)
    hidden_t = torch.randn(n, t, ht, generator=gen, dtype=torch.float64)
    w_s = torch.randn(vocab, hs, generator=gen, dtype=torch.float64)
    w_t = torch.randn(vocab, ht, generator=gen, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
    return hidden_s, hidden_t, w_s, w_t, mask


def test_reverse_kl_with_coefficients_matches_float64_reference_and_gradient():
    hidden_s, hidden_t, w_s, w_t, mask = _setup()
    coeff = torch.rand(mask.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * mask
    temperature = 1.3

    h32 = hidden_s.float().requires_grad_()
    kl, entropy = per_token_divergence(
        h32, hidden_t.float(), OutputHead(w_s.float(), None), OutputHead(w_t.float(), None), mask, 1.0, temperature
    )
    loss = vaopd_loss(kl, coeff.float(), num_prompts=2)
    loss.backward()

    h64 = hidden_s.clone().requires_grad_()
    log_ps = torch.log_softmax(h64 @ w_s.T / temperature, -1)
    log_pt = torch.log_softmax(hidden_t @ w_t.T / temperature, -1)
    ref_kl = (log_ps.exp() * (log_ps - log_pt)).sum(-1) * mask
    ref_entropy = -(log_ps.exp() * log_ps).sum(-1) * mask
    ref_loss = (coeff * ref_kl).sum() / 2
    ref_loss.backward()

    assert torch.allclose(kl.double(), ref_kl.detach(), atol=1e-5)
    assert torch.allclose(entropy.double(), ref_entropy.detach(), atol=1e-5)
    assert torch.allclose(loss.double(), ref_loss.detach(), atol=1e-6)
    assert torch.allclose(h32.grad.double(), h64.grad, atol=1e-5)
    assert torch.all(kl[mask == 0] == 0)


def test_forward_kl_direction():
    hidden_s, hidden_t, w_s, w_t, mask = _setup(seed=1)
    kl, _ = per_token_divergence(
        hidden_s.float(), hidden_t.float(), OutputHead(w_s.float(), None), OutputHead(w_t.float(), None), mask, 0.0
    )
    log_ps = torch.log_softmax(hidden_s @ w_s.T, -1)
    log_pt = torch.log_softmax(hidden_t @ w_t.T, -1)
    ref = (log_pt.exp() * (log_pt - log_ps)).sum(-1) * mask
    assert torch.allclose(kl.double(), ref, atol=1e-5)


def test_token_logprobs_match_log_softmax_with_bias_scale_and_softcap():
    _, hidden, _, w, mask = _setup(seed=2)
    bias = torch.randn(w.size(0), dtype=torch.float64)
    tokens = torch.randint(0, w.size(0), mask.shape, generator=torch.Generator().manual_seed(4))
    head = OutputHead(w.float(), bias.float(), logit_scale=0.5, softcap=3.0)
    got = token_logprobs(hidden.float(), head, tokens, mask, temperature=0.8)
    logits = 3.0 * torch.tanh((hidden @ w.T + bias) * 0.5 / 3.0) / 0.8
    ref = torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1) * mask
    assert torch.allclose(got.double(), ref, atol=1e-5)
    assert torch.all(got[mask == 0] == 0)


@pytest.mark.parametrize("softcap, pad", [(None, 0), (3.0, 6)])
def test_view_kl_advantage_from_the_teachers_states_matches_the_float64_full_logit_reference(softcap, pad):
    # The trainer's teacher_view_kl VA: the chunked divergence of the teacher's head against itself, from its hidden
    # states of the two views, then `view_kl_advantage`
    _, hidden, _, w, mask = _setup(seed=8)
    gen = torch.Generator().manual_seed(9)
    hidden_cf = hidden + 0.7 * torch.randn(hidden.shape, generator=gen, dtype=torch.float64)
    vocab = w.size(0)
    w = torch.cat([w, 5 * torch.randn(pad, w.size(1), generator=gen, dtype=torch.float64)])  # a padded head
    bias = torch.randn(w.size(0), generator=gen, dtype=torch.float64)
    head = OutputHead(w.float(), bias.float(), 0.8, softcap, vocab if pad else None)
    temperature = 1.3
    view_kl, _ = per_token_divergence(hidden.float(), hidden_cf.float(), head, head, mask, 1.0, temperature)
    got = view_kl_advantage(view_kl, mask)

    def log_probs(h):
        z = (h @ w[:vocab].T + bias[:vocab]) * 0.8
        return torch.log_softmax((softcap * torch.tanh(z / softcap) if softcap else z) / temperature, -1)

    log_q, log_qbar = log_probs(hidden), log_probs(hidden_cf)
    ref = (log_q.exp() * (log_q - log_qbar)).sum(-1) * mask
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)
    assert torch.all(got[mask == 0] == 0) and torch.all(got[mask == 1] > 1e-3)


@pytest.mark.parametrize(
    "case",
    [
        {"softcap": None, "scale": 1.0, "bias": False, "pad": (0, 0), "tile": 2**25},
        {"softcap": None, "scale": 1.0, "bias": True, "pad": (0, 0), "tile": 2 * 37},  # chunks of 2 tokens
        {"softcap": 3.0, "scale": 0.7, "bias": True, "pad": (0, 0), "tile": 3 * 37},
        {"softcap": None, "scale": 1.3, "bias": True, "pad": (4, 9), "tile": 2 * 37},  # heads padded differently
    ],
)
def test_vgs_divergences_and_their_gradients_match_the_float64_full_logit_reference(monkeypatch, case):
    monkeypatch.setattr(chunked, "VGS_TILE_ELEMENTS", case["tile"])
    hidden_s, hidden_t, w_s, w_t, mask = _setup(seed=5)
    gen = torch.Generator().manual_seed(6)
    hidden_s_cf = torch.randn(hidden_s.shape, generator=gen, dtype=torch.float64)
    hidden_t_cf = torch.randn(hidden_t.shape, generator=gen, dtype=torch.float64)
    vocab = w_s.size(0)
    pad_s, pad_t = case["pad"]
    w_s = torch.cat([w_s, 5 * torch.randn(pad_s, w_s.size(1), generator=gen, dtype=torch.float64)])
    w_t = torch.cat([w_t, 5 * torch.randn(pad_t, w_t.size(1), generator=gen, dtype=torch.float64)])
    b_s = torch.randn(w_s.size(0), generator=gen, dtype=torch.float64) if case["bias"] else None
    b_t = torch.randn(w_t.size(0), generator=gen, dtype=torch.float64) if case["bias"] else None
    compared = vocab if pad_s or pad_t else None
    temperature = 1.2

    def logits(h, w, b, scale, softcap):
        z = (h @ w[:vocab].T + (0 if b is None else b[:vocab])) * scale
        return (softcap * torch.tanh(z / softcap) if softcap else z) / temperature

    # float32 chunked path
    leaves32 = [t.float().requires_grad_() for t in (hidden_s, hidden_s_cf, w_s)] + (
        [b_s.float().requires_grad_()] if b_s is not None else []
    )
    h_p, h_pbar, ws32 = leaves32[:3]
    s_head = OutputHead(ws32, leaves32[3] if b_s is not None else None, case["scale"], case["softcap"], compared)
    t_head = OutputHead(w_t.float(), None if b_t is None else b_t.float(), 0.9, None, compared)
    got = vgs_divergences(h_p, h_pbar, hidden_t.float(), hidden_t_cf.float(), s_head, t_head, mask, temperature)

    # float64 full-logit reference
    leaves64 = [t.clone().requires_grad_() for t in (hidden_s, hidden_s_cf, w_s)] + (
        [b_s.clone().requires_grad_()] if b_s is not None else []
    )
    r_p, r_pbar, ws64 = leaves64[:3]
    rb = leaves64[3] if b_s is not None else None
    ref = vgs_token_terms(
        logits(r_p, ws64, rb, case["scale"], case["softcap"]),
        logits(r_pbar, ws64, rb, case["scale"], case["softcap"]),
        logits(hidden_t, w_t, b_t, 0.9, None),
        logits(hidden_t_cf, w_t, b_t, 0.9, None),
        mask,
    )
    for value, expected in zip(got[:3], ref[:3], strict=True):
        torch.testing.assert_close(value.double(), expected.detach(), rtol=1e-5, atol=1e-6)
        assert torch.all(value[mask == 0] == 0)
    log_p = torch.log_softmax(logits(hidden_s, w_s, b_s, case["scale"], case["softcap"]), -1)
    torch.testing.assert_close(got[3].double(), (-(log_p.exp() * log_p).sum(-1) * mask), rtol=1e-5, atol=1e-6)
    # The visual target's diagnostics: KL(q* || q) and where q* and q disagree on the top token
    torch.testing.assert_close(got[4].double(), ref.target_shift, rtol=1e-5, atol=1e-6)
    assert torch.equal(got[5].double(), ref.target_flip) and 0 < ref.target_flip.sum() < mask.sum()

    # Gradients of an arbitrary weighting of the three terms, with respect to both student passes and the head
    weights = torch.rand(3, *mask.shape, generator=gen, dtype=torch.float64)
    sum(((w.float() * v).sum() for w, v in zip(weights, got[:3], strict=True))).backward()
    sum(((w * v).sum() for w, v in zip(weights, ref[:3], strict=True))).backward()
    for name, a, b in zip(("h_p", "h_pbar", "weight", "bias"), leaves32, leaves64, strict=False):
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert leaves32[2].grad[vocab:].abs().sum() == 0  # padding rows are not compared


def test_vgs_divergences_route_each_term_to_its_own_student_pass():
    hidden_s, hidden_t, w_s, w_t, mask = _setup(seed=7)
    h_p, h_pbar = hidden_s.float().requires_grad_(), (hidden_s + 0.5).float().requires_grad_()
    heads = OutputHead(w_s.float(), None), OutputHead(w_t.float(), None)
    standard, visual, language, *_ = vgs_divergences(
        h_p, h_pbar, hidden_t.float(), hidden_t.float() - 0.3, *heads, mask
    )
    # KL(p || q) and KL(p || q*) move p only (q* holds pbar detached); KL(pbar || qbar) moves pbar only
    for term, moves_p in ((standard, True), (visual, True), (language, False)):
        grads = torch.autograd.grad(term.sum(), (h_p, h_pbar), allow_unused=True, retain_graph=True)
        assert (grads[0] is not None and grads[0].abs().sum() > 0) == moves_p
        assert (grads[1] is not None and grads[1].abs().sum() > 0) == (not moves_p)
