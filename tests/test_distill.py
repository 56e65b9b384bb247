"""Self-distillation (distill.py) and the N*N ISD window it trains for, against independent references.

The references are written here or, shared with other test modules, in tests/reference.py (brute-force
greedy decoding, ref_distill_loss), never taken from the code under test:
  - the window's rules (who sits where, who sees whom) stated slot by slot in plain loops;
  - every slot of ISD's cached window forward vs one full forward, without a cache, of exactly the
    tokens that slot sees, at their positions (a mask of group g sees the committed text, the clean
    tokens 0..g of the window and the earlier masks of its group: a contiguous causal sequence);
  - distill_loss's logits rebuilt position by position from full causal forwards of the context
    each position sees, then hard / soft cross-entropies written out with MASK excluded by hand;
  - greedy rollouts vs brute-force greedy decoding (one full forward per token, no cache);
  - lossless adapters: greedy ISD through the trained adapter vs brute-force greedy of the base.
Models are tiny random float64 models (tests/reference.py's tiny_model), so exact identities hold to 1e-9;
one float32 model checks distill_loss's precision.
"""
import copy
import json
import math
import os
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import checkpoint  # noqa: E402
import distill  # noqa: E402
import isd  # noqa: E402
import lora  # noqa: E402
import options  # noqa: E402
import model as model_module  # noqa: E402
from model import Model  # noqa: E402
from reference import (brute_greedy, full_logits, interrupt_rename,  # noqa: E402
                       ref_distill_loss, tiny_model)
from decoding import SamplingParams  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-9


# ----------------------------------------------------------------------------------------------
# helpers (independent of the code under test)

def clean_tokens(gen, shape, model):
    """Random ids that are never MASK."""
    V, M = model.cfg.vocab_size, model.cfg.mask_token_id
    t = torch.randint(0, V - 1, shape, generator=gen)
    return t + (t >= M).long()  # skip the MASK id wherever it sits


def contains(hay, needle):
    hay, needle = list(hay), list(needle)
    return any(hay[i:i + len(needle)] == needle for i in range(len(hay) - len(needle) + 1))


# ----------------------------------------------------------------------------------------------
# 1. the window: its layout, and what each of its slots computes

def brute_layout(N, K):
    """[(role, index, group, relative position)] per slot, and who sees whom, from the rules:
    clean c (c = 0 pending, c = j draft d_j) at position c sees clean 0..c; group g's mask m
    (m = 0..N-2) at position g+1+m sees clean 0..g and masks 0..m of group g; padding sees itself."""
    slots = [("clean", c, None, c) for c in range(K + 1)]
    for g in range(K + 1):
        slots += [("mask", m, g, g + 1 + m) for m in range(N - 1)]
    slots += [("pad", i, None, None) for i in range(N * N - len(slots))]
    see = [[False] * len(slots) for _ in slots]
    for a, (ra, ia, ga, _) in enumerate(slots):
        for b, (rb, ib, gb, _) in enumerate(slots):
            if ra == "clean":
                see[a][b] = rb == "clean" and ib <= ia
            elif ra == "mask":
                see[a][b] = (rb == "clean" and ib <= ga) or (rb == "mask" and gb == ga and ib <= ia)
            else:
                see[a][b] = a == b
    return slots, see


@pytest.mark.parametrize("N", [1, 2, 3, 4, 5])
def test_window_layout_matches_the_rules(N):
    assert isd.window_size(N) == N * N
    for K in range(N):
        pos, mask = isd.window_layout(N, K)
        slots, see = brute_layout(N, K)
        assert len(slots) == N * N and pos.shape == (N * N,) and mask.shape == (N * N, N * N)
        assert mask.tolist() == see, (N, K)
        for s, (role, _, _, p) in enumerate(slots):
            if p is not None:
                assert int(pos[s]) == p, (N, K, s)
        for g in range(K + 1):
            rows = range(N * N)[isd.group_rows(N, K, g)]
            assert [slots[s][:3] for s in rows] == [("mask", m, g) for m in range(N - 1)], (N, K, g)
        # padding count: N * (N-1-K) slots; none of them is seen by any other slot
        pads = [s for s, sl in enumerate(slots) if sl[0] == "pad"]
        assert len(pads) == N * (N - 1 - K)
        assert all(not see[a][b] for b in pads for a in range(N * N) if a != b)


