"""Load what a decoder runs: a checkpoint folder of train.py, a gated LoRA adapter over its base, a
pretrained model by name (smollm2), and the self-distilled adapter that `python train.py` leaves in
`out/distilled/`; and write a checkpoint folder, the one way (`staged`, used by train.py,
mlx_port/train.py and distill.py) so that an interrupted save never leaves a mix. Model.save,
lora.save_adapter and tokenizer.save are plain writes into the folder that `staged` yields. (The
SmolLM2 conversion cache, written once, appears whole by a rename of its own in pretrained.py, which
cannot use `staged`: this module imports it.)

    model, enc = checkpoint.load_model(checkpoint.distilled_or_base("out"))
"""
import contextlib
import json
import os
import shutil
import tempfile

import lora
import pretrained
import tokenizer as tok
from model import Model

DISTILLED = "distilled"  # the self-distilled adapter's folder inside its base checkpoint's folder


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
    folder = os.path.join(source, DISTILLED)
    return folder if source != pretrained.NAME and lora.has_adapter(folder) else source


def training_config(out_dir):
    """train.py's options for the checkpoint in out_dir ({} if it has no train_state.json)."""
    path = os.path.join(out_dir, "train_state.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)["config"]


# ----------------------------------------------------------------------------------------------
# Writing a checkpoint folder: train.py's and mlx_port/train.py's out_dir, and distill.py's
# out_dir/distilled/. out_dir/<file> is a relative link to .checkpoint/<file>, and out_dir/.checkpoint
# a relative link to the hidden folder out_dir/.checkpoint-<random> that holds the files: a save writes
# a new folder and switches .checkpoint to it with one rename, so readers see the old checkpoint whole
# or the new one whole. The folder can be moved, or copied with its links kept or followed.

CURRENT = ".checkpoint"
KINDS = (("model.safetensors", "config.json"), ("adapter.safetensors", "adapter.json"))  # a model, or an adapter
FILES = KINDS[0] + KINDS[1] + ("tokenizer.json", "optimizer.safetensors", "train_state.json")


def relink(out_dir, name, target):
    """Make out_dir/name a link to `target` in one rename (nothing to do if it already is)."""
    path = os.path.join(out_dir, name)
    if os.path.islink(path) and os.readlink(path) == target:
        return
    tmp = os.path.join(out_dir, f".{name}.link")
    if os.path.lexists(tmp):
        os.remove(tmp)
    os.symlink(target, tmp)
    os.replace(tmp, path)


def adopt_plain_files(out_dir):
    """A checkpoint of plain files (an older train.py's, or a copy that followed the links, as
    shutil.copytree does by default: its .checkpoint is a folder): hard-link them into a folder of
    their own and link their names through .checkpoint. Nothing a reader sees changes at any point."""
    paths = {n: os.path.join(out_dir, n) for n in FILES}
    plain = [n for n, p in paths.items() if os.path.isfile(p) and not os.path.islink(p)]
    if plain:
        folder = tempfile.mkdtemp(prefix=CURRENT + "-", dir=out_dir)
        for n in plain:
            os.link(os.path.join(out_dir, n), os.path.join(folder, n))
        current = os.path.join(out_dir, CURRENT)
        copied = os.path.isdir(current) and not os.path.islink(current)
        if copied and not any(os.path.islink(p) for p in paths.values()):  # hidden, goes with the old folders
            os.replace(current, os.path.join(tempfile.mkdtemp(prefix=CURRENT + "-", dir=out_dir), CURRENT))
        relink(out_dir, CURRENT, os.path.basename(folder))
        for n in plain:
            relink(out_dir, n, os.path.join(CURRENT, n))


@contextlib.contextmanager
def staged(out_dir, new_run=False):
    """Files written into the yielded folder become out_dir's checkpoint together, in one rename (the
    switch of out_dir/.checkpoint): an interrupted save leaves the last good checkpoint whole. Used by
    train.py and mlx_port/train.py (a model or an adapter, its tokenizer, optimizer and train state)
    and by distill.save (the adapter alone, in out_dir/distilled/). The files of the other kind (a
    full model vs an adapter) go, so loading never picks up a stale adapter; the rest of out_dir
    stays, such as distill.py's out_dir/distilled/, unless new_run: the checkpoint replaces another
    run's (train.py --overwrite), and that run's distilled adapter goes with it."""
    os.makedirs(out_dir, exist_ok=True)
    adopt_plain_files(out_dir)
    stage = tempfile.mkdtemp(prefix=CURRENT + "-", dir=out_dir)
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    names = os.listdir(stage)
    for n in names:  # links of a new kind dangle (the reader sees no such file) until the switch
        relink(out_dir, n, os.path.join(CURRENT, n))
    distilled = os.path.join(out_dir, DISTILLED)
    if new_run and os.path.isdir(distilled):  # hidden first: gone with the old folders below
        os.replace(distilled, os.path.join(tempfile.mkdtemp(prefix=CURRENT + "-", dir=out_dir), DISTILLED))
    relink(out_dir, CURRENT, os.path.basename(stage))  # the switch
    for n in FILES:
        if n not in names and os.path.lexists(os.path.join(out_dir, n)):
            os.remove(os.path.join(out_dir, n))
    for n in os.listdir(out_dir):
        if n.startswith(CURRENT + "-") and n != os.path.basename(stage):
            shutil.rmtree(os.path.join(out_dir, n), ignore_errors=True)
