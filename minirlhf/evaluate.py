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
import time

import torch

from minirlhf.checkpoint import load_model
from minirlhf.cli import Progress
from minirlhf.data import Sequence, collate_sequences, load_dataset_any
from minirlhf.logprobs import sequence_logps
from minirlhf.rundir import atomic_write_json, read_json
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


COLUMNS = ["gold_reward", "gold_win_rate", "proxy_reward", "length", "kl_to_ref", "human_labels"]


def format_table(rows: dict) -> str:
    """rows: policy name -> metrics. One line per policy, one column per metric present."""
    columns = [c for c in COLUMNS if any(c in m for m in rows.values())]
    lines = [f"{'policy':12s}" + "".join(f"{c:>15s}" for c in columns)]
    for name, metrics in rows.items():
        cells = (f"{metrics[c]:15d}" if isinstance(metrics.get(c), int) else f"{metrics[c]:15.3f}" if c in metrics
                 else f"{'-':>15s}" for c in columns)
        lines.append(f"{name:12s}" + "".join(cells))
    return "\n".join(lines)


def evaluate_policies(policies, tokenizer, prompts, reward_fn, max_new_tokens, seed=0, gold_fn=None, device="cpu"):
    """policies: name -> checkpoint folder, the first one the reference pi_0 -> name -> metrics of
    `evaluate_policy` (gold win rates against the first policy)."""
    names = list(policies)
    ref_model = load_model(policies[names[0]], device=device).eval()
    rows, baseline, bar = {}, None, Progress("evaluation", len(names), unit="policy")
    for name in names:
        policy = load_model(policies[name], device=device).eval()
        metrics, _ = evaluate_policy(policy, ref_model, tokenizer, prompts, reward_fn, max_new_tokens, seed=seed,
                                     gold_fn=gold_fn, baseline_gold=baseline)
        baseline = baseline or metrics.get("gold")
        metrics.pop("gold", None)
        rows[name] = metrics
        bar.update(1, done=name)
    bar.close()
    return rows


def sampled_pairs_accuracy(policy_dir, tokenizer, prompts, reward_fn, max_new_tokens, gold_fn, seed=0, device="cpu"):
    """`reward_model_accuracy` on two fresh samples per prompt from one policy: how well the proxy ranks what that
    policy produces (later policies drift away from the samples the reward model was trained on)."""
    policy = load_model(policy_dir, device=device).eval()
    a, b = (evaluate_policy(policy, policy, tokenizer, prompts, reward_fn, max_new_tokens, seed=seed + k)[1]
            for k in (1, 2))
    return reward_model_accuracy(reward_fn, prompts, a, b, gold_fn)


