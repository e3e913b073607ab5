"""The chunked fused log-prob op equals the naive log_softmax(h @ W.T).gather in values and gradients."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from minirlhf.logprobs import fused_token_logps, naive_token_logps, sequence_logps, shift_labels


def make_case(N=37, D=16, V=101, dtype=torch.float32, n_ignored=5, seed=0, shape=None):
    """Random h (N, D), W (V, D), labels (N,) with `n_ignored` positions set to -100 (N, V deliberately odd)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g, dtype=torch.float64).to(dtype)
    W = (torch.randn(V, D, generator=g, dtype=torch.float64) / D ** 0.5).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.randperm(N, generator=g)[:n_ignored]] = -100
    if shape is not None:
        h, labels = h.view(*shape, D), labels.view(shape)
    return h.requires_grad_(), W.requires_grad_(), labels


def values_and_grads(fn, h, W, labels, **kw):
    h, W = h.detach().clone().requires_grad_(), W.detach().clone().requires_grad_()
    out = fn(h, W, labels, **kw)
    # a non-uniform upstream gradient, as sum() would hide errors in how g scales each row
    weights = torch.linspace(-1, 2, out.numel(), dtype=out.dtype).view(out.shape)
    (out * weights).sum().backward()
    return out, h.grad, W.grad


@pytest.mark.parametrize("chunk_size", [1, 7, 1024])
def test_fused_equals_naive_fp32(chunk_size):
    h, W, labels = make_case()
    out, gh, gW = values_and_grads(fused_token_logps, h, W, labels, chunk_size=chunk_size)
    ref, rgh, rgW = values_and_grads(naive_token_logps, h, W, labels)
    assert out.dtype == torch.float32 and out.shape == labels.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(gh, rgh, atol=1e-5, rtol=0)
    torch.testing.assert_close(gW, rgW, atol=1e-5, rtol=0)
    assert (out[labels == -100] == 0).all() and (gh[labels == -100] == 0).all()


def test_gradcheck_float64():
    h, W, labels = make_case(N=6, D=3, V=7, dtype=torch.float64, n_ignored=1)
    assert torch.autograd.gradcheck(lambda h, W: fused_token_logps(h, W, labels, chunk_size=4), (h, W))


