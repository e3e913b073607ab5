"""Loading and saving Hugging Face checkpoint folders: round trips through `transformers`, shards, dtypes, errors."""
import json
import os

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from minirlhf import checkpoint
from minirlhf.checkpoint import load_model, save_model, weight_files
from tiny import ragged_batch, save_tiny


@pytest.mark.parametrize("family", ["llama3.2", "qwen3", "mistral"])
def test_round_trip_through_transformers(tmp_path, family):
    save_tiny(tmp_path / "src", family)
    model = load_model(tmp_path / "src").eval()
    save_model(model, tmp_path / "out")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids, mask = ragged_batch([6, 3], "left")
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids, attention_mask=mask).logits[mask.bool()],
                           transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "src")(
                               input_ids=ids, attention_mask=mask).logits[mask.bool()])
        torch.testing.assert_close(model(ids, mask)[mask.bool()],
                                   reloaded(input_ids=ids, attention_mask=mask).logits[mask.bool()], atol=1e-4, rtol=0)


def test_reward_model_round_trip_and_new_head(tmp_path):
    save_tiny(tmp_path / "lm", "llama3")
    reward_model = load_model(tmp_path / "lm", kind="reward", seed=3).eval()  # causal LM -> new score head
    assert reward_model.score.weight.abs().sum() > 0
    save_model(reward_model, tmp_path / "rm")
    config = json.load(open(tmp_path / "rm" / "config.json"))
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["num_labels"] == 1
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    ids, mask = ragged_batch([6, 3, 4], "right")
    with torch.no_grad():
        torch.testing.assert_close(reward_model(ids, mask), hf(input_ids=ids, attention_mask=mask).logits[:, 0],
                                   atol=1e-4, rtol=0)


def test_sharded_save_and_load(tmp_path):
    save_tiny(tmp_path / "src", "llama3")
    model = load_model(tmp_path / "src").eval()
    save_model(model, tmp_path / "sharded", max_shard_bytes=20_000)
    files = weight_files(tmp_path / "sharded")
    assert len(files) > 2 and os.path.isfile(tmp_path / "sharded" / "model.safetensors.index.json")
    again = load_model(tmp_path / "sharded")
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "sharded").eval()
    ids, _ = ragged_batch([5], "right")
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(input_ids=ids).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_load(tmp_path, dtype):
    save_tiny(tmp_path, "qwen2")
    full = load_model(tmp_path).eval()
    half = load_model(tmp_path, dtype=dtype).eval()
    assert all(p.dtype == dtype for p in half.parameters())
    ids, mask = ragged_batch([7, 4], "left")
    with torch.no_grad():
        err = (half(ids, mask).float() - full(ids, mask))[mask.bool()].abs().max()
    assert err < 0.1  # bf16 has 8 bits of mantissa; a wrong layout would be off by O(1)


def test_save_is_atomic_and_replaces(tmp_path):
    save_tiny(tmp_path / "src", "llama3")
    model = load_model(tmp_path / "src")
    save_model(model, tmp_path / "out")
    with torch.no_grad():
        model.model.norm.weight.mul_(2)
    save_model(model, tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["out", "src"]  # no temporary folders left behind
    assert torch.equal(load_model(tmp_path / "out").model.norm.weight, model.model.norm.weight)


def test_tokenizer_saved_beside_weights(tmp_path, tokenizer):
    save_tiny(tmp_path / "src", "llama3", vocab_size=len(tokenizer))
    save_model(load_model(tmp_path / "src"), tmp_path / "out", tokenizer=tokenizer)
    again = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert again.chat_template == tokenizer.chat_template and len(again) == len(tokenizer)


def test_unsupported_model_type(tmp_path):
    save_tiny(tmp_path, "llama3")
    config = json.load(open(tmp_path / "config.json"))
    json.dump({**config, "model_type": "gpt2"}, open(tmp_path / "config.json", "w"))
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        load_model(tmp_path)


def test_unsupported_rope_type(tmp_path):
    save_tiny(tmp_path, "llama3", rope_scaling=dict(rope_type="yarn", factor=4.0, rope_theta=1e4,
                                                     original_max_position_embeddings=64))
    with pytest.raises(ValueError, match="rope_type 'yarn'"):
        load_model(tmp_path)


def test_missing_weight_file(tmp_path):
    save_tiny(tmp_path, "llama3")
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="no model.safetensors"):
        load_model(tmp_path)


def test_missing_shard(tmp_path):
    save_tiny(tmp_path / "src", "llama3")
    save_model(load_model(tmp_path / "src"), tmp_path / "out", max_shard_bytes=20_000)
    os.remove(weight_files(tmp_path / "out")[1])
    with pytest.raises(ValueError, match=r"index.json: lists shard\(s\) that do not exist.*model-00002"):
        load_model(tmp_path / "out")


