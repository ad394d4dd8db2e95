"""Closed-form tests of the hybrid objectives (trace_ray.losses); arithmetic in each docstring."""

from __future__ import annotations

import math

import pytest
import torch

from trace_ray import losses as L

LN2 = math.log(2.0)


def softplus(x: float) -> float:
    """−log σ(x) = log(1 + e^{−x}), written independently of torch."""
    return math.log1p(math.exp(-x))


def test_dpo_is_ln2_at_policy_equal_reference():
    """policy = reference → both implicit rewards are 0 → −log σ(0) = ln 2 = 0.693147 per sample."""
    g = torch.Generator().manual_seed(0)
    pc, pr = -10 * torch.rand(5, generator=g), -10 * torch.rand(5, generator=g)
    out = L.dpo_loss(pc, pr, pc.clone(), pr.clone(), beta=0.3)
    assert out.shape == (5,)
    torch.testing.assert_close(out, torch.full((5,), LN2))


def test_dpo_torchtune_published_case():
    """torchtune's DPO test (STYLE.md item 2), β = 0.1.

    r(chosen) = [-0.5+0.5, -10+10.1, -1+0.1] = [0, 0.1, -0.9]
    r(rejected) = [-0.1+0.1, -30+20.1, -21+0.1] = [0, -9.9, -20.9]
    margin = [0, 10, 20]; β·margin = [0, 1, 2]
    −log σ(z) = log(1+e^{−z}) = [0.693147, 0.313262, 0.126928]
    """
    pc = torch.tensor([-0.5, -10.0, -1.0])
    pr = torch.tensor([-0.1, -30.0, -21.0])
    rc = torch.tensor([-0.5, -10.1, -0.1])
    rr = torch.tensor([-0.1, -20.1, -0.1])
    out = L.dpo_loss(pc, pr, rc, rr, beta=0.1)
    expected = torch.tensor([softplus(0.0), softplus(1.0), softplus(2.0)])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, torch.tensor([0.693147, 0.313262, 0.126928]), rtol=0, atol=1e-6)


def test_npo_at_reference_is_two_over_beta_ln2():
    """r(y) = 0 → −(2/β)·log σ(0) = (2/β)·ln 2; β = 0.3 → 4.620981. Unnormalised: ln 2."""
    p = torch.tensor([-3.0, -12.0])
    beta = 0.3
    torch.testing.assert_close(L.npo_loss(p, p.clone(), beta), torch.full((2,), 2 / beta * LN2))
    torch.testing.assert_close(L.npo_loss(p, p.clone(), beta, normalize=False), torch.full((2,), LN2))
    # dual NPO on both responses: 2·(2/β)·ln 2
    torch.testing.assert_close(L.punish_loss(p, p - 1, p.clone(), p - 1, beta), torch.full((2,), 4 / beta * LN2))


def test_npo_is_dpo_without_a_winner():
    """DPO whose winner has r = 0: −log σ(β·(0 − r(y))) = unnormalised NPO; r = [1, −2], β = 0.5 →
    [log(1+e^{0.5}), log(1+e^{−1})]."""
    p, r = torch.tensor([-4.0, -9.0]), torch.tensor([-5.0, -7.0])
    zero = torch.zeros(2)
    npo = L.npo_loss(p, r, beta=0.5, normalize=False)
    torch.testing.assert_close(npo, L.dpo_loss(zero, p, zero, r, beta=0.5))
    torch.testing.assert_close(npo, torch.tensor([softplus(-0.5), softplus(1.0)]))
    torch.testing.assert_close(L.npo_loss(p, r, beta=0.5), npo * 4.0)  # 2/β = 4


def test_invert_is_dpo_with_roles_swapped():
    """r(y_w) = 2, r(y_l) = −1, β = 1: invert = −log σ(r(y_l) − r(y_w)) = log(1 + e^{3})."""
    pc, pr, rc, rr = torch.tensor([-1.0]), torch.tensor([-6.0]), torch.tensor([-3.0]), torch.tensor([-5.0])
    out = L.invert_loss(pc, pr, rc, rr, beta=1.0)
    torch.testing.assert_close(out, torch.tensor([softplus(-3.0)]))
    torch.testing.assert_close(out, L.dpo_loss(pr, pc, rr, rc, beta=1.0))


