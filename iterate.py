r"""Online iterative DPO (Dong et al. 2024, "RLHF Workflow", Algorithm 1; RLHFlow/Online-RLHF).

For t = 1..T: take fresh prompts, sample n responses each from the current policy, score them with the reward
source (a proxy for human feedback), keep the best and the worst as a (chosen, rejected) pair, and train DPO on
those pairs starting from the current policy, against the reference pi_0 (`--ref initial`, the KL-regularised
objective of the paper) or the last policy (`--ref previous`). Every stage reads and writes Hugging Face
folders and `datasets` files, so each step is the same code a user runs on its own:

    python iterate.py                                          # the built-in task, on a laptop CPU
    torchrun --nproc_per_node=8 iterate.py --sft-model SFT --reward RM --prompts prompts.jsonl \
        --output-dir runs/online --max-new-tokens 1024 --max-length 2048 --batch-size 1 --grad-accum 16

Online labels (`--oracle`, `--labels-per-iteration K`; minirlhf/oracle.py): the preference oracle itself is
queried on the current policy's samples, as Algorithm 1 and Xiong et al. 2024 define online RLHF. Each
iteration K prompts get one pair labelled (`--label-pair`), the Bradley-Terry reward model is refit on all labels
so far and ranks the samples, and the oracle's answers order the pairs they label. K = 0: the paper's fixed proxy.
`--algorithm ppo` replaces each iteration's pairs and DPO by PPO on the scores (train_ppo.py; DR-PO: --reset-prob).

With no `--sft-model`, the built-in task (`minirlhf/task.py`) first makes what the outside world would: SFT on
demonstrations, a label budget of SFT pairs labelled by simulated annotators, the initial reward model (on the
labels not kept for the loop), and offline DPO on the whole budget; every policy is then scored by the gold reward.

Distributed: each rank samples its share of the prompts from a plain, unsharded copy of the last saved policy
(FSDP would all-gather every layer at every step); DPO trains under FSDP2. Every finished stage leaves a
`done.json`: a rerun skips it (and never asks the oracle again for an iteration whose labels.jsonl exists), and
`--resume` also continues an interrupted DPO or PPO stage. Unlike the paper: our KV-cache sampler instead of vLLM,
FSDP2 instead of DeepSpeed; the built-in task scales the recipe down to a 126k-parameter model, adds RPO's NLL term
and spends its label budget online (README); --help's table has both. Results depend on the world size.
"""
import os
import time

import torch

import train_dpo
import train_ppo
import train_rm
from minirlhf import cli, dist, rundir, task
from minirlhf.checkpoint import atomic_write_json, read_json, save_model
from minirlhf.data import check_prompts, load_dataset_any, load_prompts, write_jsonl
from minirlhf.evaluate import evaluate_iterations
from minirlhf.losses import PREFERENCE_LOSSES
from minirlhf.model import init_model
from minirlhf.oracle import LABEL_PAIRS, ask_oracle, load_oracle
from minirlhf.pairs import choose_pairs, training_pairs
from minirlhf.rewards import load_reward_source, score_rows as score
from minirlhf.rundir import UserError
from minirlhf.sampler import gather_rows, sample_responses as sample
from minirlhf.tokenizer import load_tokenizer

# The paper's recipe for real models (Sec. 5): 3 iterations, 8 samples, 2 epochs, beta 0.1, lr 5e-7 cosine with
# 3% warmup. The built-in task keeps the structure and scales what a 126k-parameter model needs.
PAPER = dict(lr=5e-7, max_new_tokens=2048, max_length=4096, batch_size=1, grad_accum=32, prompts_per_iteration=None,
             nll_coef=0.0, labels_per_iteration=0, rm_lr=2e-6, samples_per_prompt=8, epochs=2, label_pair="max_min")
# The built-in task adds RPO's NLL term on the chosen response (Pang et al. 2024; the Llama 3.1 report): without
# it, DPO on best-vs-worst pairs of a tiny model lowers both responses' likelihood and drifts far from pi_0.
BUILTIN = dict(lr=2e-4, max_new_tokens=task.MAX_RESPONSE_TOKENS, max_length=64, batch_size=32, grad_accum=1,
               nll_coef=1.0, labels_per_iteration=600, oracle="builtin", rm_lr=1e-3)
