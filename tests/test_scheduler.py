"""scheduler.py: requests decoded together in the resident batch give exactly what they give alone
(the Scheduler driven step by step, no thread); serve.Engine: the same in its thread, as text, stopped
at stop strings and streamed.

References: isd_generate on one request (the plain path, itself tested against brute force in
test_isd.py) with the same seed, ar_generate for greedy requests, and the tokenizer's own decode
cut at the first stop string. The model is a tiny random float64 model with large weights (peaked,
varied next-token distributions), and a byte-level BPE trained on a few lines with multi-byte
characters, so that tokens split UTF-8 characters and streaming must hold them back (both made by
tests/reference.py's tiny_model_and_tokenizer).
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import isd  # noqa: E402
from isd import ar_generate, isd_generate  # noqa: E402
import tokenizer as tok  # noqa: E402
from scheduler import EXPLORE, MODES, Scheduler, SettingError, expected_tpf  # noqa: E402
from serve import Engine, held_back  # noqa: E402
from reference import tiny_model_and_tokenizer  # noqa: E402
from decoding import SamplingParams  # noqa: E402


@pytest.fixture(scope="module")
def me():
    return tiny_model_and_tokenizer()


def solo(model, enc, ids, n, stride, temperature=1.0, top_k=None, top_p=None, seed=None, narrow=False):
    return isd_generate(model, ids,
                        SamplingParams(n, temperature, top_k, top_p, seed, stop_ids=[enc.eot_token]),
                        stride=stride, narrow=narrow)[0]


def shown(enc, out):
    return enc.decode([t for t in out if t != enc.eot_token])


def run(sched, rows):
    """Step until every row has finished (no thread); the rows each step reported finished, in order."""
    finished = []
    while sched.busy:
        finished += [r for r, _ in sched.step() if r.finish_reason is not None]
    assert all(r.finish_reason is not None for r in rows)
    return finished


def engine(model, enc, **settings):
    return Engine(Scheduler(model, **settings), enc)


SETTINGS = [  # prompt, max_tokens, temperature, top_k, top_p, seed
    ("ROMEO.\n", 20, 0.0, None, None, None),
    ("But soft", 9, 1.0, None, None, 1),
    ("J", 25, 0.8, 5, None, 2),
    ("What light through yonder window breaks? " * 4, 12, 0.0, None, None, None),  # prompt > prefill budget
    ("Café", 17, 1.2, None, 0.9, 3),
    ("", 8, 0.0, None, None, None),  # the empty prompt: one EOS token
    ("naïve", 30, 1.0, 20, 0.95, 4),
]


@pytest.mark.parametrize("stride,narrow", [(1, False), (3, False), (3, True)])
def test_batched_requests_equal_solo_runs(me, stride, narrow):
    model, enc = me
    prompts = [enc.encode_ordinary(p) or [enc.eot_token] for p, *_ in SETTINGS]
    s = Scheduler(model, stride, max_batch=3, prefill_budget=7, narrow=narrow, policy="fixed")  # FIFO, chunked prefill
    rows = [s.add(s.request(ids, SamplingParams(*rest, stop_ids=tok.stop_ids(enc))))
            for ids, (_, *rest) in zip(prompts, SETTINGS)]
    assert sorted(map(id, run(s, rows))) == sorted(map(id, rows))  # each reported finished once
    m = s.metrics()
    assert m["busy_slots"] == 0 and m["queue_length"] == 0
    assert m["requests_stop"] + m["requests_length"] == len(SETTINGS)
    assert m["completion_tokens"] == sum(r.completion_tokens for r in rows)
    for r, ids, (_, n, t, k, p, seed) in zip(rows, prompts, SETTINGS):
        ref = solo(model, enc, ids, n, stride, t, k, p, seed, narrow)
        assert r.req.out == ref
        if t == 0:
            assert ref == ar_generate(model, ids, SamplingParams(n, temperature=0, stop_ids=[enc.eot_token]))
        assert r.finish_reason == ("stop" if ref[-1] == enc.eot_token else "length")
        assert (r.prompt_tokens, r.completion_tokens) == (len(ids), len(ref))


def test_the_engines_text_is_the_tokenizers_decode(me):
    """serve.Engine (the scheduler in its thread): each job's text is the tokenizer's decode of the solo run's
    tokens (split UTF-8 characters held back until whole), its usage and finish reason the solo run's."""
    model, enc = me
    prompts = [enc.encode_ordinary(p) or [enc.eot_token] for p, *_ in SETTINGS]
    with engine(model, enc, stride=3, max_batch=3, prefill_budget=7, policy="fixed") as e:
        jobs = [e.submit(ids, SamplingParams(*rest, stop_ids=e.stop_ids)) for ids, (_, *rest) in zip(prompts, SETTINGS)]
        for j in jobs:
            j.result(60)
        m = e.metrics()
    assert m["busy_slots"] == 0 and m["queue_length"] == 0 and not e.jobs
    assert m["requests_stop"] + m["requests_length"] == len(SETTINGS)
    assert m["completion_tokens"] == sum(j.completion_tokens for j in jobs)
    for j, ids, (_, n, t, k, p, seed) in zip(jobs, prompts, SETTINGS):
        ref = solo(model, enc, ids, n, 3, t, k, p, seed)
        assert j.req.out == ref and j.text == shown(enc, ref)
        assert j.finish_reason == ("stop" if ref[-1] == enc.eot_token else "length")
        assert (j.prompt_tokens, j.completion_tokens) == (len(ids), len(ref))


