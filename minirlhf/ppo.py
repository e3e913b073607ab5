r"""PPO's math (Schulman et al. 2017, in the RLHF form of Ziegler et al. 2019) and DR-PO's dataset reset (Chang et
al. 2024, "Dataset Reset Policy Optimization for RLHF", Alg. 1 with PPO; code Cornell-RL/drpo): pure functions,
used by train_ppo.py (one rollout batch and its updates) and iterate.py --algorithm ppo (T of them).

Over the response tokens y_t of an episode (x, y) scored s, with states s_t = (x, y_<t):
    reward      r_t = -kl_coef (log pi_old(y_t|s_t) - log pi_ref(y_t|s_t)) + [t = last] s;  whitened: r / std(r)
    GAE         delta_t = r_t + gamma V_old(s_{t+1}) - V_old(s_t),  A_t = sum_l (gamma lam)^l delta_{t+l},
                R_t = A_t + V_old(s_t);  whitened: A <- (A - mean A) / std(A)
    policy      rho_t = pi(y_t|s_t) / pi_old(y_t|s_t),  L_pg = mean_{t not forced} max(-A rho, -A clip(rho, 1 +- eps))
    value       L_vf = 0.5 mean_t max((V - R)^2, (clip(V, V_old +- eps_v) - R)^2);   loss = L_pg + vf_coef L_vf
    adaptive KL (optional) kl_coef *= 1 + clip(KL / target - 1, -0.2, 0.2) * episodes / horizon
The reset (tril's RollinProcessor): with probability beta an episode starts from a prefix of its prompt's reference
response y* of L tokens: h ~ Uniform{1..L-1} (never all of it), no reset if L < 2. The sampler forces y*_1..y*_h
and samples the rest; forced tokens are masked out of L_pg only: the KL reward, L_vf and the whitening cover them.
"""
import torch


def reset_lengths(reference_lengths, reset_prob, generator):
    """Per episode h, the number of reference tokens to force: 0 (start from the prompt), or with probability
    reset_prob uniform on {1, ..., L-1}; L < 2: 0. Two uniforms per episode whatever happens."""
    u = torch.rand(len(reference_lengths), 2, generator=generator, dtype=torch.float64).tolist()
    return [1 + int(v * (L - 1)) if L >= 2 and w < reset_prob else 0 for (w, v), L in zip(u, reference_lengths)]


def token_rewards(token_logps, ref_token_logps, scores, mask, kl_coef):
    """(B, T) log-probs of pi_old and pi_ref, scores (B,), mask (B, T) bool -> per-token rewards (B, T)
    r_t = -kl_coef (log pi_old - log pi_ref) + [t = last response token] score, and the KL terms (B, T)."""
    kl = torch.where(mask, token_logps - ref_token_logps, 0.0)
    last = (mask * torch.arange(mask.shape[1])).argmax(-1)  # (B,)
    rewards = -kl_coef * kl
    rewards[torch.arange(len(mask)), last] += scores
    return rewards, kl


def whiten(x, mask, shift_mean=True):
    """(x - mean) / std over the masked entries (population variance), 0 elsewhere; shift_mean=False adds the
    mean back (a scale only)."""
    mean = x[mask].mean()
    whitened = (x - mean) * torch.rsqrt(x[mask].var(unbiased=False) + 1e-8)
    return torch.where(mask, whitened if shift_mean else whitened + mean, 0.0)


def gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """Generalised advantage estimation (Schulman et al. 2016) over each row's response positions (mask: one
    contiguous run per row) -> advantages and returns A + V (B, T), 0 outside the mask; V after the last token is 0."""
    next_values = torch.cat([(values * mask)[:, 1:], values.new_zeros(len(values), 1)], 1)
    advantages, last = torch.zeros_like(rewards), rewards.new_zeros(len(rewards))
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_values[:, t] - values[:, t]
        last = torch.where(mask[:, t], delta + gamma * lam * last, 0.0)
        advantages[:, t] = last
    return advantages, torch.where(mask, advantages + values, 0.0)


def ppo_losses(token_logps, old_token_logps, advantages, values, old_values, returns, mask, pg_mask, cliprange=0.2,
               cliprange_value=0.2):
    """Per-token clipped surrogate (B, T), 0 outside pg_mask (forced tokens: exactly zero gradient), and per-token
    clipped value loss 0.5 max((V - R)^2, (V_clipped - R)^2) (B, T), 0 outside mask."""
    ratio = torch.exp(token_logps - old_token_logps)
    pg = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - cliprange, 1 + cliprange))
    clipped = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    vf = 0.5 * torch.max((values - returns) ** 2, (clipped - returns) ** 2)
    return torch.where(pg_mask, pg, 0.0), torch.where(mask, vf, 0.0)


def next_kl_coef(kl_coef, kl, target, horizon, n_episodes):
    """Ziegler et al. 2019's adaptive controller; target None: fixed."""
    return kl_coef if target is None else kl_coef * (1 + max(-0.2, min(0.2, kl / target - 1)) * n_episodes / horizon)
