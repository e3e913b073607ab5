"""Perplexity-filtered preference data for one policy (after Kutalev & Markoff 2024, arXiv 2410.01789).

A RECONSTRUCTION: the paper's method section could not be obtained; its abstract says only that collecting the
preference set "through perplexity filtering" makes building one for a specific model cheap. The evident reading:
score each response by its perplexity under the target policy pi (the fused log-prob op, average=True),
    PPL_pi(y | x) = exp(-(1/|y|) sum_t log pi(y_t | x, y_<t)),
and keep a pair when max(PPL(y_c), PPL(y_r)) <= tau (--max-perplexity, or the --perplexity-quantile q of that
score, about the fraction kept), so DPO and the reward model learn from responses the policy could have written.
train_dpo.py and train_rm.py filter --train-data (never --eval-data) under --filter-model (default --model, a causal
LM) and write the kept rows with their perplexities to OUTPUT/filtered.jsonl; every rank scores every pair (FSDP's
forwards stay in step) and keeps the same rows.
"""
import os

import torch

from minirlhf import checkpoint, cli, data, dist
from minirlhf.logprobs import sequence_logps
from minirlhf.rundir import UserError
from minirlhf.tokenizer import load_tokenizer, pad_token_id

FILE = "filtered.jsonl"


@torch.no_grad()
def pair_perplexities(model, pairs, pad_id, device=torch.device("cpu"), batch_size=8) -> torch.Tensor:
    """data.Pairs -> (N, 2) fp32 [PPL(chosen), PPL(rejected)] under `model`."""
    out = []
    for s in range(0, len(pairs), batch_size):
        batch = {k: v.to(device) for k, v in data.collate_pairs(pairs[s:s + batch_size], pad_id).items()}
        with dist.autocast(device):
            mean_logps, _ = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"],
                                           average=True)  # (2B,) [chosen..., rejected...]
        out.append((-mean_logps.float()).exp().view(2, -1).T.cpu())
    return torch.cat(out)


def check_arguments(args) -> str | None:
    """The filter's flags make sense together; returns the causal LM that scores perplexities, None if it is off."""
    x, q, path = args.max_perplexity, args.perplexity_quantile, args.filter_model or args.model
    if (x is not None and q is not None) or (args.filter_model and x is None and q is None) or not (
            (x is None or x > 0) and (q is None or 0 < q <= 1)):
        raise UserError(f"the perplexity filter needs one threshold, --max-perplexity X > 0 (got {x}) or "
                        f"--perplexity-quantile q in (0, 1] (got {q}): give one")
    if (x or q) and os.path.isfile(os.path.join(path, "config.json")) and checkpoint.score_outputs(
            checkpoint.read_config(path)):  # on (x, q > 0 by now); LoRA adapters: no config
        raise UserError(f"--filter-model {path} (default --model) is a reward model (*ForSequenceClassification): "
                        "the filter needs the causal LM policy whose perplexity it measures")
    return path if x or q else None


def filter_rows(args, rows, source, out_dir, device) -> set[int] | None:
    """The indices of `rows` (--train-data's pairs) that pass the filter, None when it is off; rank 0 writes FILE."""
    if not (path := check_arguments(args)):
        return None
    tokenizer = cli.load_tokenizer(args) if path == args.model else load_tokenizer(path)  # the policy's encoding
    pairs, _ = data.tokenize_preferences(rows, tokenizer, args.prompt_column, args.chosen_column,
                                         args.rejected_column, args.max_length, args.max_prompt_length,
                                         skip_bad=args.skip_bad_rows, source=str(source))
    model = checkpoint.load_model(path, device="cpu" if dist.world_size() > 1 else device).eval()
    ppl = pair_perplexities(dist.apply_fsdp(model, device), pairs,
                            pad_token_id(tokenizer), device, args.batch_size)
    score = ppl.max(1).values.double()  # (N,) the less natural response of each pair decides
    tau = args.max_perplexity or torch.quantile(score, args.perplexity_quantile).item()
    keep = [i for i in range(len(pairs)) if score[i] <= tau]
    if not keep:
        raise UserError(f"{source}: the perplexity filter kept no pair (threshold {tau:.4g}, smallest pair "
                        f"perplexity {score.min().item():.4g} under {path})")
    if dist.is_main():
        data.write_jsonl(os.path.join(out_dir, FILE), [dict(rows[pairs[i].row], chosen_perplexity=ppl[i, 0].item(),
                                                            rejected_perplexity=ppl[i, 1].item()) for i in keep])
    dist.print0(f"{source}: perplexity filter under {path}: kept {len(keep)} of {len(pairs)} pairs "
                f"(max perplexity {tau:.4g}) -> {FILE}")
    return {pairs[i].row for i in keep}
