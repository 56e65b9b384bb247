"""Tests of model.py against independent references (docs/method.md section 1).

Every reference here is written from the method (docs/method.md), not from model.py: a loop-built attention mask, a
per-target slow introspective loss, full forwards vs incremental KV-cache decoding, and a naive
loop-based transformer forward that reads the model's weights from its state_dict.
All numerical checks run tiny random models in float64 (tests/reference.py's tiny_model, shape V23).
"""
import json
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model import Model, ModelConfig, ar_loss, idlm_loss, idlm_mask  # noqa: E402
from reference import V23, rand_tokens, tiny_model  # noqa: E402

TOL = 1e-10


# ----------------------------------------------------------------------------------------------
# helpers

def brute_idlm_mask(L, b):
    """The section-1 mask, built entry by entry. Rows/cols 0..L-1 = xt, L..2L-1 = x0."""
    m = [[False] * (2 * L) for _ in range(2 * L)]
    for q in range(2 * L):
        for k in range(2 * L):
            q_xt, k_xt = q < L, k < L
            qi, ki = q % L, k % L
            qb, kb = qi // b, ki // b
            if q_xt and k_xt:
                allowed = qb == kb and ki <= qi
            elif q_xt and not k_xt:
                allowed = kb < qb
            elif not q_xt and not k_xt:
                allowed = ki <= qi
            else:  # x0 query, xt key
                allowed = False
            m[q][k] = allowed
    return torch.tensor(m, dtype=torch.bool)


def ce(logits_row, target):
    """-log softmax(logits)[target] for one position, without F.cross_entropy."""
    return torch.logsumexp(logits_row, dim=-1) - logits_row[target]


def slow_idlm_reference(model, x0, labels, stride, mask_everything=False):
    """(task, clean) from docs/method.md section 1, one plain causal forward per scored xt position.

    mask_everything=True builds a deliberately WRONG xt (prompt tokens masked too), used only to
    show that the tests can tell the difference."""
    mask_id = model.cfg.mask_token_id
    b = stride - 1
    Bsz, L = x0.shape
    task_sum = torch.zeros((), dtype=torch.float64)
    clean_sum = torch.zeros((), dtype=torch.float64)
    n = 0
    for r in range(Bsz):
        xt = x0[r].clone()
        for j in range(L):
            if labels[r, j] != -100 or mask_everything:
                xt[j] = mask_id
        clean_logits = model(x0[r:r + 1])[0]
        for i in range(L - 1):
            tgt = int(labels[r, i + 1])
            if tgt == -100:
                continue
            n += 1
            blk = i // b
            ctx = torch.cat([x0[r, :blk * b], xt[blk * b:i + 1]])
            assert ctx.numel() == i + 1
            logits = model(ctx[None])[0, -1]
            task_sum = task_sum + ce(logits, tgt)
            clean_sum = clean_sum + ce(clean_logits[i], tgt)
    return task_sum / n, clean_sum / n


# ---- a naive transformer written from scratch, reading the model's weights ----

