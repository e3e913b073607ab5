"""Batched sampling from the policy with a preallocated KV cache: the generator of online iterative RLHF
(Dong et al. 2024, Algorithm 1: n responses per prompt y ~ pi_t(. | x), then ranked by the reward model, eq. 2).

Cache layout (gpt-fast style). One `KVCache` per batch holds, per layer, K and V (B, Hkv, L, hd), L = longest
prompt + max_new_tokens, allocated once and written in place at a column `pos` shared by every row. Prompts are
LEFT-padded so all rows write the same column; a (B, L) bool `valid` marks real tokens and each row's position ids
count its real tokens, so a padded row computes what it would alone, and `valid[:, None, None, :pos + 1]` is the
decode attention mask itself (Mistral's sliding window adds a comparison).

Shared prefill: the B prompts run once (in chunks of consecutive prompts, longest first, each padded only to its
own longest: `prefill_chunks`) and each one's keys are copied into its n rows. A row is done after its first stop
id; once half the rows are done the batch is compacted. Many prompts go `batch_size` rows at a time, longest first
(an out-of-memory shows in the first batch); results come back in the caller's order. On CPU in fp32
`mkl_packed` packs each weight once per call instead of at every small sgemm (benchmarks/RESULTS.md).

Sampling: logits / temperature, then top-k, then top-p (`transformers`' order), drawn by inverting the CDF with
one uniform per row; `token_logps` are log-probs under that distribution (temperature 0: greedy, with the
temperature-1 log-probs). `generate` needs a plain, unsharded model (FSDP would all-gather every layer at every
step): iterate.py has rank 0 save the trained policy, and every rank loads it and generates its share.
Teacher forcing (`forced`, DR-PO's reset): a row's first h response tokens are given; the draw at those steps still
happens (the random stream is the same as without forcing) and the given token replaces it, with its log-prob under
the sampling distribution; later steps sample from the forced prefix as usual.

    gen = generate(policy, prompts, max_new_tokens=256, n=4, temperature=0.7, eos_token_id=[2], seed=0)
    gen.responses[i][j]  # token ids of the j-th response to prompt i, stop id included
"""
import contextlib
from dataclasses import dataclass

import torch

from minirlhf import cli, dist
from minirlhf.checkpoint import load_model
from minirlhf.model import mkl_pack
from minirlhf.tokenizer import decode_response, encode_prompt


@dataclass
class Generation:
    responses: list[list[list[int]]]  # prompt -> n samples -> response ids (cut after the first stop id)
    token_logps: list[list[list[float]]]  # same nesting: log-prob of each token under the sampling distribution
    finish_reasons: list[list[str]]  # prompt -> n: "stop" (ended with a stop id) or "length"


class KVCache:
    """Per-layer K and V buffers (B, Hkv, L, hd), written in place; the model calls `update` in each layer."""

    def __init__(self, cfg, batch, max_len, dtype, device):
        shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.pos = 0  # eager: columns [0, pos) are written; the caller advances it after each forward
        self.prefill = None  # (first row, n) during a prefill: the prompts' keys fill n rows each from there

    def update(self, layer_idx, k, v):
        """k, v (b, Hkv, T, hd) of the current tokens -> all keys and values (B, Hkv, S, hd) to attend to."""
        k_all, v_all = self.k[layer_idx], self.v[layer_idx]
        b, end = k.shape[0], self.pos + k.shape[2]
        if self.prefill is not None:  # b prompts: prompt i fills rows first + i*n ... first + i*n + n-1
            first, n = self.prefill
            rows = slice(first, first + b * n)
            k_all[rows, :, self.pos:end].unflatten(0, (b, n)).copy_(k[:, None])
            v_all[rows, :, self.pos:end].unflatten(0, (b, n)).copy_(v[:, None])
            return k, v
        k_all[:, :, self.pos:end] = k
        v_all[:, :, self.pos:end] = v
        return k_all[:, :, :end], v_all[:, :, :end]

    def keep(self, rows):
        """Drop finished rows: keep the batch rows `rows` (a new, smaller allocation)."""
        self.k = [k[rows] for k in self.k]
        self.v = [v[rows] for v in self.v]


def sampling_logits(logits, temperature=1.0, top_k=None, top_p=None):
    """(R, V) logits -> (R, V) fp32 logits of the sampling distribution, -inf outside its support: divided by the
    temperature, the top_k largest kept (ties too), then the smallest most likely set whose mass reaches top_p."""
    x = logits.float() / temperature
    if top_k is not None and top_k < x.shape[-1]:
        kth = torch.topk(x, top_k, dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_x, order = x.sort(dim=-1, descending=True)
        p = sorted_x.softmax(-1)
        drop_sorted = p.cumsum(-1) - p >= top_p
        x = x.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted), float("-inf"))
    return x