def run_streamed(sched, ids, n, stop=(), **sampling):
    deltas = []
    job = sched.submit(ids,
                       SamplingParams(n, stop_ids=sched.stop_ids, **sampling), stop, lambda d, r: deltas.append((d, r)))
    job.result(60)
    assert [r for _, r in deltas[:-1]] == [None] * (len(deltas) - 1) and deltas[-1][1] == job.finish_reason
    return job, "".join(d for d, _ in deltas)


def test_stop_strings_and_streamed_text(me):
    model, enc = me
    ids = enc.encode_ordinary("But soft")
    with engine(model, enc, stride=3, max_batch=4, policy="fixed") as s:
        free, streamed = run_streamed(s, ids, 60, temperature=0)
        t = free.text
        assert streamed == t == shown(enc, solo(model, enc, ids, 60, 3, 0.0)) and len(t) > 30
        cases = [
            ([t[15:19]], t[:t.find(t[15:19])], "stop"),  # cut before the stop string
            ([t[20:23], t[8:10]], t[:min(t.find(t[20:23]), t.find(t[8:10]))], "stop"),  # the first one wins
            ([t[-6:] + "\x00never"], t, free.finish_reason),  # held back, then released at the end
        ]
        for stop, want, reason in cases:
            job, streamed = run_streamed(s, ids, 60, temperature=0, stop=stop)
            assert job.text == want and streamed == want and job.finish_reason == reason, stop
        # sampled: the same seed gives the same text alone and with a stop string
        free, _ = run_streamed(s, ids, 60, temperature=1.0, seed=7)
        stop = free.text[10:13]
        job, streamed = run_streamed(s, ids, 60, temperature=1.0, seed=7, stop=[stop])
        assert job.text == streamed == free.text[:free.text.find(stop)]


def test_usage_counts_tokens_up_to_the_stop_string(me, monkeypatch):
    """A step commits several tokens; when one of them completes a stop string, the usage counts the
    tokens up to it, not the rest of the step. Every draft is accepted here (a forced, inexact verify)
    so that each step commits N = 4 tokens."""
    model, enc = me
    monkeypatch.setattr(isd, "verify", lambda p, q, d, u, g, t: (torch.ones(len(d), dtype=torch.bool),
                                                                 torch.full_like(d, -1), torch.ones(len(d))))
    ids = enc.encode_ordinary("But soft")
    with engine(model, enc, stride=4, max_batch=2, policy="fixed") as s:  # every step 4 tokens
        free = s.submit(ids, SamplingParams(40, temperature=0, stop_ids=s.stop_ids))
        free.result(60)
        out, t = list(free.req.out), free.text
        for a in range(4, 28, 3):
            stop = t[a:a + 2]
            job = s.submit(ids, SamplingParams(40, temperature=0, stop_ids=s.stop_ids), stop=[stop])
            job.result(60)
            n = next(k for k in range(1, len(out) + 1) if stop in shown(enc, out[:k]))
            assert job.text == t[:t.find(stop)] and job.completion_tokens == n, (stop, job.completion_tokens, n)
        assert s.metrics()["completion_tokens"] == len(out) + sum(
            next(k for k in range(1, len(out) + 1) if t[a:a + 2] in shown(enc, out[:k])) for a in range(4, 28, 3))