def naive_forward(sd, cfg, tokens, pos, mask):
    """Logits (T, vocab) for one row. `mask[q][k]` True = q may attend to k. `pos` list of ints."""
    T = len(tokens)
    hd, nh, nkv = cfg.d_model // cfg.n_head, cfg.n_head, cfg.n_kv_head
    group = nh // nkv
    half = hd // 2

    def rms(x, w):
        out = torch.empty_like(x)
        for t in range(x.shape[0]):
            row = x[t]
            denom = math.sqrt(float((row * row).sum()) / row.numel() + cfg.norm_eps)
            out[t] = w * (row / denom)
        return out

    def rope(x):  # x (T, hd): rotate pairs (j, j + hd/2) by angle pos * theta^(-2j/hd)
        out = torch.empty_like(x)
        for t in range(T):
            for j in range(half):
                ang = pos[t] * cfg.rope_theta ** (-(2.0 * j) / hd)
                c, s = math.cos(ang), math.sin(ang)
                a, bb = x[t, j], x[t, j + half]
                out[t, j] = a * c - bb * s
                out[t, j + half] = bb * c + a * s
        return out

    x = sd["embed_tokens.weight"][torch.as_tensor(tokens)].clone()
    for layer in range(cfg.n_layer):
        p = f"layers.{layer}."
        h = rms(x, sd[p + "input_layernorm.weight"])
        q = h @ sd[p + "self_attn.q_proj.weight"].T
        k = h @ sd[p + "self_attn.k_proj.weight"].T
        v = h @ sd[p + "self_attn.v_proj.weight"].T
        heads = []
        for hh in range(nh):
            kvh = hh // group  # query heads hh*... share the K/V head hh // group
            qh = rope(q[:, hh * hd:(hh + 1) * hd])
            kh = rope(k[:, kvh * hd:(kvh + 1) * hd])
            vh = v[:, kvh * hd:(kvh + 1) * hd]
            yh = torch.zeros(T, hd, dtype=x.dtype)
            for qi in range(T):
                keys = [ki for ki in range(T) if mask[qi][ki]]
                scores = torch.stack([(qh[qi] * kh[ki]).sum() / math.sqrt(hd) for ki in keys])
                w = torch.exp(scores - scores.max())
                w = w / w.sum()
                for wi, ki in zip(w, keys):
                    yh[qi] += wi * vh[ki]
            heads.append(yh)
        x = x + torch.cat(heads, dim=1) @ sd[p + "self_attn.o_proj.weight"].T
        h = rms(x, sd[p + "post_attention_layernorm.weight"])
        g = h @ sd[p + "mlp.gate_proj.weight"].T
        u = h @ sd[p + "mlp.up_proj.weight"].T
        act = g / (1.0 + torch.exp(-g))  # silu
        x = x + (act * u) @ sd[p + "mlp.down_proj.weight"].T
    x = rms(x, sd["norm.weight"])
    return x @ sd["embed_tokens.weight"].T


# ----------------------------------------------------------------------------------------------
# 1. the attention mask

@pytest.mark.parametrize("L,b", [(1, 1), (5, 1), (6, 2), (7, 2), (8, 3), (10, 3), (9, 4),
                                 (4, 4), (3, 5), (12, 5), (11, 11)])
def test_idlm_mask_matches_bruteforce(L, b):
    got = idlm_mask(L, b)
    assert got.dtype == torch.bool
    assert got.shape == (2 * L, 2 * L)
    assert torch.equal(got, brute_idlm_mask(L, b))


def test_idlm_mask_every_row_attends_something_and_sees_spec_context():
    # the mask at offset m of block B sees clean tokens 0..B*b-1 and the m masks before it
    # (plus itself), and nothing else.
    L, b = 11, 3
    m = idlm_mask(L, b)
    for i in range(L):
        B, off = divmod(i, b)
        xt_seen = set(torch.nonzero(m[i, :L]).flatten().tolist())
        x0_seen = set(torch.nonzero(m[i, L:]).flatten().tolist())
        assert xt_seen == set(range(B * b, B * b + off + 1))
        assert x0_seen == set(range(B * b))
    assert m.any(dim=1).all()


# ----------------------------------------------------------------------------------------------
# 2. the introspective loss

def chat_labels(x0, prefix_lens):
    labels = x0.clone()
    for r, p in enumerate(prefix_lens):
        labels[r, :p] = -100
    return labels


