"""The losses of reward modelling and direct preference optimisation, one pure function each.

Every preference loss takes per-pair tensors (B,) and returns per-pair losses (B,), never a mean: the mean
over a whole gradient-accumulation window (and over ranks) is taken once, by `window_mean`, which every
script uses. Sequence log-probs `logps` come from `logprobs.sequence_logps` (summed over response tokens by
default, or length-normalised with `average=True`).

- `bradley_terry_loss`: reward model (Bradley & Terry 1952; Ouyang et al. 2022; Dong et al. 2024, eq. 2).
- `regression_loss`: HelpSteer2's multi-attribute regression reward model (Wang et al. 2024, sec. 3;
  NeMo-Aligner's reg_loss_func), squared errors of the rated attributes only.
- `pairwise_preference_loss`, `preference_probability`: the pairwise preference model of RLHFlow
  (Dong et al. 2024, sec. 3.1 / Jiang et al. 2023), an LM that reads (prompt, response A, response B) and
  answers with the label token "A" or "B".
- `dpo_loss` (Rafailov et al. 2023, eq. 7) with label smoothing (conservative DPO, Mitchell 2023),
  `ipo_loss` (Azar et al. 2023, eq. 17), `hinge_loss` (SLiC, Zhao et al. 2023; RSO, Liu et al. 2024), all
  with the same signature and outputs, chosen by name from `PREFERENCE_LOSSES`; `add_nll` adds the
  chosen-response NLL of RPO (Pang et al. 2024; the Llama 3.1 report) to any of them.
"""
import math

import torch.nn.functional as F


def bradley_terry_loss(chosen_rewards, rejected_rewards, margin=None):
    """Bradley-Terry reward loss per pair, (B,) -> (B,):
        L = -log sigmoid(r(x, y_c) - r(x, y_r) - m) = softplus(r_r - r_c + m)
    with an optional per-pair margin m >= 0 (Llama 2: larger for clearly separated pairs); m = 0 by default."""
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff)


def regression_loss(predictions, labels, mask):
    """Per-row summed squared error over the rated attributes, (B, K) x 3 -> (B,): l_i = sum_k mask_ik (pred_ik -
    label_ik)^2. An unrated entry (mask 0: NeMo-Aligner's label -100) adds nothing and passes no gradient, whatever
    its label (NaN too). `window_mean` over the rated entries: NeMo's sum((pred - label)^2 mask) / sum(mask)."""
    return (predictions - labels.where(mask, predictions.detach())).square().where(mask, 0.0).sum(-1)


def pairwise_preference_loss(chosen_first_label_logps, chosen_second_label_logps):
    """Pairwise preference model loss per pair, (B,) -> (B,): cross-entropy of the correct label token,
    averaged over the two orders of each pair (this cancels the model's position bias):
        L = -1/2 [ log p("A" | x, A=y_c, B=y_r) + log p("B" | x, A=y_r, B=y_c) ]
    The inputs are the log-probs of the correct label token over the whole vocabulary, as returned by
    `fused_token_logps` at the label position (i.e. ordinary next-token NLL on the label)."""
    return -0.5 * (chosen_first_label_logps + chosen_second_label_logps)


def preference_probability(label_logps_ab, label_logps_ba):
    """P(a better than b) from a pairwise preference model, (B, 2) x 2 -> (B,).

    label_logps_ab: log-probs of the tokens ("A", "B") at the label position with a shown first (as "A");
    label_logps_ba: the same with the order swapped (b shown first, so "B" now means a). Each order is
    renormalised over the two label tokens, p("A") = sigmoid(l_A - l_B), and the two orders are averaged:
        P(a > b) = 1/2 [ p_ab("A") + p_ba("B") ] = 1/2 [ p_ab("A") + 1 - p_ba("A") ]"""
    p_first_ab = (label_logps_ab[:, 0] - label_logps_ab[:, 1]).sigmoid()
    p_first_ba = (label_logps_ba[:, 0] - label_logps_ba[:, 1]).sigmoid()
    return 0.5 * (p_first_ab + 1 - p_first_ba)


