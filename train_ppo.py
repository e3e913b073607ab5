r"""PPO with a value model, and DR-PO's dataset reset (Chang et al. 2024, "Dataset Reset Policy Optimization for
RLHF"): one batch of rollouts and --ppo-epochs of updates on it. iterate.py --algorithm ppo runs T of these on fresh
prompts (--iteration t --iterations T: the seeds differ per iteration and the learning rate decays linearly over all
T); the equations are in minirlhf/ppo.py.

    python train_ppo.py --model SFT --reward RM --prompts prompts.jsonl --output-dir out/ppo
    python train_ppo.py --model SFT --reward RM --prompts prompts.jsonl --reset-prob 1 --output-dir out/drpo
    torchrun --nproc_per_node=8 train_ppo.py --model SFT --reward RM --prompts prompts.jsonl --output-dir out/ppo

1. Rollouts: n responses per prompt from --model (pi_old). With --reset-prob beta, an episode starts with
   probability beta from a prefix of its row's reference response (--reference-column: a string, or a
   conversation whose last assistant message is the reference): the sampler forces those tokens, counted inside
   --max-new-tokens, and samples the rest. --reward scores the whole response (a BT model folder, a pairwise
   model folder: win rates among a prompt's n >= 2 responses, or module:function, which imports and runs that
   code); one without a stop token loses --truncation-penalty.
2. pi_ref (--ref-model), pi_old and the value model V_old on every episode: per-token rewards, GAE advantages and
   returns. The value model is the reward-model layout read at every position, started from --value-model
   (default: --reward when it is a Bradley-Terry model folder, as DR-PO does, else --model).
3. --ppo-epochs passes over the episodes in minibatches of batch_size x grad_accum x world_size episodes, one
   AdamW step each for the policy and for the value model. Log-probs are those of softmax(logits / temperature).

Defaults: DR-PO's Table 5 for TL;DR (one response per prompt, 512 episodes per minibatch, lr 3e-6, 4 epochs, KL
0.05, clip 0.2, value clip 0.2, vf_coef 0.1, gamma 1, lambda 0.95, both whitenings on). Unlike DR-PO: a fresh AdamW
per rollout batch (DR-PO keeps one for the run), full fine-tuning, and the truncation penalty is subtracted from
the score (DR-PO's score is -1).

OUTPUT is the policy (a Hugging Face folder) with value_model/, samples.jsonl (with each response's number of
forced tokens), metrics.jsonl (per step), eval.json (mean score, KL, resets, the next KL coefficient) and
done.json, published together at the end (minirlhf/rundir.py). --resume continues after the last finished
epoch: the rollouts are drawn again from the same seeds, the policy from OUTPUT/checkpoint, the value model from
its own checkpoint in OUTPUT/staging/. Under torchrun every rank samples its share and holds all episodes; the
forwards are sharded (FSDP2). Test hook: MINIRLHF_FAIL_AFTER_STEP=k raises after step k (a simulated kill).
"""
import argparse
import math
import os
import shutil
import time

import torch

from minirlhf import checkpoint, cli, dist, ppo, rundir
from minirlhf.data import Sequence, check_prompts, collate_sequences, load_prompts, write_jsonl
from minirlhf.logprobs import IGNORE_INDEX, shift_labels
from minirlhf.losses import lr_at, window_mean
from minirlhf.rewards import reward_kind, score_rows
from minirlhf.sampler import gather_rows, sample_responses
from minirlhf.tokenizer import encode_pair, load_tokenizer, pad_token_id


def probability(text):
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not a probability")
    return value