@pytest.mark.parametrize("stride", [2, 3, 4, 5])
@pytest.mark.parametrize("chat", [False, True])
@torch.no_grad()
def test_idlm_loss_matches_slow_reference(stride, chat):
    model = tiny_model(seed=stride, **V23)
    gen = torch.Generator().manual_seed(100 + stride)
    L = 11
    x0 = rand_tokens(gen, (2, L), model.cfg.vocab_size)
    labels = chat_labels(x0, [4, 7]) if chat else None
    ref_labels = labels if chat else x0
    ref_task, ref_clean = slow_idlm_reference(model, x0, ref_labels, stride)
    for alpha in (0.2, 0.7, "auto"):
        loss, task, clean = idlm_loss(model, x0, labels, stride=stride, alpha=alpha)
        assert abs(float(task) - float(ref_task)) < TOL
        assert abs(float(clean) - float(ref_clean)) < TOL
        w = float(ref_task / ref_clean) if alpha == "auto" else alpha
        assert abs(float(loss) - float(ref_task + w * ref_clean)) < TOL
    # the clean term is exactly the plain AR loss
    assert abs(float(ar_loss(model, x0, labels)) - float(ref_clean)) < TOL


@torch.no_grad()
def test_idlm_loss_chat_prefix_stays_clean_in_xt():
    # If unlabelled prefix tokens were masked in xt, the xt positions inside the prefix's last
    # block would see MASK instead of the prompt; the slow reference keeps them clean.
    # Make that difference matter: prefix ends mid-block and the reference must still match.
    model = tiny_model(seed=7, **V23)
    gen = torch.Generator().manual_seed(7)
    x0 = rand_tokens(gen, (3, 13), model.cfg.vocab_size)
    labels = chat_labels(x0, [5, 2, 9])
    ref_task, ref_clean = slow_idlm_reference(model, x0, labels, stride=4)
    _, task, clean = idlm_loss(model, x0, labels, stride=4, alpha=0.2)
    assert abs(float(task) - float(ref_task)) < TOL
    assert abs(float(clean) - float(ref_clean)) < TOL
    # and the "everything masked" variant really gives a different task value (test can fail)
    wrong_task, _ = slow_idlm_reference(model, x0, labels, stride=4, mask_everything=True)
    assert abs(float(wrong_task) - float(task)) > 1e-6


def test_idlm_loss_gradients_flow_and_auto_weight_is_detached():
    model = tiny_model(seed=3, **V23)
    model.train()
    gen = torch.Generator().manual_seed(3)
    x0 = rand_tokens(gen, (2, 9), model.cfg.vocab_size)
    labels = chat_labels(x0, [3, 1])

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    loss, task, clean = idlm_loss(model, x0, labels, stride=3, alpha=0.2)
    g = grads(loss)
    assert all(torch.isfinite(t).all() for t in g)
    assert sum(float(t.abs().sum()) for t in g) > 0
    # every parameter tensor receives gradient (embedding via input + tied output)
    assert all(float(t.abs().sum()) > 0 for t in g)

    # alpha="auto": gradient of task + c*clean with c = task/clean treated as a constant
    loss_a, task_a, clean_a = idlm_loss(model, x0, labels, stride=3, alpha="auto")
    assert abs(loss_a.item() - 2 * task_a.item()) < TOL
    g_auto = grads(loss_a)
    c = (task_a / clean_a).item()
    _, t2, c2 = idlm_loss(model, x0, labels, stride=3, alpha=0.2)
    g_ref = grads(t2 + c * c2)
    for a, r in zip(g_auto, g_ref):
        assert torch.allclose(a, r, atol=1e-10, rtol=0)
    # not the un-detached version (whose gradient would be 2 * d task)
    _, t3, _ = idlm_loss(model, x0, labels, stride=3, alpha=0.2)
    g_2task = grads(2 * t3)
    assert max(float((a - r).abs().max()) for a, r in zip(g_auto, g_2task)) > 1e-6


def test_idlm_loss_rejects_stride_one():
    model = tiny_model(**V23)
    x0 = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError):
        idlm_loss(model, x0, stride=1)


# ----------------------------------------------------------------------------------------------
# 3. the KV cache

def assert_close(a, b, tol=TOL):
    assert a.shape == b.shape
    err = float((a - b).abs().max()) if a.numel() else 0.0
    assert err < tol, f"max abs err {err}"


