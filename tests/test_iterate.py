"""iterate.py end to end on a shortened built-in task: gold reward goes up, reward sources, references, resume,
torchrun. One shortened run is shared by the tests (module fixture); each test copies what it needs."""
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import iterate
import train_dpo
from minirlhf import data, task
from minirlhf.checkpoint import load_model
from minirlhf.tokenizer import load_tokenizer, pad_token_id

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the default task with two iterations instead of three
SHORT = ["--iterations", "2", "--save-steps", "4", "--seed", "0"]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("iterate") / "run")
    iterate.main(["--output-dir", out] + SHORT)
    return out


def copy_until(base_run, dst, iterations):
    """A copy of the run's offline stages and its first `iterations` iterations, with the manifest that says they
    are iterate.py's (not its args.json: a copy may run with other values)."""
    for name in ["init", "sft", "data", "reward_model", "offline_dpo"] + [f"iter{t}" for t in range(1, iterations + 1)]:
        shutil.copytree(os.path.join(base_run, name), os.path.join(dst, name))
    shutil.copy(os.path.join(base_run, "manifest.json"), dst)
    return str(dst)


def test_shortened_builtin_run_beats_sft(base_run):
    summary = json.load(open(os.path.join(base_run, "summary.json")))
    rows = summary["policies"]
    assert set(rows) == {"sft", "offline_dpo", "iter1", "iter2"}
    # the proxy reward, which online DPO maximises, rises at every iteration; the gold reward rises at the first
    # (by 0.13 on average over 3 seeds). Later iterations over-optimise the 75%-accurate
    # proxy, so the gold reward of iteration 2 depends on the seed (benchmarks/RESULTS.md): not asserted.
    assert rows["sft"]["proxy_reward"] < rows["iter1"]["proxy_reward"] < rows["iter2"]["proxy_reward"]
    assert rows["iter1"]["gold_reward"] > rows["sft"]["gold_reward"] + 0.03
    assert rows["iter1"]["gold_win_rate"] > 0.5
    assert abs(rows["sft"]["kl_to_ref"]) < 1e-3  # the reference measured against itself
    samples = [json.loads(line) for line in open(os.path.join(base_run, "iter1", "samples.jsonl"))]
    assert len(samples) == 2000 and all(len(s["responses"]) == 8 == len(s["rewards"]) for s in samples)
    for s in samples:  # chosen is the best and rejected the worst under the proxy reward (max_min)
        if s["chosen"] is not None:
            assert s["rewards"][s["responses"].index(s["chosen"])] == max(s["rewards"])
            assert s["rewards"][s["responses"].index(s["rejected"])] == min(s["rewards"])
    metrics = json.load(open(os.path.join(base_run, "iter1", "metrics.json")))
    assert metrics["no_pair"] == sum(s["chosen"] is None for s in samples)
    assert metrics["no_pair"] + metrics["pairs"] + metrics["dropped_by_dpo"] == 2000
    for name in ["sft", "offline_dpo", "iter1/policy", "iter2/policy", "reward_model"]:
        assert os.path.exists(os.path.join(base_run, name, "config.json")), name
    # matplotlib is optional: with it the run also draws the table
    assert os.path.exists(os.path.join(base_run, "summary.png")) == (importlib.util.find_spec("matplotlib") is not None)


def reference_of(policy_dir):
    with safe_open(os.path.join(policy_dir, "ref_logps.safetensors"), "pt") as f:
        return f.metadata()["ref_model"]


def assert_reference_logps_are_those_of(run, reference):
    """iter2's stored reference log-probs equal `reference`'s, recomputed here independently of train_dpo's pass."""
    policy_dir = os.path.join(run, "iter2", "policy")
    assert reference_of(policy_dir) == os.path.abspath(reference)
    tokenizer = load_tokenizer(reference)
    pairs, _ = data.load_preferences(os.path.join(run, "iter2", "pairs.jsonl"), tokenizer, max_length=64,
                                     max_prompt_length=16, skip_bad=True)
    logps, _ = train_dpo.compute_logps(load_model(reference), pairs, 64, torch.device("cpu"), pad_token_id(tokenizer))
    stored = load_file(os.path.join(policy_dir, "ref_logps.safetensors"))
    torch.testing.assert_close(stored["chosen_logps"], logps[:, 0], atol=1e-4, rtol=0)
    torch.testing.assert_close(stored["rejected_logps"], logps[:, 1], atol=1e-4, rtol=0)
    return logps