def add_ppo_arguments(p):
    """The PPO / DR-PO flags, shared with iterate.py --algorithm ppo, which passes them on (`cli.passed_flags`)."""
    g = p.add_argument_group("PPO and DR-PO (train_ppo.py, minirlhf/ppo.py)")
    g.add_argument("--reset-prob", type=probability, default=0.0, help="DR-PO's beta: probability that an episode "
                   "starts from a prefix of its prompt's reference response (0: plain PPO; DR-PO: 1)")
    g.add_argument("--reference-column", default="completion", help="column of the prompts with the reference "
                   "responses (a string, or a conversation whose last assistant message is the reference)")
    g.add_argument("--ppo-epochs", type=rundir.positive_int, default=4, help="epochs over each batch of rollouts")
    g.add_argument("--kl-target", type=float, help="adaptive KL controller's target (default: a fixed --kl-coef)")
    for flag, default, what in (("kl-coef", 0.05, "per-token KL penalty (the first, with --kl-target)"),
                                ("kl-horizon", 10000, "adaptive KL controller's horizon"), ("gamma", 1.0,
                                "discount"), ("lam", 0.95, "GAE lambda"), ("cliprange", 0.2, "ratio clip"),
                                ("cliprange-value", 0.2, "value clip"), ("vf-coef", 0.1, "value loss weight")):
        g.add_argument(f"--{flag}", type=float, default=default, help=what)
    for what in ("rewards", "advantages"):  # DR-PO: both on
        g.add_argument(f"--whiten-{what}", action=argparse.BooleanOptionalAction, default=True, help=f"whiten {what}")
    return p


def build_parser():
    p = cli.parser(__doc__)
    p.add_argument("--model", required=True, help="the policy to train (HF folder); the rollouts' pi_old")
    p.add_argument("--ref-model", help="pi_ref of the KL penalty (default: --model)")
    p.add_argument("--reward", required=True, help="reward source: a BT reward model folder, a pairwise preference "
                   "model folder, or module:function (imports and runs that code)")
    p.add_argument("--value-model", help="the value model's start (default: --reward if a BT folder, else --model)")
    p.add_argument("--prompts", required=True, help="dataset (.jsonl/.json/.parquet/save_to_disk folder) of prompts")
    p.add_argument("--prompt-column", default="prompt", help="column of --prompts holding a string or chat messages")
    p.add_argument("--output-dir", required=True, help="output folder: the policy (HF layout), value_model/, logs")
    p.add_argument("--samples-per-prompt", type=rundir.positive_int, default=1, help="n, episodes per prompt")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0: greedy)")
    p.add_argument("--max-new-tokens", type=rundir.positive_int, default=256, help="response length limit")
    p.add_argument("--gen-batch-size", type=rundir.positive_int, default=256, help="sequences per sampler batch")
    p.add_argument("--truncation-penalty", type=float, default=0.0, help="subtracted from the score of a response "
                                                                          "without a stop token")
    p.add_argument("--lr", type=float, default=3e-6, help="peak learning rate of the policy and the value model")
    p.add_argument("--batch-size", type=rundir.positive_int, default=8, help="episodes per micro-batch per rank")
    p.add_argument("--grad-accum", type=rundir.positive_int, default=64, help="micro-batches per optimizer step")
    p.add_argument("--adam-eps", type=float, default=1e-5, help="AdamW epsilon (DR-PO's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler, the resets and the minibatch order")
    p.add_argument("--iteration", type=rundir.positive_int, default=1, help="t: this is rollout batch t of T")
    p.add_argument("--iterations", type=rundir.positive_int, default=1, help="T: the lr decays linearly over all T")
    p.add_argument("--name", default="ppo", help="label of the progress lines")
    return add_ppo_arguments(cli.add_run_arguments(p))


def micro_batch(batch, labels, rows, device):
    """Rows of the right-padded batch, cut after their longest sequence -> input_ids, attention_mask, labels."""
    T = int(batch["attention_mask"][rows].sum(1).max())
    return tuple(x[rows, :T].to(device) for x in (batch["input_ids"], batch["attention_mask"], labels))


