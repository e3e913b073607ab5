"""DPO on a preference dataset, and the SFT before it: steps 1 and 5 of Dong et al. 2024, "RLHF Workflow".

DPO (Rafailov et al. 2023, eq. 7) fits the policy pi to pairs (x, y_c, y_r) without a reward model:
    L = -log sigmoid(beta [(log pi(y_c|x) - log pi_ref(y_c|x)) - (log pi(y_r|x) - log pi_ref(y_r|x))])
The reference terms are constants, so they are computed once, in one pass, before training (and saved as
ref_logps.safetensors); the reference model is then freed and training holds one model, under FSDP too.
--loss ipo|hinge picks another loss of losses.PREFERENCE_LOSSES, --nll-coef adds RPO's chosen NLL, and
--loss sft trains the NLL of the response tokens only (the SFT model the workflow starts from). --lora-rank r
trains LoRA adapters on the frozen --model instead (minirlhf/lora.py; --quantize nf4: QLoRA), and the reference,
when it is --model, is the policy with its adapters off: no second model, even for the one pass.

Defaults are the paper's recipe for real models (Dong et al. 2024 sec. 5; RLHFlow/Online-RLHF's configs): DPO
beta 0.1, lr 5e-7, 2 epochs; SFT lr 2e-5, 1 epoch; AdamW without weight decay, cosine, 3% warmup, clip 1.0,
max length 4096 with prompts up to 1024, global batch 128 (batch 8 x accumulation 16 on one GPU; divide
--grad-accum by the number of GPUs). Unlike the paper (DeepSpeed, packed SFT) we use FSDP2, no packing, and
log-probs from the chunked fused op (no (B, T, V) logits). Nothing is dropped: the last window of an epoch may
be short, and its loss is the mean over its own pairs.

    python train_dpo.py --model MODEL --train-data pairs.jsonl --output-dir out/dpo --eval-fraction 0.05
    torchrun --nproc_per_node=8 train_dpo.py --model MODEL --train-data DATA --grad-accum 2 --output-dir out/dpo

OUTPUT is a Hugging Face folder (config.json, model.safetensors, tokenizer) with args.json, metrics.jsonl,
eval.json, ref_logps.safetensors and done.json (published together from OUTPUT/staging/ at the end:
minirlhf/rundir.py), and checkpoint/ (model, one optimizer shard and RNG state per rank, and
trainer_state.json; safetensors and JSON, no pickle). --resume continues from checkpoint/ and needs the same
world size, since each rank saved its own FSDP optimizer shard; a finished run deletes checkpoint/ (its optimizer
state is twice the weights) unless --keep-optimizer. The weights are saved in the --model checkpoint's dtype
(--save-dtype). OUTPUT must be on a filesystem every node sees. Flags shared with train_rm.py: minirlhf/cli.py;
--max-perplexity / --perplexity-quantile keep the pairs the policy could have written (minirlhf/perplexity.py, a
reconstruction of Kutalev & Markoff 2024) and write them to OUTPUT/filtered.jsonl.
Test hook: MINIRLHF_FAIL_AFTER_STEP=k raises after step k (a simulated kill).
"""
import gc
import hashlib
import json
import math
import os
import time

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor

from minirlhf import checkpoint, cli, data, dist, lora, losses, perplexity, rundir
from minirlhf.logprobs import length_normalize, sequence_logps
from minirlhf.tokenizer import pad_token_id

PAPER_DEFAULTS = {"dpo": dict(lr=5e-7, epochs=2), "sft": dict(lr=2e-5, epochs=1)}  # for an unset --lr / --epochs


def build_parser():
    p = cli.add_common_arguments(cli.parser(__doc__), batch_size=8, grad_accum=16)
    p.add_argument("--ref-model", default=None, help="reference policy checkpoint folder (default: --model)")
    p.add_argument("--completion-column", default="completion", help="SFT: completion column")
    p.add_argument("--messages-column", default="messages", help="SFT: conversation column (last assistant turn)")
    # objective
    p.add_argument("--loss", default="dpo", choices=[*losses.PREFERENCE_LOSSES, "sft"], help="training objective")
    p.add_argument("--beta", type=float, default=0.1, help="KL strength beta of DPO / IPO / hinge")
    p.add_argument("--label-smoothing", type=float, default=0.0, help="cDPO (--loss dpo only): probability in "
                                                                        "[0, 0.5) that a label is flipped")
    p.add_argument("--nll-coef", type=float, default=0.0, help="RPO: weight of the chosen response's per-token NLL")
    p.add_argument("--length-normalize", action="store_true", help="log-probs averaged over response tokens "
                                                                     "(as TRL does for IPO)")
    # optimisation
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 5e-7, SFT 2e-5)")
    p.add_argument("--epochs", type=int, default=None, help="passes over the training data (default 2, SFT 1)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--adam-eps", type=float, default=1e-8, help="AdamW epsilon")
    p.add_argument("--lr-schedule", default="cosine", choices=["cosine", "linear", "constant"], help="after warmup")
    return p