def plot(rows: dict, path, proxy_scale=1.0):
    """The loop as a path and everything else as reference lines, when matplotlib is installed (not a dependency).

    rows: policy name -> metrics; "sft" and "iter1".."iterT" make the path (x = iteration), every other row is a
    baseline drawn as a labelled horizontal line. Left: gold reward (solid) and proxy reward (dashed) on one
    axis, the proxy times `proxy_scale` and shifted to equal the gold reward at SFT (a Bradley-Terry reward is
    defined up to a constant; for the built-in task's annotators, proxy_scale = TAU puts a calibrated proxy on
    the gold scale), so the proxy-gold gap of over-optimisation shows at a glance. Middle: KL(pi || pi_0).
    Right: gold reward against KL (Gao et al. 2023's over-optimisation curve in miniature)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    path_names = [n for n in rows if n == "sft" or (n.startswith("iter") and n[4:].isdigit())]
    baselines = [n for n in rows if n not in path_names]
    x = list(range(len(path_names)))
    has_gold = "gold_reward" in rows[path_names[0]]
    fig, axes = plt.subplots(1, 3 if has_gold else 2, figsize=(13 if has_gold else 9, 3.6))
    ax = axes[0]
    shift = rows["sft"]["gold_reward"] - proxy_scale * rows["sft"]["proxy_reward"] if has_gold else 0.0
    proxy = [shift + proxy_scale * rows[n]["proxy_reward"] for n in path_names]
    if has_gold:
        ax.plot(x, [rows[n]["gold_reward"] for n in path_names], "o-", color="C0", label="gold reward")
    ax.plot(x, proxy, "s--", color="C1", label="proxy reward" + (" (shifted to gold at SFT)" if has_gold else ""))
    for k, b in enumerate(baselines):
        key = "gold_reward" if has_gold else "proxy_reward"
        ax.axhline(rows[b][key], color=f"C{k + 2}", ls=":", label=f"{b} ({key.split('_')[0]})")
    ax.set_xticks(x, path_names)
    ax.set_title("reward")
    ax.legend(fontsize=7)
    ax = axes[1]
    ax.plot(x, [rows[n]["kl_to_ref"] for n in path_names], "o-", color="C0", label="online iterations")
    for k, b in enumerate(baselines):
        ax.axhline(rows[b]["kl_to_ref"], color=f"C{k + 2}", ls=":", label=b)
    ax.set_xticks(x, path_names)
    ax.set_title("KL(pi || pi_0)")
    ax.legend(fontsize=7)
    if has_gold:
        ax = axes[2]
        ax.plot([rows[n]["kl_to_ref"] for n in path_names], [rows[n]["gold_reward"] for n in path_names], "o-",
                color="C0", label="online iterations")
        for n in path_names:
            ax.annotate(n, (rows[n]["kl_to_ref"], rows[n]["gold_reward"]), fontsize=7)
        for k, b in enumerate(baselines):
            ax.plot(rows[b]["kl_to_ref"], rows[b]["gold_reward"], "*", ms=10, color=f"C{k + 2}", label=b)
        ax.set_xlabel("KL(pi || pi_0)")
        ax.set_ylabel("gold reward")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png")
    plt.close(fig)
    os.replace(path + ".tmp.png", path)
    return path


def evaluate_iterations(out, iterations, sft_dir, offline_dir, tokenizer, prompts, reward_fn, max_new_tokens, seed=0,
                        gold_fn=None, device="cpu", proxy_scale=1.0, start=None):
    """iterate.py's evaluation: SFT (the reference), offline DPO (if any) and each iteration's policy, with the human
    labels each one cost (from OUT/data/preferences.jsonl and OUT/iterT/metrics.json) -> the table on stdout,
    OUT/summary.json and (with matplotlib) OUT/summary.png. With gold_fn, also the proxy's accuracy against gold
    on fresh pairs of the SFT policy and of the last one."""
    policies = {"sft": sft_dir, **({"offline_dpo": offline_dir} if offline_dir else {}),
                **{f"iter{t}": f"{out}/iter{t}/policy" for t in range(1, iterations + 1)}}
    rows = evaluate_policies(policies, tokenizer, prompts, reward_fn, max_new_tokens, seed, gold_fn, device)
    rows["sft"]["human_labels"] = 0
    if offline_dir:
        rows["offline_dpo"]["human_labels"] = len(load_dataset_any(f"{out}/data/preferences.jsonl"))
    for t in range(1, iterations + 1):
        rows[f"iter{t}"]["human_labels"] = read_json(f"{out}/iter{t}/metrics.json")["human_labels"]
    summary = {"policies": rows}
    if gold_fn is not None:
        for name in ("sft", list(policies)[-1]):
            acc, n = sampled_pairs_accuracy(policies[name], tokenizer, prompts, reward_fn, max_new_tokens, gold_fn,
                                            seed, device)
            summary[f"reward_model_gold_accuracy_{name}"] = acc
            print(f"reward model accuracy against gold labels on held-out {name} pairs: {acc:.3f} ({n} pairs)")
    print(format_table(rows))
    summary["seconds"] = time.time() - start if start else None
    atomic_write_json(f"{out}/summary.json", summary)
    plot(rows, f"{out}/summary.png", proxy_scale)
    return summary