def sample(logits, generator, temperature=1.0, top_k=None, top_p=None):
    """(R, V) logits -> tokens (R,) and their fp32 log-probs (R,) under the sampling distribution. On CPU 16 rows
    at a time: a whole step's (R, V) temporaries are mapped fresh at every step (128 rows at V = 32000: 337k page
    faults in 16 steps, 33k in blocks)."""
    if logits.device.type == "cpu" and len(logits) > 16:
        drawn = [sample(block, generator, temperature, top_k, top_p) for block in logits.split(16)]
        return torch.cat([t for t, _ in drawn]), torch.cat([lp for _, lp in drawn])
    if temperature == 0:  # greedy (the first maximum of the logits, as transformers' argmax); the policy's log-probs
        logits = logits.float()
        top, tokens = logits.max(-1)
        return tokens, top - logits.logsumexp(-1)
    probs = sampling_logits(logits, temperature, top_k, top_p).softmax(-1)
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=torch.float64)
    tokens = inverse_cdf(probs, u)
    return tokens, probs.gather(-1, tokens[:, None]).squeeze(-1).log()  # a drawn token's p is far from 0


def inverse_cdf(probs, u):
    """probs (R, V), u (R, 1) uniform in [0, 1) -> tokens (R,): the first whose fp64 CDF exceeds u * total. One
    uniform per row (torch.multinomial draws V exponentials per row: 105 ms of a 128-row step at V = 32000). A
    token of probability 0 is never drawn; `last` keeps u * total rounding up on the last token with mass."""
    cdf = probs.cumsum(-1, dtype=torch.float64)  # (R, V)
    total = cdf[:, -1:].contiguous()
    last = torch.searchsorted(cdf, total)  # the first column where the CDF reaches its total
    return torch.searchsorted(cdf, u * total, right=True).minimum(last).squeeze(-1)


def decode_step(model, cache, tokens, position_ids, valid):
    """One new token per row: tokens, position_ids (R,), valid (R, L) with this step's column set -> logits (R, V);
    it attends over the written columns [0, pos]."""
    S = cache.pos + 1
    mask = valid[:, None, None, :S]  # (R, 1, 1, S): the query is the newest token, so no causal term is needed
    window = model.config.sliding_window
    if window is not None:
        mask = mask & (torch.arange(S, device=valid.device) > cache.pos - window)
    h = model(tokens[:, None], mask, position_ids[:, None], kv_cache=cache, return_hidden=True)[:, 0]
    return model.logits(h)


@contextlib.contextmanager
def mkl_packed(model, enabled=True):
    """While generating on CPU in fp32 with MKL: every weight pre-packed once for MKL's packed sgemm. Plain sgemm
    re-packs each weight on every call, making a decode step of 16 to 32 rows 1.45-1.25x slower (`model.linear`
    uses the packed copy up to 32 rows). q/k/v and gate/up are stacked: 4 matmuls per layer instead of 7. Packing
    costs a few decode steps, so `generate` packs for 8 rows or more; the copies hold 1.4x the weights' memory."""
    weight = model.output_weight()
    if not (enabled and weight.device.type == "cpu" and weight.dtype == torch.float32
            and torch.backends.mkl.is_available()):
        yield
        return
    def pack(*layers):
        return mkl_pack([layer.weight for layer in layers], [layer.bias for layer in layers])
    try:
        for block in model.model.layers:
            attn, mlp = block.self_attn, block.mlp
            attn.qkv_packed = pack(attn.q_proj, attn.k_proj, attn.v_proj)
            attn.o_proj.packed = pack(attn.o_proj)
            mlp.gate_up_packed = pack(mlp.gate_proj, mlp.up_proj)
            mlp.down_proj.packed = pack(mlp.down_proj)
        model.output_packed = mkl_pack([weight])
        yield
    finally:
        for block in model.model.layers:
            block.self_attn.qkv_packed = block.mlp.gate_up_packed = None
            block.self_attn.o_proj.packed = block.mlp.down_proj.packed = None
        model.output_packed = None


