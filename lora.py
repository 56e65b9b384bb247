"""R-ISD (docs/method.md section 4): gated LoRA adapters that turn a frozen AR model into a lossless drafter.

    y = W x + s * B(gate * A x),   gate = 1 at MASK input positions, 0 everywhere else, s = lora_alpha / rank

Every clean position (prompt, pending token, drafts) runs the base weights only, and in ISD clean
positions never attend to MASKs, so p is exactly the base model's distribution and ISD's output is
exactly the base model's; the adapter only shapes the masks' proposals q, i.e. the speed. It is
trained with the introspective loss (its clean term has no trainable parameters then) or by
self-distillation (distill.py). Since the gate is 0 everywhere else, the update is computed only at
the MASK rows of a forward, and not at all in a forward without MASK (AR decoding costs nothing extra).

The adapter is a module of its own, attached as `model.lora` and applied by forward hooks: model.py
is unchanged and a model without an adapter runs exactly as before. Only the adapter is saved
(adapter.safetensors + adapter.json, which names the base model).
"""
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

import checkpoint
import pretrained
import tokenizer as tok
from checkpoint import TARGETS, LoraConfig  # noqa: F401 (adapter.json's fields; lora.TARGETS)
from model import Model, save_module

class GatedLoRA(nn.Module):
    """A (rank x in) and B (out x rank) for every target projection of `model`. B starts at zero
    (the adapter changes nothing until trained); A like nn.Linear's default init."""

    def __init__(self, model, cfg: LoraConfig):
        super().__init__()
        self.cfg, self.scale, self.mask_id = cfg, cfg.lora_alpha / cfg.rank, model.cfg.mask_token_id
        self.A, self.B = nn.ParameterDict(), nn.ParameterDict()
        for name, m in model.named_modules():
            if name.rsplit(".", 1)[-1] in cfg.targets:
                key = name.replace(".", "_")  # ParameterDict keys cannot hold dots
                self.A[key] = nn.Parameter(torch.empty(cfg.rank, m.in_features).uniform_(-1, 1) / math.sqrt(m.in_features))
                self.B[key] = nn.Parameter(torch.zeros(m.out_features, cfg.rank))
        self.rows = None

    def set_gate(self, model, args, kwargs):
        """Forward pre-hook of the model: the flat indices of this forward's MASK tokens, or None if none."""
        idx = args[0] if args else kwargs["idx"]
        rows = (idx.flatten() == self.mask_id).nonzero()[:, 0]
        self.rows = rows if len(rows) else None

    def adapt(self, key, module, inputs, out):
        """Forward hook of a target projection: out + s * B(A x), computed at the MASK positions only."""
        if self.rows is None:
            return out
        x = inputs[0].flatten(0, -2).index_select(0, self.rows)
        delta = F.linear(F.linear(x, self.A[key]), self.B[key])
        return out.flatten(0, -2).index_add(0, self.rows, delta.to(out.dtype), alpha=self.scale).view_as(out)


def add_adapter(model, cfg: LoraConfig, state=None):
    """Freeze `model` and attach a gated LoRA adapter to it as model.lora (weights from `state`)."""
    for p in model.parameters():
        p.requires_grad_(False)
    w = model.embed_tokens.weight
    lora = GatedLoRA(model, cfg).to(w.device, w.dtype)
    if state is not None:
        lora.load_state_dict(state)
    targets = [(n.replace(".", "_"), m) for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in cfg.targets]
    model.lora = lora  # a submodule: .to(), DDP and the optimizer see its parameters
    model.register_forward_pre_hook(lora.set_gate, with_kwargs=True)
    for key, m in targets:
        m.register_forward_hook(lambda mod, inp, out, key=key: lora.adapt(key, mod, inp, out))
    return model


def save_adapter(lora, out_dir):
    """Write adapter.safetensors + adapter.json into out_dir."""
    save_module(lora, lora.cfg, out_dir, "adapter.safetensors", "adapter.json")


def load_adapter(out_dir):
    """(LoraConfig, state dict) of the adapter in out_dir."""
    return checkpoint.adapter_config(out_dir), load_file(os.path.join(out_dir, "adapter.safetensors"))


def load_model(source, device="cpu"):
    """(Model in eval mode, tokenizer) from a pretrained name ("smollm2"), a checkpoint folder of
    train.py, or a folder with a gated LoRA adapter (adapter.json: its base model + the adapter)."""
    if source == pretrained.NAME:
        return pretrained.load_smollm2(device)
    if checkpoint.has_adapter(source):
        lcfg, state = load_adapter(source)
        model, enc = load_model(checkpoint.base_of(source, lcfg.base), device)
        return add_adapter(model, lcfg, state).eval(), enc
    checkpoint.check_decodable(source)
    return Model.load(source, device=device).eval(), tok.load(source)
