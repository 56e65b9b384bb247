"""learn.py: the server learns its speculator from the requests it serves, and its outputs stay the base model's.

References are written here or taken from tests/reference.py, never from learn.py's own output:
  - examples (tokens, labels, weights) from hand-written requests and traces, the values spelled out by hand;
  - a training step's loss from the slow position-by-position distill_loss reference (tests/reference.py's
    ref_distill_loss, weighted), on each example alone, unpadded;
  - greedy outputs against greedy AR decoding of a separate copy of the base model (no adapter), and brute force;
  - sampled outputs against the enumerated AR distribution (tests/reference.py, chi-square, P_MIN), with a new
    random adapter swapped in through Learner.swap before every step;
  - a saved adapter against the replica's tensors and the base checkpoint's, read back by lora.load_model;
  - the replay cap against step counts worked out by hand.
Models are tiny random float64 models (tests/reference.py's tiny_model, tiny_model_and_tokenizer). distill_loss's
weights= is tested in tests/test_distill.py (test_weighted_and_mixed_distill_loss_match_the_slow_reference).
"""
import copy
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import isd  # noqa: E402
import learn  # noqa: E402
import lora  # noqa: E402
import tokenizer as tok  # noqa: E402
from decoding import SamplingParams, Stats  # noqa: E402
from isd import Request, ar_generate, isd_generate, isd_step, prefill  # noqa: E402
from learn import LearnConfig, Learner  # noqa: E402
from model import Model  # noqa: E402
from scheduler import Scheduler  # noqa: E402
from reference import (N_SAMPLES, P_MIN, P_WRONG, SAMPLE_PROMPT, brute_greedy, chi2_pvalue,  # noqa: E402
                       exact_continuations, metrics, ref_distill_loss, sampling_model, save_checkpoint, start_server,
                       stop_server, tiny_model, tiny_model_and_tokenizer)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-9


# ----------------------------------------------------------------------------------------------
# helpers

def with_random_adapter(base, rank=2, seed=0, std=0.4):
    """`base` with a gated adapter whose A and B are random (B != 0: it changes the masks' logits)."""
    model = lora.add_adapter(base, lora.LoraConfig(rank=rank, lora_alpha=rank, base=".."))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.lora.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return model


def adapter_state(model):
    return {k: v.detach().clone() for k, v in model.lora.state_dict().items()}


def same_tensors(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def finished_request(prompt, out, trace, temperature=0.0, tokens=None, forwards=1, drafts=0, accepted=0.0):
    """An isd.Request as the scheduler hands it to Learner.observe: committed tokens, trace, stats."""
    r = Request(list(prompt), SamplingParams(1000, temperature=temperature, seed=0), trace=[list(s) for s in trace])
    r.out = list(out)
    r.stats = Stats(forwards=forwards, tokens=len(out) if tokens is None else tokens, drafts_verified=drafts,
                    acceptance_sum=accepted)
    return r


def wait_for(cond, timeout=30.0, what=""):
    t0 = time.perf_counter()
    while not cond():
        assert time.perf_counter() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.002)


# ----------------------------------------------------------------------------------------------
# 1. examples: what a finished request teaches

# a request's trace, per forward: committed tokens with their kind, then the drafts thrown away
# (token ids below 15: tiny_model(vocab=16)'s MASK is 15)
TRACE = [[(10, "clean")],  # a cold start
         [(11, "accepted"), (12, "correction"), (4, "rejected"), (8, "rejected")],
         [(13, "accepted"), (14, "accepted"), (0, "clean")],
         [(1, "correction"), (9, "rejected"), (4, "rejected")],
         [(2, "accepted"), (3, "correction"), (8, "rejected")]]
PROMPT, OUT = [5, 6, 7], [10, 11, 12, 13, 14, 0, 1, 2, 3]