def captured_step(model, req, stride, n_drafts=None):
    """Run isd_step once on `req` (already prefilled / stepped), first cutting its drafts to
    `n_drafts`; returns (ids, rel_pos, window_mask, logits (W, V), committed sequence before the step)."""
    seen = {}
    real = model.forward

    def spy(idx, pos=None, mask=None, cache=None, rows=None, hidden_only=False):
        out = real(idx, pos=pos, mask=mask, cache=cache, rows=rows, hidden_only=hidden_only)
        seen.update(len=int(cache.lengths[0]) - idx.shape[1], offset=int(cache.offsets[0]), ids=idx[0].tolist(),
                    pos=pos[0].tolist(), mask=mask[0].clone(), logits=(model.head(out) if hidden_only else out)[0])
        return out

    if n_drafts is not None:
        req.drafts, req.q_logits = req.drafts[:n_drafts], (req.q_logits[:n_drafts] if req.q_logits is not None else None)
    committed, drafts = req.prompt + req.out, list(req.drafts)
    model.forward = spy
    try:
        isd.isd_step(model, req.cache, [0], [req], stride)
    finally:
        del model.forward
    return seen, committed, drafts


@pytest.mark.parametrize("stride,max_seq_len,prompt_len", [(2, 64, 5), (3, 64, 6), (4, 64, 4), (3, 10, 19)])
@torch.no_grad()
def test_window_forward_equals_full_forward_of_what_each_slot_sees(stride, max_seq_len, prompt_len):
    """Every clean and mask slot of isd_step's cached window forward gives the logits of a plain
    full forward of the tokens it sees; max_seq_len 10 also covers the sliding context."""
    model = tiny_model(seed=stride + max_seq_len, max_seq_len=max_seq_len)
    N, M = stride, model.cfg.mask_token_id
    prompt = clean_tokens(torch.Generator().manual_seed(stride), (prompt_len,), model).tolist()
    req = isd.Request(prompt, SamplingParams(40, temperature=0))
    req.cache = model.new_cache(1, isd.cache_length(model, [req], N))
    isd.prefill(model, req.cache, [0], [req])
    checked, slid, Ks = 0, False, set()
    for step in range(6):
        K = None if step < 2 or N == 1 else step % N  # the natural K (0, then N-1) and cut ones
        seen, committed, drafts = captured_step(model, req, N, K)
        K = len(drafts)
        Ks.add(K)
        assert seen["ids"][1:K + 1] == drafts
        assert seen["ids"][0] == committed[-1]  # pending
        slots, see = brute_layout(N, K)
        W = len(seen["ids"])  # one row: the window is what it needs, the full layout less its padding
        assert W == isd.window_size(N, n_drafts=K) and all(role == "pad" for role, *_ in slots[W:])
        slots, see = slots[:W], [row[:W] for row in see[:W]]
        assert seen["mask"].tolist() == see
        assert seen["offset"] + seen["len"] == len(committed) - 1  # the cache: every committed token but pending
        slid = slid or seen["offset"] > 0
        for s, (role, i, g, p) in enumerate(slots):
            if role == "clean":
                ctx = committed + drafts[:i]
                assert seen["ids"][s] == ctx[-1]
            elif role == "mask":
                ctx = committed + drafts[:g] + [M] * (i + 1)
                assert seen["ids"][s] == M
            else:
                continue
            assert seen["pos"][s] == p
            ref = full_logits(model, ctx)
            assert (seen["logits"][s] - ref).abs().max() < TOL, (stride, step, s, role)
            checked += 1
        if req.done:
            break
    assert Ks == set(range(N)) and checked > 0
    assert slid == (max_seq_len == 10)  # the sliding context was really exercised (and only there)


# ----------------------------------------------------------------------------------------------
# 2. distill_loss

