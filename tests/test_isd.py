"""Tests of isd.py (docs/method.md sections 2 and 3) against independent references.

The references are written from the method (docs/method.md), not from isd.py, in tests/reference.py
(shared with the other test modules) or here:
  - greedy decoding by full forwards without a cache (MASK logit excluded, argmax);
  - the exact autoregressive distribution of a short continuation, enumerated sequence by sequence
    with full forwards and temperature / top-k / top-p processing re-implemented in tests/reference.py;
  - a chi-square goodness-of-fit test whose p-value comes from the regularized upper incomplete
    gamma function (no scipy), itself checked against closed forms here;
  - KV caches filled by one plain forward of the committed tokens.
All models are tiny random float64 models, their weights scaled up so that next-token
distributions are peaked and drafts are sometimes accepted and sometimes rejected.

False-failure rate of the statistical checks: each chi-square check asserts p > 1e-4, so with fresh
randomness one check fails wrongly with probability 1e-4. Every seed here is fixed, so the tests are
deterministic: they either always pass or always fail for a given isd.py.
"""
import math
import os
import sys
from collections import Counter

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import isd  # noqa: E402
import sampling  # noqa: E402
from isd import Request, ar_generate, decode, isd_generate, isd_step, prefill, verify  # noqa: E402
from model import Model  # noqa: E402
from reference import (N_SAMPLES, P_MIN, P_WRONG, SAMPLE_PROMPT, brute_greedy, chi2_pvalue, chi2_sf,  # noqa: E402
                       exact_continuations, full_logits, isd_samples, ref_probs, sampling_model, tiny_model)
from decoding import SamplingParams  # noqa: E402


# ----------------------------------------------------------------------------------------------
# helpers

@torch.no_grad()
def isd_traced(model, prompt, n, stride, temperature=1.0, top_k=None, top_p=None, seed=None, stop_ids=()):
    """isd_generate's (tokens, Stats), and the trace of every forward."""
    r = Request(list(prompt),
                SamplingParams(n, temperature, top_k, top_p, seed, stop_ids=tuple(stop_ids)),
                trace=[])
    decode(model, [r], stride)
    return r.out, r.stats, r.trace


def gumbel(gen, shape):
    return -torch.log(-torch.log(torch.rand(shape, generator=gen, dtype=torch.float64)))


def test_chi2_helper_against_closed_forms():
    """The p-value helper itself: df=2 gives exp(-x/2); df=1 gives erfc(sqrt(x/2))."""
    for x in (0.1, 1.0, 3.7, 12.0):
        assert abs(chi2_sf(x, 2) - math.exp(-x / 2)) < 1e-12
        assert abs(chi2_sf(x, 1) - math.erfc(math.sqrt(x / 2))) < 1e-12
    probs = {"a": 0.5, "b": 0.3, "c": 0.2}
    assert chi2_pvalue({"a": 500, "b": 300, "c": 200}, probs) == pytest.approx(1.0)
    assert chi2_pvalue({"a": 600, "b": 250, "c": 150}, probs) < 1e-6
    assert chi2_pvalue({"z": 1, "a": 99}, {"a": 0.5, "b": 0.5, "z": 0.0}) == 0.0


# ----------------------------------------------------------------------------------------------
# 1. greedy ISD == brute-force greedy == greedy AR

GREEDY_MODELS = [(1, 16, 0.5), (1, 8, 0.5), (2, 24, 0.3)]  # seed, vocab, std
STRIDES = (1, 2, 3, 4, 6)
LENGTHS = (7, 13, 23)  # not multiples of the strides (except 1)


def test_greedy_isd_equals_bruteforce_and_ar():
    rounds = Counter()
    mid_window_stops = 0
    for seed, V, std in GREEDY_MODELS:
        model = tiny_model(seed, V, std)
        prompts = [[3], [V - 2, 0], [1, 5, 2, 6, 0, 4, 2]]
        for a, prompt in enumerate(prompts):
            ref = brute_greedy(model, prompt, 23)
            assert len(set(ref)) >= 3  # not a degenerate repetitive continuation
            for n in LENGTHS:
                assert ar_generate(model, prompt, SamplingParams(n, temperature=0)) == ref[:n]
            for b, N in enumerate(STRIDES):
                out, st, trace = isd_traced(model, prompt, 23, stride=N, temperature=0)
                assert out == ref, (seed, prompt, N)
                assert st.tokens == 23
                if N > 1:
                    rounds.update({k: getattr(st, k) for k in ("rounds_v", "rounds_r", "rounds_c")})
                n = LENGTHS[(a + b) % 2]  # 7 or 13: a length ending inside a window
                assert isd_generate(model, prompt,
                                    SamplingParams(n, temperature=0), stride=N)[0] == ref[:n], (seed, prompt, n, N)
                # stop ids: a token whose FIRST occurrence in the reference is committed in the
                # middle of an ISD step (not the step's last token), so the step's tail must be
                # dropped; else the token the reference emits at position 5
                stop, at = None, 0
                for step in trace:
                    step = [x for x in step if x[1] != "rejected"]  # committed tokens only
                    for t, (tok, _) in enumerate(step):
                        if stop is None and t < len(step) - 1 and ref.index(tok) == at + t:
                            stop = tok
                    at += len(step)
                if stop is None:
                    stop = ref[5]
                else:
                    mid_window_stops += 1
                want = ref[:ref.index(stop) + 1]
                got, st = isd_generate(model, prompt, SamplingParams(23, temperature=0, stop_ids=[stop]), stride=N)
                assert got == want, (seed, prompt, N, stop)
                assert st.tokens == len(want)
                if b == 0:
                    assert ar_generate(model, prompt, SamplingParams(23, temperature=0, stop_ids=[stop])) == want
                if b == 2:
                    # an unused stop id changes nothing; several stop ids: the first one met wins
                    unused = [t for t in range(V - 1) if t not in ref]
                    assert isd_generate(model, prompt,
                                        SamplingParams(23, temperature=0, stop_ids=unused), stride=N)[0] == ref
                    two = [ref[9], ref[3]]
                    first = min(ref.index(t) for t in two)
                    assert isd_generate(model, prompt,
                                        SamplingParams(23, temperature=0, stop_ids=two), stride=N)[0] == ref[:first + 1]
    # the comparisons exercised both fully accepted and rejected verify steps
    assert rounds["rounds_v"] > 0 and rounds["rounds_r"] > 0, rounds
    assert mid_window_stops >= 5, mid_window_stops


