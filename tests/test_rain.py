"""RAIN (minirlhf/rain.py): the tree rules by hand, the KV-cache rewind against recomputing, a frozen toy bigram LM
whose likely path runs into a BAD token (vanilla sampling vs RAIN with an oracle and an 80%-right evaluator), the
self-evaluation's label swap on models whose answer we set, and the command line on a tiny checkpoint."""
import hashlib
import json
import math

import pytest
import torch

from minirlhf import rain
from minirlhf.checkpoint import load_model, save_model
from minirlhf.model import init_model
from minirlhf.rain import Node, RainConfig, backup, puct_select, search, similarity_update, swap_score
from minirlhf.sampler import KVCache, generate
from tiny import save_tiny

torch.set_num_threads(1)


def bigram_model(table):
    """A frozen CausalLM computing log table[last token]: one-hot embeddings, blocks whose outputs are zero (the
    KV cache is still written and read), and an output layer holding the log-table. table (V, V) rows sum to 1."""
    V = table.shape[0]
    D = 8 * math.ceil(V / 8)
    model = init_model(dict(model_type="llama", vocab_size=V, hidden_size=D, intermediate_size=16, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=8, rms_norm_eps=1e-6,
                            tie_word_embeddings=False), seed=0)
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(V, D))
        model.model.layers[0].self_attn.o_proj.weight.zero_()
        model.model.layers[0].mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        model.lm_head.weight[:, :V] = table.clamp_min(1e-9).log().T / math.sqrt(D)  # rms_norm(e_i) = sqrt(D) e_i
    return model.eval()


# the toy: "Sure" -> "here" -> BAD is the likely path; "sorry" and "ok" lead to harmless filler
PAD, BOS, EOS, SURE, HERE, BAD, SORRY, OK, DOT = range(9)
FILLERS = list(range(9, 15))


def toy_table():
    t = torch.zeros(15, 15)
    t[BOS, SURE], t[BOS, SORRY] = 0.8, 0.2
    t[SURE, HERE], t[SURE, OK] = 0.95, 0.05
    t[HERE, BAD] = 0.9
    t[HERE, FILLERS] = 0.1 / len(FILLERS)
    for tok in [BAD, SORRY, OK]:
        t[tok, FILLERS] = 1 / len(FILLERS)
    for tok in FILLERS:  # a few filler words, then the sentence ends: many distinct texts
        t[tok, FILLERS], t[tok, DOT] = 0.5 / len(FILLERS), 0.5
    t[[PAD, EOS, DOT]] = 0.0
    t[[PAD, EOS, DOT], EOS] = 1.0
    return t


def oracle(response):
    return -1.0 if BAD in response else 1.0


def noisy_oracle(accuracy, seed):
    """Right with probability `accuracy`, independently per response (the search caches each response's score)."""
    g = torch.Generator().manual_seed(seed)
    return lambda response: oracle(response) * (1 if torch.rand((), generator=g).item() < accuracy else -1)


def param_hash(model):
    h = hashlib.sha256()
    for p in model.state_dict().values():
        h.update(p.numpy().tobytes())
    return h.hexdigest()


def test_backup_keeps_running_means():
    root, child = Node([], 1.0, -1), Node([3], 1.0, 0)
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    for score, e in [(1.0, e1), (-1.0, e2), (0.5, e1)]:
        backup([root, child], score, [None, e])
    assert root.n == child.n == 3 and child.visits == 3
    assert math.isclose(root.value, 0.5 / 3) and math.isclose(child.value, 0.5 / 3)
    assert torch.allclose(child.embedding, (2 * e1 + e2) / 3) and root.embedding is None


def test_similarity_update_moves_only_siblings_above_threshold():
    parent, node = Node([], 1.0, -1), Node([3], 0.5, 0)
    near, far = Node([4], 0.3, 0, n=1.0, value=-1.0), Node([5], 0.2, 0, n=1.0, value=-1.0)
    node.embedding = torch.tensor([1.0, 0.0])
    near.embedding = torch.tensor([0.96, math.sqrt(1 - 0.96 ** 2)])
    far.embedding = torch.tensor([0.94, math.sqrt(1 - 0.94 ** 2)])
    parent.children = [node, near, far]
    similarity_update([parent, node], 1.0, gamma=0.2, threshold=0.95)
    w = 0.2 * 0.96
    assert math.isclose(near.n, 1 + w, rel_tol=1e-6)
    assert math.isclose(near.value, (-1 + w) / (1 + w), rel_tol=1e-6)  # toward s = 1
    assert far.n == 1.0 and far.value == -1.0