@torch.no_grad()
def test_kv_cache_prefill_then_one_token_at_a_time():
    model = tiny_model(seed=11, **V23)
    gen = torch.Generator().manual_seed(11)
    seq = rand_tokens(gen, (1, 20), model.cfg.vocab_size)
    full = model(seq)[0]
    cache = model.new_cache(1, max_len=32)
    out = model(seq[:, :6], cache=cache)[0]
    assert_close(out, full[:6])
    assert cache.lengths.tolist() == [6]
    for t in range(6, 20):
        out = model(seq[:, t:t + 1], cache=cache)[0, 0]
        assert_close(out, full[t])
        assert cache.lengths.tolist() == [t + 1]


@pytest.mark.parametrize("N", [3, 4])
@torch.no_grad()
def test_kv_cache_windows_with_mask_garbage_and_rollback(N):
    model = tiny_model(seed=20 + N, **V23)
    V, mask_id = model.cfg.vocab_size, model.cfg.mask_token_id
    gen = torch.Generator().manual_seed(20 + N)
    W = 2 * N - 1
    committed = rand_tokens(gen, (7,), V).tolist()
    cache = model.new_cache(1, max_len=64)
    model(torch.tensor([committed[:-1]]), cache=cache)  # cache = all committed but the pending one
    for step in range(6):
        n_drafts = N - 1 if step % 3 else 0  # cold starts have no drafts
        drafts = rand_tokens(gen, (n_drafts,), V).tolist()
        window = [committed[-1]] + drafts + [mask_id] * (W - 1 - n_drafts)
        assert len(window) == W
        before = int(cache.lengths[0])
        assert before == len(committed) - 1
        out = model(torch.tensor([window]), cache=cache)[0]
        # every window position equals a fresh forward of [cache tokens | window]
        ref = model(torch.tensor([committed[:-1] + window]))[0, before:]
        assert_close(out, ref)
        assert int(cache.lengths[0]) == before + W
        accepted = int(torch.randint(0, n_drafts + 1, (1,), generator=gen))
        cache.truncate([before + 1 + accepted])
        committed += drafts[:accepted] + rand_tokens(gen, (1,), V).tolist()
    # feed the real tokens: the last pending one plus a few more, compare to a fresh full forward
    tail = rand_tokens(gen, (3,), V).tolist()
    before = int(cache.lengths[0])
    out = model(torch.tensor([[committed[-1]] + tail]), cache=cache)[0]
    final = committed + tail
    full = model(torch.tensor([final]))[0]
    assert_close(out, full[before:])
    assert int(cache.lengths[0]) == len(final)


@torch.no_grad()
def test_kv_cache_batch_rows_with_different_lengths():
    N = 3
    W = 2 * N - 1
    model = tiny_model(seed=31, **V23)
    V, mask_id = model.cfg.vocab_size, model.cfg.mask_token_id
    gen = torch.Generator().manual_seed(31)
    true_lens = [4, 9, 6]
    R = len(true_lens)
    rows = [rand_tokens(gen, (n,), V).tolist() for n in true_lens]
    Lmax = max(true_lens)
    padded = torch.stack([torch.tensor(r + rand_tokens(gen, (Lmax - len(r),), V).tolist())
                          for r in rows])  # garbage padding
    cache = model.new_cache(R, max_len=64)
    out = model(padded, cache=cache)
    for r in range(R):
        ref = model(torch.tensor([rows[r]]))[0]
        assert_close(out[r, :true_lens[r]], ref)
    cache.truncate(true_lens)
    assert cache.lengths.tolist() == true_lens
    for step in range(5):
        window = rand_tokens(gen, (R, W), V)
        window[:, N:] = mask_id  # MASK slots at the end of every window
        before = cache.lengths.tolist()
        out = model(window, cache=cache)
        assert cache.lengths.tolist() == [b + W for b in before]
        for r in range(R):
            ref = model(torch.tensor([rows[r] + window[r].tolist()]))[0, before[r]:]
            assert_close(out[r], ref)
        keep = [int(torch.randint(1, N + 1, (1,), generator=gen)) for _ in range(R)]
        cache.truncate([b + k for b, k in zip(before, keep)])
        for r in range(R):
            rows[r] += window[r, :keep[r]].tolist()
    # rows now differ in length; a final real-token window agrees row by row
    assert len({len(r) for r in rows}) > 1
    final = rand_tokens(gen, (R, 2), V)
    before = cache.lengths.tolist()
    out = model(final, cache=cache)
    for r in range(R):
        full = model(torch.tensor([rows[r] + final[r].tolist()]))[0]
        assert_close(out[r], full[before[r]:])