def test_corrected_is_two_dpos_and_2ln2_at_reference():
    """At policy = reference both DPO terms are ln 2 → 2 ln 2. Off reference: r(c)=1, r(w)=0, r(l)=−1,
    β=1 → log(1+e^{−1}) + log(1+e^{−2})."""
    x = torch.tensor([-2.0, -4.0])
    torch.testing.assert_close(L.corrected_loss(x, x - 1, x - 2, x, x - 1, x - 2, 0.3), torch.full((2,), 2 * LN2))
    out = L.corrected_loss(*(torch.tensor([v]) for v in (0.0, -5.0, -8.0, -1.0, -5.0, -7.0)), beta=1.0)
    torch.testing.assert_close(out, torch.tensor([softplus(1.0) + softplus(2.0)]))


def test_nll_anchor_is_per_token_nll():
    """λ · (−logp)/|y|: logp = [−6, −10], |y| = [3, 4], λ = 0.5 → [1.0, 1.25]; length 0 clamps to 1."""
    out = L.nll_anchor(torch.tensor([-6.0, -10.0, -2.0]), torch.tensor([3, 4, 0]), lam=0.5)
    torch.testing.assert_close(out, torch.tensor([1.0, 1.25, 1.0]))


def test_forward_kl_zero_at_equal_logits_and_positive_otherwise():
    """KL(p‖p) = 0; KL(p‖q) > 0 for p ≠ q; matches torch.distributions' Categorical KL averaged over
    the masked positions; masked-out positions do not matter."""
    g = torch.Generator().manual_seed(1)
    ref = torch.randn(3, 5, 7, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    torch.testing.assert_close(L.forward_kl(ref, ref.clone(), mask), torch.zeros(3))
    pol = torch.randn(3, 5, 7, generator=g)
    kl = L.forward_kl(ref, pol, mask)
    assert (kl[:2] > 0).all() and kl[2] == 0
    dist = torch.distributions
    per_t = dist.kl_divergence(dist.Categorical(logits=ref), dist.Categorical(logits=pol))  # [3, 5]
    expected = torch.stack([per_t[0, :3].mean(), per_t[1, 1:].mean(), torch.tensor(0.0)])
    torch.testing.assert_close(kl, expected)
    pol2 = pol.clone()
    pol2[0, 4] += 100.0  # a masked-out position
    torch.testing.assert_close(L.forward_kl(ref, pol2, mask), kl)


def _batch():
    # categories: invert, punish, retain, unresolved, invert
    cat = ["invert", "punish", "retain", "unresolved", "invert"]
    g = torch.Generator().manual_seed(2)
    pc = (-5 * torch.rand(5, generator=g)).requires_grad_()
    pr = (-5 * torch.rand(5, generator=g)).requires_grad_()
    rc, rr = -5 * torch.rand(5, generator=g), -5 * torch.rand(5, generator=g)
    return cat, pc, pr, rc, rr


def test_token_kl_closed_form():
    """p_ref = (1/2, 1/2), p_θ = (1/4, 3/4): KL = ½·ln(½/¼) + ½·ln(½/¾) = ½·ln(4/3) = 0.143841;
    the reverse pair gives ¼·ln(¼/½) + ¾·ln(¾/½) = 0.130812 (KL is not symmetric)."""
    half = torch.tensor([0.5, 0.5]).log()
    skew = torch.tensor([0.25, 0.75]).log()
    assert float(L.token_kl(half, skew)) == pytest.approx(0.5 * math.log(4 / 3), rel=1e-6)
    assert float(L.token_kl(half, skew)) == pytest.approx(0.143841, rel=1e-5)
    assert float(L.token_kl(skew, half)) == pytest.approx(0.130812, rel=1e-5)
    assert float(L.token_kl(half, half)) == 0.0


def test_trace_loss_combines_by_category_once():
    """mean reduction: (w0·L_I0 + w4·L_I4 + w1·L_II1)/3 + α·KL2/1, each term computed by hand."""
    cat, pc, pr, rc, rr = _batch()
    w = torch.tensor([0.5, 2.0, 7.0, 9.0, 1.5])
    kl = torch.tensor([100.0, 100.0, 0.4, 100.0, 100.0])  # only row 2 (retain) may count
    total, parts = L.trace_loss(cat, pc, pr, rc, rr, weights=w, kl=kl, beta=0.3, alpha_kl=0.1)
    inv = L.invert_loss(pc, pr, rc, rr, 0.3)
    pun = L.punish_loss(pc, pr, rc, rr, 0.3)
    l_i = (0.5 * inv[0] + 1.5 * inv[4]) / 3
    l_ii = 2.0 * pun[1] / 3
    torch.testing.assert_close(parts["L_I"], l_i.detach())
    torch.testing.assert_close(parts["L_II"], l_ii.detach())
    torch.testing.assert_close(parts["L_KL"], torch.tensor(0.4))
    torch.testing.assert_close(total, l_i + l_ii + 0.1 * 0.4)
    assert parts["L_anchor"] == 0
    assert (int(parts["n_invert"]), int(parts["n_punish"]), int(parts["n_retain"])) == (2, 1, 1)
    # sum reduction: numerators only
    total_s, _ = L.trace_loss(cat, pc, pr, rc, rr, weights=w, kl=kl, reduction="sum")
    torch.testing.assert_close(total_s, 3 * (l_i + l_ii) + 0.1 * 0.4)
    # codes and names are the same thing
    codes = torch.tensor([L.CATEGORY_CODES[c] for c in cat])
    torch.testing.assert_close(L.trace_loss(codes, pc, pr, rc, rr, weights=w, kl=kl)[0], total)


def test_zero_weight_gives_zero_gradient():
    """w_0 = 0 → ∂L_TRACE/∂(logps of sample 0) = 0 exactly; other invert sample keeps a gradient.
    Retain and unresolved rows never get a preference gradient."""
    cat, pc, pr, rc, rr = _batch()
    w = torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0])
    total, _ = L.trace_loss(cat, pc, pr, rc, rr, weights=w, nll_lambda=0.7, rejected_lengths=torch.full((5,), 4))
    total.backward()
    assert pc.grad[0] == 0 and pr.grad[0] == 0
    assert pc.grad[2] == 0 and pr.grad[2] == 0 and pc.grad[3] == 0 and pr.grad[3] == 0
    assert pc.grad[4] != 0 and pr.grad[4] != 0 and pc.grad[1] != 0


