"""LoRA and QLoRA (minirlhf/lora.py) against their definitions and against PEFT and bitsandbytes: the adapted
model starts equal to the base and trains only its adapters, merging reproduces it, adapters round-trip with
PEFT (same logits both ways), NF4 round-trips within half a level step and matches bitsandbytes bit for bit,
QLoRA DPO learns, LoRA resumes exactly, and the OpenBezoar chain (QLoRA SFT, merge, SFT, merge, DPO) runs
through the scripts."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import train_dpo
from minirlhf import lora
from minirlhf.checkpoint import load_model, save_model
from minirlhf.data import write_jsonl
from test_train_dpo import synthetic_rows
from tiny import ragged_batch, save_tiny


def randomise_adapters(model, seed=1):
    """B = 0 at init makes every adapter a no-op; parity needs adapters that do something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


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
    save_model(model, tmp_path / "ours", state_dict={}, adapter=lora.adapter_files(model, model.state_dict()))
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
        config["base_model_name_or_path"] = "../base2"  # PEFT wrote the model's name; ours resolves beside it
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
    absmax_error = (lora.nf4_absmax(q) - absmax).abs()
    if double_quant:
        assert (absmax_error <= 0.9 / 128 * q["absmax_scale"].repeat_interleave(256)[:len(absmax)] + 1e-7).all()
    bound = (levels[1:] - levels[:-1]).max() / 2 * absmax * (1 + 1e-6) + absmax_error
    assert ((back - weight).flatten().view(-1, 64).abs() <= bound[:, None]).all()
    assert q["codes"].numel() == weight.numel() // 2 and q["codes"].dtype == torch.uint8
    bnb = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes not installable here (CPU builds "
                                                                "from 0.46)")
    packed, state = bnb.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    assert torch.equal(packed.flatten(), q["codes"])
    assert torch.equal(bnb.dequantize_4bit(packed, state), back)
    if double_quant:
        assert torch.equal(bnb.create_dynamic_map(), lora.dynamic_map())
        assert torch.equal(state.absmax, q["absmax"])


def test_qlora_dpo_learns_and_lora_resumes_exactly(base, tmp_path, monkeypatch):
    """QLoRA DPO (NF4 base, rank-8 adapters, reference = the base with adapters off) reaches train accuracy > 0.8;
    a LoRA run killed after step 2 and resumed ends where an uninterrupted one ends, and its checkpoint holds
    only the adapters."""
    d, _ = base
    write_jsonl(tmp_path / "train.jsonl", synthetic_rows(48, seed=0))
    common = ["--model", d / "model", "--train-data", tmp_path / "train.jsonl", "--lr", "2e-2", "--warmup-ratio", 0,
              "--max-length", 64, "--max-prompt-length", 32, "--eval-fraction", 0, "--batch-size", 8,
              "--grad-accum", 1, "--lora-rank", 8, "--lora-alpha", 16]
    common = list(map(str, common))
    out = train_dpo.main(common + ["--output-dir", str(tmp_path / "qlora"), "--epochs", "4", "--quantize", "nf4",
                                   "--double-quant", "--merge-lora"])
    log = [json.loads(line) for line in (tmp_path / "qlora/metrics.jsonl").read_text().splitlines()]
    print(f"QLoRA DPO: loss {log[0]['loss']:.3f} -> {log[-1]['loss']:.3f}, train accuracy of the last epoch "
          f"{sum(r['accuracy'] for r in log[-6:]) / 6:.2f}")
    assert abs(log[0]["loss"] - 0.6931) < 1e-3  # the reference is the policy at step 0
    assert sum(r["accuracy"] for r in log[-6:]) / 6 > 0.8 and log[-1]["loss"] < 0.5
    files = os.listdir(tmp_path / "qlora")
    assert {"adapter_config.json", "adapter_model.safetensors", "config.json", "model.safetensors"} <= set(files)
    assert out["step"] == 24
    # resume: killed after step 2 (checkpoint at step 2), then --resume, equals one run of 4 steps
    plain = common + ["--max-steps", "4", "--save-steps", "2", "--lora-dropout", "0.1"]
    train_dpo.main(plain + ["--output-dir", str(tmp_path / "one")])
    monkeypatch.setenv("MINIRLHF_FAIL_AFTER_STEP", "3")
    with pytest.raises(RuntimeError, match="simulated kill"):
        train_dpo.main(plain + ["--output-dir", str(tmp_path / "two")])
    monkeypatch.delenv("MINIRLHF_FAIL_AFTER_STEP")
    ckpt = load_file(tmp_path / "two/checkpoint/optimizer.rank0.safetensors")
    assert ckpt and all("lora_" in k for k in ckpt)
    assert not os.path.exists(tmp_path / "two/checkpoint/model.safetensors")
    train_dpo.main(plain + ["--output-dir", str(tmp_path / "two"), "--resume"])
    one, two = (load_file(tmp_path / f"{n}/adapter_model.safetensors") for n in ("one", "two"))
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(one[k], two[k], atol=1e-6, rtol=0)