def _distill_case(mask_token_id, cases=(("hard", 1.0), ("soft", 1.0), ("soft", 0.7))):
    """distill_loss on a float64 model against the float64 reference, to TOL."""
    model = tiny_model(seed=11, vocab=12, mask_token_id=mask_token_id)
    g = torch.Generator().manual_seed(5)
    x0 = clean_tokens(g, (2, 9), model)
    labels = x0.clone()
    labels[0, :3] = -100  # a prompt that ends mid-block
    labels[1, :1] = -100
    for stride in (2, 3, 4):
        for supervision, T in cases:
            with torch.no_grad():
                got = float(distill.distill_loss(model, x0, labels, stride, supervision, T))
            ref = ref_distill_loss(model, x0, labels, stride, supervision, T)
            assert abs(got - ref) < TOL * max(1.0, abs(ref)), (stride, supervision, T, got, ref)
    # the soft loss really depends on the temperature: the reference at another one is far off
    ref_wrong = ref_distill_loss(model, x0, labels, 3, "soft", 0.7)
    with torch.no_grad():
        assert abs(float(distill.distill_loss(model, x0, labels, 3, "soft", 1.0)) - ref_wrong) > 1e-4


def test_distill_loss_in_float32_on_large_logits_is_within_float32_rounding():
    """float32 weights (what training runs in on a CPU): distill_loss is computed in at least float32, and
    stably. On a float32 model with large logits (std 3: some rows spread over more than 104 / T, so a naive
    log(softmax) in float32 underflows to -inf), the loss of hard, soft and mixed targets is within float32
    rounding (1e-5, relative) of the float64 reference on the same weights, and comes back in float32. The
    tolerance tells precisions apart: the same model run in bfloat16 or float16 misses it (its loss still
    comes back in float32: promoted, not computed in half precision)."""
    model = tiny_model(seed=11, vocab=12, std=3.0, dtype=torch.float32)
    model64 = copy.deepcopy(model).double()
    g = torch.Generator().manual_seed(5)
    x0 = clean_tokens(g, (2, 9), model)
    labels = x0.clone()
    labels[0, :3] = -100
    labels[1, :1] = -100
    hard_rows = torch.tensor([True, False])
    with torch.no_grad():
        logits = model64(x0)
    spread = logits.max(-1).values - logits.min(-1).values
    assert float(spread.max()) / 0.7 > 104  # exp(-104) is below float32's smallest number
    assert float((torch.softmax(logits.float() / 0.7, -1)).log().isinf().sum()) > 0  # naive float32 underflows
    tol = 1e-5
    for stride in (2, 3, 4):
        for supervision, T in (("hard", 1.0), ("soft", 0.7), ("mixed", 0.7)):
            hr = hard_rows if supervision == "mixed" else None
            ref = ref_distill_loss(model64, x0, labels, stride, supervision, T, hr)
            with torch.no_grad():
                got = distill.distill_loss(model, x0, labels, stride, supervision, T, hr)
            assert got.dtype == torch.float32 and math.isfinite(float(got))
            assert abs(float(got) - ref) < tol * max(1.0, abs(ref)), (stride, supervision, float(got), ref)
            for low in (torch.bfloat16, torch.float16):
                with torch.no_grad():
                    half = distill.distill_loss(copy.deepcopy(model).to(low), x0, labels, stride, supervision, T, hr)
                assert half.dtype == torch.float32, low
                assert abs(float(half) - ref) > tol * max(1.0, abs(ref)), (stride, supervision, low)


def test_distill_loss_matches_slow_reference_float64():
    _distill_case(None)


def test_distill_loss_soft_with_mask_not_last_id():
    _distill_case(5, cases=(("soft", 1.0), ("soft", 0.7)))


def test_distill_loss_hard_with_mask_not_last_id():
    _distill_case(5, cases=(("hard", 1.0),))


