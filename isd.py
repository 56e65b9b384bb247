"""Introspective Strided Decoding (docs/method.md section 2) and the autoregressive baseline.

    python isd.py --out_dir=out --prompt="ROMEO:" --stride=4 --max_new_tokens=200 --temperature=0.8 --seed=1
    python isd.py --init_from=smollm2 --chat --prompt="What is the capital of France?" --temperature=0
    python isd.py --out_dir=out-rlora --chat --prompt="..."   # a folder with an adapter: base + gated LoRA

Each step is one forward of a window of W = N*N tokens per request (window_layout):
    [pending, d_1 .. d_K | N-1 masks after pending | N-1 masks after d_1 | .. after d_K]
`pending` is the last committed token, not yet in the cache; d_1..d_K are the drafts the previous
step proposed (K = N-1, or 0 on a cold start: the first step after the prompt, and every step at
stride 1). The clean positions give p (the model's own AR distribution); each draft d_j, sampled
from its q, is kept with probability min(1, p_j(d_j) / q_j(d_j)), and the first rejected one is
replaced by a draw from normalize((p_j - q_j)+): that rule makes every committed token distributed
exactly as p( . | prefix). Group j of masks (after pending, d_1..d_j) proposes the next drafts.
"""
import argparse
import functools
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, fields

import torch

import checkpoint
import tokenizer as tok
from kernels import verify
from sampling import MIN_TEMPERATURE, gumbel, probs, process_logits, sample

