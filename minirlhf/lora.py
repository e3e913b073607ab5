"""LoRA (Hu et al. 2021) and QLoRA's 4-bit NormalFloat frozen base (Dettmers et al. 2023), by hand.

LoRA freezes a linear layer's W (out, in) and learns a low-rank update: y = W x + scaling * B A dropout(x), with A
(r, in) Kaiming-uniform, B (out, r) zero, so the adapted model starts equal to the base; scaling = alpha / r
(rsLoRA, Kalajdzievski 2023: alpha / sqrt(r)). Only A, B (and a reward model's `score` head) train, so the
optimizer state and the checkpoints hold only them. Adapters are saved in PEFT's layout (adapter_config.json,
adapter_model.safetensors with keys `base_model.model.<module>.lora_A.weight`), which `peft.PeftModel` loads, and
PEFT's adapters load here; merging writes W + scaling * B A back as a plain checkpoint.

QLoRA stores every frozen block linear as NF4: the weight flattened row-major into blocks of 64, each scaled by
its absmax into [-1, 1] and rounded to the nearest of 16 levels (quantiles of N(0, 1), QLoRA sec. 3), two codes
per byte, high nibble first, as bitsandbytes lays it out; `double_quant` stores the absmaxes themselves in 8 bits
(blocks of 256, bitsandbytes' dynamic map, after subtracting their mean). The forward dequantises the weight on
the fly (plain torch ops, CPU or GPU, no Triton) and multiplies in the compute dtype; LoRA sits on top.
"""
import contextlib
import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from minirlhf import dist
from minirlhf.model import CausalLM, RewardModel
from minirlhf.rundir import UserError

DEFAULT_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
PEFT_PREFIX = "base_model.model."  # PeftModel.base_model (LoraModel) .model (the HF model)
NF4_LEVELS = torch.tensor([  # bitsandbytes get_4bit_type("nf4"): 7 negative, 0, 8 positive normal quantiles
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0])
NF4_BLOCK, ABSMAX_BLOCK = 64, 256


def dynamic_map():
    """bitsandbytes' signed 8-bit dynamic map (Dettmers 2015): for e = 0..6, the midpoints of 2^e equal steps of
    [0.1, 1] times 10^(e-6), both signs, plus 0 and 1; 256 sorted values."""
    values = [0.0, 1.0]
    for e in range(7):
        edges = torch.linspace(0.1, 1, 2 ** e + 1)
        mids = (10 ** (e - 6)) * ((edges[:-1] + edges[1:]) / 2.0)
        values += mids.tolist() + (-mids).tolist()
    return torch.tensor(sorted(values))


