"""The masked-diffusion LM baseline: its loss, its decoder, and how it reads a text left to right
(for the introspective acceptance rate of bench/introspect.py).

    python train.py --objective=dlm --out_dir=out-dlm     # MDLM / LLaDA recipe
    python train.py --objective=bdlm --out_dir=out-bdlm   # SDAR / BD3-LM block recipe
    python sample.py --out_dir=out-dlm --prompt="ROMEO:" --steps=2 --json   # decode with dlm_generate

The I-DLM paper (arXiv 2604.11035) compares itself with ordinary diffusion LMs. Both baselines run on
model.py's network, data and tokenizer; only the attention mask and the loss differ, and there is no
logit shift: the logits at a MASK position predict the token AT that position.

  dlm   bidirectional attention over the whole row; each token is replaced by MASK with probability
        t ~ U(0.001, 1) (one t per row); cross-entropy on the masked tokens weighted by 1/t, divided by
        the row length. Its expectation bounds the per-token NLL from above (the diffusion ELBO).
  bdlm  the row is cut into blocks of `block` tokens. Input [xt | x0] (positions shared, as in the
        I-DLM loss): the noisy copy of block B sees all of block B (bidirectional) and the clean
        tokens of the blocks before B; the clean stream x0 is plainly causal, so committed tokens
        never depend on later ones and can be kept in a KV cache. Same 1/t-weighted loss on xt.

Decoding (LLaDA's low-confidence remasking, semi-autoregressive over blocks): the continuation starts
as MASKs; blocks are filled left to right; in each of `steps` steps per block every masked position
of the block draws a token from its distribution q, and the most confident (highest q of the drawn
token) are kept, the others stay masked. Fewer steps per block = more tokens per forward = faster and
usually worse. With `threshold` (Fast-dLLM) a step keeps every token whose confidence exceeds it
(at least the most confident one), so the number of steps adapts. `dlm_generate` decodes one request
and recomputes the clean prefix at every step (the reference); `bdlm_decode` decodes a batch of
requests over a KV cache (bdlm only: the plain dlm has nothing to cache), token for token the same.
"""
import functools
import time

import torch
import torch.nn.functional as F

import checkpoint
import isd
import tokenizer as tok
from decoding import Stats
from sampling import process_logits, sample
from model import Model, idlm_mask

FAMILIES = checkpoint.DIFFUSION
EPS = 1e-3  # t ~ U(EPS, 1): the 1/t weight stays finite


# ----------------------------------------------------------------------------------------------
# training

def bdlm_mask(L, b, device=None):
    """Boolean attention mask (2L, 2L) over [xt | x0] of the block diffusion LM, True = may attend.

    xt -> xt: same block (both ways).   xt -> x0: key's block strictly before the query's.
    x0 -> x0: causal.                    x0 -> xt: never.
    That is model.idlm_mask but for xt -> xt, which I-DLM keeps causal inside a block."""
    mask = idlm_mask(L, b, device)
    blk = torch.arange(L, device=device) // b
    mask[:L, :L] = blk[None, :] == blk[:, None]
    return mask


def dlm_loss(model, x0, block=None, generator=None):
    """The masked-diffusion loss of rows x0 (B, L) (module docstring): block=None the dlm (one bidirectional row),
    block=b the bdlm on [xt | x0] with `bdlm_mask`. MASK is never a target: its logit is left out of the softmax."""
    mask_id = getattr(model, "module", model).cfg.mask_token_id  # the model may be wrapped in DDP
    (B, L), dev = x0.shape, x0.device
    t = EPS + (1 - EPS) * torch.rand(B, 1, generator=generator).to(dev)
    masked = torch.rand(B, L, generator=generator).to(dev) < t
    xt = torch.where(masked, torch.full_like(x0, mask_id), x0)
    if block is None:
        logits = model(xt, mask=torch.ones(L, L, dtype=torch.bool, device=dev))
    else:
        logits = model(torch.cat([xt, x0], 1), pos=torch.arange(L, device=dev).repeat(2),
                       mask=bdlm_mask(L, block, dev))[:, :L]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    logits = logits.masked_fill(torch.arange(logits.shape[-1], device=dev) == mask_id, float("-inf"))
    ce = F.cross_entropy(logits.flatten(0, 1), x0.flatten(), reduction="none").view(B, L)
    return (ce * masked / t).sum() / (B * L)


