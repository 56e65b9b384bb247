"""Introspective Strided Decoding with the MLX model: isd.py's batched core, an MLX forward.

    python -m mlx_port.isd --out_dir=out --prompt="ROMEO:" --stride=4 --max_new_tokens=200 --temperature=0.8 --seed=1

There is one ISD: `isd.decode` / `isd.isd_step` (verify, rollback, per-request random streams) run
here unchanged. They work in torch on the CPU; `TorchView` puts the MLX model behind that interface,
converting ids in and logits out through numpy, and shows the MLX KV cache's lengths as torch.
Options are isd.py's; --device is auto (MLX's default device: the GPU on a Mac), cpu or gpu. Gated
LoRA adapters are PyTorch only, so the MLX port decodes the base checkpoint (never out_dir/distilled:
--base changes nothing here; the tokens are the same, fewer per forward).
"""
import mlx.core as mx
import numpy as np
import torch

import isd
import checkpoint
import lora
import pretrained
import tokenizer as tok
from mlx_port.model import Model, pick_device


class CacheView:
    """isd.py's view of an MLX KVCache: `lengths` as a torch tensor, `truncate` passed on."""

    def __init__(self, cache):
        self.cache = cache

    @property
    def lengths(self):
        return torch.from_numpy(np.array(self.cache.lengths))

    @property
    def max_len(self):
        return self.cache.max_len

    def truncate(self, lengths, rows=None):
        self.cache.truncate(lengths, None if rows is None else np.asarray(rows))


class TorchView:
    """The MLX model as isd.py's core calls it: torch ids (and cache rows) in, torch logits out."""

    def __init__(self, model):
        self.model, self.cfg = model, model.cfg

    def new_cache(self, batch_size, max_len=None):
        return CacheView(self.model.new_cache(batch_size, max_len))

    def __call__(self, idx, pos=None, mask=None, cache=None, rows=None, hidden_only=False):
        as_mx = lambda t: None if t is None else mx.array(t.numpy())  # noqa: E731
        return as_torch(self.model(mx.array(idx.numpy()), pos=as_mx(pos), mask=as_mx(mask), hidden_only=hidden_only,
                                   cache=None if cache is None else cache.cache,
                                   rows=None if rows is None else np.asarray(rows)))

    def head(self, x):
        return as_torch(self.model.head(mx.array(x.numpy())))


def as_torch(x):
    if x.dtype not in (mx.float64, mx.float32):
        x = x.astype(mx.float32)  # numpy has no bfloat16
    return torch.from_numpy(np.array(x))


def isd_generate(model, *args, **kw):
    """ISD for one prompt with an MLX model: isd.isd_generate's arguments and results."""
    return isd.isd_generate(TorchView(model), *args, **kw)


def ar_generate(model, *args, **kw):
    """The AR baseline with an MLX model: isd.ar_generate's arguments and results."""
    return isd.ar_generate(TorchView(model), *args, **kw)


def load_model(source, device=None):
    """(The MLX model of a checkpoint folder (written by train.py or mlx_port.train) or of a pretrained
    name (smollm2), seen as torch, its tokenizer). Gated LoRA adapters (R-ISD) are PyTorch only."""
    mx.set_default_device(pick_device(device))
    folder = pretrained.smollm2_dir() if source == pretrained.NAME else source
    if checkpoint.has_adapter(folder):
        raise ValueError(f"{folder} holds a gated LoRA adapter, which the MLX port does not run: "
                         f"decode it with python isd.py --out_dir={folder}")
    return TorchView(Model.load(folder)), tok.load(folder)


if __name__ == "__main__":
    isd.main(load_model=load_model, doc=__doc__)
