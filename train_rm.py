r"""Reward modelling: step 2 of Dong et al. 2024, "RLHF Workflow" (sec. 3.1), on a preference dataset.

--kind bt        a Bradley-Terry reward model r(x, y): the backbone plus a scalar `score` head read at the last
                 token (paper eq. 2), loss  -log sigmoid(r(x, y_c) - r(x, y_r) - m)  with an optional per-pair
                 margin m (--margin-column, as in Llama 2). Saved as *ForSequenceClassification.
--kind pairwise  a pairwise preference model (RLHFlow's pair-preference-model): a causal LM reads
                 rewards.PAIRWISE_TEMPLATE (prompt, response A, response B) and answers with the label token of
                 the better one; trained on both orders of every pair, loss
                 -1/2 [log p("A" | x, y_c, y_r) + log p("B" | x, y_r, y_c)]. Saved as a causal LM.
--kind regression  HelpSteer2's multi-attribute regression model (Wang et al. 2024, sec. 3; NeMo-Aligner's SteerLM
                 RM): rows prompt, response and a rating per --attributes; a K-output `score` head at the last
                 token, loss sum over rated entries of (pred - rating)^2 divided by their number in the window
                 (unrated: null or missing, masked). Saved as *ForSequenceClassification with num_labels K,
                 id2label the attributes and config "attribute_weights" w, so reward r = w . a
                 (rewards.load_reward_source). eval.json: per-attribute MAE and R^2, and the accuracy of r on the
                 held-out pairs of responses to one prompt whose --pair-attribute differs (HelpSteer2-preference).

Defaults follow RLHFlow's recipe: AdamW, lr 2e-6 (bt) / 5e-6 (pairwise), 1 epoch, cosine schedule to 0 with 3%
linear warmup (losses.lr_at, train_dpo.py's schedule), weight decay 0.001 (not on norms/biases),
gradient clipping 1.0, max length 4096. Their global batch is 512 pairs: --batch-size 1 --grad-accum 64 on
8 GPUs. Global batch = batch size x grad accum x world size; an epoch's last optimizer step may be short
(nothing is dropped, as in train_dpo.py: data.epoch_windows). Unlike RLHFlow (DeepSpeed, transformers Trainer)
this is FSDP2 and one plain loop.

    python train_rm.py --model SFT_MODEL --train-data prefs.jsonl --output-dir out/rm
    torchrun --nproc_per_node=8 train_rm.py --model meta-llama/... --train-data prefs.parquet \
        --output-dir out/rm --batch-size 1 --grad-accum 64 --gradient-checkpointing

OUTPUT/ becomes a Hugging Face folder (config.json, model.safetensors, tokenizer; pairwise.json for --kind
pairwise) next to args.json, metrics.jsonl (one line per optimizer step), eval.json (held-out accuracy, loss,
mean margin, number of pairs) and done.json, published together from OUTPUT/staging/ at the end
(minirlhf/rundir.py); checkpoint/ holds what --resume needs, as in train_dpo.py (same world size).
`rewards.load_reward_source(OUTPUT)` scores with it. --max-length counts the judge's prompt for --kind pairwise.
Flags shared with train_dpo.py (data, held-out split, seed, --save-dtype, --keep-optimizer, --lora-rank and the
other LoRA / QLoRA flags, under which the `score` head still trains in full, and the perplexity filter of
--train-data's pairs, a reconstruction of Kutalev & Markoff 2024: minirlhf/perplexity.py): minirlhf/cli.py.
Test hook: MINIRLHF_FAIL_AFTER_STEP=k raises after step k.
"""
import itertools
import json
import math
import os
from collections import Counter

import torch
from torch.distributed.tensor import DTensor

from minirlhf import checkpoint, cli, data, dist, lora, losses, perplexity, rewards, rundir
from minirlhf.tokenizer import check_chat_template, encode_prompt, pad_token_id

