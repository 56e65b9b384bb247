"""mlx_port/isd.py, sampling.py and kernels.py (MLX) against isd.py (PyTorch) and the enumerated AR law.

The references are PyTorch's isd.py and kernels.verify_reference, themselves tested against brute
force in test_isd.py and test_kernels.py, and tests/reference.py's enumeration of a model's own AR
distribution with its chi-square check:
  - greedy MLX ISD gives PyTorch's tokens and Stats, for every stride, the narrow window, past the
    context, and batched;
  - sampled MLX ISD follows the enumerated AR law (and broken acceptance rules fail the same check);
  - mlx_port.kernels.verify makes kernels.verify_reference's decisions on the same random numbers;
  - per-request random streams: a seed gives the same tokens, alone or in a batch;
  - `python -m mlx_port.sample` prints what `python sample.py` prints, and runs without torch.
mlx[cpu] on Linux uses a slow reference BLAS: every model here is tiny.
"""
import copy
import json
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch

mx = pytest.importorskip("mlx.core")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from decoding import SamplingParams  # noqa: E402
import isd  # noqa: E402
import kernels  # noqa: E402
import lora  # noqa: E402
import sampling  # noqa: E402
import tokenizer as tok  # noqa: E402
from mlx_port import isd as mlx_isd, kernels as mlx_kernels, lora as mlx_lora, model as mm  # noqa: E402
from mlx_port import sampling as mlx_sampling  # noqa: E402
from reference import (P_MIN, P_WRONG, chi2_pvalue, exact_continuations, sampling_model,  # noqa: E402
                       torch_model)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STATS = ("forwards", "tokens", "drafts_verified", "rounds_v", "rounds_r", "rounds_c")


def as_mlx(model, folder):
    """The same weights in MLX, float32, through a checkpoint."""
    copy.deepcopy(model).float().save(folder)
    return mm.Model.load(folder)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """{context: (PyTorch model, MLX model)}: the usual context (64) and a short one (24), so that
    generations run past it (the sliding context, the cache dropping old tokens)."""
    out = {}
    for ctx in (64, 24):
        t = torch_model(max_seq_len=ctx)
        out[ctx] = t, as_mlx(t, str(tmp_path_factory.mktemp(f"ctx{ctx}")))
    return out


@pytest.fixture(scope="module")
def adapted(pairs, tmp_path_factory):
    """{context: (PyTorch model + gated adapter, the MLX model + the same adapter read from lora.py's files)}:
    a random adapter (B far from its zero init) that changes the masks' drafts but, being gated, not p."""
    out = {}
    for ctx, (t, _) in pairs.items():
        d = tmp_path_factory.mktemp(f"adapted{ctx}")
        pt = lora.add_adapter(copy.deepcopy(t), lora.LoraConfig(rank=4, lora_alpha=8.0, base=".."))
        with torch.no_grad():
            for p in pt.lora.B.values():
                p.normal_(0.0, 0.3)
        lora.save_adapter(pt.lora, str(d))
        cfg, state = mlx_lora.load_adapter(str(d))
        out[ctx] = pt.eval(), mlx_lora.add_adapter(as_mlx(t, str(d / "base")), cfg, state)
    return out


# ----------------------------------------------------------------------------------------------
# 1. greedy: MLX ISD == PyTorch ISD, token for token and in every statistic, with and without an adapter

def assert_same_stats(got, want, where):
    for k in STATS:
        assert getattr(got, k) == getattr(want, k), (where, k)
    assert got.acceptance_sum == want.acceptance_sum, where  # 0s and 1s at temperature 0