def _implicit_rewards(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    """DPO's implicit rewards beta * log(pi / pi_ref) for chosen and rejected, (B,) each."""
    return beta * (policy_chosen_logps - ref_chosen_logps), beta * (policy_rejected_logps - ref_rejected_logps)


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
             label_smoothing=0.0):
    """DPO (Rafailov et al. 2023, eq. 7), with the log-ratio margin
        h = (log pi(y_c) - log pi_ref(y_c)) - (log pi(y_r) - log pi_ref(y_r)):
        L = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
    eps = label_smoothing > 0 is conservative DPO (cDPO): the label is assumed flipped with probability eps,
    which bounds the loss's pull on mislabelled pairs; eps = 0 is DPO.
    Returns (losses (B,), chosen_rewards (B,), rejected_rewards (B,)); rewards beta log(pi / pi_ref) are
    detached (for logging: reward margins and accuracy)."""
    chosen_rewards, rejected_rewards = _implicit_rewards(policy_chosen_logps, policy_rejected_logps,
                                                         ref_chosen_logps, ref_rejected_logps, beta)
    logits = chosen_rewards - rejected_rewards  # beta * h
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def ipo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
             label_smoothing=0.0):
    """IPO (Azar et al. 2023, eq. 17): L = (h - 1 / (2 beta))^2, h the log-ratio margin of `dpo_loss`.
    A squared loss regresses h to 1 / (2 beta) instead of pushing it to infinity, so it does not overfit
    deterministic preferences. TRL feeds it length-normalised logps (`sequence_logps(..., average=True)`).
    label_smoothing is unused (same signature as `dpo_loss`). Returns (losses, chosen_rewards, rejected_rewards)."""
    chosen_rewards, rejected_rewards = _implicit_rewards(policy_chosen_logps, policy_rejected_logps,
                                                         ref_chosen_logps, ref_rejected_logps, beta)
    h = (chosen_rewards - rejected_rewards) / beta
    return (h - 1 / (2 * beta)) ** 2, chosen_rewards.detach(), rejected_rewards.detach()


def hinge_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
               label_smoothing=0.0):
    """Hinge loss of SLiC (Zhao et al. 2023) / RSO (Liu et al. 2024): L = max(0, 1 - beta h), h the log-ratio
    margin of `dpo_loss`: zero once the margin exceeds 1 / beta. label_smoothing is unused.
    Returns (losses, chosen_rewards, rejected_rewards)."""
    chosen_rewards, rejected_rewards = _implicit_rewards(policy_chosen_logps, policy_rejected_logps,
                                                         ref_chosen_logps, ref_rejected_logps, beta)
    losses = F.relu(1 - (chosen_rewards - rejected_rewards))
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


# --loss-type name -> loss function; all share dpo_loss's signature and outputs
PREFERENCE_LOSSES = {"dpo": dpo_loss, "ipo": ipo_loss, "hinge": hinge_loss}


def add_nll(losses, policy_chosen_logps, chosen_n_tokens, nll_coef):
    """RPO (Pang et al. 2024; Llama 3.1 report): add the per-token NLL of the chosen response,
        L = L_pref + alpha * (-log pi(y_c | x) / |y_c|),   alpha = nll_coef,
    which keeps the chosen response's likelihood from falling while the margin grows. If `policy_chosen_logps`
    are already length-normalised, pass chosen_n_tokens=1. (B,) -> (B,)."""
    return losses - nll_coef * policy_chosen_logps / chosen_n_tokens


def window_mean(losses, n_in_window, world_size=1):
    """Mean over every pair (or token) of one optimizer step, however it is split into micro-batches:
        L = (1 / N) sum_i l_i,   N = number of pairs in the whole accumulation window
    Call `window_mean(micro_losses, N).backward()` on each micro-batch: the summed gradients are those of
    the mean over the window, not a mean of per-micro-batch means (which over-weights small micro-batches).
    Under DDP / FSDP the gradients are averaged over ranks, so pass the global count N (all_reduce of the
    local counts, summed over the window) and world_size: L = world_size / N sum_i l_i; the average over
    ranks then gives the gradient of the global mean. For SFT pass the token losses -token_logps and the
    number of target tokens in the window."""
    return losses.sum() * world_size / n_in_window


def lr_at(step, total_steps, warmup_steps, peak, schedule="cosine"):
    """The learning rate of optimizer step `step` (0-based), one schedule for every script: linear warmup
    peak * (step + 1) / warmup_steps, so the first step already learns (transformers' step / warmup_steps spends
    it at lr 0), then cosine to 0, linear to 0, or constant."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak * {"cosine": 0.5 * (1 + math.cos(math.pi * progress)), "linear": 1 - progress, "constant": 1}[schedule]
