"""The I-DLM model in MLX: the network, KV cache and introspective loss of model.py, framework for framework.

Same ModelConfig, same parameter names (HF Llama), same checkpoint (model.safetensors + config.json):
MLX loads a PyTorch checkpoint with mx.load and writes one that Model.load of model.py reads.
The network is an ordinary causal LM (RMSNorm, RoPE, SwiGLU, grouped-query attention, tied
embeddings); what makes it an I-DLM (docs/method.md section 1) is the MASK token, the [xt | x0] training input
with shared positions and the block mask of `idlm_mask`, and a KV cache whose rows can be truncated.
"""
import json
import math
import os
from dataclasses import asdict
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from checkpoint import ModelConfig, load_config  # one config, one checkpoint format for both


def pick_device(name):
    """The MLX device for --device: auto (MLX's default: the GPU on a Mac), cpu or gpu."""
    if name in (None, "auto"):
        return mx.default_device()
    if name not in ("cpu", "gpu"):
        raise ValueError(f"--device={name}: MLX runs on auto, cpu or gpu")
    if not mx.is_available(mx.gpu if name == "gpu" else mx.cpu):
        raise ValueError(f"--device={name}: this MLX build has no {name} backend (on Linux, mlx[cpu] is CPU only)")
    return mx.gpu if name == "gpu" else mx.cpu


# ----------------------------------------------------------------------------------------------
# The I-DLM idea (docs/method.md section 1): the training mask over [xt | x0] and the introspective
# loss. Everything after this section is an ordinary Llama-style decoder with a rollback KV cache.

def idlm_mask(L, b):
    """Boolean attention mask (2L, 2L) over [xt | x0], True = may attend; blk(i) = i // b.

    xt -> xt: same block, key <= query.   xt -> x0: key's block strictly before the query's.
    x0 -> x0: causal.                       x0 -> xt: never.
    So the mask at offset m of block B sees clean tokens 0..B*b-1 and the m masks before it.
    L = 6, b = 2 (stride 3); rows are queries, columns keys; the last column says what a row learns:

                   xt (all MASK)   x0 (clean)
        xt 0 pos 0   ■ · · · · ·     · · · · · ·   -> x0[1]
        xt 1 pos 1   ■ ■ · · · ·     · · · · · ·   -> x0[2]
        xt 2 pos 2   · · ■ · · ·     ■ ■ · · · ·   -> x0[3]
        xt 3 pos 3   · · ■ ■ · ·     ■ ■ · · · ·   -> x0[4]
        xt 4 pos 4   · · · · ■ ·     ■ ■ ■ ■ · ·   -> x0[5]
        x0 i pos i   · · · · · ·     causal        -> x0[i+1]
    """
    i = mx.arange(L)
    blk = i // b
    causal = i[None, :] <= i[:, None]
    xt_xt = causal & (blk[None, :] == blk[:, None])
    xt_x0 = blk[None, :] < blk[:, None]
    top = mx.concatenate([xt_xt, xt_x0], axis=1)
    bottom = mx.concatenate([mx.zeros_like(causal), causal], axis=1)
    return mx.concatenate([top, bottom], axis=0)


def _shifted_ce(logits, labels):
    """Summed cross-entropy of position i against labels[i+1] (-100 = no target)."""
    if logits.dtype not in (mx.float32, mx.float64):
        logits = logits.astype(mx.float32)
    targets = labels[:, 1:]
    valid = targets != -100
    ce = nn.losses.cross_entropy(logits[:, :-1], mx.where(valid, targets, 0))
    return mx.where(valid, ce, 0).sum()


def idlm_logits(model, x0, labels=None, stride=4):
    """Logits of the introspective forward: (xt half, x0 half), each (B, L, V).

    xt = x0 with every labelled token (labels != -100; default all) replaced by MASK; the input
    [xt | x0] uses positions 0..L-1 twice and `idlm_mask` with b = stride - 1 masks per block."""
    if stride < 2:
        raise ValueError("the introspective loss needs stride >= 2 (stride 1 is plain AR)")
    labels = x0 if labels is None else labels
    L = x0.shape[1]
    xt = mx.where(labels != -100, model.cfg.mask_token_id, x0)
    pos = mx.concatenate([mx.arange(L), mx.arange(L)])
    logits = model(mx.concatenate([xt, x0], axis=1), pos=pos, mask=idlm_mask(L, stride - 1))
    return logits[:, :L], logits[:, L:]