DEFAULT_LR = {"bt": 2e-6, "pairwise": 5e-6, "regression": 2e-6}
HELPSTEER2 = "helpfulness,correctness,coherence,complexity,verbosity"  # its Llama-3-70B RM's weights (sec. 4.2):
HELPSTEER2_WEIGHTS = "0.65,0.8,0.45,0.55,-0.4"
# arguments that cannot change the trained weights: they may differ on --resume
NOT_RESULTS = ("resume", "allow_changed_args", "overwrite", "save_steps", "gradient_checkpointing", "eval_every",
               "eval_batch_size", "keep_optimizer", "name", "save_total_limit")


def build_parser():
    p = cli.add_common_arguments(cli.parser(__doc__), batch_size=8, grad_accum=1)
    p.add_argument("--kind", default="bt", choices=["bt", "pairwise", "regression"],
                   help="Bradley-Terry, pairwise or multi-attribute regression model")
    p.add_argument("--margin-column", default=None, help="bt: per-pair margin m in the loss (default: none, m = 0)")
    p.add_argument("--label-tokens", default="A,B", help="pairwise: the two answer tokens, comma separated")
    p.add_argument("--response-column", default="response", help="regression: response column")
    p.add_argument("--attributes", default=HELPSTEER2, help="regression: rating columns, comma separated")
    p.add_argument("--attribute-weights", default=HELPSTEER2_WEIGHTS, help="regression: w of the reward w . a")
    p.add_argument("--attribute-range", default="0,4", help="regression: lowest,highest valid rating")
    p.add_argument("--pair-attribute", default="helpfulness", help="regression eval: the better of two responses")
    # optimisation
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 2e-6 bt, 5e-6 pairwise)")
    p.add_argument("--epochs", type=int, default=1, help="passes over the training pairs")
    p.add_argument("--eval-batch-size", type=rundir.positive_int, default=None,
                   help="pairs per eval batch per rank (default --batch-size)")
    p.add_argument("--weight-decay", type=float, default=0.001, help="AdamW weight decay (matrices only)")
    return p


def load_examples(args, tokenizer, path, split, out_dir=None, device=None):
    """bt: [(data.Pair, margin)]; pairwise: [(judge ids with chosen as A, judge ids with chosen as B)]; the pairs
    of --train-data that pass the perplexity filter (minirlhf/perplexity.py, when asked for)."""
    rows = data.load_dataset_any(path, split)
    if args.kind == "regression":  # [(data.Sequence, labels (K,) with data.MISSING where unrated)]
        return [(seq, torch.tensor(labels)) for seq, labels in data.tokenize_ratings(
            rows, tokenizer, args.prompt_column, args.response_column, args.attributes, args.attribute_range,
            args.max_length, args.max_prompt_length, args.skip_bad_rows, str(path))]
    keep = perplexity.filter_rows(args, rows, path, out_dir, device) if path == args.train_data else None
    if args.kind == "bt":
        pairs, _ = data.tokenize_preferences(
            rows, tokenizer, args.prompt_column, args.chosen_column, args.rejected_column, args.max_length,
            args.max_prompt_length, skip_bad=args.skip_bad_rows, source=str(path), whole=True)  # as scored
        pairs = [pair for pair in pairs if keep is None or pair.row in keep]
        margins = [0.0] * len(pairs)
        if args.margin_column:  # pair.row: the source row of each pair that survived skipped bad rows
            if args.margin_column not in rows.column_names:
                raise data.DataError(f"{path}: no margin column {args.margin_column!r} (columns: {rows.column_names})")
            column = rows[args.margin_column]
            margins = []
            for pair in pairs:
                try:
                    margins.append(float(column[pair.row]))
                    if not math.isfinite(margins[-1]):
                        raise ValueError
                except (TypeError, ValueError):
                    raise data.DataError(f"{path}: row {pair.row}: field {args.margin_column!r}: expected a finite "
                                         f"number, got {column[pair.row]!r}") from None
        return list(zip(pairs, margins))
    # pairwise: the row formats of data.py (its row splitter and errors), then the judge template
    check_chat_template(tokenizer)  # a tokenizer problem, not a row problem: fail before row 0
    examples, skipped = [], Counter()
    for i, row in enumerate(rows):
        if keep is not None and i not in keep:
            continue
        try:
            prompt, (chosen, rejected) = data.split_row(row, args.prompt_column,
                                                        [args.chosen_column, args.rejected_column])
            if args.max_prompt_length and len(encode_prompt(tokenizer, prompt)) > args.max_prompt_length:
                raise data.BadRow("prompt_too_long", args.prompt_column, f"longer than {args.max_prompt_length} tokens")
            if chosen == rejected:
                raise data.BadRow("identical", args.rejected_column, f"identical to {args.chosen_column}")
            try:
                example = tuple(rewards.pairwise_prompt_ids(tokenizer, prompt, a, b, args.max_length)
                                for a, b in ((chosen, rejected), (rejected, chosen)))
            except ValueError as e:  # the judge prompt leaves no room for the responses in max_length
                raise data.BadRow("prompt_too_long", args.prompt_column, str(e))
        except data.BadRow as bad:
            if not args.skip_bad_rows:
                raise bad.error(path, i) from None
            skipped[bad.args[0]] += 1
            continue
        examples.append(example)
    data.report_skipped(path, skipped, len(rows), len(examples))
    return examples