def test_stride_one_is_plain_ar():
    model = tiny_model(0, 16)
    for temperature, seed in ((0, None), (1.0, 5)):
        out, st, trace = isd_traced(model, [2, 7, 1], 17, stride=1, temperature=temperature,
                                      seed=seed)
        assert len(out) == 17
        assert st.tpf == 1.0
        assert st.forwards == st.rounds_c == 17
        assert st.rounds_v == st.rounds_r == st.drafts_verified == 0
        assert len(trace) == 17 and all(len(s) == 1 and s[0][1] == "clean" for s in trace)
        assert [s[0][0] for s in trace] == out


def test_narrow_window_greedy_equals_bruteforce_and_cold_starts_after_rejections():
    """The narrow window (masks after the last draft only) gives the same tokens; after each
    rejection the next forward has no drafts (a cold start: one clean token)."""
    rounds = Counter()
    for seed, V, std in GREEDY_MODELS:
        model = tiny_model(seed, V, std)
        for prompt in ([3], [V - 2, 0], [1, 5, 2, 6, 0, 4, 2]):
            ref = brute_greedy(model, prompt, 23)
            for N in STRIDES:
                assert isd_generate(model, prompt,
                                    SamplingParams(23, temperature=0),
                                    stride=N, narrow=True)[0] == ref, (seed, prompt, N)
                stop = ref[9]
                assert isd_generate(model, prompt,
                                    SamplingParams(23, temperature=0, stop_ids=[stop]), stride=N, narrow=True)[0] == \
                    ref[:ref.index(stop) + 1]
                r = Request(list(prompt), SamplingParams(23, temperature=0.0), trace=[])
                decode(model, [r], N, narrow=True)
                kinds = [[k for _, k in step if k != "rejected"] for step in r.trace]
                for before, after in zip(kinds, kinds[1:]):
                    if "correction" in before:
                        assert after == ["clean"]  # a cold start
                rounds.update(rounds_v=r.stats.rounds_v, rounds_r=r.stats.rounds_r, rounds_c=r.stats.rounds_c)
    assert rounds["rounds_v"] > 0 and rounds["rounds_r"] > 0 and rounds["rounds_c"] > rounds["rounds_r"] // 2, rounds


def test_narrow_layout_is_the_wide_one_without_the_other_groups():
    """The narrow window's positions and attention are the wide window's rows and columns of the clean
    tokens and of group K (padding sees only itself in both)."""
    for N in (2, 3, 4, 5):
        for K in (0, N - 1):
            pos_w, mask_w = isd.window_layout(N, K)
            pos_n, mask_n = isd.window_layout(N, K, narrow=True)
            assert len(pos_n) == isd.window_size(N, narrow=True) == 2 * N - 1
            g = isd.group_rows(N, K, K)
            keep = list(range(K + 1)) + list(range(g.start, g.stop))
            assert isd.group_rows(N, K, K, narrow=True) == slice(K + 1, K + N)
            assert torch.equal(pos_n[:len(keep)], pos_w[keep])
            assert torch.equal(mask_n[:len(keep), :len(keep)], mask_w[keep][:, keep])
            pad = len(keep)
            assert torch.equal(mask_n[pad:], torch.eye(2 * N - 1, dtype=torch.bool)[pad:])


# ----------------------------------------------------------------------------------------------
# 2. sampling exactness: ISD's continuation distribution == the enumerated AR distribution

EXACT_CASES = [  # (temperature, top_k, top_p, stride, new tokens)
    (1.0, None, None, 2, 3),
    (1.0, None, None, 3, 3),
    (0.7, None, None, 4, 4),  # 4 new tokens: all three drafts of a full window count
    (1.0, 3, None, 2, 3),
    (1.0, None, 0.8, 3, 3),
]
EXTRA_CASES = [  # the rest of the grid, run with -m slow
    (1.0, None, None, 4, 4),
    (0.7, None, None, 4, 3),
    (0.7, None, None, 2, 3),
    (0.7, None, None, 3, 3),
    (1.0, 3, None, 3, 3),
    (1.0, 3, None, 4, 3),
    (1.0, None, 0.8, 2, 3),
    (1.0, None, 0.8, 4, 3),
]


