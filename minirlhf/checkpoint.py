"""Hugging Face checkpoint folders in and out, with `safetensors` only, and atomic writes.

`load_model` reads `config.json` and `model.safetensors` (or the shards of `model.safetensors.index.json`)
straight into our modules, built on the meta device (no random init, no `transformers` model in between).
`save_model` writes the same layout back (sharded above `max_shard_bytes`) with the tokenizer, for `transformers`'
AutoModelFor*, into a temporary folder fsynced and renamed into place: a killed run leaves no half-written output.
`save_training_state` / `load_training_state`: what `--resume` needs (optimizer shards, RNG states, the step).
"""
import json
import os
import re
import shutil
import uuid

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor

from minirlhf import dist, lora
from minirlhf.rundir import UserError, atomic_write_json, claim, durable_replace, manifest, read_json, writing
from minirlhf.model import CausalLM, RewardModel, config_from_hf

# model_type -> (causal LM class, reward model class) names in transformers
ARCHITECTURES = {model_type: (f"{name}ForCausalLM", f"{name}ForSequenceClassification") for model_type, name in
                 (("llama", "Llama"), ("mistral", "Mistral"), ("qwen2", "Qwen2"), ("qwen3", "Qwen3"))}
# heads that the other kind of model does not load (and lm_head: tied embeddings saved twice)
OTHER_HEADS = ("lm_head.weight", "score.weight", "score.bias")


def read_config(path) -> dict:
    config_path = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise UserError(f"{path}: no such folder (expected a Hugging Face checkpoint folder)")
    if not os.path.isfile(config_path):
        raise UserError(f"{path}: no config.json (expected a Hugging Face checkpoint folder)")
    return read_json(config_path)


def weight_files(path) -> list[str]:
    """The safetensors files of a checkpoint folder: one file, or the shards named by the index."""
    single, index = os.path.join(path, "model.safetensors"), os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(single):
        return [single]
    if os.path.isfile(index):
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise UserError(f"{index}: no \"weight_map\" {{tensor name: shard file}}")
        shards = sorted(set(weight_map.values()))
        # a shard path is a name inside the folder, never a way to read other files
        if outside := [s for s in shards if os.path.isabs(s) or os.path.normpath(s).startswith("..")]:
            raise UserError(f"{index}: shard path(s) outside the checkpoint folder: {outside}")
        if missing := [s for s in shards if not os.path.isfile(os.path.join(path, s))]:
            raise UserError(f"{index}: lists shard(s) that do not exist: {missing}")
        return [os.path.join(path, s) for s in shards]
    raise UserError(f"{path}: no model.safetensors or model.safetensors.index.json "
                            "(minirlhf reads safetensors only, never pickled .bin weights)")


def score_outputs(hf: dict) -> int:
    """The outputs of a *ForSequenceClassification config (a reward model: its id2label), 0 for any other model
    (str(): "architectures" is null in some hub configs)."""
    return len(hf.get("id2label") or [0]) if "SequenceClassification" in str(hf.get("architectures")) else 0