def test_held_back():
    assert held_back("abc", ["cd"]) == 1 and held_back("abc", ["bcx", "x"]) == 2
    assert held_back("abc", ["abcd"]) == 3 and held_back("abc", ["abc"]) == 0  # a whole stop string is cut, not held
    assert held_back("abc", []) == 0 and held_back("abc", ["xyz"]) == 0


def test_budgeted_prefill_queue_and_cancel(me):
    """Driven step by step (no thread): a long prompt is prefilled a budget at a time while the
    running request keeps committing tokens; a queued request gets the slot a cancel frees."""
    model, enc = me
    s = Scheduler(model, stride=2, max_batch=2, prefill_budget=4, policy="fixed")
    short, long = enc.encode_ordinary("ROMEO.\n")[:3], list(range(100, 121))  # long: 20 to prefill
    stop_ids = tok.stop_ids(enc)
    a = s.add(s.request(short, SamplingParams(40, temperature=0, stop_ids=stop_ids)))
    assert s.step() == [(a, a.req.out)]  # what each row committed
    assert len(a.req.out) == 1 and a.slot is not None
    b = s.add(s.request(long, SamplingParams(10, temperature=0.9, seed=5, stop_ids=stop_ids)))
    c = s.add(s.request(short, SamplingParams(6, temperature=0, stop_ids=stop_ids)))
    gone = s.add(s.request(short, SamplingParams(6, temperature=0, stop_ids=stop_ids)))
    s.cancel(gone)
    for k in range(5):
        before = len(a.req.out)
        done = s.step()
        if k == 0:
            assert done[0] == (gone, [])  # reported finished, having committed nothing
        assert len(a.req.out) > before  # never starved by the prefill
        assert c.slot is None and list(s.queue) == [c]
        if k < 4:
            assert b.req.out == [] and int(s.cache.lengths[b.slot]) == 4 * (k + 1)
    assert len(b.req.out) == 1  # the last 4 prompt tokens went in and b decoded in the same step
    assert gone.finish_reason == "cancelled" and gone.finished_at is not None and gone.slot is None
    slot = a.slot
    s.cancel(a)
    s.step()
    assert a.finish_reason == "cancelled" and a.slot is None and c.slot == slot and len(c.req.out) >= 1
    run(s, [b, c])
    assert not s.busy
    assert b.req.out == solo(model, enc, long, 10, 2, 0.9, seed=5)
    assert c.req.out == solo(model, enc, short, 6, 2, 0.0)
    assert a.req.out == solo(model, enc, short, 40, 2, 0.0)[:len(a.req.out)]
    m = s.metrics()
    assert (m["requests_cancelled"], m["busy_slots"], m["queue_length"]) == (2, 0, 0)
    assert m["prefill_tokens"] == 20 + 2 * (len(short) - 1)


def test_bad_requests_are_refused_at_submit(me):
    """Refused in the caller's thread, before anything is queued: by Scheduler.request (the settings, the
    token ids), by Engine.submit (stop strings, a stopped engine, and all of request's refusals)."""
    model, enc = me
    e = engine(model, enc)
    s = e.sched
    for submit in (lambda *a, **kw: s.add(s.request(*a, **kw)), e.submit):
        for kw, needle in [(dict(temperature=-1), "temperature"), (dict(top_k=0), "top_k"), (dict(top_p=0), "top_p"),
                           (dict(top_p=1.5), "top_p"), (dict(seed=-1), "seed")]:
            with pytest.raises(SettingError, match=needle) as err:
                submit([1, 2], SamplingParams(5, **kw))
            assert err.value.param == needle  # the setting, carried by the error (serve.py's "param")
        with pytest.raises(SettingError, match="max_tokens") as err:
            submit([1, 2], SamplingParams(0, stop_ids=e.stop_ids))
        assert err.value.param == "max_tokens"
        with pytest.raises(ValueError, match="empty"):
            submit([], SamplingParams(5, stop_ids=e.stop_ids))
    with pytest.raises(SettingError, match="stop") as err:
        e.submit([1, 2], SamplingParams(5), stop=[""])
    assert err.value.param == "stop"
    assert e.inbox.empty() and not s.busy
    for kw in (dict(stride=0), dict(max_batch=0), dict(prefill_budget=0), dict(policy="greedy")):
        with pytest.raises(ValueError, match=next(iter(kw))):
            Scheduler(model, **kw)
    e.stop()
    with pytest.raises(RuntimeError, match="shutting down"):
        e.submit([1, 2], SamplingParams(5, stop_ids=e.stop_ids))


