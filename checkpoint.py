"""The checkpoint format, in no framework (PyTorch's files and mlx_port/ read and write it alike): a
model's config (ModelConfig, config.json), the folder of the self-distilled adapter that `python
train.py` leaves in `out/distilled/`, train.py's options (train_state.json), and the one way to write
a checkpoint folder (`staged`, used by train.py, distill.py and their MLX twins) so that an interrupted
save never leaves a mix. Model.save, lora.save_adapter and tokenizer.save are plain writes into the
folder that `staged` yields. Loading a model with its adapter is lora.load_model (PyTorch) and
mlx_port.lora.load_model (MLX).

    model, enc = lora.load_model(checkpoint.distilled_or_base("out"))
"""
import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, fields

import tokenizer as tok
from tokenizer import CACHE_DIR  # $IDLM_CACHE, default ~/.cache/idlm

DISTILLED = "distilled"  # the self-distilled adapter's folder inside its base checkpoint's folder
PRETRAINED = "smollm2"  # the pretrained model a name gives (--init_from=smollm2; pretrained.py converts it)


@dataclass
class ModelConfig:
    vocab_size: int = 2049  # tokenizer ids + 1 (MASK)
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 2  # grouped-query attention: n_head // n_kv_head query heads share a K/V head
    d_model: int = 128  # the defaults are the cpu preset's shape (train.py)
    d_ff: int = 384
    max_seq_len: int = 128
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    mask_token_id: int = 2048  # the last id; sampling never emits it

    def __post_init__(self):
        if self.d_model % self.n_head or self.n_head % self.n_kv_head:
            raise ValueError(f"d_model ({self.d_model}) must divide by n_head ({self.n_head}) "
                             f"and n_head by n_kv_head ({self.n_kv_head})")
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(f"mask_token_id {self.mask_token_id} outside vocab_size {self.vocab_size}")

    @property
    def head_dim(self):
        return self.d_model // self.n_head


def load_config(out_dir):
    path = os.path.join(out_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint in {out_dir} (config.json missing): run python train.py first")
    with open(path) as f:
        d = json.load(f)
    known = {f.name for f in fields(ModelConfig)}
    if set(d) != known:
        raise ValueError(f"{path} does not match this ModelConfig: unknown {sorted(set(d) - known)}, "
                         f"missing {sorted(known - set(d))}")
    return ModelConfig(**d)


def distilled_or_base(source):
    """The folder to decode with for `source`: its self-distilled adapter (source/distilled, written
    by distill.py and by the default train.py run) when there is one, else source itself. Both give
    the same tokens (the adapter is lossless); the adapter gives more tokens per forward."""
    folder = os.path.join(source, DISTILLED)
    return folder if has_adapter(folder) else source


def has_adapter(out_dir):
    """Whether out_dir holds a gated LoRA adapter (adapter.json: lora.py, mlx_port/lora.py) rather than a model."""
    return os.path.isfile(os.path.join(out_dir, "adapter.json"))


TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoraConfig:
    """A gated LoRA adapter's config, adapter.json (lora.py and mlx_port/lora.py build the adapter)."""
    rank: int = 8
    alpha: float = 16.0  # the scale s is alpha / rank
    base: str = "smollm2"  # the frozen model: a pretrained name, or a checkpoint folder (relative: to the adapter's)
    targets: tuple = TARGETS

    def __post_init__(self):
        self.targets = tuple(self.targets)
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if not set(self.targets) <= set(TARGETS):
            raise ValueError(f"LoRA targets must be among {TARGETS}, got {self.targets}")


def adapter_config(out_dir):
    """The LoraConfig of the adapter in out_dir (its adapter.json)."""
    path = os.path.join(out_dir, "adapter.json")
    with open(path) as f:
        d = json.load(f)
    known = {f.name for f in fields(LoraConfig)}
    if not set(d) <= known:
        raise ValueError(f"{path}: unknown keys {sorted(set(d) - known)}")
    return LoraConfig(**d)


def base_of(out_dir, base):
    """The base model of the adapter in out_dir whose adapter.json says `base`: a pretrained name, an
    absolute folder, or a folder relative to out_dir (distill.py writes out/distilled/ with base "..")."""
    if base == PRETRAINED or os.path.isabs(base):
        return base
    return os.path.normpath(os.path.join(out_dir, base))


def adapter_base(out_dir):
    """The base model of the adapter in out_dir, as its adapter.json names it (see base_of)."""
    with open(os.path.join(out_dir, "adapter.json")) as f:
        return base_of(out_dir, json.load(f)["base"])


def pretrained_dir(cache_dir=None):
    """Where SmolLM2-135M-Instruct, converted into this project's checkpoint format, lives (pretrained.py
    converts it there on first use, with PyTorch: the GGUF file is read with torch)."""
    return os.path.join(cache_dir or CACHE_DIR, "smollm2-135m-instruct-q4_1")


def converted_pretrained():
    """pretrained_dir() once the conversion is there; else a ValueError saying what to run (the MLX side
    and the trainers' --init_from read it but cannot convert it)."""
    folder = pretrained_dir()
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise ValueError(f"{PRETRAINED} is not converted yet ({folder} has no config.json): convert it once with "
                         f"PyTorch, python sample.py --init_from={PRETRAINED}")
    return folder


def check_decodable(source):
    """Refuse a checkpoint folder that ISD (and AR decoding) cannot read: a masked-diffusion LM has no clean
    causal stream."""
    objective = training_config(source).get("objective", "idlm")
    if objective not in ("idlm", "ar"):
        raise ValueError(f"{source} holds a masked-diffusion LM (objective={objective}), which ISD cannot decode: "
                         f"use python dlm.py --out_dir={source}")


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
# tok.FILES: tiktoken.json, and Hugging Face's tokenizer.json and tokenizer_config.json
FILES = KINDS[0] + KINDS[1] + tok.FILES + ("optimizer.safetensors", "train_state.json")


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


def add_tokenizer_files(out_dir):
    """Give a checkpoint saved before tiktoken.json existed (its tokenizer.json held that content) the
    tokenizer files of today, Hugging Face's among them, in one staged save: the other files are
    hard-linked, unchanged. (Writing them beside the links would leave a folder that staged's next save,
    through adopt_plain_files, turns into one without its other files.)"""
    enc = tok.load(out_dir)
    config = os.path.join(out_dir, "config.json")
    context = load_config(out_dir).max_seq_len if os.path.isfile(config) else None
    with staged(out_dir) as stage:
        for n in FILES:
            path = os.path.join(out_dir, n)
            if n not in tok.FILES and os.path.isfile(path):
                os.link(os.path.realpath(path), os.path.join(stage, n))
        tok.save(enc, stage, context=context)

