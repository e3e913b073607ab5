"""Each loss against a value computed by hand, the identities between them, and window_mean's normalisation."""
import math

import pytest
import torch
import torch.nn.functional as F

from minirlhf.losses import (PREFERENCE_LOSSES, add_nll, lr_at, bradley_terry_loss, dpo_loss, hinge_loss, ipo_loss,
                             pairwise_preference_loss, preference_probability, window_mean)

t = torch.tensor


def close(a, b, tol=1e-6):
    torch.testing.assert_close(a, torch.as_tensor(b, dtype=a.dtype), atol=tol, rtol=tol)


def test_bradley_terry_hand_values():
    """r_c = 1, r_r = 0: -log sigmoid(1) = log(1 + e^-1) = 0.3132617;
    with margin 0.5: log(1 + e^-0.5) = 0.4740770; r_c = r_r: log 2 = 0.6931472."""
    close(bradley_terry_loss(t([1.0, 2.0]), t([0.0, 2.0])), [0.3132617, 0.6931472])
    close(bradley_terry_loss(t([1.0]), t([0.0]), margin=t([0.5])), [0.4740770])


def test_bradley_terry_is_softplus():
    g = torch.Generator().manual_seed(0)
    rc, rr = torch.randn(100, generator=g) * 5, torch.randn(100, generator=g) * 5
    close(bradley_terry_loss(rc, rr), F.softplus(rr - rc), tol=1e-5)


def test_pairwise_preference_hand_values():
    """p("A" | A=y_c) = 0.8, p("B" | A=y_r, B=y_c) = 0.6: L = -(ln 0.8 + ln 0.6) / 2 = 0.3669845.
    Probability: order ab gives p(A)=0.6, p(B)=0.2 -> 0.6/0.8 = 0.75; order ba gives p(A)=p(B)=0.3 -> a (shown
    second) wins with 0.5; P(a > b) = (0.75 + 0.5) / 2 = 0.625."""
    close(pairwise_preference_loss(t([0.8]).log(), t([0.6]).log()), [0.3669845])
    close(preference_probability(t([[0.6, 0.2]]).log(), t([[0.3, 0.3]]).log()), [0.625])
    # a position-biased model that always says "A" (0.9 vs 0.1) in both orders is undecided after averaging
    close(preference_probability(t([[0.9, 0.1]]).log(), t([[0.9, 0.1]]).log()), [0.5])


def logps4(seed=0, n=8):
    g = torch.Generator().manual_seed(seed)
    return [-10 * torch.rand(n, generator=g) for _ in range(4)]


def test_dpo_is_ln2_when_policy_equals_ref():
    pc, pr, _, _ = logps4()
    losses, cr, rr = dpo_loss(pc, pr, pc.clone(), pr.clone(), beta=0.1)
    close(losses, torch.full_like(pc, math.log(2)))
    close(cr, torch.zeros_like(pc))
    close(rr, torch.zeros_like(pc))


def test_dpo_hand_value():
    """beta = 0.1, pi_c = -1, pi_r = -3, ref_c = ref_r = -2: h = 1 - (-1) = 2, beta h = 0.2,
    L = log(1 + e^-0.2) = 0.5981389; rewards 0.1 and -0.1. With label smoothing 0.1:
    L = 0.9 softplus(-0.2) + 0.1 softplus(0.2) = softplus(-0.2) + 0.1 * 0.2 = 0.6181389."""
    args = t([-1.0]), t([-3.0]), t([-2.0]), t([-2.0])
    losses, cr, rr = dpo_loss(*args, beta=0.1)
    close(losses, [0.5981389])
    close(cr, [0.1])
    close(rr, [-0.1])
    close(dpo_loss(*args, beta=0.1, label_smoothing=0.1)[0], [0.6181389])


def test_label_smoothing_zero_is_dpo():
    pc, pr, rc, rr = logps4(seed=1)
    close(dpo_loss(pc, pr, rc, rr, 0.5, label_smoothing=0.0)[0], -F.logsigmoid(0.5 * ((pc - rc) - (pr - rr))))