# It spends its label budget online (README, the controlled study): each iteration 600 of its 700 prompts get
# their on-policy pair of 2 samples labelled, DPO 6 epochs. With --labels-per-iteration 0, the paper's loop: a
# fixed proxy ranks 8 samples of 2000 prompts per iteration, best vs worst, DPO 2 epochs.
BUILTIN_ONLINE = dict(samples_per_prompt=2, prompts_per_iteration=700, epochs=6, label_pair="random")
BUILTIN_PROXY = dict(samples_per_prompt=8, prompts_per_iteration=2000, epochs=2, label_pair="max_min")
# --algorithm ppo (train_ppo.py): DR-PO's Table 5 (one response per prompt, 512 episodes per minibatch, lr 3e-6);
# the built-in task optimises the proxy of K = 0 with 2000 fresh prompts per iteration (README)
PPO_PAPER = dict(lr=3e-6, samples_per_prompt=1, batch_size=8, grad_accum=64, labels_per_iteration=0)
PPO_BUILTIN = dict(lr=3e-4, samples_per_prompt=1, prompts_per_iteration=2000, ppo_batch_size=250,
                   labels_per_iteration=0)  # SFT, reward model and offline DPO: those of the K = 0 DPO run
# The built-in task's offline stages: SFT, the reward model and the offline DPO baseline.
SFT_LR, SFT_EPOCHS, RM_LR, RM_EPOCHS, OFFLINE_DPO_EPOCHS = 3e-3, 6, 3e-3, 6, 6