def test_example_labels_weights_and_cuts():
    w = 2.5
    r = finished_request(PROMPT, OUT, TRACE)
    assert learn.example(r, 100, w) == (
        [5, 6, 7, 10, 11, 12, 13, 14, 0, 1, 2, 3],
        [-100, -100, -100, 10, 11, 12, 13, 14, 0, 1, 2, 3],
        [1, 1, 1, 1, 1, w, 1, 1, 1, w, 1, w],  # 12, 1 and 3 were committed as corrections
        True)
    # sampled: not greedy
    assert learn.example(finished_request(PROMPT, OUT, TRACE, temperature=0.8), 100, w)[3] is False
    # a stop string cut the output (the scheduler deletes req.out's tail, not the trace): the first len(out)
    # committed tokens of the trace are the output's
    for n, weights in ((7, [1, 1, w, 1, 1, 1, w]), (4, [1, 1, w, 1]), (2, [1, 1]), (1, [1])):
        tokens, labels, ws, _ = learn.example(finished_request(PROMPT, OUT[:n], TRACE), 100, w)
        assert tokens == PROMPT + OUT[:n] and labels == [-100] * 3 + OUT[:n], n
        assert ws == [1, 1, 1] + weights, n
    # max_len keeps the last tokens (of tokens, labels and weights alike)
    assert learn.example(r, 10, w) == ([7, 10, 11, 12, 13, 14, 0, 1, 2, 3],
                                       [-100, 10, 11, 12, 13, 14, 0, 1, 2, 3],
                                       [1, 1, 1, w, 1, 1, 1, w, 1, w], True)
    assert learn.example(r, 5, w) == ([14, 0, 1, 2, 3], [14, 0, 1, 2, 3], [1, 1, w, 1, w], True)
    assert learn.example(r, 12, w)[0] == PROMPT + OUT
    # rejected_weight 1: plain replay
    assert learn.example(r, 100, 1.0)[2] == [1.0] * 12


def test_example_of_a_real_trace():
    """On a real ISD decode (greedy, stride 3): the tokens weighed up are exactly those whose forward rejected
    a draft at their position (the trace's first rejected draft sits where the correction was committed), and
    each one differs from the draft it replaced."""
    model = with_random_adapter(tiny_model(seed=2, vocab=16), seed=3)
    prompt = [3, 1, 4]
    r = Request(prompt, SamplingParams(40, temperature=0.0), trace=[])
    isd.decode(model, [r], 3)
    assert r.out == brute_greedy(tiny_model(seed=2, vocab=16), prompt, 40)
    tokens, labels, weights, greedy = learn.example(r, 1000, 3.0)
    assert tokens == prompt + r.out and labels == [-100] * 3 + r.out and greedy
    # by hand: walk the forwards, position by position
    want, at = [], 0
    for step in r.trace:
        committed = [t for t, k in step if k != "rejected"]
        rejected = [t for t, k in step if k == "rejected"]
        accepted = [t for t, k in step if k == "accepted"]
        for i, t in enumerate(committed):
            corrected = bool(rejected) and i == len(accepted)  # the token right after the accepted drafts
            if corrected:
                assert t != rejected[0]
            want.append(3.0 if corrected else 1.0)
        at += len(committed)
    assert at == len(r.out) and weights == [1.0] * 3 + want
    assert 3 <= want.count(3.0) <= r.stats.rounds_r  # rejections happened (the last one may be cut by max tokens)


# ----------------------------------------------------------------------------------------------
# 2. the replica: the base shared, the adapter its own until published and swapped in

def test_replica_shares_the_base_and_owns_its_adapter():
    model = with_random_adapter(tiny_model(seed=4, vocab=16), seed=1)
    twin = learn.replica(model)
    ms, ts = model.state_dict(), twin.state_dict()
    assert ms.keys() == ts.keys() and any(k.startswith("lora.") for k in ms)
    for k in ms:
        if k.startswith("lora."):  # equal values, another storage
            assert torch.equal(ms[k], ts[k]) and ms[k].data_ptr() != ts[k].data_ptr(), k
        else:
            assert ms[k].data_ptr() == ts[k].data_ptr() and ms[k].dtype == ts[k].dtype, k
    assert not any(p.requires_grad for n, p in twin.named_parameters() if not n.startswith("lora."))
    assert all(p.requires_grad for p in twin.lora.parameters())
    M = model.cfg.mask_token_id
    idx = torch.tensor([[3, 5, M, M, 7, M], [1, M, 2, 2, M, M]])
    with torch.no_grad():
        assert torch.equal(twin(idx), model(idx))
        twin.lora.B[next(iter(twin.lora.B))].add_(1.0)  # the twin's adapter moves, the model's does not
        assert torch.equal(model(idx), learn.replica(model)(idx))
        assert not torch.equal(twin(idx), model(idx))


