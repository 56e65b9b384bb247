"""Self-distillation in MLX: distill.py, framework for framework (diff them).

    python -m mlx_port.distill --out_dir=out        # greedy + sampled rollouts, hard + soft targets -> out/distilled
    python -m mlx_port.distill --out_dir=out --rollouts=greedy --supervision=hard  # greedy only: the highest greedy TPF
    python -m mlx_port.distill --out_dir=out --rollouts=none --supervision=soft  # no rollouts: soft targets on the text

ISD keeps a draft when the model agrees with its own proposal, so the best thing a MASK position can
predict is what the model itself would write there, not what the corpus says. Three steps:
  1. rollouts: the model continues prompts cut from its training text (batched AR decoding);
  2. targets for the mask that drafts position i: `hard`, the rollout's token there (for greedy
     rollouts: the clean stream's argmax, so greedy drafts can be accepted every time), or `soft`,
     the clean stream's whole distribution p(. | x_<i) at temperature T. Along the model's own
     sampled rollouts, that is an unbiased, low-noise estimate of its k-ahead marginal, the q that
     makes sampled drafts pass most often. It is read from the x0 half of the same forward;
  3. a gated LoRA adapter (mlx_port/lora.py) is trained on the xt half; the base stays frozen, so the
     clean stream, and with it everything ISD outputs, is exactly the base model's.
The adapter is written to `<out_dir>/distilled/` in lora.py's format: PyTorch's sample.py, serve.py and
bench/ load it as they load distill.py's. Same options, prompts, targets, loss, AdamW and one-cycle
schedule as distill.py; the batches are drawn from MLX's random stream.
"""
import argparse
import os
import sys
import time
from dataclasses import asdict

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from tqdm import tqdm

import checkpoint
import data
import mlx_port.lora as lora
import tokenizer as tok
from decoding import SamplingParams
from mlx_port.isd import Request, decode
from mlx_port.model import Model, idlm_logits, pick_device
from options import DistillConfig, one_cycle_lr


