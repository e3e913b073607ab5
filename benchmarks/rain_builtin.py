"""RAIN on the built-in task: gold reward of the SFT policy decoded with RAIN (the proxy reward model as the
evaluator) beside SFT sampling, SFT greedy, SFT best-of-n at RAIN's compute and the trained policies.

Takes finished run folders of `python iterate.py --output-dir runs/seedK --seed K` (stages sft/, reward_model/,
offline_dpo/, iter*/policy) and evaluates every row on the same fresh prompts, drawn from their own stream
(`task.make_prompts(N, 10**6 + run seed)`, so the benchmark does not depend on how iterate.py splits its
prompts; the task's prompt space is small, so some also occur in training, as with iterate's held-out set),
one temperature-1 sample per prompt for the policies. Best-of-n draws n SFT samples per prompt and keeps the proxy's favourite, with n = RAIN's mean
token multiple (token positions the model computed, relative to plain decoding of the same output), rounded.
"RAIN, gold evaluator" replaces the proxy by the hidden gold reward (clipped to [-1, 1]): the search's ceiling.
The output is a Markdown table (mean ± sample standard deviation over the runs).

    for k in 0 1 2; do python iterate.py --output-dir runs/seed$k --seed $k; done
    python benchmarks/rain_builtin.py runs/seed0 runs/seed1 runs/seed2 --prompts 300
"""
import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from minirlhf import task  # noqa: E402
from minirlhf.checkpoint import load_model  # noqa: E402
from minirlhf.evaluate import evaluate_policy  # noqa: E402
from minirlhf.rain import RainConfig, align, reward_evaluator  # noqa: E402
from minirlhf.rewards import load_reward_source  # noqa: E402
from minirlhf.sampler import generate  # noqa: E402
from minirlhf.tokenizer import decode_response, encode_prompt, load_tokenizer  # noqa: E402


def mean(xs):
    return sum(xs) / len(xs)


def gold(prompts, responses):
    return mean([task.gold_reward(p, r) for p, r in zip(prompts, responses)])


def evaluate_run(run, n_prompts, cfg, seed):
    """-> {row name: {"gold": .., "proxy": .., optional cost columns}} for one run folder."""
    with open(os.path.join(run, "args.json")) as f:
        run_args = json.load(f)
    prompts = task.make_prompts(n_prompts, 10**6 + run_args["seed"])
    tokenizer, sft = load_tokenizer(f"{run}/sft"), load_model(f"{run}/sft").eval()
    reward_fn = load_reward_source(f"{run}/reward_model")
    max_new = run_args.get("max_new_tokens") or task.MAX_RESPONSE_TOKENS

    def proxy(responses):
        return mean([r[0] for r in reward_fn(prompts, [[r] for r in responses])])
    rows = {}
    metrics, _ = evaluate_policy(sft, sft, tokenizer, prompts, reward_fn, max_new, seed=seed, gold_fn=task.gold_reward)
    rows["sft (sampling)"] = dict(gold=metrics["gold_reward"], proxy=metrics["proxy_reward"])
    greedy = generate(sft, [encode_prompt(tokenizer, p) for p in prompts], max_new, temperature=0,
                      eos_token_id=tokenizer.eos_token_id)
    texts = [decode_response(tokenizer, r[0]) for r in greedy.responses]
    rows["sft (greedy)"] = dict(gold=gold(prompts, texts), proxy=proxy(texts))

    start = time.time()
    evaluator = reward_evaluator(f"{run}/reward_model", sft, tokenizer, max_new)
    texts, _, costs = align(sft, tokenizer, prompts, evaluator, cfg, seed=seed)
    rain_seconds = time.time() - start
    cost = {k: mean([c[k] for c in costs]) for k in ("forward_multiple", "token_multiple", "evaluations")}
    rows["sft + RAIN (proxy RM)"] = dict(gold=gold(prompts, texts), proxy=proxy(texts), **cost, seconds=rain_seconds)

    for name, n in [("sft best-of-8", 8), ("sft best-of-n (n = RAIN tokens)", max(1, round(cost["token_multiple"])))]:
        gen = generate(sft, [encode_prompt(tokenizer, p) for p in prompts], max_new, n=n, temperature=1.0,
                       eos_token_id=tokenizer.eos_token_id, seed=seed + 1)
        samples = [[decode_response(tokenizer, r) for r in rs] for rs in gen.responses]
        best = [s[max(range(n), key=sc.__getitem__)] for s, sc in zip(samples, reward_fn(prompts, samples))]
        rows[name] = dict(gold=gold(prompts, best), proxy=proxy(best), n=n, token_multiple=float(n),
                          evaluations=float(n))

    def gold_evaluator(prompt, response):
        return max(-1.0, min(1.0, task.gold_reward(prompt, response)))
    texts, _, costs = align(sft, tokenizer, prompts, gold_evaluator, cfg, seed=seed)
    cost = {k: mean([c[k] for c in costs]) for k in ("forward_multiple", "token_multiple", "evaluations")}
    rows["sft + RAIN (gold, ceiling)"] = dict(gold=gold(prompts, texts), proxy=proxy(texts), **cost)

    for name in ["offline_dpo", "iter1", "iter2", "iter3"]:
        path = f"{run}/{name}" if name == "offline_dpo" else f"{run}/{name}/policy"
        if os.path.isdir(path):
            metrics, _ = evaluate_policy(load_model(path).eval(), sft, tokenizer, prompts, reward_fn, max_new,
                                         seed=seed, gold_fn=task.gold_reward)
            rows[name] = dict(gold=metrics["gold_reward"], proxy=metrics["proxy_reward"])
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="finished iterate.py run folders (one per seed)")
    p.add_argument("--prompts", type=int, default=300, help="evaluation prompts per run")
    p.add_argument("--searches", type=int, default=50, help="RAIN's T (searches per committed span)")
    p.add_argument("--seed", type=int, default=0, help="seed of every draw in the evaluation")
    p.add_argument("--output", help="also write the per-run rows as JSON here")
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    cfg = RainConfig(searches=args.searches, max_new_tokens=task.MAX_RESPONSE_TOKENS)
    results = []
    for run in args.runs:
        results.append(evaluate_run(run, args.prompts, cfg, args.seed))
        print(f"{run}: " + json.dumps(results[-1]), flush=True)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(dict(runs=args.runs, prompts=args.prompts, searches=args.searches, rows=results), f, indent=1)
    columns = ["gold", "proxy", "n", "token_multiple", "forward_multiple", "evaluations"]
    lines = ["| policy | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name in results[0]:
        cells = []
        for c in columns:
            values = [r[name][c] for r in results if name in r and c in r[name]]
            if not values:
                cells.append("-")
                continue
            m = mean(values)
            sd = math.sqrt(sum((v - m) ** 2 for v in values) / max(len(values) - 1, 1))
            cells.append(f"{m:.3f} ± {sd:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    print(f"{len(args.runs)} runs, {args.prompts} evaluation prompts each, T = {args.searches}; "
          "mean ± sample std over runs")


if __name__ == "__main__":
    main()
