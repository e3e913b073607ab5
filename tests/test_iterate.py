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
from minirlhf import data, plot, sampler, task
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
    for name in ["reward_model_labels.jsonl", "manifest.json"]:
        shutil.copy(os.path.join(base_run, name), dst)
    return str(dst)


def test_shortened_builtin_run_rises_every_iteration(base_run):
    summary = json.load(open(os.path.join(base_run, "summary.json")))
    rows = summary["policies"]
    assert set(rows) == {"sft", "offline_dpo", "iter1", "iter2"}
    # with online labels the gold reward rises at every iteration: in the README's 5-seed study of the 3-iteration
    # default by 0.08-0.12 at iteration 1 and 0.06-0.11 at iteration 2, on every seed
    assert rows["sft"]["gold_reward"] + 0.03 < rows["iter1"]["gold_reward"] < rows["iter2"]["gold_reward"]
    assert rows["iter1"]["gold_win_rate"] > 0.5 and rows["iter2"]["gold_win_rate"] > rows["iter1"]["gold_win_rate"]
    assert abs(rows["sft"]["kl_to_ref"]) < 1e-3  # the reference measured against itself
    assert rows["sft"]["kl_to_ref"] < rows["iter1"]["kl_to_ref"] < rows["iter2"]["kl_to_ref"]
    samples = [json.loads(line) for line in open(os.path.join(base_run, "iter1", "samples.jsonl"))]
    args = json.load(open(os.path.join(base_run, "args.json")))
    assert len(samples) == args["prompts_per_iteration"] and all(
        len(s["responses"]) == args["samples_per_prompt"] == len(s["rewards"]) for s in samples)
    labelled = {json.loads(line)["index"] for line in open(os.path.join(base_run, "iter1", "labels.jsonl"))}
    for s in samples:  # unlabelled prompts: chosen is the best and rejected the worst under the proxy (max_min)
        if s["chosen"] is not None and s["index"] not in labelled:
            assert s["rewards"][s["responses"].index(s["chosen"])] == max(s["rewards"])
            assert s["rewards"][s["responses"].index(s["rejected"])] == min(s["rewards"])
    metrics = json.load(open(os.path.join(base_run, "iter1", "metrics.json")))
    assert metrics["no_pair"] == sum(s["chosen"] is None for s in samples)
    assert metrics["no_pair"] + metrics["pairs"] + metrics["dropped_by_dpo"] == len(samples)
    for name in ["sft", "offline_dpo", "iter1/policy", "iter2/policy", "reward_model", "iter2/reward_model"]:
        assert os.path.exists(os.path.join(base_run, name, "config.json")), name
    # matplotlib is optional: with it the run also draws the summary
    assert os.path.exists(os.path.join(base_run, "summary.png")) == (importlib.util.find_spec("matplotlib") is not None)


def test_plot_draws_every_stage_of_the_run(base_run, tmp_path):
    """python -m minirlhf.plot on the run: SFT, the reward model and both refits, offline DPO and both iterations,
    each its whole metrics.jsonl, and the summary."""
    pytest.importorskip("matplotlib", reason="minirlhf.plot draws with the optional matplotlib")
    run = shutil.copytree(base_run, tmp_path / "run")
    assert set(plot.main([str(run)])) == {"sft", "reward_model", "dpo", "summary"}
    stages = plot.find_stages(run)
    assert {kind: list(s) for kind, s in stages.items()} == {
        "sft": ["sft"], "reward_model": ["iter1/reward_model", "iter2/reward_model", "reward_model"],
        "dpo": ["iter1/policy", "iter2/policy", "offline_dpo"]}
    for kind in stages.values():
        for label, rows in kind.items():
            assert [r["step"] for r in rows] == list(range(1, json.load(open(run / label / "eval.json"))["step"] + 1))


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
    """Iteration 1 done, iteration 2 killed at DPO step 6 (its checkpoint holds step 4): the rerun keeps
    iteration 1, resamples iteration 2 identically, continues its DPO from step 4 and ends where the
    uninterrupted run ended."""
    run = copy_until(base_run, tmp_path / "resumed", 1)
    # iteration 2's labels and reward-model refit finished before the kill (the hook would stop train_rm too)
    os.makedirs(os.path.join(run, "iter2"))
    for name in ["labels.jsonl", "reward_model.labels.jsonl", "reward_model"]:
        copy = shutil.copytree if os.path.isdir(os.path.join(base_run, "iter2", name)) else shutil.copy
        copy(os.path.join(base_run, "iter2", name), os.path.join(run, "iter2", name))
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
                  str(judge), "--prompts", prompts, "--iterations", "1", "--samples-per-prompt", "4",
                  "--max-new-tokens", "10", "--max-length", "64", "--batch-size", "8", "--grad-accum", "1"])
    rows = [json.loads(line) for line in open(out / "iter1" / "samples.jsonl")]
    assert len(rows) == 24
    for r in rows:
        assert all(0 <= x <= 1 for x in r["rewards"]) and sum(r["rewards"]) == pytest.approx(2.0)
    assert len({x for r in rows for x in r["rewards"]}) > 4  # real comparisons, not constant scores


