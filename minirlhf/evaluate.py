"""Measure a policy on held-out prompts: proxy and gold reward, win rate, length, and KL to the reference.

Dong et al. 2024 judge online iterative DPO by how far the policy climbs the reward while staying close to
the reference (the KL-regularised objective, their eq. 3: max_pi E[r(x, y)] - eta KL(pi || pi_0)). With the
built-in task the true (gold) reward is known, so we also see where the proxy reward model is over-optimised:
the proxy keeps rising while the gold reward stalls.

KL(pi || pi_ref) is estimated from the same samples y ~ pi(. | x) at temperature 1:
    KL ~ mean_x [ log pi(y | x) - log pi_ref(y | x) ],
with log pi from the sampler and log pi_ref from one forward pass of the reference (`sequence_logps`).
"""
import os

import torch

from minirlhf.data import Sequence, collate_sequences
from minirlhf.logprobs import sequence_logps
from minirlhf.sampler import generate
from minirlhf.tokenizer import decode_response, encode_prompt, pad_token_id


@torch.no_grad()
def response_logps(model, tokenizer, prompt_ids, responses, batch_size=64):
    """log pi(y | x) of each (prompt_ids[i], responses[i]) pair under `model` -> list of floats."""
    device = model.output_weight().device
    out = []
    for start in range(0, len(responses), batch_size):
        examples = [Sequence(p, r) for p, r in zip(prompt_ids[start:start + batch_size], responses[start:start + batch_size])]
        batch = {k: v.to(device) for k, v in collate_sequences(examples, pad_token_id(tokenizer)).items()}
        logps, _ = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
        out += logps.tolist()
    return out


def evaluate_policy(policy, ref_model, tokenizer, prompts, reward_fn, max_new_tokens, seed=0, gold_fn=None,
                    baseline_gold=None, batch_size=64):
    """One sample per prompt at temperature 1 -> (metrics dict, responses as text).

    reward_fn(prompts, responses) -> rewards: the proxy (a list of lists, as `rewards.load_reward_source`).
    gold_fn(prompt, response) -> float and baseline_gold (the reference policy's gold rewards on the same
    prompts) add the gold reward and the gold win rate (ties count one half).
    """
    prompt_ids = [encode_prompt(tokenizer, p) for p in prompts]
    gen = generate(policy, prompt_ids, max_new_tokens, n=1, temperature=1.0, eos_token_id=tokenizer.eos_token_id,
                   seed=seed, batch_size=batch_size)
    response_ids = [r[0] for r in gen.responses]
    responses = [decode_response(tokenizer, r) for r in response_ids]
    policy_logps = [sum(lp[0]) for lp in gen.token_logps]
    ref_logps = response_logps(ref_model, tokenizer, prompt_ids, response_ids, batch_size)
    proxy = [r[0] for r in reward_fn(prompts, [[r] for r in responses])]
    metrics = {
        "proxy_reward": sum(proxy) / len(proxy),
        "length": sum(map(len, response_ids)) / len(response_ids),
        "kl_to_ref": sum(p - q for p, q in zip(policy_logps, ref_logps)) / len(prompts),
    }
    if gold_fn is not None:
        gold = [gold_fn(p, r) for p, r in zip(prompts, responses)]
        metrics["gold_reward"] = sum(gold) / len(gold)
        metrics["gold"] = gold  # per prompt, for win rates; dropped from the table
        if baseline_gold is not None:
            wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(gold, baseline_gold)]
            metrics["gold_win_rate"] = sum(wins) / len(wins)
    return metrics, responses


def reward_model_accuracy(reward_fn, prompts, responses_a, responses_b, gold_fn):
    """How often the proxy orders two responses as the gold reward does (gold ties excluded)."""
    proxy = reward_fn(prompts + prompts, [[a] for a in responses_a] + [[b] for b in responses_b])
    n, agree = 0, 0
    for i, (p, a, b) in enumerate(zip(prompts, responses_a, responses_b)):
        ga, gb = gold_fn(p, a), gold_fn(p, b)
        if ga != gb:
            n += 1
            agree += (proxy[i][0] > proxy[len(prompts) + i][0]) == (ga > gb)
    return agree / max(n, 1), n


COLUMNS = ["gold_reward", "gold_win_rate", "proxy_reward", "length", "kl_to_ref"]


def format_table(rows: dict) -> str:
    """rows: policy name -> metrics. One line per policy, one column per metric present."""
    columns = [c for c in COLUMNS if any(c in m for m in rows.values())]
    lines = [f"{'policy':12s}" + "".join(f"{c:>15s}" for c in columns)]
    for name, metrics in rows.items():
        cells = (f"{metrics[c]:15.3f}" if c in metrics else f"{'-':>15s}" for c in columns)
        lines.append(f"{name:12s}" + "".join(cells))
    return "\n".join(lines)


def plot(rows: dict, path):
    """A PNG of every metric per policy, when matplotlib is installed (it is not a dependency)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    columns = [c for c in COLUMNS if any(c in m for m in rows.values())]
    fig, axes = plt.subplots(1, len(columns), figsize=(3.2 * len(columns), 3))
    for ax, c in zip(axes, columns):
        names = [n for n in rows if c in rows[n]]
        ax.plot(names, [rows[n][c] for n in names], marker="o")
        ax.set_title(c)
        ax.tick_params(axis="x", rotation=60)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png")
    plt.close(fig)
    os.replace(path + ".tmp.png", path)
    return path

