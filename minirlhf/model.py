"""A Llama-family decoder written from scratch: Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5, Qwen3.

One network covers the family: RMSNorm, rotary position embeddings (RoPE, Su et al. 2021, with the
Llama 3.1 frequency scaling), grouped-query attention through `F.scaled_dot_product_attention`, and a SwiGLU
MLP. The families differ only by switches read from the Hugging Face `config.json` (q/k/v bias for Qwen2,
per-head q/k RMSNorm for Qwen3, a sliding window for Mistral v0.1, tied embeddings for Llama 3.2 and small
Qwens). Module names mirror `transformers`, so `state_dict()` keys are exactly the hub's keys.

Two heads on the same backbone: `CausalLM` (logits, final hidden states, or given `labels` per-token log-probs
from the fused op of `logprobs.py`, never (B, T, V) logits) and `RewardModel`, the Bradley-Terry r(x, y) of Dong
et al. 2024 (eq. 2; K outputs for a regression model) read at the last non-padding token, the layout of
`LlamaForSequenceClassification` (read at every position: PPO's value model). The KV-cache hook is one method,
`cache.update(layer_idx, k, v) -> (k_all, v_all)`; the sampler (`sampler.py`) owns the cache's layout.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from minirlhf.logprobs import fused_token_logps
from minirlhf.rundir import UserError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    sliding_window: int | None
    pad_token_id: int | None
    hf: dict  # the raw config.json, written back on save


def config_from_hf(d: dict, source: str = "config.json") -> ModelConfig:
    """Read a Hugging Face config dict (old `rope_theta`/`rope_scaling` or new `rope_parameters` form)."""
    def fail(what):
        raise UserError(f"{source}: unsupported {what}; minirlhf supports model_type in {SUPPORTED_MODEL_TYPES}")
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    if missing := [k for k in required if k not in d]:
        raise UserError(f"{source}: missing required field(s) {missing}")
    model_type = d.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        fail(f"model_type {model_type!r}")
    if d.get("hidden_act", "silu") != "silu":
        fail(f"hidden_act {d['hidden_act']!r} (only 'silu')")
    if d.get("quantization_config"):
        fail("quantization_config (load an unquantized checkpoint)")
    rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    rope_theta = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        fail(f"rope_type {rope_type!r} (supported: {SUPPORTED_ROPE_TYPES})")
    if model_type in ("qwen2", "qwen3") and d.get("use_sliding_window"):
        fail("use_sliding_window=true")
    heads = d["num_attention_heads"]
    attention_bias = bool(d.get("attention_bias", False))
    return ModelConfig(
        model_type=model_type, vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"], num_layers=d["num_hidden_layers"], num_heads=heads,
        num_kv_heads=d.get("num_key_value_heads") or heads,
        head_dim=d.get("head_dim") or d["hidden_size"] // heads, rms_norm_eps=d.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope_theta), rope_scaling=rope if rope_type != "default" else None,
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        qkv_bias=attention_bias or model_type == "qwen2", o_bias=attention_bias,
        mlp_bias=bool(d.get("mlp_bias", False)), qk_norm=model_type == "qwen3", pad_token_id=d.get("pad_token_id"),
        sliding_window=None if model_type in ("qwen2", "qwen3") else d.get("sliding_window"), hf=dict(d))


def rope_inv_freq(cfg: ModelConfig, device=None) -> torch.Tensor:
    """(head_dim/2,) fp32 inverse frequencies theta^(-2i/d), with Llama 3.1's smooth long-context scaling."""
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, device=device).float() / cfg.head_dim)
    if (s := cfg.rope_scaling) is None:
        return inv_freq
    if s.get("rope_type", s.get("type")) == "linear":
        return inv_freq / s["factor"]
    # llama3: long wavelengths are divided by `factor`, short ones kept, the band between interpolated.
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = ((old_len / wavelen - lo) / (hi - lo)).clamp(0, 1)
    return (1 - smooth) * inv_freq / factor + smooth * inv_freq


def apply_rope(x, cos, sin):
    """x (B, H, T, hd); cos, sin (B, 1, T, hd), sin with its first half negated (`Backbone.forward`).
    The rotate-half convention of the Hugging Face checkpoints, x * cos + cat(-x2, x1) * sin, with the sign
    moved into sin: cat(-x2, x1) * sin == roll(x, hd/2) * cat(-sin1, sin2), bit for bit, one op fewer."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


@dataclass
class PackedWeight:
    """MKL's pre-packed copy of a linear weight, or of several stacked along the output (`mkl_pack`)."""
    data: torch.Tensor  # opaque buffer in MKL's blocked layout
    shape: torch.Tensor  # (N, K) zero-stride stand-in: _mkl_linear reads only the shape of the original weight
    bias: torch.Tensor | None
    out_features: list[int]  # per stacked layer, to split the product back


