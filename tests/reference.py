"""The tests' shared references and builders: what more than one test module needs, written once, here.

Every reference is written from the method (docs/method.md), not from the code under test:
  - tiny random models with large weights (peaked, context-dependent next-token distributions);
  - greedy decoding by full forwards without a cache (MASK logit excluded, argmax);
  - the exact autoregressive distribution of a short continuation, enumerated sequence by sequence with
    full forwards and temperature / top-k / top-p processing re-implemented here;
  - a chi-square goodness-of-fit test whose p-value comes from the regularized upper incomplete gamma
    function (no scipy);
  - distill_loss's value rebuilt position by position from full causal forwards (ref_distill_loss);
and the builders of what the tests run on: a tiny checkpoint with its tokenizer, copies of a checkpoint
folder, an interrupted rename, serve.py in a subprocess.

Test modules import from here, never from one another (tests/test_structure.py checks it).
"""
import math
import os
import socket
import subprocess
import sys
import time
from collections import Counter

import httpx
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from decoding import SamplingParams  # noqa: E402
import data  # noqa: E402
import tokenizer as tok  # noqa: E402
import train  # noqa: E402
from isd import Request, decode  # noqa: E402
from model import Model, ModelConfig  # noqa: E402


# ----------------------------------------------------------------------------------------------
# tiny random models

def tiny_model(seed=0, vocab=16, std=0.5, d_ff=64, max_seq_len=64, mask_token_id=None, n_layer=2, d_model=32,
               n_head=4, n_kv_head=2, rope_theta=10000.0, dtype=torch.float64, cls=Model):
    """A tiny random model (float64 unless `dtype`) with weights far larger than the training init (std 0.5
    instead of 0.02; norm gains 1 +- 0.3): peaked, context-dependent next-token distributions, so greedy
    outputs vary, attention is far from uniform, and drafts are sometimes accepted and sometimes rejected.
    MASK is the last id unless `mask_token_id`; `cls`: a subclass of Model to build instead."""
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab, n_layer=n_layer, n_head=n_head, n_kv_head=n_kv_head, d_model=d_model,
                      d_ff=d_ff, max_seq_len=max_seq_len, rope_theta=rope_theta,
                      mask_token_id=vocab - 1 if mask_token_id is None else mask_token_id)
    model = cls(cfg).to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            else:
                p.normal_(0.0, std)
    return model


# tests/test_model.py's shape (also test_dlm.py's and test_introspect.py's): 23 ids (MASK = 22), d_ff 48, std 0.35
V23 = dict(vocab=23, d_ff=48, std=0.35)


def rand_tokens(gen, shape, vocab):
    """Random ids that never hit MASK (the last id)."""
    return torch.randint(0, vocab - 1, shape, generator=gen)


def torch_model(seed=0, std=0.2, vocab=16, mask_token_id=None, max_seq_len=64, dtype=torch.float32):
    """A tiny random PyTorch model for the MLX port's tests, made in float32 (then cast to `dtype`);
    std 0.2 (not the training init's 0.02) makes next-token distributions peaked and context-dependent,
    so greedy drafts are sometimes accepted, sometimes not."""
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab, n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=64, max_seq_len=max_seq_len,
                      mask_token_id=vocab - 1 if mask_token_id is None else mask_token_id)
    model = Model(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.3 * torch.randn_like(p) if "norm" in name else std * torch.randn_like(p))
    return model.to(dtype)


# ----------------------------------------------------------------------------------------------
# decoding: greedy by brute force, the exact AR distribution by enumeration

def full_logits(model, seq):
    """Next-token logits after `seq`, by one full forward without a cache; each token reads at
    most the last max_seq_len tokens (itself included), written here as an explicit mask."""
    i = torch.arange(len(seq))
    mask = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < model.cfg.max_seq_len)
    return model(torch.tensor([list(seq)]), mask=mask)[0, -1].double()


@torch.no_grad()
def brute_greedy(model, prompt, n):
    """Greedy decoding, one full forward per token, MASK excluded."""
    seq = list(prompt)
    out = []
    for _ in range(n):
        logits = full_logits(model, seq).clone()
        logits[model.cfg.mask_token_id] = -math.inf
        tok_id = int(torch.argmax(logits))
        out.append(tok_id)
        seq.append(tok_id)
    return out


def ref_probs(logits, mask_id, temperature, top_k=None, top_p=None):
    """The sampling settings written independently: MASK removed, temperature, then top-k
    (the k most likely tokens), then top-p (the smallest most-likely-first prefix whose mass
    reaches p), renormalised. Returns a list of probabilities."""
    V = len(logits)
    scaled = [(float(logits[i]) / temperature) if i != mask_id else -math.inf for i in range(V)]
    m = max(scaled)
    w = [math.exp(s - m) if s != -math.inf else 0.0 for s in scaled]
    z = sum(w)
    probs = [x / z for x in w]
    order = sorted(range(V), key=lambda i: -probs[i])
    if top_k is not None:
        keep = set(order[:top_k])
        probs = [probs[i] if i in keep else 0.0 for i in range(V)]
        z = sum(probs)
        probs = [x / z for x in probs]
    if top_p is not None:
        keep, mass = set(), 0.0
        for i in order:
            keep.add(i)
            mass += probs[i]
            if mass >= top_p:
                break
        probs = [probs[i] if i in keep else 0.0 for i in range(V)]
        z = sum(probs)
        probs = [x / z for x in probs]
    return probs