def build_parser():
    p = cli.parser(__doc__, cli.defaults_table({
        "built-in (online labels)": {**BUILTIN, **BUILTIN_ONLINE},
        "built-in, --labels-per-iteration 0": {**BUILTIN, **BUILTIN_PROXY, "labels_per_iteration": 0},
        "--sft-model (the paper)": {**PAPER, "prompts_per_iteration": "all / T"},
        "ppo, built-in": {**BUILTIN, **PPO_BUILTIN},
        "ppo --sft-model": {**PAPER, **PPO_PAPER, "prompts_per_iteration": "all / T"}}))
    # where
    p.add_argument("--output-dir", default="runs/iterate", help="run folder: one subfolder per stage and iteration")
    p.add_argument("--seed", type=int, default=0, help="seed of every sampler, shuffle and simulated label")
    p.add_argument("--resume", action="store_true", help="continue an interrupted DPO stage from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="run into a folder holding files this program did not "
                                                            "write (same-named ones are replaced)")
    # what the outside world provides (default: the built-in task makes all of it)
    p.add_argument("--sft-model", help="HF folder of the SFT policy pi_0 (default: SFT on the built-in task)")
    p.add_argument("--reward", help="reward source: a BT reward model folder, a pairwise preference model folder, "
                                    "or module:function (imports and runs that Python code, found on sys.path or in "
                                    "the working directory; default: the built-in task's proxy reward model)")
    p.add_argument("--prompts", help="dataset (.jsonl/.json/.parquet/save_to_disk folder) with a prompt column "
                                     "(default: the built-in task's)")
    p.add_argument("--prompt-column", default="prompt", help="column of --prompts holding a string or chat messages")
    p.add_argument("--eval-prompts", help="held-out prompts evaluated after the loop (default: none; built-in: 500)")
    # the loop
    p.add_argument("--iterations", type=rundir.positive_int, default=3, help="T, the number of online iterations")
    p.add_argument("--prompts-per-iteration", type=int, help="fresh prompts per iteration (default: all / T)")
    p.add_argument("--samples-per-prompt", type=rundir.positive_int,
                   help="n, responses sampled per prompt (paper 8; built-in 2, or 8 with K = 0)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (1 = off)")
    p.add_argument("--max-new-tokens", type=int, help="response length limit (paper: 2048)")
    p.add_argument("--gen-batch-size", type=rundir.positive_int, default=256,
                   help="sequences per sampler batch (memory budget)")
    p.add_argument("--pair-rule", default="max_min", choices=["max_min", "max_random", "max_min_p"],
                   help="best vs worst (paper), best vs random, or best vs worst after the length penalty")
    p.add_argument("--min-gap", type=float, default=0.0, help="no pair unless chosen beats rejected by more than this")
    p.add_argument("--length-penalty", type=float, default=0.0, help="lambda in r - lambda * response tokens")
    p.add_argument("--truncation-penalty", type=float, default=0.0, help="subtracted from responses without a stop")
    p.add_argument("--ref", default="initial", choices=["initial", "previous"],
                   help="DPO reference: the SFT model pi_0 (paper) or the previous iteration's policy")
    # online labels: the preference oracle queried on the current policy's samples (minirlhf/oracle.py)
    p.add_argument("--oracle", help="'builtin' (the task's annotators) or module:function f(prompts, responses_a, "
                                    "responses_b) -> P(a > b) (imports and runs that code)")
    p.add_argument("--labels-per-iteration", type=int, help="K pairs labelled by the oracle per iteration, the "
                   "reward model refit on all labels (0: fixed proxy; built-in: 600)")
    p.add_argument("--label-pair", choices=list(LABEL_PAIRS), help="the pair shown: the reward model's best vs worst "
                                                                   "(default), best vs random, two samples (built-in)")
    p.add_argument("--labels-train", default="both", choices=["both", "reward_model"],
                   help="labels train the reward model and order their own DPO pair, or the reward model only")
    p.add_argument("--labels", help="preference file the --reward model was trained on; refits include it "
                                    "(default: none)")
    p.add_argument("--rm-lr", type=float, help="learning rate of each reward-model refit (paper: 2e-6)")
    p.add_argument("--rm-epochs", type=int, default=2, help="epochs of each reward-model refit (warm-started)")
    # DPO on each iteration's pairs (train_dpo.py)
    p.add_argument("--loss", default="dpo", choices=list(PREFERENCE_LOSSES), help="preference loss of losses.py")
    p.add_argument("--beta", type=float, default=0.1, help="DPO beta (KL strength)")
    p.add_argument("--label-smoothing", type=float, default=0.0, help="conservative DPO: assumed label-flip rate")
    p.add_argument("--nll-coef", type=float, help="RPO: weight of the chosen response's NLL (paper: 0; built-in: 1)")
    p.add_argument("--lr", type=float, help="DPO learning rate (paper: 5e-7; built-in: 2e-4)")
    p.add_argument("--epochs", type=int, help="DPO epochs per iteration (paper: 2; built-in: 6 online, 2 with K = 0)")
    p.add_argument("--batch-size", type=rundir.positive_int, help="pairs per micro-batch per rank")
    p.add_argument("--grad-accum", type=rundir.positive_int, help="micro-batches per optimizer step")
    p.add_argument("--max-length", type=int, help="prompt + response token limit for DPO")
    p.add_argument("--save-steps", type=int, default=500, help="DPO checkpoint interval (for --resume)")
    p.add_argument("--save-dtype", default="input", choices=list(cli.SAVE_DTYPES), help="dtype of saved weights")
    p.add_argument("--keep-optimizer", action="store_true", help="keep each finished stage's optimizer state")
    # sizes of the built-in task (used only without --sft-model)
    p.add_argument("--task-sft-prompts", type=int, default=2000, help="demonstrations for SFT")
    p.add_argument("--task-labels", type=int, default=2000, help="prompts labelled by simulated humans (offline set)")
    p.add_argument("--task-eval-prompts", type=int, default=500, help="held-out prompts for the final evaluation")
    p.add_argument("--report-to", default="none", choices=["none", "tensorboard", "wandb"], help="also send "
                   "metrics.jsonl's scalars and the arguments to TensorBoard or wandb (minirlhf/tracking.py)")
    p.add_argument("--algorithm", default="dpo", choices=["dpo", "ppo"], help="iterative DPO on best-vs-worst pairs, "
                   "or PPO with a value model on the scores (train_ppo.py; with --reset-prob, DR-PO)")
    p.add_argument("--ppo-batch-size", type=int, help="PPO: episodes per micro-batch per rank (default --batch-size)")
    return train_ppo.add_ppo_arguments(cli.add_lora_arguments(p))  # LoRA: every stage, merged for the next