def test_bf16_close_to_naive():
    """bf16 inputs: logps within 1e-3 and gradients within 1e-2 (abs) + 1e-2 (rel) of the naive op in bf16
    (measured: 5e-7, 4e-3 = one bf16 ulp, 0); both are ~7e-3 / 2e-2 away from the float64 result."""
    h, W, labels = make_case(N=64, D=32, V=203, dtype=torch.bfloat16)
    out, gh, gW = values_and_grads(fused_token_logps, h, W, labels, chunk_size=7)
    ref, rgh, rgW = values_and_grads(naive_token_logps, h, W, labels)
    assert out.dtype == torch.float32 and gh.dtype == gW.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, atol=1e-3, rtol=0)
    torch.testing.assert_close(gh, rgh, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(gW, rgW, atol=1e-2, rtol=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_cuda_fused_equals_naive(dtype, atol):
    """On CUDA (cuBLAS tiles each chunk differently from the whole matrix): fp32 within 1e-4; bf16 within
    5e-2, a few bf16 ulps of logits of magnitude ~3 (not yet measured on a GPU: the bound is an estimate)."""
    h, W, labels = (t.detach().cuda() for t in make_case(N=300, D=64, V=5003, dtype=dtype, n_ignored=20))
    out, gh, gW = values_and_grads(fused_token_logps, h, W, labels, chunk_size=128)
    ref, rgh, rgW = values_and_grads(naive_token_logps, h, W, labels)
    assert out.is_cuda and out.dtype == torch.float32 and gh.dtype == gW.dtype == dtype
    torch.testing.assert_close(out, ref, atol=atol, rtol=0)
    torch.testing.assert_close(gh, rgh, atol=atol, rtol=atol)
    torch.testing.assert_close(gW, rgW, atol=atol, rtol=atol)


def test_autocast_backward_runs_like_forward():
    """fp32 h and W under CPU autocast (as one GPU trains: fp32 weights, bf16 matmuls): backward reruns the
    forward's bf16 matmuls, so values and gradients match the naive op under the same autocast (measured: 5e-7,
    grad_h within one bf16 ulp, grad_W equal). A backward outside autocast (fp32 matmuls) recomputes logits that
    differ from those behind the saved log-sum-exp: grad_W then misses by up to 1.5e-2 (100% on small entries)."""
    h, W, labels = make_case(N=64, D=32, V=203)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, gh, gW = values_and_grads(fused_token_logps, h, W, labels, chunk_size=7)
        ref, rgh, rgW = values_and_grads(naive_token_logps, h, W, labels)
    assert out.dtype == gh.dtype == gW.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(gh, rgh, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(gW, rgW, atol=1e-3, rtol=1e-2)

def test_3d_input():
    h, W, labels = make_case(N=2 * 13, shape=(2, 13))
    out, gh, gW = values_and_grads(fused_token_logps, h, W, labels, chunk_size=5)
    ref, rgh, rgW = values_and_grads(naive_token_logps, h, W, labels)
    assert out.shape == (2, 13) and gh.shape == h.shape
    for a, b in [(out, ref), (gh, rgh), (gW, rgW)]:
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("chunk_size", [1, 7, 100])
def test_tied_embedding(chunk_size):
    """W is also the input embedding: its gradient sums the embedding use and the output use."""
    g = torch.Generator().manual_seed(1)
    V, D, B, T = 53, 8, 3, 9
    W0 = torch.randn(V, D, generator=g)
    mix = torch.randn(D, D, generator=g) / D ** 0.5
    ids = torch.randint(0, V, (B, T), generator=g)
    labels = shift_labels(ids, torch.ones_like(ids))

    def grads(fn):
        W = W0.clone().requires_grad_()
        h = torch.tanh(W[ids] @ mix)  # (B, T, D)
        fn(h, W, labels, chunk_size=chunk_size).sum().backward()
        return W.grad

    torch.testing.assert_close(grads(fused_token_logps), grads(naive_token_logps), atol=1e-5, rtol=0)


def test_no_grad_and_frozen_weight():
    h, W, labels = make_case()
    with torch.no_grad():  # the reference model's path
        torch.testing.assert_close(fused_token_logps(h, W, labels), naive_token_logps(h, W, labels))
    W = W.detach()  # frozen head: only grad_h
    fused_token_logps(h, W, labels, chunk_size=8).sum().backward()
    gh = h.grad.clone()
    h.grad = None
    naive_token_logps(h, W, labels).sum().backward()
    torch.testing.assert_close(gh, h.grad, atol=1e-5, rtol=0)


def test_saves_no_n_by_v_tensor():
    """Between forward and backward only (N, D) and (N,) tensors are kept, never (N, V) logits."""
    h, W, labels = make_case(N=40, D=4, V=300)
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: sizes.append(x.numel()) or x, lambda x: x):
        fused_token_logps(h, W, labels, chunk_size=8)
    assert max(sizes) == W.numel() and sorted(sizes)[-2] <= h.numel()


def test_all_ignored():
    h, W, labels = make_case(N=4, n_ignored=4)
    out = fused_token_logps(h, W, labels)
    out.sum().backward()
    assert (out == 0).all() and (h.grad == 0).all() and (W.grad == 0).all()


def test_shift_labels():
    ids = torch.tensor([[5, 6, 7, 8, 0]])
    loss_mask = torch.tensor([[0, 0, 1, 1, 0]])  # response = tokens 7, 8; 0 = padding
    assert shift_labels(ids, loss_mask).tolist() == [[-100, 7, 8, -100, -100]]


class NaiveLM(torch.nn.Module):
    """Stand-in with CausalLM's call signature: embedding -> tanh -> tied head, naive token logps."""

    def __init__(self, V=31, D=8):
        super().__init__()
        self.embed = torch.nn.Embedding(V, D, _weight=torch.randn(V, D, generator=torch.Generator().manual_seed(0)))

    def forward(self, input_ids, attention_mask=None, labels=None):
        return naive_token_logps(torch.tanh(self.embed(input_ids)), self.embed.weight, labels)


def test_sequence_logps():
    model = NaiveLM()
    ids = torch.tensor([[1, 4, 9, 3, 0], [2, 5, 7, 11, 12]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    loss_mask = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]])
    logps, n = sequence_logps(model, ids, mask, loss_mask)
    full = torch.log_softmax(torch.tanh(model.embed.weight[ids]) @ model.embed.weight.T, -1)  # (B, T, V)
    expected = torch.stack([full[0, 1, 9] + full[0, 2, 3], full[1, :4].gather(-1, ids[1, 1:, None]).sum()])
    assert n.tolist() == [2, 4]
    torch.testing.assert_close(logps, expected)
    avg, _ = sequence_logps(model, ids, mask, loss_mask, average=True)
    torch.testing.assert_close(avg, expected / torch.tensor([2.0, 4.0]))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_fsdp2_two_processes_equal_one(tmp_path):
    """2 gloo ranks with FSDP2 (fully_shard), tied and untied heads: gathered gradients == one process."""
    out = tmp_path / "result.json"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    worker = os.path.join(root, "tests", "fsdp_logprobs_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", worker, str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result) == {"tied", "untied"}
    for name, max_err in result.items():
        assert max_err < 1e-5, (name, max_err)