def test_puct_visits_the_highest_prior_unvisited_child_first():
    parent = Node([], 1.0, -1, n=1.0)
    parent.children = [Node([t], 1.0, 0, prior=p) for t, p in zip([3, 4, 5], [0.2, 0.5, 0.3])]
    assert puct_select(parent, 2.0) is parent.children[1]
    parent.children[1].n, parent.children[1].value, parent.n = 1.0, -1.0, 2.0  # visited and bad
    assert puct_select(parent, 2.0) is parent.children[2]


def test_a_child_is_added_only_where_all_children_look_alike_and_score_badly():
    parent = Node([], 1.0, -1, n=3.0)
    parent.children = [Node([t], 0.5, 0, n=1.0, value=-0.5) for t in (3, 4)]
    for child, e in zip(parent.children, [[1.0, 0.0], [0.99, 0.14]]):
        child.embedding = torch.tensor(e)
    assert rain.needs_child(parent, 1)  # ||var|| = 0.0099 < 0.03
    parent.children[1].embedding = torch.tensor([0.0, 1.0])  # ||var|| = 0.71: different enough
    assert not rain.needs_child(parent, 1) and rain.needs_child(parent, 30)  # the bound grows with span length
    parent.children[1].embedding, parent.children[1].value = torch.tensor([0.99, 0.14]), 0.1
    assert not rain.needs_child(parent, 1)  # one child scores well
    parent.children[1].value = -0.5
    parent.children.append(Node([5], 0.1, 0))
    assert not rain.needs_child(parent, 1)  # one child not visited yet


def test_bad_child_is_visited_less_and_never_committed():
    """Child A (likelier) always scores -1, child B +1: B is the most visited after the inner loop, and committed."""
    t = torch.zeros(15, 15)
    t[:, EOS] = 1.0
    t[BOS], t[BOS, SURE], t[BOS, SORRY] = 0.0, 0.6, 0.4
    cfg = RainConfig(max_new_tokens=1)
    visits = {}

    def evaluate(response):
        return -1.0 if response == [SURE] else 1.0 if response == [SORRY] else -1.0
    response, score = search(bigram_model(t), [BOS], evaluate, cfg, torch.Generator().manual_seed(0), {EOS}, {DOT})
    assert response == [SORRY] and score == 1.0
    root = Node([], 1.0, -1)  # the same loop by hand: B's visits exceed A's
    root.children = [Node([SURE], 0.6, 0, True, prior=0.6), Node([SORRY], 0.4, 0, True, prior=0.4)]
    backup([root], -1.0, [None])
    for _ in range(20):
        child = puct_select(root, 2.0)
        backup([root, child], evaluate(child.tokens), [None, None])
        visits[child.tokens[0]] = child.visits
    assert rain.most_visited(root).tokens == [SORRY] and visits[SORRY] > visits[SURE]


def test_rewind_reuses_the_cache_and_matches_recompute(tmp_path):
    save_tiny(tmp_path, "llama3")
    model = load_model(tmp_path).eval()
    prompt, span_a, span_b = [5, 9, 11, 20, 7], [30, 31], [40, 41, 42]
    with torch.inference_mode():
        cache = KVCache(model.config, 1, 16, torch.float32, "cpu")
        rain.extend(model, cache, torch.tensor([prompt]))
        rain.extend(model, cache, torch.tensor([span_a]))
        cache.pos = len(prompt)  # rewind: the prompt's columns stay
        h = rain.extend(model, cache, torch.tensor([span_b]))
        full = model(torch.tensor([prompt + span_b]))
        torch.testing.assert_close(model.logits(h), full[:, len(prompt):], atol=1e-5, rtol=1e-5)
        rows = rain.copy_prefix(model, cache, 3, cache.pos, 1)  # expansion: three rows from the same state
        h = rain.extend(model, rows, torch.tensor([[50], [51], [52]]))
        for r in range(3):
            full = model(torch.tensor([prompt + span_b + [50 + r]]))[0, -1]
            torch.testing.assert_close(model.logits(h[r, -1]), full, atol=1e-5, rtol=1e-5)