def resolve_defaults(args):
    """Fill unset flags from the paper's recipe, or from the built-in task's scaled version of it; refuse
    combinations that would fail only after hours of earlier stages."""
    online = args.labels_per_iteration is None or args.labels_per_iteration > 0
    defaults = PAPER if args.sft_model else {**BUILTIN, **(BUILTIN_ONLINE if online else BUILTIN_PROXY)}
    defaults = {**defaults, **((PPO_PAPER if args.sft_model else PPO_BUILTIN) if args.algorithm == "ppo" else {})}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.sft_model is not None and not (args.prompts and args.reward):
        raise SystemExit("--sft-model needs --prompts and --reward (without all three, the built-in task runs)")
    if args.sft_model is None and (args.prompts or args.reward or args.eval_prompts):
        raise SystemExit("--prompts, --reward and --eval-prompts need --sft-model (the built-in task makes its own)")
    if args.algorithm == "ppo" and (args.labels_per_iteration or args.top_p < 1 or args.lora_rank):
        raise SystemExit("--algorithm ppo trains on a fixed reward source (--labels-per-iteration 0), samples from "
                         "the whole distribution (--top-p 1) and fine-tunes all weights (no --lora-rank)")
    if args.pair_rule == "max_min_p" and args.length_penalty <= 0:
        raise SystemExit("--pair-rule max_min_p needs --length-penalty > 0")
    if args.labels_per_iteration < 0 or (args.labels_per_iteration > 0 and args.oracle is None):
        raise SystemExit("--labels-per-iteration K > 0 needs --oracle (K = 0: the paper's fixed proxy reward)")
    if args.labels and not args.sft_model:
        raise SystemExit("--labels needs --sft-model (the built-in task makes its own labels)")
    if args.sft_model is None and args.iterations * args.labels_per_iteration >= args.task_labels:
        raise SystemExit(f"{args.iterations} iterations x --labels-per-iteration {args.labels_per_iteration} leave "
                         f"no labels of the --task-labels {args.task_labels} budget for the initial reward model")
    return args


def common_flags(args, name):
    """Flags iterate.py passes to both trainers (minirlhf/cli.py)."""
    return ["--name", name, "--batch-size", str(args.batch_size), "--grad-accum", str(args.grad_accum), "--max-length",
            str(args.max_length), "--seed", str(args.seed), "--save-steps", str(args.save_steps), "--eval-fraction",
            "0", "--save-dtype", args.save_dtype, "--report-to", args.report_to] + ["--resume"] * args.resume + [
                "--keep-optimizer"] * args.keep_optimizer + cli.lora_flags(args) + ["--merge-lora"] * bool(args.lora_rank)


def dpo_flags(args, name, model, ref_model, data, out, loss=None, epochs=None, lr=None):
    """train_dpo.py's command line for one DPO stage."""
    return common_flags(args, name) + [
        "--model", model, "--ref-model", ref_model, "--train-data", data, "--output-dir", out, "--loss",
        loss or args.loss, "--beta", str(args.beta), "--label-smoothing", str(args.label_smoothing), "--nll-coef",
        str(args.nll_coef), "--lr", str(lr or args.lr), "--epochs", str(epochs or args.epochs), "--skip-bad-rows"]