def mkl_pack(weights, biases=None) -> PackedWeight:
    """Weights (N_i, K) of linears that share an input, and their biases (or None) -> stacked (N, K), packed."""
    weight = torch.cat([w.detach() for w in weights]) if len(weights) > 1 else weights[0].detach()
    bias = None if biases is None or biases[0] is None else torch.cat([b.detach() for b in biases])
    data = torch.ops.mkl._mkl_reorder_linear_weight(weight, 16)  # the layout does not depend on the rows
    return PackedWeight(data, weight.new_zeros(()).expand(weight.shape), bias, [w.shape[0] for w in weights])


PACKED_MAX_ROWS = 32  # measured in decode steps: faster up to 32 rows, slower from 64


def linear(x, weight, bias=None, packed=None):
    """F.linear(x, weight, bias); with `packed` (see `sampler.mkl_packed`), the same product by MKL's packed
    sgemm. Plain sgemm re-packs the weight into its blocked layout on every call, which costs as much as the
    multiply itself when x has a few tens of rows, as in a decode step."""
    rows = x.numel() // x.shape[-1]
    if packed is None or rows > PACKED_MAX_ROWS:
        return F.linear(x, weight, bias)
    return torch.ops.mkl._mkl_linear(x, packed.data, packed.shape, packed.bias, rows)


def linears(x, layers, packed=None):
    """[layer(x) for layer in layers] for layers that share their input (q/k/v, gate/up); with `packed`, their
    stacked weights in one packed matmul, split back. In a decode step one call for all costs less than three."""
    if packed is None or x.numel() // x.shape[-1] > PACKED_MAX_ROWS:
        return [layer(x) for layer in layers]
    return linear(x, None, packed=packed).split(packed.out_features, dim=-1)


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state_dict keys) that uses `packed` weights while the sampler sets them."""
    packed = None

    def forward(self, x):
        return linear(x, self.weight, self.bias, self.packed)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        # x * rsqrt(mean(x^2) + eps) in fp32 whatever the activation dtype, cast back, then scaled: the
        # reference implementations' order of operations, in one fused op
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class Attention(nn.Module):
    qkv_packed = None  # q/k/v weights stacked and MKL-packed, set by the sampler on CPU (see `linears`)

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        D, H, Hkv, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = Linear(D, H * hd, bias=cfg.qkv_bias)
        self.k_proj = Linear(D, Hkv * hd, bias=cfg.qkv_bias)
        self.v_proj = Linear(D, Hkv * hd, bias=cfg.qkv_bias)
        self.o_proj = Linear(H * hd, D, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm, self.k_norm = RMSNorm(hd, cfg.rms_norm_eps), RMSNorm(hd, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, kv_cache):
        (B, T, _), hd = x.shape, self.cfg.head_dim
        q, k, v = linears(x, (self.q_proj, self.k_proj, self.v_proj), self.qkv_packed)
        q, k, v = q.view(B, T, -1, hd), k.view(B, T, -1, hd), v.view(B, T, -1, hd).transpose(1, 2)
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q.transpose(1, 2), cos, sin), apply_rope(k.transpose(1, 2), cos, sin)  # (B, H|Hkv, T, hd)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, Hkv, S, hd), past included
        if T == 1 and mask is not None:  # decoding: a KV group's query heads attend as rows, K/V read once
            y = F.scaled_dot_product_attention(q.view(B, k.shape[1], -1, hd), k, v, attn_mask=mask).view(B, -1, 1, hd)
        else:  # mask None means plain causal attention with no padding: SDPA's flash path
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    gate_up_packed = None  # gate/up weights stacked and MKL-packed, set by the sampler on CPU

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D, F_, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj, self.up_proj = Linear(D, F_, bias=b), Linear(D, F_, bias=b)
        self.down_proj = Linear(F_, D, bias=b)

    def forward(self, x):
        gate, up = linears(x, (self.gate_proj, self.up_proj), self.gate_up_packed)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, kv_cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


def build_attention_mask(attention_mask, T, sliding_window=None):
    """(B, S) 0/1 key mask -> (B, 1, T, S) bool, True = attend. Queries are the last T of the S keys. A query
    may see a key iff the key is real, not in its future and (Mistral) inside the window. Each query also sees
    itself, so padded queries get a finite (ignored) output instead of NaN from an empty softmax."""
    B, S = attention_mask.shape
    q_idx = torch.arange(S - T, S, device=attention_mask.device)[:, None]  # (T, 1)
    k_idx = torch.arange(S, device=attention_mask.device)[None, :]  # (1, S)
    allowed = (k_idx <= q_idx) if sliding_window is None else (k_idx <= q_idx) & (k_idx > q_idx - sliding_window)
    mask = allowed[None] & attention_mask.bool()[:, None, :]  # (B, T, S)
    return (mask | (k_idx == q_idx)[None])[:, None]


class Backbone(nn.Module):
    """Embeddings, blocks and final norm: `model.*` in the Hugging Face layout."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gradient_checkpointing = False

    def forward(self, input_ids, attention_mask=None, position_ids=None, kv_cache=None):
        """Final hidden states (B, T, D). See `CausalLM.forward` for the arguments."""
        B, T = input_ids.shape
        if attention_mask is None and kv_cache is not None:
            raise ValueError("a kv_cache forward needs an attention_mask over all keys (cache + current)")
        if attention_mask is None and self.cfg.sliding_window is not None:
            attention_mask = torch.ones(B, T, dtype=torch.long, device=input_ids.device)
        if position_ids is None:
            if attention_mask is None or attention_mask.dim() != 2:
                position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
            else:  # left or right padding: a token's position counts the real tokens before it
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
        mask = attention_mask
        if attention_mask is not None and attention_mask.dim() == 2:
            no_padding = kv_cache is None and self.cfg.sliding_window is None and bool(attention_mask.all())
            mask = None if no_padding else build_attention_mask(attention_mask, T, self.cfg.sliding_window)
        inv_freq = rope_inv_freq(self.cfg, input_ids.device)
        freqs = position_ids[:, None, :, None].float() * inv_freq  # (B, 1, T, hd/2), fp32 like the reference
        x = self.embed_tokens(input_ids)
        cos = torch.cat((freqs.cos(), freqs.cos()), dim=-1).to(x.dtype)  # (B, 1, T, hd)
        sin = torch.cat((-freqs.sin(), freqs.sin()), dim=-1).to(x.dtype)  # sign of rotate-half: see apply_rope
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                # recompute each block's activations in backward: memory O(layers) instead of O(layers x acts)
                x = checkpoint(layer, x, cos, sin, mask, kv_cache, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, kv_cache)
        return self.norm(x)


