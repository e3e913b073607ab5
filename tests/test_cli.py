"""The command line: every flag survives torchrun, --help shows every default and iterate's per-mode defaults,
progress lines reach a log file, and a run too small to train says so."""
import argparse
import re

import pytest
from torch.distributed.run import get_args_parser

import iterate
import train_dpo
import train_ppo
import train_rm
from minirlhf import cli

SCRIPTS = {"train_rm": train_rm, "train_dpo": train_dpo, "train_ppo": train_ppo, "iterate": iterate}


def options(script):
    return [o for a in SCRIPTS[script].build_parser()._actions for o in a.option_strings if o.startswith("--")]


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_every_flag_reaches_the_script_through_torchrun(script):
    """torchrun's parser sees the whole command line and prefix-matches options even after the script's name
    (`--n` was "ambiguous option: --n could match --nnodes, --nproc-per-node, ...")."""
    torchrun = get_args_parser()
    for flag in options(script):
        for argv in ([flag, "1"], [f"{flag}=1"]):
            args = torchrun.parse_args(["--nproc-per-node", "2", f"{script}.py", *argv])
            assert args.training_script == f"{script}.py" and args.training_script_args == argv, flag
            assert args.nproc_per_node == "2"


def test_a_flag_torchrun_abbreviates_would_fail_the_same_test():
    """The check above can fail: an abbreviation of several torchrun options is an error."""
    with pytest.raises(SystemExit):
        get_args_parser().parse_args(["iterate.py", "--n", "4"])


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_help_shows_every_default(script, capsys):
    """Each flag with a default shows it; each flag without one says what happens when it is unset (or is
    required, a switch, or resolved per mode in iterate's table)."""
    parser = SCRIPTS[script].build_parser()
    text = parser.format_help()
    table = text[text.index("defaults of the flags left unset"):] if script == "iterate" else ""
    for action in parser._actions:
        if not action.option_strings or isinstance(action, (argparse._HelpAction, argparse._StoreTrueAction)):
            continue
        flag = action.option_strings[0]
        shown = cli.HelpFormatter("x")._get_help_string(action) % {"default": action.default}
        if action.default is not None:
            assert f"(default: {action.default})" in shown or "default" in action.help, flag
        elif not action.required and f"  {flag} " not in table:
            assert "default" in action.help or "(0:" in action.help or "paper" in action.help, flag
    assert "(default: 8)" in train_dpo.build_parser().format_help()  # --batch-size, as argparse prints it


def test_iterate_help_resolves_each_mode_and_names_no_hidden_table():
    """The three columns hold what resolve_defaults sets in each mode, the docstring's command keeps its line
    break, and no "PAPER below" points at something --help does not print."""
    text = iterate.build_parser().format_help()
    assert "below" not in text and "prompts.jsonl \\\n" in text
    table = text[text.index("defaults of the flags left unset"):].splitlines()
    modes = {"online": [], "proxy": ["--labels-per-iteration", "0"],
             "paper": ["--sft-model", "s", "--prompts", "p", "--reward", "r"]}
    for line in table[2:]:
        flag, *values = re.split(r"\s{2,}", line.strip())
        for (mode, argv), value in zip(modes.items(), values):
            args = iterate.resolve_defaults(iterate.build_parser().parse_args(argv))
            resolved = getattr(args, flag[2:].replace("-", "_"))
            assert str(resolved) == value or resolved is None and value in ("-", "all / T"), (flag, mode)


def test_the_two_trainers_share_one_vocabulary():
    """A flag of both trainers has the same default in both, except the recipe values each paper sets."""
    rm, dpo = ({a.dest: a.default for a in m.build_parser()._actions} for m in (train_rm, train_dpo))
    shared = rm.keys() & dpo.keys()
    assert {"eval_fraction", "eval_every", "chat_template", "tokenizer", "max_prompt_length", "seed", "save_dtype",
            "keep_optimizer", "name", "save_total_limit"} <= shared
    assert {k for k in shared if rm[k] != dpo[k]} == {"grad_accum", "epochs", "weight_decay"}
    for module in (train_rm, train_dpo):  # the same resolved defaults: a prompt limit, a held-out split
        args = cli.resolve_common(module.build_parser().parse_args(["--model", "m", "--train-data", "d",
                                                                    "--output-dir", "o", "--max-length", "64"]))
        assert (args.max_prompt_length, args.eval_fraction, args.seed) == (16, 0.05, 0)


def test_passed_flags_give_back_the_values_that_differ_from_the_defaults():
    """iterate.py passes its LoRA and PPO flags on this way: each trainer parses them back to the same values."""
    argv = ["--lora-rank", "4", "--use-rslora", "--lora-targets", "q_proj", "--reset-prob", "0.5",
            "--no-whiten-rewards", "--kl-target", "6"]
    args = iterate.build_parser().parse_args(argv)
    lora, ppo = cli.passed_flags(cli.add_lora_arguments, args), cli.passed_flags(train_ppo.add_ppo_arguments, args)
    assert lora == ["--lora-rank", "4", "--use-rslora", "--lora-targets", "q_proj"] == cli.lora_flags(args)
    assert ppo == ["--reset-prob", "0.5", "--kl-target", "6.0", "--no-whiten-rewards"]
    again = train_ppo.build_parser().parse_args(["--model", "m", "--reward", "r", "--prompts", "p", "--output-dir", "o",
                                                 *ppo])
    assert (again.reset_prob, again.kl_target, again.whiten_rewards, again.whiten_advantages) == (0.5, 6.0, False, True)
