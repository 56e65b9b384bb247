"""Introspective Strided Decoding (SPEC section 2) and the autoregressive baseline.

    python isd.py --out_dir=out --prompt="ROMEO:" --stride=4 --max_new_tokens=200 --temperature=0.8 --seed=1
    python isd.py --init_from=smollm2 --chat --prompt="What is the capital of France?" --temperature=0
    python isd.py --out_dir=out-rlora --chat --prompt="..."   # a folder with an adapter: base + gated LoRA

One forward per step puts W = 2N-1 tokens per request through the model:
    verify step:  [pending, d_1 .. d_{N-1}, MASK x (N-1)]
    cold start:   [pending, MASK x (2N-2)]
The clean positions give p (the model's own AR distribution); each draft d_j is kept with
probability min(1, p_j(d_j) / q_j(d_j)), the first rejected one is replaced by a draw from
normalize((p_j - q_j)+), and the N-1 masks after the last clean token propose the next drafts,
SAMPLED from their q. So every committed token is distributed exactly as p( . | prefix).
"""
import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field

import torch

from kernels import verify

MIN_TEMPERATURE = 1e-6  # below it (but above 0, which is greedy) logits / temperature can overflow


def process_logits(logits, mask_token_id, temperature=1.0, top_k=None, top_p=None):
    """Filtered logits (..., V): MASK, and whatever top-k / top-p drop, become -inf.

    Applied identically to p (verify) and q (drafts) (**exact here**: the released code filters
    only the clean token). The temperature is applied where probabilities are formed (`sample` and
    `kernels.verify`); here it only decides which tokens top-p keeps."""
    logits = logits.clone()
    logits[..., mask_token_id] = float("-inf")
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0 and temperature > 0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = (sorted_logits / temperature).softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def gumbel(shape, generator, dtype, device):
    """Standard Gumbel noise, drawn on the CPU from a request's own stream (so a seed gives the same
    tokens on every device), then moved to the logits' device."""
    return -torch.log(-torch.log(torch.rand(shape, generator=generator, dtype=dtype))).to(device)


def sample(logits, temperature, generator=None):
    """Token ids (...,) from filtered logits (..., V): Gumbel-max over logits / temperature, which is
    a draw from softmax(logits / temperature); argmax at temperature 0."""
    if temperature == 0:
        return logits.argmax(-1)
    return (logits / temperature + gumbel(logits.shape, generator, logits.dtype, logits.device)).argmax(-1)


@dataclass
class Stats:
    """What every decode reports (SPEC section 3)."""
    forwards: int = 0  # decoding forwards (prefill not counted)
    tokens: int = 0  # committed tokens
    drafts_verified: int = 0
    acceptance_sum: float = 0.0  # sum over verified drafts of min(1, p(d)/q(d))
    rounds_v: int = 0  # verify steps with every draft accepted
    rounds_r: int = 0  # verify steps with a rejection
    rounds_c: int = 0  # cold starts
    wall_s: float = 0.0

    def as_dict(self):
        d = dict(self.__dict__)
        d["tpf"] = self.tokens / max(1, self.forwards)
        d["acceptance_rate"] = self.acceptance_sum / max(1, self.drafts_verified)
        d["tokens_per_s"] = self.tokens / self.wall_s if self.wall_s else 0.0
        return d


