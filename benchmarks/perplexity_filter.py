"""DPO on perplexity-filtered pairs vs the same number of unfiltered pairs (minirlhf/perplexity.py, a reconstruction
of Kutalev & Markoff 2024), on tiny models on CPU.

Two tiny random Llamas are each given a style by SFT (train_dpo.py --loss sft, --sft-steps): the target policy
answers with words of one set, the other model with words of another. Each answers every training prompt twice; a
pair's preferred response is the one with more "e"s (ties dropped), a rule both word sets can satisfy. The
candidate pool mixes the policy's pairs and the other model's. Per seed, two DPO runs from the SFT policy (also the
reference) with the same step budget and the same number N of pairs: "filtered" keeps the pool's pairs under
--perplexity-quantile (about the policy's share), "unfiltered" draws N pairs from the pool at random. Both are
scored on held-out pairs the policy itself wrote (4 samples per held-out prompt, <= 2 pairs each; pairwise accuracy
of DPO's implicit reward) and by KL(pi || pi_ref), evaluate_policy's estimate: mean log pi(y|x) - log pi_ref(y|x)
over one sample y ~ pi at temperature 1 for each held-out prompt. --sft-steps 0 keeps both models random.

--design own-words: each style expresses the preferred property in its own words, so the other model's pairs teach
a preference that does not transfer to the policy's responses. The two word sets share no letter (the policy's
from a-m, the other's from n-z) and each holds its own marker word, a quarter of the SFT words: "glad" for the
policy, "wow" for the other model. A pair's preferred response is the one with more of its own style's marker
(ties dropped); the held-out pairs are the policy's, ranked by "glad". Everything else as above.

    python benchmarks/perplexity_filter.py --seeds 0 1 2 3 4 5 --output-dir /tmp/ppl_filter
    python benchmarks/perplexity_filter.py --design own-words --seeds 0 1 2 3 4 5 6 7 8 9 --prompts 100 \
        --sft-steps 150 --steps 20 --output-dir /tmp/ppl_own
"""
import argparse
import json
import os
import random
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
import train_dpo  # noqa: E402
from conftest import build_test_tokenizer  # noqa: E402
from minirlhf.checkpoint import load_model  # noqa: E402
from minirlhf.data import write_jsonl  # noqa: E402
from minirlhf.evaluate import evaluate_policy  # noqa: E402
from minirlhf.sampler import generate  # noqa: E402
from minirlhf.tokenizer import decode_response, encode_prompt  # noqa: E402
from tiny import save_tiny  # noqa: E402

WORDS = ["cats", "rivers", "stones", "music", "trees", "light", "water", "paper"]
# the two styles: the policy writes with one word set, the other model with another; both sets mix words with
# few and many "e"s, so the preference (more "e"s) applies in both
STYLES = {"policy": ["tree", "sea", "cat", "dog", "bee", "sun", "pen", "map"],
          "other": ["river", "stone", "music", "paper", "leaf", "rock", "green", "owl"]}
# --design own-words: no letter shared between the sets; the marker word (listed twice) is what makes a response good
MARKERS = {"policy": "glad", "other": "wow"}
OWN_WORDS = {"policy": ["bad", "cab", "hide", "lime", "fig", "milk", "glad", "glad"],
             "other": ["town", "rust", "snow", "pony", "sport", "worn", "wow", "wow"]}


def sft_style(model_dir, words, prompts, out, seed, steps):
    """SFT the random model in model_dir (in place) on responses of 3-6 random words of `words`."""
    r = random.Random(seed)
    write_jsonl(out + ".jsonl", [dict(prompt=p, completion=" ".join(r.choice(words) for _ in range(r.randint(3, 6))))
                                 for p in prompts])
    train_dpo.main(["--loss", "sft", "--model", model_dir, "--train-data", out + ".jsonl", "--output-dir", out,
                    "--max-length", "128", "--lr", "3e-3", "--batch-size", "16", "--grad-accum", "1", "--max-steps",
                    str(steps), "--warmup-ratio", "0", "--eval-fraction", "0", "--seed", str(seed), "--overwrite"])
    return out


def count_e(text):
    return text.count("e")


def pairs_from(model_dir, tokenizer, prompts, seed, source, n=2, score=count_e):
    """Every two of the n samples per prompt whose scores differ -> a pair, the higher preferred (default: more
    "e"s)."""
    gen = generate(load_model(model_dir).eval(), [encode_prompt(tokenizer, p) for p in prompts], 16, n=n,
                   eos_token_id=tokenizer.eos_token_id, seed=seed)
    rows = []
    for p, rs in zip(prompts, gen.responses):
        texts = [decode_response(tokenizer, r) for r in rs]
        for a, b in zip(texts[0::2], texts[1::2]):
            if a.strip() and b.strip() and score(a) != score(b):
                chosen, rejected = (a, b) if score(a) > score(b) else (b, a)
                rows.append(dict(prompt=p, chosen=chosen, rejected=rejected, source=source))
    return rows


def kl_to_ref(policy_dir, ref_dir, tokenizer, prompts, seed):
    """KL(pi || pi_ref) on one sample per prompt (evaluate_policy's estimate); the proxy reward is unused."""
    metrics, _ = evaluate_policy(load_model(policy_dir).eval(), load_model(ref_dir).eval(), tokenizer, prompts,
                                 lambda ps, rs: [[0.0] for _ in rs], 16, seed=seed)
    return metrics["kl_to_ref"]