def _check_exact(temperature, top_k, top_p, stride, n, narrow=False):
    model = sampling_model()
    dist = exact_continuations(model, SAMPLE_PROMPT, n, temperature, top_k, top_p)
    counts, tot = isd_samples(model, SAMPLE_PROMPT, n, stride, N_SAMPLES, temperature, top_k, top_p,
                              seed0=1000 * stride + n, narrow=narrow)
    pval = chi2_pvalue(counts, dist)
    # both branches of verification were exercised (narrow: and cold starts after rejections)
    assert tot["rounds_r"] > 0 and tot["rounds_v"] > 0, tot
    assert not narrow or tot["rounds_c"] > N_SAMPLES, tot
    assert pval > P_MIN, (pval, tot)
    return pval


@pytest.mark.parametrize("temperature,top_k,top_p,stride,n", EXACT_CASES)
def test_isd_samples_the_exact_ar_distribution(temperature, top_k, top_p, stride, n):
    _check_exact(temperature, top_k, top_p, stride, n)


@pytest.mark.slow
@pytest.mark.parametrize("temperature,top_k,top_p,stride,n", EXTRA_CASES)
def test_isd_samples_the_exact_ar_distribution_more(temperature, top_k, top_p, stride, n):
    _check_exact(temperature, top_k, top_p, stride, n)


@pytest.mark.parametrize("temperature,top_k,top_p,stride,n", [(1.0, None, None, 2, 4), (0.7, None, 0.9, 3, 4)])
def test_narrow_window_samples_the_exact_ar_distribution(temperature, top_k, top_p, stride, n):
    _check_exact(temperature, top_k, top_p, stride, n, narrow=True)


def test_ar_generate_samples_the_exact_ar_distribution():
    model = sampling_model()
    dist = exact_continuations(model, SAMPLE_PROMPT, 2, 1.0)
    counts = Counter(tuple(ar_generate(model, SAMPLE_PROMPT, SamplingParams(2, temperature=1.0, seed=s)))
                     for s in range(400))
    assert chi2_pvalue(counts, dist) > P_MIN


def _always_accept(real_verify):
    def wrong(p_logits, q_logits, drafts, u, gumbel_noise, temperature):
        acc, cor, ratio = real_verify(p_logits, q_logits, drafts, u, gumbel_noise, temperature)
        return torch.ones_like(acc), cor, ratio
    return wrong


def _argmax_drafts(real_sample):
    def wrong(logits, temperature, generator=None):
        if logits.dim() == 2:  # the draft call: q of shape (N-1, V); q itself stays stored
            return logits.argmax(-1)
        return real_sample(logits, temperature, generator)
    return wrong