def builtin_task(args, device):
    """Stages 1-4 of the built-in task -> (sft_dir, reward model dir, its label file, iteration prompts, eval
    prompts, offline DPO dir)."""
    root, seed = args.output_dir, args.seed
    tokenizer = task.build_tokenizer()
    n_sft, n_labels, n_iter = args.task_sft_prompts, args.task_labels, args.iterations * args.prompts_per_iteration
    prompts = task.make_prompts(n_sft + n_labels + args.task_eval_prompts + n_iter, seed)
    sft_prompts, label_prompts = prompts[:n_sft], prompts[n_sft:n_sft + n_labels]
    # held-out prompts before the iterations' own, so every loop setting is evaluated on the same ones
    eval_prompts, iter_prompts = (prompts[n_sft + n_labels:n_sft + n_labels + args.task_eval_prompts],
                                  prompts[n_sft + n_labels + args.task_eval_prompts:])
    init_dir, sft_dir, data_dir = f"{root}/init", f"{root}/sft", f"{root}/data"
    if not rundir.done(init_dir):  # a random-init tiny Llama, saved like any hub checkpoint
        if dist.is_main():
            save_model(init_model(task.policy_config(tokenizer), seed=seed), init_dir, tokenizer)
        rundir.mark_done(init_dir, {})
    if not rundir.done(sft_dir):  # 1. SFT on demonstrations
        if dist.is_main():
            write_jsonl(f"{data_dir}/sft.jsonl", [dict(prompt=p, completion=c) for p, c in
                                                  zip(sft_prompts, task.demonstrations(sft_prompts, seed))])
        dist.barrier()
        train_dpo.main(dpo_flags(args, "sft", init_dir, init_dir, f"{data_dir}/sft.jsonl", sft_dir, loss="sft",
                                 epochs=SFT_EPOCHS, lr=SFT_LR))
    labels_path = f"{data_dir}/preferences.jsonl"
    if not rundir.done(data_dir):  # 2. two SFT samples per prompt, labelled by simulated annotators
        rows = gather_rows(sample(sft_dir, tokenizer, label_prompts, 2, args, seed, device, "label set"))
        generator = torch.Generator().manual_seed(seed)
        pairs = []
        for r in rows:
            a, b = r["responses"]
            if a != b:  # identical responses carry no preference; an empty response is a response
                a_wins = task.annotate(r["prompt"], a, b, task.TAU, generator)
                pairs.append(dict(prompt=r["prompt"], chosen=a if a_wins else b, rejected=b if a_wins else a))
        if dist.is_main():
            write_jsonl(labels_path, pairs)
        rundir.mark_done(data_dir, {"human_labels": len(pairs), "prompts": len(rows)})
    # 3. the Bradley-Terry reward model on the labels not kept for the online iterations (all with K = 0)
    rm_dir, rm_labels = f"{root}/reward_model", f"{root}/reward_model_labels.jsonl"
    if not rundir.done(rm_dir):
        if dist.is_main():
            offline = list(load_dataset_any(labels_path))
            write_jsonl(rm_labels, offline[:len(offline) - args.iterations * args.labels_per_iteration])
        dist.barrier()
        train_rm.main(rm_flags(args, "reward model", sft_dir, rm_labels, rm_dir, RM_LR, RM_EPOCHS))
    offline_dir = f"{root}/offline_dpo"
    if not rundir.done(offline_dir):  # 4. the offline DPO baseline: all the human labels, no online samples
        train_dpo.main(dpo_flags(args, "offline dpo", sft_dir, sft_dir, labels_path, offline_dir,
                                 epochs=OFFLINE_DPO_EPOCHS, lr=BUILTIN["lr"] if args.algorithm == "ppo" else None))
    return sft_dir, rm_dir, rm_labels, iter_prompts, eval_prompts, offline_dir


def rm_flags(args, name, model, data, out, lr, epochs):
    """train_rm.py's command line for a Bradley-Terry reward model on every label in `data`."""
    return common_flags(args, name) + ["--kind", "bt", "--model", model, "--train-data", data, "--output-dir", out,
                                       "--lr", str(lr), "--epochs", str(epochs)]


def refit_reward_model(args, label_files, rm_dir, out, name):
    """train_rm.py on every label so far (one file in the usual preference format), warm-started from rm_dir."""
    if not rundir.done(out):
        if dist.is_main():
            write_jsonl(f"{out}.labels.jsonl", [dict(prompt=r["prompt"], chosen=r["chosen"], rejected=r["rejected"])
                                                for f in label_files for r in load_dataset_any(f)])
        dist.barrier()
        train_rm.main(rm_flags(args, name, rm_dir, f"{out}.labels.jsonl", out, args.rm_lr, args.rm_epochs))
    return out


def main(argv=None):
    args = resolve_defaults(build_parser().parse_args(argv))
    if args.sft_model is None and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # 126k parameters: a 2nd thread gains little, on a busy machine it is ruinous (README)
    rank, world_size, device = dist.init_distributed()
    # the folder locked, foreign files refused, a rerun with other arguments refused (its finished stages would be
    # skipped and mixed with new ones): minirlhf/rundir.py
    names = ["init", "sft", "data", "reward_model", "reward_model_labels.jsonl", "offline_dpo", "summary.json",
             "summary.png"] + [f"iter{t}" for t in range(1, args.iterations + 1)]
    with rundir.start(args.output_dir, vars(args), names, overwrite=args.overwrite,
                      ignore=("resume", "save_steps", "overwrite", "keep_optimizer"), staged=False):
        run_workflow(args, device)


