"""Introspective Strided Decoding (docs/method.md section 2) and the autoregressive baseline, in MLX;
its command line is mlx_port/sample.py.

isd.py, function for function (diff them), with mx arrays. Each step is one forward of a window of
W = N*N tokens per request (window_layout):
    [pending, d_1 .. d_K | N-1 masks after pending | N-1 masks after d_1 | .. after d_K]
`pending` is the last committed token, not yet in the cache; d_1..d_K are the drafts the previous
step proposed (K = N-1, or 0 on a cold start: the first step after the prompt, and every step at
stride 1). The clean positions give p (the model's own AR distribution); each draft d_j, sampled
from its q, is kept with probability min(1, p_j(d_j) / q_j(d_j)), and the first rejected one is
replaced by a draw from normalize((p_j - q_j)+): that rule makes every committed token distributed
exactly as p( . | prefix). Group j of masks (after pending, d_1..d_j) proposes the next drafts.
"""
import functools
import secrets
import time
from dataclasses import dataclass, field

import mlx.core as mx

from decoding import SamplingParams, Stats
from mlx_port.kernels import verify
from mlx_port.sampling import gumbel, probs, process_logits, sample

@dataclass
class Request:
    """One row of the batched decoder: its prompt and SamplingParams, committed tokens, drafts and their q."""
    prompt: list
    params: SamplingParams = field(default_factory=SamplingParams)
    out: list = field(default_factory=list)  # committed new tokens
    drafts: list = field(default_factory=list)  # d_1..d_K, proposed by the last forward's masks
    q_logits: mx.array = None  # (K, V) the filtered logits the drafts were sampled from (not yet divided by the
    # temperature: sample and kernels.verify apply it)
    prefilled: int = 0  # prompt tokens already in the cache
    done: bool = False
    # per forward: [(token, kind)], kind "accepted" (a draft that passed), "correction" (drawn from (p-q)+ for the
    # first rejected draft), "clean" (drawn from p) or "rejected" (a draft thrown away, not committed); None = off
    trace: list = None
    # per committed token, the distribution (V,) it was drawn from, as probabilities (drawn_from); None = off
    drawn_from: list = None
    stats: Stats = field(default_factory=Stats)

    def __post_init__(self):
        if len(self.prompt) == 0:
            raise ValueError("the prompt is empty: give at least one token")
        self.key = mx.random.key(self.params.seed if self.params.seed is not None else secrets.randbits(63))

    def next_key(self):
        """The next key of the request's random stream (each draw takes one: a chain of splits)."""
        self.key, key = mx.random.split(self.key)
        mx.eval(self.key, key)  # a greedy request never reads its keys: keep the chain from growing lazily
        return key

    @property
    def pending(self):
        """The last committed token (or the prompt's last): in the window, not yet in the cache."""
        return (self.out or self.prompt)[-1]

    def commit(self, new):
        """Append a forward's tokens up to the first stop id or max_tokens (what the same forward
        produced after it is dropped), and count the forward; returns what was kept."""
        for t, n in enumerate(new):
            if n in self.params.stop_ids or len(self.out) + t + 1 >= self.params.max_tokens:
                new, self.done = new[:t + 1], True
                break
        self.out.extend(new)
        self.stats.forwards += 1
        self.stats.tokens += len(new)
        return new


def window_size(stride, narrow=False, n_drafts=None):
    """Tokens a request puts into a forward: pending, its K drafts (K = n_drafts, default N-1) and N-1 masks
    after each of those K+1 (the wide window: N*N when K = N-1), or after the last only (narrow: 2N-1)."""
    K = stride - 1 if n_drafts is None else n_drafts
    return K + 1 + (1 if narrow else K + 1) * (stride - 1)