def forward_all(model, batch, labels, rows_per_forward, device, temperature=None):
    """(N, T) fp32 for every episode: log-probs of `labels` at `temperature`, or (None) the value head at every
    position; micro-batches sharded over ranks (each rank runs as many forwards: FSDP), summed over ranks."""
    out, N, rank, world = torch.zeros(labels.shape, device=device), len(labels), dist.get_rank(), dist.world_size()
    for s in range(0, N, rows_per_forward * world):
        rows = list(range(N))[s + rank * rows_per_forward:s + (rank + 1) * rows_per_forward]
        x, a, y = micro_batch(batch, labels, rows or [0], device)
        with torch.no_grad(), dist.autocast(device):
            r = model(x, a, per_token=True) if temperature is None else model(x, a, labels=y, temperature=temperature)
        out[rows, :r.shape[1]] = r.float()
    if hasattr(model, "reshard"):  # FSDP2 keeps a root's own weights gathered after a forward without backward:
        model.reshard()  # sharded again, or an optimizer built now would hold (and update) the gathered copies
    return dist.all_reduce_sum(out).cpu()


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.ref_model, args.top_p = args.ref_model or args.model, 1.0  # PPO's log-probs: the whole distribution
    if args.iteration > args.iterations:
        raise rundir.UserError(f"--iteration {args.iteration} is past --iterations {args.iterations}")
    if reward_kind(args.reward) == "pairwise" and args.samples_per_prompt < 2:
        raise rundir.UserError(f"--reward {args.reward} is a pairwise preference model: it scores a response by its "
                               "win rate against the prompt's other responses, so it needs --samples-per-prompt >= 2")
    _, _, device = dist.init_distributed()
    names = ["samples.jsonl", "metrics.jsonl", "eval.json", "args.json", "value_model"]  # what this script writes
    run = rundir.start(args.output_dir, vars(args), names, resume=args.resume, overwrite=args.overwrite,
                       allow_changed_args=args.allow_changed_args, ignore=("resume", "allow_changed_args",
                                                                           "overwrite", "name"))
    try:
        return train(args, run, device)
    finally:
        run.close()


