"""RAIN: align a frozen model at inference time by search, self-evaluation and rewind (Li et al., ICLR 2024).

No gradient, no weight change. Nodes are token spans (1, 2, 4, then 10 tokens by depth) with prior p, fractional
visit count n, value v and embedding e; the root is the committed text. Each of up to T = 50 searches per span:
1. select by PUCT, argmax q + c p sqrt(n_parent) / (1 + n), adding a child where all children look alike and have
v < 0; 2. simulate to a sentence end; 3. evaluate the text, s in [-1, 1]; 4. back up n += 1, v += (s - v) / n,
e = mean embedding; 5. siblings X of path nodes Y with cos(e_X, e_Y) > 0.95 move toward s with weight 0.2 cos;
6. expand the leaf with up to 10 spans; 7. rewind. Commit the most-visited child once visits > 6 and v > 0.8.
One KV-cache row holds the committed text and the current path; a search recomputes only the spans that differ.
Unlike the released code (SafeAILab/RAIN): embeddings are our mean-pooled final hidden states, not Sentence-BERT
(which the 0.95 and 0.03 thresholds were tuned for); q = (v + 1) / 2; no few-shot block ships (--eval-template).

    python -m minirlhf.rain --model M --prompts prompts.jsonl --evaluator self --output out.jsonl
"""
import argparse
import json
import math
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from tqdm import tqdm

from minirlhf.checkpoint import load_model
from minirlhf.rundir import atomic_write_json, atomic_write_text
from minirlhf.data import load_dataset_any, split_row
from minirlhf.rewards import load_reward_source, pairwise_context, reward_kind
from minirlhf.sampler import KVCache, generate, mkl_packed, sample, sampling_logits
from minirlhf.tokenizer import decode_response, encode_prompt, load_tokenizer

SPAN_LENGTHS = (1, 2, 4, 10)
SENTENCE_END = ",.?:;\n"
HARM_TEMPLATE = ("Determine if the assistant's response is harmful. The given conversation should be evaluated "
                 "solely on its content.\n{conversation}\nOptions:\n(A) Assistant's response is {option_a}.\n"
                 "(B) Assistant's response is {option_b}.\nThe answer is: (")


@dataclass
class RainConfig:  # each field is also a command-line flag, with this help
    searches: int = field(default=50, metadata=dict(help="T: searches per committed span (>= 15 new unless stopped)"))
    min_searches: int = field(default=6, metadata=dict(help="T_m: an early stop needs more visits of the best child"))
    value_threshold: float = field(default=0.8, metadata=dict(help="V: an early stop needs a higher best-child value"))
    c: float = field(default=2.0, metadata=dict(help="PUCT exploration constant"))
    gamma: float = field(default=0.2, metadata=dict(help="similarity-update weight"))
    similarity: float = field(default=0.95, metadata=dict(help="cosine threshold of the similarity update"))
    children: int = field(default=10, metadata=dict(help="candidate spans per expansion"))
    top_k: int = field(default=15, metadata=dict(help="per-token top-k of sampled spans (simulations: no top-k)"))
    max_new_tokens: int = field(default=256, metadata=dict(help="response length limit"))
    max_sim_tokens: int = field(default=64, metadata=dict(help="simulation limit when no sentence ends"))


@dataclass
class Node:
    tokens: list[int]  # the span; the root's is empty (its text is committed)
    p: float  # p(span | path), the product of its token probabilities
    depth: int  # index of the span in the response (-1 for the first root): its children's span length
    terminal: bool = False  # ends with a stop id or at the length limit: never simulated nor expanded
    n: float = 0.0  # visits, fractional after similarity updates
    visits: int = 0  # real visits only (stopping rule)
    value: float = 0.0
    embedding: torch.Tensor | None = None  # (D,)
    children: list = field(default_factory=list)
    prior: float = 0.0  # p normalised over the siblings, mixed with uniform at the root (`set_priors`)


@dataclass
class Cost:
    forwards: int = 0  # calls of the model
    tokens: int = 0  # token positions computed, summed over rows
    evaluations: int = 0  # evaluator calls (responses not in the score cache)


def puct_select(node, c):
    """The child maximising q + c * p * sqrt(n_parent) / (1 + n), q = (v + 1) / 2 if visited else 0."""
    def key(child):
        q = (child.value + 1) / (2 + 1e-5) if child.n > 0 else 0.0
        return q + c * child.prior * math.sqrt(node.n) / (1 + child.n)
    return max(node.children, key=key)


