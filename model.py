"""The I-DLM model: a Llama/Qwen-style decoder with a MASK token, plus the introspective loss.

The network itself is an ordinary causal LM (RMSNorm, RoPE, SwiGLU, grouped-query attention,
tied embeddings). What makes it an Introspective Diffusion LM (arXiv 2604.11035, docs/method.md section 1):
  - one extra token id, MASK, that the tokenizer never produces;
  - training on the concatenation [xt | x0] (xt = x0 with the labelled tokens replaced by MASK),
    with explicit position ids shared by both halves and the block attention mask of `idlm_mask`;
  - a KV cache whose rows can be truncated (ISD rolls back rejected drafts and MASK slots).
"""
import json
import math
import os
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from checkpoint import ModelConfig, load_config


# ----------------------------------------------------------------------------------------------
# The I-DLM idea (docs/method.md section 1): the training mask over [xt | x0] and the introspective
# loss. Everything after this section is an ordinary Llama-style decoder with a rollback KV cache.

def idlm_mask(L, b, device=None):
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
    i = torch.arange(L, device=device)
    blk = i // b
    causal = i[None, :] <= i[:, None]
    xt_xt = causal & (blk[None, :] == blk[:, None])
    xt_x0 = blk[None, :] < blk[:, None]
    top = torch.cat([xt_xt, xt_x0], dim=1)
    bottom = torch.cat([torch.zeros_like(causal), causal], dim=1)
    return torch.cat([top, bottom], dim=0)


def _shifted_ce(logits, labels):
    """Summed cross-entropy of position i against labels[i+1] (-100 = no target)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                           ignore_index=-100, reduction="sum")


def idlm_logits(model, x0, labels=None, stride=4):
    """Logits (xt half, x0 half), each (B, L, V), of the introspective forward: xt = x0 with every labelled
    token (labels != -100; default all) replaced by MASK; the input [xt | x0] uses positions 0..L-1 twice
    and `idlm_mask` with b = stride - 1 masks per block."""
    if stride < 2:
        raise ValueError("the introspective loss needs stride >= 2 (stride 1 is plain AR)")
    labels = x0 if labels is None else labels
    L = x0.shape[1]
    mask_id = getattr(model, "module", model).cfg.mask_token_id  # model may be wrapped in DDP
    xt = torch.where(labels != -100, torch.full_like(x0, mask_id), x0)
    pos = torch.arange(L, device=x0.device).repeat(2)
    logits = model(torch.cat([xt, x0], dim=1), pos=pos, mask=idlm_mask(L, stride - 1, x0.device))
    return logits[:, :L], logits[:, L:]


def idlm_loss(model, x0, labels=None, stride=4, alpha=0.2):
    """Introspective loss `task + alpha * clean` on clean rows x0 (B, L); returns (loss, task, clean).

    `labels` (default x0) marks where loss is wanted (-100 elsewhere). The mask at offset m of block B
    learns token B*b+m+1, 2..N ahead of the block's clean prefix (tokens < B*b); the clean half is the
    ordinary AR loss. Both terms are divided by the number of labelled (shifted) targets; alpha="auto"
    weights the clean term by (task/clean).detach(), so both terms carry equal weight."""
    labels = x0 if labels is None else labels
    xt_logits, x0_logits = idlm_logits(model, x0, labels, stride)
    n = (labels[:, 1:] != -100).sum().clamp(min=1)
    task = _shifted_ce(xt_logits, labels) / n
    clean = _shifted_ce(x0_logits, labels) / n
    weight = (task / clean).detach() if alpha == "auto" else alpha
    return task + weight * clean, task, clean


def ar_loss(model, x0, labels=None):
    """The plain autoregressive loss on x0 alone (objective=ar); equals idlm_loss's clean term."""
    labels = x0 if labels is None else labels
    n = (labels[:, 1:] != -100).sum().clamp(min=1)
    return _shifted_ce(model(x0), labels) / n


# ----------------------------------------------------------------------------------------------
# The network

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in at least float32 (as Llama does), keep float64 when testing in float64
        h = x.to(torch.promote_types(x.dtype, torch.float32))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_cos_sin(pos, head_dim, theta, dtype):
    """cos/sin (B, 1, T, head_dim) of rotary embeddings at explicit position ids `pos` (B, T)."""
    inv_freq = theta ** -(torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float64) / head_dim)
    ang = pos.to(torch.float64)[..., None] * inv_freq
    ang = torch.cat([ang, ang], dim=-1)[:, None]
    return ang.cos().to(dtype), ang.sin().to(dtype)


