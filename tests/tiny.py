"""Tiny random `transformers` models of every supported family, saved locally (no download)."""
import torch
import transformers

V = 97  # not a power of two, on purpose

COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2, pad_token_id=0,
              bos_token_id=1, eos_token_id=2)

# (config class, overrides): each row switches on what makes its family different
FAMILIES = {
    "llama2": (transformers.LlamaConfig, dict(num_key_value_heads=4, rms_norm_eps=1e-5)),
    "llama3": (transformers.LlamaConfig, dict(rope_theta=500000.0)),
    "llama3.1": (transformers.LlamaConfig, dict(rope_scaling=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=256))),
    "llama3.2": (transformers.LlamaConfig, dict(tie_word_embeddings=True, rope_scaling=dict(
        rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=256))),
    "mistral": (transformers.MistralConfig, dict(sliding_window=4)),
    "qwen2": (transformers.Qwen2Config, dict(tie_word_embeddings=True)),
    "qwen2.5": (transformers.Qwen2Config, dict(tie_word_embeddings=False, rope_theta=1e6)),
    "qwen3": (transformers.Qwen3Config, dict(head_dim=16, tie_word_embeddings=True)),
}


def hf_config(family, **overrides):
    cls, extra = FAMILIES[family]
    return cls(**{**COMMON, **extra, **overrides})


def save_tiny(path, family, kind="causal", seed=0, **overrides):
    """Random-init a `transformers` model of `family`, save it to `path`, return it (eval mode, fp32)."""
    torch.manual_seed(seed)
    cfg = hf_config(family, **overrides)
    if kind == "causal":
        model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    else:
        cfg.num_labels = 1
        model = transformers.AutoModelForSequenceClassification.from_config(cfg, attn_implementation="eager")
    model.save_pretrained(path)
    return model.eval()


def ragged_batch(lengths, padding_side, seed=0, pad_id=0):
    """Random ids in [3, V) (never a special id) padded with `pad_id` -> (input_ids, attention_mask)."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.full((len(lengths), T), pad_id)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        sl = slice(T - n, T) if padding_side == "left" else slice(0, n)
        ids[i, sl] = torch.randint(3, V, (n,), generator=g)
        mask[i, sl] = 1
    return ids, mask