def test_ipo_hand_value_and_minimiser():
    """beta = 0.1, h = 2 (as in test_dpo_hand_value): L = (2 - 1/0.2)^2 = 9. The loss is minimal (zero, with
    zero gradient) at h = 1 / (2 beta) = 5."""
    close(ipo_loss(t([-1.0]), t([-3.0]), t([-2.0]), t([-2.0]), 0.1)[0], [9.0], tol=1e-5)
    h = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([h], lr=0.1)
    for _ in range(200):
        opt.zero_grad()
        ipo_loss(h, torch.zeros(1), torch.zeros(1), torch.zeros(1), beta=0.1)[0].sum().backward()
        opt.step()
    close(h.detach(), [5.0], tol=1e-4)


def test_hinge_hand_value():
    """beta = 0.1: h = 2 -> max(0, 1 - 0.2) = 0.8; h = 20 -> 0 (margin beyond 1 / beta)."""
    close(hinge_loss(t([-1.0, 8.0]), t([-3.0, -10.0]), t([-2.0, 0.0]), t([-2.0, 0.0]), 0.1)[0], [0.8, 0.0])


def test_rpo_hand_value():
    """DPO loss 0.5981389 + alpha * (-log pi(y_c)) / |y_c| = 0.5981389 + 0.2 * 6 / 3 = 0.9981389."""
    losses, _, _ = dpo_loss(t([-6.0]), t([-8.0]), t([-7.0]), t([-7.0]), beta=0.1)
    close(add_nll(losses, t([-6.0]), t([3]), nll_coef=0.2), [0.9981389])


@pytest.mark.parametrize("name", sorted(PREFERENCE_LOSSES))
def test_same_signature_and_outputs(name):
    pc, pr, rc, rr = logps4(seed=2)
    losses, cr, rj = PREFERENCE_LOSSES[name](pc, pr, rc, rr, 0.1, label_smoothing=0.0)
    assert losses.shape == cr.shape == rj.shape == pc.shape
    close(cr, 0.1 * (pc - rc))
    close(rj, 0.1 * (pr - rr))


def test_window_mean_over_uneven_micro_batches():
    """4 micro-batches of 1, 3, 2, 4 pairs, one backward each, give the gradient of one batch of 10 pairs;
    so do 2 simulated ranks (gradients averaged, as DDP/FSDP do) with world_size and the global count."""
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(10, 2, 5, generator=g)  # (pairs, chosen/rejected, features)
    ref = torch.randn(10, 2, generator=g)
    w0 = torch.randn(5, generator=g)

    def grad(micro_batches, n_window, world_size=1):
        w = w0.clone().requires_grad_()
        for rows in micro_batches:
            logps = feats[rows] @ w  # (b, 2) a linear stand-in for the policy
            losses = dpo_loss(logps[:, 0], logps[:, 1], ref[rows, 0], ref[rows, 1], beta=0.5)[0]
            window_mean(losses, n_window, world_size).backward()  # gradients accumulate in w.grad
        return w.grad

    full = grad([slice(0, 10)], 10)
    close(grad([slice(0, 1), slice(1, 4), slice(4, 6), slice(6, 10)], 10), full)
    ranks = [grad([slice(0, 1), slice(1, 4)], 10, world_size=2), grad([slice(4, 6), slice(6, 10)], 10, world_size=2)]
    close((ranks[0] + ranks[1]) / 2, full)
    # the naive mean of per-micro-batch means is wrong for uneven sizes
    w = w0.clone().requires_grad_()
    for rows in [slice(0, 1), slice(1, 4), slice(4, 6), slice(6, 10)]:
        logps = feats[rows] @ w
        (dpo_loss(logps[:, 0], logps[:, 1], ref[rows, 0], ref[rows, 1], beta=0.5)[0].mean() / 4).backward()
    assert not torch.allclose(w.grad, full)


def test_one_lr_schedule_warms_up_from_the_first_step():
    """Warmup 4 of 10 steps: 1/4, 2/4, 3/4, 4/4 of the peak, then cosine to 0 (train_rm.py used to start at 0)."""
    lrs = [lr_at(k, 10, 4, 2.0) for k in range(10)]
    assert lrs[:4] == [0.5, 1.0, 1.5, 2.0] and lrs[4] == 2.0
    assert lrs[7] == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi * 3 / 6)))
    assert lr_at(9, 10, 4, 2.0, "linear") == pytest.approx(2.0 / 6) and lr_at(9, 10, 4, 2.0, "constant") == 2.0