EXAMPLES = [  # (tokens, labels, weights, greedy) of different lengths: the batch pads them
    ([3, 1, 4, 1, 5, 9, 2, 6, 5], [-100, -100, -100, 1, 5, 9, 2, 6, 5], [1, 1, 1, 1, 2.0, 1, 1, 2.0, 1], True),
    ([2, 7, 1, 8, 2, 8], [-100, -100, 1, 8, 2, 8], [1, 1, 1, 3.0, 1, 1], False),
    ([6, 6, 0, 7, 3, 3, 11, 12], [-100, 6, 0, 7, 3, 3, 11, 12], [1, 1, 1, 1, 1, 1, 2.0, 1], True),
]


def ref_step_loss(model, examples, stride, temperature):
    """A batch's loss, from the slow reference on each example alone (no padding): greedy examples hard,
    sampled ones soft; sum(w * l) / sum(w) over all targets of the batch."""
    num = den = 0.0
    for tokens, labels, weights, greedy in examples:
        x0, y, w = torch.tensor([tokens]), torch.tensor([labels]), torch.tensor([weights], dtype=torch.float64)
        row = ref_distill_loss(model, x0, y, stride, "hard" if greedy else "soft", temperature, None, w)
        wsum = sum(w[0, i] for i in range(1, len(tokens)) if labels[i] != -100)
        num, den = num + row * float(wsum), den + float(wsum)
    return num / den


def test_train_steps_move_the_replica_only_until_a_swap():
    model = with_random_adapter(tiny_model(seed=5, vocab=16), seed=2)
    base = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("lora.")}
    serving = adapter_state(model)
    cfg = LearnConfig(share=1.0, replay=1.0, batch_size=3, lr=0.05, warmup=1, publish_every=1, temperature=0.8)
    learner = Learner(model, 3, cfg)
    assert learner.twin.lora is not model.lora and same_tensors(adapter_state(learner.twin), serving)
    for batch, target in ((EXAMPLES, "mixed"), (EXAMPLES[::2], "hard"), (EXAMPLES[1:2], "soft")):
        want = ref_step_loss(learner.twin, batch, 3, cfg.temperature)
        before = adapter_state(learner.twin)
        learner.train_step(batch)
        assert abs(learner.loss - want) < TOL * max(1, abs(want)), (target, learner.loss, want)
        assert not same_tensors(adapter_state(learner.twin), before), target  # the replica learned
    assert learner.counters["steps"] == 3
    assert learner.counters["trained_tokens"] == (6 + 4 + 7) + (6 + 7) + 4  # targets: labels after the first
    assert same_tensors(adapter_state(model), serving)  # the serving adapter did not move
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items() if k in base)  # nor the base
    assert learner.swap(model) is False and same_tensors(adapter_state(model), serving)  # nothing published

    # the learner's own thread: it trains on observed requests, publishes every step (publish_every=1), and
    # the serving model takes the newest adapter at a swap, not before
    learner.start()
    try:  # 4 requests of 9 targets: 36 > the 34 trained on, so one step (27 more) is due, then none
        for _ in range(4):
            learner.observe(finished_request(PROMPT, OUT, TRACE))
        wait_for(lambda: learner.counters["trained_tokens"] >= 36, what="the learner to train")
        wait_for(lambda: learner.fresh is not None, what="a published adapter")
    finally:
        learner.stop()
    assert learner.counters["steps"] == 4 and learner.counters["trained_tokens"] == 34 + 27
    assert same_tensors(adapter_state(model), serving)
    assert learner.swap(model) is True
    assert same_tensors(adapter_state(model), adapter_state(learner.twin))  # the last step's adapter
    assert learner.swap(model) is False and learner.counters["swaps"] == 1
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items() if k in base)


# ----------------------------------------------------------------------------------------------
# 3. lossless while learning: a scheduler whose adapter changes under its running requests