def idlm_loss(model, x0, labels=None, stride=4, alpha=0.2):
    """Introspective loss `task + alpha * clean` on clean rows x0 (B, L); returns (loss, task, clean).

    `labels` (default x0) marks where loss is wanted (-100 elsewhere); see idlm_logits for the
    input. The mask at offset m of block B learns token B*b+m+1 (2..N ahead of the last clean token
    it sees); the clean half is the ordinary AR loss. Both terms are divided by the number of
    labelled (shifted) targets. alpha="auto" weights the clean term by stop_gradient(task/clean),
    so both terms carry equal weight."""
    labels = x0 if labels is None else labels
    xt_logits, x0_logits = idlm_logits(model, x0, labels, stride)
    n = mx.maximum((labels[:, 1:] != -100).sum(), 1)
    task = _shifted_ce(xt_logits, labels) / n
    clean = _shifted_ce(x0_logits, labels) / n
    weight = mx.stop_gradient(task / clean) if alpha == "auto" else alpha
    return task + weight * clean, task, clean


def ar_loss(model, x0, labels=None):
    """The plain autoregressive loss on x0 alone (objective=ar); equals idlm_loss's clean term."""
    labels = x0 if labels is None else labels
    n = mx.maximum((labels[:, 1:] != -100).sum(), 1)
    return _shifted_ce(model(x0), labels) / n


# ----------------------------------------------------------------------------------------------
# The network