def test_weighted_and_mixed_distill_loss_match_the_slow_reference():
    """weights= (learn.py's rejected tokens weighed up): sum(w * l) / sum(w) over the targets, for hard, soft
    and mixed targets (hard_rows), in float64; weights on non-targets (the prompt, the first token) count for
    nothing; all-ones weights give the plain mean; other weights really move the value."""
    model = lora.add_adapter(tiny_model(seed=12, vocab=12), lora.LoraConfig(rank=2, lora_alpha=2, base=".."))
    with torch.no_grad():  # a trained adapter: the masks' logits are not the base model's
        for p in model.lora.B.values():
            p.normal_(0, 0.3)
    g = torch.Generator().manual_seed(6)
    x0 = clean_tokens(g, (3, 8), model)
    labels = x0.clone()
    labels[0, :3] = -100
    labels[1, :1] = -100
    labels[2, :5] = -100
    hard_rows = torch.tensor([True, False, True])
    weights = 0.5 + 3 * torch.rand(3, 8, generator=g, dtype=torch.float64)
    weights[0, 4] = 0.0  # a target that counts for nothing
    weights[labels == -100] = 1e6  # not targets: must not count
    weights[:, 0] = 1e6  # never a target (nothing predicts the first token)
    ones = torch.ones(3, 8, dtype=torch.float64)
    checked = 0
    for stride in (2, 3):
        for supervision, T in (("hard", 1.0), ("soft", 1.0), ("soft", 0.7), ("mixed", 0.7)):
            hr = hard_rows if supervision == "mixed" else None
            with torch.no_grad():
                got = distill.distill_loss(model, x0, labels, stride, supervision, T, hr, weights)
                plain = float(distill.distill_loss(model, x0, labels, stride, supervision, T, hr))
                flat = float(distill.distill_loss(model, x0, labels, stride, supervision, T, hr, ones))
            assert got.dtype == torch.float64
            ref = ref_distill_loss(model, x0, labels, stride, supervision, T, hard_rows, weights)
            ref_plain = ref_distill_loss(model, x0, labels, stride, supervision, T, hard_rows)
            assert abs(float(got) - ref) < TOL * max(1.0, abs(ref)), (stride, supervision, T, float(got), ref)
            assert abs(plain - ref_plain) < TOL * max(1.0, abs(ref_plain)), (stride, supervision, T)
            assert abs(flat - ref_plain) < TOL * max(1.0, abs(ref_plain)), (stride, supervision, T)
            assert abs(ref - ref_plain) > 1e-3, (stride, supervision, T)  # the weights matter
            checked += 1
        # mixed really mixes: neither all-hard nor all-soft
        with torch.no_grad():
            mixed = float(distill.distill_loss(model, x0, labels, stride, "mixed", 0.7, hard_rows, weights))
        for target in ("hard", "soft"):
            assert abs(mixed - ref_distill_loss(model, x0, labels, stride, target, 0.7, None, weights)) > 1e-3
    assert checked == 8
    # the weighted loss's gradient is the weighted mean of the per-target gradients: a weight of 0 removes
    # a row's targets from the gradient as from the value
    only_first = torch.zeros(3, 8, dtype=torch.float64)
    only_first[0] = 1.0
    grads = []
    for x, y, w in ((x0, labels, only_first), (x0[:1], labels[:1], None)):
        model.lora.zero_grad(set_to_none=True)
        distill.distill_loss(model, x, y, 3, "hard", 1.0, None, w).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.lora.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-10) and grads[0].abs().max() > 0


def test_distill_loss_has_gradients_only_through_the_masks():
    model = lora.add_adapter(tiny_model(seed=2), lora.LoraConfig(rank=2, lora_alpha=2, base=".."))
    with torch.no_grad():
        for p in model.lora.B.values():
            p.normal_(0, 0.1)
    x0 = clean_tokens(torch.Generator().manual_seed(1), (2, 8), model)
    loss = distill.distill_loss(model, x0, x0.clone(), 3, "soft", 1.0)
    loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("lora."))
    assert any(float(p.grad.abs().max()) > 0 for p in model.lora.parameters())


# ----------------------------------------------------------------------------------------------
# 3. rollouts

