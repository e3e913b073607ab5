"""The perplexity filter (a reconstruction of Kutalev & Markoff 2024, minirlhf/perplexity.py): the perplexity is
exp(mean NLL) as transformers computes it, and on a pool of responses sampled from the target policy mixed with
responses of another model, train_dpo.py's filter keeps the target's own and writes them beside its output."""
import json
import random
import re

import pytest
import torch

import train_dpo
import train_rm
from minirlhf import perplexity
from minirlhf.checkpoint import load_model
from minirlhf.data import collate_pairs, load_preferences, write_jsonl
from minirlhf.rundir import UserError
from minirlhf.sampler import generate
from minirlhf.tokenizer import decode_response, encode_prompt
from tiny import save_tiny


def test_perplexity_is_exp_mean_nll(tmp_path, tokenizer):
    hf = save_tiny(tmp_path / "m", "qwen2", vocab_size=len(tokenizer))
    rows = [dict(prompt="hi there", chosen="the cat sat", rejected="no"),
            dict(prompt=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "why?"}],
                 chosen="because it is", rejected="it is not, and that is the end of it")]
    write_jsonl(tmp_path / "p.jsonl", rows)
    pairs, _ = load_preferences(tmp_path / "p.jsonl", tokenizer)
    ours = perplexity.pair_perplexities(load_model(tmp_path / "m"), pairs, tokenizer.pad_token_id, batch_size=1)
    batch = collate_pairs(pairs, tokenizer.pad_token_id)
    with torch.no_grad():
        logps = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.log_softmax(-1)
    expected = []
    for b in range(4):  # rows [chosen 0, chosen 1, rejected 0, rejected 1]
        t = batch["loss_mask"][b].nonzero().squeeze(1)  # response tokens, predicted from position t - 1
        expected.append(torch.exp(-logps[b, t - 1, batch["input_ids"][b, t]].mean()))
    torch.testing.assert_close(ours, torch.stack(expected).view(2, 2).T, rtol=1e-4, atol=0)


def sampled_rows(model_dir, tokenizer, prompts, seed):
    """One pair per prompt, both responses sampled from the model in model_dir (temperature 1, 12 tokens)."""
    gen = generate(load_model(model_dir).eval(), [encode_prompt(tokenizer, p) for p in prompts], 12, n=2,
                   eos_token_id=tokenizer.eos_token_id, seed=seed)
    texts = [[decode_response(tokenizer, r) for r in rs] for rs in gen.responses]
    return [dict(prompt=p, chosen=a, rejected=b) for p, (a, b) in zip(prompts, texts)
            if a.strip() and b.strip() and a != b]


def test_filter_keeps_the_policys_own_responses(tmp_path, tokenizer):
    """Pairs sampled from the target policy and from another random model, shuffled together: at quantile q = the
    policy's share of the pool, the filter keeps >= 95% of the policy's pairs, and OUTPUT/filtered.jsonl holds the
    kept rows with their perplexities."""
    for name, seed in (("policy", 0), ("other", 1)):
        save_tiny(tmp_path / name, "llama3", seed=seed, vocab_size=len(tokenizer))
        tokenizer.save_pretrained(tmp_path / name)
    prompts = [f"tell me about {w} {i}" for i, w in enumerate(["cats", "rivers", "stones", "music"] * 10)]
    own = sampled_rows(tmp_path / "policy", tokenizer, prompts, seed=0)
    other = sampled_rows(tmp_path / "other", tokenizer, prompts, seed=1)
    pool = [row | {"source": "policy"} for row in own] + [row | {"source": "other"} for row in other]
    random.Random(0).shuffle(pool)
    write_jsonl(tmp_path / "pool.jsonl", pool)
    q = len(own) / len(pool)
    out = tmp_path / "dpo"
    train_dpo.main(["--model", str(tmp_path / "policy"), "--train-data", str(tmp_path / "pool.jsonl"), "--output-dir",
                    str(out), "--max-length", "128", "--perplexity-quantile", str(q), "--max-steps", "1",
                    "--batch-size", "4", "--grad-accum", "1", "--eval-fraction", "0"])
    kept = [json.loads(line) for line in open(out / perplexity.FILE)]
    kept_own = sum(row["source"] == "policy" for row in kept) / len(own)
    print(f"kept {kept_own:.3f} of the policy's {len(own)} pairs, "
          f"{sum(row['source'] == 'other' for row in kept) / len(other):.3f} of the other model's {len(other)}")
    assert kept_own >= 0.95
    assert all(row["chosen_perplexity"] > 1 and row["rejected_perplexity"] > 1 for row in kept)
    assert max(max(r["chosen_perplexity"], r["rejected_perplexity"]) for r in kept) <= min(
        max(r["chosen_perplexity"], r["rejected_perplexity"]) for r in kept) * 1e6  # finite, written as numbers