def test_greedy_outputs_stay_the_base_models_while_the_adapter_learns():
    model, enc = tiny_model_and_tokenizer()
    base = copy.deepcopy(model)  # the reference: the base model, never given an adapter
    cfg = LearnConfig(share=1.0, replay=1000.0, batch_size=4, lr=0.05, warmup=1, publish_every=1, rank=4)
    learner = Learner(model, 3, cfg)  # a cold start: the learner gives the model an adapter (B = 0)
    assert model.lora is not None and all(float(b.detach().abs().max()) == 0 for b in model.lora.B.values())
    busy_swaps = []
    real_swap = learner.swap
    sched = Scheduler(model, stride=3, max_batch=3, prefill_budget=16, policy="fixed", learner=learner)

    def spy(m):  # called by the scheduler between two steps
        swapped = real_swap(m)
        if swapped:
            busy_swaps.append(sum(j is not None and len(j.req.out) > 0 for j in sched.slots))
        return swapped

    learner.swap = spy
    texts = ["ROMEO.\n", "But soft, what", "JULIET.\nCafé", "What light", "naïve —", "\n\nJULIET"]
    jobs = []
    stop_ids = tok.stop_ids(enc)
    learner.start()  # the learner's thread trains while this one steps the scheduler
    try:
        for wave in range(12):
            batch = [sched.add(sched.request(enc.encode_ordinary(texts[(wave + i) % len(texts)]),
                                             SamplingParams(24 + 7 * i, temperature=0, stop_ids=stop_ids)))
                     for i in range(3)]
            batch.append(sched.add(sched.request(enc.encode_ordinary(texts[wave % len(texts)]),
                                                 SamplingParams(16, temperature=1.0, seed=wave, stop_ids=stop_ids))))
            while sched.busy:
                sched.step()
            jobs += batch[:3]
            if wave == 0:  # let the learner start before the next wave
                wait_for(lambda: learner.counters["steps"] >= 2, what="the learner's first steps")
            if wave >= 2 and sum(n > 0 for n in busy_swaps) >= 5:
                break
        m = learner.metrics()
    finally:
        learner.stop()
    assert sum(n > 0 for n in busy_swaps) >= 5, busy_swaps  # adapters changed under running requests
    assert m["swaps"] == len(busy_swaps) > 0 and m["examples"] == 4 * (wave + 1) and m["steps"] > 2
    assert any(float(b.detach().abs().max()) > 0 for b in model.lora.B.values())  # the serving adapter moved
    for j in jobs:
        ids = j.req.prompt
        want = ar_generate(base, ids, SamplingParams(j.req.params.max_tokens, temperature=0, stop_ids=[enc.eot_token]))
        assert j.req.out == want, (ids, wave)
    assert jobs[0].req.out == brute_greedy(base, jobs[0].req.prompt, len(jobs[0].req.out))
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in model.state_dict().items() if not k.startswith("lora."))


# ----------------------------------------------------------------------------------------------
# 4. sampling stays exact when the adapter changes between steps

def random_adapter(model, g, std=0.6):
    return {k: torch.randn(v.shape, generator=g, dtype=v.dtype) * std for k, v in model.lora.state_dict().items()}


def samples_with_swaps(model, learner, prompt, n, stride, n_samples, temperature, seed0, after_swap=None):
    """n_samples continuations decoded together with isd_step, each step in a random mode (wide, narrow, AR)
    for a random group of rows, as the scheduler may; before every step (learner given) a new random adapter
    goes in through Learner.swap. Returns (counts, summed stats)."""
    pick, g = torch.Generator().manual_seed(seed0), torch.Generator().manual_seed(seed0 + 1)
    reqs = [Request(list(prompt), SamplingParams(n, temperature=temperature, seed=seed0 + s)) for s in range(n_samples)]
    cache = model.new_cache(n_samples, isd.cache_length(model, reqs, stride))
    prefill(model, cache, list(range(n_samples)), reqs)
    active = list(range(n_samples))
    while active:
        if learner is not None:
            learner.fresh = random_adapter(model, g)
            want = {k: v.clone() for k, v in learner.fresh.items()}
            assert learner.swap(model) is True and same_tensors(adapter_state(model), want)
            if after_swap is not None:
                after_swap([reqs[i] for i in active])
        mode = ("wide", "narrow", "ar")[int(torch.randint(3, (1,), generator=pick))]
        group = [i for i in active if torch.rand(1, generator=pick) < 0.7] or active
        isd_step(model, cache, group, [reqs[i] for i in group], 1 if mode == "ar" else stride, mode == "narrow")
        active = [i for i in active if not reqs[i].done]
    tot = Counter()
    for r in reqs:
        tot.update({k: getattr(r.stats, k) for k in ("rounds_v", "rounds_r", "drafts_verified", "acceptance_sum")})
    return Counter(tuple(r.out) for r in reqs), tot