def forward_pairs(model, examples, args, label_ids, pad_id, device, train):
    """One micro-batch of B pairs -> (losses (B,), correct (B,), margin (B,)).

    bt: margin = r_c - r_r. pairwise training (correct label only, one forward of 2B rows): correct = the correct
    label token has probability > 1/2 (so it beats the other), averaged over the two orders; margin = its log-odds.
    pairwise eval (both label tokens: 4B rows): correct = P(c > r) > 1/2, margin = log P(c > r) / P(r > c)."""
    B = len(examples)
    if args.kind == "regression":  # per row (B,): summed squared and absolute errors, ratings within 0.5
        batch = data.collate_sequences([seq for seq, _ in examples], pad_id)
        labels = torch.stack([y for _, y in examples]).to(device)  # (B, K)
        with dist.autocast(device):
            predictions = model(batch["input_ids"].to(device), batch["attention_mask"].to(device))  # (B, K) fp32
        mask, error = labels != data.MISSING, (predictions.detach() - labels).abs()
        correct = ((error < 0.5) & mask).sum(-1)
        return losses.regression_loss(predictions, labels, mask), correct, error.where(mask, 0).sum(-1)
    if args.kind == "bt":
        batch = data.collate_pairs([pair for pair, _ in examples], pad_id)
        with dist.autocast(device):
            scores = model(batch["input_ids"].to(device), batch["attention_mask"].to(device))  # (2B,) fp32
        chosen, rejected = scores[:B], scores[B:]
        margins = torch.tensor([m for _, m in examples], device=device) if args.margin_column else None
        return losses.bradley_terry_loss(chosen, rejected, margins), chosen > rejected, chosen - rejected
    if train:
        batch = data.collate_sequences([data.Sequence(ids, []) for ids in [e[0] for e in examples] +
                                        [e[1] for e in examples]], pad_id)  # rows [0:B] chosen is A, [B:2B] it is B
        labels = torch.tensor(label_ids, device=device).repeat_interleave(B)
        with dist.autocast(device):
            logps = rewards.label_logps(model, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                        labels)
        log_odds = torch.logit(logps.exp(), eps=1e-6)
        correct = (log_odds > 0).float().view(2, B).mean(0)
        return losses.pairwise_preference_loss(logps[:B], logps[B:]), correct, log_odds.view(2, B).mean(0)
    with dist.autocast(device):
        logps_ab, logps_ba = rewards.compare_batch(model, [e[0] for e in examples], [e[1] for e in examples],
                                                   label_ids, pad_id, device)
    prob = losses.preference_probability(logps_ab, logps_ba)
    loss = losses.pairwise_preference_loss(logps_ab[:, 0], logps_ba[:, 1])
    return loss, prob > 0.5, torch.logit(prob, eps=1e-6)


