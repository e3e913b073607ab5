"""iterate.py on a tiny random policy with a user reward function (fast, unlike test_iterate.py's built-in run):
what it checks before sampling, a non-finite reward, the pair counts it reports, and a rerun with other values."""
import json

import pytest

import iterate
from minirlhf.data import write_jsonl
from minirlhf.rundir import UserError
from tiny import save_tiny

REWARDS = """
import math
def length(prompts, responses):
    return [float(len(r)) for r in responses]
def nan_at_third(prompts, responses):
    return [math.nan if k == 2 * 2 + 1 else float(len(r)) for k, r in enumerate(responses)]
"""


@pytest.fixture
def setup(tmp_path, tokenizer, monkeypatch):
    save_tiny(tmp_path / "sft", "llama3")
    tokenizer.save_pretrained(tmp_path / "sft")
    (tmp_path / "rewards_for_test.py").write_text(REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"say {w}"} for w in "abcdefgh"])
    return tmp_path


def flags(d, *extra, reward="length", prompts="prompts.jsonl"):
    return ["--output-dir", str(d / "run"), "--sft-model", str(d / "sft"), "--reward", f"rewards_for_test:{reward}",
            "--prompts", str(d / prompts), "--iterations", "1", "--samples-per-prompt", "3", "--max-new-tokens", "6",
            "--max-length", "64", "--batch-size", "4", "--grad-accum", "1", "--lr", "1e-3", "--seed", "0", *extra]


def test_counts_are_pairs_trained_on_and_a_rerun_with_other_values_is_refused(setup):
    iterate.main(flags(setup))
    metrics = json.loads((setup / "run/iter1/metrics.json").read_text())
    n_pairs = len((setup / "run/iter1/pairs.jsonl").read_text().splitlines())
    trained = json.loads((setup / "run/iter1/policy/eval.json").read_text())["train_examples"]
    assert metrics["pairs"] == trained and metrics["pairs"] + metrics["dropped_by_dpo"] == n_pairs
    args_before = (setup / "run/args.json").read_text()
    with pytest.raises(UserError, match=r"--beta: recorded 0.1, now 0.5\n  --seed: recorded 0, now 7"):
        iterate.main(flags(setup, "--seed", "7", "--beta", "0.5"))
    assert (setup / "run/args.json").read_text() == args_before
    iterate.main(flags(setup, "--save-steps", "3"))  # a flag that cannot change results may differ


@pytest.mark.parametrize("rows, match", [
    ([{"prompt": "say a"}, {"prompt": "say " + "b c d " * 8}], r"prompts.jsonl: row 1: field 'prompt': prompt is \d+ "
                                                               r"tokens > 16, the DPO prompt limit"),
    ([{"prompt": "say a"}, {"prompt": [{"role": "system", "content": "hi"}]}],
     r"prompts.jsonl: row 1: field 'prompt': no user message \(roles \['system'\]\)")])
def test_prompts_are_checked_before_sampling(setup, monkeypatch, rows, match):
    write_jsonl(setup / "prompts.jsonl", rows * 2)
    monkeypatch.setattr(iterate, "sample", lambda *a, **k: pytest.fail("sampled before checking the prompts"))
    with pytest.raises(UserError, match=match):
        iterate.main(flags(setup))


def test_a_nonfinite_reward_stops_naming_prompt_and_source(setup):
    with pytest.raises(UserError, match=r"reward source rewards_for_test:nan_at_third: non-finite reward "
                                        r"\[.*nan.*\] for prompt 1"):
        iterate.main(flags(setup, reward="nan_at_third"))
    assert not (setup / "run/iter1/samples.jsonl").exists()


def test_lora_flags_reach_every_stage_and_the_next_stage_reads_the_merged_policy(setup):
    """--lora-rank / --quantize on iterate.py: the DPO stage trains a QLoRA adapter (PEFT layout) on the SFT policy,
    writes the merged model beside it, and that merged folder is a full checkpoint whose weights moved off the SFT's."""
    import torch
    from safetensors.torch import load_file
    from minirlhf.checkpoint import load_model
    iterate.main(flags(setup, "--lora-rank", "4", "--quantize", "nf4", "--lora-targets", "q_proj,v_proj"))
    policy = setup / "run/iter1/policy"
    config = json.loads((policy / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["target_modules"] == ["q_proj", "v_proj"]
    assert json.loads((setup / "run/iter1/policy/args.json").read_text())["quantize"] == "nf4"
    merged, sft = load_model(policy).state_dict(), load_model(setup / "sft").state_dict()
    assert merged.keys() == sft.keys()  # a plain checkpoint: what iteration 2 or evaluation loads
    moved = {k for k in sft if not torch.equal(merged[k], sft[k])}
    linears = {k for k in sft if k.startswith("model.layers.") and k.endswith("proj.weight")}
    assert moved == linears  # NF4 rounds every block linear; embeddings and norms are untouched
    adapter = load_file(policy / "adapter_model.safetensors")
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in adapter.items())  # it trained