def test_the_engine_cancels_and_its_stop_cancels_the_rest(me):
    """Engine.cancel ends a job at the next step (result() returns, the listener hears "cancelled", no more
    text); stop() cancels what is queued or running and ends the thread."""
    model, enc = me
    heard = []
    e = engine(model, enc, stride=2, max_batch=1, policy="fixed").start()
    ids = enc.encode_ordinary("ROMEO.\n")
    params = SamplingParams(10 ** 3, temperature=0, stop_ids=())  # runs until cancelled
    first = e.submit(ids, params, listener=lambda d, r: heard.append((d, r)))
    queued = e.submit(ids, params)
    while not first.req.out:
        first.finished.wait(0.01)
    e.cancel(first)
    assert first.result(60) == first.text and first.finish_reason == "cancelled" and first.finished.is_set()
    assert heard[-1][1] == "cancelled" and [r for _, r in heard[:-1]] == [None] * (len(heard) - 1)
    e.stop()
    assert not e.thread.is_alive() and queued.finished.is_set() and queued.finish_reason == "cancelled"
    m = e.metrics()
    assert (m["requests_cancelled"], m["busy_slots"], m["queue_length"]) == (2, 0, 0) and not e.jobs


def test_past_the_context_and_a_reused_slot(me):
    """Requests longer than the model's context (the cache drops tokens that left it) give solo runs'
    tokens, and a slot reused after such a request starts again from position 0."""
    model, enc = tiny_model_and_tokenizer(max_seq_len=24)
    stride = 3
    prompts = [enc.encode_ordinary("ROMEO.\nBut soft"), enc.encode_ordinary("JULIET.\n")]
    s = Scheduler(model, stride=stride, max_batch=1, prefill_budget=8)
    rows = [s.add(s.request(p, SamplingParams(60, temperature=0.0, stop_ids=tok.stop_ids(enc))))
            for p in prompts]  # one slot: the second reuses it
    run(s, rows)
    assert s.cache.max_len < 60  # so the slot had to drop tokens that left the context
    for p, r in zip(prompts, rows):
        want = solo(model, enc, p, 60, stride, temperature=0.0)
        assert len(p) + len(want) > 24 + 24 and r.req.out == want


# ----------------------------------------------------------------------------------------------
# the decoding policy: which window each step uses

@pytest.mark.slow  # a long simulation: CI runs it, -m 'not slow' skips it
def test_expected_tokens_per_forward_against_a_simulation():
    """expected_tpf's closed forms against the process itself, simulated: K = N-1 drafts, each accepted
    with probability alpha until the first rejection; the narrow window has no drafts after a rejection."""
    gen = torch.Generator().manual_seed(0)
    for stride in (2, 4, 6):
        for alpha in (0.0, 0.3, 0.8, 1.0):
            tokens, steps = {"wide": 0, "narrow": 0}, {"wide": 0, "narrow": 0}
            for mode in tokens:
                drafts = stride - 1
                for _ in range(20000):
                    j = 0
                    while j < drafts and torch.rand(1, generator=gen) < alpha:
                        j += 1
                    tokens[mode] += j + 1
                    steps[mode] += 1
                    drafts = stride - 1 if mode == "wide" or j == drafts else 0
            for mode in tokens:
                assert tokens[mode] / steps[mode] == pytest.approx(expected_tpf(mode, alpha, stride), rel=0.02)
            assert expected_tpf("ar", alpha, stride) == 1