def marker_count(word):
    return lambda text: text.split().count(word)


def run_seed(seed, out, n_prompts, n_eval, steps, sft_steps, design="e-count"):
    os.makedirs(out, exist_ok=True)
    tokenizer = build_test_tokenizer(os.path.join(out, "tokenizer"))
    r = random.Random(seed)
    prompts = [f"tell me about {r.choice(WORDS)} {i}" for i in range(n_prompts + n_eval)]
    train_prompts, eval_prompts = prompts[:n_prompts], prompts[n_prompts:]
    dirs, styles = {}, OWN_WORDS if design == "own-words" else STYLES
    score = {name: marker_count(MARKERS[name]) if design == "own-words" else count_e for name in styles}
    for name, s in (("policy", 2 * seed), ("other", 2 * seed + 1)):
        save_tiny(os.path.join(out, name + "_init"), "llama3", seed=s, vocab_size=len(tokenizer))
        tokenizer.save_pretrained(os.path.join(out, name + "_init"))
        dirs[name] = os.path.join(out, name + "_init")
        if sft_steps:
            dirs[name] = sft_style(dirs[name], styles[name], train_prompts, os.path.join(out, name), s, sft_steps)
        tokenizer.save_pretrained(dirs[name])
    own = pairs_from(dirs["policy"], tokenizer, train_prompts, seed, "policy", score=score["policy"])
    other = pairs_from(dirs["other"], tokenizer, train_prompts, seed + 1000, "other", score=score["other"])
    pool = own + other
    r.shuffle(pool)
    held_out = pairs_from(dirs["policy"], tokenizer, eval_prompts, seed + 2000, "policy", n=4, score=score["policy"])
    write_jsonl(os.path.join(out, "pool.jsonl"), pool)
    write_jsonl(os.path.join(out, "eval.jsonl"), held_out)
    q = len(own) / len(pool)
    common = ["--model", dirs["policy"], "--eval-data", os.path.join(out, "eval.jsonl"), "--max-length",
              "128", "--lr", "1e-3", "--beta", "0.1", "--batch-size", "8", "--grad-accum", "1", "--max-steps",
              str(steps), "--warmup-ratio", "0", "--seed", str(seed), "--overwrite"]
    result = {"pool": len(pool), "policy_pairs": len(own), "held_out_pairs": len(held_out)}
    filtered = train_dpo.main(common + ["--train-data", os.path.join(out, "pool.jsonl"), "--perplexity-quantile",
                                        str(q), "--output-dir", os.path.join(out, "filtered")])
    kept = [json.loads(line) for line in open(os.path.join(out, "filtered", "filtered.jsonl"))]
    result["kept"] = len(kept)
    result["kept_policy_share"] = sum(k["source"] == "policy" for k in kept) / len(own)
    result["kept_other_share"] = sum(k["source"] == "other" for k in kept) / max(1, len(other))
    write_jsonl(os.path.join(out, "random.jsonl"), r.sample(pool, len(kept)))  # the same number of pairs
    unfiltered = train_dpo.main(common + ["--train-data", os.path.join(out, "random.jsonl"), "--output-dir",
                                          os.path.join(out, "unfiltered")])
    for name, summary in (("filtered", filtered), ("unfiltered", unfiltered)):
        result[f"{name}_accuracy"] = summary["eval_accuracy"]
        result[f"{name}_kl"] = kl_to_ref(os.path.join(out, name), dirs["policy"], tokenizer,
                                         eval_prompts, seed)
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--output-dir", default="/tmp/perplexity_filter")
    p.add_argument("--prompts", type=int, default=200, help="training prompts (each gives <= 2 candidate pairs)")
    p.add_argument("--eval-prompts", type=int, default=100, help="held-out prompts (4 policy samples: <= 2 pairs each)")
    p.add_argument("--sft-steps", type=int, default=300, help="SFT steps of 16 giving each model its word style "
                   "(0: both stay random)")
    p.add_argument("--steps", type=int, default=40, help="DPO optimizer steps of 8 pairs, both arms")
    p.add_argument("--design", choices=["e-count", "own-words"], default="e-count", help="e-count: one preference "
                   "rule for both styles; own-words: each style's own marker word (see above)")
    args = p.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    results = [run_seed(s, os.path.join(args.output_dir, f"seed{s}"), args.prompts, args.eval_prompts, args.steps,
                        args.sft_steps, args.design) for s in args.seeds]
    for s, res in zip(args.seeds, results):
        print(f"seed {s}: " + json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in res.items()}))
    for key in ("kept_policy_share", "kept_other_share", "filtered_accuracy", "unfiltered_accuracy", "filtered_kl",
                "unfiltered_kl"):
        values = [res[key] for res in results]
        print(f"mean {key}: {sum(values) / len(values):.4f}  (per seed {', '.join(f'{v:.4f}' for v in values)})")
    wins = [(r["filtered_accuracy"] > r["unfiltered_accuracy"], r["filtered_kl"] < r["unfiltered_kl"]) for r in results]
    print(f"filtered wins: accuracy in {sum(a for a, _ in wins)}, KL in {sum(k for _, k in wins)}, both in "
          f"{sum(a and k for a, k in wins)} of {len(wins)} seeds")


if __name__ == "__main__":
    main()