@torch.no_grad()
def evaluate(model, examples, args, label_ids, pad_id, device):
    """Held-out loss, accuracy and mean margin, sharded over ranks. Every rank runs as many forwards as the others
    (FSDP's collectives): a rank with nothing left repeats example 0 with weight 0."""
    model.eval()
    rank, world_size = dist.get_rank(), dist.world_size()
    bs = args.eval_batch_size or args.batch_size
    sums = torch.zeros(4, dtype=torch.float64)  # loss, correct, margin, pairs
    for s in range(0, len(examples), bs * world_size):
        chunk = examples[s + rank * bs:s + (rank + 1) * bs]
        weight = 1.0 if chunk else 0.0
        loss, correct, margin = forward_pairs(model, chunk or examples[:1], args, label_ids, pad_id, device, False)
        sums += weight * torch.tensor([loss.sum().item(), correct.float().sum().item(), margin.sum().item(),
                                       len(chunk)], dtype=torch.float64)
    dist.all_reduce_sum(sums)  # sync point
    model.train()
    n = sums[3].item()
    return {"accuracy": sums[1].item() / n, "loss": sums[0].item() / n, "margin": sums[2].item() / n, "pairs": int(n)}


@torch.no_grad()
def evaluate_regression(model, examples, args, pad_id, device):
    """Held-out loss, per-attribute MAE and R^2 (rated entries only), and the accuracy of r = w . a on every two
    responses to one prompt whose --pair-attribute ratings differ (the higher rated should score higher)."""
    model.eval()
    rank, world_size, bs = dist.get_rank(), dist.world_size(), args.eval_batch_size or args.batch_size
    labels = torch.stack([y for _, y in examples]).double()  # (N, K)
    predictions = torch.zeros_like(labels)
    for s in range(0, len(examples), bs * world_size):  # a rank with nothing left repeats row 0 (FSDP collectives)
        rows = list(range(s + rank * bs, min(s + (rank + 1) * bs, len(examples))))
        batch = data.collate_sequences([examples[i][0] for i in rows or [0]], pad_id)
        with dist.autocast(device):
            out = model(batch["input_ids"].to(device), batch["attention_mask"].to(device))  # (B, K)
        predictions[rows] = out.double().cpu()[:len(rows)]
    dist.all_reduce_sum(predictions)  # sync point: each row was filled by one rank
    model.train()
    mask = labels != data.MISSING
    result = {"loss": losses.regression_loss(predictions, labels, mask).sum().item() / max(1, mask.sum().item())}
    for k, name in enumerate(args.attributes):
        y, p = labels[mask[:, k], k], predictions[mask[:, k], k]
        variance = (y - y.mean()).square().sum().item() if len(y) else 0.0
        result[f"{name}_mae"] = (p - y).abs().mean().item() if len(y) else None
        result[f"{name}_r2"] = 1 - (p - y).square().sum().item() / variance if variance > 0 else None
    reward, a = predictions @ torch.tensor(args.attribute_weights).double(), args.attributes.index(args.pair_attribute)
    by_prompt = {}
    for i, (seq, _) in enumerate(examples):
        by_prompt.setdefault(tuple(seq.prompt_ids), []).append(i)
    right = [bool((reward[i] > reward[j]) == (labels[i, a] > labels[j, a])) for rows in by_prompt.values()
             for i, j in itertools.combinations(rows, 2) if mask[i, a] and mask[j, a] and labels[i, a] != labels[j, a]]
    return result | {"accuracy": sum(right) / len(right) if right else None, "pairs": len(right), "rows": len(examples)}


def pairwise_config(args):
    """What rewards.load_reward_source needs to ask a pairwise judge the same way (saved beside its weights)."""
    if args.kind != "pairwise":
        return None
    return {rewards.PAIRWISE_CONFIG: {"template": rewards.PAIRWISE_TEMPLATE, "max_length": args.max_length,
                                      "label_tokens": args.label_tokens.split(",")}}