def test_builtin_online_labels_refit_the_reward_model(base_run):
    """K oracle labels per iteration on the current policy's pairs, appended to the label set; each refit reward
    model trains on all labels so far (its weights change), and every policy's label count adds up."""
    args = json.load(open(os.path.join(base_run, "args.json")))
    k = args["labels_per_iteration"]
    assert k > 0 and args["oracle"] == "builtin"
    offline = sum(1 for _ in open(os.path.join(base_run, "data", "preferences.jsonl")))
    initial = sum(1 for _ in open(os.path.join(base_run, "reward_model_labels.jsonl")))
    assert initial == offline - 2 * k  # the same budget as offline DPO, at the end of the 2 iterations
    previous = load_file(os.path.join(base_run, "reward_model", "model.safetensors"))
    for t in (1, 2):
        it = os.path.join(base_run, f"iter{t}")
        labels = [json.loads(line) for line in open(os.path.join(it, "labels.jsonl"))]
        samples = {s["index"]: s for s in map(json.loads, open(os.path.join(it, "samples.jsonl")))}
        assert len(labels) == k
        for label in labels:  # a pair of this iteration's samples of that prompt, and DPO trains on its order
            s = samples[label["index"]]
            assert s["prompt"] == label["prompt"] and {label["chosen"], label["rejected"]} <= set(s["responses"])
            assert (s["chosen"], s["rejected"]) == (label["chosen"], label["rejected"])
        # every pair, labelled or the proxy's, trains on the token ids the sampler returned for its prompt
        sampled = {(s["prompt"], tuple(ids)) for s in samples.values() for ids in s["response_ids"]}
        pairs = [json.loads(line) for line in open(os.path.join(it, "pairs.jsonl"))]
        assert all((p["prompt"], tuple(p[f"{c}_ids"])) in sampled for p in pairs + labels
                   for c in ("chosen", "rejected"))
        assert sum(1 for _ in open(os.path.join(it, "reward_model.labels.jsonl"))) == initial + t * k
        metrics = json.load(open(os.path.join(it, "metrics.json")))
        assert metrics["human_labels"] == initial + t * k
        assert 0.0 <= metrics["reward_model_accuracy_on_new_labels"] <= 1.0
        refit = load_file(os.path.join(it, "reward_model", "model.safetensors"))
        assert max((refit[n] - previous[n]).abs().max().item() for n in refit) > 1e-4
        previous = refit
    policies = json.load(open(os.path.join(base_run, "summary.json")))["policies"]
    assert [policies[n]["human_labels"] for n in ("sft", "offline_dpo", "iter1", "iter2")] == [
        0, offline, initial + k, offline]