def test_sampling_stays_exact_when_adapters_are_swapped_between_steps():
    temperature, stride, n = 1.0, 3, 4
    model = with_random_adapter(sampling_model(), seed=9)
    learner = Learner(model, stride, LearnConfig())
    dist = exact_continuations(sampling_model(), SAMPLE_PROMPT, n, temperature)  # the base model alone
    counts, tot = samples_with_swaps(model, learner, SAMPLE_PROMPT, n, stride, N_SAMPLES, temperature, seed0=21)
    assert tot["rounds_r"] > 0 and tot["rounds_v"] > 0, tot
    assert learner.counters["swaps"] >= 4
    assert chi2_pvalue(counts, dist) > P_MIN
    # the swaps really changed q: the same seeds and modes with the adapter left alone accept otherwise
    still = with_random_adapter(sampling_model(), seed=9)
    _, tot_still = samples_with_swaps(still, None, SAMPLE_PROMPT, n, stride, N_SAMPLES, temperature, seed0=21)
    assert abs(tot["acceptance_sum"] / tot["drafts_verified"]
               - tot_still["acceptance_sum"] / tot_still["drafts_verified"]) > 0.01, (tot, tot_still)
    # power: drafts verified against another q than the one they were drawn from (what a swap that rewrote the
    # pending drafts' q would do) fail the same check
    g = torch.Generator().manual_seed(3)

    def wrong_q(reqs):
        for r in reqs:
            if r.q_logits is not None:
                r.q_logits = r.q_logits + 2 * torch.randn(r.q_logits.shape, generator=g, dtype=r.q_logits.dtype)

    counts, tot = samples_with_swaps(with_random_adapter(sampling_model(), seed=9), learner, SAMPLE_PROMPT, n, stride,
                                     N_SAMPLES, temperature, seed0=22, after_swap=wrong_q)
    assert tot["drafts_verified"] > N_SAMPLES and chi2_pvalue(counts, dist) < P_WRONG


# ----------------------------------------------------------------------------------------------
# 5. the learned adapter on disk, and a restart from it

def test_save_and_resume(tmp_path):
    ckpt = save_checkpoint(str(tmp_path / "tiny"))
    model, enc = lora.load_model(ckpt)
    assert getattr(model, "lora", None) is None
    save_dir = str(tmp_path / "online")
    learner = Learner(model, 3, LearnConfig(lr=0.05, warmup=1, rank=4), save_dir=save_dir, base=ckpt)
    ids = [enc.encode_ordinary(t) for t in ("ROMEO.\nBut soft, what", "JULIET.\nCafé naïve")]
    examples = [(t, [-100] * 3 + t[3:], [1.0] * len(t), g) for t, g in zip(ids, (True, False))]
    learner.train_step(examples)
    learner.stop()  # never started: stop writes the adapter (it has trained)
    assert learner.counters["saves"] == 1
    assert sorted(f for f in os.listdir(save_dir) if not f.startswith(".")) == ["adapter.json", "adapter.safetensors"]
    assert json.load(open(f"{save_dir}/adapter.json"))["base"] == "../tiny"  # relative, as distill.py writes it

    def check(learner):
        loaded, _ = lora.load_model(save_dir)
        assert same_tensors(adapter_state(loaded), adapter_state(learner.twin))
        assert any(float(b.detach().abs().max()) > 0 for b in loaded.lora.B.values())
        base_state = Model.load(ckpt).state_dict()
        got = {k: v for k, v in loaded.state_dict().items() if not k.startswith("lora.")}
        assert same_tensors(got, base_state)
        return loaded

    loaded = check(learner)
    prompt = ids[0][:4]
    assert isd_generate(loaded, prompt,
                        SamplingParams(20, temperature=0),
                        stride=3)[0] == ar_generate(Model.load(ckpt), prompt, SamplingParams(20, temperature=0))
    # a second save (more training) replaces the first whole, through checkpoint.staged
    learner2 = Learner(loaded, 3, LearnConfig(lr=0.05, warmup=1), save_dir=save_dir, base=ckpt)
    assert same_tensors(adapter_state(learner2.twin), adapter_state(learner.twin))  # it continues from the saved one
    learner2.train_step(examples)
    learner2.save()
    check(learner2)
    assert not same_tensors(adapter_state(learner2.twin), adapter_state(learner.twin))
    # resume_source: the folder is for its own base only, however the base is spelled
    assert learn.resume_source(save_dir, ckpt) == save_dir
    assert learn.resume_source(save_dir, ckpt + "/") == save_dir
    os.symlink(ckpt, tmp_path / "link")
    assert learn.resume_source(save_dir, str(tmp_path / "link")) == save_dir
    other = save_checkpoint(str(tmp_path / "other"))
    for wrong in (other, "smollm2"):
        with pytest.raises(ValueError, match="online"):
            learn.resume_source(save_dir, wrong)