def parse_attributes(args):
    """--attributes, --attribute-weights and --attribute-range as lists, checked against each other."""
    args.attributes = [a.strip() for a in args.attributes.split(",")]
    try:
        args.attribute_weights = [float(w) for w in args.attribute_weights.split(",")]
        args.attribute_range = [float(v) for v in args.attribute_range.split(",")]
    except ValueError as e:
        raise rundir.UserError(f"--attribute-weights / --attribute-range: comma-separated numbers ({e})") from None
    if len(args.attribute_weights) != len(args.attributes) or len(args.attribute_range) != 2 or \
            args.pair_attribute not in args.attributes or len(set(args.attributes)) != len(args.attributes):
        raise rundir.UserError(f"--attributes {args.attributes} (distinct) need one --attribute-weights each (got "
                               f"{args.attribute_weights}), --attribute-range two numbers (got {args.attribute_range}) "
                               f"and --pair-attribute {args.pair_attribute!r} one of them")


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.lr = DEFAULT_LR[args.kind] if args.lr is None else args.lr
    cli.resolve_common(args)
    if perplexity.check_arguments(args) and args.kind == "regression":
        raise rundir.UserError("the perplexity filter keeps preference pairs: not for --kind regression")
    if args.kind == "regression":
        parse_attributes(args)
    rank, world_size, device = dist.init_distributed()
    run = rundir.start(args.output_dir, vars(args), ["metrics.jsonl", "eval.json", "args.json", perplexity.FILE],
                       resume=args.resume,
                       overwrite=args.overwrite, allow_changed_args=args.allow_changed_args, ignore=NOT_RESULTS)
    try:
        return train(args, run, rank, world_size, device)
    finally:
        run.close()