def backup(path, score, embeddings):
    """Every node on the path (root first): n += 1, v += (s - v) / n, e += (emb - e) / visits."""
    for node, emb in zip(path, embeddings):
        node.n += 1
        node.visits += 1
        node.value += (score - node.value) / node.n
        if emb is not None:
            node.embedding = emb if node.embedding is None else node.embedding + (emb - node.embedding) / node.visits


def similarity_update(path, score, gamma=0.2, threshold=0.95):
    """Siblings X of each path node Y with cos(e_X, e_Y) > threshold move toward s with weight gamma * cos."""
    for parent, node in zip(path, path[1:]):
        for sibling in (c for c in parent.children if c is not node and c.embedding is not None):
            if (cos := F.cosine_similarity(sibling.embedding, node.embedding, dim=0).item()) > threshold:
                w = gamma * cos
                sibling.value, sibling.n = (sibling.value * sibling.n + w * score) / (sibling.n + w), sibling.n + w


def needs_child(node, span_length, max_children=20, var_scale=0.03):
    """The released code's `checkadd`: 2 to 19 children, all visited, all v < 0, ||Var(e)|| < 0.03 * span length."""
    kids = node.children
    if not 2 <= len(kids) < max_children or any(c.embedding is None for c in kids) or max(c.value for c in kids) >= 0:
        return False
    return torch.stack([c.embedding for c in kids]).var(0).norm().item() < var_scale * span_length


def set_priors(node, is_root):
    """Children's priors: p normalised; at the root 0.75 p + 0.25 uniform."""
    total = sum(c.p for c in node.children)
    for c in node.children:
        c.prior = 0.75 * (c.p / total) + 0.25 / len(node.children) if is_root else c.p / total


def most_visited(node):
    return max(node.children, key=lambda c: (c.n, c.value))


def swap_score(good_first, good_second):
    """+1 if both option orders pick the good option, -1 if both pick the bad one, 0 if they disagree."""
    return float(good_first) + float(good_second) - 1.0


def extend(model, cache, tokens):
    """tokens (R, T) appended at cache.pos (no padding) -> final hidden states (R, T, D); advances pos."""
    mask = torch.ones(tokens.shape[0], cache.pos + tokens.shape[1], dtype=torch.long, device=tokens.device)
    h = model(tokens, mask, kv_cache=cache, return_hidden=True)
    cache.pos += tokens.shape[1]
    return h


def copy_prefix(model, cache, rows, length, extra):
    """A new `rows`-row cache holding the first `length` columns of one-row `cache`, with room for `extra` more."""
    out = KVCache(model.config, rows, length + extra, cache.k[0].dtype, cache.k[0].device)
    for src, dst in zip(cache.k + cache.v, out.k + out.v):
        dst[:, :, :length] = src[:, :, :length]
    out.pos = length
    return out


def sample_spans(model, cache, logits, k, length, cfg, stop_ids, generator):
    """k spans of `length` tokens after `cache` (next-token logits (V,)): row 0 greedy, the others from the top-k
    -> (token lists cut after a stop id, sum of the token log-probs)."""
    exp = copy_prefix(model, cache, k, cache.pos, length)
    logits, spans, logp = logits.expand(k, -1), [], torch.zeros(k, device=logits.device)
    done = torch.zeros(k, dtype=torch.bool, device=logits.device)
    for t in range(length):
        tokens = sample(logits, generator, 1.0, cfg.top_k)[0]
        tokens[0] = logits[0].argmax()
        logps = sampling_logits(logits, top_k=cfg.top_k).log_softmax(-1)  # priors under the top-k too (as released)
        logp += torch.where(done, 0.0, logps.gather(1, tokens[:, None])[:, 0])
        spans.append(tokens)
        done |= torch.isin(tokens, stop_ids)
        if t + 1 == length or done.all():
            break
        logits = model.logits(extend(model, exp, tokens[:, None])[:, -1])
    rows, stops = torch.stack(spans, 1).tolist(), set(stop_ids.tolist())
    return [r[:next((i + 1 for i, t in enumerate(r) if t in stops), len(r))] for r in rows], logp.tolist()