def run_workflow(args, device):
    start = time.time()
    offline_dir = eval_prompts = None
    if args.sft_model is None:
        sft_dir, reward_spec, initial_labels, prompts, eval_prompts, offline_dir = builtin_task(args, device)
        references = task.demonstrations(prompts, args.seed)  # DR-PO's resets: the task's human demonstrations
    else:
        sft_dir, reward_spec, initial_labels = args.sft_model, args.reward, args.labels
        prompts, references = (load_prompts(args.prompts, args.prompt_column, args.reference_column)
                               if args.reset_prob > 0 else (load_prompts(args.prompts, args.prompt_column), None))
        eval_prompts = load_prompts(args.eval_prompts, args.prompt_column) if args.eval_prompts else None
    oracle = load_oracle(args.oracle) if args.labels_per_iteration else None
    label_files = [initial_labels] if initial_labels else []
    tokenizer = load_tokenizer(sft_dir)
    if args.sft_model is not None:  # user prompts: what would fail after sampling fails now, naming the row
        check_prompts(prompts, tokenizer, args.max_length // 4, args.prompts, args.prompt_column)
        check_prompts(eval_prompts or [], tokenizer, None, args.eval_prompts, args.prompt_column)
    per_iter = args.prompts_per_iteration or len(prompts) // args.iterations
    if per_iter < 1 or per_iter * args.iterations > len(prompts):
        raise UserError(f"{args.iterations} iterations of {per_iter} fresh prompts need {args.iterations * per_iter}"
                        f" prompts; there are {len(prompts)}")
    policy_dir = sft_dir
    for t in range(1, args.iterations + 1):
        it_dir = f"{args.output_dir}/iter{t}"
        if rundir.done(it_dir):
            policy_dir = f"{it_dir}/policy"
            if oracle:
                label_files.append(f"{it_dir}/labels.jsonl")
                reward_spec = f"{it_dir}/reward_model"
            continue
        t0 = time.time()
        if args.algorithm == "ppo":  # PPO / DR-PO on a batch of fresh prompts (train_ppo.py)
            ppo_iteration(args, t, it_dir, policy_dir, sft_dir, reward_spec, prompts, references, per_iter, label_files)
            policy_dir = f"{it_dir}/policy"
            continue
        # 1-3. fresh prompts, n responses each from the current policy, scored by the reward source
        iter_prompts = prompts[(t - 1) * per_iter:t * per_iter]
        rows = sample(policy_dir, tokenizer, iter_prompts, args.samples_per_prompt, args, args.seed + t, device,
                      f"iter{t}")
        score(rows, reward_spec, (t - 1) * per_iter, device, f"iter{t}")
        info = {}
        if oracle:  # online labels: the oracle judges K of these samples, then the reward model is refit on all
            dist.print0(f"iter{t} oracle labels {args.labels_per_iteration} pairs")
            path, labelled, info["reward_model_accuracy_on_new_labels"] = ask_oracle(
                oracle, gather_rows(rows), args.labels_per_iteration, args.label_pair, f"{it_dir}/labels.jsonl",
                seed=args.seed * 1000 + 500 + t, name=args.oracle)
            label_files.append(path)
            reward_spec = refit_reward_model(args, label_files, reward_spec, f"{it_dir}/reward_model",
                                             f"iter{t} reward-model refit")
            score(rows, reward_spec, (t - 1) * per_iter, device, f"iter{t}")
        human_labels = sum(len(load_dataset_any(f)) for f in label_files)
        # 4. one pair per prompt from the shaped scores (--pair-rule; the paper's best vs worst by default), the
        # oracle's own answer where it labelled one; with the sampled ids, so DPO trains on what the policy produced
        generator = torch.Generator().manual_seed(args.seed * 1000 + t)
        rows = gather_rows(choose_pairs(rows, args.pair_rule, args.min_gap, args.length_penalty,
                                        args.truncation_penalty, generator))
        pairs = training_pairs(rows, labelled if oracle and args.labels_train == "both" else [])
        cut_off = sum(x for r in rows for x in r["truncated"]) / sum(len(r["truncated"]) for r in rows)
        if cut_off > 0.25:  # trained as cut off (no stop token), but a sign of a limit too low for the task
            dist.print0(f"warning: iteration {t}: {cut_off:.0%} of the samples were cut off at --max-new-tokens")
        if not pairs:
            raise UserError(f"iteration {t}: the best and worst responses of every prompt tie (or differ by less "
                            "than --min-gap): no pair to train on; raise --temperature or --samples-per-prompt, or "
                            "lower --min-gap")
        if dist.is_main():
            write_jsonl(f"{it_dir}/samples.jsonl", rows)
            write_jsonl(f"{it_dir}/pairs.jsonl", pairs)
        dist.barrier()
        # 5. DPO from the current policy, against pi_0 or the previous policy
        ref_dir = sft_dir if args.ref == "initial" else policy_dir
        dpo = train_dpo.main(dpo_flags(args, f"iter{t} dpo", policy_dir, ref_dir, f"{it_dir}/pairs.jsonl",
                                       f"{it_dir}/policy"))
        # 6. the iteration's metrics; the policy folder is already saved by train_dpo
        all_rewards = [x for r in rows for x in r["rewards"]]
        metrics = dict(iteration=t, prompts=len(rows), pairs=dpo["train_examples"], no_pair=len(rows) - len(pairs),
                       human_labels=human_labels, reward_model=reward_spec, **info,
                       dropped_by_dpo=len(pairs) - dpo["train_examples"],  # e.g. identical once cut to --max-length
                       mean_reward=sum(all_rewards) / len(all_rewards), reference=ref_dir,
                       mean_best_reward=sum(max(r["rewards"]) for r in rows) / len(rows), truncated=cut_off,
                       dpo={k: v for k, v in dpo.items() if isinstance(v, (int, float))}, seconds=time.time() - t0)
        dist.print0(f"iteration {t}: {metrics['pairs']} pairs ({metrics['no_pair']} prompts tied or within --min-gap), "
                    f"mean reward {metrics['mean_reward']:.3f}, best-of-{args.samples_per_prompt} "
                    f"{metrics['mean_best_reward']:.3f}, {cut_off:.0%} of samples cut off, {human_labels} human labels "
                    "so far")
        if dist.is_main():
            atomic_write_json(f"{it_dir}/metrics.json", metrics)
        rundir.mark_done(it_dir, metrics)
        policy_dir = f"{it_dir}/policy"
    if eval_prompts and dist.is_main():  # the proxy: the last reward model (with online labels, it has seen most)
        builtin = args.sft_model is None
        evaluate_iterations(args.output_dir, args.iterations, sft_dir, offline_dir, tokenizer, eval_prompts,
                            load_reward_source(reward_spec, device=device), args.max_new_tokens, args.seed,
                            task.gold_reward if builtin else None, device, task.TAU if builtin else 1.0, start)
    dist.barrier()
    dist.print0(f"total time {time.time() - start:.0f} s; outputs in {args.output_dir}")


def ppo_iteration(args, t, it_dir, policy_dir, sft_dir, reward_spec, prompts, references, per_iter, label_files):
    """train_ppo.py on iteration t's prompts (it_dir/prompts.jsonl); the value model, KL coefficient carry over."""
    lo, previous = (t - 1) * per_iter, f"{args.output_dir}/iter{t - 1}/policy"
    if dist.is_main():
        write_jsonl(f"{it_dir}/prompts.jsonl", [dict(prompt=prompts[i], **{args.reference_column: references[i]}
                                                     if references else {}) for i in range(lo, lo + per_iter)])
    dist.barrier()
    flags = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in (
        "samples_per_prompt", "temperature", "max_new_tokens", "gen_batch_size", "truncation_penalty", "lr",
        "grad_accum", "seed", "iterations", "save_dtype", "report_to")] + ["--resume"] * args.resume
    summary = train_ppo.main(flags + cli.passed_flags(train_ppo.add_ppo_arguments, args) + [
        "--model", policy_dir, "--ref-model", sft_dir, "--reward", str(reward_spec), "--prompts",
        f"{it_dir}/prompts.jsonl", "--output-dir", f"{it_dir}/policy", "--name", f"iter{t} ppo", "--iteration",
        str(t), "--batch-size", str(args.ppo_batch_size or args.batch_size), "--kl-coef",
        str(read_json(f"{previous}/eval.json", {}).get("next_kl_coef", args.kl_coef)),
        *(["--value-model", f"{previous}/value_model"] if t > 1 else [])])
    metrics = dict(iteration=t, human_labels=sum(len(load_dataset_any(f)) for f in label_files),
                   reward_model=reward_spec, reference=sft_dir, **summary)
    if dist.is_main():
        atomic_write_json(f"{it_dir}/metrics.json", metrics)
    rundir.mark_done(it_dir, metrics)


if __name__ == "__main__":
    with rundir.user_errors():
        main()
    dist.cleanup()
