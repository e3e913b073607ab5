"""Measure a policy on held-out prompts: proxy and gold reward, win rate, length, and KL to the reference.

Dong et al. 2024's objective (eq. 3: max_pi E[r(x, y)] - eta KL(pi || pi_0)) is judged by both terms, KL(pi ||
pi_ref) ~ mean_x [log pi(y | x) - log pi_ref(y | x)], y ~ pi; gold reward also shows over-optimisation.
"""
import time

import torch

from minirlhf.checkpoint import load_model
from minirlhf.cli import Progress
from minirlhf.data import Sequence, collate_sequences, load_dataset_any
from minirlhf.logprobs import sequence_logps
from minirlhf.plot import plot_summary
from minirlhf.rundir import atomic_write_json, read_json
from minirlhf.sampler import generate
from minirlhf.tokenizer import decode_response, encode_prompt, pad_token_id


def evaluate_policy(policy, ref_model, tokenizer, prompts, reward_fn, max_new_tokens, seed=0, gold_fn=None,
                    baseline_gold=None, batch_size=64):
    """One sample per prompt at temperature 1 -> (metrics, responses as text). reward_fn: the proxy; gold_fn(prompt,
    response) and baseline_gold (the reference policy's) add the gold reward and win rate (ties count one half)."""
    prompt_ids = [encode_prompt(tokenizer, p) for p in prompts]
    gen = generate(policy, prompt_ids, max_new_tokens, n=1, temperature=1.0, eos_token_id=tokenizer.eos_token_id,
                   seed=seed, batch_size=batch_size)
    response_ids = [r[0] for r in gen.responses]
    responses = [decode_response(tokenizer, r) for r in response_ids]
    policy_logps = [sum(lp[0]) for lp in gen.token_logps]
    ref_logps, device = [], ref_model.output_weight().device
    with torch.no_grad():  # log pi_ref(y | x): one forward pass of the reference
        for i in range(0, len(prompts), batch_size):
            pairs = [Sequence(p, r) for p, r in zip(prompt_ids[i:i + batch_size], response_ids[i:i + batch_size])]
            batch = {k: v.to(device) for k, v in collate_sequences(pairs, pad_token_id(tokenizer)).items()}
            ref_logps += sequence_logps(ref_model, **batch)[0].tolist()
    proxy = [r[0] for r in reward_fn(prompts, [[r] for r in responses])]
    metrics = {"proxy_reward": sum(proxy) / len(proxy), "length": sum(map(len, response_ids)) / len(response_ids),
               "kl_to_ref": sum(p - q for p, q in zip(policy_logps, ref_logps)) / len(prompts)}
    if gold_fn is not None:
        gold = metrics["gold"] = [gold_fn(p, r) for p, r in zip(prompts, responses)]  # per prompt, for win rates
        metrics["gold_reward"] = sum(gold) / len(gold)
        if baseline_gold is not None:
            wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(gold, baseline_gold)]
            metrics["gold_win_rate"] = sum(wins) / len(wins)
    return metrics, responses


def evaluate_iterations(out, iterations, sft_dir, offline_dir, tokenizer, prompts, reward_fn, max_new_tokens, seed=0,
                        gold_fn=None, device="cpu", proxy_scale=1.0, start=None):
    """iterate.py's evaluation of SFT (the reference), offline DPO and each iteration, with the labels each cost -> a
    table, OUT/summary.json and .png; gold_fn: the proxy's accuracy on fresh samples of SFT and of the last policy."""
    policies = {"sft": sft_dir, **({"offline_dpo": offline_dir} if offline_dir else {}),
                **{f"iter{t}": f"{out}/iter{t}/policy" for t in range(1, iterations + 1)}}
    ref_model = load_model(sft_dir, device=device).eval()
    rows, baseline, bar = {}, None, Progress("evaluation", len(policies), unit="policy")
    for name, path in policies.items():  # gold win rates against the first policy, SFT
        rows[name], _ = evaluate_policy(load_model(path, device=device).eval(), ref_model, tokenizer, prompts,
                                        reward_fn, max_new_tokens, seed=seed, gold_fn=gold_fn, baseline_gold=baseline)
        gold = rows[name].pop("gold", None)
        baseline = baseline or gold
        bar.update(1, done=name)
    bar.close()
    rows["sft"]["human_labels"] = 0
    if offline_dir:
        rows["offline_dpo"]["human_labels"] = len(load_dataset_any(f"{out}/data/preferences.jsonl"))
    for t in range(1, iterations + 1):
        rows[f"iter{t}"]["human_labels"] = read_json(f"{out}/iter{t}/metrics.json")["human_labels"]
    summary = {"policies": rows}
    for name in ("sft", list(policies)[-1]) if gold_fn is not None else ():
        policy = load_model(policies[name], device=device).eval()
        a, b = (evaluate_policy(policy, policy, tokenizer, prompts, reward_fn, max_new_tokens, seed=seed + k)[1]
                for k in (1, 2))
        proxy = reward_fn(prompts + prompts, [[r] for r in a + b])
        gold = [(gold_fn(p, x), gold_fn(p, y)) for p, x, y in zip(prompts, a, b)]
        agree = [(proxy[i][0] > proxy[i + len(a)][0]) == (ga > gb) for i, (ga, gb) in enumerate(gold) if ga != gb]
        summary[f"reward_model_gold_accuracy_{name}"] = acc = sum(agree) / max(len(agree), 1)  # gold ties excluded
        print(f"reward model accuracy against gold labels on held-out {name} pairs: {acc:.3f} ({len(agree)} pairs)")
    columns = [c for c in ("gold_reward", "gold_win_rate", "proxy_reward", "length", "kl_to_ref", "human_labels")
               if any(c in m for m in rows.values())]
    print(f"{'policy':12s}" + "".join(f"{c:>15s}" for c in columns))
    for name, m in rows.items():
        print(f"{name:12s}" + "".join(f"{m[c]:15d}" if isinstance(m.get(c), int) else f"{m[c]:15.3f}" if c in m
                                      else f"{'-':>15s}" for c in columns))
    summary["seconds"] = time.time() - start if start else None
    atomic_write_json(f"{out}/summary.json", summary)
    plot_summary(rows, f"{out}/summary.png", proxy_scale)
    return summary
