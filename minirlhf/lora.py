"""LoRA (Hu et al. 2021) and QLoRA's 4-bit NormalFloat frozen base (Dettmers et al. 2023), by hand.

LoRA freezes a linear W (out, in) and learns y = W x + (alpha / r) B A dropout(x) (Hu et al. eq. 3; rsLoRA: alpha /
sqrt(r)), A (r, in) Kaiming-uniform, B (out, r) zero, so the model starts equal to the base. Only A, B (and a reward
model's `score` head) train and are saved, in PEFT's layout: `peft.PeftModel` loads ours, and PEFT's load here.
QLoRA keeps the frozen block linears in NF4 (QLoRA sec. 3) as bitsandbytes does: the weight flattened row-major in
blocks of 64, each scaled by 1 / absmax and rounded to the nearest of 16 N(0, 1) quantiles, two codes a byte, high
nibble first; `double_quant`: the absmaxes minus their mean in 8 bits (dynamic map, blocks of 256). Plain torch.
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
from minirlhf.rundir import UserError, read_json

DEFAULT_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
PEFT_PREFIX = "base_model.model."  # PeftModel.base_model (LoraModel) .model (the HF model)
NF4_LEVELS = torch.tensor([  # bitsandbytes get_4bit_type("nf4"): 7 negative, 0, 8 positive normal quantiles
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0])
NF4_BLOCK, ABSMAX_BLOCK = 64, 256


# bitsandbytes' signed 8-bit dynamic map (Dettmers 2015) for double quantisation: for e = 0..6 the midpoints of 2^e
# equal steps of [0.1, 1] times +-10^(e-6), plus 0 and 1; 256 sorted values
_edges = [torch.linspace(0.1, 1, 2 ** e + 1) for e in range(7)]
_mids = [10 ** (e - 6) * ((edges[:-1] + edges[1:]) / 2.0) for e, edges in enumerate(_edges)]
DYNAMIC_MAP = torch.cat([torch.tensor([0.0, 1.0]), *_mids, *[-m for m in _mids]]).sort().values


def blockwise_quantize(x, levels, block):
    """x -> (codes (n,) into `levels`, absmax (blocks,)): x * (1 / absmax) to the nearest level, ties down (bnb)."""
    n, levels = x.numel(), levels.to(x.device)
    blocks = F.pad(x.float().flatten(), (0, -n % block)).view(-1, block)
    absmax = blocks.abs().amax(1)
    scaled = (blocks * (1 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1)
    return torch.bucketize(scaled, (levels[1:] + levels[:-1]) / 2).flatten()[:n], absmax


def nf4_quantize(weight, double_quant=False) -> dict:
    """weight (out, in) -> {"codes": (ceil(n/64)*32,) uint8, "absmax": fp32 per block of 64}; `double_quant`:
    "absmax" as uint8 codes of (absmax - absmax_offset) into DYNAMIC_MAP, scaled per 256 by "absmax_scale"."""
    codes, absmax = blockwise_quantize(weight, NF4_LEVELS, NF4_BLOCK)
    codes = F.pad(codes, (0, -codes.numel() % NF4_BLOCK)).view(-1, 2)
    out = {"codes": (codes[:, 0] << 4 | codes[:, 1]).to(torch.uint8), "absmax": absmax}
    if double_quant:
        offset = absmax.mean()
        qabsmax, scale = blockwise_quantize(absmax - offset, DYNAMIC_MAP, ABSMAX_BLOCK)
        out.update(absmax=qabsmax.to(torch.uint8), absmax_scale=scale, absmax_offset=offset)
    return out


def nf4_dequantize(q, shape, dtype=torch.float32):
    """Inverse of `nf4_quantize`: level[code] * absmax of its block, in fp32, cast to `dtype` -> (out, in)."""
    absmax, n = q["absmax"], q["absmax"].numel()
    if "absmax_offset" in q:  # 8-bit absmaxes: DYNAMIC_MAP[code] * the scale of their block of 256, + the mean
        scaled = F.pad(DYNAMIC_MAP.to(absmax.device)[absmax.long()], (0, -n % ABSMAX_BLOCK)).view(-1, ABSMAX_BLOCK)
        absmax = (scaled * q["absmax_scale"][:, None]).flatten()[:n] + q["absmax_offset"]
    codes = torch.stack([q["codes"] >> 4, q["codes"] & 15], 1).long()  # (bytes, 2): high nibble first
    values = NF4_LEVELS.to(absmax.device)[codes].view(-1, NF4_BLOCK) * absmax[:, None]
    return values.flatten()[:math.prod(shape)].view(shape).to(dtype)


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is NF4 buffers (FSDP2 shards parameters only: these stay replicated)."""
    def __init__(self, linear: nn.Linear, double_quant=False):
        super().__init__()
        self.in_features, self.out_features, self.bias = linear.in_features, linear.out_features, linear.bias
        self.weight_dtype = linear.weight.dtype
        for name, tensor in nf4_quantize(linear.weight.detach(), double_quant).items():
            self.register_buffer(name, tensor)

    def weight(self, dtype):
        return nf4_dequantize(dict(self.named_buffers()), (self.out_features, self.in_features), dtype)

    def forward(self, x):
        return NF4Matmul.apply(x, self)


