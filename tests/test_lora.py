"""LoRA and QLoRA (minirlhf/lora.py) against their definitions and against PEFT and bitsandbytes: the adapted
model starts equal to the base and trains only its adapters, merging reproduces it, adapters round-trip with
PEFT (same logits both ways), NF4 round-trips within half a level step and matches bitsandbytes bit for bit,
the OpenBezoar chain (QLoRA SFT, merge, SFT, merge, DPO) learns through the scripts, LoRA resumes exactly and
runs under FSDP2, and a LoRA reward model trains its head and loads in PEFT."""
import json
import os
import subprocess
import sys

import pytest
import torch
import transformers
from safetensors.torch import load_file

import train_dpo
import train_rm
from minirlhf import lora
from minirlhf.checkpoint import load_model, save_model
from minirlhf.data import write_jsonl
from test_train_dpo import ROOT, free_port, synthetic_rows
from tiny import ragged_batch, save_tiny

torch.set_num_threads(1)  # tiny models: a second thread gains nothing, and on a busy machine it is ruinous


def randomise_adapters(model, seed=1):
    """B = 0 at init makes every adapter a no-op; parity needs adapters that do something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer):
    d = tmp_path_factory.mktemp("lora")
    hf = save_tiny(d / "model", "llama3")
    tokenizer.save_pretrained(d / "model")
    return d, hf


def test_init_equals_base_only_adapters_train_and_merge_reproduces(base):
    d, _ = base
    ids, mask = ragged_batch([7, 5, 3], "right")
    plain = load_model(d / "model")
    with torch.no_grad():
        expected = plain(ids, mask)
        model = lora.add_lora(load_model(d / "model"), rank=4, alpha=8, targets="q_proj,v_proj,down_proj")
        assert torch.equal(model(ids, mask), expected)  # B = 0: exactly the base
        assert lora.trainable_names(model) == [f"model.layers.{i}.{m}.lora_{ab}.weight" for i in range(2) for m in
                                               ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj") for ab in "AB"]
        randomise_adapters(model)
        adapted = model(ids, mask)
        assert (adapted - expected).abs().max() > 1e-2
        with lora.adapters_off(model):
            assert torch.equal(model(ids, mask), expected)
        merged = lora.merge_lora(model)(ids, mask)
    print(f"max |logits diff| merged vs adapted: {(merged - adapted).abs().max():.2e}")
    assert (merged - adapted).abs().max() < 1e-5
    reward = lora.add_lora(load_model(d / "model", kind="reward"), rank=2, targets="o_proj")
    assert lora.trainable_names(reward)[-1] == "score.weight"  # the head trains in full
    with pytest.raises(lora.UserError, match="qproj"):
        lora.add_lora(load_model(d / "model"), rank=2, targets="qproj")


def test_adapters_round_trip_with_peft(base, tmp_path):
    """Our adapter under PeftModel.from_pretrained, and PEFT's adapter under our load_model, give our logits."""
    peft = pytest.importorskip("peft", reason="peft not installed (pip install -e '.[test]')")
    d, hf = base
    ids, mask = ragged_batch([7, 5, 3], "right")
    model = lora.add_lora(load_model(d / "model"), rank=4, alpha=16, targets="q_proj,k_proj,v_proj,o_proj,up_proj",
                          rslora=True, base_model_name_or_path=str(d / "model"))
    randomise_adapters(model)
    save_model(model, tmp_path / "ours", state_dict={}, adapter=model.state_dict())
    assert sorted(os.listdir(tmp_path / "ours")) == ["adapter_config.json", "adapter_model.safetensors"]
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in load_file(
        tmp_path / "ours/adapter_model.safetensors")
    with torch.no_grad():
        ours = model(ids, mask)
        theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "ours").eval()
        assert theirs.base_model.model.model.layers[1].self_attn.o_proj.lora_B["default"].weight.abs().max() > 0
        real = mask.bool()  # padded positions' logits are arbitrary in both
        diff_peft = (theirs(input_ids=ids, attention_mask=mask).logits - ours)[real].abs().max().item()
        # the other way: PEFT trains nothing here, so give its adapter values, save, load through load_model
        hf2 = save_tiny(tmp_path / "base2", "llama3", seed=3)
        theirs = peft.get_peft_model(hf2, peft.LoraConfig(r=3, lora_alpha=6, target_modules=["v_proj", "gate_proj"]))
        randomise_adapters(theirs, seed=2)
        theirs.save_pretrained(tmp_path / "peft")
        expected = theirs(input_ids=ids, attention_mask=mask).logits
        config = json.loads((tmp_path / "peft/adapter_config.json").read_text())
        config["base_model_name_or_path"] = str(tmp_path / "base2")  # PEFT wrote the model's name_or_path
        (tmp_path / "peft/adapter_config.json").write_text(json.dumps(config))
        diff_ours = (load_model(tmp_path / "peft")(ids, mask) - expected)[real].abs().max().item()
    print(f"max |logits diff|: PEFT loading ours {diff_peft:.2e}, ours loading PEFT's {diff_ours:.2e}")
    assert diff_peft < 1e-5 and diff_ours < 1e-5


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_round_trip_and_bitsandbytes(double_quant):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 200, generator=g) * torch.rand(48, 1, generator=g)  # 9600 = 150 blocks of 64
    q = lora.nf4_quantize(weight, double_quant)
    back = lora.nf4_dequantize(q, weight.shape)
    # the format's bound: half the widest gap between adjacent levels (0.152) times the block's absmax, plus (|level|
    # <= 1) the error of that absmax, which 8 bits hold within half the dynamic map's widest gap (0.9 / 128) times
    # the scale of its block of 256
    levels, absmax = lora.NF4_LEVELS, weight.flatten().view(-1, 64).abs().amax(1)
    ones = {**q, "codes": torch.full_like(q["codes"], 0xFF)}  # every code the level 1.0: each block's absmax
    absmax_error = (lora.nf4_dequantize(ones, weight.shape).flatten().view(-1, 64)[:, 0] - absmax).abs()
    if double_quant:
        assert (absmax_error <= 0.9 / 128 * q["absmax_scale"].repeat_interleave(256)[:len(absmax)] + 1e-7).all()
    bound = (levels[1:] - levels[:-1]).max() / 2 * absmax * (1 + 1e-6) + absmax_error
    assert ((back - weight).flatten().view(-1, 64).abs() <= bound[:, None]).all()
    assert q["codes"].numel() == weight.numel() // 2 and q["codes"].dtype == torch.uint8
    layer = lora.NF4Linear(torch.nn.Linear(200, 48), double_quant)  # its backward dequantises again: same gradient
    x = torch.randn(3, 200, generator=g, requires_grad=True)
    grads = [torch.autograd.grad(f(x).square().sum(), x)[0] for f in (layer, lambda x: torch.nn.functional.linear(
        x, lora.nf4_dequantize(dict(layer.named_buffers()), (48, 200)), layer.bias))]
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-6)
    bnb = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes not installable here (CPU builds "
                                                                "from 0.46)")
    packed, state = bnb.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    assert torch.equal(packed.flatten(), q["codes"])
    assert torch.equal(bnb.dequantize_4bit(packed, state), back)
    if double_quant:
        assert torch.equal(bnb.create_dynamic_map(), lora.DYNAMIC_MAP)
        assert torch.equal(state.absmax, q["absmax"])