def test_ref_initial_and_previous_use_the_reference_they_name(base_run, tmp_path):
    initial = assert_reference_logps_are_those_of(base_run, os.path.join(base_run, "sft"))
    run = copy_until(base_run, tmp_path / "previous", 1)
    iterate.main(["--output-dir", run, "--ref", "previous"] + SHORT)
    previous = assert_reference_logps_are_those_of(run, os.path.join(run, "iter1", "policy"))
    assert (initial - previous).abs().max() > 0.1  # the two references really differ on these pairs


def test_resume_after_a_kill_in_iteration_2_equals_uninterrupted(base_run, tmp_path, monkeypatch, capsys):
    """Iterations 1 done, iteration 2 killed at DPO step 6 (its checkpoint holds step 4): the rerun keeps
    iteration 1, resamples iteration 2 identically, continues its DPO from step 4 and ends where the
    uninterrupted run ended."""
    run = copy_until(base_run, tmp_path / "resumed", 1)
    monkeypatch.setenv("MINIRLHF_FAIL_AFTER_STEP", "6")
    with pytest.raises(RuntimeError, match="simulated kill"):
        iterate.main(["--output-dir", run] + SHORT)
    assert not os.path.exists(os.path.join(run, "iter2", "done.json"))
    assert json.load(open(os.path.join(run, "iter2", "policy", "checkpoint", "trainer_state.json")))["step"] == 4
    monkeypatch.delenv("MINIRLHF_FAIL_AFTER_STEP")
    capsys.readouterr()
    iterate.main(["--output-dir", run, "--resume"] + SHORT)
    assert "resuming from" in capsys.readouterr().out and "iteration 1:" not in capsys.readouterr().out
    for name in ["samples.jsonl", "pairs.jsonl"]:
        assert open(os.path.join(run, "iter2", name)).read() == open(os.path.join(base_run, "iter2", name)).read()
    ours = load_file(os.path.join(run, "iter2", "policy", "model.safetensors"))
    theirs = load_file(os.path.join(base_run, "iter2", "policy", "model.safetensors"))
    for name in theirs:  # 1e-5: MKL's sums may differ in the last bits between processes (memory alignment)
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-5, rtol=0)


def write_prompts(path, n, seed, without):
    prompts = [p for p in task.make_prompts(4 * n, seed) if without not in p.split()][:n]
    data.write_jsonl(path, [{"prompt": p} for p in prompts])
    return str(path)


