"""The chunked per-token divergence and log-probs against explicit float64 references."""

import torch

from trl_vaopd.chunked import OutputHead, per_token_divergence, token_logprobs
from trl_vaopd.objective import vaopd_loss


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