def collate(examples, pad_id, device):
    """Pairs -> (2B, T) [chosen; rejected] batch, Sequences -> (B, T); right padding (data.py)."""
    fn = data.collate_pairs if isinstance(examples[0], data.Pair) else data.collate_sequences
    return {k: v.to(device) for k, v in fn(examples, pad_id).items()}


@torch.no_grad()
def compute_logps(model, examples, batch_size, device, pad_id):
    """Summed response log-probs of every example in one pass, sharded over ranks -> (logps, n_tokens), each
    (N, 2) [chosen, rejected] for Pairs or (N, 1) for Sequences, fp32 on CPU and identical on every rank.

    Examples go in length order (less padding). Under FSDP every rank must run as many forwards as the others,
    so a rank with nothing left runs example 0 and drops the result."""
    model.eval()
    K = 2 if isinstance(examples[0], data.Pair) else 1
    logps = torch.zeros(len(examples), K, dtype=torch.float64, device=device)
    n_tokens = torch.zeros(len(examples), K, device=device)
    order = sorted(range(len(examples)), key=lambda i: sum(len(v) for v in vars(examples[i]).values() if isinstance(v, list)))
    rank, world_size = dist.get_rank(), dist.world_size()
    for s in range(0, len(order), batch_size * world_size):
        rows = order[s + rank * batch_size:s + (rank + 1) * batch_size]
        batch = collate([examples[i] for i in rows or [0]], pad_id, device)
        with dist.autocast(device):
            lp, n = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
        if rows:  # (K*B,) = [chosen..., rejected...] -> (B, K)
            logps[rows], n_tokens[rows] = lp.double().view(K, -1).T, n.float().view(K, -1).T
    dist.all_reduce_sum(logps), dist.all_reduce_sum(n_tokens)  # sync point: each row was filled by one rank
    return logps.float().cpu(), n_tokens.cpu()


def reference_logps(ref_model_path, examples, eval_examples, path, batch_size, device, pad_id, reuse=False,
                    strict=False, model=None):
    """{chosen,rejected}_{logps,tokens} (N,) per example of `examples` (rows of --train-data) and eval_* per
    example of `eval_examples`: read from `path` (a safetensors file) if `reuse` and its fingerprint (reference
    path + every token id) matches, else from one pass of the reference model, which is then freed; saved to
    `path` with metadata {"ref_model": absolute path, "fingerprint"}. `strict`: a fingerprint that does not match
    (the data changed under the same path since the run began) is an error. `model`: a LoRA policy whose base
    is the reference, run with its adapters off instead of loading a second model."""
    key = hashlib.sha256(os.path.abspath(ref_model_path).encode())
    for e in examples + eval_examples:
        key.update(repr((e.prompt_ids, e.chosen_ids, e.rejected_ids)).encode())
    key = key.hexdigest()
    if reuse and os.path.exists(path):
        with safe_open(path, "pt") as f:
            if f.metadata().get("fingerprint") == key:
                return load_file(path)
        if strict:
            raise rundir.UserError(f"{path}: the data or the reference model differ from those the run began with "
                                   "(their token ids): resume with the same data, or pass --allow-changed-args")
    ref_model = model if model is not None else dist.apply_fsdp(checkpoint.load_model(
        ref_model_path, device="cpu" if dist.world_size() > 1 else device), device)
    out = {}
    with lora.adapters_off(ref_model):  # no-op for a plain model
        for prefix, exs in (("", examples), ("eval_", eval_examples)):
            if exs:
                logps, n_tokens = compute_logps(ref_model, exs, batch_size, device, pad_id)
                out |= {f"{prefix}chosen_logps": logps[:, 0], f"{prefix}rejected_logps": logps[:, 1],
                        f"{prefix}chosen_tokens": n_tokens[:, 0], f"{prefix}rejected_tokens": n_tokens[:, 1]}
    del ref_model  # training holds one model
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
    if dist.is_main():
        tmp = f"{path}.tmp-{os.getpid()}"
        with rundir.writing(path):
            save_file({k: v.contiguous() for k, v in out.items()}, tmp,
                      metadata={"ref_model": os.path.abspath(ref_model_path), "fingerprint": key})
        rundir.durable_replace(tmp, path)
    return out