def test_the_policy_picks_what_commits_the_most_per_second(me):
    """With measured step times and acceptance given: ISD where its drafts pay for its wider forward, AR
    where they do not; and one mode only with policy="fixed"."""
    model, enc = me
    s = Scheduler(model, stride=4, max_batch=8)
    s.step_time = {("ar", 1): 1.0, ("ar", 8): 2.0, ("wide", 1): 1.5, ("wide", 8): 8.0, ("narrow", 1): 1.5,
                   ("narrow", 8): 4.0}
    sure, unsure = isd.Request([1],
                               SamplingParams(5, temperature=0.0)), isd.Request([1], SamplingParams(5, temperature=1.0))
    sure.stats.drafts_verified, sure.stats.acceptance_sum = 1000, 990.0
    unsure.stats.drafts_verified, unsure.stats.acceptance_sum = 1000, 50.0
    assert s.choose_mode([sure]) == "wide"  # 3.9 tokens for 1.5 s vs 1 token for 1 s
    assert s.choose_mode([unsure]) == "ar"
    assert s.choose_mode([sure] * 8) == "narrow"  # 8 rows: wide costs 4x AR, narrow 2x (tpf 3.8 each)
    assert s.choose_mode([unsure] * 8) == "ar"
    s.counters["steps"], s.last_step = 100, {"ar": 100, "wide": 99, "narrow": 100 - EXPLORE - 1}
    assert s.choose_mode([unsure] * 8) == "narrow"  # unused for EXPLORE steps: measured again,
    s.last_step["narrow"] = 100
    assert s.choose_mode([unsure] * 8) == "narrow"  # for two steps: the second verifies the first's drafts
    assert s.choose_mode([unsure] * 8) == "ar"
    assert s.cost("wide", 4) == pytest.approx(1.5 + 6.5 * 3 / 7)  # between the row counts measured
    fixed = Scheduler(model, stride=4, max_batch=8, policy="fixed", narrow=True)
    assert fixed.choose_mode([unsure] * 8) == "narrow" and Scheduler(model, stride=1).modes() == ["ar"]


def test_the_adaptive_scheduler_is_exact_and_counts_its_modes(me, monkeypatch):
    """Greedy requests give the model's greedy text whatever modes the policy picks (forced here to change
    every step); the metrics count the steps of each mode."""
    model, enc = me
    order = iter(["wide", "ar", "narrow", "ar", "ar", "wide"] * 1000)
    prompts = [enc.encode_ordinary(p) or [enc.eot_token] for p, *_ in SETTINGS]
    s = Scheduler(model, stride=3, max_batch=3, prefill_budget=7)
    monkeypatch.setattr(s, "choose_mode", lambda reqs: next(order))
    jobs = [s.add(s.request(ids, SamplingParams(n, temperature=0, stop_ids=tok.stop_ids(enc))))
            for ids, (_, n, *_) in zip(prompts, SETTINGS)]
    run(s, jobs)
    m = s.metrics()
    assert {m for m, _ in s.step_time} == set(MODES)  # calibrated before the first step
    for j, ids, (_, n, *_) in zip(jobs, prompts, SETTINGS):
        assert j.req.out == ar_generate(model, ids, SamplingParams(n, temperature=0, stop_ids=[enc.eot_token]))
    assert min(m[f"steps_{mode}"] for mode in MODES) > 0 and sum(m[f"steps_{mode}"] for mode in MODES) == m["steps"]
def full_logprobs(model, seq, start):
    """log p(seq[i] | seq[:i]) for i >= start, by one plain forward of seq, MASK excluded."""
    with torch.no_grad():
        logits = model(torch.tensor([seq]))[0].clone()
    logits[:, model.cfg.mask_token_id] = float("-inf")
    lp = logits.log_softmax(-1)
    return [float(lp[i - 1, seq[i]]) for i in range(start, len(seq))]