def train(args, run, device):
    t0, rank, world, n, t = time.time(), dist.get_rank(), dist.world_size(), args.samples_per_prompt, args.iteration
    tokenizer = load_tokenizer(args.model)
    # 1. rollouts: each episode reset to a prefix of its prompt's reference w.p. reset_prob, sampled, scored
    reset = args.reset_prob > 0
    prompts, references = (load_prompts(args.prompts, args.prompt_column, args.reference_column) if reset
                           else (load_prompts(args.prompts, args.prompt_column), None))
    check_prompts(prompts, tokenizer, None, args.prompts, args.prompt_column)
    ref_ids = [encode_pair(tokenizer, p, r)[1] if reset else [] for p, r in zip(prompts, references or prompts)]
    h = ppo.reset_lengths([len(ids) for ids in ref_ids for _ in range(n)], args.reset_prob,
                          torch.Generator().manual_seed(args.seed * 1000 + 700 + t))
    forced = [[ids[:k] for k in h[i * n:(i + 1) * n]] for i, ids in enumerate(ref_ids)]
    rows = sample_responses(args.model, tokenizer, prompts, n, args, args.seed + t, device, args.name,
                            forced if reset else None)
    score_rows(rows, args.reward, 0, device, args.name)
    rows = gather_rows(rows)
    for r in rows:
        r["forced_tokens"] = [min(len(f), len(y)) for f, y in zip(forced[r["index"]], r["response_ids"])]
    episodes = [(r["prompt_ids"], y, k, s - args.truncation_penalty * cut) for r in rows for y, k, s, cut in
                zip(r["response_ids"], r["forced_tokens"], r["rewards"], r["truncated"])]
    batch = collate_sequences([Sequence(p, y) for p, y, _, _ in episodes], pad_token_id(tokenizer))
    labels = shift_labels(batch["input_ids"], batch["loss_mask"])  # position t predicts token t + 1
    mask = labels != IGNORE_INDEX  # (N, T): the states s_t of response tokens, the first at len(prompt) - 1
    first_sampled = torch.tensor([len(p) - 1 + k for p, _, k, _ in episodes])[:, None]
    pg_mask = mask & (torch.arange(mask.shape[1]) >= first_sampled)  # forced tokens: no policy gradient
    scores = torch.tensor([s for _, _, _, s in episodes])

    # 2. pi_ref, pi_old and V_old on every episode -> rewards, advantages, returns (the same on every rank)
    def load(path, kind="causal"):
        model = checkpoint.load_model(path, kind, device="cpu" if world > 1 else device)
        return dist.apply_fsdp(model, device)
    bs, temperature = args.batch_size, args.temperature or 1.0
    ref_logps = forward_all(load(args.ref_model).eval(), batch, labels, bs, device, temperature)
    value_dir = args.value_model or (args.reward if reward_kind(args.reward) == "bt" else args.model)
    policy, value = load(args.model).eval(), load(value_dir, "reward").eval()
    old_logps, old_values = (forward_all(policy, batch, labels, bs, device, temperature),
                             forward_all(value, batch, labels, bs, device))
    rewards, kl = ppo.token_rewards(old_logps, ref_logps, scores, mask, args.kl_coef)
    rewards = ppo.whiten(rewards, mask, shift_mean=False) if args.whiten_rewards else rewards
    advantages, returns = ppo.gae(rewards, old_values, mask, args.gamma, args.lam)
    advantages = ppo.whiten(advantages, mask) if args.whiten_advantages else advantages

    # 3. --ppo-epochs passes in minibatches, a fresh AdamW each; --resume: after the last finished
    # epoch, the policy from OUTPUT/checkpoint and the value model from staging/value-epochE (saved first)
    ckpt, epoch = os.path.join(args.output_dir, "checkpoint"), 0
    value_ckpt = lambda e: os.path.join(run.staging, f"value-epoch{e}")  # noqa: E731
    if run.resume:
        epoch = rundir.read_json(os.path.join(ckpt, "trainer_state.json"))["epoch"]
        policy, value = load(ckpt), load(f"{value_ckpt(epoch)}/checkpoint", "reward")
    optimizers = [torch.optim.AdamW(m.parameters(), lr=args.lr, eps=args.adam_eps) for m in (policy, value)]
    if run.resume:
        for model, opt, path in zip((policy, value), optimizers, (ckpt, f"{value_ckpt(epoch)}/checkpoint")):
            checkpoint.load_training_state(model, opt, path, device)
        dist.print0(f"{args.name}: resuming after epoch {epoch}")
    N, window = len(labels), bs * args.grad_accum * world
    steps_per_epoch = math.ceil(N / window)
    step0 = (t - 1) * args.ppo_epochs * steps_per_epoch  # the learning rate decays linearly over all T iterations
    step, fail_after = step0 + epoch * steps_per_epoch, int(os.environ.get("MINIRLHF_FAIL_AFTER_STEP", -1))
    run.start_metrics(step - step0)  # metrics.jsonl counts this run's steps
    bar = cli.Progress(args.name, (args.ppo_epochs - epoch) * steps_per_epoch)
    policy.train(), value.train()
    for epoch in range(epoch, args.ppo_epochs):
        totals = torch.zeros(4, dtype=torch.float64, device=device)  # the epoch's loss sums and token counts
        order = torch.randperm(N, generator=torch.Generator().manual_seed(args.seed * 1000 + 10 * t + epoch)).tolist()
        for w in range(steps_per_epoch):
            win = order[w * window:(w + 1) * window]
            n_pg, n_tokens = max(1, int(pg_mask[win].sum())), int(mask[win].sum())
            lr = lr_at(step, args.iterations * args.ppo_epochs * steps_per_epoch, 0, args.lr, "linear")
            for opt in optimizers:
                opt.param_groups[0]["lr"] = lr
            sums = torch.zeros(4, dtype=torch.float64, device=device)
            for s in range(0, len(win), bs * world):
                mine = win[s + rank * bs:s + (rank + 1) * bs]  # empty in a short window: a zero-weight forward
                x, a, y = micro_batch(batch, labels, mine or win[:1], device)
                cut = lambda v: v[mine or win[:1], :x.shape[1]].to(device)  # noqa: E731
                with dist.autocast(device):
                    logps, values = policy(x, a, labels=y, temperature=temperature), value(x, a, per_token=True)
                pg, vf = ppo.ppo_losses(logps.float(), cut(old_logps), cut(advantages), values.float(),
                                        cut(old_values), cut(returns), cut(mask), cut(pg_mask), args.cliprange,
                                        args.cliprange_value)
                loss = window_mean(pg, n_pg, world) + args.vf_coef * window_mean(vf, n_tokens, world)
                (loss * bool(mine)).backward()
                sums += bool(mine) * torch.stack([pg.detach().sum(), vf.detach().sum(), cut(pg_mask).sum(),
                                                  cut(mask).sum()])
            for model, opt in zip((policy, value), optimizers):
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
            step += 1
            totals += dist.all_reduce_sum(sums)
            run.log(dict(step=step - step0, epoch=epoch + (w + 1) / steps_per_epoch, lr=lr,
                         pg_loss=sums[0].item() / max(1, sums[2].item()), vf_loss=sums[1].item() / sums[3].item()))
            bar.update(1)
            if step - step0 == fail_after:
                raise RuntimeError(f"MINIRLHF_FAIL_AFTER_STEP={fail_after}: simulated kill")
        if epoch + 1 < args.ppo_epochs:  # what --resume continues from: the value model first, then the policy
            state = {"step": step - step0, "epoch": epoch + 1, "world_size": world}
            checkpoint.save_training_state(value, optimizers[1], tokenizer, value_ckpt(epoch + 1), state)
            checkpoint.save_training_state(policy, optimizers[0], tokenizer, args.output_dir, state)
            if dist.is_main():
                shutil.rmtree(value_ckpt(epoch), ignore_errors=True)
    bar.close()

    # 4. metrics (KL: the mean over episodes of sum_t log pi_old - log pi_ref, an estimate of KL(pi_old || pi_ref);
    # losses: the last epoch's means),
    # the value model into staging/, the policy through OUTPUT/checkpoint, then all of it published at once
    seq_kl, totals = kl.sum(1).mean().item(), totals.tolist()
    summary = dict(episodes=N, kl_coef=args.kl_coef, mean_score=scores.mean().item(), mean_kl=seq_kl,
                   next_kl_coef=ppo.next_kl_coef(args.kl_coef, seq_kl, args.kl_target, args.kl_horizon, N),
                   resets=sum(k > 0 for k in h) / len(h), truncated=sum(x for r in rows for x in r["truncated"]) / N,
                   pg_loss=totals[0] / max(1, totals[2]), vf_loss=totals[1] / totals[3], seconds=time.time() - t0)
    dist.print0(f"{args.name}: mean score {summary['mean_score']:.3f}, KL {seq_kl:.3f}, {summary['resets']:.0%} of "
                "episodes reset")
    full = dist.full_state_dict(value)  # a collective
    if dist.is_main():
        checkpoint.save_model(value, os.path.join(run.staging, "value_model"), tokenizer, state_dict=full)
        shutil.rmtree(value_ckpt(args.ppo_epochs - 1), ignore_errors=True)
        write_jsonl(os.path.join(run.staging, "samples.jsonl"), rows)
    checkpoint.save_training_state(policy, optimizers[0], tokenizer, args.output_dir, {
        "step": step - step0, "epoch": args.ppo_epochs, "world_size": world}, dtype=cli.save_dtype(args))
    run.publish(ckpt, {"eval.json": summary}, keep_checkpoint=False)
    dist.barrier()
    return summary


if __name__ == "__main__":
    with rundir.user_errors():
        main()
    dist.cleanup()