class CausalLM(nn.Module):
    """The policy: backbone + LM head (`lm_head`, or the input embedding when tied)."""
    output_packed = None  # MKL-packed output weight (a PackedWeight), set by the sampler on CPU (see `linear`)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config, self.model = cfg, Backbone(cfg)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def output_weight(self):
        """(V, D) output embedding."""
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def forward(self, input_ids, attention_mask=None, position_ids=None, kv_cache=None, labels=None,
                return_hidden=False, temperature=1.0):
        """input_ids (B, T); attention_mask (B, S) 0/1 over all keys (cache + current) or a ready bool
        (B, 1, T, S) mask; position_ids (B, T) default from the mask. Returns logits (B, T, V), or hidden
        (B, T, D) if `return_hidden`, or fp32 token_logps (B, T) of `labels` (-100 = ignored, gives 0) under
        softmax(logits / temperature)."""
        h = self.model(input_ids, attention_mask, position_ids, kv_cache)
        if return_hidden:
            return h
        if labels is not None:
            # inside forward so that FSDP2 has gathered the (possibly tied) output weight right now
            return fused_token_logps(h if temperature == 1.0 else h / temperature, self.output_weight(), labels)
        return self.logits(h)

    def logits(self, h):
        """Hidden states (..., D) -> logits (..., V)."""
        return linear(h, self.output_weight(), packed=self.output_packed)


class RewardModel(nn.Module):
    """Reward model: backbone + `score` (D -> num_labels) read at the last non-padding token. num_labels 1: a
    Bradley-Terry reward; K > 1: one rating per attribute (HelpSteer2's regression model, train_rm.py)."""

    def __init__(self, cfg: ModelConfig, num_labels=1):
        super().__init__()
        self.config, self.model = cfg, Backbone(cfg)
        self.score = nn.Linear(cfg.hidden_size, num_labels, bias=False)

    def forward(self, input_ids, attention_mask=None, per_token=False):
        """input_ids, attention_mask (B, T) -> rewards (B,) fp32, or (B, num_labels) when num_labels > 1; with
        `per_token` a scalar head read at every position (B, T) fp32: PPO's value V(s_t) (train_ppo.py)."""
        h = self.model(input_ids, attention_mask)  # (B, T, D)
        if per_token:
            return self.score(h).float().sum(-1)
        B, T = input_ids.shape
        # transformers' rule: the rightmost real token that is not the pad id (when pad = EOS, the token before
        # a final EOS: where hub reward models were trained to answer); works for left and right padding
        real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        if self.config.pad_token_id is not None:
            real = real & (input_ids != self.config.pad_token_id)
        last = (real.long() * torch.arange(T, device=input_ids.device)).argmax(-1)
        # (B, 1) -> (B,) by a sum over the one column: exact, and a new tensor; a view (squeeze) returned by the
        # FSDP2 root makes it warn that in-place changes to it would escape autograd
        scores = self.score(h[torch.arange(B, device=h.device), last]).float()
        return scores.sum(-1) if scores.shape[-1] == 1 else scores


def init_model(hf_config: dict, kind="causal", seed=0):
    """A freshly initialised model from a config dict, as `transformers` initialises one: N(0, std^2) for
    linear and embedding weights (std = initializer_range), zero biases, unit norms; seeded, no global RNG."""
    std = hf_config.get("initializer_range", 0.02)
    with torch.device("meta"):
        model = (CausalLM if kind == "causal" else RewardModel)(config_from_hf(hf_config))
    model = model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, std, generator=generator)
    return model