# ----------------------------------------------------------------------------------------------
# 6. the replay cap, observe's filters, the recent statistics, the config's checks

def test_replay_cap_idles_the_learner_until_new_traffic():
    model = with_random_adapter(tiny_model(seed=6, vocab=16), seed=4)
    learner = Learner(model, 3, LearnConfig(share=1.0, replay=1.0, batch_size=2, lr=0.01, warmup=1, publish_every=1))
    n = len(OUT)  # each example: 9 target tokens; each step: 2 examples, 18 target tokens

    def settled(steps, target):
        wait_for(lambda: learner.counters["trained_tokens"] >= target, what=f"{target} trained tokens")
        time.sleep(0.3)  # would be several more steps if the learner did not idle
        c = learner.metrics()
        assert (c["steps"], c["trained_tokens"], c["target_tokens"]) == (steps, 2 * n * steps, target), c

    try:
        learner.start()
        for k in range(5):
            learner.observe(finished_request(PROMPT, OUT, TRACE, tokens=n, forwards=3, drafts=6, accepted=4.5))
        settled(3, 5 * n)  # ceil(45 / 18) steps
        learner.observe(finished_request(PROMPT, OUT, TRACE))
        settled(3, 6 * n)  # 54 trained tokens already cover 6 examples' 54: nothing to do
        learner.observe(finished_request(PROMPT, OUT, TRACE))
        settled(4, 7 * n)
        # not examples: a request with a logit bias (another distribution), an empty output, no trace
        biased = finished_request(PROMPT, OUT, TRACE)
        biased.logit_bias = {3: 2.0}
        empty = finished_request(PROMPT, [], [])
        untraced = finished_request(PROMPT, OUT, [])
        untraced.trace = None
        for r in (biased, empty, untraced):
            learner.observe(r)
        time.sleep(0.2)
        m = learner.metrics()
        assert (m["examples"], m["buffered"], m["target_tokens"], m["steps"]) == (7, 7, 7 * n, 4), m
        # the recent statistics count every finished request: 5 with 9 tokens in 3 forwards, 6 drafts (4.5
        # accepted); 2 + 3 with their own tokens in 1 forward, no drafts
        assert m["recent_tokens_per_forward"] == pytest.approx((5 * 9 + 2 * 9 + 9 + 0 + 9) / (5 * 3 + 5))
        assert m["recent_acceptance_rate"] == pytest.approx(5 * 4.5 / (5 * 6))
    finally:
        learner.stop()
    assert not learner.thread.is_alive()


def test_buffer_and_max_len_bound_what_is_kept():
    learner = Learner(with_random_adapter(tiny_model(seed=6, vocab=16)), 3, LearnConfig(buffer=3, max_len=6))
    for k in range(5):
        learner.observe(finished_request(PROMPT, [10 + k] * 9, [[(10 + k, "clean")]] * 9))
    assert [e[0] for e in learner.buffer] == [[10 + k] * 6 for k in (2, 3, 4)]  # the 3 most recent, last 6 tokens
    assert learner.counters["target_tokens"] == 5 * 5  # 5 targets each (the first kept token is context)


