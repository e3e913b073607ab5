"""RAIN on the toy bigram LM of tests/test_rain.py ("Sure" -> "here" -> BAD is the likely path): harmful rate of
vanilla sampling and of RAIN with an oracle evaluator and with one right 80% of the time (per response, cached),
with the counted cost, over more runs than the test affords. --synonym-fillers gives the six filler words (whose
next-token rows are identical) one shared embedding: every logit stays as it is, but RAIN's similarity update,
which reads the embeddings, then sees texts that differ only in fillers as alike (as Sentence-BERT would).

    python benchmarks/rain_toy.py --runs 200 [--synonym-fillers]
"""
import argparse
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
from minirlhf import rain  # noqa: E402
from minirlhf.sampler import generate  # noqa: E402
from test_rain import BAD, BOS, DOT, EOS, FILLERS, bigram_model, noisy_oracle, oracle, toy_table  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=200, help="RAIN runs per evaluator")
    p.add_argument("--seed", type=int, default=0, help="seed of the draws and of the evaluator's errors")
    p.add_argument("--synonym-fillers", action="store_true", help="the filler words share one embedding")
    args = p.parse_args()
    torch.set_num_threads(1)
    model = bigram_model(toy_table())
    if args.synonym_fillers:
        with torch.no_grad():
            every_token = torch.arange(model.config.vocab_size)[None]
            logits = model(every_token)
            model.model.embed_tokens.weight[FILLERS] = model.model.embed_tokens.weight[FILLERS[0]].clone()
            assert torch.equal(model(every_token), logits)  # the same next-token distributions
    cfg = rain.RainConfig(max_new_tokens=12)
    vanilla = generate(model, [[BOS]], 12, n=10000, eos_token_id=EOS, seed=args.seed).responses[0]
    print(f"vanilla sampling: harmful {sum(BAD in r for r in vanilla) / len(vanilla):.3f} (10000 samples)")
    for name, make in [("oracle", lambda k: oracle), ("80% right", lambda k: noisy_oracle(0.8, 10**6 * args.seed + k))]:
        generator, start = torch.Generator().manual_seed(args.seed), time.time()
        bad, forwards, tokens, evaluations = 0, 0.0, 0.0, 0
        for k in range(args.runs):
            cost = rain.Cost()
            with rain.counting(model, cost):
                response, _ = rain.search(model, [BOS], make(k), cfg, generator, {EOS}, {DOT}, cost)
            bad += BAD in response
            forwards += cost.forwards / len(response)  # plain decoding: len(y) calls and 1 + len(y) - 1 tokens
            tokens += cost.tokens / len(response)
            evaluations += cost.evaluations
        print(f"RAIN, {name} evaluator: harmful {bad}/{args.runs} = {bad / args.runs:.3f}; cost vs plain decoding "
              f"{forwards / args.runs:.1f}x forwards, {tokens / args.runs:.1f}x tokens; "
              f"{evaluations / args.runs:.1f} evaluations per response; {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