def test_logprobs_logit_bias_ignore_eos_and_latencies(me):
    model, enc = me
    ids, eot = enc.encode_ordinary("But soft"), enc.eot_token
    stop_ids = tok.stop_ids(enc)
    s = Scheduler(model, stride=3, max_batch=3)
    free = s.add(s.request(ids, SamplingParams(30, temperature=0, stop_ids=stop_ids), logprobs=2))
    sampled = s.add(s.request(ids, SamplingParams(30, temperature=1.0, seed=3, stop_ids=stop_ids), logprobs=0))
    run(s, [free, sampled])
    assert free.req.out == solo(model, enc, ids, 30, 3, 0.0)  # recording changes nothing
    forced = s.request(ids, SamplingParams(5, temperature=0, stop_ids=stop_ids), logit_bias={eot: 100.0})  # EOS at once
    ignored = s.request(ids, SamplingParams(12, temperature=0, stop_ids=()), logit_bias={eot: 100.0})
    banned = s.request(ids, SamplingParams(30, temperature=0, stop_ids=stop_ids), logit_bias={free.req.out[0]: -100.0})
    rows = [free, sampled, forced, ignored, banned]
    run(s, [s.add(r) for r in rows[2:]])
    for r in rows[:2]:
        lps = [lp for lp, _ in r.req.logprobs]
        assert lps == pytest.approx(full_logprobs(model, ids + r.req.out, len(ids)), abs=1e-9)
        assert all(len(top) == r.req.top_logprobs for _, top in r.req.logprobs)
    assert free.req.logprobs[0][1][0][0] == free.req.out[0]  # greedy: the chosen token is the likeliest
    assert (forced.req.out, forced.finish_reason) == ([eot], "stop")
    assert (ignored.req.out, ignored.finish_reason) == ([eot] * 12, "length")
    assert free.req.out[0] not in banned.req.out and banned.req.logprobs is None
    h = s.histograms
    assert h["time_to_first_token_seconds"].count == h["e2e_request_latency_seconds"].count == len(rows)
    assert 0 < h["inter_token_latency_seconds"].count < sum(r.completion_tokens for r in rows)
    for hist in h.values():
        assert hist.counts == sorted(hist.counts) and hist.counts[-1] == hist.count and hist.sum > 0
    for kw, param in ((dict(logit_bias={model.cfg.mask_token_id: 1.0}), "logit_bias"),
                      (dict(logit_bias={0: float("nan")}), "logit_bias")):
        with pytest.raises(SettingError) as e:
            s.request(ids, SamplingParams(5), **kw)
        assert e.value.param == param
    with pytest.raises(SettingError, match="not a token id") as e:
        s.request([1, model.cfg.mask_token_id], SamplingParams(5, stop_ids=stop_ids))
    assert e.value.param == "prompt"


def test_a_stop_string_cuts_the_logprobs_and_eos_is_never_text(me):
    """Through the Engine: a stop string that cuts a step cuts the recorded logprobs with the tokens; the
    end-of-text token is not text, whether it stops the request or not (ignore_eos)."""
    model, enc = me
    ids, eot = enc.encode_ordinary("But soft"), enc.eot_token
    with engine(model, enc, stride=3, max_batch=3) as s:
        free = s.submit(ids, SamplingParams(30, temperature=0, stop_ids=s.stop_ids))
        free.result(60)
        stop = free.text[10:13]
        cut = s.submit(ids, SamplingParams(30, temperature=0, stop_ids=s.stop_ids), stop=[stop], logprobs=1)
        forced = s.submit(ids, SamplingParams(5, temperature=0, stop_ids=s.stop_ids), logit_bias={eot: 100.0})
        ignored = s.submit(ids, SamplingParams(12, temperature=0, stop_ids=()), logit_bias={eot: 100.0})
        for j in (cut, forced, ignored):
            j.result(60)
        h = s.sched.histograms
        assert h["time_to_first_token_seconds"].count == h["e2e_request_latency_seconds"].count == 4
    lps = [lp for lp, _ in cut.req.logprobs]
    assert lps == pytest.approx(full_logprobs(model, ids + cut.req.out, len(ids)), abs=1e-9)
    assert all(len(top) == 1 for _, top in cut.req.logprobs)
    assert 0 < len(cut.req.out) < len(free.req.out) and cut.text == free.text[:free.text.find(stop)]
    assert cut.req.out == free.req.out[:len(cut.req.out)] and cut.finish_reason == "stop"
    assert (forced.req.out, forced.text, forced.finish_reason) == ([eot], "", "stop")
    assert (ignored.req.out, ignored.text, ignored.finish_reason) == ([eot] * 12, "", "length")