class NF4Matmul(torch.autograd.Function):
    """F.linear(x, W, bias) with W dequantised for the product and again in backward, never saved: autograd would
    otherwise keep every layer's full-precision weight until backward (bitsandbytes' MatMul4Bit does the same)."""
    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return F.linear(x, layer.weight(x.dtype), layer.bias)

    @staticmethod
    def backward(ctx, grad):  # (..., out) -> (..., in); the frozen weight and bias get no gradient
        return grad @ ctx.layer.weight(grad.dtype), None


class LoRALinear(nn.Module):
    """base_layer(x) + scaling * lora_B(lora_A(dropout(x))) (the base alone while not `enabled`); PEFT's names."""
    def __init__(self, base_layer, r, alpha, dropout, rslora, generator):
        super().__init__()
        ref = base_layer.weight if isinstance(base_layer, nn.Linear) else base_layer.absmax
        kw = dict(bias=False, device=ref.device, dtype=getattr(base_layer, "weight_dtype", ref.dtype))
        self.base_layer, self.enabled, self.scaling = base_layer, True, alpha / (math.sqrt(r) if rslora else r)
        self.lora_A = nn.Linear(base_layer.in_features, r, **kw)
        self.lora_B = nn.Linear(r, base_layer.out_features, **kw)
        self.lora_dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        with torch.no_grad():  # A: nn.Linear's (and PEFT's) init from `generator`; B = 0: the model starts as the base
            self.lora_A.weight.copy_(nn.init.kaiming_uniform_(torch.empty(r, base_layer.in_features), a=math.sqrt(5),
                                                              generator=generator))
            self.lora_B.weight.zero_()

    def forward(self, x):
        y = self.base_layer(x)
        return y + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling if self.enabled else y


def add_lora(model, rank, alpha=None, targets=DEFAULT_TARGETS, dropout=0.0, rslora=False, quantize=None,
             double_quant=False, base_model_name_or_path=None, seed=0):
    """In place: freeze `model`, keep its block linears in NF4 if `quantize == "nf4"`, wrap the `targets` (name
    suffixes, matched as PEFT does) in LoRALinear; a reward model's `score` head trains in full."""
    targets = [t for t in (targets.split(",") if isinstance(targets, str) else targets) if t]
    alpha, generator, matched = rank if alpha is None else alpha, torch.Generator().manual_seed(seed), set()
    model.requires_grad_(False)
    for name, module in list(model.model.layers.named_modules()):
        for child_name, child in [(n, c) for n, c in module.named_children() if isinstance(c, nn.Linear)]:
            layer = NF4Linear(child, double_quant) if quantize == "nf4" else child
            hit = [t for t in targets if f".{name}.{child_name}".endswith("." + t)]
            matched.update(hit)
            setattr(module, child_name, LoRALinear(layer, rank, alpha, dropout, rslora, generator) if hit else layer)
    if set(targets) - matched:
        raise UserError(f"--lora-targets {sorted(set(targets) - matched)} match no linear layer ({DEFAULT_TARGETS})")
    if reward := isinstance(model, RewardModel):
        model.score.requires_grad_(True)
    model.lora_config = {  # adapter_config.json
        "peft_type": "LORA", "task_type": "SEQ_CLS" if reward else "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
        "target_modules": targets, "lora_dropout": dropout, "bias": "none", "use_rslora": rslora,
        "fan_in_fan_out": False, "modules_to_save": ["score"] if reward else None, "init_lora_weights": True,
        "inference_mode": True, "base_model_name_or_path": base_model_name_or_path}
    return model


