"""The sampler against `transformers` generate, against recomputing without a cache, and against the exact
sampling distribution; one prefill per prompt; reward scoring in batches."""
import math

import pytest
import torch
import transformers

from minirlhf import sampler
from minirlhf.checkpoint import load_model
from minirlhf.sampler import generate, sampling_logits
from tiny import V, save_tiny

torch.set_num_threads(1)


def random_prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, V, (n,), generator=g).tolist() for n in lengths]


def pick_stop_ids(responses):
    """Two stop ids the greedy run really emits: the 3rd token of the first response, and the first token of
    the third response, from its 6th on, that differs from it."""
    first = responses[0][0][2]
    second = next(tok for tok in responses[2][0][5:] if tok != first)
    return sorted([first, second])


def record_packing(model):
    """-> list that gets, at every forward of the first layer's attention, whether it ran on MKL-packed weights."""
    used = []
    model.model.layers[0].self_attn.register_forward_pre_hook(lambda m, _: used.append(m.qkv_packed is not None))
    return used


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama3")
    save_tiny(path, "llama3")
    return load_model(path).eval()


@pytest.mark.parametrize("family", ["llama3", "qwen3"])
def test_greedy_matches_transformers(tmp_path, family):
    save_tiny(tmp_path, family)
    model = load_model(tmp_path).eval()
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    prompts, max_new = random_prompts([4, 9, 2, 7, 5]), 12
    stops = pick_stop_ids(generate(model, prompts, max_new, temperature=0).responses)
    packed = record_packing(model)
    # n=2 and batch_size=4: 2 prompts per batch, 3 batches, sorted by length internally (plain sgemm); and
    # all 5 prompts in one batch of 10 rows (MKL-packed weights where MKL is available)
    small = generate(model, prompts, max_new, n=2, temperature=0, eos_token_id=stops, batch_size=4)
    assert not any(packed)
    large = generate(model, prompts, max_new, n=2, temperature=0, eos_token_id=stops, batch_size=16)
    assert all(packed[-max_new:]) == torch.backends.mkl.is_available()

    P = max(map(len, prompts))
    ids = torch.tensor([[0] * (P - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    out = hf_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                            eos_token_id=stops, pad_token_id=0)[:, P:].tolist()
    reasons, ended_by = set(), set()
    for ours in small, large:
        for i, row in enumerate(out):
            cut = next((j + 1 for j, tok in enumerate(row) if tok in stops), max_new)
            for response, reason in zip(ours.responses[i], ours.finish_reasons[i]):
                assert response == row[:cut]
                assert reason == ("stop" if any(tok in stops for tok in row) else "length")
                reasons.add(reason)
                ended_by.add(response[-1] if reason == "stop" else None)
    assert reasons == {"stop", "length"}  # both endings were exercised
    assert ended_by == {*stops, None}  # and each of the two stop ids ended a response


@pytest.mark.gpu
def test_cuda_greedy_matches_transformers(tmp_path):
    """fp32 on CUDA, no stop id: our decode gives transformers' greedy tokens."""
    save_tiny(tmp_path, "llama3")
    model = load_model(tmp_path, device="cuda").eval()
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).cuda().eval()
    hf_model.generation_config.eos_token_id = None
    prompts, max_new = random_prompts([4, 9, 2, 7, 5]), 12
    P = max(map(len, prompts))
    ids = torch.tensor([[0] * (P - len(p)) + p for p in prompts], device="cuda")
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts], device="cuda")
    out = hf_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                            pad_token_id=0)[:, P:].tolist()
    gen = generate(model, prompts, max_new, temperature=0, eos_token_id=None)
    assert [r[0] for r in gen.responses] == out


@pytest.mark.parametrize("family", ["llama3", "mistral"])  # mistral: sliding window 4 < sequence length
def test_cache_matches_recompute_without_cache(tmp_path, family):
    save_tiny(tmp_path, family)
    model = load_model(tmp_path).eval()
    prompts, max_new = random_prompts([3, 8, 1, 6, 5, 2], seed=1), 10
    stops = pick_stop_ids(generate(model, prompts, max_new, temperature=0).responses)
    batch_sizes = []
    forward = model.forward
    model.forward = lambda ids, *a, **k: batch_sizes.append(ids.shape[0]) or forward(ids, *a, **k)
    gen = generate(model, prompts, max_new, temperature=0, eos_token_id=stops)
    del model.forward
    assert min(batch_sizes) < len(prompts)  # finished rows were compacted away
    for prompt, [response], [logps] in zip(prompts, gen.responses, gen.token_logps):
        seq, ref_logps = list(prompt), []
        while len(seq) - len(prompt) < max_new:  # the whole sequence again at every step, one prompt alone
            with torch.no_grad():
                step_logps = model(torch.tensor([seq]))[0, -1].log_softmax(-1)
            seq.append(int(step_logps.argmax()))
            ref_logps.append(step_logps[seq[-1]].item())
            if seq[-1] in stops:
                break
        assert response == seq[len(prompt):]
        torch.testing.assert_close(torch.tensor(logps), torch.tensor(ref_logps), atol=1e-5, rtol=0)