def test_nll_anchor_in_trace_loss_is_weighted_and_on_compliant_winner():
    """λ = 0.5, |y| = 4: invert rows add w·0.5·(−logp(y_l))/4; punish rows (no winner) add nothing;
    with a correction y_c the punish row uses corrected DPO + anchor on y_c."""
    cat, pc, pr, rc, rr = _batch()
    w = torch.tensor([0.5, 2.0, 1.0, 1.0, 1.5])
    lengths = torch.full((5,), 4)
    _, base = L.trace_loss(cat, pc, pr, rc, rr, weights=w)
    _, parts = L.trace_loss(cat, pc, pr, rc, rr, weights=w, nll_lambda=0.5, rejected_lengths=lengths)
    anchor = (0.5 * 0.5 * -pr[0] / 4 + 1.5 * 0.5 * -pr[4] / 4) / 3
    torch.testing.assert_close(parts["L_anchor"], anchor.detach())
    torch.testing.assert_close(parts["L_I"], base["L_I"] + anchor.detach())
    torch.testing.assert_close(parts["L_II"], base["L_II"])
    pcor, rcor = torch.tensor([-1.0] * 5), torch.tensor([-2.0] * 5)
    hc = torch.tensor([False, True, False, False, False])
    _, pc_parts = L.trace_loss(
        cat, pc, pr, rc, rr, weights=w, nll_lambda=0.5, rejected_lengths=lengths,
        policy_corrected_logps=pcor, ref_corrected_logps=rcor, has_corrected=hc, corrected_lengths=lengths,
    )
    cor = L.corrected_loss(pcor, pc, pr, rcor, rc, rr, 0.3)[1] + 0.5 * 1.0 / 4
    torch.testing.assert_close(pc_parts["L_II"], (2.0 * cor / 3).detach())


def test_unknown_category_and_bad_reduction_are_clear_errors():
    _, pc, pr, rc, rr = _batch()
    with pytest.raises(ValueError, match="category.*'bogus'"):
        L.trace_loss(["bogus"] * 5, pc, pr, rc, rr)
    with pytest.raises(ValueError, match="reduction"):
        L.trace_loss(["invert"] * 5, pc, pr, rc, rr, reduction="avg")