@dataclass
class Stats:
    """What every decode reports (docs/method.md section 3). Stats add up: sum(stats, Stats()) gives
    the figures of several decodes together."""
    forwards: int = 0  # decoding forwards (prefill not counted)
    tokens: int = 0  # committed tokens
    drafts_verified: int = 0  # drafts verification reached: d_1 .. the first rejected one
    acceptance_sum: float = 0.0  # their sum of min(1, p(d)/q(d))
    rounds_v: int = 0  # verify steps with every draft accepted
    rounds_r: int = 0  # verify steps with a rejection
    rounds_c: int = 0  # cold starts (no drafts yet: the first forward after the prompt)
    wall_s: float = 0.0

    @property
    def tpf(self):
        """Tokens per forward."""
        return self.tokens / max(1, self.forwards)

    @property
    def acceptance_rate(self):
        """The mean acceptance probability min(1, p/q) of the drafts verification reached."""
        return self.acceptance_sum / max(1, self.drafts_verified)

    @property
    def tokens_per_s(self):
        return self.tokens / self.wall_s if self.wall_s else 0.0

    def __add__(self, other):
        return Stats(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def as_dict(self):
        return {**asdict(self), "tpf": self.tpf, "acceptance_rate": self.acceptance_rate,
                "tokens_per_s": self.tokens_per_s}


class SettingError(ValueError):
    """A bad request setting; `param` names it (serve.py reports it as the OpenAI API does)."""

    def __init__(self, param, message):
        super().__init__(message)
        self.param = param


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
    out: list = field(default_factory=list)  # committed new tokens
    drafts: list = field(default_factory=list)  # d_1..d_K, proposed by the last forward's masks
    q: torch.Tensor = None  # (K, V) the filtered logits the drafts were sampled from (not yet divided by the
    # temperature: sample and kernels.verify apply it)
    prefilled: int = 0  # prompt tokens already in the cache
    done: bool = False
    # per forward: [(token, kind)]; kind: "accepted" (a draft that passed), "correction" (drawn from
    # (p-q)+ for the first rejected draft), "clean" (drawn from p), "rejected" (a draft thrown away,
    # not committed); None = off
    trace: list = None
    # per committed token, the distribution (V,) it was drawn from, as probabilities: an accepted draft's
    # q, a correction's normalize((p - q)+), a clean token's p (see drawn_from); None = off
    drawn_from: list = None
    stats: Stats = field(default_factory=Stats)

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise SettingError("max_new_tokens", f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise SettingError("temperature", f"temperature must be >= 0, got {self.temperature}")
        if not math.isfinite(self.temperature) or 0 < self.temperature < MIN_TEMPERATURE:  # logits / T overflows
            raise SettingError("temperature", f"temperature must be 0 (greedy) or a finite number >= "
                                              f"{MIN_TEMPERATURE:g}, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise SettingError("top_k", f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise SettingError("top_p", f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not 0 <= self.seed < 2 ** 63:
            raise SettingError("seed", f"seed must be in [0, 2**63), got {self.seed}")
        if len(self.prompt) == 0:
            raise ValueError("the prompt is empty: give at least one token")
        self.gen = torch.Generator()
        self.gen.manual_seed(self.seed) if self.seed is not None else self.gen.seed()
        self.stop_ids = set(self.stop_ids or ())

    @property
    def pending(self):
        """The last committed token (or the prompt's last): in the window, not yet in the cache."""
        return (self.out or self.prompt)[-1]

    def commit(self, new):
        """Append a forward's tokens up to the first stop id or max_new_tokens (what the same
        forward produced after it is dropped), and count the forward; returns what was kept."""
        for t, n in enumerate(new):
            if n in self.stop_ids or len(self.out) + t + 1 >= self.max_new_tokens:
                new, self.done = new[:t + 1], True
                break
        self.out.extend(new)
        self.stats.forwards += 1
        self.stats.tokens += len(new)
        return new


def window_size(stride, narrow=False):
    """W = N*N tokens per request per forward: pending + N-1 drafts, and N-1 masks after each of those N;
    the narrow window, 2N-1: the N-1 masks after the last draft only."""
    return 2 * stride - 1 if narrow else stride * stride


@functools.lru_cache(maxsize=None)
def window_layout(stride, n_drafts, narrow=False):
    """(relative positions (W,), attention inside the window (W, W)) of a window with K = n_drafts:

        [pending, d_1 .. d_K | group 0 | group 1 | .. | group K | padding]

    Clean token c (c = 0 is pending, c = j is d_j) sits at position c and sees clean tokens 0..c.
    Group g holds N-1 masks at positions g+1 .. g+N-1: they see clean tokens 0..g and the earlier
    masks of their group, exactly as a training block of masks sees the clean prefix before it
    (model.idlm_mask). So whichever token ends up committed at position g+1 (the correction of a
    rejected d_{g+1}, or the clean token when all K drafts pass, g = K), group g has already proposed
    the N-1 drafts that follow it: there is no cold start. Padding (K < N-1) sees only itself.

    The narrow window keeps group K only: fewer tokens per forward (2N-1), but after a rejection
    nothing has drafted what follows the correction, so the next forward is a cold start."""
    N, K, b = stride, n_drafts, stride - 1
    W = window_size(N, narrow)
    pos, mask = torch.zeros(W, dtype=torch.long), torch.eye(W, dtype=torch.bool)
    pos[:K + 1] = torch.arange(K + 1)
    mask[:K + 1, :K + 1] = torch.ones(K + 1, K + 1, dtype=torch.bool).tril()
    for g in [K] if narrow else range(K + 1):
        at = group_rows(N, K, g, narrow).start
        pos[at:at + b] = torch.arange(g + 1, g + 1 + b)
        mask[at:at + b, :g + 1] = True
        mask[at:at + b, at:at + b] = torch.ones(b, b, dtype=torch.bool).tril()
    return pos, mask


def group_rows(stride, n_drafts, g, narrow=False):
    """Window indices of the N-1 masks of group g (see window_layout; narrow: g = K only)."""
    at = n_drafts + 1 + (0 if narrow else g) * (stride - 1)
    return slice(at, at + stride - 1)


@torch.no_grad()
def prefill(model, cache, rows, requests, chunk=None):
    """Put each prompt but its last token (the first `pending`) into the cache, continuing from
    what the row already holds. `chunk` caps the tokens each row takes in this call, so that a
    scheduler can prefill a long prompt over several steps while other rows keep decoding; a prompt
    longer than the cache leaves goes in several forwards (the cache keeps what is in context)."""
    dev = cache.lengths.device  # the model's input device (PyTorch's cache, or mlx_port's torch view of one)
    rows = torch.as_tensor(rows, device=dev)
    done = [r.prefilled for r in requests]
    todo = [r.prompt[d:len(r.prompt) - 1][:chunk] for r, d in zip(requests, done)]
    at = 0
    while at < max(map(len, todo)):
        # as much as fits, or, in a full cache, what make_room can always free
        room = cache.max_len - int(cache.lengths[rows].max())
        step = max(room, cache.max_len - model.cfg.max_seq_len + 1, 1)
        part = [t[at:at + step] for t in todo]
        at += step
        n = max(map(len, part))
        pad = model.cfg.mask_token_id  # padding is written past each row's length, then forgotten
        ids = torch.tensor([t + [pad] * (n - len(t)) for t in part])
        model(ids.to(dev), cache=cache, rows=rows)
        cache.truncate(cache.lengths[rows] - n + torch.tensor([len(t) for t in part], device=dev), rows)
    for r, t in zip(requests, todo):
        r.prefilled += len(t)


@torch.no_grad()
def isd_step(model, cache, rows, requests, stride, narrow=False):
    """One ISD forward for every request (cache row `rows[i]` holds requests[i]); returns the tokens
    each request committed (narrow: the narrow window, see window_layout). The phases of the algorithm:

      1. window: [pending, d_1..d_K, N-1 masks after each of those] (window_layout), one forward
      2. p: the clean positions' distributions, filtered (temperature / top-k / top-p act on p and
         q alike)
      3. verify: keep d_j with probability min(1, p_j(d_j) / q_j(d_j)), left to right, up to the
         first rejection, whose correction is drawn from normalize((p - q)+) (kernels.verify)
      4. commit: the j accepted drafts, then one more token: that correction, or, when every draft
         passed, the clean token drawn from p. Group j (the masks after pending, d_1..d_j) gives
         the next N-1 drafts, sampled from its q.
      5. roll back: the cache keeps pending + accepted drafts; rejected drafts and masks go.
    Logits are computed only where they are used: N clean positions and one group of N-1 masks."""
    N, W, mask_id = stride, window_size(stride, narrow), model.cfg.mask_token_id
    dev = cache.lengths.device
    rows = torch.as_tensor(rows, device=dev)

    # 1. window
    layouts = [window_layout(N, len(r.drafts), narrow) for r in requests]
    ids = torch.tensor([[r.pending, *r.drafts] + [mask_id] * (W - 1 - len(r.drafts)) for r in requests], device=dev)
    pos, mask = (torch.stack(x).to(dev) for x in zip(*layouts))
    hidden = model(ids, pos=pos, mask=mask, cache=cache, rows=rows, hidden_only=True)

    # 2. p at positions 0..N-1 (with K = 0 drafts, positions 1..N-1 are group 0's masks: never read as p)
    p = filtered(model, hidden[:, :N], requests)

    # 3. verify: per request (j accepted, the correction drawn from (p - q)+ or None, min(1, p/q) of the
    #    drafts reached)
    verdicts = verify_drafts(requests, p)
    accepted = [j for j, _, _ in verdicts]

    # 4. commit; the next drafts come from group j (the masks after pending, d_1..d_j); the narrow
    #    window has group K only, so after a rejection there are none (a cold start follows)
    groups = [len(r.drafts) if narrow else j for r, j in zip(requests, accepted)]
    q = filtered(model, torch.stack([hidden[i, group_rows(N, len(r.drafts), g, narrow)] for i, (r, g)
                                     in enumerate(zip(requests, groups))]), requests)
    committed = []
    for i, r in enumerate(requests):
        K, drafts, q_drafts = len(r.drafts), r.drafts, r.q
        j, correction, ratios = verdicts[i]
        r.stats.drafts_verified += len(ratios)
        r.stats.acceptance_sum += sum(ratios)
        if correction is not None:  # d_{j+1} was rejected: its correction, then fresh drafts
            new, kinds = drafts[:j] + [correction], ["accepted"] * j + ["correction"]
            r.drafts = sample(q[i], r.temperature, r.gen).tolist() if not narrow else []
            r.stats.rounds_r += 1
        else:  # all K drafts passed (or K = 0): the clean token from p after d_K (row K), and the
            # next drafts from q, in one draw from the request's stream
            clean, *r.drafts = sample(torch.cat([p[i][K:K + 1], q[i]]), r.temperature, r.gen).tolist()
            new, kinds = drafts + [clean], ["accepted"] * K + ["clean"]
            r.stats.rounds_v += K > 0
            r.stats.rounds_c += K == 0
        r.q = q[i] if r.drafts else None
        new = r.commit(new)
        if r.trace is not None:  # what this forward committed, then the drafts verification threw away
            r.trace.append(list(zip(new, kinds)) + [(d, "rejected") for d in drafts[j:]])
        if r.drawn_from is not None:
            r.drawn_from.extend(drawn_from(p[i], q_drafts, j, correction is not None, r.temperature)[:len(new)])
        committed.append(new)

    # 5. roll back: each row keeps pending + its accepted drafts. Counted back from the row's end: the
    #    forward appended W tokens, and make_room may have shifted the row to fit them
    cache.truncate(cache.lengths[rows] - W + 1 + torch.tensor(accepted, device=dev), rows)
    return committed


def drawn_from(p, q, j, rejected, temperature):
    """The distributions (j+1, V), as probabilities, that the j+1 tokens a forward commits were drawn
    from: q_1..q_j of the accepted drafts, then normalize((p_{j+1} - q_{j+1})+) for the correction of a
    rejected d_{j+1} (p_{j+1} where that is all zero, as kernels.verify draws it), or p_{j+1} for the
    clean token when all j drafts passed. p (N, V), q (K, V): filtered logits (q None on a cold start).
    These are the q of the introspective acceptance (introspect.py), which scores each committed token."""
    last = probs(p[j], temperature)  # p_{j+1}: the only p a committed token was drawn from
    if rejected:
        excess = (last - probs(q[j], temperature)).clamp(min=0)
        last = excess / excess.sum() if excess.sum() > 0 else last
    return [*probs(q[:j], temperature), last] if j else [last]


def filtered(model, hidden, requests):
    """Logits of hidden states (B, n, d), filtered by each request's settings (process_logits, once
    per group of requests with equal settings); float32 at least (float64 stays)."""
    logits = model.head(hidden)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    out = [None] * len(requests)
    for (temperature, top_k, top_p), members in grouped(requests, "temperature", "top_k", "top_p").items():
        for i, proc in zip(members, process_logits(logits[members], model.cfg.mask_token_id, temperature, top_k, top_p)):
            out[i] = proc
    return out


def grouped(requests, *settings):
    """{values of `settings`: [indices of the requests that have them]}."""
    groups = {}
    for i, r in enumerate(requests):
        groups.setdefault(tuple(getattr(r, s) for s in settings), []).append(i)
    return groups


def verify_drafts(requests, p_logits):
    """Verify every request's drafts d_1..d_K against p_logits[i] (its clean positions' filtered
    logits; row c is the distribution after clean token c, so row j-1 verifies d_j), in one
    kernels.verify call per temperature. Returns, per request, (j = drafts accepted before the first
    rejection, the correction drawn from normalize((p - q)+) or None, min(1, p/q) of the drafts
    verification reached: d_1..d_{j+1}, or all K); (0, None, []) for a request without drafts."""
    verdicts = [(0, None, [])] * len(requests)
    for (temperature,), members in grouped(requests, "temperature").items():
        members = [i for i in members if requests[i].drafts]
        if not members:
            continue
        rs = [requests[i] for i in members]
        p = torch.cat([p_logits[i][:len(r.drafts)] for i, r in zip(members, rs)])
        q = torch.cat([r.q for r in rs])
        d = torch.tensor([t for r in rs for t in r.drafts], device=p.device)
        if temperature > 0:  # the random numbers are inputs of verify, drawn from each request's own stream
            u = torch.cat([torch.rand(len(r.drafts), generator=r.gen, dtype=p.dtype) for r in rs]).to(p.device)
            g = torch.cat([gumbel((len(r.drafts), p.shape[-1]), r.gen, p.dtype, p.device) for r in rs])
        else:  # greedy verification reads neither
            u, g = p.new_zeros(len(d)), p.new_zeros(1, 1).expand_as(p)
        acc, cor, ratio = (x.tolist() for x in verify(p, q, d, u, g, temperature))
        at = 0
        for i, r in zip(members, rs):
            K = len(r.drafts)
            a = acc[at:at + K]
            j = a.index(False) if False in a else K
            verdicts[i] = (j, cor[at + j] if j < K else None, ratio[at:at + min(j + 1, K)])
            at += K
    return verdicts


def cache_length(model, requests, stride):
    """Cache slots per row for decoding `requests`: all they can hold, but at most two contexts (past
    that, the cache drops tokens that have left the context; see model.KVCache.make_room), and room
    for the (wide) window."""
    need = max(len(r.prompt) + r.max_new_tokens for r in requests)
    return min(need, 2 * model.cfg.max_seq_len) + window_size(stride)


@torch.no_grad()
def decode(model, requests, stride, narrow=False):
    """Decode a batch of requests together to the end (narrow: the narrow window); each keeps its own
    acceptance, rollback and random stream, so a row gives exactly what it gives alone with the same
    seed."""
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    t0 = time.time()
    cache = model.new_cache(len(requests), cache_length(model, requests, stride))
    prefill(model, cache, list(range(len(requests))), requests)
    active = list(range(len(requests)))
    while active:
        isd_step(model, cache, active, [requests[i] for i in active], stride, narrow)
        active = [i for i in active if not requests[i].done]
    for r in requests:
        r.stats.wall_s = time.time() - t0
    return requests


def isd_generate(model, prompt_ids, max_new_tokens, stride=4, temperature=1.0, top_k=None, top_p=None,
                 seed=None, stop_ids=None, narrow=False):
    """ISD for one prompt: (new token ids, Stats). For the trace of each forward, decode a
    Request(..., trace=[]) yourself."""
    r = Request(list(prompt_ids), max_new_tokens, temperature, top_k, top_p, seed, tuple(stop_ids or ()))
    decode(model, [r], stride, narrow)
    return r.out, r.stats


@torch.no_grad()
def ar_generate(model, prompt_ids, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                seed=None, stop_ids=None):
    """The baseline: one token per forward over a KV cache. Returns the new token ids."""
    r = Request(list(prompt_ids), max_new_tokens, temperature, top_k, top_p, seed, tuple(stop_ids or ()))
    cache = model.new_cache(1, cache_length(model, [r], 1))
    prefill(model, cache, [0], [r])
    while not r.done:
        logits = model(torch.tensor([[r.pending]], device=cache.lengths.device), cache=cache)[0, -1]
        p = process_logits(logits, model.cfg.mask_token_id, temperature, top_k, top_p)
        r.commit([int(sample(p, temperature, r.gen))])
    return r.out


# ----------------------------------------------------------------------------------------------
# command line: sample from a checkpoint, show the statistics, compare with AR, visualize ISD

COLORS = {"accepted": ("\033[32m", "#c8f0c8"), "correction": ("\033[31m", "#f6c6c6"), "clean": ("\033[34m", "#c8d8f8"),
          "rejected": ("\033[9;2m", "#eeeeee")}  # rejected drafts: struck through, not committed


def stats_line(st, stride):
    """One line of a decode's Stats."""
    f = max(1, st.forwards)
    return (f"stride {stride} | {st.tokens} tokens in {st.forwards} forwards | TPF {st.tpf:.2f} | "
            f"acceptance {st.acceptance_rate:.3f} | rounds V {st.rounds_v / f:.0%} R {st.rounds_r / f:.0%} "
            f"C {st.rounds_c / f:.0%} | {st.tokens_per_s:.1f} tok/s")


def show_trace(trace, enc):
    """Each forward on its own line: accepted drafts green, corrections red, clean tokens blue, then
    the drafts verification rejected, struck through."""
    for step, toks in enumerate(trace):
        parts = "".join(f"{COLORS[k][0]}{enc.decode([t])}\033[0m" for t, k in toks)
        print(f"{step:4d} {parts.replace(chr(10), '⏎')}")


def trace_html(trace, enc, prompt, st, stride):
    """A self-contained HTML page of the decode, one row per forward."""
    import html
    rows = []
    for step, toks in enumerate(trace):
        spans = "".join(f'<span style="background:{COLORS[k][1]}{";text-decoration:line-through" if k == "rejected" else ""}"'
                        f' title="{k}">{html.escape(enc.decode([t]))}</span>' for t, k in toks)
        rows.append(f"<tr><td>{step}</td><td>{sum(k != 'rejected' for _, k in toks)}</td><td><pre>{spans}</pre></td></tr>")
    legend = " ".join(f'<span style="background:{c[1]}">{k}</span>' for k, c in COLORS.items())
    return (f"<!doctype html><meta charset=utf-8><title>ISD trace</title>"
            f"<style>body{{font-family:sans-serif}}pre{{margin:0;white-space:pre-wrap}}td{{vertical-align:top;padding:2px 8px}}</style>"
            f"<h2>Introspective Strided Decoding, stride {stride}</h2><p>{legend}</p>"
            f"<p>{html.escape(stats_line(st, stride))}</p><p>prompt: <code>{html.escape(prompt)}</code></p>"
            f"<table><tr><th>forward</th><th>tokens</th><th>committed</th></tr>{''.join(rows)}</table>")


def parse_args(argv, doc):
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default="out", help="checkpoint folder written by train.py, or one with a LoRA "
                                                    "adapter (its base model + the adapter) (default out)")
    p.add_argument("--init_from", default=None, help="a pretrained model by name instead of --out_dir: smollm2")
    p.add_argument("--base", action="store_true", help="decode with the base checkpoint without its self-distilled "
                   "adapter (out_dir/distilled, loaded by default: the same tokens, more of them per forward)")
    p.add_argument("--chat", action="store_true", help="put --prompt as a user message in the chat template (ChatML)")
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    p.add_argument("--stride", type=int, default=4, help="N: up to N tokens per forward; 1 = plain AR (default 4)")
    p.add_argument("--narrow", action="store_true", help="the narrow window: 2N-1 tokens per forward instead of N*N, "
                   "with a cold start after each rejection (fewer tokens per forward, cheaper forwards)")
    p.add_argument("--max_new_tokens", type=int, default=200, help="tokens to generate (default 200)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top_k", type=int, default=None, help="keep the k most likely tokens (p and q alike)")
    p.add_argument("--top_p", type=float, default=None, help="nucleus sampling mass (p and q alike)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: fresh)")
    p.add_argument("--device", default=None, help="cpu, cuda, mps (default cpu); for python -m mlx_port.isd: "
                   "auto, cpu, gpu (default auto: MLX's default device, the GPU on a Mac)")
    p.add_argument("--json", action="store_true", help='print {"model", "text", "tokens", "stats"} as JSON')
    p.add_argument("--compare", action="store_true", help="also decode with AR and print both speeds and their ratio")
    p.add_argument("--visualize", nargs="?", const="-", default=None, metavar="FILE.html",
                   help="show each forward's accepted drafts / corrections / clean tokens and the drafts "
                        "verification rejected (struck through); with a file, write HTML")
    a = p.parse_args(argv)
    if a.stride < 1:
        p.error(f"--stride must be >= 1, got {a.stride}")
    if a.temperature < 0:
        p.error(f"--temperature must be >= 0, got {a.temperature}")
    return p, a


def main(argv=None, load_model=None, doc=__doc__):
    """The command line. `load_model(source, device)` gives (model, tokenizer) (default:
    checkpoint.load_model, PyTorch, with the self-distilled adapter unless --base; mlx_port.isd passes
    its MLX one, and its own `doc` for --help)."""
    p, a = parse_args(argv, doc)

    # the model and the prompt
    source = a.init_from or a.out_dir
    if load_model is None:
        source = source if a.base else checkpoint.distilled_or_base(source)

        def load_model(source, device):
            return checkpoint.load_model(source, device=device or "cpu")
    try:
        model, enc = load_model(source, a.device)
    except (FileNotFoundError, ValueError) as e:
        p.error(str(e))
    if a.chat and not tok.has_chat_template(enc):
        p.error(f"--chat: the tokenizer {enc.name} has no chat template (no <|im_start|>)")
    ids = tok.chat_ids(enc, [{"role": "user", "content": a.prompt}]) if a.chat else enc.encode_ordinary(a.prompt)
    kw = dict(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed, stop_ids=tok.stop_ids(enc))

    # decode, keeping the trace of every forward
    try:
        isd_generate(model, ids, 2, a.stride, narrow=a.narrow, **kw)  # warm-up: first calls are slow
        r = Request(ids, a.max_new_tokens, trace=[], **kw)
    except ValueError as e:
        p.error(str(e))
    out, st = decode(model, [r], a.stride, a.narrow)[0].out, r.stats

    # show it
    text = enc.decode(out[:-1] if out and out[-1] in r.stop_ids else out)  # the stop token is not text
    if a.json:
        print(json.dumps({"model": source, "text": text, "tokens": out, "stats": st.as_dict()}))
    elif a.visualize == "-":
        show_trace(r.trace, enc)
    else:
        print(text if a.chat else a.prompt + text)
    if a.visualize and a.visualize != "-":
        with open(a.visualize, "w") as f:
            f.write(trace_html(r.trace, enc, a.prompt, st, a.stride))
        print(f"wrote {a.visualize}", file=sys.stderr)
    if not a.json:
        print(f"model {source} | " + stats_line(st, a.stride), file=sys.stderr if a.visualize == "-" else sys.stdout)
    if a.compare:
        t0 = time.time()
        ar = ar_generate(model, ids, a.max_new_tokens, **kw)
        ar_tps = len(ar) / (time.time() - t0)
        print(f"AR {ar_tps:.1f} tok/s | ISD {st.tokens_per_s:.1f} tok/s | ISD/AR {st.tokens_per_s / ar_tps:.2f}x"
              + (" | identical tokens" if a.temperature == 0 and ar == out else ""))


if __name__ == "__main__":
    main()