@pytest.mark.parametrize("with_adapter", [False, pytest.param(True, marks=pytest.mark.slow)])  # slow: CI runs it
def test_greedy_isd_matches_pytorch(pairs, adapted, with_adapter):
    rounds = Counter()
    cases = [(64, [1, 2, 3], 30), (64, [7], 30), (64, [4, 4, 9, 0, 12, 5], 30),
             (24, [3, 1, 4, 1, 5, 9, 2, 6, 5, 3], 45),  # past the context (24) and the cache (2 contexts)
             (24, [(5 * i) % 13 for i in range(30)], 20)]  # the prompt alone is longer than the context
    for ctx, prompt, n in cases:
        t, m = (adapted if with_adapter else pairs)[ctx]
        if with_adapter:  # the adapter changes the drafts (so the statistics), never the tokens
            base = isd.isd_generate(pairs[ctx][0], prompt, SamplingParams(n, temperature=0), stride=4)
            now = isd.isd_generate(t, prompt, SamplingParams(n, temperature=0), stride=4)
            assert now[0] == base[0]
            rounds["changed"] += (now[1].forwards, now[1].acceptance_sum) != (base[1].forwards, base[1].acceptance_sum)
        for stride in (1, 2, 3, 4, 5, 6):
            for narrow in (False, True) if stride > 1 else (False,):
                want, st = isd.isd_generate(t, prompt, SamplingParams(n, temperature=0), stride=stride, narrow=narrow)
                got, st_mlx = mlx_isd.isd_generate(m, prompt,
                                                   SamplingParams(n, temperature=0), stride=stride, narrow=narrow)
                where = (ctx, prompt, stride, narrow)
                assert got == want, where
                assert_same_stats(st_mlx, st, where)
                rounds.update(v=st.rounds_v, r=st.rounds_r)
        assert mlx_isd.ar_generate(m, prompt,
                                   SamplingParams(n, temperature=0)) == isd.ar_generate(t, prompt, SamplingParams(n, temperature=0))
    assert rounds["v"] > 0 and rounds["r"] > 0, rounds  # drafts were both accepted and rejected
    assert rounds["changed"] > 0 or not with_adapter, rounds


def test_greedy_batch_equals_solo_runs(pairs):
    """Rows with different prompt lengths, lengths and a stop id, decoded together, give their solo runs."""
    for ctx in (64, 24):
        t, m = pairs[ctx]
        settings = [([1, 2, 3], 25, ()), ([7], 18, ()), ([4, 4, 9, 0, 12, 5, 8, 8, 1], 30, ()),
                    ([2, 6], 22, (isd.isd_generate(t, [2, 6], SamplingParams(22, temperature=0), stride=3)[0][6],))]
        for stride in (2, 3, 4):
            for narrow in (False, True):
                reqs = [mlx_isd.Request(list(p), SamplingParams(n, temperature=0, stop_ids=s)) for p, n, s in settings]
                mlx_isd.decode(m, reqs, stride, narrow)
                for r, (p, n, s) in zip(reqs, settings):
                    want, st = isd.isd_generate(t, p,
                                                SamplingParams(n, temperature=0, stop_ids=s),
                                                stride=stride, narrow=narrow)
                    assert r.out == want, (ctx, p, stride, narrow)
                    assert_same_stats(r.stats, st, (ctx, p, stride, narrow))


def test_trace_and_drawn_from_match_pytorch(pairs):
    t, m = pairs[64]
    for stride in (2, 4):
        want = isd.Request([4, 4, 9], SamplingParams(20, temperature=0), trace=[], drawn_from=[])
        got = mlx_isd.Request([4, 4, 9], SamplingParams(20, temperature=0), trace=[], drawn_from=[])
        isd.decode(t, [want], stride)
        mlx_isd.decode(m, [got], stride)
        assert got.trace == want.trace
        assert len(got.drawn_from) == len(want.drawn_from) == 20
        for a, b in zip(got.drawn_from, want.drawn_from):
            assert np.array_equal(np.array(a), b.numpy())  # point masses when greedy


# ----------------------------------------------------------------------------------------------
# 2. sampling exactness: MLX ISD's continuations follow the enumerated AR law