@dataclass
class Request:
    """One row of the batched decoder: settings, committed tokens, drafts and their q."""
    prompt: list
    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = None
    top_p: float = None
    seed: int = None
    stop_ids: tuple = ()
    out: list = field(default_factory=list)  # committed new tokens; the last one is pending
    drafts: list = field(default_factory=list)
    q: torch.Tensor = None  # (len(drafts), V) processed draft logits
    done: bool = False
    trace: list = None  # per step: [(token, kind)], kind in "accepted", "correction", "clean"; None = off
    stats: Stats = field(default_factory=Stats)

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not math.isfinite(self.temperature) or 0 < self.temperature < MIN_TEMPERATURE:  # logits / T overflows
            raise ValueError(f"temperature must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE:g}, "
                             f"got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not 0 <= self.seed < 2 ** 63:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if len(self.prompt) == 0:
            raise ValueError("the prompt is empty: give at least one token")
        self.gen = torch.Generator()
        self.gen.manual_seed(self.seed) if self.seed is not None else self.gen.seed()
        self.stop_ids = set(self.stop_ids or ())


@torch.no_grad()
def prefill(model, cache, rows, requests, chunk=None):
    """Put each prompt but its last token (the first `pending`) into the cache, continuing from
    what the row already holds. `chunk` caps the tokens each row takes in this call, so that a
    scheduler can prefill a long prompt over several steps while other rows keep decoding."""
    rows = torch.as_tensor(rows)
    start = cache.lengths[rows].tolist()
    todo = [r.prompt[s:len(r.prompt) - 1][:chunk] for r, s in zip(requests, start)]
    n = max(map(len, todo))
    if n > 0:
        pad = model.cfg.mask_token_id  # padding is written past each row's length, then forgotten
        ids = torch.tensor([t + [pad] * (n - len(t)) for t in todo])
        dev = cache.lengths.device  # the model's input device (PyTorch's cache, or mlx_port's torch view of one)
        model(ids.to(dev), cache=cache, rows=rows.to(dev))
        cache.truncate([s + len(t) for s, t in zip(start, todo)], rows)


@torch.no_grad()
def isd_step(model, cache, rows, requests, stride):
    """One forward of W = 2N-1 tokens for every request (row `rows[i]` of the cache holds
    requests[i]); verifies drafts, commits tokens, proposes new drafts, rolls the cache back.
    Returns the tokens each request committed in this step."""
    N, mask_id = stride, model.cfg.mask_token_id
    W = 2 * N - 1
    dev = cache.lengths.device
    windows = [[(r.out or r.prompt)[-1]] + r.drafts + [mask_id] * (W - 1 - len(r.drafts)) for r in requests]
    rows = torch.as_tensor(rows, device=dev)
    start = cache.lengths[rows].tolist()
    logits = model(torch.tensor(windows, device=dev), cache=cache, rows=rows)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # float64 stays

    # exact acceptance of every request's drafts in one batched call
    procs, groups = [None] * len(requests), {}  # filtered logits: once per group of rows with equal settings
    for i, r in enumerate(requests):
        groups.setdefault((r.temperature, r.top_k, r.top_p), []).append(i)
    for (temperature, top_k, top_p), members in groups.items():
        for i, proc in zip(members, process_logits(logits[members], mask_id, temperature, top_k, top_p)):
            procs[i] = proc
    p_rows, q_rows, d_rows, u_rows, g_rows, owner = [], [], [], [], [], []
    for i, r in enumerate(requests):
        K, proc = len(r.drafts), procs[i]
        if K:
            p_rows.append(proc[:K])
            q_rows.append(r.q)
            d_rows.append(torch.tensor(r.drafts, device=dev))
            if r.temperature > 0:  # the random numbers are inputs of verify (so kernel and reference agree)
                u_rows.append(torch.rand(K, generator=r.gen, dtype=proc.dtype).to(dev))
                g_rows.append(gumbel((K, proc.shape[-1]), r.gen, proc.dtype, dev))
            else:  # greedy verification draws nothing
                u_rows.append(None)
                g_rows.append(None)
            owner.append(i)
    verdicts = {}
    by_temp = {}
    for j, i in enumerate(owner):  # one verify call per temperature (greedy and sampled differ)
        by_temp.setdefault(requests[i].temperature, []).append(j)
    for temp, js in by_temp.items():
        p, q, d = (torch.cat([x[j] for j in js]) for x in (p_rows, q_rows, d_rows))
        if temp > 0:
            u, g = torch.cat([u_rows[j] for j in js]), torch.cat([g_rows[j] for j in js])
        else:  # unused by greedy verification: zeros of the contract's shapes
            u, g = p.new_zeros(len(d)), torch.zeros_like(p)
        acc, cor, ratio = verify(p, q, d, u, g, temp)
        at = 0
        for j in js:
            K = len(d_rows[j])
            verdicts[owner[j]] = (acc[at:at + K].tolist(), cor[at:at + K].tolist(), ratio[at:at + K].tolist())
            at += K

    committed, keep = [], []
    for i, r in enumerate(requests):
        K, proc, st = len(r.drafts), procs[i], r.stats
        new, kinds, n_keep = [], [], 1  # n_keep: cache entries kept = pending + accepted drafts
        if K:
            acc, cor, ratio = verdicts[i]
            j = acc.index(False) if False in acc else K
            st.drafts_verified += K
            st.acceptance_sum += sum(ratio)
            new, kinds, n_keep = r.drafts[:j], ["accepted"] * j, 1 + j
            if j < K:  # rejection: commit the correction, next step is a cold start
                new.append(cor[j])
                kinds.append("correction")
                r.drafts, r.q = [], None
                st.rounds_r += 1
        else:
            j = 0
            st.rounds_c += 1
        if j == K:  # every draft passed (or none): the clean token, and new drafts from the masks
            clean, *r.drafts = sample(proc[K:K + N], r.temperature, r.gen).tolist()  # one draw for all N
            new.append(clean)
            kinds.append("clean")
            r.q = proc[K + 1:K + N]
            if K:
                st.rounds_v += 1
        # stop at the first stop id or at max_new_tokens; drop what came after it in this step
        for t, n in enumerate(new):
            if n in r.stop_ids or len(r.out) + t + 1 >= r.max_new_tokens:
                new, kinds, r.done = new[:t + 1], kinds[:t + 1], True
                break
        r.out.extend(new)
        st.forwards += 1
        st.tokens += len(new)
        if r.trace is not None:
            r.trace.append(list(zip(new, kinds)))
        committed.append(new)
        keep.append(start[i] + n_keep)
    cache.truncate(keep, rows)  # roll back rejected drafts and every MASK slot
    return committed


@torch.no_grad()
def decode(model, requests, stride):
    """Decode a batch of requests together to the end; each keeps its own acceptance, rollback
    and random stream, so a row gives exactly what it gives alone with the same seed."""
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    for r in requests:
        check_prompt(model, r.prompt, r.max_new_tokens)
    t0 = time.time()
    max_len = max(len(r.prompt) + r.max_new_tokens for r in requests) + 2 * stride
    cache = model.new_cache(len(requests), max_len)
    prefill(model, cache, list(range(len(requests))), requests)
    active = list(range(len(requests)))
    while active:
        isd_step(model, cache, active, [requests[i] for i in active], stride)
        active = [i for i in active if not requests[i].done]
    for r in requests:
        r.stats.wall_s = time.time() - t0
    return requests


def isd_generate(model, prompt_ids, max_new_tokens, stride=4, temperature=1.0, top_k=None, top_p=None,
                 seed=None, stop_ids=None, trace=False):
    """ISD for one prompt: (new token ids, stats dict)."""
    r = Request(list(prompt_ids), max_new_tokens, temperature, top_k, top_p, seed, tuple(stop_ids or ()),
                trace=[] if trace else None)
    decode(model, [r], stride)
    return (r.out, r.stats.as_dict()) if not trace else (r.out, r.stats.as_dict(), r.trace)


def check_prompt(model, prompt_ids, max_new_tokens):
    need = len(prompt_ids) + max_new_tokens
    if need > model.cfg.max_seq_len:
        raise ValueError(f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) "
                         f"exceeds the context of {model.cfg.max_seq_len} tokens")