def test_rollouts_both_are_greedy_then_sampled():
    model = tiny_model(seed=4, vocab=16)
    train_ids = np.random.default_rng(1).integers(0, 15, 400).astype(np.uint16)
    cfg = distill.DistillConfig(n_rollouts=40, prompt_len=3, seq_len=12, seed=5, temperature=1.0)
    assert (cfg.rollouts, cfg.supervision) == ("both", "mixed")  # the default recipe
    rows, _ = distill.rollouts(model, train_ids, cfg, log=None)
    greedy = [rows[r, 3:].tolist() == isd.ar_generate(model, rows[r, :3].tolist(),
                                                      SamplingParams(9, temperature=0)) for r in range(40)]
    assert all(greedy[:20]) and sum(greedy[20:]) < 10  # the first half greedy, the second sampled


def test_rollouts_greedy_are_the_models_greedy_continuations():
    model = tiny_model(seed=4, vocab=16)
    train_ids = np.random.default_rng(0).integers(0, 15, 400).astype(np.uint16)  # never MASK (15)
    cfg = distill.DistillConfig(rollouts="greedy", supervision="hard", n_rollouts=260, prompt_len=3, seq_len=9,
                                seed=7)  # two batches of 256
    rows, labels = distill.rollouts(model, train_ids, cfg, log=None)
    assert rows.shape == (260, 9) and labels.shape == (260, 9)
    assert (labels[:, :3] == -100).all() and torch.equal(labels[:, 3:], rows[:, 3:])
    for r in range(260):
        prompt = rows[r, :3].tolist()
        assert contains(train_ids.tolist(), prompt)
        ref = isd.ar_generate(model, prompt, SamplingParams(6, temperature=0))
        assert rows[r, 3:].tolist() == ref, r
        if r % 64 == 0:  # and a brute-force reference, no cache, for a few
            assert rows[r, 3:].tolist() == brute_greedy(model, prompt, 6), r
    assert len({tuple(r) for r in rows.tolist()}) > 10  # different prompts, different rows


def test_rollouts_none_is_the_training_text():
    model = tiny_model(seed=4, vocab=16)
    train_ids = np.random.default_rng(1).integers(0, 15, 300).astype(np.uint16)
    cfg = distill.DistillConfig(rollouts="none", supervision="soft", n_rollouts=20, prompt_len=3, seq_len=10)
    rows, labels = distill.rollouts(model, train_ids, cfg, log=None)
    assert rows.shape == (20, 10) and torch.equal(rows, labels)
    assert all(contains(train_ids.tolist(), r) for r in rows.tolist())
    with pytest.raises(ValueError, match="supervision=soft"):
        distill.DistillConfig(rollouts="none", supervision="hard")


# ----------------------------------------------------------------------------------------------
# 4. lossless: the trained adapter changes q, never p