SAMPLE_PROMPT = [1, 2]
N_SAMPLES = 3000
EXACT_CASES = [  # (temperature, top_k, top_p, stride, new tokens, narrow)
    (1.0, None, None, 2, 3, False),
    (0.7, None, None, 4, 4, False),  # 4 new tokens: all three drafts of a full window count
    (1.0, 3, None, 3, 3, False),
    (1.0, None, 0.8, 3, 3, False),
    (0.7, None, 0.9, 3, 4, True),
]


@pytest.fixture(scope="module")
def sampling_pair(tmp_path_factory):
    """(reference.py's float64 sampling model, for the enumeration; its weights in MLX float32)."""
    t = sampling_model()
    return t, as_mlx(t, str(tmp_path_factory.mktemp("sampling")))


def mlx_samples(model, n, stride, n_samples, temperature, top_k=None, top_p=None, seed0=0, narrow=False, batch=500):
    """`n_samples` continuations of SAMPLE_PROMPT from batched MLX ISD, one seed per row; summed stats."""
    counts, tot = Counter(), Counter()
    for start in range(0, n_samples, batch):
        reqs = [mlx_isd.Request(list(SAMPLE_PROMPT),
                                SamplingParams(n, temperature, top_k, top_p, seed0 + s))
                for s in range(start, min(n_samples, start + batch))]
        mlx_isd.decode(model, reqs, stride, narrow)
        for r in reqs:
            assert len(r.out) == n
            counts[tuple(r.out)] += 1
            tot.update({k: getattr(r.stats, k) for k in ("rounds_v", "rounds_r", "rounds_c")})
    return counts, tot


def law(model, n, temperature, top_k=None, top_p=None):
    with torch.no_grad():
        return exact_continuations(model, SAMPLE_PROMPT, n, temperature, top_k, top_p)


@pytest.mark.parametrize("temperature,top_k,top_p,stride,n,narrow", EXACT_CASES)
def test_mlx_isd_samples_the_exact_ar_distribution(sampling_pair, temperature, top_k, top_p, stride, n, narrow):
    t, m = sampling_pair
    counts, tot = mlx_samples(m, n, stride, N_SAMPLES, temperature, top_k, top_p, 1000 * stride + n, narrow)
    assert tot["rounds_r"] > 0 and tot["rounds_v"] > 0, tot  # both branches of verification ran
    assert chi2_pvalue(counts, law(t, n, temperature, top_k, top_p)) > P_MIN


def test_mlx_ar_samples_the_exact_ar_distribution(sampling_pair):
    t, m = sampling_pair
    counts = Counter(tuple(mlx_isd.ar_generate(m, SAMPLE_PROMPT,
                                               SamplingParams(2, temperature=1.0, seed=s))) for s in range(400))
    assert chi2_pvalue(counts, law(t, 2, 1.0)) > P_MIN