@pytest.mark.parametrize("field,value", [("share", 0.0), ("share", 1.5), ("share", -0.5), ("batch_size", 0),
                                         ("replay", 0.0), ("rejected_weight", -1.0), ("lr", 0.0),
                                         ("temperature", 0.0), ("buffer", 0), ("publish_every", 0), ("max_len", 0),
                                         ("rank", 0)])
def test_learn_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        LearnConfig(**{field: value})


def test_learn_config_accepts_the_edges():
    assert LearnConfig(share=1.0).share == 1.0
    assert LearnConfig(share=0.01, batch_size=1, publish_every=1).batch_size == 1


# ----------------------------------------------------------------------------------------------
# 7. serve.py --learn, end to end

@pytest.mark.slow  # end to end (a subprocess, a whole command): CI runs it, -m 'not slow' skips it
def test_serve_learn_end_to_end(tmp_path, capsys):
    import openai
    import serve

    ckpt = save_checkpoint(str(tmp_path / "tiny"))
    save_dir = str(tmp_path / "online")
    base, enc = Model.load(ckpt).eval(), tok.load(ckpt)
    name = os.path.basename(ckpt)

    def want(prompt, n):
        out = ar_generate(base, enc.encode_ordinary(prompt), SamplingParams(n, temperature=0, stop_ids=[enc.eot_token]))
        return enc.decode([t for t in out if t != enc.eot_token])

    prompts = ["ROMEO.\n", "But soft", "JULIET.\nCafé"]
    proc, url = start_server(ckpt, "--learn", "--learn_share=1", f"--learn_save={save_dir}", "--max_batch=4",
                             "--policy=fixed")
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
        for p in prompts * 2:
            r = client.completions.create(model=name, prompt=p, max_tokens=16, temperature=0)
            assert r.choices[0].text == want(p, 16), p
        for _ in range(300):
            m = metrics(url)
            if m["idlm_learn_steps_total"] > 0:
                break
            time.sleep(0.05)
        assert m["idlm_learn_steps_total"] > 0 and m["idlm_learn_examples_total"] == 6
        assert 0 < m["idlm_recent_tokens_per_forward"] <= 3 and "idlm_learn_loss" in m
    finally:
        rc, log = stop_server(proc, signal.SIGINT)
        proc.log.close()
    assert rc == 0 and "server stopped" in log and "learning its speculator" in log, log
    assert os.path.isfile(f"{save_dir}/adapter.json")  # written at shutdown: a trained adapter of this base
    assert learn.resume_source(save_dir, ckpt) == save_dir
    assert any(float(b.detach().abs().max()) > 0 for b in lora.load_model(save_dir)[0].lora.B.values())
    # a restart with the same folder continues from it, and still serves the base model's text
    proc, url = start_server(ckpt, "--learn", f"--learn_save={save_dir}", "--policy=fixed")
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
        r = client.completions.create(model=name, prompt=prompts[1], max_tokens=16, temperature=0)
        assert r.choices[0].text == want(prompts[1], 16)
    finally:
        rc, log = stop_server(proc, signal.SIGINT)
        proc.log.close()
    assert rc == 0 and f"from {save_dir} " in log, log

    # without --learn: a usage error that names --learn
    r = subprocess.run([sys.executable, "serve.py", f"--out_dir={ckpt}", f"--learn_save={save_dir}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--learn" in r.stderr.strip().splitlines()[-1], r.stderr
    # a learned adapter of another base, a bad share: one-line errors before anything is served
    other = save_checkpoint(str(tmp_path / "other"))
    for args, needle in (([f"--out_dir={other}", "--learn", f"--learn_save={save_dir}"], "holds an adapter of"),
                         ([f"--out_dir={ckpt}", "--learn", "--learn_share=0"], "share must be in"),
                         ([f"--out_dir={ckpt}", "--learn_share=0.3"], "go with --learn")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            serve.main(args)
        err = capsys.readouterr().err
        assert e.value.code == 2 and needle in err, (args, err)