def test_sampling_matches_softmax_at_temperature(llama):
    """Bretagnolle-Huber-Carol: P(||p_hat - p||_1 >= eps) <= 2^V exp(-N eps^2 / 2); eps for a 1e-6 risk."""
    prompt, T, N = [5, 6, 7, 8], 0.7, 50_000
    with torch.no_grad():
        logits = llama(torch.tensor([prompt]))[0, -1]
    gen = generate(llama, [prompt], max_new_tokens=1, n=N, temperature=T, batch_size=N, seed=1)
    first = torch.tensor([r[0] for r in gen.responses[0]])
    empirical = torch.bincount(first, minlength=V).double() / N
    eps = math.sqrt(2 * (V * math.log(2) + math.log(1e6)) / N)
    l1 = lambda p: (empirical - p.double()).abs().sum().item()
    assert l1((logits / T).softmax(-1)) < eps
    assert l1((logits / (1.25 * T)).softmax(-1)) > eps  # a wrong temperature is rejected by the same bound
    assert l1((logits / T).softmax(-1).roll(1)) > eps  # and so is a shifted distribution


def test_sampling_logits_masks_as_specified():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, V, generator=g) * 3
    for top_k, top_p in [(5, None), (None, 0.8), (20, 0.5), (1, 0.9), (None, 0.01)]:
        x = sampling_logits(logits, 0.9, top_k, top_p)
        kept = x.isfinite()
        p_full = (logits / 0.9).softmax(-1)
        for row in range(len(logits)):
            ranked = p_full[row].argsort(descending=True)
            k = top_k or V
            p_k = p_full[row, ranked[:k]] / p_full[row, ranked[:k]].sum()  # renormalised after top-k
            m = int((p_k.cumsum(0) < (top_p or 2.0)).sum()) + 1 if top_p else k  # smallest prefix reaching top_p
            assert set(torch.nonzero(kept[row]).flatten().tolist()) == set(ranked[:min(m, k)].tolist())
        q = p_full * kept  # the kept tokens, renormalised: what softmax of the masked logits must give
        torch.testing.assert_close(x.softmax(-1), q / q.sum(-1, keepdim=True))


@pytest.mark.parametrize("T,top_k,top_p", [(1.0, None, None), (0.7, 5, None), (1.3, None, 0.8), (0.9, 10, 0.7)])
def test_token_logps_equal_fresh_forward(llama, T, top_k, top_p):
    prompts = random_prompts([5, 2, 8], seed=2)
    gen = generate(llama, prompts, max_new_tokens=6, n=8, temperature=T, top_k=top_k, top_p=top_p, seed=3)
    for prompt, responses, token_logps in zip(prompts, gen.responses, gen.token_logps):
        for response, logps in zip(responses, token_logps):
            seq = torch.tensor([prompt + response])
            with torch.no_grad():
                logits = llama(seq)[0, len(prompt) - 1:-1]  # the logits that predicted each response token
            ref = sampling_logits(logits, T, top_k, top_p).log_softmax(-1)[torch.arange(len(response)), response]
            assert ref.isfinite().all()  # top-k / top-p never let a masked token through
            torch.testing.assert_close(torch.tensor(logps), ref, atol=1e-5, rtol=0)
            if T == 1.0 and top_k is None and top_p is None:  # the policy's own log-probs
                labels = torch.full_like(seq, -100)
                labels[0, len(prompt) - 1:-1] = seq[0, len(prompt):]
                with torch.no_grad():
                    plain = llama(seq, labels=labels)[0, len(prompt) - 1:-1]
                torch.testing.assert_close(torch.tensor(logps), plain, atol=1e-5, rtol=0)