def rope_cos_sin(pos, head_dim, theta, dtype):
    """cos/sin of rotary embeddings for explicit position ids `pos` (B, T): (B, 1, T, head_dim).

    Positions are inputs, not implied by the index: the two halves of [xt | x0] share them. The
    angles are computed in float64 on the host, as model.py does (Metal has no float64)."""
    inv_freq = theta ** -(np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    ang = np.asarray(pos, dtype=np.float64)[..., None] * inv_freq
    ang = np.concatenate([ang, ang], axis=-1)[:, None]
    host = np.float64 if dtype == mx.float64 else np.float32
    return mx.array(np.cos(ang).astype(host)).astype(dtype), mx.array(np.sin(ang).astype(host)).astype(dtype)


def apply_rope(x, cos, sin):
    """Rotate-half convention (Hugging Face Llama/Qwen): pairs are (i, i + head_dim/2)."""
    x1, x2 = mx.split(x, 2, axis=-1)
    return x * cos + mx.concatenate([-x2, x1], axis=-1) * sin


class KVCache:
    """Preallocated keys/values for B rows, each row with its own length.

    `lengths[b]` tokens of row b are valid; slot s of row b holds the token at position
    `offsets[b] + s`. A forward appends its T new tokens at each row's own length; `truncate` moves
    a row's length back (ISD's rollback: rejected drafts and MASK slots are simply forgotten and
    later overwritten). When a row is full, `make_room` drops its oldest tokens, but only those
    that lie outside the model's context (`max_seq_len`) for every new query. One array per layer,
    updated by index assignment."""

    def __init__(self, cfg, batch_size, max_len=None, dtype=mx.float32):
        self.max_len = max_len or cfg.max_seq_len
        shape = (batch_size, cfg.n_kv_head, self.max_len, cfg.head_dim)
        self.k = [mx.zeros(shape, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [mx.zeros(shape, dtype=dtype) for _ in range(cfg.n_layer)]
        self.lengths = mx.zeros(batch_size, dtype=mx.int64)
        self.offsets = mx.zeros(batch_size, dtype=mx.int64)

    def truncate(self, lengths, rows=None):
        """Roll rows (default all) back to `lengths` tokens, each <= the row's current length."""
        rows = mx.arange(self.lengths.size) if rows is None else mx.array(np.asarray(rows))
        lengths = mx.array(np.asarray(lengths), dtype=mx.int64)
        if (lengths > self.lengths[rows]).any() or (lengths < 0).any():
            raise ValueError(f"truncate to {lengths.tolist()} but rows hold {self.lengths[rows].tolist()}")
        self.lengths[rows] = lengths

    def layer(self, i, rows, S):
        """Layer i's cache in one forward: a function that writes the window's keys and values
        (B, n_kv_head, T, head_dim) at each of `rows`' lengths and returns the first S slots of those
        rows, cache and window together, for attention."""
        def write_and_read(k, v):
            at = self.lengths[rows][:, None] + mx.arange(k.shape[2])  # (B, T)
            self.k[i][rows[:, None], :, at] = k.transpose(0, 2, 1, 3)
            self.v[i][rows[:, None], :, at] = v.transpose(0, 2, 1, 3)
            return self.k[i][rows, :, :S], self.v[i][rows, :, :S]
        return write_and_read

    def reset(self, rows):
        """Empty rows for new sequences: no tokens, positions from 0 again."""
        rows = mx.array(np.asarray(rows))
        self.lengths[rows] = 0
        self.offsets[rows] = 0

    def make_room(self, rows, T, context):
        """Make room for T new tokens in each of `rows` by dropping each row's oldest tokens; a query
        at position P sees keys at positions > P - context, so the first L - context + 1 tokens of a
        row holding L can go. Raises (changing nothing) if that is not enough."""
        need = self.lengths[rows] + T - self.max_len
        if need.max().item() <= 0:
            return
        spare = self.lengths[rows] - context + 1
        if (need > spare).any().item():
            raise ValueError(f"KV cache overflow: {self.lengths[rows].tolist()} + {T} > {self.max_len} "
                             f"and the context ({context}) needs every cached token")
        for r, d in zip(np.asarray(rows).tolist(), need.tolist()):
            if d > 0:  # shift the row left by d slots; positions stay with their tokens
                n = self.lengths[r].item() - d
                for layer in range(len(self.k)):
                    self.k[layer][r, :, :n] = self.k[layer][r, :, d:d + n]
                    self.v[layer][r, :, :n] = self.v[layer][r, :, d:d + n]
                self.lengths[r] = self.lengths[r] - d
                self.offsets[r] = self.offsets[r] + d


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        hd = cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_head * hd, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * hd, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * hd, bias=False)
        self.o_proj = nn.Linear(cfg.n_head * hd, cfg.d_model, bias=False)

    def __call__(self, x, cos, sin, mask, kv=None):
        """`kv`: this layer's cache for the forward (KVCache.layer), or None."""
        B, T, _ = x.shape
        hd, nh, nkv = self.cfg.head_dim, self.cfg.n_head, self.cfg.n_kv_head
        q = apply_rope(self.q_proj(x).reshape(B, T, nh, hd).transpose(0, 2, 1, 3), cos, sin)
        k = apply_rope(self.k_proj(x).reshape(B, T, nkv, hd).transpose(0, 2, 1, 3), cos, sin)
        v = self.v_proj(x).reshape(B, T, nkv, hd).transpose(0, 2, 1, 3)
        if kv is not None:
            k, v = kv(k, v)  # cache and window together
        y = mx.fast.scaled_dot_product_attention(q, k, v, scale=hd ** -0.5, mask=mask)  # GQA built in
        return self.o_proj(y.transpose(0, 2, 1, 3).reshape(B, T, nh * hd))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def __call__(self, x):
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = nn.RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def __call__(self, x, cos, sin, mask, kv=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv)
        return x + self.mlp(self.post_attention_layernorm(x))


class Model(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = [Block(cfg) for _ in range(cfg.n_layer)]
        self.norm = nn.RMSNorm(cfg.d_model, cfg.norm_eps)
        # model.py's init: matrices N(0, 0.02), residual projections GPT-2 style scaled; norms stay 1
        flat = dict(tree_flatten(self.parameters()))
        for name, p in flat.items():
            if p.ndim >= 2:
                std = 0.02 / math.sqrt(2 * cfg.n_layer) if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
                flat[name] = std * mx.random.normal(p.shape)
        self.load_weights(list(flat.items()))

    def __call__(self, idx, pos=None, mask=None, cache=None, rows=None, hidden_only=False):
        """Logits (B, T, vocab) for token ids `idx` (B, T) (with hidden_only: the final hidden states,
        to which `head` gives logits; ISD takes logits only where it needs them).

        Without a cache: `pos` defaults to 0..T-1 and `mask` (True = may attend; (T, T) or
        (B, T, T)) to causal. With a cache, the T tokens form a *window* appended at each row's own
        length: `pos` ((T,) or (B, T), default 0..T-1) are positions relative to the row's next
        position and `mask` (default causal) says which window tokens each one sees; every window
        token also sees the row's whole cache, within the context (`max_seq_len`: a query at
        position P sees keys at positions > P - max_seq_len). The cache's lengths advance by T
        (truncate afterwards to keep fewer). `rows` picks which cache rows the B inputs belong to."""
        B, T = idx.shape
        if cache is not None:
            rows = mx.arange(B) if rows is None else mx.array(np.asarray(rows))
            if rows.size != B:
                raise ValueError(f"{B} input rows but {rows.size} cache rows")
            cache.make_room(rows, T, self.cfg.max_seq_len)  # only tokens that left the context go
            pos, mask = window_positions_and_mask(cache, rows, T, self.cfg.max_seq_len, pos, mask)
        else:
            if pos is None:
                pos = mx.arange(T)
            if mask is None:
                mask = mx.tril(mx.ones((T, T), dtype=mx.bool_))
        pos = mx.broadcast_to(pos, (B, T)) if pos.ndim == 1 else pos
        if mask.ndim == 3:
            mask = mask[:, None]  # broadcast over heads
        x = self.embed_tokens(idx)
        cos, sin = rope_cos_sin(pos, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        for i, block in enumerate(self.layers):
            x = block(x, cos, sin, mask, None if cache is None else cache.layer(i, rows, mask.shape[-1]))
        if cache is not None:
            cache.lengths[rows] = cache.lengths[rows] + T
        x = self.norm(x)
        return x if hidden_only else self.head(x)

    def head(self, x):
        """Logits of final hidden states: the output layer is tied to the embedding."""
        return self.embed_tokens.as_linear(x)

    def new_cache(self, batch_size, max_len=None):
        return KVCache(self.cfg, batch_size, max_len, dtype=self.embed_tokens.weight.dtype)

    def save(self, out_dir):
        """Write model.safetensors + config.json into out_dir: plain writes, as model.save_module
        (mlx_port/train.py writes them into the folder of checkpoint.staged)."""
        os.makedirs(out_dir, exist_ok=True)
        tensors = dict(tree_flatten(self.parameters()))
        mx.save_safetensors(os.path.join(out_dir, "model.safetensors"), tensors)
        Path(out_dir, "config.json").write_text(json.dumps(asdict(self.cfg), indent=2) + "\n")

    @classmethod
    def load(cls, out_dir):
        cfg = load_config(out_dir)
        weights = os.path.join(out_dir, "model.safetensors")
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"{out_dir} has config.json but no model.safetensors")
        model = cls(cfg)
        model.load_weights(list(mx.load(weights).items()))  # strict: the names and shapes of model.py
        return model


def window_positions_and_mask(cache, rows, T, context, rel_pos=None, window_mask=None):
    """Absolute positions (B, T) and attention mask (B, T, S) of a T-token window appended to cache
    rows `rows`. Slot s of a row is its cached token s (s < L), window token s - L (s < L + T), or
    unused; S covers the longest row plus the window. A query sees keys within `context` positions."""
    rel = mx.arange(T) if rel_pos is None else mx.array(np.asarray(rel_pos))
    win = mx.tril(mx.ones((T, T), dtype=mx.bool_)) if window_mask is None else mx.array(np.asarray(window_mask))
    B, L, off = rows.size, cache.lengths[rows], cache.offsets[rows]
    pos = (off + L)[:, None] + mx.broadcast_to(rel, (B, T))
    S = L.max().item() + T
    slot = mx.arange(S)
    w = slot[None, :] - L[:, None]  # (B, S): the slot's index in the window
    in_cache, in_window, wc = w < 0, (w >= 0) & (w < T), mx.clip(w, 0, T - 1)
    seen = mx.take_along_axis(mx.broadcast_to(win, (B, T, T)), mx.broadcast_to(wc[:, None, :], (B, T, S)), axis=2)
    mask = in_cache[:, None, :] | (in_window[:, None, :] & seen)
    key_pos = mx.where(in_cache, off[:, None] + slot[None, :], mx.take_along_axis(pos, wc, axis=1))
    return pos, mask & (pos[:, :, None] - key_pos[:, None, :] < context)
