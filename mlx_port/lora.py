"""R-ISD (docs/method.md section 4) in MLX: lora.py's gated LoRA adapters, framework for framework.

    y = W x + s * B(gate * A x),   gate = 1 at MASK input positions, 0 everywhere else, s = lora_alpha / rank

Every clean position (prompt, pending token, drafts) runs the base weights only, and in ISD clean
positions never attend to MASKs, so p is exactly the base model's distribution and ISD's output is
exactly the base model's; the adapter only shapes the masks' proposals q, i.e. the speed. It is
trained by self-distillation (mlx_port/distill.py; train.py --lora, the introspective loss on a
pretrained model, is PyTorch only). Since the gate is 0 everywhere else, the update is computed only at the MASK rows of
a forward, and not at all in a forward without MASK (AR decoding costs nothing extra).

MLX has no forward hooks, so the two hooks of lora.py are two small subclasses that add_adapter swaps
in: the embedding (Model.__call__ embeds its ids first, as the model's pre-hook sees them) sets the
gate, and each target nn.Linear adds the update (the projection's forward hook). Parameter names stay
those of model.py, the adapter is `model.lora` as in PyTorch, and the files are the same
(adapter.safetensors with lora.py's tensor names + adapter.json, which names the base model), so an
adapter moves between the frameworks either way.
"""
import json
import math
import os
from dataclasses import asdict
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

import checkpoint
import tokenizer as tok
from checkpoint import TARGETS, LoraConfig  # noqa: F401 (adapter.json's fields; mlx_port.lora.TARGETS)
from mlx_port.model import Model, pick_device


class GatedLoRA(nn.Module):
    """A (rank x in) and B (out x rank) for every target projection of `model`. B starts at zero
    (the adapter changes nothing until trained); A like nn.Linear's default init (in PyTorch)."""

    def __init__(self, model, cfg: LoraConfig):
        super().__init__()
        self.cfg, self.scale, self.mask_id = cfg, cfg.lora_alpha / cfg.rank, model.cfg.mask_token_id
        self.A, self.B = {}, {}
        for name, m in model.named_modules():
            if name.rsplit(".", 1)[-1] in cfg.targets:
                key = name.replace(".", "_")  # lora.py's names (its ParameterDict keys cannot hold dots)
                n_out, n_in = m.weight.shape
                self.A[key] = mx.random.uniform(-1, 1, (cfg.rank, n_in)) / math.sqrt(n_in)
                self.B[key] = mx.zeros((n_out, cfg.rank))
        self.rows = None  # a numpy array, not an mx.array: MLX would take that for a parameter

    def set_gate(self, idx):
        """At the start of every forward (GatedEmbedding): where this forward's MASK tokens are (flat
        indices into its B*T positions), or None when it has none (then the adapter costs nothing).
        Found on the host: the number of MASKs sets the shapes, which MLX needs before it computes."""
        rows = np.flatnonzero(np.array(idx).reshape(-1) == self.mask_id)
        self.rows = rows if len(rows) else None

    def adapt(self, key, x, out):
        """After a target projection (GatedLinear): out + s * B(A x), at the MASK positions only (the
        gate is 0 everywhere else, so nothing is computed there)."""
        if self.rows is None:
            return out
        rows = mx.array(self.rows)
        x = x.reshape(-1, x.shape[-1])[rows]
        delta = (x @ self.A[key].T) @ self.B[key].T
        flat = out.reshape(-1, out.shape[-1])
        return flat.at[rows].add(delta.astype(out.dtype) * self.scale).reshape(out.shape)


class GatedEmbedding(nn.Embedding):
    """model.embed_tokens that first tells the adapter where the forward's MASKs are (lora.py's
    forward pre-hook): Model.__call__ embeds its ids before anything else. Same weight, same name."""

    def __init__(self, embedding, set_gate):
        nn.Module.__init__(self)
        self.weight = embedding.weight
        self.set_gate = set_gate  # a bound method: a plain attribute, not a child module

    def __call__(self, idx):
        self.set_gate(idx)
        return super().__call__(idx)


class GatedLinear(nn.Linear):
    """A target projection with the adapter's update after it (lora.py's forward hook). Same
    weight, same name; `adapt` is GatedLoRA.adapt bound to this projection's key, a plain
    attribute, so A and B live once, in model.lora."""

    def __init__(self, linear, adapt):
        nn.Module.__init__(self)
        for k, v in linear.items():  # weight (and bias, if any)
            setattr(self, k, v)
        self.adapt = adapt

    def __call__(self, x):
        return self.adapt(x, super().__call__(x))


def add_adapter(model, cfg: LoraConfig, state=None):
    """Freeze `model` and attach a gated LoRA adapter to it as model.lora (weights from `state`)."""
    dtype = model.embed_tokens.weight.dtype
    lora = GatedLoRA(model, cfg)
    lora.update(tree_map(lambda p: p.astype(dtype), lora.parameters()))
    if state is not None:  # strict: lora.py's names and shapes; cast like load_state_dict
        lora.load_weights([(k, v.astype(dtype)) for k, v in state.items()])
    targets = [(n, GatedLinear(m, partial(lora.adapt, n.replace(".", "_"))))
               for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in cfg.targets]
    gate = GatedEmbedding(model.embed_tokens, lora.set_gate)
    model.update_modules(tree_unflatten(targets + [("embed_tokens", gate)]))
    model.freeze()
    model.lora = lora  # a child module, attached after the freeze: its parameters are the trainable ones
    return model


def save_adapter(lora, out_dir):
    """Write adapter.safetensors + adapter.json into out_dir (plain writes, as Model.save)."""
    os.makedirs(out_dir, exist_ok=True)
    mx.save_safetensors(os.path.join(out_dir, "adapter.safetensors"), dict(tree_flatten(lora.parameters())))
    Path(out_dir, "adapter.json").write_text(json.dumps(asdict(lora.cfg), indent=2) + "\n")


def load_adapter(out_dir):
    """(LoraConfig, state dict) of the adapter in out_dir."""
    return checkpoint.adapter_config(out_dir), mx.load(os.path.join(out_dir, "adapter.safetensors"))


def load_model(source, device=None):
    """(Model in eval mode, tokenizer) from a pretrained name ("smollm2", converted once by PyTorch), a
    checkpoint folder of train.py or mlx_port.train, or a folder with a gated LoRA adapter
    (adapter.json: its base model + the adapter). `device`: auto (MLX's default), cpu or gpu."""
    mx.set_default_device(pick_device(device))
    if source == checkpoint.PRETRAINED:  # converted by PyTorch once (the GGUF file is read with torch)
        folder = checkpoint.converted_pretrained()
        return Model.load(folder).eval(), tok.load(folder)
    if checkpoint.has_adapter(source):
        lcfg, state = load_adapter(source)
        model, enc = load_model(checkpoint.base_of(source, lcfg.base), device)
        return add_adapter(model, lcfg, state).eval(), enc
    checkpoint.check_decodable(source)
    return Model.load(source).eval(), tok.load(source)