def test_module_function_oracle_and_a_rerun_that_asks_nothing_twice(base_run, tmp_path, monkeypatch):
    """A rule-based oracle (the gold reward, as a hard judge) drives a --sft-model run; killed in iteration 1's DPO,
    after its labels were written, the rerun reuses them and asks the oracle only for iteration 2."""
    asked = tmp_path / "asked.jsonl"
    (tmp_path / "rule_judge.py").write_text(
        "import json, os\nfrom minirlhf.task import gold_reward\n"
        "def judge(prompts, a, b):\n"
        "    with open(os.environ['ASKED_LOG'], 'a') as f:\n"
        "        f.writelines(json.dumps(row) + '\\n' for row in zip(prompts, a, b))\n"
        "    return [float(gold_reward(p, x) > gold_reward(p, y)) for p, x, y in zip(prompts, a, b)]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("ASKED_LOG", str(asked))
    initial = tmp_path / "initial_labels.jsonl"
    initial.write_text("".join(open(os.path.join(base_run, "reward_model_labels.jsonl")).readlines()[:40]))
    prompts = write_prompts(tmp_path / "prompts.jsonl", 48, seed=9, without="")
    out = tmp_path / "run"
    argv = ["--output-dir", str(out), "--sft-model", os.path.join(base_run, "sft"), "--prompts", prompts,
            "--reward", os.path.join(base_run, "reward_model"), "--labels", str(initial), "--oracle",
            "rule_judge:judge", "--labels-per-iteration", "6", "--iterations", "2", "--samples-per-prompt", "4",
            "--lr", "1e-3", "--rm-lr", "1e-3", "--max-new-tokens", "10", "--max-length", "64", "--batch-size", "8",
            "--grad-accum", "1"]
    monkeypatch.setenv("MINIRLHF_FAIL_AFTER_STEP", "1")
    with pytest.raises(RuntimeError, match="simulated kill"):
        iterate.main(argv)
    first = (out / "iter1" / "labels.jsonl").read_text()
    assert len(first.splitlines()) == 6 == len(asked.read_text().splitlines())
    monkeypatch.delenv("MINIRLHF_FAIL_AFTER_STEP")
    iterate.main(argv)
    questions = [tuple(json.loads(line)) for line in asked.read_text().splitlines()]
    assert len(questions) == 12 == len(set(questions))  # iteration 1's six were not asked again
    assert (out / "iter1" / "labels.jsonl").read_text() == first
    for t in (1, 2):
        labels = [json.loads(line) for line in open(out / f"iter{t}" / "labels.jsonl")]
        assert len(labels) == 6
        assert all(task.gold_reward(r["prompt"], r["chosen"]) >= task.gold_reward(r["prompt"], r["rejected"])
                   for r in labels)
        assert json.load(open(out / f"iter{t}" / "metrics.json"))["human_labels"] == 40 + 6 * t


def test_bad_flag_combinations_fail_before_any_work(tmp_path):
    for argv, match in [(["--sft-model", "m"], "needs --prompts and --reward"),
                        (["--reward", "r"], "need --sft-model"),
                        (["--pair-rule", "max_min_p"], "max_min_p needs --length-penalty"),
                        (["--oracle", "builtin", "--labels-per-iteration", "700"], "leave no labels"),
                        (["--labels", "x.jsonl"], "--labels needs --sft-model"),
                        (["--algorithm", "ppo", "--top-p", "0.9"], "--algorithm ppo trains on a fixed reward"),
                        (["--algorithm", "ppo", "--reset-prob", "1.5"], "2")]:  # argparse: not a probability
        with pytest.raises(SystemExit, match=match):
            iterate.main(["--output-dir", str(tmp_path / "x")] + argv)
        assert not (tmp_path / "x").exists()


def test_builtin_ppo_and_drpo_iteration(base_run, tmp_path):
    """--algorithm ppo --reset-prob 0.5 on the built-in task: half the episodes start from a prefix of the prompt's
    demonstration, the value model starts from the BT reward model, and the policy is evaluated beside the others."""
    run = copy_until(base_run, tmp_path / "drpo", 0)
    iterate.main(["--output-dir", run, "--algorithm", "ppo", "--reset-prob", "0.5", "--iterations", "1",
                  "--prompts-per-iteration", "300", "--seed", "0"])
    metrics = json.load(open(os.path.join(run, "iter1", "metrics.json")))
    assert metrics["episodes"] == 300 and abs(metrics["resets"] - 0.5) < 0.1 and metrics["human_labels"] > 0
    prompts = [json.loads(line) for line in open(os.path.join(run, "iter1", "prompts.jsonl"))]
    samples = [json.loads(line) for line in open(os.path.join(run, "iter1", "policy", "samples.jsonl"))]
    tokenizer = load_tokenizer(os.path.join(run, "sft"))
    for p, s in zip(prompts, samples):  # the forced tokens are the demonstration's first ones
        k, reference = s["forced_tokens"][0], tokenizer(p["completion"], add_special_tokens=False)["input_ids"]
        assert s["response_ids"][0][:k] == reference[:k]
    assert sum(s["forced_tokens"][0] > 0 for s in samples) == round(metrics["resets"] * 300)
    summary = json.load(open(os.path.join(run, "summary.json")))
    assert set(summary["policies"]) == {"sft", "offline_dpo", "iter1"} and summary["policies"]["iter1"]["kl_to_ref"] > 0
    plot.main([run])  # PPO's curves: policy and value loss, lr
    assert os.path.exists(os.path.join(run, "plots", "ppo.png"))


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


def test_dpo_trains_on_the_sampled_ids_and_cut_off_answers_stay_cut_off(tmp_path, monkeypatch, capsys):
    """A --sft-model run of a tiny random Qwen2 with a ChatML BPE tokenizer (8 new tokens: most samples are cut
    off): every pair DPO trains on holds the prompt and response ids the sampler returned (no re-encoded text, no
    stop token added to a cut-off answer), its reference log-probs are the sums of the sampler's token log-probs
    (temperature 1, the reference is the sampling policy), and the truncated share is reported and warned of."""
    from conftest import build_chat_tokenizer
    from tiny import save_tiny
    tok = build_chat_tokenizer(tmp_path / "sft", "chatml")
    save_tiny(tmp_path / "sft", "qwen2", vocab_size=len(tok), bos_token_id=None)
    (tmp_path / "shortest.py").write_text("def reward(prompts, responses):\n"
                                          "    return [-float(len(r)) for r in responses]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    data.write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"count to {i}, then the end"} for i in range(24)])
    sampled, trained = {}, []

    def recording_generate(policy, prompts, *args, **kwargs):
        gen = iterate_generate(policy, prompts, *args, **kwargs)
        for p, responses, logps, reasons in zip(prompts, gen.responses, gen.token_logps, gen.finish_reasons):
            sampled[tuple(p)] = (responses, logps, reasons)
        return gen

    def recording_load_examples(*args):
        trained.extend(load_examples(*args))
        return trained
    iterate_generate, load_examples = sampler.generate, train_dpo.load_examples
    monkeypatch.setattr(sampler, "generate", recording_generate)  # what iterate.py's sampling calls
    monkeypatch.setattr(train_dpo, "load_examples", recording_load_examples)
    out = tmp_path / "run"
    iterate.main(["--output-dir", str(out), "--sft-model", str(tmp_path / "sft"), "--reward", "shortest:reward",
                  "--prompts", str(tmp_path / "prompts.jsonl"), "--iterations", "1", "--samples-per-prompt", "4",
                  "--max-new-tokens", "8", "--max-length", "128", "--batch-size", "8", "--grad-accum", "1",
                  "--eval-prompts", str(tmp_path / "prompts.jsonl")])
    samples = [json.loads(line) for line in open(out / "iter1" / "samples.jsonl")]
    pairs = [json.loads(line) for line in open(out / "iter1" / "pairs.jsonl")]
    assert len(trained) == len(pairs) == sum(s["proxy_pair"] is not None for s in samples) > 10  # none skipped
    ref = load_file(out / "iter1" / "policy" / "ref_logps.safetensors")
    eos, cut_off = tok.eos_token_id, {False: 0, True: 0}
    for k, (pair, s) in enumerate(zip(trained, (s for s in samples if s["proxy_pair"]))):
        responses, logps, reasons = sampled[tuple(pair.prompt_ids)]
        a, b = s["proxy_pair"]
        assert (pair.chosen_ids, pair.rejected_ids) == (responses[a], responses[b])
        for ids, i, column in [(pair.chosen_ids, a, "chosen"), (pair.rejected_ids, b, "rejected")]:
            truncated = reasons[i] == "length"
            assert (ids[-1] == eos) != truncated and (len(ids) == 8 or not truncated)
            torch.testing.assert_close(ref[f"{column}_logps"][k], torch.tensor(logps[i]).sum(), atol=1e-4, rtol=0)
            cut_off[truncated] += 1
    assert min(cut_off.values()) > 0  # both kinds were trained on
    metrics = json.load(open(out / "iter1" / "metrics.json"))
    share = sum(r == "length" for _, _, reasons in sampled.values() for r in reasons) / (4 * 24)
    assert metrics["truncated"] == share > 0.25
    printed = capsys.readouterr().out
    assert f"warning: iteration 1: {share:.0%} of the samples were cut off" in printed
    assert f"{share:.0%} of samples cut off" in printed
    # stdout is not a terminal here (a log file): every stage says what it does, with plain progress lines
    steps = json.load(open(out / "iter1" / "policy" / "eval.json"))["step"]
    for line in ["iter1 sampling 4 x 24", "iter1 sampling: prompt 24/24", "iter1 scoring 96 responses",
                 f"iter1 dpo: step {steps}/{steps} loss", "evaluation: policy 2/2 done iter1"]:
        assert line in printed, line
