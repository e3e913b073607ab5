"""The command line shared by train_rm.py and train_dpo.py: one vocabulary, one behaviour, defaults in --help.

Both trainers read the same data flags, split off the same held-out set, save the same way and start from the
same seed. Flag names must survive `torchrun`, which prefix-matches every option, even after the script's name:
an abbreviation of two torchrun options (`--n`) fails before the script starts (tests/test_cli.py checks each).
"""
import argparse
import os
import sys
import time

import torch
from tqdm import tqdm

from minirlhf import checkpoint, dist, lora
from minirlhf import tokenizer as tokenizers
from minirlhf.rundir import UserError, positive_int

SAVE_DTYPES = {"input": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MIN_STEPS = 10  # fewer optimizer steps than this train almost nothing at the paper's learning rates


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the docstring's layout and shows each flag's default, unless its help already says what it is."""
    def _get_help_string(self, action):
        text, default = action.help or "", action.default
        if default is not None and default is not False and default != argparse.SUPPRESS and "default" not in text:
            text += " (default: %(default)s)"
        return text


def parser(description, epilog=None):
    return argparse.ArgumentParser(description=description, epilog=epilog, formatter_class=HelpFormatter,
                                   allow_abbrev=False)


def add_common_arguments(p, batch_size, grad_accum):
    """The flags train_rm.py and train_dpo.py share (each adds its own objective and optimiser flags)."""
    # models and data
    p.add_argument("--model", required=True, help="starting checkpoint folder (Hugging Face layout)")
    p.add_argument("--tokenizer", help="tokenizer folder (default: --model)")
    p.add_argument("--chat-template", help="Jinja chat template file (default: the tokenizer's own)")
    p.add_argument("--train-data", required=True, help="training data: .json/.jsonl/.parquet, save_to_disk folder "
                                                       "or hub:NAME (formats: see minirlhf/data.py)")
    p.add_argument("--train-split", default="train", help="split of --train-data (hub datasets / DatasetDicts)")
    p.add_argument("--eval-data", help="held-out data, same format (default: a --eval-fraction of --train-data)")
    p.add_argument("--eval-split", default="test", help="split of --eval-data")
    p.add_argument("--eval-fraction", type=float, default=0.05, help="held-out fraction without --eval-data")
    p.add_argument("--eval-every", type=int, default=0, help="also evaluate every N steps (0: only at the end)")
    p.add_argument("--output-dir", required=True, help="output folder: the model (HF layout), logs, checkpoint/")
    p.add_argument("--prompt-column", default="prompt", help="prompt column (string or chat messages)")
    p.add_argument("--chosen-column", default="chosen", help="preferred response column")
    p.add_argument("--rejected-column", default="rejected", help="dispreferred response column")
    p.add_argument("--max-length", type=int, default=4096, help="prompt + response tokens (responses are cut)")
    p.add_argument("--max-prompt-length", type=int, help="longer prompts are bad rows (default: --max-length / 4)")
    p.add_argument("--skip-bad-rows", action="store_true", help="skip (and count) bad rows instead of failing")
    # perplexity filter of --train-data's pairs (a reconstruction of Kutalev & Markoff 2024: minirlhf/perplexity.py)
    p.add_argument("--filter-model", help="the policy that scores perplexities (default: --model)")
    p.add_argument("--max-perplexity", type=float, help="keep pairs with both perplexities <= X (default: no filter)")
    p.add_argument("--perplexity-quantile", type=float, help="keep the pairs up to the q-quantile of max(PPL "
                   "chosen, PPL rejected): about a fraction q of them (default: no filter)")
    # optimisation
    p.add_argument("--max-steps", type=int, help="optimizer steps (default: --epochs; sizes the schedule)")
    p.add_argument("--batch-size", type=positive_int, default=batch_size, help="pairs (SFT: sequences) per "
                                                                               "micro-batch per rank")
    p.add_argument("--grad-accum", type=positive_int, default=grad_accum, help="micro-batches per optimizer step")
    p.add_argument("--warmup-ratio", type=float, default=0.03, help="fraction of steps of linear warmup")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: off)")
    p.add_argument("--seed", type=int, default=0, help="data order, eval split and new weights (iterate.py's too)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute block activations in backward")
    p.add_argument("--name", help="label of the progress lines (default: the objective)")
    # checkpoints and the output folder (minirlhf/rundir.py)
    p.add_argument("--save-steps", type=int, default=500, help="save OUTPUT/checkpoint every N steps (0: at the end)")
    p.add_argument("--save-total-limit", type=positive_int, default=1, help="checkpoints kept while training: "
                   "OUTPUT/checkpoint (the latest, which --resume reads) and the N-1 before it as checkpoint-STEP/")
    p.add_argument("--keep-optimizer", action="store_true", help="keep the finished run's optimizer (for --resume)")
    return add_lora_arguments(add_run_arguments(p))


def add_run_arguments(p):
    """The output folder's flags (minirlhf/rundir.py), of train_ppo.py too."""
    p.add_argument("--save-dtype", default="input", choices=list(SAVE_DTYPES), help="weights' dtype (input: --model's)")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint if there is one")
    p.add_argument("--allow-changed-args", action="store_true", help="with --resume: continue although arguments "
                   "that change results differ from the recorded ones (e.g. a lower --lr after a non-finite loss)")
    p.add_argument("--overwrite", action="store_true", help="run into a folder holding files this program did not "
                   "write (same-named ones are replaced), or restart an unfinished run without --resume")
    p.add_argument("--report-to", default="none", choices=["none", "tensorboard", "wandb"], help="also send "
                   "metrics.jsonl's scalars and the arguments to TensorBoard or wandb (minirlhf/tracking.py)")
    return p


def add_lora_arguments(p):
    """LoRA / QLoRA flags (minirlhf/lora.py) of both trainers; iterate.py passes them on (`passed_flags`)."""
    g = p.add_argument_group("LoRA and QLoRA (minirlhf/lora.py)")
    g.add_argument("--lora-rank", type=int, default=0, help="train rank-r LoRA adapters on the frozen base instead of "
                   "every weight (0: full fine-tuning); OUTPUT then holds a PEFT adapter")
    g.add_argument("--lora-alpha", type=float, help="updates scaled by alpha / rank (default: rank)")
    g.add_argument("--use-rslora", action="store_true", help="scale by alpha / sqrt(rank) instead (rsLoRA)")
    g.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the adapters' input")
    g.add_argument("--lora-targets", default=lora.DEFAULT_TARGETS, help="comma-separated linear layers to adapt")
    g.add_argument("--quantize", default="none", choices=["none", "nf4"], help="QLoRA: the frozen block linears in "
                   "4-bit NormalFloat (blocks of 64), dequantised in the forward")
    g.add_argument("--double-quant", action="store_true", help="with --quantize nf4: the absmaxes in 8 bits too")
    g.add_argument("--merge-lora", action="store_true", help="also save the merged model (W + scaling B A)")
    return p


def passed_flags(add_arguments, args):
    """The command line giving the flags that `add_arguments` defines the values they have in `args` where those
    differ from the defaults: how iterate.py passes its LoRA and PPO flags on to the trainers."""
    flags = []
    for action in add_arguments(parser(""))._actions[1:]:  # [0]: --help
        value = getattr(args, action.dest)
        if value == action.default:
            continue
        if isinstance(action, argparse.BooleanOptionalAction):
            flags.append(action.option_strings[0 if value else 1])
        else:
            flags += [action.option_strings[0]] + ([] if action.nargs == 0 else [str(value)])  # nargs 0: a switch
    return flags


def lora_flags(args):
    return passed_flags(add_lora_arguments, args)


def defaults_table(modes):
    """The end of iterate.py's --help: the value each flag left unset takes in each mode ({mode: {dest: value}})."""
    keys = list(dict.fromkeys(k for d in modes.values() for k in d))
    rows = [["", *modes]] + [[f"--{k.replace('_', '-')}", *(str(d.get(k, "-")) for d in modes.values())] for k in keys]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "defaults of the flags left unset, per mode:\n" + "\n".join(
        "  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def resolve_common(args):
    """Defaults that depend on other flags, the same in both trainers."""
    args.max_prompt_length = args.max_prompt_length or args.max_length // 4
    if args.eval_data:
        args.eval_fraction = 0.0
    return args


def load_tokenizer(args):
    """--tokenizer (or --model's) with --chat-template as its own: every encoding and the saved tokenizer use it."""
    tokenizer = tokenizers.load_tokenizer(args.tokenizer or args.model)
    if args.chat_template:
        if not os.path.isfile(args.chat_template):
            raise UserError(f"{args.chat_template}: no such file (--chat-template: a Jinja template file)")
        with open(args.chat_template) as f:
            tokenizer.chat_template = f.read()
    return tokenizer


def save_dtype(args):
    """The dtype of a run's final weights: --save-dtype, or that of the --model checkpoint."""
    return SAVE_DTYPES[args.save_dtype] or checkpoint.weights_dtype(args.model)


def warn_few_steps(total_steps, batch_size, grad_accum, world_size, n_examples, what="pairs"):
    """Say so when a run will barely train: at the paper's learning rates a handful of steps changes nothing."""
    if total_steps < MIN_STEPS:
        dist.print0(f"warning: only {total_steps} optimizer step(s): {n_examples} {what} in windows of "
                    f"batch {batch_size} x accum {grad_accum} x world size {world_size} = "
                    f"{batch_size * grad_accum * world_size}; lower --batch-size / --grad-accum or raise --epochs")


class Progress:
    """A stage's progress on rank 0: a tqdm bar on a terminal, else (a log) a line "NAME: step k/total" every tenth."""
    def __init__(self, name, total, initial=0, unit="step"):
        self.name, self.total, self.done, self.unit, self.start = name, total, initial, unit, time.time()
        self.show, self.every = dist.is_main(), max(1, total // 10)
        self.bar = tqdm(total=total, initial=initial, desc=name, unit=unit) if self.show and sys.stdout.isatty() \
            else None

    def update(self, k=1, **info):
        self.done += k
        if self.bar is not None:
            self.bar.update(k)
            self.bar.set_postfix(**info)
        elif self.show and (self.done // self.every > (self.done - k) // self.every or self.done == self.total):
            extra = "".join(f" {key} {value}" for key, value in info.items())
            dist.print0(f"{self.name}: {self.unit} {self.done}/{self.total}{extra} ({time.time() - self.start:.0f} s)")

    def close(self):
        if self.bar is not None:
            self.bar.close()