@torch.no_grad()
def test_kv_cache_overflow_and_bad_truncate_raise():
    model = tiny_model(seed=41, max_seq_len=16, **V23)
    V = model.cfg.vocab_size
    gen = torch.Generator().manual_seed(41)
    cache = model.new_cache(2, max_len=8)
    model(rand_tokens(gen, (2, 6), V), cache=cache)
    with pytest.raises(ValueError):
        model(rand_tokens(gen, (2, 3), V), cache=cache)
    assert cache.lengths.tolist() == [6, 6]  # a refused forward changes nothing
    cache.truncate([2, 6])
    with pytest.raises(ValueError):  # row 1 is full
        model(rand_tokens(gen, (2, 3), V), cache=cache)
    model(rand_tokens(gen, (2, 2), V), cache=cache)  # 6 + 2 == 8 fits
    assert cache.lengths.tolist() == [4, 8]
    with pytest.raises(ValueError):
        cache.truncate([5, 8])  # longer than the current length
    with pytest.raises(ValueError):
        cache.truncate([-1, 3])
    assert cache.lengths.tolist() == [4, 8]
    with pytest.raises(ValueError):  # positions/mask come from the cache
        model(rand_tokens(gen, (2, 1), V), pos=torch.arange(1), cache=cache)
    # default max_len is the model's max_seq_len
    c2 = model.new_cache(1)
    assert c2.max_len == 16
    with pytest.raises(ValueError):
        model(rand_tokens(gen, (1, 17), V), cache=c2)


# ----------------------------------------------------------------------------------------------
# 4. the network itself vs a naive reference (GQA, RoPE, boolean mask, shared positions)

def causal_list(T):
    return [[k <= q for k in range(T)] for q in range(T)]


@torch.no_grad()
def test_forward_matches_naive_reference_causal():
    model = tiny_model(seed=51, rope_theta=500.0, **V23)
    cfg = model.cfg
    sd = model.state_dict()
    gen = torch.Generator().manual_seed(51)
    x = rand_tokens(gen, (2, 10), cfg.vocab_size)
    got = model(x)
    for r in range(2):
        ref = naive_forward(sd, cfg, x[r].tolist(), list(range(10)), causal_list(10))
        assert_close(got[r], ref)


@pytest.mark.parametrize("n_head,n_kv_head", [(4, 2), (4, 1), (4, 4)])
@torch.no_grad()
def test_forward_matches_naive_reference_idlm_input(n_head, n_kv_head):
    model = tiny_model(seed=52, n_head=n_head, n_kv_head=n_kv_head, rope_theta=300.0, **V23)
    cfg = model.cfg
    sd = model.state_dict()
    gen = torch.Generator().manual_seed(52)
    L, b = 7, 2
    x0 = rand_tokens(gen, (2, L), cfg.vocab_size)
    xt = x0.clone()
    xt[:, 2:] = cfg.mask_token_id
    inp = torch.cat([xt, x0], dim=1)
    pos = torch.arange(L).repeat(2)
    got = model(inp, pos=pos, mask=idlm_mask(L, b))
    mask_ref = brute_idlm_mask(L, b).tolist()
    pos_ref = [i % L for i in range(2 * L)]
    for r in range(2):
        ref = naive_forward(sd, cfg, inp[r].tolist(), pos_ref, mask_ref)
        assert_close(got[r], ref)
    # sensitivity: with distinct positions 0..2L-1 the xt half (which reads x0 keys) changes
    alt = naive_forward(sd, cfg, inp[0].tolist(), list(range(2 * L)), mask_ref)
    assert float((alt[:L] - got[0, :L]).abs().max()) > 1e-6
    # x0 half equals a plain causal forward of x0 (it never sees xt)
    assert_close(got[:, L:], model(x0))