@torch.inference_mode()
def search(model, prompt_ids, evaluate, cfg, generator, stop_ids, sentence_end, cost=None):
    """RAIN for one prompt (token ids). evaluate(response ids) -> score in [-1, 1]. -> (response ids, score)."""
    device, cost = model.output_weight().device, cost or Cost()
    stop_ids = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    stops, scores = set(stop_ids.tolist()), {}
    L = len(prompt_ids) + cfg.max_new_tokens + cfg.max_sim_tokens
    cache = KVCache(model.config, 1, L, model.output_weight().dtype, device)  # committed, path spans, simulation
    hidden = torch.zeros(L, model.config.hidden_size, dtype=cache.k[0].dtype, device=device)  # (L, D), written cols
    h = extend(model, cache, torch.tensor([prompt_ids], device=device))[0]
    cached, ends, logits = [], [cache.pos], [model.logits(h[-1])]  # path nodes in the cache, their ends, logits
    root, committed = Node([], 1.0, -1), []

    def score_of(response):
        if (key := tuple(response)) not in scores:
            scores[key], cost.evaluations = float(evaluate(response)), cost.evaluations + 1
        return scores[key]

    def goto(path):
        """Fill the cache with the spans of `path` (nodes below the root), reusing the shared head."""
        k = next((i for i, (a, b) in enumerate(zip(path, cached)) if a is not b), min(len(path), len(cached)))
        del cached[k:], ends[k + 1:], logits[k + 1:]
        cache.pos = ends[k]
        if k < len(path):
            tokens, start = [t for node in path[k:] for t in node.tokens], cache.pos
            hidden[start:start + len(tokens)] = extend(model, cache, torch.tensor([tokens], device=device))[0]
            cached.extend(path[k:])
            ends.extend([start + sum(len(n.tokens) for n in path[k:i]) for i in range(k + 1, len(path) + 1)])
            logits.extend(model.logits(hidden[[e - 1 for e in ends[k + 1:]]]))  # (spans, V): at each span's end

    def expand(path, k, response_len, keep=None):
        """Add to the leaf of `path` up to `keep` of k new spans: the top-k tokens, or the greedy span and distinct
        ones drawn from the top-k; p = product of top-k renormalised token probabilities (greedy's clipped)."""
        goto(path[1:])
        node = path[-1]
        length = min(SPAN_LENGTHS[min(node.depth + 1, 3)], cfg.max_new_tokens - response_len)
        if length == 1:
            probs = logits[-1].float().softmax(-1)
            top = probs.topk(min(k + len(node.children), probs.shape[0]))
            cands = [([t], p) for t, p in zip(top.indices.tolist(), top.values.tolist()) if p > 0]
        else:
            spans, logps = sample_spans(model, cache, logits[-1], k, length, cfg, stop_ids, generator)
            cands = list({tuple(s): (s, math.exp(lp)) for s, lp in reversed(list(zip(spans, logps)))}.values())[::-1]
            if len(cands) > 1:  # the released code's clip of the greedy prior against the distinct sampled ones
                rest = [p for _, p in cands[1:]]
                cands[0] = (cands[0][0], max(min(cands[0][1], sum(rest)), max(rest) + min(rest)))
        node.children += [Node(t, p, node.depth + 1, t[-1] in stops or response_len + len(t) >= cfg.max_new_tokens)
                          for t, p in cands if tuple(t) not in {tuple(c.tokens) for c in node.children}][:k][:keep]
        set_priors(node, node is path[0])

    def one_search():
        node, path, base = root, [root], len(committed)
        while node.children:  # 1. selection, with dynamic node addition
            if needs_child(node, length := SPAN_LENGTHS[min(node.depth + 1, 3)]):
                expand(path, 1 if length == 1 else 2, base, keep=1)
            path.append(node := puct_select(node, cfg.c))
            base += len(node.tokens)
        goto(path[1:])
        sim, step_logits = [], logits[-1]  # 2. simulation to the end of the sentence (none from a terminal leaf)
        while not node.terminal and base + len(sim) < cfg.max_new_tokens and len(sim) < cfg.max_sim_tokens:
            token = sample(step_logits[None], generator)[0].item()
            sim.append(token)
            if token in stops or token in sentence_end:
                break
            h = extend(model, cache, torch.tensor([[token]], device=device))[0, -1]
            hidden[cache.pos - 1], step_logits = h, model.logits(h)
        score = score_of(committed + [t for n in path[1:] for t in n.tokens] + sim)  # 3. evaluation
        embeddings = [None] + [F.normalize(hidden[e:cache.pos].float().mean(0), dim=0) for e in ends[:len(path) - 1]]
        backup(path, score, embeddings)  # 4.
        similarity_update(path, score, cfg.gamma, cfg.similarity)  # 5.
        if not node.terminal:  # 6. expansion (the cache is rewound to the leaf's end first)
            expand(path, cfg.children, base)

    while not root.terminal:
        for _ in range(root.visits, max(cfg.searches, root.visits + 15)):
            one_search()
            if (best := most_visited(root)).visits > cfg.min_searches and best.value > cfg.value_threshold:
                break
        root = most_visited(root)
        goto(list(cached) if cached and cached[0] is root else [root])  # commit: its span joins the fixed head
        committed += root.tokens
        del cached[0], ends[0], logits[0]
        set_priors(root, True)  # the kept subtree's root gets root priors
    return committed, score_of(committed)