@pytest.mark.parametrize("script, flags, match", [
    (train_dpo, ["--max-perplexity", "3", "--perplexity-quantile", "0.5"], "give one"),  # two thresholds
    (train_rm, ["--filter-model", "POLICY"], "give one"),  # a filter model, no threshold
    (train_dpo, ["--max-perplexity", "0"], "give one"),
    (train_rm, ["--max-perplexity", "-1"], "give one"),
    (train_dpo, ["--max-perplexity", "nan"], "give one"),
    (train_dpo, ["--perplexity-quantile", "0"], "give one"),
    (train_rm, ["--perplexity-quantile", "1.5"], "give one"),
    (train_dpo, ["--loss", "sft", "--perplexity-quantile", "0.5"], "not for --loss sft"),
    (train_rm, ["--kind", "regression", "--max-perplexity", "9"], "not for --kind regression"),
    (train_dpo, ["--filter-model", "RM", "--perplexity-quantile", "0.5"], "--filter-model RM .*reward model"),
    (train_rm, ["--filter-model", "RM", "--max-perplexity", "9"], "--filter-model RM .*reward model"),
    (train_rm, ["--model", "RM", "--perplexity-quantile", "0.5"], "--filter-model RM .*reward model"),  # the default
])
def test_refused_filter_flags(tmp_path, tokenizer, script, flags, match):
    """Every combination of the filter's flags that cannot work stops before any model loads, with a UserError
    naming the flag (and for a reward-model folder, the folder: its perplexity is not that of a policy)."""
    paths = {"POLICY": str(tmp_path / "policy"), "RM": str(tmp_path / "rm")}
    save_tiny(paths["POLICY"], "qwen2", vocab_size=len(tokenizer))  # tied embeddings: its RM would load silently
    save_tiny(paths["RM"], "qwen2", kind="reward", vocab_size=len(tokenizer))
    argv = ["--model", paths["POLICY"], "--train-data", str(tmp_path / "none.jsonl"), "--output-dir",
            str(tmp_path / "out")] + [paths.get(f, f) for f in flags]
    with pytest.raises(UserError, match=match.replace("RM", re.escape(paths["RM"]))):
        script.main(argv)
    assert not (tmp_path / "out").exists()


def test_train_rm_filters_its_pairs(tmp_path, tokenizer):
    """train_rm.py's bt and pairwise kinds train on the same kept rows: those of filtered.jsonl, about a fraction q."""
    save_tiny(tmp_path / "policy", "llama3", vocab_size=len(tokenizer))
    tokenizer.save_pretrained(tmp_path / "policy")
    r = random.Random(0)
    rows = [dict(prompt=f"q{i}", rejected="no" * r.randint(1, 3),
                 chosen=" ".join(r.choice(["cat", "sat", "mat", "zzq"]) for _ in range(r.randint(1, 5))))
            for i in range(20)]
    write_jsonl(tmp_path / "pairs.jsonl", rows)
    kept, examples = {}, {}
    for kind in ("bt", "pairwise"):
        args = train_rm.build_parser().parse_args([
            "--kind", kind, "--model", str(tmp_path / "policy"), "--train-data", str(tmp_path / "pairs.jsonl"),
            "--output-dir", str(tmp_path / "out"), "--max-length", "128", "--perplexity-quantile", "0.5"])
        (tmp_path / kind).mkdir()
        examples[kind] = train_rm.load_examples(args, tokenizer, args.train_data, "train", tmp_path / kind,
                                                torch.device("cpu"))
        kept[kind] = [json.loads(line) for line in open(tmp_path / kind / perplexity.FILE)]
        assert len(examples[kind]) == len(kept[kind]) == 10
    assert kept["bt"] == kept["pairwise"]
    assert [row["prompt"] for row in kept["bt"]] == [rows[pair.row]["prompt"] for pair, _ in examples["bt"]]