def ref_table(ref, prefix, normalize):
    """(N, 2) reference [chosen, rejected] log-probs, averaged per token with --length-normalize."""
    logps = torch.stack([ref[f"{prefix}chosen_logps"], ref[f"{prefix}rejected_logps"]], 1)
    n_tokens = torch.stack([ref[f"{prefix}chosen_tokens"], ref[f"{prefix}rejected_tokens"]], 1)
    return length_normalize(logps, n_tokens) if normalize else logps


def preference_losses(args, chosen, rejected, ref_chosen, ref_rejected, chosen_tokens):
    """Per-pair losses (B,) and the detached implicit rewards beta log(pi / pi_ref) of chosen and rejected."""
    out, chosen_rewards, rejected_rewards = losses.PREFERENCE_LOSSES[args.loss](
        chosen, rejected, ref_chosen, ref_rejected, args.beta, args.label_smoothing)
    if args.nll_coef:
        out = losses.add_nll(out, chosen, 1 if args.length_normalize else chosen_tokens, args.nll_coef)
    return out, chosen_rewards, rejected_rewards


def evaluate(args, policy, eval_examples, ref_eval, device, pad_id):
    """DPO: preference accuracy of the implicit reward, mean margin and loss; SFT: NLL per response token."""
    logps, n_tokens = compute_logps(policy, eval_examples, args.batch_size, device, pad_id)
    if args.loss == "sft":
        return {"eval_nll": -logps.sum().item() / n_tokens.sum().item(), "n_eval": len(eval_examples)}
    if args.length_normalize:
        logps = length_normalize(logps, n_tokens)
    pair_losses, chosen_r, rejected_r = preference_losses(args, *logps.unbind(1), *ref_eval.unbind(1), n_tokens[:, 0])
    margin = chosen_r - rejected_r
    return {"eval_loss": pair_losses.mean().item(), "eval_accuracy": (margin > 0).float().mean().item(),
            "eval_margin": margin.mean().item(), "eval_chosen_reward": chosen_r.mean().item(),
            "eval_rejected_reward": rejected_r.mean().item(), "n_eval": len(eval_examples)}


def load_policy(args, resume_ckpt, device):
    """--model with the --lora-* flags applied (resuming: the checkpoint's weights, or its adapter), sharded by
    FSDP2 (bf16 compute, fp32 master weights and gradient reduction on GPU)."""
    full = resume_ckpt and not args.lora_rank
    policy = checkpoint.load_model(resume_ckpt if full else args.model, device="cpu" if dist.world_size() > 1 else device)
    policy = lora.from_args(policy, args, args.model, resume_ckpt if args.lora_rank else None)
    policy.model.gradient_checkpointing = args.gradient_checkpointing
    return dist.apply_fsdp(policy, device)


def load_examples(args, tokenizer, path, split, out_dir=None, device=None):
    """SFT sequences or preference pairs; the pairs of --train-data that pass the perplexity filter (when asked for:
    minirlhf/perplexity.py)."""
    kw = dict(prompt_column=args.prompt_column, chosen_column=args.chosen_column, max_length=args.max_length,
              max_prompt_length=args.max_prompt_length, skip_bad=args.skip_bad_rows)
    if args.loss == "sft":
        return data.load_sft(path, tokenizer, split, completion_column=args.completion_column,
                             messages_column=args.messages_column, **kw)[0]
    rows = data.load_dataset_any(path, split)
    keep = perplexity.filter_rows(args, rows, path, out_dir, device) if path == args.train_data else None
    pairs = data.tokenize_preferences(rows, tokenizer, rejected_column=args.rejected_column, source=str(path), **kw)[0]
    return [pair for pair in pairs if keep is None or pair.row in keep]


# arguments that cannot change the trained weights: they may differ on --resume
NOT_RESULTS = ("resume", "allow_changed_args", "overwrite", "save_steps", "gradient_checkpointing", "eval_every",
               "name", "keep_optimizer", "save_total_limit")


