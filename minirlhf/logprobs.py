"""Per-token log-probs log p(y_t | y_<t) without ever holding the (N, V) logits, and sequence log-probs.

`fused_token_logps(h, W, labels)` equals `naive_token_logps`, log_softmax((h @ W.T).float(), -1).gather(-1, labels)
(0 where labels == ignore_index), in values and gradients (tested). The naive form holds several (N, V) fp32 tensors:
8 GB each at N = 16k tokens and V = 128256 (Llama 3); the fused op keeps only the per-row log-sum-exp between passes:

    forward   walk the N rows in chunks of C = chunk_size:
              z = h_c @ W.T (C, V) -> lse = logsumexp(z) (fp32) -> logp = z[y] - lse
    backward  walk the V columns in blocks of Vc = C * V / N (the same number of elements) and recompute
              z_b = h @ W_b.T (N, Vc); d logp / d z = onehot(y) - exp(z - lse), times the incoming grad g;
              grad_W_b = dz_b.T @ h (one matmul over all rows), grad_h += dz_b @ W_b (fp32 accumulator)

Peak extra memory is O(C x V), not O(N x V), for one more matmul (C = 1024: 0.5 GB of fp32 logits at V = 128256);
grad_W needs no (V, D) fp32 accumulator. Rows labelled `ignore_index` are dropped first. CPU, GPU, FSDP2, autocast.
"""
import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def naive_token_logps(h, weight, labels, ignore_index=IGNORE_INDEX, chunk_size=None):
    """Reference: h (..., D), weight (V, D), labels (...) -> (...) fp32 log p(label), 0 at ignored positions.
    Materialises the full (..., V) logits; `chunk_size` is accepted (unused) to share the fused op's signature."""
    logits = F.linear(h, weight)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 (fp64 stays fp64, for gradcheck)
    valid = labels != ignore_index
    return logits.log_softmax(-1).gather(-1, labels.where(valid, 0).unsqueeze(-1)).squeeze(-1) * valid