def test_toy_rain_avoids_the_bad_token_without_touching_the_model():
    model = bigram_model(toy_table())
    before = param_hash(model)
    vanilla = generate(model, [[BOS]], 12, n=400, eos_token_id=EOS, seed=0).responses[0]
    harmful = sum(BAD in r for r in vanilla) / len(vanilla)
    assert 0.6 <= harmful <= 0.8, harmful

    grad_enabled = []
    model.register_forward_hook(lambda m, args, out: grad_enabled.append(torch.is_grad_enabled() or out.requires_grad))
    cfg, runs, rates = RainConfig(max_new_tokens=12), 60, {}
    for name, make in [("oracle", lambda k: oracle), ("80% right", lambda k: noisy_oracle(0.8, k))]:
        generator, costs, bad = torch.Generator().manual_seed(1), [], 0
        for k in range(runs):
            cost = rain.Cost()
            with rain.counting(model, cost):
                response, _ = search(model, [BOS], make(k), cfg, generator, {EOS}, {DOT}, cost)
            bad += BAD in response
            costs.append(cost.tokens / len(response))  # plain decoding: 1 + len - 1 tokens
        rates[name] = bad / runs
        print(f"toy, {name} evaluator: harmful {bad}/{runs} (vanilla {harmful:.2f}); "
              f"tokens {sum(costs) / runs:.1f}x plain decoding")
    # The 80%-right evaluator's rate is about 8%: 161/2000 = 8.1% over 10 seeds of 200 runs (95% interval 6.9-9.2%,
    # 5.5-10.5% by seed; benchmarks/rain_toy.py, RESULTS.md), below 10%, which 60 runs cannot resolve: hence < 20%
    # here, and the 1200-run test below for the 10%.
    # Every harmful answer there is a finished text scored +1 by mistake: a finished text gets no simulation, so its
    # cached score (per text, as in the released code and as a deterministic judge gives anyway) backs up the same +1
    # at every revisit and PUCT exploits it. Errors drawn per call, uncached, average out (1/600): another judge.
    # One-hot embeddings keep RAIN's similarity update from firing; fillers sharing one embedding (it fires) give
    # 138/2000 = 6.9% over the same 10 seeds (benchmarks/rain_toy.py --synonym-fillers).
    assert rates["oracle"] < 0.1 and rates["80% right"] < min(0.2, harmful / 3), rates
    assert param_hash(model) == before
    assert grad_enabled and not any(grad_enabled)  # no forward recorded an autograd graph
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.slow
def test_toy_rain_with_an_80_percent_right_evaluator_stays_below_10_percent_harmful():
    """The issue's target for the noisy evaluator, on enough runs to resolve it: seeds 0-5 of benchmarks/rain_toy.py
    (200 runs each, the evaluator's errors drawn per response and cached), 102 harmful of 1200 when measured there."""
    model, cfg, bad = bigram_model(toy_table()), RainConfig(max_new_tokens=12), 0
    for seed in range(6):
        generator = torch.Generator().manual_seed(seed)
        for k in range(200):
            response, _ = search(model, [BOS], noisy_oracle(0.8, 10**6 * seed + k), cfg, generator, {EOS}, {DOT},
                                 rain.Cost())
            bad += BAD in response
    print(f"toy, 80%-right evaluator: harmful {bad}/1200")
    assert bad / 1200 < 0.1, bad


def judge_model(tokenizer, answer_after):
    """A bigram judge over the test tokenizer: after token `last` it answers `answer_after[last]` ('a' or 'b')."""
    V = len(tokenizer)
    t = torch.full((V, V), 1.0 / V)
    for last, answer in answer_after.items():
        t[tokenizer.convert_tokens_to_ids(last)] = 0.0
        t[tokenizer.convert_tokens_to_ids(last), tokenizer.convert_tokens_to_ids(answer)] = 1.0
    return bigram_model(t)