def train(args, run, rank, world_size, device):
    out, ckpt = args.output_dir, os.path.join(args.output_dir, "checkpoint")

    # data: every rank tokenises everything (deterministic), then takes its share of each batch
    tokenizer = cli.load_tokenizer(args)
    pad_id = pad_token_id(tokenizer)
    label_ids = rewards.label_token_ids(tokenizer, args.label_tokens.split(",")) if args.kind == "pairwise" else None
    train = load_examples(args, tokenizer, args.train_data, args.train_split, run.staging, device)
    held_out = []
    if args.eval_data:
        held_out = load_examples(args, tokenizer, args.eval_data, args.eval_split)
    elif args.eval_fraction > 0:
        perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed)).tolist()
        n_eval = max(1, round(args.eval_fraction * len(train)))
        held_out, train = [train[i] for i in perm[:n_eval]], [train[i] for i in perm[n_eval:]]
    window = args.batch_size * args.grad_accum * world_size  # pairs per optimizer step, all ranks
    steps_per_epoch = math.ceil(len(train) / window)
    if steps_per_epoch == 0:
        raise rundir.UserError(f"{args.train_data}: no training pairs left after the held-out split")
    total_steps = args.epochs * steps_per_epoch if args.max_steps is None else args.max_steps
    warmup_steps = math.ceil(args.warmup_ratio * total_steps)
    dist.print0(f"{len(train)} training pairs, {len(held_out)} held out; {total_steps} steps of {window} pairs")
    cli.warn_few_steps(total_steps, args.batch_size, args.grad_accum, world_size, len(train))

    # model: sharded over ranks by FSDP2 (bf16 compute, fp32 master weights and reductions on GPU)
    full = run.resume and not args.lora_rank  # resuming LoRA: the base, then the checkpoint's adapter (and head)
    model = checkpoint.load_model(ckpt if full else args.model, kind="causal" if args.kind == "pairwise" else
                                  "reward", device="cpu" if world_size > 1 else device, seed=args.seed,
                                  num_labels=len(args.attributes) if args.kind == "regression" else None)
    if args.kind == "regression":  # saved in config.json: AutoModelForSequenceClassification's labels, our weights
        model.config.hf.update(id2label={str(i): a for i, a in enumerate(args.attributes)}, problem_type="regression",
                               attribute_weights=args.attribute_weights)
    model = lora.from_args(model, args, args.model, ckpt if run.resume and args.lora_rank else None)
    model.model.gradient_checkpointing = args.gradient_checkpointing
    model = dist.apply_fsdp(model, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": args.weight_decay},
                                   {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.999), eps=1e-8)
    step = 0
    if run.resume:
        step = checkpoint.load_training_state(model, optimizer, ckpt, device)["step"]
        dist.print0(f"resuming from {ckpt} at step {step}")
    run.start_metrics(step)
    saved, save_due = (step if run.resume else None), False

    # training loop: one optimizer step per window of batch_size x grad_accum x world_size pairs
    model.train()
    bar = cli.Progress(args.name or f"rm {args.kind}", total_steps, initial=step)
    fail_after = int(os.environ.get("MINIRLHF_FAIL_AFTER_STEP", -1))  # test hook, as in train_dpo.py
    while step < total_steps:
        epoch, w = divmod(step, steps_per_epoch)
        windows = data.epoch_windows(len(train), window, args.seed, epoch)
        for w in range(w, steps_per_epoch):
            lr = losses.lr_at(step, total_steps, warmup_steps, args.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            sums = torch.zeros(3, dtype=torch.float64)  # loss, correct, margin
            micro = data.micro_batches(windows[w], args.batch_size, rank, world_size)
            rng = checkpoint.rng_state() if save_due else None  # what --resume redraws this step's dropout from
            # pairs in this step over all ranks (the last step of an epoch may be short); regression: rated entries
            n = len(windows[w]) if args.kind != "regression" else \
                max(1, sum(int((train[j][1] != data.MISSING).sum()) for j in windows[w]))
            for i, indices in enumerate(micro):
                if world_size > 1:  # reduce-scatter gradients only after the last micro-batch of the window
                    model.set_requires_gradient_sync(i == len(micro) - 1)
                weight = 1.0 if indices else 0.0  # an empty slice runs a zero-weight forward (FSDP's collectives)
                pair_losses, correct, margin = forward_pairs(model, [train[j] for j in indices or windows[w][:1]],
                                                             args, label_ids, pad_id, device, True)
                losses.window_mean(pair_losses * weight, n, world_size).backward()
                sums += weight * torch.tensor([pair_losses.detach().sum().item(), correct.float().sum().item(),
                                               margin.detach().sum().item()], dtype=torch.float64)
            dist.all_reduce_sum(sums)  # sync point: window statistics over ranks
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm or float("inf"))
            grad_norm = (grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm).item()
            loss = sums[0].item() / n
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                raise FloatingPointError(rundir.nonfinite_message(step + 1, loss, grad_norm, ckpt, saved))
            if save_due:  # step `step`'s weights just gave a finite loss and gradient (rundir.nonfinite_message)
                checkpoint.save_training_state(model, optimizer, tokenizer, out, {"step": step,
                                               "world_size": world_size}, pairwise_config(args),
                                               keep=args.save_total_limit, rng=rng)
                saved, save_due = step, False
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            metrics = {"step": step, "epoch": step / steps_per_epoch, "loss": loss, "accuracy": sums[1].item() / n,
                       "mae" if args.kind == "regression" else "margin": sums[2].item() / n, "lr": lr,
                       "grad_norm": grad_norm}
            if args.eval_every and step % args.eval_every == 0 and step < total_steps and held_out:
                evaluation = (evaluate_regression(model, held_out, args, pad_id, device) if args.kind == "regression"
                              else evaluate(model, held_out, args, label_ids, pad_id, device))
                metrics |= {f"eval_{k}": v for k, v in evaluation.items()}
            run.log(metrics)
            bar.update(1, loss=f"{loss:.4f}", acc=f"{metrics['accuracy']:.2f}")
            save_due = bool(args.save_steps) and step % args.save_steps == 0 and step < total_steps
            if step == fail_after:
                raise RuntimeError(f"MINIRLHF_FAIL_AFTER_STEP={fail_after}: simulated kill")
            if step >= total_steps:
                break
    bar.close()

    # evaluation and save
    result = {"accuracy": None, "loss": None, "margin": None, "pairs": 0}
    if held_out:
        result = (evaluate_regression(model, held_out, args, pad_id, device) if args.kind == "regression"
                  else evaluate(model, held_out, args, label_ids, pad_id, device))
    result |= {"step": step, "kind": args.kind, "output_dir": os.path.abspath(out)}
    dist.print0(f"eval: {json.dumps(result)}")
    checkpoint.save_training_state(model, optimizer, tokenizer, out, {"step": step, "world_size": world_size},
                                   pairwise_config(args), dtype=cli.save_dtype(args), keep=args.save_total_limit,
                                   merge=args.merge_lora)
    run.publish(ckpt, {"eval.json": result}, keep_checkpoint=args.keep_optimizer)  # then done.json
    dist.barrier()
    return result


if __name__ == "__main__":
    with rundir.user_errors():
        main()
    dist.cleanup()
