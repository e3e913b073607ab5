"""The losses of reward modelling and direct preference optimisation, one pure function each.

Every preference loss maps per-pair tensors (B,) to per-pair losses (B,), never a mean: the mean over a whole
gradient-accumulation window (and ranks) is taken once, by `window_mean`. `logps`: `logprobs.sequence_logps`.
- `bradley_terry_loss`: reward model (Bradley & Terry 1952; Ouyang et al. 2022; Dong et al. 2024, eq. 2).
- `regression_loss`: HelpSteer2's multi-attribute regression reward model (Wang et al. 2024, sec. 3).
- `pairwise_preference_loss`, `preference_probability`: RLHFlow's pairwise preference model (Dong et al. 2024,
  sec. 3.1 / Jiang et al. 2023), an LM that reads (prompt, response A, response B) and answers "A" or "B".
- `dpo_loss` (Rafailov et al. 2023, eq. 7) with label smoothing (cDPO, Mitchell 2023), `ipo_loss` (Azar et al.
  2023, eq. 17), `hinge_loss` (SLiC, Zhao et al. 2023; RSO, Liu et al. 2024): one signature, chosen by name from
  `PREFERENCE_LOSSES`; `add_nll` adds RPO's chosen-response NLL (Pang et al. 2024; Llama 3.1) to any of them.
"""
import math

import torch.nn.functional as F


def bradley_terry_loss(chosen_rewards, rejected_rewards, margin=None):
    """Bradley-Terry loss, (B,) -> (B,): L = -log sigmoid(r(x, y_c) - r(x, y_r) - m), m: Llama 2's margin or 0."""
    diff = chosen_rewards - rejected_rewards
    return -F.logsigmoid(diff if margin is None else diff - margin)


def regression_loss(predictions, labels, mask):
    """Per-row summed squared error over the rated attributes, (B, K) x 3 -> (B,): l_i = sum_k mask_ik (pred_ik -
    label_ik)^2. An unrated entry (mask 0: NeMo-Aligner's label -100) adds nothing and passes no gradient, whatever
    its label (NaN too). `window_mean` over the rated entries: NeMo's sum((pred - label)^2 mask) / sum(mask)."""
    return (predictions - labels.where(mask, predictions.detach())).square().where(mask, 0.0).sum(-1)


def pairwise_preference_loss(chosen_first_label_logps, chosen_second_label_logps):
    """Pairwise preference model loss, (B,) -> (B,): L = -1/2 [log p("A" | x, A=y_c, B=y_r) + log p("B" | x, A=y_r,
    B=y_c)], the label token's NLL (whole vocabulary) averaged over both orders to cancel position bias."""
    return -0.5 * (chosen_first_label_logps + chosen_second_label_logps)


def preference_probability(label_logps_ab, label_logps_ba):
    """P(a better than b), (B, 2) x 2 -> (B,), from the log-probs of ("A", "B") with a shown first and with b first:
    each order renormalised, p("A") = sigmoid(l_A - l_B), then averaged: P(a > b) = 1/2 [p_ab("A") + 1 - p_ba("A")]."""
    p_first_ab = (label_logps_ab[:, 0] - label_logps_ab[:, 1]).sigmoid()
    p_first_ba = (label_logps_ba[:, 0] - label_logps_ba[:, 1]).sigmoid()
    return 0.5 * (p_first_ab + 1 - p_first_ba)


def _implicit_rewards(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    """DPO's implicit rewards beta * log(pi / pi_ref) for chosen and rejected, (B,) each."""
    return beta * (policy_chosen_logps - ref_chosen_logps), beta * (policy_rejected_logps - ref_rejected_logps)


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
             label_smoothing=0.0):
    """DPO (Rafailov et al. 2023, eq. 7): L = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h), h = (log
    pi(y_c) - log pi_ref(y_c)) - (log pi(y_r) - log pi_ref(y_r)); eps > 0 (cDPO) bounds the pull of mislabelled pairs.
    -> (losses (B,), chosen and rejected rewards beta log(pi / pi_ref) (B,), detached for logging)."""
    chosen_rewards, rejected_rewards = _implicit_rewards(policy_chosen_logps, policy_rejected_logps,
                                                         ref_chosen_logps, ref_rejected_logps, beta)
    logits = chosen_rewards - rejected_rewards  # beta * h
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def ipo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
             label_smoothing=0.0):
    """IPO (Azar et al. 2023, eq. 17): L = (h - 1 / (2 beta))^2, h as in `dpo_loss`: regressing h to 1 / (2 beta)
    instead of pushing it to infinity does not overfit deterministic preferences. TRL feeds it length-normalised
    logps (`sequence_logps(..., average=True)`). label_smoothing is unused. Outputs as `dpo_loss`."""
    chosen_rewards, rejected_rewards = _implicit_rewards(policy_chosen_logps, policy_rejected_logps,
                                                         ref_chosen_logps, ref_rejected_logps, beta)
    h = (chosen_rewards - rejected_rewards) / beta
    return (h - 1 / (2 * beta)) ** 2, chosen_rewards.detach(), rejected_rewards.detach()


def hinge_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
               label_smoothing=0.0):
    """SLiC (Zhao et al. 2023) / RSO (Liu et al. 2024): L = max(0, 1 - beta h), h and outputs as in `dpo_loss`."""
    chosen_rewards, rejected_rewards = _implicit_rewards(policy_chosen_logps, policy_rejected_logps,
                                                         ref_chosen_logps, ref_rejected_logps, beta)
    return F.relu(1 - (chosen_rewards - rejected_rewards)), chosen_rewards.detach(), rejected_rewards.detach()


# --loss-type name -> loss function; all share dpo_loss's signature and outputs
PREFERENCE_LOSSES = {"dpo": dpo_loss, "ipo": ipo_loss, "hinge": hinge_loss}


def add_nll(losses, policy_chosen_logps, chosen_n_tokens, nll_coef):
    """RPO (Pang et al. 2024; Llama 3.1): L = L_pref + alpha (-log pi(y_c | x) / |y_c|), alpha = nll_coef, keeps the
    chosen response's likelihood from falling as the margin grows. (B,) -> (B,); length-normalised logps: |y_c| = 1."""
    return losses - nll_coef * policy_chosen_logps / chosen_n_tokens


def window_mean(losses, n_in_window, world_size=1):
    """L = world_size / N sum_i l_i, N the pairs (SFT: target tokens, l = -token_logps) in the whole accumulation
    window of all ranks: `.backward()` on each micro-batch sums to the gradient of the window's mean (not a mean of
    micro-batch means, which over-weights small ones), after DDP / FSDP's average over ranks too."""
    return losses.sum() * world_size / n_in_window


def lr_at(step, total_steps, warmup_steps, peak, schedule="cosine"):
    """The learning rate of optimizer step `step` (0-based): warmup peak * (step + 1) / warmup_steps (the first step
    learns; transformers' step / warmup_steps spends it at lr 0), then cosine to 0, linear to 0, or constant."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak * {"cosine": 0.5 * (1 + math.cos(math.pi * progress)), "linear": 1 - progress, "constant": 1}[schedule]