def test_module_function_reward_is_used_as_given(base_run, tmp_path, monkeypatch):
    """A reward that counts the letter "p", on prompts without "p": the SFT policy says it only by mistake."""
    (tmp_path / "likes_p.py").write_text(
        "def reward(prompts, responses):\n    return [float(r.split().count('p')) for r in responses]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    prompts = write_prompts(tmp_path / "prompts.jsonl", 600, seed=7, without="p")
    eval_prompts = write_prompts(tmp_path / "eval.jsonl", 200, seed=8, without="p")
    out = str(tmp_path / "run")
    iterate.main(["--output-dir", out, "--sft-model", os.path.join(base_run, "sft"), "--reward", "likes_p:reward",
                  "--prompts", prompts, "--iterations", "2", "--lr", "2e-3", "--max-new-tokens", "10",
                  "--max-length", "64", "--batch-size", "32", "--grad-accum", "1", "--eval-prompts", eval_prompts])

    def p_rate(name):
        rows = [json.loads(line) for line in open(os.path.join(out, name, "samples.jsonl"))]
        letters = [w for r in rows for resp in r["responses"] for w in resp.split()]
        return letters.count("p") / len(letters)

    rows = [json.loads(line) for line in open(os.path.join(out, "iter1", "samples.jsonl"))]
    assert all(r["rewards"] == [float(x.split().count("p")) for x in r["responses"]] for r in rows)
    before, after = p_rate("iter1"), p_rate("iter2")  # iter1 samples the SFT policy, iter2 the first DPO policy
    assert after > 2 * before and after > 0.05, (before, after)
    # after both iterations, on held-out prompts: the proxy reward is the mean count of "p" per response
    policies = json.load(open(os.path.join(out, "summary.json")))["policies"]
    assert policies["iter2"]["proxy_reward"] > max(3 * policies["sft"]["proxy_reward"], 0.3), policies


def test_pairwise_judge_as_reward_source(base_run, tmp_path):
    """A causal LM folder is read as a pairwise judge (here the SFT policy, with label tokens its vocabulary
    has); all-pairs win rates of n responses average exactly 1/2."""
    judge = shutil.copytree(os.path.join(base_run, "sft"), tmp_path / "judge")
    (judge / "pairwise.json").write_text(json.dumps({"label_tokens": ["a", "b"]}))
    prompts = write_prompts(tmp_path / "prompts.jsonl", 24, seed=5, without="")
    out = tmp_path / "run"
    iterate.main(["--output-dir", str(out), "--sft-model", os.path.join(base_run, "sft"), "--reward",
                  str(judge), "--prompts", prompts, "--iterations", "1", "--n", "4",
                  "--max-new-tokens", "10", "--max-length", "64", "--batch-size", "8", "--grad-accum", "1"])
    rows = [json.loads(line) for line in open(out / "iter1" / "samples.jsonl")]
    assert len(rows) == 24
    for r in rows:
        assert all(0 <= x <= 1 for x in r["rewards"]) and sum(r["rewards"]) == pytest.approx(2.0)
    assert len({x for r in rows for x in r["rewards"]}) > 4  # real comparisons, not constant scores


def test_bad_flag_combinations_fail_before_any_work(tmp_path):
    for argv, match in [(["--sft-model", "m"], "needs --prompts and --reward"),
                        (["--reward", "r"], "need --sft-model"),
                        (["--pair-rule", "max_min_p"], "max_min_p needs --length-penalty")]:
        with pytest.raises(SystemExit, match=match):
            iterate.main(["--output-dir", str(tmp_path / "x")] + argv)
        assert not (tmp_path / "x").exists()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_one_iteration_under_torchrun_writes_the_same_files(base_run, tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl", 64, seed=3, without="")
    common = ["--sft-model", os.path.join(base_run, "sft"), "--reward", os.path.join(base_run, "reward_model"),
              "--prompts", prompts, "--iterations", "1", "--lr", "1e-3", "--max-new-tokens", "10",
              "--max-length", "64", "--batch-size", "8", "--grad-accum", "1", "--eval-prompts", prompts]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    for name, launcher in [("one", [sys.executable]),
                           ("two", [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                                    f"--master-port={free_port()}"])]:
        subprocess.run(launcher + [os.path.join(ROOT, "iterate.py"), "--output-dir", str(tmp_path / name)] + common,
                       check=True, env=env, cwd=tmp_path, timeout=300)

    def files(name):  # per-rank optimizer and RNG shards differ by design
        top = tmp_path / name
        return {os.path.relpath(os.path.join(d, f), top) for d, _, fs in os.walk(top) for f in fs
                if "rank" not in f}
    assert files("one") == files("two")
    one, two = ([json.loads(line) for line in open(tmp_path / n / "iter1" / "samples.jsonl")] for n in ("one", "two"))
    assert [r["prompt"] for r in one] == [r["prompt"] for r in two]
    assert json.load(open(tmp_path / "two" / "summary.json"))["policies"].keys() == {"sft", "iter1"}