def rollouts(model, train_ids, cfg: DistillConfig, log=print):
    """(rows (n, seq_len), labels): `prompt_len` tokens of training text, then the model's own
    continuation (greedy, or sampled at cfg.temperature); labels are -100 on the prompt. The prompts
    are distill.py's (data.batch_offsets)."""
    offsets = data.batch_offsets(len(train_ids), cfg.seq_len, cfg.n_rollouts, seed=cfg.seed)
    text = data.get_batch(train_ids, offsets, cfg.seq_len)
    if cfg.rollouts == "none":
        return mx.array(text), mx.array(text)
    n_new, rows, t0 = cfg.seq_len - cfg.prompt_len, [], time.time()
    quiet = True if log is None else None  # tqdm's None: a bar on a terminal only, none in a log file
    for at in tqdm(range(0, cfg.n_rollouts, 256), desc=f"{cfg.rollouts} rollouts", disable=quiet):
        greedy = [cfg.rollouts == "greedy" or (cfg.rollouts == "both" and at + i < cfg.n_rollouts // 2)
                  for i in range(len(text[at:at + 256]))]
        reqs = [Request(row[:cfg.prompt_len].tolist(),
                        SamplingParams(n_new, temperature=0.0 if g else cfg.temperature, seed=cfg.seed + at + i))
                for i, (row, g) in enumerate(zip(text[at:at + 256], greedy))]
        decode(model, reqs, stride=1)  # stride 1: batched AR
        rows += [r.prompt + r.out for r in reqs]
    rows = np.array(rows, dtype=np.int64)
    labels = rows.copy()
    labels[:, :cfg.prompt_len] = -100  # the masks learn the model's continuation, not the prompt
    if log:
        log(f"{len(rows)} {cfg.rollouts} rollouts of {n_new} tokens in {time.time() - t0:.1f}s")
    return mx.array(rows), mx.array(labels)


def distill_loss(model, x0, labels, stride, supervision="hard", temperature=1.0, hard_rows=None):
    """Cross-entropy of the masks (xt half) against hard targets (labels, shifted) or soft targets
    (the clean stream's distribution at temperature T at the same position: the mask at position i
    drafts token i+1, which the clean stream at position i predicts). MASK is never a target.
    target="mixed": hard targets for the rows where `hard_rows` (B,) is True, soft for the others.
    MLX has no boolean indexing: every position is computed and the mean is over the labelled ones."""
    xt, x0_logits = idlm_logits(model, x0, labels, stride)
    mask_id = model.cfg.mask_token_id
    keep = mx.array(np.flatnonzero(np.arange(xt.shape[-1]) != mask_id))
    valid = labels[:, 1:] != -100
    dtype = xt.dtype if xt.dtype in (mx.float32, mx.float64) else mx.float32  # float64 stays
    student = xt[:, :-1][..., keep].astype(dtype)
    mean = lambda v: mx.where(valid, v, 0).sum() / valid.sum()  # noqa: E731
    if supervision in ("hard", "mixed"):
        ids = mx.where(valid, labels[:, 1:], 0)
        hard = nn.losses.cross_entropy(student, ids - (ids > mask_id))  # ids above MASK: one column down
        if supervision == "hard":
            return mean(hard)
    teacher = mx.softmax(mx.stop_gradient(x0_logits[:, :-1][..., keep].astype(dtype)) / temperature, axis=-1)
    soft = -(teacher * nn.log_softmax(student / temperature, axis=-1)).sum(-1)
    if supervision == "soft":
        return mean(soft)
    return mean(mx.where(hard_rows[:, None], hard, soft))


def train_adapter(model, rows, labels, stride, cfg: DistillConfig, log=print):
    """Freeze `model`, attach a gated LoRA adapter and train it with distill_loss; returns the model."""
    lora.add_adapter(model, lora.LoraConfig(cfg.rank, cfg.lora_alpha, base="..", targets=cfg.targets.split(",")))
    model.train()
    opt = optim.AdamW(cfg.lr, betas=[0.9, 0.95], weight_decay=0.0, bias_correction=True)  # torch's AdamW
    loss_and_grad = nn.value_and_grad(model, lambda x, y, h: distill_loss(model, x, y, stride, cfg.supervision,
                                                                         cfg.temperature, h))
    key = mx.random.key(cfg.seed)
    bar = tqdm(range(cfg.iters), desc=f"distill ({cfg.rollouts}/{cfg.supervision})",
               disable=True if log is None else None)  # None: a bar on a terminal only
    greedy = mx.arange(len(rows)) < len(rows) // 2  # rollouts="both": the greedy half comes first
    for it in bar:
        key, sub = mx.random.split(key)
        idx = mx.random.randint(0, len(rows), (cfg.batch_size,), key=sub)
        loss, grads = loss_and_grad(rows[idx], labels[idx], greedy[idx])
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        opt.learning_rate = one_cycle_lr(it, cfg.lr, cfg.iters)
        opt.update(model, grads)
        mx.eval(model.lora.parameters(), opt.state, loss)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


def save(model, out_dir):
    """Write the adapter to out_dir/distilled/ as a checkpoint of its own (checkpoint.staged): an
    interrupted save leaves the earlier adapter or the new one, never a mix of the two."""
    folder = os.path.join(out_dir, checkpoint.DISTILLED)
    with checkpoint.staged(folder) as stage:
        lora.save_adapter(model.lora, stage)
    return folder


def distill(out_dir, cfg: DistillConfig, stride, data_path=None, log=print):
    """The whole step on the checkpoint in out_dir: rollouts, adapter, out_dir/distilled/."""
    mx.random.seed(cfg.seed)
    model, enc = Model.load(out_dir).eval(), tok.load(out_dir)
    cfg.seq_len = min(cfg.seq_len, model.cfg.max_seq_len)
    _, train_ids, _ = data.load_corpus(data_path, enc=enc, log=lambda *a: None)
    t0 = time.time()
    rows, labels = rollouts(model, train_ids, cfg, log)
    train_adapter(model, rows, labels, stride, cfg, log)
    folder = save(model, out_dir)
    if log:
        log(f"self-distillation ({cfg.rollouts} rollouts, {cfg.supervision} targets, {cfg.iters} steps) in "
            f"{time.time() - t0:.0f}s: adapter in {folder}/")
    return folder


def main(argv=None):
    p = argparse.ArgumentParser(prog="mlx_port.distill", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = DistillConfig()
    p.add_argument("--out_dir", default="out",
                   help="the checkpoint to distil (written by train.py or mlx_port.train; default out)")
    p.add_argument("--data", default=None,
                   help="the text its prompts come from (default: the checkpoint's training data, Shakespeare)")
    p.add_argument("--stride", type=int, default=None, help="N of the masks' blocks (default: the checkpoint's)")
    p.add_argument("--device", default="auto", help="auto (MLX's default: the GPU on a Mac), cpu or gpu (default auto)")
    for k, v in asdict(d).items():
        if k != "seq_len":
            p.add_argument(f"--{k}", type=type(v), default=v, help=f"(default {v})")
    a = p.parse_args(argv)
    if not os.path.isfile(os.path.join(a.out_dir, "config.json")):
        p.error(f"no checkpoint in {a.out_dir} (config.json missing): run python train.py first")
    try:
        cfg = DistillConfig(**{k: getattr(a, k) for k in asdict(d) if k != "seq_len"})
        mx.set_default_device(pick_device(a.device))
    except ValueError as e:
        p.error(str(e))
    trained = checkpoint.training_config(a.out_dir)
    distill(a.out_dir, cfg, a.stride or trained.get("stride", 4), a.data if a.data is not None else trained.get("data"))


if __name__ == "__main__":
    sys.exit(main())