@pytest.mark.parametrize("option,match", [
    (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
    (dict(quantization_config={"quant_method": "gptq"}), "quantization_config"),
])
def test_unsupported_options(tmp_path, option, match):
    save_tiny(tmp_path, "llama3")
    config = json.load(open(tmp_path / "config.json"))
    json.dump({**config, **option}, open(tmp_path / "config.json", "w"))
    with pytest.raises(ValueError, match=match):
        load_model(tmp_path)


def test_qwen_sliding_window_is_refused(tmp_path):
    save_tiny(tmp_path, "qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=1)
    with pytest.raises(ValueError, match="use_sliding_window=true"):
        load_model(tmp_path)


def test_unexpected_tensor(tmp_path):
    """A q_proj bias under a config without attention_bias would be dropped silently and give another model."""
    save_tiny(tmp_path, "llama3")
    state = load_file(tmp_path / "model.safetensors")
    state["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(32)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="unexpected tensor model.layers.0.self_attn.q_proj.bias"):
        load_model(tmp_path)


def test_kill_between_the_two_renames_is_recovered(tmp_path):
    """replace_dir renames the old folder away, then the new one in; a kill in between leaves only .NAME.old,
    which recover_dir puts back, and the next replace_dir clears."""
    save_tiny(tmp_path / "src", "llama3")
    model = load_model(tmp_path / "src")
    save_model(model, tmp_path / "out")
    os.replace(tmp_path / "out", tmp_path / ".out.old")  # the state right after the first rename
    checkpoint.recover_dir(tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["out", "src"]
    assert torch.equal(load_model(tmp_path / "out").model.norm.weight, model.model.norm.weight)
    os.makedirs(tmp_path / ".out.old")  # a stale leftover does not block the next save
    save_model(model, tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["out", "src"]


def test_missing_tensor(tmp_path):
    save_tiny(tmp_path, "llama3")
    state = load_file(tmp_path / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj.weight"):
        load_model(tmp_path)


def test_shape_mismatch(tmp_path):
    save_tiny(tmp_path, "llama3")
    config = json.load(open(tmp_path / "config.json"))
    json.dump({**config, "intermediate_size": 64}, open(tmp_path / "config.json", "w"))
    with pytest.raises(ValueError, match=r"mlp\..*_proj.weight has shape \((48, 32|32, 48)\), config.json implies"):
        load_model(tmp_path)


def test_init_model_is_seeded_and_loads_in_transformers(tmp_path):
    from minirlhf.model import init_model
    config = transformers.LlamaConfig(**{**__import__("tiny").COMMON}).to_dict()
    a, b, c = init_model(config, seed=1), init_model(config, seed=1), init_model(config, seed=2)
    assert torch.equal(a.model.layers[0].mlp.up_proj.weight, b.model.layers[0].mlp.up_proj.weight)
    assert not torch.equal(a.model.layers[0].mlp.up_proj.weight, c.model.layers[0].mlp.up_proj.weight)
    assert abs(a.model.embed_tokens.weight.std().item() - 0.2) < 0.02  # initializer_range of tiny.COMMON
    save_model(a, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids, _ = ragged_batch([5], "right")
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(ids), hf(input_ids=ids).logits, atol=1e-4, rtol=0)


def test_auto_map_is_not_copied_into_saved_configs(tmp_path):
    """A config's auto_map names remote-code classes: what we save is a plain transformers model without it."""
    save_tiny(tmp_path / "src", "llama3")
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    (tmp_path / "src" / "config.json").write_text(json.dumps(config | {"auto_map": {"AutoModel": "x.Y"}}))
    save_model(load_model(tmp_path / "src"), tmp_path / "out")
    assert "auto_map" not in json.loads((tmp_path / "out" / "config.json").read_text())


def test_checkpoint_saves_use_unique_temporary_names(tmp_path, monkeypatch):
    """Two saves into one folder never share a temporary name (two runs once did: .checkpoint.next), and none is
    left behind."""
    save_tiny(tmp_path / "src", "llama3")
    model = load_model(tmp_path / "src")
    optimizer = torch.optim.AdamW(model.parameters())
    names, real_save = [], checkpoint.save_model
    monkeypatch.setattr(checkpoint, "save_model",
                        lambda m, out, *a, **k: names.append(os.path.basename(out)) or real_save(m, out, *a, **k))
    for step in (1, 2):
        checkpoint.save_training_state(model, optimizer, None, tmp_path / "out", {"step": step, "world_size": 1})
    assert len(set(names)) == 2 and all(n.startswith(".checkpoint.tmp-") for n in names)
    assert os.listdir(tmp_path / "out") == ["checkpoint"]