@torch.no_grad()
def ar_generate(model, prompt_ids, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                seed=None, stop_ids=None):
    """The baseline: one token per forward over a KV cache. Returns the new token ids."""
    r = Request(list(prompt_ids), max_new_tokens, temperature, top_k, top_p, seed, tuple(stop_ids or ()))
    check_prompt(model, r.prompt, max_new_tokens)
    cache = model.new_cache(1, len(r.prompt) + max_new_tokens)
    dev = cache.lengths.device
    logits = model(torch.tensor([r.prompt], device=dev), cache=cache)[0, -1]
    while True:
        p = process_logits(logits, model.cfg.mask_token_id, temperature, top_k, top_p)
        r.out.append(int(sample(p, temperature, r.gen)))
        if r.out[-1] in r.stop_ids or len(r.out) == max_new_tokens:
            return r.out
        logits = model(torch.tensor([[r.out[-1]]], device=dev), cache=cache)[0, -1]


# ----------------------------------------------------------------------------------------------
# command line: sample from a checkpoint, show the statistics, compare with AR, visualize ISD

COLORS = {"accepted": ("\033[32m", "#c8f0c8"), "correction": ("\033[31m", "#f6c6c6"), "clean": ("\033[34m", "#c8d8f8")}


def stats_line(st, stride):
    f = max(1, st["forwards"])
    return (f"stride {stride} | {st['tokens']} tokens in {st['forwards']} forwards | TPF {st['tpf']:.2f} | "
            f"acceptance {st['acceptance_rate']:.3f} | rounds V {st['rounds_v'] / f:.0%} R {st['rounds_r'] / f:.0%} "
            f"C {st['rounds_c'] / f:.0%} | {st['tokens_per_s']:.1f} tok/s")


def show_trace(trace, enc):
    """Each step on its own line: accepted drafts green, corrections red, clean tokens blue."""
    for step, toks in enumerate(trace):
        parts = "".join(f"{COLORS[k][0]}{enc.decode([t])}\033[0m" for t, k in toks)
        print(f"{step:4d} {parts.replace(chr(10), '⏎')}")


