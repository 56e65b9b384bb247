"""The checkpoint format, in no framework (PyTorch and mlx_port/ read and write it alike): a model's config
(ModelConfig, config.json), the folder of the self-distilled adapter that `python train.py` leaves in
`out/distilled/`, train.py's options (train_state.json), and `staged`, the one way to write a checkpoint folder
(an interrupted save never leaves a mix): Model.save, lora.save_adapter and tokenizer.save are plain writes into
the folder it yields. Loading a model with its adapter is lora.load_model (MLX: mlx_port.lora.load_model).

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
DIFFUSION = ("dlm", "bdlm")  # the masked-diffusion baselines' objectives (dlm.py), which ISD cannot decode
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
    """The folder to decode with for `source`: its self-distilled adapter (source/distilled) when there is one,
    else source itself. Both give the same tokens (the adapter is lossless); the adapter, more tokens per forward."""
    folder = os.path.join(source, DISTILLED)
    return folder if has_adapter(folder) else source


def has_adapter(out_dir):
    """Whether out_dir holds a gated LoRA adapter (adapter.json) rather than a model."""
    return os.path.isfile(os.path.join(out_dir, "adapter.json"))


TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoraConfig:
    """A gated LoRA adapter's config, adapter.json."""
    rank: int = 8
    lora_alpha: float = 16.0  # the scale s is lora_alpha / rank (not train.py's --alpha, the clean loss's weight)
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
    return base_of(out_dir, adapter_config(out_dir).base)


def pretrained_dir(cache_dir=None):
    """Where SmolLM2-135M-Instruct lives, converted into this project's format (by pretrained.py, in torch)."""
    return os.path.join(cache_dir or CACHE_DIR, "smollm2-135m-instruct-q4_1-v2")


def converted_pretrained():
    """pretrained_dir() once the conversion is there; else a ValueError saying what to run (the MLX side
    and the trainers' --init_from read it but cannot convert it)."""
    folder = pretrained_dir()
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise ValueError(f"{PRETRAINED} is not converted yet ({folder} has no config.json): convert it once with "
                         f"PyTorch, python sample.py --init_from={PRETRAINED}")
    return folder


def objective(out_dir):
    """The objective train.py trained the checkpoint in out_dir with (idlm for one it did not train)."""
    return training_config(out_dir).get("objective", "idlm")


def check_decodable(source):
    """Refuse a checkpoint folder that ISD (and AR decoding) cannot read: a masked-diffusion LM has no clean
    causal stream."""
    if objective(source) in DIFFUSION:
        raise ValueError(f"{source} holds a masked-diffusion LM (objective={objective(source)}), which ISD cannot decode: "
                         f"decode it with python sample.py --out_dir={source}")


def training_config(out_dir):
    """train.py's options for the checkpoint in out_dir ({} if it has no train_state.json)."""
    path = os.path.join(out_dir, "train_state.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)["config"]


# ----------------------------------------------------------------------------------------------
# Writing a checkpoint folder: each file is written under a temporary name and os.replace'd into place, so
# a reader (or a crash) sees every file whole, the old one or the new one.

KINDS = (("model.safetensors", "config.json"), ("adapter.safetensors", "adapter.json"))  # a model, or an adapter
# the order of the replaces: the tokenizer's files, each kind's config before its tensors, and train.py's
# optimizer.safetensors (all that --resume reads) before train_state.json, its readable copy
FILES = tok.FILES + KINDS[0][::-1] + KINDS[1][::-1] + ("optimizer.safetensors", "train_state.json")


@contextlib.contextmanager
def staged(out_dir, new_run=False):
    """Files written into the yielded folder (a temporary one in out_dir) replace out_dir's one by one, in
    FILES order. Never a mix: a save that changes a kind's config removes that kind's tensors first, and the
    files of the other kind (a model vs an adapter) go, so loading never picks up a stale adapter. new_run
    (train.py --overwrite): the checkpoint replaces another run's, whose files, and distilled/ adapter, go
    first. The rest of out_dir stays, such as distill.py's out_dir/distilled/."""
    os.makedirs(out_dir, exist_ok=True)
    stage = tempfile.mkdtemp(prefix=".saving-", dir=out_dir)
    try:
        yield stage
        names = sorted(os.listdir(stage), key=FILES.index)
        old = [n for n in FILES if os.path.isfile(os.path.join(out_dir, n)) and (new_run or n not in names)]
        for tensors, config in KINDS:
            if config in names and not same_file(os.path.join(stage, config), os.path.join(out_dir, config)):
                old.append(tensors)
        if new_run:
            shutil.rmtree(os.path.join(out_dir, DISTILLED), ignore_errors=True)
        for n in old:
            if os.path.isfile(os.path.join(out_dir, n)):
                os.remove(os.path.join(out_dir, n))
        for n in names:
            os.replace(os.path.join(stage, n), os.path.join(out_dir, n))
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def same_file(a, b):
    """Whether files a and b exist with the same bytes."""
    return os.path.isfile(b) and open(a, "rb").read() == open(b, "rb").read()