@torch.inference_mode()
def generate(model, prompts, max_new_tokens, n=1, temperature=1.0, top_k=None, top_p=None, eos_token_id=None,
             seed=0, generator=None, batch_size=64, pack_weights=True, progress=None, forced=None) -> Generation:
    """Draw n responses for each prompt (a list of token ids) from `model`, an unsharded `CausalLM` in eval mode.

    eos_token_id: one stop id, a list of them, or None (always max_new_tokens). temperature 0 is greedy.
    generator (a torch.Generator on the model's device) overrides seed; the draws depend on the seed, the
    prompts and batch_size. batch_size counts sequences (cache rows): batch_size // n prompts per batch, and
    pack_weights: on CPU in fp32, batches of 8 rows or more multiply with MKL-packed weights (`mkl_packed`).
    progress: called with the number of prompts of each finished batch (e.g. a progress bar's update).
    forced: per prompt, n lists of token ids that begin the responses (teacher forcing; [] none), within max_new_tokens.
    """
    if not prompts:
        return Generation([], [], [])
    if min(map(len, prompts)) == 0 or max_new_tokens < 1:
        raise ValueError("generate needs prompts of at least one token and max_new_tokens >= 1")
    device = model.output_weight().device
    if generator is None:
        generator = torch.Generator(device).manual_seed(seed)
    if eos_token_id is None:
        eos_token_id = []
    stop_ids = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id),
                            dtype=torch.long, device=device)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # longest first, less padding
    per_batch = max(1, min(batch_size // n, len(prompts)))
    responses, token_logps, finish_reasons = [None] * len(prompts), [None] * len(prompts), [None] * len(prompts)
    with mkl_packed(model, enabled=pack_weights and per_batch * n >= 8):
        for start in range(0, len(order), per_batch):
            idx = order[start:start + per_batch]
            batch_prompts = [prompts[i] for i in idx]
            batch = generate_batch(model, batch_prompts, max_new_tokens, n, temperature, top_k, top_p, stop_ids,
                                   generator, None if forced is None else [f for i in idx for f in forced[i]])
            for j, i in enumerate(idx):
                responses[i], token_logps[i], finish_reasons[i] = (x[j * n:(j + 1) * n] for x in batch)
            if progress is not None:
                progress(len(idx))
    return Generation(responses, token_logps, finish_reasons)


def prefill_chunks(lengths, max_padding=0.125) -> list[slice]:
    """Prompt lengths of a batch (longest first) -> slices of consecutive prompts, each chunk as long as its
    padding (to its own longest prompt) stays within `max_padding` of its tokens, and at least one prompt."""
    chunks, start, longest, real = [], 0, 0, 0  # the open chunk: lengths[start:i], its longest and its sum
    for i, length in enumerate(lengths):
        padded = (i + 1 - start) * max(longest, length)
        if i > start and padded - (real + length) > max_padding * padded:  # close the chunk before prompt i
            chunks.append(slice(start, i))
            start, longest, real = i, 0, 0
        longest, real = max(longest, length), real + length
    return chunks + [slice(start, len(lengths))]


def generate_batch(model, prompts, max_new_tokens, n, temperature, top_k, top_p, stop_ids, generator, forced=None):
    """One batch of prompts -> flat lists (B * n rows, prompt-major) of responses, token_logps, finish_reasons;
    forced: None or a list of given first response tokens per row."""
    device = model.output_weight().device
    B, P, R = len(prompts), max(map(len, prompts)), len(prompts) * n
    input_ids = torch.zeros(B, P, dtype=torch.long)  # left padding; the pad id is never attended to
    prompt_mask = torch.zeros(B, P, dtype=torch.long)
    for b, prompt in enumerate(prompts):
        input_ids[b, P - len(prompt):] = torch.tensor(prompt)
        prompt_mask[b, P - len(prompt):] = 1
    input_ids, prompt_mask = input_ids.to(device), prompt_mask.to(device)

    cache = KVCache(model.config, R, P + max_new_tokens, model.output_weight().dtype, device)
    lengths = [len(prompt) for prompt in prompts]
    h = []  # one prefill per prompt: chunk c's prompts are padded to their own longest, Pc, at columns [P-Pc, P)
    for chunk in prefill_chunks(lengths):
        Pc = max(lengths[chunk])
        cache.pos, cache.prefill = P - Pc, (chunk.start * n, n)
        h.append(model(input_ids[chunk, P - Pc:], prompt_mask[chunk, P - Pc:], kv_cache=cache,
                       return_hidden=True)[:, -1])
    cache.prefill = None
    logits = model.logits(torch.cat(h)).repeat_interleave(n, 0)  # (R, V)
    cache.pos = P
    valid = torch.zeros(R, cache.k[0].shape[2], dtype=torch.bool, device=device)  # (R, L)
    valid[:, :P] = prompt_mask.bool().repeat_interleave(n, 0)
    position_ids = prompt_mask.sum(1).repeat_interleave(n, 0)  # (R,) next position = real tokens so far

    out_tokens = torch.zeros(R, max_new_tokens, dtype=torch.long, device=device)  # by original row
    out_logps = torch.zeros(R, max_new_tokens, device=device)
    h = min(max(map(len, forced or [[]])), max_new_tokens)  # forcing ends after step h: no cost in the steps after
    if h:  # (R, h): the given token, -1 where the row samples
        forced = torch.tensor([(f + [-1] * h)[:h] for f in forced], device=device)
    rows = torch.arange(R, device=device)  # current batch row -> original row (rows shrink on compaction)
    done = torch.zeros(R, dtype=torch.bool, device=device)
    check_every = 1 if device.type == "cpu" else 8  # a check is a host sync: on GPU let the CPU queue steps ahead
    for t in range(max_new_tokens):
        tokens, logps = sample(logits, generator, temperature, top_k, top_p)
        if t < h:
            given = forced[rows, t]
            tokens = torch.where(given >= 0, given, tokens)
            logps = torch.where(given >= 0, sampling_logits(logits, temperature or 1.0, top_k, top_p).log_softmax(
                -1).gather(-1, tokens[:, None]).squeeze(-1), logps)
        out_tokens[rows, t], out_logps[rows, t] = tokens, logps
        steps = t + 1
        if steps == max_new_tokens:
            break
        done |= torch.isin(tokens, stop_ids)  # finished rows keep decoding until a check; cut below
        if steps % check_every == 0:
            n_done = int(done.sum())
            if n_done == len(done):
                break
            if n_done and 2 * n_done >= len(done):  # compact: drop finished rows from the batch
                keep = (~done).nonzero().squeeze(1)
                cache.keep(keep)
                valid, position_ids, rows, tokens, done = (x[keep] for x in (valid, position_ids, rows, tokens, done))
        col = cache.pos
        valid[:, col] = True
        logits = decode_step(model, cache, tokens, position_ids, valid)
        position_ids = position_ids + 1
        cache.pos = col + 1

    # cut each response after its first stop id; rows with none ran to max_new_tokens
    out_tokens, out_logps = out_tokens[:, :steps], out_logps[:, :steps]
    is_stop = torch.isin(out_tokens, stop_ids)
    stopped = is_stop.any(1)
    lengths = torch.where(stopped, is_stop.int().argmax(1) + 1, steps).tolist()
    tokens_list, logps_list = out_tokens.tolist(), out_logps.tolist()
    return ([ids[:m] for ids, m in zip(tokens_list, lengths)], [lp[:m] for lp, m in zip(logps_list, lengths)],
            ["stop" if s else "length" for s in stopped.tolist()])


def sample_responses(policy_dir, tokenizer, prompts, n, args, seed, device, name, forced=None):
    """This rank's share of `prompts` -> rows with n responses each (text, sampled ids, lengths, truncation flags),
    from a plain copy of the policy (see above); args: iterate.py's or train_ppo.py's; forced: `generate`'s, for
    all `prompts`."""
    rank, world = dist.get_rank(), dist.world_size()
    mine = list(range(rank, len(prompts), world))
    dist.print0(f"{name} sampling {n} x {len(prompts)}")
    bar = cli.Progress(f"{name} sampling", len(mine), unit="prompt")
    policy = load_model(policy_dir, device=device).eval()
    prompt_ids = [encode_prompt(tokenizer, prompts[i]) for i in mine]
    gen = generate(policy, prompt_ids, args.max_new_tokens, n=n, temperature=args.temperature, top_p=args.top_p,
                   eos_token_id=tokenizer.eos_token_id, seed=seed * 1000 + rank,  # so results depend on the world size
                   batch_size=args.gen_batch_size, progress=bar.update,
                   forced=None if forced is None else [forced[i] for i in mine])
    bar.close()
    return [dict(index=i, prompt=prompts[i], responses=[decode_response(tokenizer, r) for r in gen.responses[j]],
                 prompt_ids=prompt_ids[j], response_ids=gen.responses[j], n_tokens=[len(r) for r in gen.responses[j]],
                 truncated=[f == "length" for f in gen.finish_reasons[j]]) for j, i in enumerate(mine)]


def gather_rows(rows):
    """Every rank's rows, in prompt order, on every rank."""
    return sorted((r for part in dist.all_gather_objects(rows) for r in part), key=lambda r: r["index"])