def main(argv=None):
    args = build_parser().parse_args(argv)
    sft = args.loss == "sft"
    for k, v in PAPER_DEFAULTS["sft" if sft else "dpo"].items():
        setattr(args, k, v if getattr(args, k) is None else getattr(args, k))
    args.ref_model = args.ref_model or args.model
    cli.resolve_common(args)
    if perplexity.check_arguments(args) and sft:
        raise rundir.UserError("the perplexity filter keeps preference pairs: not for --loss sft")
    if args.label_smoothing and (args.loss != "dpo" or not 0 <= args.label_smoothing < 0.5):
        raise rundir.UserError(f"--label-smoothing {args.label_smoothing}: conservative DPO needs --loss dpo (got "
                               f"{args.loss}) and a flip rate in [0, 0.5) (0.5 or more inverts the preference)")
    rank, world_size, device = dist.init_distributed()
    if args.loss == "ipo" and not args.length_normalize:
        dist.print0("note: IPO on summed log-probs (the paper's form); TRL averages them per token "
                    "(--length-normalize), so a beta tuned in TRL does not carry over")
    names = ["ref_logps.safetensors", "metrics.jsonl", "eval.json", "args.json", perplexity.FILE]  # what this script writes
    run = rundir.start(args.output_dir, vars(args), names, resume=args.resume, overwrite=args.overwrite,
                       allow_changed_args=args.allow_changed_args, ignore=NOT_RESULTS)
    try:
        return train(args, run, rank, world_size, device)
    finally:
        run.close()