@pytest.mark.parametrize("rule", ["always_accept", "argmax_drafts"])
def test_wrong_acceptance_rules_fail_the_same_check(sampling_pair, monkeypatch, rule):
    """Power: the same check rejects MLX ISD with a broken rule (half the samples)."""
    if rule == "always_accept":
        real = mlx_isd.verify
        monkeypatch.setattr(mlx_isd, "verify", lambda *a: (mx.ones_like(real(*a)[0]), *real(*a)[1:]))
    else:
        real = mlx_isd.sample
        monkeypatch.setattr(mlx_isd, "sample",  # the draft call has q of shape (N-1, V); q itself stays stored
                            lambda logits, temperature, key=None: mx.argmax(logits, axis=-1) if logits.ndim == 2
                            else real(logits, temperature, key))
    t, m = sampling_pair
    counts, _ = mlx_samples(m, 3, 3, N_SAMPLES // 2, 1.0, seed0=77)
    assert chi2_pvalue(counts, law(t, 3, 1.0)) < P_WRONG


# ----------------------------------------------------------------------------------------------
# 3. verify: the same decisions as kernels.verify_reference on the same random numbers

def verify_inputs(seed, R=300, V=11, same=False):
    """p, q logits (float32, with -inf where filtering removed a token: never all of a row), drafts
    sampled from q, uniforms and Gumbel noise, as numpy arrays; `same`: q = p."""
    rng = np.random.default_rng(seed)
    p = (2 * rng.standard_normal((R, V))).astype(np.float32)
    q = p + 1.5 * rng.standard_normal((R, V)).astype(np.float32)
    for x in (p, q):
        x[rng.random((R, V)) < 0.25] = -np.inf
        x[:, 0] = np.where(np.isinf(x).all(-1), 0.0, x[:, 0])
    q = p.copy() if same else q
    w = np.exp((q - q.max(-1, keepdims=True)).astype(np.float64))
    drafts = np.array([rng.choice(V, p=row / row.sum()) for row in w])
    u = rng.random(R).astype(np.float32)
    g = -np.log(-np.log(rng.random((R, V)))).astype(np.float32)
    return p, q, drafts, u, g


@pytest.mark.parametrize("temperature", [0, 0.7, 1.0])
def test_verify_matches_the_reference_decision_for_decision(temperature):
    for seed, same in ((0, False), (1, False), (2, True)):
        p, q, d, u, g = verify_inputs(seed, same=same)
        if same:
            u[:] = 1.0  # forced rejections: (p - q)+ is all zero, the correction falls back to p
        want = kernels.verify_reference(*(torch.from_numpy(x) for x in (p, q, d, u, g)), temperature)
        got = mlx_kernels.verify(*(mx.array(x) for x in (p, q, d, u, g)), temperature)
        acc, cor, ratio = (np.array(x) for x in got)
        assert got[0].dtype == mx.bool_ and got[1].dtype == mx.int64
        assert np.array_equal(acc, want[0].numpy())
        assert np.array_equal(cor, want[1].numpy())
        assert np.abs(ratio - want[2].numpy()).max() < 1e-6
        if temperature > 0:  # both outcomes, and corrections from a residual and (same) from p itself
            assert (0 < acc.sum() < len(acc)) if not same else not acc.any()


def test_sampling_helpers_match_pytorch():
    """mlx_port.sampling.process_logits / probs against sampling.py's, with MASK, top-k and top-p."""
    rng = np.random.default_rng(5)
    logits = (3 * rng.standard_normal((40, 9))).astype(np.float32)
    logits[:, 8] = 50.0  # MASK would win if it were not excluded
    for temperature, top_k, top_p in ((1.0, None, None), (0.6, None, None), (1.3, 3, None), (1.0, None, 0.8),
                                      (0.8, 4, 0.5), (1.0, 1, None), (0, 3, 0.5)):
        want = sampling.process_logits(torch.from_numpy(logits), 8, temperature, top_k, top_p)
        got = mlx_sampling.process_logits(mx.array(logits), 8, temperature, top_k, top_p)
        assert np.array_equal(np.isinf(np.array(got)), np.isinf(want.numpy())), (temperature, top_k, top_p)
        assert np.allclose(np.array(mlx_sampling.probs(got, temperature)), sampling.probs(want, temperature).numpy(),
                           atol=1e-6)
        assert np.array_equal(np.array(mlx_sampling.sample(got, 0)), want.argmax(-1).numpy())


# ----------------------------------------------------------------------------------------------
# 4. random streams: one per request

def test_same_seed_same_tokens_alone_or_in_a_batch(pairs):
    t, m = pairs[64]
    settings = [  # prompt, max_new_tokens, temperature, top_k, top_p, seed
        ([1, 2, 3], 11, 1.0, None, None, 10),
        ([4], 9, 0.7, 4, None, 11),
        ([2, 5, 7, 1, 3, 9], 13, 1.3, None, 0.9, 12),
        ([6, 6], 10, 0.0, None, None, 13),
        ([3, 1], 14, 1.0, None, None, 14),
    ]
    for stride in (2, 4):
        singles = [mlx_isd.isd_generate(m, p,
                                        SamplingParams(n, temperature=tmp, top_k=k, top_p=tp, seed=s),
                                        stride=stride) for p, n, tmp, k, tp, s in settings]
        again = [mlx_isd.isd_generate(m, p,
                                      SamplingParams(n, temperature=tmp, top_k=k, top_p=tp, seed=s),
                                      stride=stride)[0] for p, n, tmp, k, tp, s in settings]
        assert again == [out for out, _ in singles]
        for order in (list(range(5)), [3, 0, 4, 2, 1]):
            reqs = [mlx_isd.Request(list(settings[i][0]), SamplingParams(*settings[i][1:])) for i in order]
            mlx_isd.decode(m, reqs, stride)
            for r, i in zip(reqs, order):
                out, st = singles[i]
                assert r.out == out, (stride, i)
                for k in STATS:
                    assert getattr(r.stats, k) == getattr(st, k), (stride, i, k)
                assert r.stats.acceptance_sum == pytest.approx(st.acceptance_sum, abs=1e-6)
    # different seeds, or none (a fresh key each time), give different samples
    runs = [tuple(mlx_isd.isd_generate(m, [1, 2, 3],
                                       SamplingParams(30, temperature=1.5, seed=s),
                                       stride=3)[0]) for s in (1, 2, None, None)]
    assert len(set(runs)) == 4
    assert mlx_isd.ar_generate(m, [5],
                               SamplingParams(20, temperature=1.0, seed=3)) == mlx_isd.ar_generate(m, [5], SamplingParams(20, temperature=1.0, seed=3))


# ----------------------------------------------------------------------------------------------
# 5. the command line

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny random checkpoint with a BPE tokenizer, written by PyTorch."""
    d = str(tmp_path_factory.mktemp("cli"))
    enc = tok.train_bpe("".join(f"ROMEO: line {i} of the play, said the king.\n" for i in range(100)), 300)
    torch_model(seed=4, std=0.8, vocab=enc.n_vocab + 1).save(d)  # some drafts pass
    tok.save(enc, d)
    return d


def run(*cmd):
    return subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.slow  # end to end (a subprocess, a whole command): CI runs it, -m 'not slow' skips it
def test_command_line_matches_pytorch_and_runs_without_torch(ckpt, tmp_path):
    args = [f"--out_dir={ckpt}", "--prompt=ROMEO:", "--temperature=0", "--max_new_tokens=16", "--stride=3"]
    want = run("sample.py", *args, "--json")
    assert want.returncode == 0, want.stderr
    want = json.loads(want.stdout)
    html = tmp_path / "trace.html"
    got = run("-m", "mlx_port.sample", *args, "--json", f"--visualize={html}")
    assert got.returncode == 0, got.stderr
    got = json.loads(got.stdout)
    assert got["tokens"] == want["tokens"] and got["text"] == want["text"] and len(got["tokens"]) > 3
    assert {k: got["stats"][k] for k in STATS} == {k: want["stats"][k] for k in STATS}
    assert html.read_text().count("<tr>") == got["stats"]["forwards"] + 1
    shown = run("-m", "mlx_port.sample", *args, "--visualize")  # the trace, one forward per line, in colour
    assert shown.returncode == 0 and shown.stdout.count("\n") == got["stats"]["forwards"], shown.stderr
    # torch unimportable: mlx_port.sample and everything it imports must do without it
    script = ("import sys, runpy; sys.modules['torch'] = None; "
              f"sys.argv = ['mlx_port.sample', *{args + ['--json']!r}]; "
              "runpy.run_module('mlx_port.sample', run_name='__main__', alter_sys=True); "
              "print(sorted(m for m in ('isd', 'model', 'sampling', 'kernels', 'lora', 'sample') if m in sys.modules))")
    bare = run("-c", script)
    assert bare.returncode == 0, bare.stderr
    out, loaded = bare.stdout.strip().splitlines()
    assert json.loads(out)["tokens"] == want["tokens"] and loaded == "[]"
    bad = run("-m", "mlx_port.sample", "--out_dir=/nonexistent")
    assert bad.returncode == 2 and "no checkpoint" in bad.stderr and "Traceback" not in bad.stderr