def apply_rope(x, cos, sin):
    """Rotate-half convention (Hugging Face Llama/Qwen): pairs are (i, i + head_dim/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class KVCache:
    """Preallocated keys/values for B rows, each row with its own length.

    `lengths[b]` tokens of row b are valid; slot s of row b holds the token at position
    `offsets[b] + s`. A forward appends its T new tokens at each row's own length; `truncate` moves
    a row's length back (ISD's rollback: rejected drafts and MASK slots are simply forgotten and
    later overwritten). When a row is full, `make_room` drops its oldest tokens, but only those
    that lie outside the model's context (`max_seq_len`) for every new query, so decoding can go on
    past the context without changing any distribution."""

    def __init__(self, cfg, batch_size, max_len=None, device="cpu", dtype=torch.float32):
        self.max_len = max_len or cfg.max_seq_len
        shape = (cfg.n_layer, batch_size, cfg.n_kv_head, self.max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.offsets = torch.zeros(batch_size, dtype=torch.long, device=device)

    def truncate(self, lengths, rows=None):
        """Roll rows (default all) back to `lengths` tokens, each <= the row's current length."""
        rows = slice(None) if rows is None else torch.as_tensor(rows, device=self.lengths.device)
        lengths = torch.as_tensor(lengths, dtype=torch.long, device=self.lengths.device)
        if (lengths > self.lengths[rows]).any() or (lengths < 0).any():
            raise ValueError(f"truncate to {lengths.tolist()} but rows hold {self.lengths[rows].tolist()}")
        self.lengths[rows] = lengths

    def layer(self, i, rows, S):
        """Layer i's cache in one forward: a function that writes the window's keys and values
        (B, n_kv_head, T, head_dim) at each of `rows`' lengths and returns the first S slots of those
        rows, cache and window together, for attention."""
        def write_and_read(k, v):
            at = self.lengths[rows][:, None] + torch.arange(k.shape[2], device=k.device)  # (B, T)
            self.k[i][rows[:, None], :, at] = k.transpose(1, 2)
            self.v[i][rows[:, None], :, at] = v.transpose(1, 2)
            return self.k[i][rows, :, :S], self.v[i][rows, :, :S]
        return write_and_read

    def reset(self, rows):
        """Empty rows for new sequences: no tokens, positions from 0 again."""
        rows = torch.as_tensor(rows, device=self.lengths.device)
        self.lengths[rows] = 0
        self.offsets[rows] = 0

    def make_room(self, rows, T, context):
        """Drop the oldest tokens of `rows` to fit T new ones: a query at position P sees keys at positions
        > P - context, so L - context + 1 of a row's L tokens can go; else raise (changing nothing)."""
        need = self.lengths[rows] + T - self.max_len
        if int(need.max()) <= 0:
            return
        spare = self.lengths[rows] - context + 1
        if bool((need > spare).any()):
            raise ValueError(f"KV cache overflow: {self.lengths[rows].tolist()} + {T} > {self.max_len} "
                             f"and the context ({context}) needs every cached token")
        for r, d in zip(torch.as_tensor(rows).tolist(), need.tolist()):
            if d > 0:  # shift the row left by d slots; positions stay with their tokens
                n = int(self.lengths[r]) - d
                self.k[:, r, :, :n] = self.k[:, r, :, d:d + n].clone()
                self.v[:, r, :, :n] = self.v[:, r, :, d:d + n].clone()
                self.lengths[r] -= d
                self.offsets[r] += d


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        hd = cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_head * hd, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * hd, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * hd, bias=False)
        self.o_proj = nn.Linear(cfg.n_head * hd, cfg.d_model, bias=False)

    def forward(self, x, cos, sin, mask, kv=None):
        """`kv`: this layer's cache for the forward (KVCache.layer), or None."""
        B, T, _ = x.shape
        hd, nh, nkv = self.cfg.head_dim, self.cfg.n_head, self.cfg.n_kv_head
        q = apply_rope(self.q_proj(x).view(B, T, nh, hd).transpose(1, 2), cos, sin)
        k = apply_rope(self.k_proj(x).view(B, T, nkv, hd).transpose(1, 2), cos, sin)
        v = self.v_proj(x).view(B, T, nkv, hd).transpose(1, 2)
        if kv is not None:
            k, v = kv(k, v)  # cache and window together
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=nkv != nh)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, nh * hd))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, kv=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv)
        return x + self.mlp(self.post_attention_layernorm(x))