def train(args, run, rank, world_size, device):
    sft, resume = args.loss == "sft", run.resume
    ckpt = os.path.join(args.output_dir, "checkpoint")

    # data: every rank tokenises everything (deterministic) and takes its slice of each window
    tokenizer = cli.load_tokenizer(args)
    pad_id = pad_token_id(tokenizer)
    examples = load_examples(args, tokenizer, args.train_data, args.train_split, run.staging, device)
    train_rows, eval_rows = list(range(len(examples))), []
    if args.eval_fraction > 0 and not args.eval_data:
        perm = torch.randperm(len(examples), generator=torch.Generator().manual_seed(args.seed)).tolist()
        n_eval = max(1, round(args.eval_fraction * len(examples)))
        eval_rows, train_rows = sorted(perm[:n_eval]), sorted(perm[n_eval:])
    eval_examples = (load_examples(args, tokenizer, args.eval_data, args.eval_split)
                     if args.eval_data else [examples[i] for i in eval_rows])
    window_size = args.batch_size * args.grad_accum * world_size
    steps_per_epoch = math.ceil(len(train_rows) / window_size)
    total_steps = args.epochs * steps_per_epoch if args.max_steps is None else args.max_steps
    warmup_steps = math.ceil(args.warmup_ratio * total_steps)

    # reference log-probs: one pass, then the reference model is gone (the values stay on disk for resume); under
    # LoRA a reference equal to --model is the policy itself with its adapters off
    ref_train = ref_eval = policy = None
    if args.lora_rank and os.path.abspath(args.ref_model) == os.path.abspath(args.model):
        policy = load_policy(args, ckpt if resume else None, device)
    if not sft:
        ref = reference_logps(args.ref_model, examples, eval_examples if args.eval_data else [],
                              os.path.join(run.staging, "ref_logps.safetensors"), args.batch_size, device, pad_id,
                              reuse=resume, strict=not args.allow_changed_args, model=policy)
        ref_train = ref_table(ref, "", args.length_normalize).to(device)  # (N, 2), indexed by row of --train-data
        ref_eval = ref_table(ref, "eval_", args.length_normalize) if args.eval_data else ref_train[eval_rows].cpu()

    # policy: sharded over ranks by FSDP2; the optimizer holds the trainable weights only (LoRA: the adapters)
    policy = load_policy(args, ckpt if resume else None, device) if policy is None else policy
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=args.lr,
                                  weight_decay=args.weight_decay, eps=args.adam_eps)
    step = 0
    if resume:
        step = checkpoint.load_training_state(policy, optimizer, ckpt, device)["step"]
        dist.print0(f"resuming from {ckpt} at step {step}")
    run.start_metrics(step)  # keep the log of the steps before the checkpoint, drop those that will be redone
    saved, save_due = (step if resume else None), False

    # training loop: one optimizer step per window of batch_size x grad_accum x world_size pairs
    cli.warn_few_steps(total_steps, args.batch_size, args.grad_accum, world_size, len(train_rows))
    bar = cli.Progress(args.name or args.loss, total_steps, initial=step)
    fail_after = int(os.environ.get("MINIRLHF_FAIL_AFTER_STEP", -1))
    last, tokens_per_sec, epoch_windows = {}, [], (None, [])
    while step < total_steps:
        t0, rng = time.perf_counter(), checkpoint.rng_state() if save_due else None  # what --resume redraws from
        epoch, w = divmod(step, steps_per_epoch)
        if epoch_windows[0] != epoch:
            epoch_windows = (epoch, data.epoch_windows(len(train_rows), window_size, args.seed, epoch))
        window = [train_rows[i] for i in epoch_windows[1][w]]
        # every rank knows the window's size in pairs (SFT: target tokens): the global count of window_mean
        n_window = sum(len(examples[i].response_ids) for i in window) if sft else len(window)
        lr = losses.lr_at(step, total_steps, warmup_steps, args.lr, args.lr_schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        policy.train()
        sums = torch.zeros(5, dtype=torch.float64, device=device)  # loss, chosen/rejected reward, correct, tokens
        for rows in data.micro_batches(window, args.batch_size, rank, world_size):
            weight = 1.0 if rows else 0.0
            batch = collate([examples[i] for i in rows or window[:1]], pad_id, device)
            with dist.autocast(device):
                logps, n_tokens = sequence_logps(policy, batch["input_ids"], batch["attention_mask"],
                                                 batch["loss_mask"], average=args.length_normalize and not sft)
            if sft:  # summed NLL per sequence; window_mean divides by the window's target tokens
                pair_losses, chosen_r, rejected_r = -logps, logps.new_zeros(1), logps.new_zeros(1)
            else:
                pair_losses, chosen_r, rejected_r = preference_losses(
                    args, *logps.view(2, -1), *ref_train[rows or window[:1]].unbind(1), n_tokens.view(2, -1)[0])
            losses.window_mean(pair_losses * weight, n_window, world_size).backward()
            sums += weight * torch.stack([pair_losses.detach().sum(), chosen_r.sum(), rejected_r.sum(),
                                          (chosen_r > rejected_r).sum(), batch["attention_mask"].sum()]).double()
        dist.all_reduce_sum(sums)  # sync point: window statistics over ranks
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm or float("inf"))
        grad_norm = (grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm).item()
        sums = sums.tolist()
        loss = sums[0] / n_window
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            raise FloatingPointError(rundir.nonfinite_message(step + 1, loss, grad_norm, ckpt, saved))
        if save_due:  # the weights of step `step` just gave a finite loss and gradient: only now a good checkpoint
            checkpoint.save_training_state(policy, optimizer, tokenizer, args.output_dir,
                                           {"step": step, "world_size": world_size}, keep=args.save_total_limit,
                                           rng=rng)
            saved, save_due = step, False
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_per_sec.append(sums[4] / (time.perf_counter() - t0))
        last = {"step": step, "epoch": step / steps_per_epoch, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                "tokens_per_sec": tokens_per_sec[-1]}
        if not sft:
            n = len(window)
            last |= {"chosen_reward": sums[1] / n, "rejected_reward": sums[2] / n, "margin": (sums[1] - sums[2]) / n,
                     "accuracy": sums[3] / n}
        if args.eval_every and step % args.eval_every == 0 and step < total_steps and eval_examples:
            last |= evaluate(args, policy, eval_examples, ref_eval, device, pad_id)
        run.log(last)
        bar.update(1, loss=f"{loss:.4f}", **({} if sft else {"acc": f"{last['accuracy']:.2f}"}))
        save_due = bool(args.save_steps) and step % args.save_steps == 0 and step < total_steps
        if step == fail_after:
            raise RuntimeError(f"MINIRLHF_FAIL_AFTER_STEP={fail_after}: simulated kill")
    bar.close()

    # held-out evaluation, then OUTPUT/checkpoint (resumable) and OUTPUT itself (the final HF model)
    summary = {"step": step, "train_loss": last.get("loss"), "output_dir": os.path.abspath(args.output_dir),
               "train_examples": len(train_rows),  # after --skip-bad-rows: what was trained on
               "tokens_per_sec": sum(tokens_per_sec) / max(1, len(tokens_per_sec))}
    if eval_examples:
        summary |= evaluate(args, policy, eval_examples, ref_eval, device, pad_id)
        dist.print0(json.dumps({k: v for k, v in summary.items() if k.startswith("eval")}))
    checkpoint.save_training_state(policy, optimizer, tokenizer, args.output_dir,
                                   {"step": step, "world_size": world_size}, dtype=cli.save_dtype(args),
                                   keep=args.save_total_limit, merge=args.merge_lora)
    run.publish(ckpt, {"eval.json": summary}, keep_checkpoint=args.keep_optimizer)  # then done.json
    dist.barrier()
    return summary


if __name__ == "__main__":
    with rundir.user_errors():
        main()
    dist.cleanup()