def losses_of(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_openbezoar_chain_with_qlora(base, tmp_path):
    """OpenBezoar's recipe at toy scale through train_dpo.py: QLoRA SFT on one instruction set, merge, QLoRA SFT on
    a second, merge, QLoRA DPO against the merged SFT model (the base of the adapters, switched off). Each stage's
    loss falls, the DPO stage reaches train preference accuracy > 0.8, and each merged folder is a plain model."""
    d, _ = base
    rows = synthetic_rows(48, seed=0)
    write_jsonl(tmp_path / "set1.jsonl", [dict(prompt=r["prompt"], completion=r["prompt"][8:]) for r in rows])
    write_jsonl(tmp_path / "set2.jsonl", [dict(prompt=r["prompt"], completion="sure: " + r["prompt"][8:]) for r in rows])
    write_jsonl(tmp_path / "prefs.jsonl", rows)
    qlora = ["--lora-rank", 8, "--lora-alpha", 16, "--lora-targets", "q_proj,k_proj,v_proj,o_proj,up_proj",
             "--quantize", "nf4", "--double-quant", "--batch-size", 8, "--grad-accum", 1, "--warmup-ratio", 0,
             "--max-length", 64, "--max-prompt-length", 32, "--eval-fraction", 0]
    model, stages = d / "model", [("sft1", "sft", "set1", 3e-2, 2), ("sft2", "sft", "set2", 3e-2, 2),
                                  ("dpo", "dpo", "prefs", 3e-2, 3)]
    for name, loss, data, lr, epochs in stages:
        args = qlora + ["--loss", loss, "--model", model, "--train-data", tmp_path / f"{data}.jsonl", "--lr", lr,
                        "--epochs", epochs, "--output-dir", tmp_path / name] + ["--merge-lora"] * (loss == "sft")
        train_dpo.main(list(map(str, args)))
        log = losses_of(tmp_path / name)
        print(f"{name}: loss {log[0]:.3f} -> {log[-1]:.3f} over {len(log)} steps")
        assert log[-1] < 0.8 * log[0], name
        model = tmp_path / name
    assert abs(log[0] - 0.6931) < 1e-3  # the reference is the policy at step 0: the merged SFT model, quantised
    log = [json.loads(line) for line in (tmp_path / "dpo/metrics.jsonl").read_text().splitlines()]
    accuracy = sum(r["accuracy"] for r in log[-6:]) / 6
    print(f"dpo: train preference accuracy of the last epoch {accuracy:.2f}")
    assert accuracy > 0.8
    assert {"adapter_config.json", "adapter_model.safetensors", "config.json"} <= set(os.listdir(tmp_path / "sft2"))
    assert "config.json" not in os.listdir(tmp_path / "dpo")  # no --merge-lora: the adapter alone
    assert json.loads((tmp_path / "dpo/adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(tmp_path / "sft2")
    load_model(tmp_path / "dpo")  # the adapter folder loads as its base, merged


def test_lora_resumes_exactly_and_checkpoints_hold_only_the_adapters(base, tmp_path, monkeypatch):
    """LoRA with dropout, killed after step 3 (checkpoint at step 2) and resumed, ends where one run ends: the
    dropout masks of the redone step are drawn again from the RNG state of its start."""
    d, _ = base
    write_jsonl(tmp_path / "train.jsonl", synthetic_rows(32, seed=0))
    common = list(map(str, ["--model", d / "model", "--train-data", tmp_path / "train.jsonl", "--lr", "2e-2",
                            "--warmup-ratio", 0, "--max-length", 64, "--max-prompt-length", 32, "--eval-fraction", 0,
                            "--batch-size", 8, "--grad-accum", 1, "--lora-rank", 4, "--lora-dropout", 0.1,
                            "--max-steps", 4, "--save-steps", 2]))
    train_dpo.main(common + ["--output-dir", str(tmp_path / "one")])
    monkeypatch.setenv("MINIRLHF_FAIL_AFTER_STEP", "3")
    with pytest.raises(RuntimeError, match="simulated kill"):
        train_dpo.main(common + ["--output-dir", str(tmp_path / "two")])
    monkeypatch.delenv("MINIRLHF_FAIL_AFTER_STEP")
    optimizer_state = load_file(tmp_path / "two/checkpoint/optimizer.rank0.safetensors")
    assert optimizer_state and all("lora_" in k for k in optimizer_state)
    assert "model.safetensors" not in os.listdir(tmp_path / "two/checkpoint")
    train_dpo.main(common + ["--output-dir", str(tmp_path / "two"), "--resume"])
    one, two = (load_file(tmp_path / f"{n}/adapter_model.safetensors") for n in ("one", "two"))
    assert one.keys() == two.keys() and len(one) == 2 * 2 * 7
    for k in one:
        torch.testing.assert_close(one[k], two[k], atol=1e-6, rtol=0)
    assert losses_of(tmp_path / "one") == losses_of(tmp_path / "two")


@pytest.mark.slow
def test_qlora_under_two_fsdp_processes_equals_one(base, tmp_path):
    """torchrun with 2 gloo ranks (FSDP2 shards the adapters and the frozen norms and embeddings; the NF4 buffers
    stay whole on each rank) ends where one process with the same global batch ends."""
    d, _ = base
    write_jsonl(tmp_path / "train.jsonl", synthetic_rows(16, seed=0))
    common = list(map(str, ["--model", d / "model", "--train-data", tmp_path / "train.jsonl", "--lr", "1e-2",
                            "--warmup-ratio", 0, "--max-length", 64, "--max-prompt-length", 32, "--eval-fraction", 0,
                            "--grad-accum", 1, "--lora-rank", 4, "--quantize", "nf4", "--max-steps", 3,
                            "--merge-lora"]))
    train_dpo.main(common + ["--batch-size", "8", "--output-dir", str(tmp_path / "one")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--master-addr=127.0.0.1", f"--master-port={free_port()}", os.path.join(ROOT, "train_dpo.py"),
                           *common, "--batch-size", "4", "--output-dir", str(tmp_path / "two")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("adapter_model.safetensors", "model.safetensors"):
        one, two = (load_file(tmp_path / n / name) for n in ("one", "two"))
        assert one.keys() == two.keys()
        for k in one:
            torch.testing.assert_close(one[k], two[k], atol=1e-5, rtol=0, msg=k)


def test_lora_reward_model_trains_its_head_and_loads_in_peft(base, tmp_path):
    """train_rm.py with QLoRA: the score head trains in full beside the adapters, saved as PEFT's modules_to_save,
    and PeftModel (SEQ_CLS) on our adapter scores as our load_model of it does."""
    peft = pytest.importorskip("peft", reason="peft not installed (pip install -e '.[test]')")
    d, _ = base
    write_jsonl(tmp_path / "prefs.jsonl", synthetic_rows(40, seed=0))
    result = train_rm.main(list(map(str, [
        "--model", d / "model", "--train-data", tmp_path / "prefs.jsonl", "--output-dir", tmp_path / "rm", "--lr", 1e-2,
        "--lora-rank", 4, "--quantize", "nf4", "--batch-size", 8, "--grad-accum", 1, "--epochs", 3, "--max-length", 64,
        "--max-prompt-length", 32, "--eval-fraction", 0.2])))
    assert result["accuracy"] > 0.8
    assert json.loads((tmp_path / "rm/adapter_config.json").read_text())["modules_to_save"] == ["score"]
    ids, mask = ragged_batch([7, 5, 3], "right")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(d / "model", num_labels=1)
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "rm").eval()(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(load_model(tmp_path / "rm", kind="reward")(ids, mask), theirs[:, 0], atol=1e-5, rtol=0)