@contextlib.contextmanager
def adapters_off(model):
    """The base network (adapters switched off), e.g. as the DPO reference: no second model in memory."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    try:
        for m in layers:
            m.enabled = False
        yield model
    finally:
        for m in layers:
            m.enabled = True


def trainable_names(model):
    return [name for name, p in model.named_parameters() if p.requires_grad]


def write_adapter(folder, model, state, dtype=None):
    """`model`'s adapter, its trainable tensors read from a full or trainable-only `state`, in PEFT's layout."""
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(model.lora_config, f, indent=2)
    save_file({PEFT_PREFIX + k: state[k].detach().to("cpu", dtype).contiguous() for k in trainable_names(model)},
              os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})


def read_adapter(folder):
    """adapter_config.json of a PEFT LoRA folder, its base_model_name_or_path a checkpoint folder here; None for a
    folder without one, or with config.json too (read as the merged model). What we do not implement is an error."""
    path = os.path.join(folder, "adapter_config.json")
    if os.path.isfile(os.path.join(folder, "config.json")) or not os.path.isfile(path):
        return None
    cfg = read_json(path)
    bad = [k for k in ("rank_pattern", "alpha_pattern", "use_dora", "fan_in_fan_out", "lora_bias",
                       "layers_to_transform") if cfg.get(k)]
    bad += [k for k, v in (("peft_type", "LORA"), ("bias", "none")) if cfg.get(k, v) != v]
    if bad or not isinstance(cfg.get("target_modules"), list):
        raise UserError(f"{path}: only plain LoRA on a list of target_modules loads; unsupported: {bad}")
    if not os.path.isdir(base := cfg.get("base_model_name_or_path") or ""):
        raise UserError(f"{path}: base_model_name_or_path {base!r} is not a checkpoint folder here")
    return cfg


def load_adapter(model, folder):
    """`folder`'s adapter into a LoRA `model`, every tensor checked (PEFT would leave a misnamed B at zero)."""
    path = os.path.join(folder, "adapter_model.safetensors")
    tensors = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(path).items()}
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    if params.keys() != tensors.keys() or any(v.shape != params[k].shape for k, v in tensors.items()):
        raise UserError(f"{path}: tensors {[(k, tuple(v.shape)) for k, v in tensors.items()][:4]}... do not match "
                        f"the adapter config's {[(k, tuple(p.shape)) for k, p in params.items()][:4]}...")
    for k, v in tensors.items():
        params[k].data.copy_(v)
    return model


def merged_state_dict(model, state):
    """A LoRA (and NF4) model's full state dict -> the plain model's: NF4 weights dequantised, W + scaling B A."""
    out, modules = dict(state), dict(model.named_modules())
    for name, m in modules.items():
        if isinstance(m, NF4Linear):
            q = {k: out.pop(f"{name}.{k}") for k, _ in m.named_buffers()}
            out[f"{name}.weight"] = nf4_dequantize(q, (m.out_features, m.in_features), m.weight_dtype)
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
    """The trainers' --lora-* flags applied to a loaded `model` (none: unchanged); with `resume_ckpt`, its adapter."""
    if not args.lora_rank:
        if args.quantize != "none" or args.merge_lora:
            raise UserError("--quantize and --merge-lora need --lora-rank (QLoRA / LoRA)")
        return model
    if args.lora_dropout:  # dropout draws from the global RNG: seeded, a run repeats (resume restores the state)
        torch.manual_seed(args.seed + dist.get_rank())
    add_lora(model, args.lora_rank, args.lora_alpha, args.lora_targets, args.lora_dropout, args.use_rslora,
             args.quantize, args.double_quant, os.path.abspath(model_path), args.seed)
    return load_adapter(model, resume_ckpt) if resume_ckpt else model