@functools.lru_cache(maxsize=None)
def window_layout(stride, n_drafts, narrow=False, width=None):
    """(relative positions (W,), attention inside the window (W, W)) of a window with K = n_drafts, W = width
    (default: window_size, the widest a row needs):

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
    W = width or window_size(N, narrow)
    pos, mask = mx.zeros(W, dtype=mx.int64), mx.eye(W, dtype=mx.bool_)
    pos[:K + 1] = mx.arange(K + 1)
    mask[:K + 1, :K + 1] = mx.tril(mx.ones((K + 1, K + 1), dtype=mx.bool_))
    for g in [K] if narrow else range(K + 1):
        at = group_rows(N, K, g, narrow).start
        pos[at:at + b] = mx.arange(g + 1, g + 1 + b)
        mask[at:at + b, :g + 1] = True
        mask[at:at + b, at:at + b] = mx.tril(mx.ones((b, b), dtype=mx.bool_))
    mx.eval(pos, mask)  # cached: built once
    return pos, mask


def group_rows(stride, n_drafts, g, narrow=False):
    """Window indices of the N-1 masks of group g (see window_layout; narrow: g = K only)."""
    at = n_drafts + 1 + (0 if narrow else g) * (stride - 1)
    return slice(at, at + stride - 1)


def prefill(model, cache, rows, requests, chunk=None):
    """Put each prompt but its last token (the first `pending`) into the cache, continuing from
    what the row already holds. `chunk` caps the tokens each row takes in this call, so that a
    scheduler can prefill a long prompt over several steps while other rows keep decoding; a prompt
    longer than the cache leaves goes in several forwards (the cache keeps what is in context)."""
    rows = mx.array(rows)
    done = [r.prefilled for r in requests]
    todo = [r.prompt[d:len(r.prompt) - 1][:chunk] for r, d in zip(requests, done)]
    at = 0
    while at < max(map(len, todo)):
        # as much as fits, or, in a full cache, what make_room can always free
        room = cache.max_len - cache.lengths[rows].max().item()
        step = max(room, cache.max_len - model.cfg.max_seq_len + 1, 1)
        part = [t[at:at + step] for t in todo]
        at += step
        n = max(map(len, part))
        pad = model.cfg.mask_token_id  # padding is written past each row's length, then forgotten
        ids = mx.array([t + [pad] * (n - len(t)) for t in part])
        model(ids, cache=cache, rows=rows)
        cache.truncate(cache.lengths[rows] - n + mx.array([len(t) for t in part]), rows)
    for r, t in zip(requests, todo):
        r.prefilled += len(t)


def isd_step(model, cache, rows, requests, stride, narrow=False):
    """One ISD forward for every request (cache row `rows[i]` holds requests[i]); returns the tokens
    each request committed (narrow: the narrow window, see window_layout). The phases of the algorithm:

      1. window: [pending, d_1..d_K, N-1 masks after each of those] (window_layout), one forward
      2. p: the clean positions' distributions, filtered (temperature / top-k / top-p act on p and q alike)
      3. verify: keep d_j with probability min(1, p_j(d_j) / q_j(d_j)), left to right, up to the first rejection,
         whose correction is drawn from normalize((p - q)+) (kernels.verify)
      4. commit: the j accepted drafts, then one more token: that correction, or, when every draft passed, the
         clean token drawn from p. Group j (the masks after pending, d_1..d_j) gives the next N-1 drafts from its q.
      5. roll back: the cache keeps pending + accepted drafts; rejected drafts and masks go.
    Logits are computed only where they are used: N clean positions and one group of N-1 masks.
    MLX is lazy: the forward runs when verification first reads its results."""
    N, mask_id = stride, model.cfg.mask_token_id
    rows = mx.array(rows)

    # 1. window (drafts proposed at a larger stride than this step's: the first N-1 are kept, each still
    #    drawn from its own q; none of them is committed yet, so dropping the rest changes nothing else)
    for r in requests:
        r.drafts, r.q_logits = r.drafts[:N - 1], (r.q_logits[:N - 1] if r.drafts[:N - 1] else None)
    W = max(window_size(N, narrow, len(r.drafts)) for r in requests)  # cold rows alone: N tokens, not N*N
    layouts = [window_layout(N, len(r.drafts), narrow, W) for r in requests]
    ids = mx.array([[r.pending, *r.drafts] + [mask_id] * (W - 1 - len(r.drafts)) for r in requests])
    pos, mask = (mx.stack(x) for x in zip(*layouts))
    hidden = model(ids, pos=pos, mask=mask, cache=cache, rows=rows, hidden_only=True)

    # 2. p at positions 0..N-1 (with K = 0 drafts, positions 1..N-1 are group 0's masks: never read as p)
    p_logits = filtered(model, hidden[:, :N], requests)

    # 3. verify: per request (j accepted, the correction or None, min(1, p/q) of the drafts reached)
    verdicts = verify_drafts(requests, p_logits)
    accepted = [j for j, _, _ in verdicts]

    # 4. commit; the next drafts come from group j (narrow: group K only, so none after a rejection: a cold start)
    groups = [len(r.drafts) if narrow else j for r, j in zip(requests, accepted)]
    q_logits = filtered(model, mx.stack([hidden[i, group_rows(N, len(r.drafts), g, narrow)] for i, (r, g)
                                  in enumerate(zip(requests, groups))]), requests)
    committed = []
    for i, r in enumerate(requests):
        K, drafts, drafts_q_logits = len(r.drafts), r.drafts, r.q_logits
        j, correction, ratios = verdicts[i]
        r.stats.drafts_verified += len(ratios)
        r.stats.acceptance_sum += sum(ratios)
        if correction is not None:  # d_{j+1} was rejected: its correction, then fresh drafts
            new, kinds = drafts[:j] + [correction], ["accepted"] * j + ["correction"]
            r.drafts = sample(q_logits[i], r.params.temperature, r.next_key()).tolist() if not narrow else []
            r.stats.rounds_r += 1
        else:  # all K drafts passed (or K = 0): the clean token from p after d_K (row K), and the
            # next drafts from q, in one draw from the request's stream
            clean, *r.drafts = sample(mx.concatenate([p_logits[i][K:K + 1], q_logits[i]]), r.params.temperature, r.next_key()).tolist()
            new, kinds = drafts + [clean], ["accepted"] * K + ["clean"]
            r.stats.rounds_v += K > 0
            r.stats.rounds_c += K == 0
        r.q_logits = q_logits[i] if r.drafts else None
        new = r.commit(new)
        if r.trace is not None:  # what this forward committed, then the drafts verification threw away
            r.trace.append(list(zip(new, kinds)) + [(d, "rejected") for d in drafts[j:]])
        if r.drawn_from is not None:
            r.drawn_from.extend(drawn_from(p_logits[i], drafts_q_logits, j, correction is not None, r.params.temperature)[:len(new)])
        committed.append(new)

    # 5. roll back: each row keeps pending + its accepted drafts. Counted back from the row's end: the
    #    forward appended W tokens, and make_room may have shifted the row to fit them
    cache.truncate(cache.lengths[rows] - W + 1 + mx.array(accepted), rows)
    return committed


def drawn_from(p_logits, q_logits, j, rejected, temperature):
    """The distributions (j+1, V), as probabilities, that the j+1 tokens a forward commits were drawn from: q_1..q_j of
    the accepted drafts, then normalize((p_{j+1} - q_{j+1})+) for the correction of a rejected d_{j+1} (p_{j+1} where
    that is all zero, as kernels.verify draws it), or p_{j+1} for the clean token when all j drafts passed: the q of the
    introspective acceptance (bench/introspect.py). p_logits (N, V), q_logits (K, V; None on a cold start): filtered."""
    last = probs(p_logits[j], temperature)  # p_{j+1}: the only p a committed token was drawn from
    if rejected:
        excess = mx.maximum(last - probs(q_logits[j], temperature), 0)
        last = excess / excess.sum() if excess.sum().item() > 0 else last
    return [*probs(q_logits[:j], temperature), last] if j else [last]


def filtered(model, hidden, requests):
    """Logits of hidden states (B, n, d), filtered by each request's settings (process_logits, once
    per group of requests with equal settings); float32 at least (float64 stays)."""
    logits = model.head(hidden)
    logits = logits if logits.dtype in (mx.float32, mx.float64) else logits.astype(mx.float32)
    out = [None] * len(requests)
    for settings, members in grouped(requests, lambda r: r.params.filter_key).items():  # (temperature, top_k, top_p)
        for i, proc in zip(members, process_logits(logits[members], model.cfg.mask_token_id, *settings)):
            out[i] = proc
    return out


def grouped(requests, key):
    """{key(request): [indices of the requests that have it]}."""
    groups = {}
    for i, r in enumerate(requests):
        groups.setdefault(key(r), []).append(i)
    return groups


def verify_drafts(requests, p_logits):
    """Verify every request's drafts d_1..d_K against p_logits[i] (its clean positions' filtered logits; row c is the
    distribution after clean token c, so row j-1 verifies d_j), in one kernels.verify call per temperature. Returns,
    per request, (j = drafts accepted before the first rejection, the correction drawn from normalize((p - q)+) or
    None, min(1, p/q) of the drafts verification reached: d_1..d_{j+1}, or all K); (0, None, []) without drafts."""
    verdicts = [(0, None, [])] * len(requests)
    for temperature, members in grouped(requests, lambda r: r.params.temperature).items():
        members = [i for i in members if requests[i].drafts]
        if not members:
            continue
        rs = [requests[i] for i in members]
        p = mx.concatenate([p_logits[i][:len(r.drafts)] for i, r in zip(members, rs)])
        q = mx.concatenate([r.q_logits for r in rs])
        d = mx.array([t for r in rs for t in r.drafts])
        if temperature > 0:  # the random numbers are inputs of verify, drawn from each request's own stream
            u = mx.concatenate([mx.random.uniform(shape=(len(r.drafts),), key=r.next_key()) for r in rs])
            g = mx.concatenate([gumbel((len(r.drafts), p.shape[-1]), r.next_key(), p.dtype) for r in rs])
        else:  # greedy verification reads neither
            u, g = mx.zeros(d.size, p.dtype), mx.zeros(p.shape, p.dtype)
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
    """Cache slots per row for decoding `requests`: all they can hold, but at most two contexts (past that, the cache
    drops tokens that have left the context: model.KVCache.make_room), and room for the (wide) window."""
    need = max(len(r.prompt) + r.params.max_tokens for r in requests)
    return min(need, 2 * model.cfg.max_seq_len) + window_size(stride)


def decode(model, requests, stride, narrow=False):
    """Decode a batch of requests together to the end (narrow: the narrow window); each keeps its own acceptance,
    rollback and random stream, so a row gives exactly what it gives alone with the same seed."""
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


def isd_generate(model, prompt_ids, params, stride=4, narrow=False):
    """ISD for one prompt, sampled as `params` says: (new token ids, Stats). For the trace of each
    forward, decode a Request(..., trace=[]) yourself."""
    r = Request(list(prompt_ids), params)
    decode(model, [r], stride, narrow)
    return r.out, r.stats


def ar_generate(model, prompt_ids, params):
    """The baseline: one token per forward over a KV cache, sampled as `params` says; returns the new token ids."""
    r = Request(list(prompt_ids), params)
    cache = model.new_cache(1, cache_length(model, [r], 1))
    prefill(model, cache, [0], [r])
    while not r.done:
        hidden = model(mx.array([[r.pending]]), cache=cache, hidden_only=True)
        p_logits = filtered(model, hidden, [r])[0][-1]  # ISD's p: float32 at least, whatever the model's dtype
        r.commit([sample(p_logits, params.temperature, r.next_key()).item()])
    return r.out