def exact_continuations(model, prompt, n, temperature, top_k=None, top_p=None, bias=None):
    """{continuation tuple: probability} under the model's own AR distribution, by enumeration
    (`bias`: {token: value} added to the logits first, OpenAI's logit_bias)."""
    mask_id = model.cfg.mask_token_id
    real = [t for t in range(model.cfg.vocab_size) if t != mask_id]
    dist = {}

    def walk(prefix, prob):
        if len(prefix) == n:
            dist[tuple(prefix)] = prob
            return
        logits = full_logits(model, list(prompt) + prefix).detach().clone()
        for t, b in (bias or {}).items():
            logits[t] += b
        probs = ref_probs(logits, mask_id, temperature, top_k, top_p)
        for t in real:
            walk(prefix + [t], prob * probs[t])

    walk([], 1.0)
    assert abs(sum(dist.values()) - 1.0) < 1e-9
    return dist


# ----------------------------------------------------------------------------------------------
# statistics: chi-square goodness of fit, and ISD's samples to feed it

P_MIN = 1e-4  # exact rules must pass the chi-square check with p-value above this
P_WRONG = 1e-6  # deliberately wrong rules must give a p-value below this


def chi2_sf(stat, df):
    """P(chi2_df >= stat) = Q(df/2, stat/2), the regularized upper incomplete gamma function."""
    return float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64),
                                         torch.tensor(stat / 2.0, dtype=torch.float64)))


def chi2_pvalue(counts, probs):
    """Chi-square goodness of fit of `counts` {cell: n} to `probs` {cell: p}.

    Cells with probability 0 must be empty (else p-value 0). Cells with expected count < 5 are
    pooled into one cell; if that pool is still below 5 it joins the smallest remaining cell."""
    assert set(counts) <= set(probs), f"outcomes outside the support: {set(counts) - set(probs)}"
    n = sum(counts.values())
    if any(counts.get(c, 0) > 0 for c, p in probs.items() if p == 0):
        return 0.0
    cells = [(n * p, counts.get(c, 0)) for c, p in probs.items() if p > 0]
    big = sorted([c for c in cells if c[0] >= 5])
    small = [c for c in cells if c[0] < 5]
    if small:
        pool = (sum(e for e, _ in small), sum(o for _, o in small))
        if pool[0] < 5 and big:
            e0, o0 = big.pop(0)
            pool = (pool[0] + e0, pool[1] + o0)
        big.append(pool)
    stat = sum((o - e) ** 2 / e for e, o in big)
    df = len(big) - 1
    assert df >= 1
    return chi2_sf(stat, df)


def isd_samples(model, prompt, n, stride, n_samples, temperature, top_k=None, top_p=None, seed0=0,
                batch=500, narrow=False, bias=None):
    """`n_samples` continuations from batched ISD, one seed per row; also the summed stats."""
    counts, tot = Counter(), Counter()
    for start in range(0, n_samples, batch):
        reqs = [Request(list(prompt),
                        SamplingParams(n, temperature, top_k, top_p, seed0 + s),
                        logit_bias=bias)
                for s in range(start, min(n_samples, start + batch))]
        decode(model, reqs, stride, narrow)
        for r in reqs:
            assert len(r.out) == n
            counts[tuple(r.out)] += 1
            for k in ("rounds_v", "rounds_r", "rounds_c", "forwards", "tokens"):
                tot[k] += getattr(r.stats, k)
    return counts, tot


SAMPLE_V = 6  # 5 real tokens + MASK
SAMPLE_PROMPT = [1, 2]
N_SAMPLES = 3000


def sampling_model():
    """The model of the sampling checks: 5 real tokens, so continuations can be enumerated."""
    return tiny_model(seed=1, vocab=SAMPLE_V, std=0.3)


# ----------------------------------------------------------------------------------------------
# distill_loss, slowly