def test_trained_adapter_is_lossless_and_only_runs_at_masks(monkeypatch):
    base = tiny_model(seed=9, vocab=16, std=0.4)
    model = copy.deepcopy(base)
    train_ids = np.random.default_rng(2).integers(0, 15, 300).astype(np.uint16)
    cfg = distill.DistillConfig(n_rollouts=16, prompt_len=3, seq_len=16, iters=6, batch_size=4, rank=4, lr=3e-2, seed=3)
    rows, labels = distill.rollouts(model, train_ids, cfg, log=None)
    distill.train_adapter(model, rows, labels, 3, cfg, log=None)
    M = base.cfg.mask_token_id
    assert not model.training
    # the base weights are untouched and frozen
    for (n, p), (n2, p2) in zip(base.named_parameters(), [(n, p) for n, p in model.named_parameters()
                                                          if not n.startswith("lora.")]):
        assert n == n2 and torch.equal(p, p2) and not p2.requires_grad
    assert model.lora.cfg.base == ".."  # distill.save puts the adapter in <checkpoint>/distilled
    assert any(float(b.detach().abs().max()) > 0 for b in model.lora.B.values())  # trained: B left zero
    g = torch.Generator().manual_seed(8)
    x = clean_tokens(g, (2, 10), base)
    with torch.no_grad():
        # no MASK in the input: exactly the base, and the adapter computes nothing
        calls = []
        real_linear = F.linear
        fake = types.SimpleNamespace(**{k: getattr(F, k) for k in dir(F) if not k.startswith("__")})
        fake.linear = lambda *a, **k: (calls.append(1), real_linear(*a, **k))[1]
        monkeypatch.setattr(lora, "F", fake)
        assert torch.equal(model(x), base(x)) and model.lora.rows is None and calls == []
        # with MASKs: clean positions before any MASK unchanged bit for bit, q changed
        xm = x.clone()
        xm[0, 4:7] = M
        xm[1, 8] = M
        got, ref = model(xm), base(xm)
        assert sorted(model.lora.rows.tolist()) == [4, 5, 6, 18]
        assert len(calls) == 2 * len(model.lora.A)  # A then B, once per target projection
        monkeypatch.undo()
        assert torch.equal(got[0, :4], ref[0, :4]) and torch.equal(got[1, :8], ref[1, :8])
        assert (got[0, 4:7] - ref[0, 4:7]).abs().max() > 1e-3  # the adapter changed q
    # greedy ISD through the adapter == brute-force greedy AR of the base, token for token
    forwards = tokens = 0
    for k, stride in enumerate((2, 3, 4)):
        prompt = clean_tokens(torch.Generator().manual_seed(20 + k), (4,), base).tolist()
        out, st = isd.isd_generate(model, prompt, SamplingParams(24, temperature=0), stride=stride)
        assert out == brute_greedy(base, prompt, 24), stride
        assert out == isd.ar_generate(base, prompt, SamplingParams(24, temperature=0))
        forwards, tokens = forwards + st.forwards, tokens + st.tokens
    assert tokens == 72 and forwards <= tokens


# ----------------------------------------------------------------------------------------------
# 5 and 6. the folders: train.py distils, distill.save, relative base, command lines

CORPUS = "".join(f"ROMEO: line {i} of the play, said the king to the queen.\nJULIET: and {i * 7 % 13} more.\n"
                 for i in range(300))