def self_evaluator(model, tokenizer, template=HARM_TEMPLATE, options=("harmless", "harmful")):
    """The paper's self-evaluation -> evaluate(prompt, response) in {-1, 0, 1}. `template`: {conversation}, then
    {option_a}, {option_b}, ending where the model answers A or B; options = (good, bad). The head is cached once."""
    head, sep, tail = template.partition("{conversation}")
    if not sep or "{option_a}" in head or "{option_b}" in head:
        raise ValueError("the evaluation template needs {conversation} before {option_a} and {option_b}")
    tails = [tail.replace("{option_a}", a).replace("{option_b}", b) for a, b in (options, options[::-1])]
    # the letters as the model reads them right after the template's end
    end, *with_letters = (tokenizer(tails[0] + s, add_special_tokens=False)["input_ids"] for s in ("", "A", "B"))
    for letter, with_letter in zip("AB", with_letters):
        if with_letter[:-1] != end:
            raise ValueError(f"{letter!r} is not one token after the evaluation template's end {tails[0][-20:]!r}")
    label_ids = [w[-1] for w in with_letters]
    if label_ids[0] == label_ids[1] or label_ids[0] == tokenizer.unk_token_id:
        raise ValueError(f"the letters A and B read as the token ids {label_ids} after the evaluation template")
    device = model.output_weight().device
    head_ids = tokenizer(head)["input_ids"]  # the template's head carries the BOS, if the tokenizer adds one
    with torch.inference_mode():
        head_cache = KVCache(model.config, 1, len(head_ids), model.output_weight().dtype, device)
        if head_ids:
            extend(model, head_cache, torch.tensor([head_ids], device=device))

    @torch.inference_mode()
    def evaluate(prompt, response):
        conversation = f"Human: {pairwise_context(prompt)}\nAssistant: {response}"
        rows = [tokenizer(conversation + t, add_special_tokens=False)["input_ids"] for t in tails]
        T = max(map(len, rows))
        ids = torch.tensor([r + [r[-1]] * (T - len(r)) for r in rows], device=device)  # right padding: never read
        cache = copy_prefix(model, head_cache, 2, len(head_ids), T)
        h = extend(model, cache, ids)[torch.arange(2), torch.tensor([len(r) - 1 for r in rows])]  # (2, D)
        label_logits = model.logits(h)[:, label_ids]  # (order, [A, B]): order 0 shows the good option as (A)
        return swap_score(label_logits[0, 0] > label_logits[0, 1], label_logits[1, 1] > label_logits[1, 0])
    return evaluate


def reward_evaluator(spec, model, tokenizer, max_new_tokens, scale=1.0):
    """A reward source of `rewards.py` -> evaluate(prompt, response) = 2 P(response > `model`'s greedy one) - 1; P is
    a pairwise model's probability, or sigmoid((r - r_ref) / scale) for a BT model or a function."""
    reward_fn = load_reward_source(spec)
    pairwise = reward_kind(spec) == "pairwise"
    references = {}  # prompt -> (greedy response, its reward)

    def evaluate(prompt, response):
        if (key := json.dumps(prompt)) not in references:
            greedy = generate(model, [encode_prompt(tokenizer, prompt)], max_new_tokens, temperature=0,
                              eos_token_id=tokenizer.eos_token_id)
            ref = decode_response(tokenizer, greedy.responses[0][0])
            references[key] = ref, None if pairwise else reward_fn([prompt], [[ref]])[0][0]
        ref, ref_reward = references[key]
        if pairwise:
            return 2 * reward_fn([prompt], [[response, ref]])[0][0] - 1
        return 2 / (1 + math.exp(-(reward_fn([prompt], [[response]])[0][0] - ref_reward) / scale)) - 1
    return evaluate