@torch.no_grad()
def slow_half_logits(model, x0, labels, stride):
    """(xt logits, x0 logits), each (B, L, V), position by position: xt position i (block
    B = i // b) sees clean x0[0 : B*b] and xt[B*b : i+1], where xt = x0 with labelled tokens
    MASKed; x0 position i sees x0[0 : i+1]. Both are contiguous causal sequences."""
    b, M = stride - 1, model.cfg.mask_token_id
    Bsz, L = x0.shape
    xt_out = torch.zeros(Bsz, L, model.cfg.vocab_size, dtype=torch.float64)
    x0_out = torch.zeros_like(xt_out)
    for r in range(Bsz):
        row = x0[r].tolist()
        xt = [M if int(labels[r, i]) != -100 else row[i] for i in range(L)]
        for i in range(L):
            start = (i // b) * b
            xt_out[r, i] = model(torch.tensor([row[:start] + xt[start:i + 1]]))[0, -1]
            x0_out[r, i] = model(torch.tensor([row[:i + 1]]))[0, -1]
    return xt_out, x0_out


def ref_distill_loss(model, x0, labels, stride, supervision, temperature, hard_rows=None, weights=None):
    """The loss written out target by target: the mask at position i (xt half) against label i+1
    (hard) or the clean stream's distribution at position i at temperature T (soft); "mixed": hard for
    the rows where hard_rows[r], soft elsewhere. weights (B, T): sum(w * l) / sum(w) over the targets,
    w read at the target's own position i+1 (as labels are); None: the plain mean. Computed in float64."""
    xt, x0l = slow_half_logits(model, x0, labels, stride)
    M, V = model.cfg.mask_token_id, model.cfg.vocab_size
    keep = [v for v in range(V) if v != M]
    terms, ws = [], []
    for r in range(x0.shape[0]):
        hard = supervision == "hard" or (supervision == "mixed" and bool(hard_rows[r]))
        for i in range(x0.shape[1] - 1):
            y = int(labels[r, i + 1])
            if y == -100:
                continue
            s = xt[r, i, keep]
            if hard:
                terms.append(-(s[keep.index(y)] - torch.logsumexp(s, 0)))
            else:
                t = torch.softmax(x0l[r, i, keep] / temperature, 0)
                terms.append(-(t * torch.log_softmax(s / temperature, 0)).sum())
            ws.append(1.0 if weights is None else float(weights[r, i + 1]))
    return sum(w * float(t) for w, t in zip(ws, terms)) / sum(ws)


# ----------------------------------------------------------------------------------------------
# checkpoints: a tiny one with its tokenizer; copies of a folder; a save interrupted at a rename

TEXT = "ROMEO.\nBut soft, what light through yonder window breaks?\n\nJULIET.\nCafé naïve — “quotes” ½\n\n" * 20


def tiny_model_and_tokenizer(max_seq_len=128):
    """A tiny random float64 model on a 300-id BPE trained on TEXT (its MASK is the id after them)."""
    enc = tok.train_bpe(TEXT, 300)
    V = enc.n_vocab
    cfg = ModelConfig(vocab_size=V + 1, mask_token_id=V, n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=64,
                      max_seq_len=max_seq_len)
    torch.manual_seed(0)
    model = Model(cfg).double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.3 * torch.randn_like(p)) if "norm" in name else p.normal_(0.0, 0.5)
    return model, enc


def save_checkpoint(out_dir, max_seq_len=128):
    """A checkpoint folder as train.py writes it (weights, config, tokenizer), float64."""
    model, enc = tiny_model_and_tokenizer(max_seq_len)
    model.save(out_dir)
    tok.save(enc, out_dir)
    return out_dir


def interrupt_rename(monkeypatch, k):
    """Make os.replace raise KeyboardInterrupt at its k-th call (the earlier ones rename)."""
    rename, calls = os.replace, []

    def interrupted(src, dst):
        calls.append(dst)
        if len(calls) == k:
            raise KeyboardInterrupt
        return rename(src, dst)
    monkeypatch.setattr(os, "replace", interrupted)


def train_tiny(folder, runs):
    """Tiny train.py runs on a small corpus written to folder/c.txt, the data cache in folder/cache: train.main
    of the tiny preset (a 300-token BPE, rows of 32) with each argument list of `runs` after it."""
    corpus = folder / "c.txt"
    corpus.write_text("".join(f"ROMEO: line {i} of the play, said the king.\n" for i in range(400)))
    old = data.CACHE_DIR
    data.CACHE_DIR = str(folder / "cache")
    try:
        for args in runs:
            train.main(["--preset=tiny", "--vocab_size=300", "--seq_len=32", f"--data={corpus}", *args])
    finally:
        data.CACHE_DIR = old


# ----------------------------------------------------------------------------------------------
# serve.py as a live server on 127.0.0.1 (a subprocess)

SERVE_STRIDE = 3  # the --stride start_server gives serve.py


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(ckpt, *args, env=None):
    """serve.py in a subprocess, its output (the access log too) in a file: a pipe nobody reads would fill."""
    port = free_port()
    log = open(os.path.join(os.path.dirname(ckpt), f"server-{port}.log"), "w+")
    proc = subprocess.Popen([sys.executable, "serve.py", f"--out_dir={ckpt}", f"--port={port}",
                             f"--stride={SERVE_STRIDE}", *args], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    proc.log = log
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(server_log(proc))
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not start in 60 s")


def server_log(proc):
    proc.log.flush()
    with open(proc.log.name) as f:
        return f.read()


def stop_server(proc, sig):
    proc.send_signal(sig)
    try:
        rc = proc.wait(timeout=30)
    finally:
        proc.kill()
    return rc, server_log(proc)


def metrics(url):
    """The server's /metrics, {name with labels: value}."""
    lines = httpx.get(f"{url}/metrics").text.splitlines()
    return {k: float(v) for k, v in (line.rsplit(" ", 1) for line in lines if not line.startswith("#"))}
