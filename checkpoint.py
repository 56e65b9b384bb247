"""Load what a decoder runs: a checkpoint folder of train.py, a gated LoRA adapter over its base, a
pretrained model by name (smollm2), and the self-distilled adapter that `python train.py` leaves in
`out/distilled/`.

    model, enc = checkpoint.load_model(checkpoint.distilled_or_base("out"))
"""
import json
import os

import lora
import pretrained
import tokenizer as tok
from model import Model


def load_model(source, device="cpu"):
    """(Model in eval mode, tokenizer) from a pretrained name ("smollm2"), a checkpoint folder of
    train.py, or a folder with a gated LoRA adapter (adapter.json: its base model + the adapter)."""
    if source == pretrained.NAME:
        return pretrained.load_smollm2(device)
    if lora.has_adapter(source):
        lcfg, state = lora.load_adapter(source)
        model, enc = load_model(lora.base_of(source, lcfg), device)
        return lora.add_adapter(model, lcfg, state).eval(), enc
    objective = training_config(source).get("objective", "idlm")
    if objective not in ("idlm", "ar"):  # no clean causal stream: ISD (and AR decoding) would read nonsense
        raise ValueError(f"{source} holds a masked-diffusion LM (objective={objective}), which ISD cannot decode: "
                         f"use python dlm.py --out_dir={source}")
    return Model.load(source, device=device).eval(), tok.load(source)


def distilled_or_base(source):
    """The folder to decode with for `source`: its self-distilled adapter (source/distilled, written
    by distill.py and by the default train.py run) when there is one, else source itself. Both give
    the same tokens (the adapter is lossless); the adapter gives more tokens per forward."""
    folder = os.path.join(source, "distilled")
    return folder if source != pretrained.NAME and lora.has_adapter(folder) else source


def training_config(out_dir):
    """train.py's options for the checkpoint in out_dir ({} if it has no train_state.json)."""
    path = os.path.join(out_dir, "train_state.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)["config"]