# ----------------------------------------------------------------------------------------------
# decoding

def denoise_logits(model, family, ids, lo, hi, block):
    """Logits (B, hi-lo, V) at positions lo..hi-1 of the canvases `ids` (B, n), all inside one block.

    dlm: one bidirectional forward over the whole canvas (no cache is possible).
    bdlm: [clean tokens before the block | the block], positions 0..end-1, attention `block_window`;
    tokens after the block are not read. The clean prefix is recomputed at every step (no cache)."""
    if family == "dlm":
        n = ids.shape[1]
        return model(ids, mask=torch.ones(n, n, dtype=torch.bool, device=ids.device))[:, lo:hi]
    start = lo // block * block
    end = min(start + block, ids.shape[1])
    mask = block_window(start, end - start, block).to(ids.device)
    return model(ids[:, :end], pos=torch.arange(end, device=ids.device), mask=mask)[:, lo:hi]


@functools.lru_cache(maxsize=None)
def block_window(n_clean, n_block, block, T=None):
    """Attention (T, T) of a window [n_clean clean tokens | a noisy block of n_block tokens | padding
    up to T] whose clean tokens end where the block starts: the rows and columns these tokens occupy
    in the training mask `bdlm_mask` (clean tokens causal, the block sees them and itself both ways).
    Earlier clean tokens, if any, are in the KV cache. Padding sees only itself."""
    start = -(-n_clean // block) * block  # a block start with n_clean positions before it
    end = start + n_block
    idx = torch.cat([end + torch.arange(start - n_clean, start), torch.arange(start, end)])  # x0, then xt
    T = T or len(idx)
    mask = torch.eye(T, dtype=torch.bool)
    mask[:len(idx), :len(idx)] = bdlm_mask(end, block)[idx][:, idx]
    return mask


def block_schedule(n, steps):
    """Tokens to unmask at each step for a block of n masks in `steps` steps (as even as possible,
    the remainder first, as LLaDA does); steps > n is clamped to n."""
    steps = max(1, min(steps, n))
    return [n // steps + (s < n % steps) for s in range(steps)]


def unmask_step(proc, still, step, steps, threshold, temperature, gen):
    """Step `step` of low-confidence remasking in a block of n = len(still) positions: every position draws a token
    from its filtered logits proc (n, V) (all of them, so a request's random stream is read alike by every decoder);
    of the still-masked ones (`still`, (n,) bool) the block_schedule(n, steps)[step] most confident are kept, or
    with `threshold` every one above it, at least the best. Returns (the kept positions, their tokens, whether each
    was kept "in parallel": with another one, or while a position to its left was still masked)."""
    x = sample(proc, temperature, gen)
    conf = (proc / (temperature or 1.0)).softmax(-1).gather(-1, x[:, None])[:, 0]
    conf = conf.masked_fill(~still, -1.0)  # only masked positions compete
    k = block_schedule(len(still), steps)[step] if threshold is None else max(1, int((conf > threshold).sum()))
    pick = conf.topk(min(k, int(still.sum()))).indices
    return pick, x[pick], (pick > still.int().argmax()) | (len(pick) > 1)  # right of the first masked position


def check_settings(model, family, requests, block, steps, threshold):
    """ValueError for settings no diffusion decoder takes (the requests' own were checked by isd.Request)."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if block < 1 or steps < 1:
        raise ValueError(f"block and steps must be >= 1, got {block}, {steps}")
    if threshold is not None and not 0 <= threshold < 1:
        raise ValueError(f"threshold must be in [0, 1), got {threshold}")
    for r in requests:  # a canvas fits the context: dlm reads it whole, a bdlm block sees all before it
        if len(r.prompt) + r.params.max_tokens > model.cfg.max_seq_len:
            raise ValueError(f"prompt ({len(r.prompt)} tokens) + max_tokens ({r.params.max_tokens}) exceeds the "
                             f"context of {model.cfg.max_seq_len} tokens")


@torch.no_grad()
def dlm_generate(model, family, prompt_ids, params, block=4, steps=4, threshold=None):
    """Low-confidence remasking over blocks of `block` positions (aligned to position 0, as in training), one request
    sampled as `params` says (its stop_ids unused: the canvas is decoded whole), no cache: the reference decoder.
    Returns (new ids, q, parallel, Stats): q (n, V) the filtered logits each new token was drawn from in the step
    that committed it, parallel (n,) whether it was committed in parallel (unmask_step)."""
    r = isd.Request(list(prompt_ids), params)
    check_settings(model, family, [r], block, steps, threshold)
    mask_id, P, n, temperature = model.cfg.mask_token_id, len(r.prompt), params.max_tokens, params.temperature
    dev = model.embed_tokens.weight.device
    ids = torch.tensor([r.prompt + [mask_id] * n], device=dev)
    dtype = torch.promote_types(model.embed_tokens.weight.dtype, torch.float32)
    q = torch.empty(n, model.cfg.vocab_size, dtype=dtype, device=dev)
    parallel = torch.zeros(n, dtype=torch.bool, device=dev)
    forwards, t0 = 0, time.time()
    for lo in [P, *range((P // block + 1) * block, P + n, block)]:  # the first block may be cut
        hi = min((lo // block + 1) * block, P + n)
        for step in range(hi - lo):  # at most one step per position
            logits = denoise_logits(model, family, ids, lo, hi, block)[0].to(dtype)
            forwards += 1
            proc = process_logits(logits, mask_id, *params.filter_key)
            pick, x, par = unmask_step(proc, ids[0, lo:hi] == mask_id, step, steps, threshold, temperature, r.gen)
            ids[0, lo + pick] = x
            q[lo + pick - P] = proc[pick]
            parallel[lo + pick - P] = par
            if not (ids[0, lo:hi] == mask_id).any():
                break
    out = ids[0, P:].tolist()
    return out, q, parallel, Stats(forwards=forwards, tokens=len(out), wall_s=time.time() - t0)


@torch.no_grad()
def bdlm_decode(model, family, requests, block=4, steps=4, threshold=None):
    """dlm_generate for a batch of requests (isd.Request) over one KV cache: block diffusion only.

    Each forward puts, per request, the window [clean tokens not yet cached | its current block] through the model
    (model.window_positions_and_mask, attention `block_window`): the clean tokens causally, as the x0 stream, the
    block's tokens (committed ones and MASKs) seeing the cache, those clean tokens and the whole block, as bdlm_mask's
    noisy block; then the clean tokens stay in the cache and the block is forgotten. So the prompt's clean blocks ride
    along the first forward and a finished block rides along the next block's first forward: there is no other forward,
    and r.stats.forwards counts a request's denoising steps, as dlm_generate does. Shorter windows are padded.

    Each request reads its own stream r.gen as dlm_generate does, so it gets exactly the tokens dlm_generate gives it
    alone with the same seed. Fills r.out (cut at a stop id once every token up to it is unmasked, as Request.commit
    does) and r.stats; returns, per request, (q, parallel) of its new tokens."""
    check_settings(model, family, requests, block, steps, threshold)
    if family != "bdlm":
        raise ValueError(f"bdlm_decode decodes the block diffusion LM (bdlm), not {family!r}: dlm attends both "
                         f"ways over the whole row, so no key or value is final before the end (use dlm_generate)")
    mask_id, dev, B = model.cfg.mask_token_id, model.embed_tokens.weight.device, len(requests)
    dtype = torch.promote_types(model.embed_tokens.weight.dtype, torch.float32)
    t0 = time.time()
    # room for the longest row and a window (after the first: a finished block and the next, two blocks)
    cache = model.new_cache(B, max(len(r.prompt) + r.params.max_tokens for r in requests) + 2 * block)
    canvas = [r.prompt + [mask_id] * r.params.max_tokens for r in requests]  # lists: read and written per token
    q = [torch.empty(r.params.max_tokens, model.cfg.vocab_size, dtype=dtype, device=dev) for r in requests]
    parallel = [[False] * r.params.max_tokens for r in requests]
    start = [len(r.prompt) // block * block for r in requests]  # each row's block; the first may be cut
    step = [0] * B
    active = list(range(B))
    while active:
        # the window of each row: [clean tokens not yet cached | its block], padded to T
        rows = torch.tensor(active, device=dev)
        cached = (cache.offsets + cache.lengths)[rows].tolist()
        ends = [min(start[i] + block, len(canvas[i])) for i in active]
        T = max(e - c for c, e in zip(cached, ends))
        ids = torch.tensor([canvas[i][c:e] + [mask_id] * (T - e + c) for i, c, e in zip(active, cached, ends)],
                           device=dev)
        mask = torch.stack([block_window(start[i] - c, e - start[i], block, T)
                            for i, c, e in zip(active, cached, ends)]).to(dev)
        hidden = model(ids, pos=torch.arange(T, device=dev), mask=mask, cache=cache, rows=rows, hidden_only=True)
        cache.truncate(cache.lengths[rows] - T + torch.tensor([start[i] - c for i, c in zip(active, cached)],
                                                              device=dev), rows)  # keep the clean tokens

        # the block's positions after the prompt: their filtered logits, then one unmasking step per row
        first = [max(start[i], len(requests[i].prompt)) for i in active]
        at = torch.tensor([f - c for f, c in zip(first, cached)], device=dev)
        at = (at[:, None] + torch.arange(max(e - f for e, f in zip(ends, first)), device=dev)).clamp(max=T - 1)
        reqs = [requests[i] for i in active]
        proc = isd.filtered(model, hidden.gather(1, at[..., None].expand(-1, -1, hidden.shape[-1])), reqs)
        for j, (i, r, f, e) in enumerate(zip(active, reqs, first, ends)):
            P, p = len(r.prompt), proc[j][:e - f]
            still = torch.tensor([t == mask_id for t in canvas[i][f:e]], device=dev)
            pick, x, par = unmask_step(p, still, step[i], steps, threshold, r.params.temperature, r.gen)
            q[i][pick + (f - P)] = p[pick]
            for m, t, in_parallel in zip(pick.tolist(), x.tolist(), par.tolist()):
                canvas[i][f + m], parallel[i][f + m - P] = t, in_parallel
            step[i] += 1
            # commit what is now unmasked left to right; a finished block moves the row to the next one
            todo = canvas[i][P + len(r.out):e]
            k = todo.index(mask_id) if mask_id in todo else len(todo)
            r.commit(todo[:k])
            if k == len(todo):
                start[i], step[i] = e, 0
        active = [i for i in active if not requests[i].done]
    for r in requests:
        r.stats.wall_s = time.time() - t0
    return [(q[i][:len(r.out)], torch.tensor(parallel[i][:len(r.out)], device=dev)) for i, r in enumerate(requests)]


# ----------------------------------------------------------------------------------------------
# reading a text left to right: the p of the introspective acceptance rate (bench/introspect.py)

@torch.no_grad()
def left_to_right_logits(model, family, ids, start, block=4):
    """Logits (B, n - start, V): for each position i >= start of the rows `ids` (B, n), the
    model's distribution of token i read left to right: tokens 0..i-1 given, i and later hidden.

    ar, idlm: the causal (clean) stream, logits at i-1 (one forward; later tokens are invisible).
    dlm: the decoding canvas of length n with positions i..n-1 set to MASK, logits at i.
    bdlm: i's own block with positions i.. of it set to MASK, the clean blocks before it, logits at
    i (later blocks are invisible, as in decoding)."""
    if family in ("ar", "idlm"):
        return model(ids)[:, start - 1:-1]
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}")
    out = []
    for i in range(start, ids.shape[1]):
        canvas = ids.clone()
        canvas[:, i:] = model.cfg.mask_token_id
        out.append(denoise_logits(model, family, canvas, i, i + 1, block))
    return torch.cat(out, 1)


# ----------------------------------------------------------------------------------------------
# checkpoints

def load(out_dir, device="cpu"):
    """(model, tokenizer, family, block) of a diffusion-LM checkpoint (train.py --objective=dlm or bdlm; block:
    its --block_size); a one-line ValueError for any other folder."""
    cfg = checkpoint.training_config(out_dir)
    if cfg.get("objective") not in FAMILIES:
        raise ValueError(f"{out_dir} holds no diffusion LM: train one with python train.py --objective=dlm (or bdlm)")
    return Model.load(out_dir, device=device).eval(), tok.load(out_dir), cfg["objective"], cfg.get("block_size") or 4