def test_self_evaluation_reads_the_label_tokens_and_swaps_the_order(tokenizer, tmp_path):
    # the template ends on the option shown as (B): a bigram judge reads it (the test tokenizer lower-cases A/B)
    template, options = "{conversation}\n(A) {option_a} (B) {option_b}", ("y", "n")
    cases = {"good": ({"n": "a", "y": "b"}, 1.0), "bad": ({"n": "b", "y": "a"}, -1.0),
             "always (A)": ({"n": "a", "y": "a"}, 0.0)}
    for name, (answers, expected) in cases.items():
        evaluate = rain.self_evaluator(judge_model(tokenizer, answers), tokenizer, template, options)
        assert evaluate("hi", "sure.") == expected, name
    assert swap_score(True, False) == 0.0 and swap_score(True, True) == 1.0 and swap_score(False, False) == -1.0

    # a random model: the next-token logits the evaluator reads (template head from its cache, the two option
    # orders in one right-padded batch) equal a full forward of each order without any cache
    save_tiny(tmp_path, "qwen2")
    model = load_model(tmp_path).eval()
    evaluate, read, logits_of = rain.self_evaluator(model, tokenizer), [], model.logits
    model.logits = lambda h: read.append(logits_of(h)) or read[-1]
    head, tail = rain.HARM_TEMPLATE.split("{conversation}")
    for response in ["ok.", "no way, never", "here is how"]:
        evaluate("hi", response)
        for order, opts in enumerate([("harmless", "harmful"), ("harmful", "harmless")]):
            text = tail.replace("{option_a}", opts[0]).replace("{option_b}", opts[1])
            ids = tokenizer(head)["input_ids"] + tokenizer(f"Human: hi\nAssistant: {response}" + text,
                                                           add_special_tokens=False)["input_ids"]
            full = logits_of(model(torch.tensor([ids]), return_hidden=True)[0, -1])
            torch.testing.assert_close(read[-1][order], full, atol=1e-5, rtol=1e-5)


def test_command_line_writes_responses_scores_and_cost(tokenizer, tmp_path):
    save_model(init_model(dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               initializer_range=0.2, eos_token_id=tokenizer.eos_token_id), seed=0),
               tmp_path / "model", tokenizer)
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["hi", "tell me"]))
    (tmp_path / "judge.py").write_text("def judge(prompts, responses):\n    return [-len(r) for r in responses]\n")
    import sys
    sys.path.insert(0, str(tmp_path))
    for evaluator, dtype in [("self", "float32"), ("judge:judge", "float32"), ("self", "bfloat16")]:
        out = tmp_path / f"{evaluator[:4]}-{dtype}.jsonl"
        rain.main(["--model", str(tmp_path / "model"), "--prompts", str(tmp_path / "p.jsonl"), "--evaluator",
                   evaluator, "--output", str(out), "--max-new-tokens", "6", "--searches", "4", "--dtype", dtype])
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert [r["prompt"] for r in rows] == ["hi", "tell me"]
        for r in rows:
            assert -1 <= r["score"] <= 1 and r["cost"]["forwards"] > r["cost"]["plain_forwards"]
            assert r["cost"]["token_multiple"] == r["cost"]["tokens"] / r["cost"]["plain_tokens"] > 1
    # the reward evaluator scores against the model's greedy answer: that answer itself scores 0 for a function
    # reward and for a pairwise judge (both orders averaged), and a shorter answer beats it under `judge`
    model = load_model(tmp_path / "model").eval()
    greedy = generate(model, [rain.encode_prompt(tokenizer, "hi")], 6, temperature=0,
                      eos_token_id=tokenizer.eos_token_id)
    reference = rain.decode_response(tokenizer, greedy.responses[0][0])
    for spec in ["judge:judge", str(tmp_path / "model")]:
        evaluate = rain.reward_evaluator(spec, model, tokenizer, 6)
        assert abs(evaluate("hi", reference)) < 1e-6 and -1 <= evaluate("hi", "zz") <= 1
    assert reference  # so that one character less is a shorter answer: reward -len + 1 above the reference's
    assert rain.reward_evaluator("judge:judge", model, tokenizer, 6)("hi", reference[:-1]) == pytest.approx(
        2 / (1 + math.exp(-1)) - 1)
    sys.path.remove(str(tmp_path))