def load_model(path, kind="causal", dtype=torch.float32, device="cpu", seed=0, num_labels=None):
    """A checkpoint as a `CausalLM` (kind="causal") or a `RewardModel` (kind="reward") of `num_labels` outputs, else
    a *ForSequenceClassification's id2label's, else 1; a new `score` head ~ N(0, initializer_range^2) seeded by `seed`
    (as in `transformers`). A PEFT LoRA adapter folder (adapter_config.json, no config.json): its base, merged."""
    if cfg := lora.read_adapter(path):
        model = lora.add_lora(load_model(cfg["base_model_name_or_path"], kind, dtype, device, seed), cfg["r"],
                              cfg.get("lora_alpha", 8), cfg["target_modules"], rslora=cfg.get("use_rslora", False))
        return lora.merge_lora(lora.load_adapter(model, path))
    hf = read_config(path)
    cfg = config_from_hf(hf, source=os.path.join(path, "config.json"))
    if kind == "reward" and num_labels is None:
        num_labels = score_outputs(hf) or 1
    with torch.device("meta"):
        model = CausalLM(cfg) if kind == "causal" else RewardModel(cfg, num_labels)
    expected, state = model.state_dict(), {}
    for file in weight_files(path):
        try:
            f = safe_open(file, framework="pt", device=str(device))
        except (SafetensorError, OSError) as e:  # its own message names no file
            raise UserError(f"{file}: not a readable safetensors file (truncated or empty?): {e}") from None
        with f:
            for name in f.keys():
                if name not in expected:
                    if name in OTHER_HEADS or name.endswith("rotary_emb.inv_freq"):
                        continue  # the head of the other kind (a reward model read as a causal LM), buffers
                    raise UserError(f"{file}: unexpected tensor {name}: config.json describes a model without "
                                    "it (check attention_bias, mlp_bias, tie_word_embeddings, model_type)")
                tensor = f.get_tensor(name)
                if tensor.shape != expected[name].shape:
                    raise UserError(f"{file}: tensor {name} has shape {tuple(tensor.shape)}, config.json implies "
                                    f"{tuple(expected[name].shape)}")
                state[name] = tensor.to(dtype)
    if kind == "reward" and "score.weight" not in state:
        score = torch.randn(num_labels, cfg.hidden_size, generator=torch.Generator().manual_seed(seed))
        state["score.weight"] = (score * hf.get("initializer_range", 0.02)).to(dtype).to(device)
    if missing := [name for name in expected if name not in state]:
        raise UserError(f"{path}: checkpoint is missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    model.load_state_dict(state, assign=True, strict=True)
    return model


def hf_config_for(model, tokenizer=None, dtype=None) -> dict:
    hf = dict(model.config.hf)
    hf.pop("auto_map", None)  # remote-code classes of the input checkpoint: what we save is plain transformers
    is_reward = isinstance(model, RewardModel)
    hf["architectures"] = [ARCHITECTURES[model.config.model_type][1 if is_reward else 0]]
    if dtype is not None:
        hf["dtype"] = str(dtype).removeprefix("torch.")
    if is_reward:  # K > 1: the attribute names a regression model's config carries (train_rm.py)
        K = model.score.out_features
        names = [(hf.get("id2label") or {}).get(str(i), f"LABEL_{i}") if K > 1 else "LABEL_0" for i in range(K)]
        hf.update(num_labels=K, id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    if hf.get("pad_token_id") is None and tokenizer is not None and tokenizer.pad_token_id is not None:
        hf["pad_token_id"] = tokenizer.pad_token_id  # transformers' reward models need it to find the last token
    return hf


def save_model(model, out_dir, tokenizer=None, state_dict=None, max_shard_bytes=5 * 2**30, extra_files=None,
               dtype=None, adapter=None):
    """`model` (or a gathered full `state_dict`) as a Hugging Face folder in `dtype` (default: its own), atomically,
    with `extra_files` {name: JSON object}; `adapter`: a LoRA state dict, its adapter beside (or alone: empty state)."""
    state = state_dict if state_dict is not None else model.state_dict()
    state = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in state.items()}
    dtype = next(iter(state.values())).dtype if state else dtype
    out_dir = os.path.abspath(out_dir)
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    tmp = os.path.join(os.path.dirname(out_dir), f".{os.path.basename(out_dir)}.tmp-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        with writing(out_dir):  # disk full: an error naming the folder, and no temporary left
            if adapter is not None:
                lora.write_adapter(tmp, model, adapter, dtype)
            shards, size = [{}], 0
            for name, tensor in state.items():
                nbytes = tensor.numel() * tensor.element_size()
                if shards[-1] and size + nbytes > max_shard_bytes:
                    shards, size = shards + [{}], 0
                shards[-1][name] = tensor
                size += nbytes
            files = {"config.json": hf_config_for(model, tokenizer, dtype)} if state else {}
            if len(shards) == 1 and state:
                save_file(shards[0], os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
            elif state:
                weight_map = {}
                for i, shard in enumerate(shards):
                    fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                    save_file(shard, os.path.join(tmp, fname), metadata={"format": "pt"})
                    weight_map.update({name: fname for name in shard})
                total = sum(t.numel() * t.element_size() for t in state.values())
                files["model.safetensors.index.json"] = {"metadata": {"total_size": total}, "weight_map": weight_map}
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            for fname, obj in {**files, **(extra_files or {})}.items():
                with open(os.path.join(tmp, fname), "w") as f:
                    json.dump(obj, f, indent=2)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, out_dir)
    return out_dir


def replace_dir(tmp, out_dir, keep_as=None):
    """Move the finished folder `tmp` to `out_dir`; an existing `out_dir` is renamed to `.NAME.old` first, then
    deleted (or renamed to `keep_as`); after a kill between the two renames `recover_dir` puts it back."""
    old = _old_name(out_dir)
    if os.path.exists(old):
        shutil.rmtree(old)
    if os.path.exists(out_dir):
        os.replace(out_dir, old)
    durable_replace(tmp, out_dir)
    if os.path.exists(old):
        os.replace(old, keep_as) if keep_as else shutil.rmtree(old)


def recover_dir(out_dir):
    """Undo a kill inside `replace_dir`: `out_dir` gone but its previous version whole under the .old name."""
    old = _old_name(out_dir)
    if not os.path.exists(out_dir) and os.path.exists(old):
        os.replace(old, out_dir)


def _old_name(out_dir):
    out_dir = os.path.abspath(out_dir)
    return os.path.join(os.path.dirname(out_dir), f".{os.path.basename(out_dir)}.old")


def weights_dtype(path) -> torch.dtype:
    """The dtype a checkpoint folder's weights are stored in (that of its first tensor, read from the header)."""
    if cfg := lora.read_adapter(path):
        return weights_dtype(cfg["base_model_name_or_path"])
    with safe_open(weight_files(path)[0], framework="pt") as f:
        code = f.get_slice(next(iter(f.keys()))).get_dtype()
    return {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(code, torch.float32)


def rng_state():
    return {"cpu": torch.get_rng_state()} | ({"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {})


def save_training_state(policy, optimizer, tokenizer, output_dir, train_state, extra_files=None, dtype=None, keep=1,
                        merge=False, rng=None):
    """OUTPUT/checkpoint, replaced whole: HF model (rank 0, in `dtype`; mid-run the fp32 master weights), optimizer
    shard and RNG state (`rng`, default: now) per rank, trainer_state.json. `keep` > 1: the previous one stays as
    OUTPUT/checkpoint-STEP, the oldest beyond keep - 1 go. A LoRA policy saves its adapter (`merge`: merged too)."""
    adapted = hasattr(policy, "lora_config")  # lora.add_lora
    full = dist.full_state_dict(policy, None if merge or not adapted else lora.trainable_names(policy))  # collective
    name = dist.all_gather_objects(uuid.uuid4().hex[:8])[0]
    tmp, rank = os.path.join(output_dir, f".checkpoint.tmp-{name}"), dist.get_rank()
    if dist.is_main():
        merged = (lora.merged_state_dict(policy, full) if merge else {}) if adapted else full
        save_model(policy, tmp, tokenizer, merged, extra_files=extra_files, dtype=dtype,
                   adapter=full if adapted else None)
    dist.barrier()
    state = {f"{name}/{k}": (v.to_local() if isinstance(v, DTensor) else v).detach().cpu().contiguous()
             for name, p in policy.named_parameters() for k, v in optimizer.state.get(p, {}).items()}
    save_file(state, os.path.join(tmp, f"optimizer.rank{rank}.safetensors"))
    save_file(rng or rng_state(), os.path.join(tmp, f"rng.rank{rank}.safetensors"))
    dist.barrier()
    if dist.is_main():
        atomic_write_json(os.path.join(tmp, "trainer_state.json"), train_state)
        ckpt, keep_as = os.path.join(output_dir, "checkpoint"), None
        previous = read_json(os.path.join(ckpt, "trainer_state.json"))
        if keep > 1 and previous is not None:
            keep_as = os.path.join(output_dir, f"checkpoint-{previous['step']}")
            claim(output_dir, [os.path.basename(keep_as)])  # ours before it exists (rundir.foreign_files)
            shutil.rmtree(keep_as, ignore_errors=True)
        replace_dir(tmp, ckpt, keep_as)
        for old in (kept := step_checkpoints(output_dir))[:max(0, len(kept) - (keep - 1))]:  # the oldest go
            shutil.rmtree(old)
    dist.barrier()


def step_checkpoints(output_dir) -> list[str]:
    """OUTPUT/checkpoint-STEP folders this program wrote (--save-total-limit; in the manifest), oldest first."""
    names = [n for n in manifest(output_dir)["files"] if re.fullmatch(r"checkpoint-\d+", n)
             and os.path.isdir(os.path.join(output_dir, n))]
    return [os.path.join(output_dir, n) for n in sorted(names, key=lambda n: int(n.split("-")[1]))]


def load_training_state(policy, optimizer, ckpt, device):
    """This rank's optimizer shard (back into DTensors under FSDP) and RNG state; returns trainer_state."""
    with open(os.path.join(ckpt, "trainer_state.json")) as f:
        train_state = json.load(f)
    if train_state["world_size"] != dist.world_size():
        raise UserError(f"{ckpt} was saved by {train_state['world_size']} ranks, each with its own optimizer "
                        f"shard: resume with the same world size (got {dist.world_size()})")
    saved = load_file(os.path.join(ckpt, f"optimizer.rank{dist.get_rank()}.safetensors"))
    for name, p in policy.named_parameters():
        state = {k.rsplit("/", 1)[1]: v for k, v in saved.items() if k.rsplit("/", 1)[0] == name}
        for k, v in state.items():
            if k != "step":  # AdamW keeps its step count on the CPU
                v = v.to(device)
                state[k] = DTensor.from_local(v, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()) \
                    if isinstance(p, DTensor) else v
        if state:
            optimizer.state[p] = state
    rng = load_file(os.path.join(ckpt, f"rng.rank{dist.get_rank()}.safetensors"))
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return train_state