class Model(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2 style scaled init of residual projections
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def forward(self, idx, pos=None, mask=None, cache=None, rows=None, hidden_only=False):
        """Logits (B, T, vocab) for token ids `idx` (B, T) (with hidden_only: the final hidden states,
        to which `head` gives logits; ISD takes logits only where it needs them).

        Without a cache: `pos` defaults to 0..T-1 and `mask` (True = may attend; (T, T) or
        (B, T, T)) to causal. With a cache, the T tokens form a *window* appended at each row's own
        length: `pos` ((T,) or (B, T), default 0..T-1) are positions relative to the row's next
        position and `mask` (default causal) says which window tokens each one sees; every window
        token also sees the row's whole cache, within the context (`max_seq_len`). The cache's lengths
        advance by T (truncate afterwards to keep fewer). `rows`: the cache rows of the B inputs."""
        B, T = idx.shape
        dev = idx.device
        if cache is not None:
            rows = torch.arange(B, device=dev) if rows is None else torch.as_tensor(rows, device=dev)
            if len(rows) != B:
                raise ValueError(f"{B} input rows but {len(rows)} cache rows")
            cache.make_room(rows, T, self.cfg.max_seq_len)
            pos, mask = window_positions_and_mask(cache, rows, T, self.cfg.max_seq_len, pos, mask)
        else:
            pos = torch.arange(T, device=dev) if pos is None else pos
            mask = torch.ones(T, T, dtype=torch.bool, device=dev).tril() if mask is None else mask
        pos = pos.expand(B, T) if pos.dim() == 1 else pos
        if mask.dim() == 3:
            mask = mask[:, None]  # broadcast over heads
        x = self.embed_tokens(idx)
        cos, sin = rope_cos_sin(pos, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        for i, block in enumerate(self.layers):
            x = block(x, cos, sin, mask, None if cache is None else cache.layer(i, rows, mask.shape[-1]))
        if cache is not None:
            cache.lengths[rows] += T
        x = self.norm(x)
        return x if hidden_only else self.head(x)

    def head(self, x):
        """Logits of final hidden states: the output layer is tied to the embedding."""
        return F.linear(x, self.embed_tokens.weight)

    def new_cache(self, batch_size, max_len=None):
        p = self.embed_tokens.weight
        return KVCache(self.cfg, batch_size, max_len, device=p.device, dtype=p.dtype)

    def save(self, out_dir):
        """Write model.safetensors + config.json into out_dir."""
        save_module(self, self.cfg, out_dir, "model.safetensors", "config.json")

    @classmethod
    def load(cls, out_dir, device="cpu"):
        cfg = load_config(out_dir)
        weights = os.path.join(out_dir, "model.safetensors")
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"{out_dir} has config.json but no model.safetensors")
        state = load_file(weights, device=str(device))
        model = cls(cfg).to(device=device, dtype=state["embed_tokens.weight"].dtype)
        model.load_state_dict(state)
        return model


def window_positions_and_mask(cache, rows, T, context, rel_pos=None, window_mask=None):
    """Absolute positions (B, T) and attention mask (B, T, S) of a T-token window appended to cache
    rows `rows`. Slot s of a row is its cached token s (s < L), window token s - L (s < L + T), or
    unused; S covers the longest row plus the window. A query sees keys within `context` positions."""
    dev = cache.lengths.device
    rel = torch.arange(T, device=dev) if rel_pos is None else torch.as_tensor(rel_pos, device=dev)
    win = torch.ones(T, T, dtype=torch.bool, device=dev).tril() if window_mask is None else window_mask
    B, L, off = len(rows), cache.lengths[rows], cache.offsets[rows]
    pos = (off + L)[:, None] + rel.expand(B, T)
    S = int(L.max()) + T
    slot = torch.arange(S, device=dev)
    w = slot[None, :] - L[:, None]  # (B, S): the slot's index in the window
    in_cache, in_window, wc = w < 0, (w >= 0) & (w < T), w.clamp(0, T - 1)
    seen = win.expand(B, T, T).gather(2, wc[:, None, :].expand(B, T, S))
    mask = in_cache[:, None, :] | (in_window[:, None, :] & seen)
    key_pos = torch.where(in_cache, off[:, None] + slot[None, :], pos.gather(1, wc))
    return pos, mask & (pos[:, :, None] - key_pos[:, None, :] < context)


def save_module(module, cfg, out_dir, weights_name, config_name):
    """Write a module's tensors (safetensors) and its config dataclass (JSON) into out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    save_file(tensors, os.path.join(out_dir, weights_name))
    Path(out_dir, config_name).write_text(json.dumps(asdict(cfg), indent=2) + "\n")
