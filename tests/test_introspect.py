"""bench/introspect.py: the introspective acceptance rate of every family, scored on every generated token,
against references built from the definition (tiny float64 models): each committed token's q
rebuilt by plain forwards from the trace of what ISD kept, p by one plain causal forward per token."""
import random
from types import SimpleNamespace

import pytest
import torch

from bench import introspect
from decoding import SamplingParams
from isd import Request, decode
from sampling import process_logits
from reference import V23, tiny_model

V = V23["vocab"]  # tiny_model(**V23)'s vocabulary; MASK = V - 1 = 22
MASK = V - 1


def settings(temperature, top_k=None, top_p=None, n=14):
    return SimpleNamespace(temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=n)


def dist(logits, a):
    """The distribution a token is drawn from under the settings a, from the definition."""
    f = process_logits(logits, MASK, a.temperature, a.top_k, a.top_p)
    if a.temperature == 0:
        return torch.nn.functional.one_hot(f.argmax(-1), V).double()
    return torch.softmax(f / a.temperature, -1)


def test_acceptance_matches_formula():
    g = torch.Generator().manual_seed(0)
    p, q = torch.rand(6, V, generator=g, dtype=torch.float64), torch.rand(6, V, generator=g, dtype=torch.float64)
    p, q = p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)
    x = torch.randint(0, V, (6,), generator=g)
    got = introspect.introspective_acceptance(p, q, x)
    for i in range(6):
        assert float(got[i]) == pytest.approx(min(1.0, float(p[i, x[i]]) / float(q[i, x[i]])), abs=1e-15)


@pytest.mark.parametrize("a", [settings(1.0), settings(0.7), settings(1.0, top_k=8, top_p=0.9)])
def test_ar_model_scores_exactly_one(a):
    """The identity: an AR model sampled from its own (filtered) distribution scores 1 on every token,
    q recorded from the KV-cached decode, p from one uncached forward; a diffusion LM reading the same
    tokens does not (the metric can tell)."""
    model = tiny_model(seed=5, **V23)
    prompt = [3, 1, 4]
    out, q, parallel, st = introspect.generate(model, "ar", prompt, a, 2, {"stride": 1})
    assert len(out) == a.max_new_tokens == st.forwards and parallel is None
    acc = introspect.scores(a, model, "ar", {}, prompt, out, q)
    assert torch.allclose(acc, torch.ones_like(acc), atol=1e-12, rtol=0)
    assert introspect.scores(a, model, "dlm", {"block": 4}, prompt, out, q).mean() < 0.9


def reference_drawn_from(model, prompt, trace, stride, a):
    """What each token ISD committed was drawn from, rebuilt from its trace with plain causal forwards.
    The drafts a forward verifies were proposed by masks that see every committed token but the last
    (the forward's pending token) and sit where the pending token and the next ones are: the forward
    [committed[:-1], MASK x (N-1)], whose mask m drafts d_{m+1}. An accepted draft was drawn from its
    mask's q, a correction from normalize((p - q)+) at the first rejected draft, a clean token from p,
    p being the next-token distribution after everything committed before it."""
    done, rows = list(prompt), []
    for step in trace:
        prefix = done[:-1]
        q = model(torch.tensor([prefix + [MASK] * (stride - 1)]))[0, len(prefix):]
        for i, (t, kind) in enumerate(x for x in step if x[1] != "rejected"):
            p = dist(model(torch.tensor([done]))[0, -1], a)
            if kind == "accepted":
                rows.append(dist(q[i], a))
            elif kind == "correction":
                excess = (p - dist(q[i], a)).clamp(min=0)
                rows.append(excess / excess.sum() if excess.sum() > 0 else p)
            else:
                rows.append(p)
            done.append(t)
    return done[len(prompt):], rows


@pytest.mark.parametrize("a,stride,seed", [(settings(1.0, n=20), 4, 1), (settings(0.8, top_k=6, top_p=0.9, n=20), 3, 2),
                                           (settings(0.0, n=20), 4, 3)])
def test_isd_records_what_each_committed_token_was_drawn_from(a, stride, seed):
    model = tiny_model(seed=6, **V23)
    prompt = [1, 2, 3]
    r = Request(prompt,
                SamplingParams(a.max_new_tokens, a.temperature, a.top_k, a.top_p, seed),
                trace=[], drawn_from=[])
    decode(model, [r], stride)
    kinds = {k for step in r.trace for _, k in step}
    assert {"accepted", "clean"} <= kinds and (a.temperature == 0 or "correction" in kinds)
    out, ref = reference_drawn_from(model, prompt, r.trace, stride, a)
    assert out == r.out and len(r.drawn_from) == len(ref) == len(out)
    for got, want in zip(r.drawn_from, ref):
        assert torch.allclose(got, want, atol=1e-10, rtol=0)
    # and the metric reads them: clean tokens score 1, and ISD's output is scored token by token
    acc = introspect.scores(a, model, "idlm", {}, prompt, r.out, torch.stack(r.drawn_from))
    clean = torch.tensor([k == "clean" for step in r.trace for _, k in step if k != "rejected"])
    assert len(acc) == len(out) and torch.allclose(acc[clean], torch.ones(int(clean.sum()), dtype=acc.dtype))


def test_implied_draft_acceptance_against_simulation():
    """The per-draft acceptance that the paper's TPF implies, checked by simulating the paper's window:
    a verify forward keeps its N-1 drafts independently with probability a up to the first rejection
    (commits j+1, then a cold start commits 1), or all of them (commits N)."""
    a = introspect.implied_draft_acceptance(2.93, 4)
    rng, tokens, forwards, cold = random.Random(0), 0, 0, False
    for _ in range(200_000):
        forwards += 1
        if cold:
            tokens, cold = tokens + 1, False
            continue
        j = next((j for j in range(3) if rng.random() >= a), 3)
        tokens, cold = tokens + j + 1, j < 3
    assert 0.85 < a < 0.95 and tokens / forwards == pytest.approx(2.93, abs=0.01)