def blockwise_quantize(x, levels, block):
    """Flat x -> (codes (n,) int64 into `levels`, absmax (ceil(n/block),) fp32): each block scaled by the
    reciprocal of its absmax, then rounded to the nearest level (a tie goes to the lower one, as in bitsandbytes)."""
    n = x.numel()
    blocks = F.pad(x.float().flatten(), (0, -n % block)).view(-1, block)
    absmax = blocks.abs().amax(1)
    scaled = (blocks * (1 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1)
    levels = levels.to(x.device)
    return torch.bucketize(scaled, (levels[1:] + levels[:-1]) / 2).flatten()[:n], absmax


def nf4_quantize(weight, double_quant=False) -> dict:
    """weight (out, in) -> {"codes": (ceil(n/64)*32,) uint8, two NF4 codes a byte, "absmax": fp32 per block of
    64}; with `double_quant` "absmax" is uint8 codes of (absmax - absmax_offset) into `dynamic_map` scaled per
    256 by "absmax_scale" (bitsandbytes' compress_statistics)."""
    codes, absmax = blockwise_quantize(weight, NF4_LEVELS, NF4_BLOCK)
    codes = F.pad(codes, (0, -codes.numel() % NF4_BLOCK)).view(-1, 2)
    out = {"codes": (codes[:, 0] << 4 | codes[:, 1]).to(torch.uint8), "absmax": absmax}
    if double_quant:
        offset = absmax.mean()
        qabsmax, scale = blockwise_quantize(absmax - offset, dynamic_map(), ABSMAX_BLOCK)
        out.update(absmax=qabsmax.to(torch.uint8), absmax_scale=scale, absmax_offset=offset)
    return out


def nf4_absmax(q):
    """The fp32 absmax per block of 64; with double quantisation dynamic_map[code] * the scale of its block of
    256, plus the mean."""
    absmax = q["absmax"]
    if "absmax_offset" not in q:
        return absmax
    n, scaled = absmax.numel(), dynamic_map().to(absmax.device)[absmax.long()]
    return (F.pad(scaled, (0, -n % ABSMAX_BLOCK)).view(-1, ABSMAX_BLOCK) * q["absmax_scale"][:, None]).flatten()[:n] \
        + q["absmax_offset"]


def nf4_dequantize(q, shape, dtype=torch.float32):
    """Inverse of `nf4_quantize`: level[code] * absmax of its block, in fp32, cast to `dtype` -> (out, in)."""
    absmax = nf4_absmax(q)
    codes = torch.stack([q["codes"] >> 4, q["codes"] & 15], 1).long()  # (bytes, 2): high nibble first
    values = NF4_LEVELS.to(absmax.device)[codes].view(-1, NF4_BLOCK) * absmax[:, None]
    return values.flatten()[:math.prod(shape)].view(shape).to(dtype)


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is NF4 buffers (FSDP2 shards parameters only: these stay replicated)."""

    def __init__(self, linear: nn.Linear, double_quant=False):
        super().__init__()
        self.in_features, self.out_features, self.dtype = linear.in_features, linear.out_features, linear.weight.dtype
        for name, tensor in nf4_quantize(linear.weight.detach(), double_quant).items():
            self.register_buffer(name, tensor)
        self.bias = linear.bias

    def dequantized(self, dtype):
        return nf4_dequantize(dict(self.named_buffers()), (self.out_features, self.in_features), dtype)

    def forward(self, x):
        return F.linear(x, self.dequantized(x.dtype), self.bias)


class LoRALinear(nn.Module):
    """base_layer(x) + scaling * lora_B(lora_A(dropout(x))); `enabled = False` gives the base alone. Names
    mirror PEFT's modules, so state_dict keys are PEFT's on-disk keys without their prefix."""

    def __init__(self, base_layer, r, alpha, dropout, rslora, generator):
        super().__init__()
        plain = isinstance(base_layer, nn.Linear)
        kw = dict(device=(base_layer.weight if plain else base_layer.codes).device,
                  dtype=base_layer.weight.dtype if plain else base_layer.dtype)
        self.base_layer, self.enabled = base_layer, True
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, **kw)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, **kw)
        with torch.no_grad():  # PEFT's (and nn.Linear's) init for A, zero B: the adapted model equals the base
            self.lora_A.weight.copy_(nn.init.kaiming_uniform_(torch.empty(r, base_layer.in_features), a=math.sqrt(5),
                                                              generator=generator))
            self.lora_B.weight.zero_()
        self.lora_dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.scaling = alpha / (math.sqrt(r) if rslora else r)

    def forward(self, x):
        y = self.base_layer(x)
        if not self.enabled:
            return y
        return y + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling


def add_lora(model, rank, alpha=None, targets=DEFAULT_TARGETS, dropout=0.0, rslora=False, quantize=None,
             double_quant=False, base_model_name_or_path=None, seed=0):
    """Freeze `model`, store its block linears as NF4 if `quantize == "nf4"`, wrap the `targets` (module-name
    suffixes, as PEFT matches them) in LoRALinear; a reward model's `score` head trains in full. In place."""
    targets = [t for t in (targets.split(",") if isinstance(targets, str) else targets) if t]
    alpha = rank if alpha is None else alpha
    model.requires_grad_(False)
    generator, matched = torch.Generator().manual_seed(seed), set()
    for name, module in list(model.model.layers.named_modules()):
        for child_name, child in list(module.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            layer = NF4Linear(child, double_quant) if quantize == "nf4" else child
            full = f"{name}.{child_name}"
            hit = [t for t in targets if full == t or full.endswith("." + t)]
            matched.update(hit)
            setattr(module, child_name, LoRALinear(layer, rank, alpha, dropout, rslora, generator) if hit else layer)
    if set(targets) - matched:
        raise UserError(f"--lora-targets {sorted(set(targets) - matched)} match no linear layer of the model "
                        f"(its layers: {DEFAULT_TARGETS})")
    reward = isinstance(model, RewardModel)
    if reward:
        model.score.requires_grad_(True)
    model.lora_config = {
        "peft_type": "LORA", "task_type": "SEQ_CLS" if reward else "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
        "target_modules": targets, "lora_dropout": dropout, "bias": "none", "use_rslora": rslora,
        "fan_in_fan_out": False, "modules_to_save": ["score"] if reward else None, "init_lora_weights": True,
        "inference_mode": True, "base_model_name_or_path": base_model_name_or_path}
    return model


def is_lora(model):
    return hasattr(model, "lora_config")


@contextlib.contextmanager
def adapters_off(model):
    """The base network (adapters switched off), e.g. as the DPO reference: no second model in memory."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for m in layers:
            m.enabled = True


def trainable_names(model):
    return [name for name, p in model.named_parameters() if p.requires_grad]


def adapter_files(model, state):
    """(adapter_config.json dict, adapter_model.safetensors tensors) from a full or trainable-only state dict."""
    return model.lora_config, {PEFT_PREFIX + k: state[k] for k in trainable_names(model)}


def write_adapter(folder, config, tensors, dtype=None):
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    save_file({k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in tensors.items()},
              os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})


def read_adapter_config(folder):
    """adapter_config.json of a PEFT LoRA folder, checked for what this module implements."""
    path = os.path.join(folder, "adapter_config.json")
    with open(path) as f:
        cfg = json.load(f)
    unsupported = [k for k in ("rank_pattern", "alpha_pattern", "use_dora", "fan_in_fan_out", "layers_to_transform",
                               "lora_bias") if cfg.get(k)]
    if cfg.get("peft_type") != "LORA" or unsupported or cfg.get("bias", "none") != "none" \
            or not isinstance(cfg.get("target_modules"), list):
        raise UserError(f"{path}: only plain LoRA adapters load (peft_type LORA, bias none, target_modules a "
                        f"list); unsupported: {unsupported or [cfg.get('peft_type'), cfg.get('bias'), cfg.get('target_modules')]}")
    return cfg


def load_adapter(model, folder):
    """adapter_model.safetensors of `folder` into a LoRA `model`: every trainable tensor must be there (PEFT
    itself loads with strict=False and would leave a misnamed B at zero)."""
    path = os.path.join(folder, "adapter_model.safetensors")
    tensors = {k.removeprefix(PEFT_PREFIX).replace(".default.", "."): v for k, v in load_file(path).items()}
    expected = set(trainable_names(model))
    if expected != set(tensors):
        raise UserError(f"{path}: tensors do not match the adapter config: missing "
                        f"{sorted(expected - set(tensors))[:4]}, unexpected {sorted(set(tensors) - expected)[:4]}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in tensors.items():
            if v.shape != params[k].shape:
                raise UserError(f"{path}: {k} has shape {tuple(v.shape)}, the model expects {tuple(params[k].shape)}")
            params[k].copy_(v)
    return model


def merged_state_dict(model, state):
    """A LoRA (and NF4) model's full state dict -> the plain model's: NF4 weights dequantised, W + scaling B A."""
    out, modules = dict(state), dict(model.named_modules())
    for name, m in modules.items():
        if isinstance(m, NF4Linear):
            q = {k: out.pop(f"{name}.{k}") for k, _ in m.named_buffers()}
            out[f"{name}.weight"] = nf4_dequantize(q, (m.out_features, m.in_features), m.dtype)
    for name, m in modules.items():
        if isinstance(m, LoRALinear):
            for k in [k for k in out if k.startswith(f"{name}.base_layer.")]:
                out[f"{name}.{k.removeprefix(f'{name}.base_layer.')}"] = out.pop(k)
            A, B, W = out.pop(f"{name}.lora_A.weight"), out.pop(f"{name}.lora_B.weight"), out[f"{name}.weight"]
            out[f"{name}.weight"] = (W.float() + m.scaling * (B.float() @ A.float())).to(W.dtype)
    return out


def merge_lora(model):
    """A plain CausalLM / RewardModel computing what the LoRA `model` computes (up to float rounding)."""
    with torch.device("meta"):
        plain = (RewardModel if isinstance(model, RewardModel) else CausalLM)(model.config)
    plain.load_state_dict(merged_state_dict(model, model.state_dict()), assign=True, strict=True)
    return plain


def from_args(model, args, model_path, resume_ckpt=None):
    """The trainers' --lora-* / --quantize flags applied to a loaded `model` (unchanged without --lora-rank);
    with `resume_ckpt`, the adapter saved there."""
    if not args.lora_rank:
        if args.quantize != "none" or args.merge_lora:
            raise UserError("--quantize and --merge-lora need --lora-rank (QLoRA / LoRA)")
        return model
    if args.lora_dropout:  # dropout draws from the global RNG: seeded, a run repeats (resume restores the state)
        torch.manual_seed(args.seed + dist.get_rank())
    add_lora(model, args.lora_rank, args.lora_alpha, args.lora_targets, args.lora_dropout, args.use_rslora,
             args.quantize, args.double_quant, os.path.abspath(model_path), args.seed)
    return load_adapter(model, resume_ckpt) if resume_ckpt else model