@torch.no_grad()
def test_forward_per_row_3d_mask_and_explicit_positions():
    model = tiny_model(seed=53, **V23)
    cfg = model.cfg
    sd = model.state_dict()
    gen = torch.Generator().manual_seed(53)
    T = 8
    x = rand_tokens(gen, (2, T), cfg.vocab_size)
    m0 = brute_idlm_mask(4, 3)
    m1 = torch.ones(T, T, dtype=torch.bool).tril()
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3], [3, 4, 5, 6, 7, 8, 9, 10]])
    got = model(x, pos=pos, mask=torch.stack([m0, m1]))
    for r, m in enumerate([m0, m1]):
        ref = naive_forward(sd, cfg, x[r].tolist(), pos[r].tolist(), m.tolist())
        assert_close(got[r], ref)


# ----------------------------------------------------------------------------------------------
# 5. save / load

def test_save_load_roundtrip(tmp_path):
    model = tiny_model(seed=61, dtype=torch.float32, rope_theta=1234.0, **V23)
    d = tmp_path / "ckpt"
    model.save(str(d))
    assert sorted(os.listdir(d)) == ["config.json", "model.safetensors"]
    assert not [f for f in os.listdir(d) if ".tmp" in f]
    loaded = Model.load(str(d))
    assert loaded.cfg == model.cfg
    x = torch.randint(0, model.cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    # saving again over an existing checkpoint also leaves no temporaries
    model.save(str(d))
    assert sorted(os.listdir(d)) == ["config.json", "model.safetensors"]
    with open(d / "config.json") as f:
        assert json.load(f)["rope_theta"] == 1234.0


def test_load_rejects_bad_config_and_missing_files(tmp_path):
    model = tiny_model(seed=62, dtype=torch.float32, **V23)
    d = tmp_path / "ckpt"
    model.save(str(d))
    with open(d / "config.json") as f:
        cfg = json.load(f)

    with open(d / "config.json", "w") as f:
        json.dump({**cfg, "unknown_key": 1}, f)
    with pytest.raises(ValueError):
        Model.load(str(d))

    missing = dict(cfg)
    del missing["d_ff"]
    with open(d / "config.json", "w") as f:
        json.dump(missing, f)
    with pytest.raises(ValueError):
        Model.load(str(d))

    with open(d / "config.json", "w") as f:
        json.dump(cfg, f)
    os.remove(d / "model.safetensors")
    with pytest.raises(FileNotFoundError):
        Model.load(str(d))

    with pytest.raises(FileNotFoundError):
        Model.load(str(tmp_path / "does_not_exist"))


# ----------------------------------------------------------------------------------------------
# 6. config validation

def test_config_validation():
    ModelConfig(vocab_size=13, d_model=32, n_head=4, n_kv_head=2, mask_token_id=12)  # fine
    with pytest.raises(ValueError):
        ModelConfig(vocab_size=13, d_model=30, n_head=4, n_kv_head=2, mask_token_id=12)
    with pytest.raises(ValueError):
        ModelConfig(vocab_size=13, d_model=32, n_head=4, n_kv_head=3, mask_token_id=12)
    with pytest.raises(ValueError):
        ModelConfig(vocab_size=13, d_model=32, n_head=4, n_kv_head=2, mask_token_id=13)
    with pytest.raises(ValueError):
        ModelConfig(vocab_size=13, d_model=32, n_head=4, n_kv_head=2, mask_token_id=-1)
