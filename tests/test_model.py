"""Our model against `transformers` itself, for every supported family, on ragged padded batches."""
import pytest
import torch

from minirlhf.checkpoint import load_model
from minirlhf.model import build_attention_mask
from tiny import FAMILIES, ragged_batch, save_tiny

LENGTHS = [9, 5, 2, 7]
MAX_LOGITS_DIFF = {}  # filled by the parity test; printed with -s for the closing note


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_logits_match_transformers(tmp_path, family, padding_side):
    hf_model = save_tiny(tmp_path, family)
    model = load_model(tmp_path).eval()
    ids, mask = ragged_batch(LENGTHS, padding_side)
    with torch.no_grad():
        ours = model(ids, mask)
        theirs = hf_model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    diff = (ours[real] - theirs[real]).abs().max().item()
    MAX_LOGITS_DIFF[family, padding_side] = diff
    print(f"{family:9s} {padding_side:5s} padding: max |logits diff| = {diff:.2e}")
    assert diff <= 1e-4
    assert theirs[real].abs().max() > 0.1  # the comparison is not between two near-zero tensors


@pytest.mark.parametrize("family", list(FAMILIES))
def test_reward_model_matches_sequence_classification(tmp_path, family):
    hf_model = save_tiny(tmp_path, family, kind="reward")
    model = load_model(tmp_path, kind="reward").eval()
    for side in ("left", "right"):
        ids, mask = ragged_batch(LENGTHS, side)
        with torch.no_grad():
            ours = model(ids, mask)
            theirs = hf_model(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
        assert ours.shape == (len(LENGTHS),) and ours.dtype == torch.float32
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_reward_read_where_transformers_reads_it_when_pad_is_eos(tmp_path):
    """Hub reward models often set pad_token_id = eos_token_id; transformers then reads the score at the last
    token that is not the pad id, i.e. before a final EOS, and so must we."""
    hf_model = save_tiny(tmp_path, "llama3", kind="reward", pad_token_id=2)
    model = load_model(tmp_path, kind="reward").eval()
    ids, mask = ragged_batch(LENGTHS, "right", pad_id=2)
    ends = mask.sum(1) - 1
    ids[torch.arange(len(LENGTHS)), ends] = 2  # every sequence ends with EOS (= pad)
    with torch.no_grad():
        theirs = hf_model(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
        torch.testing.assert_close(model(ids, mask), theirs, atol=1e-4, rtol=0)
        at_eos = model.score(model.model(ids, mask)[torch.arange(len(LENGTHS)), ends]).squeeze(-1)
    assert (at_eos - theirs).abs().max() > 1e-3  # reading at the EOS itself would differ


def test_padding_does_not_change_real_positions(tmp_path):
    save_tiny(tmp_path, "llama3")
    model = load_model(tmp_path).eval()
    ids, mask = ragged_batch([6], "right")
    left_ids, left_mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1), torch.cat([torch.zeros(1, 3, dtype=torch.long), mask], 1)
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[0], model(left_ids, left_mask)[0, 3:], atol=1e-5, rtol=0)


def test_hidden_states_and_labels_paths_agree(tmp_path):
    save_tiny(tmp_path, "qwen2")  # tied: the output weight is the input embedding
    model = load_model(tmp_path).eval()
    ids, mask = ragged_batch(LENGTHS, "right")
    labels = torch.where(mask.bool(), ids, -100).roll(-1, dims=1)
    labels[:, -1] = -100
    with torch.no_grad():
        logits = model(ids, mask)
        hidden = model(ids, mask, return_hidden=True)
        token_logps = model(ids, mask, labels=labels)
    torch.testing.assert_close(hidden @ model.output_weight().T, logits, atol=1e-5, rtol=0)
    expected = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    expected = torch.where(labels == -100, 0.0, expected)
    torch.testing.assert_close(token_logps, expected, atol=1e-5, rtol=0)


def test_activation_checkpointing_gives_same_gradients(tmp_path):
    save_tiny(tmp_path, "llama3")
    ids, mask = ragged_batch(LENGTHS, "left")
    grads, calls = [], []
    for ckpt in (False, True):
        model = load_model(tmp_path).train()
        model.model.gradient_checkpointing = ckpt
        calls.append(0)
        model.model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.__setitem__(-1, calls[-1] + 1))
        model(ids, mask).logsumexp(-1)[mask.bool()].sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert calls == [1, 2]  # with checkpointing the block's forward runs again inside backward
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=0)


def test_attention_mask_rule():
    """Keys [pad, a, b] for queries [a, b]: a sees a; b sees a, b; nobody sees the pad (except itself)."""
    mask = build_attention_mask(torch.tensor([[0, 1, 1]]), T=2)
    assert mask.shape == (1, 1, 2, 3)
    assert mask[0, 0].tolist() == [[False, True, False], [False, True, True]]
    window = build_attention_mask(torch.ones(1, 4), T=4, sliding_window=2)[0, 0]
    assert window[3].tolist() == [False, False, True, True]