def test_top_k_top_p_never_emit_masked_tokens(llama):
    prompt = [9, 8, 7]
    with torch.no_grad():
        logits = llama(torch.tensor([prompt]))[0, -1:]
    for top_k, top_p in [(3, None), (None, 0.3)]:
        allowed = set(sampling_logits(logits, 1.5, top_k, top_p).isfinite().nonzero()[:, 1].tolist())
        gen = generate(llama, [prompt], 1, n=5000, temperature=1.5, top_k=top_k, top_p=top_p, batch_size=5000)
        assert {r[0] for r in gen.responses[0]} == allowed


def test_prefill_chunks_cover_the_batch_within_the_padding_bound():
    """Consecutive chunks cover every prompt once; each has padding <= 1/8 of its tokens or is one prompt, and
    taking in the next prompt would break the bound (chunks are as long as the bound allows)."""
    g = torch.Generator().manual_seed(3)
    for _ in range(50):
        lengths = sorted(torch.randint(1, 80, (int(torch.randint(1, 30, (1,), generator=g)),), generator=g).tolist(),
                         reverse=True)
        chunks = sampler.prefill_chunks(lengths)
        assert [i for c in chunks for i in range(c.start, c.stop)] == list(range(len(lengths)))
        waste = lambda ls: len(ls) * max(ls) - sum(ls)
        for c, nxt in zip(chunks, chunks[1:] + [None]):
            part = lengths[c]
            assert len(part) == 1 or waste(part) <= len(part) * max(part) / 8
            if nxt is not None:
                grown = lengths[c.start:c.stop + 1]
                assert waste(grown) > len(grown) * max(grown) / 8


def test_inverse_cdf_skips_zero_mass_tokens_at_the_extremes():
    """u = 0 and u = 1 (what u * total can round to) land on the first and last tokens with mass, never on the
    zero-probability tokens around them; inside, each token owns its CDF step."""
    probs = torch.tensor([[0.0, 0.25, 0.0, 0.75, 0.0]]).expand(5, 5)
    u = torch.tensor([[0.0], [0.2499], [0.25], [0.9999], [1.0]], dtype=torch.float64)
    assert sampler.inverse_cdf(probs, u).tolist() == [1, 1, 3, 3, 3]


def test_seed_reproducible(llama):
    prompts = random_prompts([4, 6], seed=4)
    run = lambda **k: generate(llama, prompts, 8, n=3, temperature=1.0, **k).responses
    assert run(seed=7) == run(seed=7) == run(generator=torch.Generator().manual_seed(7))
    assert run(seed=7) != run(seed=8)


@pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="MKL-packed weights need MKL")
@pytest.mark.parametrize("family", ["llama3", "qwen2"])  # qwen2: q/k/v biases, stacked with the weights
def test_mkl_packed_weights_change_no_draw(tmp_path, family):
    """12 rows per batch: the prefill and every decode step run on packed weights (q/k/v and gate/up stacked),
    the draws and log-probs are those of plain sgemm, and the packed copies are gone when generate returns."""
    save_tiny(tmp_path, family)
    llama = load_model(tmp_path).eval()
    with torch.no_grad():  # transformers initialises biases to zero: make them count
        for name, p in llama.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(len(name)))
    prompts = random_prompts([5, 2, 8], seed=9)
    used = record_packing(llama)
    packed = generate(llama, prompts, 6, n=4, temperature=1.0, seed=2)
    assert used == [True] * 8  # prefill chunks of lengths 8, 5 and 2 (too ragged to share), 5 decode steps
    plain = generate(llama, prompts, 6, n=4, temperature=1.0, seed=2, pack_weights=False)
    assert used[8:] == [False] * 8
    assert packed.responses == plain.responses
    torch.testing.assert_close(torch.tensor(packed.token_logps), torch.tensor(plain.token_logps), atol=1e-5, rtol=0)
    leftover = [name for name, m in llama.named_modules() for attr in ("packed", "qkv_packed", "gate_up_packed")
                if getattr(m, attr, None) is not None]
    assert llama.output_packed is None and leftover == []


def test_one_prefill_per_prompt(llama):
    prompts, n, max_new = random_prompts([6, 3, 4], seed=5), 4, 5
    shapes = []
    forward = llama.forward
    llama.forward = lambda ids, *a, **k: shapes.append(tuple(ids.shape)) or forward(ids, *a, **k)
    try:
        gen = generate(llama, prompts, max_new, n=n, temperature=1.0)
    finally:
        del llama.forward
    # one pass per prompt (longest first, in chunks each padded to its longest), then one token per row per step
    assert shapes == [(1, 6), (2, 4)] + [(3 * n, 1)] * (max_new - 1)
    assert [len(r) for r in gen.responses] == [n] * 3 and all(len(y) == max_new for r in gen.responses for y in r)