@pytest.mark.parametrize("rule", ["always_accept", "argmax_drafts"])
def test_wrong_acceptance_rules_fail_the_same_check(monkeypatch, rule):
    """Power: the chi-square check rejects ISD with a broken rule (same model, case and size)."""
    if rule == "always_accept":
        monkeypatch.setattr(isd, "verify", _always_accept(isd.verify))
    else:
        monkeypatch.setattr(isd, "sample", _argmax_drafts(isd.sample))
    model = sampling_model()
    temperature, stride, n = 1.0, 3, 3
    dist = exact_continuations(model, SAMPLE_PROMPT, n, temperature)
    counts, _ = isd_samples(model, SAMPLE_PROMPT, n, stride, N_SAMPLES // 2, temperature, seed0=77)
    assert chi2_pvalue(counts, dist) < P_WRONG  # with half the samples of the exact checks


# ----------------------------------------------------------------------------------------------
# 3. verify() on hand-made distributions

P_LOGITS = torch.tensor([2.0, 0.5, -1.0, 1.0, 0.0], dtype=torch.float64)
Q_LOGITS = torch.tensor([0.0, 1.5, 0.5, 1.0, -0.5], dtype=torch.float64)
P2_LOGITS = torch.tensor([-0.5, 1.0, 0.3, -math.inf, 1.2], dtype=torch.float64)  # a filtered p
Q2_LOGITS = torch.tensor([1.0, 0.2, -0.4, 0.9, 0.0], dtype=torch.float64)


def _probs(logits):
    w = [math.exp(float(x)) if x != -math.inf else 0.0 for x in logits]
    return [x / sum(w) for x in w]


def _residual(p, q):
    r = [max(0.0, a - b) for a, b in zip(p, q)]
    return [x / sum(r) for x in r]


def test_verify_corrections_follow_the_residual():
    """Forced rejections (u = 1): corrections ~ normalize((p-q)+), row by row, for two interleaved
    (p, q) pairs; the same counts are far from p itself (the check has power)."""
    R = 6000
    gen = torch.Generator().manual_seed(0)
    pairs = [(P_LOGITS, Q_LOGITS), (P2_LOGITS, Q2_LOGITS)]
    p_rows = torch.stack([pairs[i % 2][0] for i in range(R)])
    q_rows = torch.stack([pairs[i % 2][1] for i in range(R)])
    # drafts where q(d) > p(d) (ratio < 1, so u = 1 always rejects)
    bad = [[t for t in range(5) if _probs(q)[t] > _probs(p)[t]] for p, q in pairs]
    drafts = torch.tensor([bad[i % 2][(i // 2) % len(bad[i % 2])] for i in range(R)])
    u = torch.ones(R, dtype=torch.float64)
    acc, cor, ratio = verify(p_rows, q_rows, drafts, u, gumbel(gen, (R, 5)), 1.0)
    assert not acc.any()
    for k, (pl, ql) in enumerate(pairs):
        p, q = _probs(pl), _probs(ql)
        sel = torch.arange(R) % 2 == k
        want_ratio = torch.tensor([min(1.0, p[d] / q[d]) for d in drafts[sel].tolist()], dtype=torch.float64)
        assert torch.allclose(ratio[sel], want_ratio, atol=1e-12)
        counts = Counter(cor[sel].tolist())
        res = _residual(p, q)
        assert chi2_pvalue(counts, dict(enumerate(res))) > P_MIN
        assert chi2_pvalue(counts, dict(enumerate(p))) < P_WRONG
    # a token that p filtered out (-inf) is never the correction
    assert not (cor[1::2] == 3).any()


def test_verify_accept_rule_and_output_distribution():
    """Drafts d ~ q, u ~ U(0,1): accept == (u < min(1, p(d)/q(d))) and the output
    (d if accepted else the correction) is distributed as p: the identity that makes ISD exact."""
    R = 6000
    gen = torch.Generator().manual_seed(1)
    for pl, ql in ((P_LOGITS, Q_LOGITS), (P2_LOGITS, Q2_LOGITS), (Q_LOGITS, P_LOGITS)):
        p, q = _probs(pl), _probs(ql)
        drafts = torch.multinomial(torch.tensor(q), R, replacement=True, generator=gen)
        u = torch.rand(R, generator=gen, dtype=torch.float64)
        acc, cor, ratio = verify(pl.expand(R, 5).clone(), ql.expand(R, 5).clone(), drafts, u,
                                 gumbel(gen, (R, 5)), 1.0)
        want_ratio = torch.tensor([min(1.0, p[d] / q[d]) for d in drafts.tolist()], dtype=torch.float64)
        assert torch.allclose(ratio, want_ratio, atol=1e-12)
        assert torch.equal(acc, u < want_ratio)
        assert 0 < acc.sum() < R  # both outcomes occur
        out = torch.where(acc, drafts, cor)
        assert chi2_pvalue(Counter(out.tolist()), dict(enumerate(p))) > P_MIN
        assert chi2_pvalue(Counter(drafts.tolist()), dict(enumerate(p))) < P_WRONG  # q is not p


def test_verify_equal_p_q_accepts_everything_and_falls_back_to_p():
    R = 6000
    gen = torch.Generator().manual_seed(2)
    p = _probs(P_LOGITS)
    rows = P_LOGITS.expand(R, 5).clone()
    drafts = torch.randint(0, 5, (R,), generator=gen)
    u = torch.rand(R, generator=gen, dtype=torch.float64)
    u[:5] = torch.tensor([0.0, 0.5, 0.9, 0.999999, 1 - 1e-15], dtype=torch.float64)
    acc, cor, ratio = verify(rows, rows.clone(), drafts, u, gumbel(gen, (R, 5)), 1.0)
    assert acc.all()
    assert torch.all(ratio == 1.0)
    # (p-q)+ is all zero: the correction (used if u = 1 forced a rejection) falls back to p
    acc, cor, _ = verify(rows, rows.clone(), drafts, torch.ones(R, dtype=torch.float64),
                         gumbel(gen, (R, 5)), 1.0)
    assert not acc.any()
    assert chi2_pvalue(Counter(cor.tolist()), dict(enumerate(p))) > P_MIN


def test_verify_greedy():
    gen = torch.Generator().manual_seed(3)
    R, V = 400, 7
    p_logits = torch.randn(R, V, generator=gen, dtype=torch.float64)
    q_logits = torch.randn(R, V, generator=gen, dtype=torch.float64)
    best = [max(range(V), key=lambda t: float(p_logits[i, t])) for i in range(R)]
    drafts = torch.tensor([best[i] if i % 3 == 0 else (best[i] + 1 + i % (V - 1)) % V for i in range(R)])
    acc, cor, _ = verify(p_logits, q_logits, drafts, torch.zeros(R, dtype=torch.float64),
                         torch.zeros(R, V, dtype=torch.float64), 0)
    assert acc.tolist() == [drafts[i].item() == best[i] for i in range(R)]
    assert cor.tolist() == [-1 if drafts[i].item() == best[i] else best[i] for i in range(R)]


def test_process_logits_matches_reference():
    """sampling.process_logits against the reference processing above (also checks MASK is removed)."""
    gen = torch.Generator().manual_seed(4)
    V, mask_id = 9, 8
    for _ in range(30):
        logits = 3 * torch.randn(V, generator=gen, dtype=torch.float64)
        logits[mask_id] = 50.0  # MASK would win if it were not excluded
        for temperature, top_k, top_p in ((1.0, None, None), (0.6, None, None), (1.3, 3, None),
                                          (1.0, None, 0.8), (0.8, None, 0.5), (1.0, 1, None)):
            got = (sampling.process_logits(logits, mask_id, temperature, top_k, top_p) / temperature).softmax(-1)
            want = torch.tensor(ref_probs(logits, mask_id, temperature, top_k, top_p), dtype=torch.float64)
            assert torch.allclose(got, want, atol=1e-12), (temperature, top_k, top_p)
        greedy = sampling.process_logits(logits, mask_id, 0)
        assert int(greedy.argmax()) == max(range(mask_id), key=lambda t: float(logits[t]))


# ----------------------------------------------------------------------------------------------
# 4. after rejections the cache equals a fresh prefill of the committed tokens

def test_cache_after_rollback_equals_fresh_prefill():
    model = tiny_model(4, 16, std=0.2)
    stride = 4
    prompts = [[5], [1, 2, 3], [7, 7, 0, 1, 9, 4, 2], [3, 8]]
    reqs = [Request(p,
                    SamplingParams(18 + i, temperature=1.0, seed=100 + i)) for i, p in enumerate(prompts)]
    max_len = max(len(p) + r.params.max_tokens for p, r in zip(prompts, reqs)) + isd.window_size(stride)
    B = len(reqs)
    cache = model.new_cache(B, max_len)

    def check():
        for b, r in enumerate(reqs):
            seq = r.prompt + r.out
            L = len(seq) - 1  # everything committed except the pending token
            if r.done:  # a finished row is never read again; its committed prefix is still intact
                assert int(cache.lengths[b]) >= L
            else:
                assert int(cache.lengths[b]) == L
            if L == 0:
                continue
            fresh = model.new_cache(1, max_len)
            with torch.no_grad():
                model(torch.tensor([seq[:-1]]), cache=fresh)
            assert torch.allclose(cache.k[:, b, :, :L], fresh.k[:, 0, :, :L], atol=1e-10, rtol=0)
            assert torch.allclose(cache.v[:, b, :, :L], fresh.v[:, 0, :, :L], atol=1e-10, rtol=0)

    prefill(model, cache, list(range(B)), reqs)
    check()
    steps = 0
    while True:
        active = [i for i in range(B) if not reqs[i].done]
        if not active:
            break
        isd_step(model, cache, active, [reqs[i] for i in active], stride)
        steps += 1
        check()
    assert all(len(r.out) == r.params.max_tokens for r in reqs)
    assert sum(r.stats.rounds_r for r in reqs) > 0 and sum(r.stats.rounds_v for r in reqs) > 0
    # rejections happened at several draft positions, so rollbacks of different lengths ran
    assert steps > 5


# ----------------------------------------------------------------------------------------------
# 5. batched rows == single-row runs

def test_batched_rows_equal_single_runs():
    model = tiny_model(5, 16)
    settings = [  # prompt, max_new_tokens, temperature, top_k, top_p, seed
        ([1, 2, 3], 11, 1.0, None, None, 10),
        ([4], 9, 0.7, 4, None, 11),
        ([2, 5, 7, 1, 3, 9], 13, 1.3, None, 0.9, 12),
        ([6, 6], 10, 0.0, None, None, 13),
        ([3, 1], 14, 1.0, None, None, 14),
    ]
    for stride in (2, 3, 4):
        # a stop id for the last request: a token its unstopped run emits at position >= 3
        free, _ = isd_generate(model, settings[4][0], SamplingParams(*settings[4][1:]), stride)
        stop = free[3]
        stops = [(), (), (), (), (stop,)]
        singles = [isd_generate(model, p,
                                SamplingParams(n, temperature=t, top_k=k, top_p=tp, seed=s, stop_ids=list(st)),
                                stride=stride)
                   for (p, n, t, k, tp, s), st in zip(settings, stops)]
        assert singles[4][0] == free[:free.index(stop) + 1]
        for order in (list(range(5)), [3, 0, 4, 2, 1]):
            reqs = [Request(list(settings[i][0]), SamplingParams(*settings[i][1:], stop_ids=stops[i])) for i in order]
            decode(model, reqs, stride)
            for r, i in zip(reqs, order):
                out, st = singles[i]
                assert r.out == out, (stride, i)
                d = r.stats.as_dict()
                for k in ("forwards", "tokens", "drafts_verified", "rounds_v", "rounds_r", "rounds_c"):
                    assert d[k] == getattr(st, k), (stride, i, k)
                assert d["acceptance_rate"] == pytest.approx(st.acceptance_rate, abs=1e-12)


# ----------------------------------------------------------------------------------------------
# 6. errors and MASK

def test_errors():
    model = tiny_model(0, 16)
    with pytest.raises(ValueError, match="empty"):
        isd_generate(model, [], SamplingParams(5))
    with pytest.raises(ValueError, match="empty"):
        ar_generate(model, [], SamplingParams(5))
    with pytest.raises(ValueError, match="empty"):
        decode(model, [Request([], SamplingParams(5))], 2)
    with pytest.raises(ValueError, match="stride"):
        isd_generate(model, [1, 2], SamplingParams(5), stride=0)
    with pytest.raises(ValueError, match="stride"):
        decode(model, [Request([1, 2], SamplingParams(5))], -1)
    with pytest.raises(ValueError, match="temperature"):
        isd_generate(model, [1, 2], SamplingParams(5, temperature=-0.5))
    with pytest.raises(ValueError, match="temperature"):
        ar_generate(model, [1, 2], SamplingParams(5, temperature=-1))
    for bad in (float("inf"), float("nan"), 1e-300):  # logits / T would overflow: inf, NaN, MASK emitted
        with pytest.raises(ValueError, match="temperature must be 0 .greedy. or a finite number"):
            isd_generate(model, [1, 2], SamplingParams(5, temperature=bad))
    for kw, msg in ((dict(top_k=0), "top_k must be >= 1"), (dict(top_p=0.0), "top_p must be in"),
                    (dict(top_p=1.5), "top_p must be in"), (dict(seed=-1), "seed must be in")):
        with pytest.raises(ValueError, match=msg):
            SamplingParams(5, **kw)
    # past the context (64): every token reads the last 64 tokens, with ISD as with AR, also when
    # the prompt alone is longer than the context and when the cache must drop old tokens
    for prompt, n in (([(3 * i) % 15 for i in range(54)], 40), ([(5 * i) % 13 for i in range(150)], 30)):
        ref = brute_greedy(model, prompt, n)
        assert len(set(ref[-20:])) >= 3
        assert ar_generate(model, prompt, SamplingParams(n, temperature=0)) == ref
        for stride in (2, 4):
            assert isd_generate(model, prompt, SamplingParams(n, temperature=0), stride=stride)[0] == ref


class MaskLover(Model):
    """A model whose MASK logit is huge everywhere: sampling must still never emit MASK."""

    def head(self, x):
        logits = super().head(x).clone()
        logits[..., self.cfg.mask_token_id] += 1000.0
        return logits


def test_mask_never_emitted():
    model = tiny_model(6, 8, cls=MaskLover)
    mask_id = model.cfg.mask_token_id
    assert int(model(torch.tensor([[1, 2]]))[0, -1].argmax()) == mask_id
    for stride in (1, 2, 3, 4):
        for temperature, top_k, top_p in ((1.0, None, None), (0.0, None, None), (2.0, None, None),
                                          (1.0, 1, None), (1.0, None, 0.3)):
            reqs = [Request([1, 2],
                            SamplingParams(12, temperature=temperature, top_k=top_k, top_p=top_p, seed=s)) for s in range(8)]
            decode(model, reqs, stride)
            for r in reqs:
                assert len(r.out) == 12 and mask_id not in r.out
    for s in range(5):
        out = ar_generate(model, [3], SamplingParams(20, temperature=1.0, seed=s))
        assert len(out) == 20 and mask_id not in out


# ----------------------------------------------------------------------------------------------
# 7. statistics

def _check_stats(out, st, trace, stride):
    assert st.tokens == len(out)
    assert st.tpf == pytest.approx(st.tokens / st.forwards, abs=1e-12)
    assert 1.0 <= st.tpf <= stride
    assert 0.0 <= st.acceptance_rate <= 1.0
    assert st.rounds_v + st.rounds_r + st.rounds_c == st.forwards == len(trace)
    assert st.wall_s > 0 and st.tokens_per_s == pytest.approx(st.tokens / st.wall_s)
    assert [t for step in trace for t, k in step if k != "rejected"] == out
    # no cold start but the first: a rejecting forward also proposes the drafts after its correction
    assert st.rounds_c == 1
    # each step's kinds follow its round type; the last step may be cut short by the stop or the
    # length limit (then its correction or clean token can be missing)
    n_corr, cut, reached = 0, False, 0
    for i, step in enumerate(trace):
        kinds = [k for _, k in step]
        last = i == len(trace) - 1
        assert len(kinds) >= 1
        if last:
            before_last = reached
        if "rejected" in kinds:  # the first rejected draft and every draft after it
            j = kinds.index("rejected")
            assert kinds[j:] == ["rejected"] * len(kinds[j:])
            kinds = kinds[:j]
            reached += kinds.count("accepted") + 1  # verification stops at the first rejection
        elif i > 0:
            reached += stride - 1
        if "correction" in kinds:
            n_corr += 1
            j = kinds.index("correction")
            assert kinds == ["accepted"] * j + ["correction"] and j < stride - 1
        else:
            a = kinds.count("accepted")
            assert kinds[:a] == ["accepted"] * a
            assert kinds[a:] == ["clean"] or (last and kinds[a:] == [])
            assert a in (0, stride - 1) or last
            cut = last and kinds[a:] == []
    # a final step that only shows accepted drafts was a V or an R round cut short
    assert st.rounds_r - n_corr in ((0, 1) if cut else (0,))
    # the acceptance rate is over the drafts verification reached (a stop can hide some of the
    # last step's accepted drafts from the trace)
    assert reached <= st.drafts_verified <= (reached if not cut and trace[-1][-1][1] != "rejected"
                                                else before_last + stride - 1)
    # the first step is always a cold start
    assert trace[0] == [(out[0], "clean")]


def test_stats_consistency_on_random_models():
    totals = Counter()
    for seed, V in enumerate((16, 8)):
        model = tiny_model(10 + seed, V)
        for stride in (2, 3, 4, 6):
            for temperature, top_k, top_p in ((1.0, None, None), (0.0, None, None), (0.8, 5, None),
                                              (1.0, None, 0.9)):
                for s in range(2):
                    out, st, trace = isd_traced(model, [1, 4, 2], 24, stride, temperature, top_k, top_p,
                                                  seed=s, stop_ids=[V - 2])
                    _check_stats(out, st, trace, stride)
                    assert (V - 2) not in out[:-1] and (len(out) == 24 or out[-1] == V - 2)
                    totals.update({k: getattr(st, k) for k in ("rounds_v", "rounds_r", "rounds_c")})
    assert all(totals[k] > 0 for k in ("rounds_v", "rounds_r", "rounds_c")), totals


class ConstantLogits(Model):
    """Logits that ignore the input (the cache is still filled): every draft proposal q equals the
    verify distribution p, so every draft must be accepted."""

    def head(self, x):
        logits = super().head(x)
        fixed = torch.linspace(-1.0, 1.5, self.cfg.vocab_size, dtype=logits.dtype)
        return fixed.expand_as(logits).clone()


@pytest.mark.parametrize("temperature", [0.0, 1.0, 0.5])
@pytest.mark.parametrize("stride", [2, 3, 4])
def test_stats_when_drafts_always_agree(stride, temperature):
    model = tiny_model(7, 10, cls=ConstantLogits)
    M = 17
    out, st, trace = isd_traced(model, [1, 2, 3], M, stride, temperature, seed=3)
    _check_stats(out, st, trace, stride)
    # one cold start, then every verify step commits `stride` tokens (the last may be cut)
    assert st.rounds_c == 1 and st.rounds_r == 0
    assert st.forwards == 1 + math.ceil((M - 1) / stride)
    assert st.rounds_v == st.forwards - 1
    assert st.acceptance_rate == 1.0
    assert st.tpf == pytest.approx(M / st.forwards)
    assert model.cfg.mask_token_id not in out
    if temperature == 0:
        assert out == [model.cfg.mask_token_id - 1] * M  # the largest non-MASK logit


def isd_samples_switching(model, prompt, n, stride, n_samples, temperature, seed0=0):
    """`n_samples` continuations where every step picks its mode at random, as the serving policy may: the wide
    window, the narrow one, or a plain AR step (stride 1; the row's drafts are then dropped), each request
    with its own sequence of modes. Returns (counts, steps taken in each mode)."""
    pick = torch.Generator().manual_seed(seed0)
    reqs = [Request(list(prompt), SamplingParams(n, temperature=temperature, seed=seed0 + s)) for s in range(n_samples)]
    cache = model.new_cache(n_samples, isd.cache_length(model, reqs, stride))
    prefill(model, cache, list(range(n_samples)), reqs)
    modes, active = Counter(), list(range(n_samples))
    while active:
        mode = ("wide", "narrow", "ar")[int(torch.randint(3, (1,), generator=pick))]
        group = [i for i in active if torch.rand(1, generator=pick) < 0.7] or active  # rows step in different modes
        isd_step(model, cache, group, [reqs[i] for i in group], 1 if mode == "ar" else stride, mode == "narrow")
        modes[mode] += 1
        active = [i for i in active if not reqs[i].done]
    return Counter(tuple(r.out) for r in reqs), modes


@pytest.mark.parametrize("temperature,stride,n", [(1.0, 3, 3), (0.7, 4, 3)])
def test_mode_switches_sample_the_exact_ar_distribution(temperature, stride, n):
    """The scheduler's policy changes a request's window from step to step (wide, narrow, AR): every step is
    exact on its own, so the committed text still follows the enumerated AR law."""
    model = sampling_model()
    counts, modes = isd_samples_switching(model, SAMPLE_PROMPT, n, stride, N_SAMPLES, temperature, seed0=7 + stride)
    assert min(modes.values()) > 0, modes
    assert chi2_pvalue(counts, exact_continuations(model, SAMPLE_PROMPT, n, temperature)) > P_MIN


def test_mode_switches_keep_greedy_exact():
    model = tiny_model(seed=3)
    for prompt in ([1, 2, 3], [5], [7, 7, 2, 9]):
        want = brute_greedy(model, prompt, 30)
        counts, _ = isd_samples_switching(model, prompt, 30, 4, 3, 0.0, seed0=len(prompt))
        assert list(counts) == [tuple(want)]


# ----------------------------------------------------------------------------------------------
# 8. logit_bias (on p and q alike) and the logprobs of committed tokens (the model's own, unfiltered)

def test_process_logits_with_a_bias_matches_reference():
    gen = torch.Generator().manual_seed(8)
    V, mask_id = 9, 8
    for _ in range(10):
        logits = 3 * torch.randn(V, generator=gen, dtype=torch.float64)
        bias = {2: 1.5, 5: -3.0, 0: 100.0 * float(torch.rand(1, generator=gen)) - 50}
        biased = logits.clone()
        for t, b in bias.items():
            biased[t] += b
        for temperature, top_k, top_p in ((1.0, None, None), (0.7, 3, None), (1.0, None, 0.8)):
            got = (sampling.process_logits(logits, mask_id, temperature, top_k, top_p, bias) / temperature).softmax(-1)
            want = torch.tensor(ref_probs(biased, mask_id, temperature, top_k, top_p), dtype=torch.float64)
            assert torch.allclose(got, want, atol=1e-12), (temperature, top_k, top_p)
    assert torch.equal(sampling.process_logits(logits, mask_id, bias={}), sampling.process_logits(logits, mask_id))


def brute_greedy_biased(model, prompt, n, bias):
    seq, out = list(prompt), []
    for _ in range(n):
        logits = full_logits(model, seq).clone()
        logits[model.cfg.mask_token_id] = -math.inf
        for t, b in bias.items():
            logits[t] += b
        out.append(int(torch.argmax(logits)))
        seq.append(out[-1])
    return out


def test_greedy_isd_with_a_logit_bias():
    """+100 makes greedy emit the token every time; -100 bans it; a small bias gives the biased
    brute-force greedy continuation, at every stride and with the narrow window."""
    model = tiny_model(1, 16, 0.5)
    prompt = [1, 5, 2]
    free = brute_greedy(model, prompt, 23)
    banned = free[0]
    small = {free[3]: -1.5, (free[3] + 1) % 15: 2.0}
    for N, narrow in ((1, False), (2, False), (3, False), (4, True)):
        out, _ = isd_generate_biased(model, prompt, 23, N, {7: 100.0}, narrow=narrow)
        assert out == [7] * 23
        out, _ = isd_generate_biased(model, prompt, 23, N, {banned: -100.0}, narrow=narrow)
        assert banned not in out and out == brute_greedy_biased(model, prompt, 23, {banned: -100.0})
        assert isd_generate_biased(model, prompt, 23, N, small, narrow=narrow)[0] == \
            brute_greedy_biased(model, prompt, 23, small)


def isd_generate_biased(model, prompt, n, stride, bias, temperature=0.0, seed=None, narrow=False):
    r = Request(list(prompt), SamplingParams(n, temperature=temperature, seed=seed), logit_bias=bias)
    decode(model, [r], stride, narrow)
    return r.out, r.stats


def test_isd_with_a_logit_bias_samples_the_exact_biased_ar_distribution():
    """The target is the biased AR law: a bias on p alone (not on q) would not be exact."""
    model = sampling_model()
    bias = {0: 1.2, 3: -0.8}
    dist = exact_continuations(model, SAMPLE_PROMPT, 3, 1.0, bias=bias)
    counts, tot = isd_samples(model, SAMPLE_PROMPT, 3, 3, N_SAMPLES, 1.0, seed0=4242, bias=bias)
    assert tot["rounds_r"] > 0 and tot["rounds_v"] > 0, tot
    assert chi2_pvalue(counts, dist) > P_MIN
    assert chi2_pvalue(counts, exact_continuations(model, SAMPLE_PROMPT, 3, 1.0)) < P_WRONG  # the bias matters


def ref_logprobs(model, seq, start, k):
    """(log p(seq[i]), top k) for i >= start, p = softmax of full-forward logits after seq[:i], MASK excluded."""
    out = []
    for i in range(start, len(seq)):
        logits = full_logits(model, seq[:i]).detach().clone()
        logits[model.cfg.mask_token_id] = -math.inf
        lp = logits.log_softmax(-1)
        top = lp.topk(k)
        out.append((float(lp[seq[i]]), list(zip(top.indices.tolist(), top.values.tolist()))))
    return out


def assert_logprobs_equal(got, want):
    assert len(got) == len(want)
    for (lp, top), (lp_ref, top_ref) in zip(got, want):
        assert lp == pytest.approx(lp_ref, abs=1e-9)
        assert [i for i, _ in top] == [i for i, _ in top_ref]
        assert [v for _, v in top] == pytest.approx([v for _, v in top_ref], abs=1e-9)


@pytest.mark.parametrize("temperature,top_k,bias", [(0.0, None, None), (1.0, 3, None), (0.8, None, {4: 2.0})])
def test_logprobs_are_the_models_own_whatever_isd_drafted(temperature, top_k, bias):
    """Each committed token's recorded logprob and top-k are those of a plain full forward of the
    sequence (unfiltered: temperature, top-k and the bias change what is sampled, not p), for accepted
    drafts, corrections and clean tokens alike, at every stride, narrow window too, batched."""
    model = tiny_model(3, 12, 0.5)
    kinds = Counter()
    for N, narrow in ((1, False), (3, False), (4, False), (3, True)):
        reqs = [Request([1, 2 + s],
                        SamplingParams(14, temperature=temperature, top_k=top_k, top_p=None, seed=10 + s, stop_ids=(9,)),
                        logit_bias=bias, logprobs=[], top_logprobs=3, trace=[]) for s in range(3)]
        decode(model, reqs, N, narrow)
        for r in reqs:
            assert_logprobs_equal(r.logprobs, ref_logprobs(model, r.prompt + r.out, len(r.prompt), 3))
            kinds.update(k for step in r.trace for _, k in step)
    assert kinds["accepted"] > 0 and kinds["clean"] > 0 and (temperature == 0 or kinds["correction"] > 0), kinds


def test_prompt_logprobs_equal_full_forwards():
    model = tiny_model(3, 12, 0.5)
    prompt = [1, 5, 2, 7, 7, 0, 3]
    assert_logprobs_equal(isd.prompt_logprobs(model, prompt, 2), ref_logprobs(model, prompt, 1, 2))
    assert isd.prompt_logprobs(model, [4], 2) == []
    assert [top for _, top in isd.prompt_logprobs(model, prompt)] == [[]] * 6


def test_a_window_is_as_wide_as_its_widest_row_needs(monkeypatch):
    """A cold start (no drafts yet) puts pending + N-1 masks into the forward, N tokens, not the N*N of a
    row with N-1 drafts (2N-1 narrow); a batch pads its rows to the widest. Exactness is tested elsewhere:
    here the forwards' widths."""
    model, widths = tiny_model(seed=2), []
    forward = type(model).forward

    def recorded(self, idx, *a, **kw):
        widths.append(idx.shape[1])
        return forward(self, idx, *a, **kw)
    monkeypatch.setattr(type(model), "forward", recorded)
    for narrow, steady in ((False, 16), (True, 7)):
        widths.clear()
        r = Request([1, 2, 3], SamplingParams(40, temperature=0.0))
        cache = model.new_cache(1, 80)
        prefill(model, cache, [0], [r])
        widths.clear()
        while not r.done:
            had = len(r.drafts)
            isd_step(model, cache, [0], [r], 4, narrow)
            assert widths[-1] == (steady if had else 4), (narrow, had, widths)
        assert steady in widths and 4 in widths
    a, b = Request([1, 2, 3],
                   SamplingParams(9, temperature=0.0)), Request([4, 5], SamplingParams(9, temperature=0.0))  # a with drafts, b cold: the batch is wide
    cache = model.new_cache(2, 40)
    prefill(model, cache, [0], [a])
    isd_step(model, cache, [0], [a], 4)
    prefill(model, cache, [1], [b])
    widths.clear()
    isd_step(model, cache, [0, 1], [a, b], 4)
    assert widths == [16] and a.out + b.out