def counting(model, cost):
    """`with counting(model, cost):` counts the model's calls and token positions (input_ids (R, T): R * T)."""
    def hook(module, args, kwargs, output):
        cost.forwards += 1
        cost.tokens += (args[0] if args else kwargs["input_ids"]).numel()
    return model.register_forward_hook(hook, with_kwargs=True)  # the handle removes the hook on exit


def align(model, tokenizer, prompts, evaluator, cfg=RainConfig(), seed=0, progress=False):
    """RAIN-decode `prompts` (strings or messages); evaluator(prompt, response) in [-1, 1] -> (texts, scores, costs)."""
    generator = torch.Generator(model.output_weight().device).manual_seed(seed)
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])  # a simulation stops after a sentence end
    sentence_end = {i for i, t in enumerate(texts) if t.rstrip(" ")[-1:] in set(SENTENCE_END) and t.strip(" ")}
    responses, scores, costs = [], [], []
    with mkl_packed(model):  # thousands of small forwards per prompt: pack the weights once (sampler.py)
        for prompt in tqdm(prompts, desc="rain", disable=not progress):
            prompt_ids, cost = encode_prompt(tokenizer, prompt), Cost()
            with counting(model, cost):
                ids, score = search(model, prompt_ids, lambda r: evaluator(prompt, decode_response(tokenizer, r)),
                                    cfg, generator, {tokenizer.eos_token_id}, sentence_end, cost)
            pf, pt = len(ids), len(prompt_ids) + len(ids) - 1
            costs.append(asdict(cost) | dict(plain_forwards=pf, plain_tokens=pt, forward_multiple=cost.forwards / pf,
                                             token_multiple=cost.tokens / pt))
            responses.append(decode_response(tokenizer, ids))
            scores.append(score)
    return responses, scores, costs


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--model", required=True, help="Hugging Face folder of the frozen causal LM to decode")
    p.add_argument("--prompts", required=True, help="dataset (.jsonl/.json/.parquet/save_to_disk folder) of prompts")
    p.add_argument("--prompt-column", default="prompt", help="column of --prompts holding a string or chat messages")
    p.add_argument("--limit", type=int, help="decode only the first N prompts")
    p.add_argument("--evaluator", default="self", help="'self', or a BT/pairwise model folder or module:function")
    p.add_argument("--output", required=True, help="JSONL out: prompt, response, score, cost per prompt")
    p.add_argument("--eval-template", help="self-evaluation template file; default: the paper's harm template")
    p.add_argument("--eval-options", default="harmless,harmful", help="self-evaluation option words, good,bad")
    p.add_argument("--reward-scale", type=float, default=1.0, help="BT/function evaluator: reward temperature")
    for f in fields(RainConfig):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default, **f.metadata)
    p.add_argument("--seed", type=int, default=0, help="seed of every draw")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="device of the model")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="model dtype")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, dtype=getattr(torch, args.dtype), device=args.device).eval()
    prompts = [split_row(row, args.prompt_column, [])[0] for row in load_dataset_any(args.prompts)][:args.limit]
    if args.evaluator == "self":
        template = open(args.eval_template).read() if args.eval_template else HARM_TEMPLATE
        evaluator = self_evaluator(model, tokenizer, template, tuple(args.eval_options.split(",")))
    else:
        evaluator = reward_evaluator(args.evaluator, model, tokenizer, args.max_new_tokens, args.reward_scale)
    cfg = RainConfig(**{f.name: getattr(args, f.name) for f in fields(RainConfig)})
    responses, scores, costs = align(model, tokenizer, prompts, evaluator, cfg, args.seed, progress=True)
    atomic_write_text(args.output, "".join(json.dumps(dict(prompt=p, response=r, score=s, cost=c)) + "\n"
                                           for p, r, s, c in zip(prompts, responses, scores, costs)))
    atomic_write_json(args.output + ".args.json", vars(args))
    mean = {k: sum(c[k] for c in costs) / max(len(costs), 1) for k in ("forward_multiple", "token_multiple")}
    print(f"{len(prompts)} prompts, mean score {sum(scores) / max(len(scores), 1):.3f}; cost vs plain decoding: "
          f"{mean['forward_multiple']:.1f}x forwards, {mean['token_multiple']:.1f}x tokens; wrote {args.output}")


if __name__ == "__main__":
    main()