class _FusedTokenLogps(torch.autograd.Function):
    """h (N, D), weight (V, D), labels (N,) -> logps of `shape` (N elements). See the module docstring."""
    @staticmethod
    def forward(ctx, h, weight, labels, ignore_index, chunk_size, shape):
        # backward reruns its matmuls under forward's autocast state (bf16 on one GPU), so the recomputed logits
        # match lse: torch.amp.custom_fwd / custom_bwd, but for h's device type (they take one fixed device_type)
        ctx.device_type = device_type = h.device.type
        ctx.autocast_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        acc = torch.promote_types(h.dtype, torch.float32)  # fp32 for bf16/fp16/fp32 inputs
        # only rows with a label cost a matmul (prompt and padding do not); nonzero is a sync point on GPU
        rows = (labels != ignore_index).nonzero().squeeze(1)
        h_v, target = h[rows], labels[rows]  # (n, D), (n,)
        lse, logps = torch.empty(2, len(rows), dtype=acc, device=h.device)  # per labelled row
        for s in range(0, len(rows), chunk_size):
            logits = (h_v[s:s + chunk_size] @ weight.T).to(acc)  # (C, V): the only O(V) tensor alive
            logps[s:s + chunk_size] = logits.gather(1, target[s:s + chunk_size, None]).squeeze(1)
            m = logits.amax(-1, keepdim=True)  # logsumexp in place, without logsumexp()'s (C, V) temporary
            lse[s:s + chunk_size] = logits.sub_(m).exp_().sum(-1).log_() + m.squeeze(1)
            del logits  # freed before the next chunk is allocated, not after
        out = torch.zeros(shape, dtype=acc, device=h.device)  # not a view: FSDP2 warns about returned views
        out.view(-1)[rows] = logps - lse
        ctx.save_for_backward(h_v, weight, rows, target, lse)  # (n, D) + (n,): no (N, V) tensor is kept
        ctx.chunk_size, ctx.n_rows = chunk_size, h.shape[0]
        return out

    @staticmethod
    def backward(ctx, grad_logps):
        with torch.autocast(ctx.device_type, dtype=ctx.autocast_dtype, enabled=ctx.autocast_dtype is not None):
            h_v, weight, rows, target, lse = ctx.saved_tensors
            mm_dtype = ctx.autocast_dtype or h_v.dtype  # the dtype forward's matmuls ran in
            (n, D), V, acc = h_v.shape, weight.shape[0], lse.dtype
            g = grad_logps.reshape(-1)[rows].to(acc)[:, None]  # (n, 1); ignored rows get no gradient
            need_h, need_w = ctx.needs_input_grad[:2]
            grad_h = torch.zeros(n, D, dtype=acc, device=h_v.device) if need_h else None  # fp32 accumulator
            grad_w = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device) if need_w else None
            # walk V in blocks of Vc columns, as many elements as one forward chunk (chunk_size x V): each block of
            # grad_W is then one matmul over all n rows (fp32 accumulation inside it), so no (V, D) fp32 buffer
            Vc = max(1, ctx.chunk_size * V // max(n, 1))
            for v in range(0, V, Vc):
                W_b = weight[v:v + Vc]
                grad_logits = (h_v @ W_b.T).to(acc)  # (n, Vc) logits, recomputed instead of stored
                # d logp / d logits = onehot(target) - softmax, times g: -g * softmax, then +g at the target id
                grad_logits.sub_(lse[:, None]).exp_().mul_(-g)
                local = target - v  # target's column in this block; scatter g only where it falls inside
                inside = (local >= 0) & (local < W_b.shape[0])
                grad_logits.scatter_add_(1, local.clamp(0, W_b.shape[0] - 1)[:, None], g * inside[:, None])
                grad_logits = grad_logits.to(mm_dtype)  # for bf16 inputs or autocast this frees the fp32 one
                if need_w and grad_logits.dtype == weight.dtype:
                    torch.mm(grad_logits.T, h_v, out=grad_w[v:v + Vc])  # (Vc, D) written once
                elif need_w:  # autocast: a bf16 matmul (out= and in-place ops bypass autocast), stored in fp32
                    grad_w[v:v + Vc] = grad_logits.T @ h_v
                if need_h and grad_logits.dtype == acc:
                    grad_h.addmm_(grad_logits, W_b)  # in place: no (n, D) temporary
                elif need_h:
                    grad_h += grad_logits @ W_b  # bf16/fp16 matmul, summed over blocks in fp32
                del grad_logits  # freed before the next block is allocated, not after
            if need_h:
                grad_h = h_v.new_zeros(ctx.n_rows, D).index_copy_(0, rows, grad_h.to(h_v.dtype))
            return grad_h, grad_w, None, None, None, None


def fused_token_logps(h, weight, labels, ignore_index=IGNORE_INDEX, chunk_size=1024):
    """log_softmax(h @ weight.T).gather(-1, labels) in chunks of rows: h (..., D), weight (V, D) (h's dtype), labels
    (...) -> (...) fp32 (fp64 for fp64 inputs) log-probs, 0 where labels == ignore_index. As `naive_token_logps`."""
    return _FusedTokenLogps.apply(h.reshape(-1, h.shape[-1]), weight, labels.reshape(-1), ignore_index,
                                  max(1, int(chunk_size)), labels.shape)


def shift_labels(input_ids, loss_mask, ignore_index=IGNORE_INDEX):
    """(B, T) -> labels (B, T): labels[:, t] = input_ids[:, t+1] if loss_mask[:, t+1], else (last too) ignore_index."""
    labels = torch.full_like(input_ids, ignore_index)
    labels[:, :-1] = input_ids[:, 1:].masked_fill(~loss_mask[:, 1:].bool(), ignore_index)
    return labels


def sequence_logps(model, input_ids, attention_mask, loss_mask, average=False):
    """log pi(y | x) = sum_t log pi(y_t | x, y_<t) over the response tokens (loss_mask == 1) -> (logps (B,),
    n_tokens (B,)); `average`: logps / n_tokens (IPO in TRL, SimPO). model(input_ids, attention_mask=..., labels=...)
    returns fp32 token_logps (B, T), 0 at ignored labels (`CausalLM`, via `fused_token_logps`)."""
    labels = shift_labels(input_ids, loss_mask)
    token_logps = model(input_ids, attention_mask=attention_mask, labels=labels)  # (B, T) fp32
    n_tokens = (labels != IGNORE_INDEX).sum(-1)
    logps = token_logps.sum(-1)
    return (length_normalize(logps, n_tokens) if average else logps), n_tokens


def length_normalize(logps, n_tokens):
    """Per-token log-prob logps / n_tokens (n_tokens clamped to >= 1): the one place sequences are averaged."""
    return logps / n_tokens.clamp(min=1)