def cli(script, *args, cwd=ROOT, env_extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """`python train.py --preset=tiny --distill_iters=3 --max_iters=4`: a checkpoint and its adapter."""
    d = tmp_path_factory.mktemp("distilled_run")
    (d / "c.txt").write_text(CORPUS)
    r = cli("train.py", "--preset=tiny", "--vocab_size=300", "--seq_len=32", "--distill_iters=3", "--max_iters=4",
            f"--data={d / 'c.txt'}", f"--out_dir={d / 'out'}", env_extra={"IDLM_CACHE": str(d / "cache")})
    assert r.returncode == 0, r.stderr[-3000:]
    return d / "out", d


def test_train_writes_a_distilled_adapter_whose_base_is_the_checkpoint(trained):
    out, _ = trained
    folder = out / "distilled"
    assert sorted(os.listdir(folder)) == ["adapter.json", "adapter.safetensors"]  # no stage left behind
    cfg, state = lora.load_adapter(str(folder))
    assert cfg.base == ".."
    assert os.path.samefile(checkpoint.base_of(str(folder), cfg.base), out)
    assert checkpoint.distilled_or_base(str(out)) == os.path.join(str(out), "distilled")
    assert any(float(v.abs().max()) > 0 for k, v in state.items() if k.startswith("B."))  # trained


@pytest.mark.slow  # end to end (a subprocess, a whole command): CI runs it, -m 'not slow' skips it
def test_train_distill_usage_errors(tmp_path):
    (tmp_path / "c.txt").write_text(CORPUS)
    for args, needle in [(["--distill_iters=-1"], "--distill_iters must be >= 0"),
                         (["--distill_iters=3", "--objective=ar"], "objective=ar")]:
        r = cli("train.py", "--preset=tiny", "--max_iters=2", f"--data={tmp_path / 'c.txt'}",
                f"--out_dir={tmp_path / 'o'}", *args, env_extra={"IDLM_CACHE": str(tmp_path / "cache")})
        err = r.stderr.strip()
        assert r.returncode == 2 and len(err.splitlines()) == 1 and needle in err, (args, err)
        assert not os.path.exists(tmp_path / "o")


def test_adapter_folder_survives_moving_the_checkpoint(trained, tmp_path):
    """Copied, then renamed: the adapter names its base relative to itself ("..")."""
    out, _ = trained
    shutil.copytree(out, tmp_path / "a")
    os.rename(tmp_path / "a", tmp_path / "moved")  # the old folder name no longer exists
    moved = str(tmp_path / "moved")
    src = checkpoint.distilled_or_base(moved)
    assert src == os.path.join(moved, "distilled")
    model, enc = lora.load_model(src)
    base, _ = lora.load_model(moved)
    assert checkpoint.distilled_or_base(str(tmp_path)) == str(tmp_path)  # no adapter: the folder itself
    assert hasattr(model, "lora") and not hasattr(base, "lora")
    for (n, p), (n2, p2) in zip(base.named_parameters(), [(n, p) for n, p in model.named_parameters()
                                                          if not n.startswith("lora.")]):
        assert n == n2 and torch.equal(p, p2)
    prompt = enc.encode_ordinary("ROMEO:")
    assert isd.isd_generate(model, prompt, SamplingParams(12, temperature=0), stride=4)[0] == \
        isd.ar_generate(base, prompt, SamplingParams(12, temperature=0))


def test_save_writes_relative_base_and_replaces_atomically(trained, tmp_path):
    out, _ = trained
    shutil.copytree(out, tmp_path / "ck")
    ck = str(tmp_path / "ck")
    model = lora.add_adapter(Model.load(ck), lora.LoraConfig(rank=2, lora_alpha=2, base=".."))
    with torch.no_grad():
        for p in model.lora.B.values():
            p.fill_(0.25)
    folder = distill.save(model, ck)
    assert folder == os.path.join(ck, "distilled")
    assert json.load(open(os.path.join(folder, "adapter.json")))["base"] == ".."
    assert sorted(os.listdir(ck)) == sorted(os.listdir(out))  # nothing left beside distilled/
    loaded, _ = lora.load_model(checkpoint.distilled_or_base(ck))
    assert loaded.lora.cfg.rank == 2
    assert all(torch.equal(loaded.lora.B[k], model.lora.B[k]) for k in model.lora.B)


RANK_OF = {0.25: 2, 0.5: 2, 0.75: 3}  # the value of B of each adapter the test below saves -> its rank


def adapter_in(folder):
    """The value every B matrix holds in the adapter that loads from `folder`'s distilled/, after checking that
    it is whole (its rank is the one saved with that value, and it loads over its base); None if none loads."""
    src = checkpoint.distilled_or_base(folder)
    try:
        model, _ = lora.load_model(src)
    except (OSError, ValueError):
        return None
    values = {v for p in model.lora.B.values() for v in p.detach().flatten().tolist()}
    assert len(values) == 1
    value = values.pop()
    assert model.lora.cfg.rank == RANK_OF[value]
    return value


def test_a_distill_save_interrupted_anywhere_never_leaves_a_mix(trained, tmp_path, monkeypatch):
    """Interrupt distill.save at each rename in turn, and while it writes the tensors. Over an adapter of the
    same shape (rank 2 over rank 2): distilled/ holds the old adapter whole or the new one whole. Over one of
    another shape (rank 3 over rank 2): the old whole, the new whole, or no adapter (its config replaced, its
    tensors gone), never a mix that loads."""
    out, _ = trained

    def adapter(rank, value):
        model = lora.add_adapter(Model.load(str(out)), lora.LoraConfig(rank=rank, lora_alpha=2, base=".."))
        with torch.no_grad():
            for p in model.lora.B.values():
                p.fill_(value)
        return model
    base = tmp_path / "base"
    shutil.copytree(out, base)
    distill.save(adapter(2, 0.25), str(base))
    write = model_module.save_file

    def half_written(tensors, path, metadata=None):
        open(path, "wb").write(b"\0" * 100)
        raise KeyboardInterrupt
    for rank, value, allowed in ((2, 0.5, {0.25, 0.5}), (3, 0.75, {0.25, 0.75, None})):
        new, seen = adapter(rank, value), []
        for k in range(0, 20):  # k = 0: interrupted while it writes adapter.safetensors
            ck = str(tmp_path / f"r{rank}-{k}")
            shutil.copytree(base, ck)
            interrupt_rename(monkeypatch, k)
            if k == 0:
                monkeypatch.setattr(model_module, "save_file", half_written)
            try:
                distill.save(new, ck)
                finished = True
            except KeyboardInterrupt:
                finished = False
            monkeypatch.undo()
            assert model_module.save_file is write
            seen.append(adapter_in(ck))
            assert not [n for n in os.listdir(os.path.join(ck, "distilled")) if n.startswith(".")]
            if finished:
                break
        assert finished and seen[0] == 0.25 and seen[-1] == value and set(seen) <= allowed, (rank, seen)
        assert len(seen) > 2  # more than one rename was interrupted
        distill.save(new, str(tmp_path / f"r{rank}-0"))  # the folder of a save interrupted while writing takes the next
        assert adapter_in(str(tmp_path / f"r{rank}-0")) == value



@pytest.mark.slow  # end to end (a subprocess, a whole command): CI runs it, -m 'not slow' skips it
def test_sample_cli_names_the_folder_it_decodes_with(trained):
    out, _ = trained
    got = {}
    for extra in ([], ["--base"]):
        r = cli("sample.py", f"--out_dir={out}", "--prompt=ROMEO:", "--temperature=0", "--max_new_tokens=10", "--json",
                *extra)
        assert r.returncode == 0, r.stderr[-2000:]
        got[bool(extra)] = json.loads(r.stdout)
    assert got[False]["model"] == os.path.join(str(out), "distilled")
    assert got[True]["model"] == str(out)
    assert got[False]["tokens"] == got[True]["tokens"]  # lossless


def one_error_line(r, script):
    """Exit 2, no traceback, and the one error line (argparse's usage lines may come before it)."""
    lines = r.stderr.strip().splitlines()
    errors = [ln for ln in lines if "error" in ln.lower()]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert len(errors) == 1 and errors[0] == lines[-1] and lines[-1].startswith(f"{script}: error: "), r.stderr
    return lines[-1]


def test_distill_cli_on_an_empty_folder(tmp_path):
    err = one_error_line(cli("distill.py", f"--out_dir={tmp_path}"), "distill.py")
    assert "config.json missing" in err and str(tmp_path) in err
    assert os.listdir(tmp_path) == []


def test_adapter_whose_base_is_missing_gives_a_clear_error(trained, tmp_path):
    out, _ = trained
    lonely = tmp_path / "lonely"
    shutil.copytree(out / "distilled", lonely / "distilled")  # the adapter without its checkpoint
    with pytest.raises(FileNotFoundError, match="config.json missing"):
        lora.load_model(str(lonely / "distilled"))
    err = one_error_line(cli("sample.py", f"--out_dir={lonely}", "--temperature=0", "--max_new_tokens=4"), "sample.py")
    assert str(lonely) in err and "config.json missing" in err


# ----------------------------------------------------------------------------------------------
# the learning-rate schedule: options.one_cycle_lr (both frameworks) against torch's OneCycleLR

@pytest.mark.parametrize("iters", [1, 2, 3, 6, 19, 21, 40, 101, 1000])
def test_schedule_is_torchs_one_cycle(iters):
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=iters, pct_start=0.05)
    for step in range(iters):
        want = sched.get_last_lr()[0]
        assert options.one_cycle_lr(step, 3e-3, iters) == pytest.approx(want, rel=1e-9, abs=0), step
        opt.step()
        sched.step()


def test_schedule_where_torch_divides_by_zero():
    """iters=20: the warm-up ends exactly at step 0 (torch's OneCycleLR raises ZeroDivisionError; distill.py
    once crashed there)."""
    lrs = [options.one_cycle_lr(s, 3e-3, 20) for s in range(20)]
    assert lrs[0] == 3e-3 and all(a > b for a, b in zip(lrs, lrs[1:])) and lrs[-1] == pytest.approx(3e-3 / 25 / 1e4)