def trace_html(trace, enc, prompt, st, stride):
    """A self-contained HTML page of the decode, one row per forward."""
    import html
    rows = []
    for step, toks in enumerate(trace):
        spans = "".join(f'<span style="background:{COLORS[k][1]}" title="{k}">{html.escape(enc.decode([t]))}</span>'
                        for t, k in toks)
        rows.append(f"<tr><td>{step}</td><td>{len(toks)}</td><td><pre>{spans}</pre></td></tr>")
    legend = " ".join(f'<span style="background:{c[1]}">{k}</span>' for k, c in COLORS.items())
    return (f"<!doctype html><meta charset=utf-8><title>ISD trace</title>"
            f"<style>body{{font-family:sans-serif}}pre{{margin:0;white-space:pre-wrap}}td{{vertical-align:top;padding:2px 8px}}</style>"
            f"<h2>Introspective Strided Decoding, stride {stride}</h2><p>{legend}</p>"
            f"<p>{html.escape(stats_line(st, stride))}</p><p>prompt: <code>{html.escape(prompt)}</code></p>"
            f"<table><tr><th>forward</th><th>tokens</th><th>committed</th></tr>{''.join(rows)}</table>")


def main(argv=None, load_model=None, doc=__doc__):
    """The command line. `load_model(source, device)` gives (model, tokenizer) (default:
    pretrained.load_model, PyTorch; mlx_port.isd passes its MLX one, and its own `doc` for --help)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default="out", help="checkpoint folder written by train.py, or one with a LoRA "
                                                    "adapter (its base model + the adapter) (default out)")
    p.add_argument("--init_from", default=None, help="a pretrained model by name instead of --out_dir: smollm2")
    p.add_argument("--chat", action="store_true", help="put --prompt as a user message in the chat template (ChatML)")
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    p.add_argument("--stride", type=int, default=4, help="N: up to N tokens per forward; 1 = plain AR (default 4)")
    p.add_argument("--max_new_tokens", type=int, default=200, help="tokens to generate (default 200)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top_k", type=int, default=None, help="keep the k most likely tokens (p and q alike)")
    p.add_argument("--top_p", type=float, default=None, help="nucleus sampling mass (p and q alike)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: fresh)")
    p.add_argument("--device", default=None, help="cpu, cuda, mps (default cpu); for python -m mlx_port.isd: "
                   "auto, cpu, gpu (default auto: MLX's default device, the GPU on a Mac)")
    p.add_argument("--json", action="store_true", help='print {"text", "tokens", "stats"} as JSON')
    p.add_argument("--compare", action="store_true", help="also decode with AR and print both speeds and their ratio")
    p.add_argument("--visualize", nargs="?", const="-", default=None, metavar="FILE.html",
                   help="show each forward's accepted drafts / corrections / clean tokens; with a file, write HTML")
    a = p.parse_args(argv)
    import pretrained
    if load_model is None:
        def load_model(source, device):
            return pretrained.load_model(source, device=device or "cpu")
    if a.stride < 1:
        p.error(f"--stride must be >= 1, got {a.stride}")
    if a.temperature < 0:
        p.error(f"--temperature must be >= 0, got {a.temperature}")
    try:
        model, enc = load_model(a.init_from or a.out_dir, a.device)
    except (FileNotFoundError, ValueError) as e:
        p.error(str(e))
    if a.chat and not pretrained.has_chat_template(enc):
        p.error(f"--chat: the tokenizer {enc.name} has no chat template (no <|im_start|>)")
    ids = pretrained.chat_ids(enc, [{"role": "user", "content": a.prompt}]) if a.chat else enc.encode_ordinary(a.prompt)
    kw = dict(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed, stop_ids=pretrained.stop_ids(enc))
    try:
        isd_generate(model, ids, 2, a.stride, **kw)  # warm-up: first calls are slow
        out, st, trace = isd_generate(model, ids, a.max_new_tokens, a.stride, trace=True, **kw)
    except ValueError as e:
        p.error(str(e))
    text = enc.decode(out[:-1] if out and out[-1] in kw["stop_ids"] else out)  # the stop token is not text
    if a.json:
        print(json.dumps({"text": text, "tokens": out, "stats": st}))
    elif a.visualize == "-":
        show_trace(trace, enc)
    else:
        print(text if a.chat else a.prompt + text)
    if a.visualize and a.visualize != "-":
        with open(a.visualize, "w") as f:
            f.write(trace_html(trace, enc, a.prompt, st, a.stride))
        print(f"wrote {a.visualize}", file=sys.stderr)
    if not a.json:
        print(stats_line(st, a.stride), file=sys.stderr if a.visualize == "-" else sys.stdout)
    if a.compare:
        t0 = time.time()
        ar = ar_generate(model, ids, a.max_new_tokens, **kw)
        ar_tps = len(ar) / (time.time() - t0)
        print(f"AR {ar_tps:.1f} tok/s | ISD {st['tokens_per_s']:.1f} tok/s | ISD/AR {st['tokens_per_s'] / ar_tps:.2f}x"
              + (" | identical tokens" if a.temperature == 0 and ar == out else ""))


if __name__ == "__main__":
    main()
