"""Self-distillation: the masks learn the model's own continuations, through a gated LoRA adapter.

    python distill.py --out_dir=out        # greedy + sampled rollouts, hard + soft targets -> out/distilled
    python distill.py --out_dir=out --rollouts=greedy --supervision=hard   # greedy decoding only: the highest greedy TPF
    python distill.py --out_dir=out --rollouts=none --supervision=soft   # no rollouts: soft targets on the training text

ISD keeps a draft when the model agrees with its own proposal, so the best thing a MASK position can
predict is what the model itself would write there, not what the corpus says. Three steps:
  1. rollouts: the model continues prompts cut from its training text (batched AR decoding);
  2. targets for the mask that drafts position i: `hard`, the rollout's token there (for greedy
     rollouts: the clean stream's argmax, so greedy drafts can be accepted every time), or `soft`,
     the clean stream's whole distribution p(. | x_<i) at temperature T. Along the model's own
     sampled rollouts, that is an unbiased, low-noise estimate of its k-ahead marginal, the q that
     makes sampled drafts pass most often. It is read from the x0 half of the same forward;
  3. a gated LoRA adapter (lora.py) is trained on the xt half; the base stays frozen, so the clean
     stream, and with it everything ISD outputs, is exactly the base model's.
The adapter is written to `<out_dir>/distilled/`; sample.py, serve.py and the benchmarks (bench/) load it by default.
"""
import argparse
import os
import sys
import time
from dataclasses import asdict

import torch
import torch.nn.functional as F
from tqdm import tqdm

import checkpoint
import data
import lora
import tokenizer as tok
from decoding import SamplingParams
from isd import Request, decode
from model import Model, idlm_logits
from options import DistillConfig, one_cycle_lr


@torch.no_grad()
def rollouts(model, train_ids, cfg: DistillConfig, log=print):
    """(rows (n, seq_len), labels): `prompt_len` tokens of training text, then the model's own
    continuation (greedy, or sampled at cfg.temperature); labels are -100 on the prompt."""
    offsets = data.batch_offsets(len(train_ids), cfg.seq_len, cfg.n_rollouts, seed=cfg.seed)
    text = torch.from_numpy(data.get_batch(train_ids, offsets, cfg.seq_len))
    if cfg.rollouts == "none":
        return text, text
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
    rows = torch.tensor(rows)
    labels = rows.clone()
    labels[:, :cfg.prompt_len] = -100  # the masks learn the model's continuation, not the prompt
    if log:
        log(f"{len(rows)} {cfg.rollouts} rollouts of {n_new} tokens in {time.time() - t0:.1f}s")
    return rows, labels


def distill_loss(model, x0, labels, stride, supervision="hard", temperature=1.0, hard_rows=None, weights=None):
    """Cross-entropy of the masks (xt half) against hard targets (labels, shifted) or soft targets (the clean
    stream's distribution at temperature T at the same position: the mask at position i drafts token i+1, which
    the clean stream at position i predicts). MASK is never a target. supervision="mixed": hard targets for the
    rows where `hard_rows` (B,) is True, soft for the others. weights (B, T), aligned with labels: a weighted mean
    over the targets instead of the plain one (learn.py weighs the tokens whose drafts were rejected)."""
    xt, x0_logits = idlm_logits(model, x0, labels, stride)
    mask_id = model.cfg.mask_token_id
    keep = torch.arange(xt.shape[-1], device=x0.device) != mask_id
    valid = labels[:, 1:] != -100
    dtype = torch.promote_types(xt.dtype, torch.float32)  # float64 stays
    student = xt[:, :-1][valid][:, keep].to(dtype)
    if supervision in ("hard", "mixed"):
        ids = labels[:, 1:][valid]
        hard = F.cross_entropy(student, ids - (ids > mask_id).long(), reduction="none")  # ids above MASK: one column down
    if supervision in ("soft", "mixed"):
        teacher = (x0_logits[:, :-1][valid][:, keep].to(dtype).detach() / temperature).softmax(-1)
        soft = -(teacher * (student / temperature).log_softmax(-1)).sum(-1)
    losses = {"hard": lambda: hard, "soft": lambda: soft,
              "mixed": lambda: torch.where(hard_rows[:, None].expand_as(valid)[valid], hard, soft)}[supervision]()
    if weights is None:
        return losses.mean()
    w = weights[:, 1:][valid].to(dtype)
    return (w * losses).sum() / w.sum()


def train_adapter(model, rows, labels, stride, cfg: DistillConfig, log=print):
    """Freeze `model`, attach a gated LoRA adapter and train it with distill_loss; returns the model."""
    lora.add_adapter(model, lora.LoraConfig(cfg.rank, cfg.lora_alpha, base="..", targets=cfg.targets.split(",")))
    model.train()
    params = list(model.lora.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: one_cycle_lr(step, cfg.lr, cfg.iters) / cfg.lr)
    g = torch.Generator().manual_seed(cfg.seed)
    bar = tqdm(range(cfg.iters), desc=f"distill ({cfg.rollouts}/{cfg.supervision})",
               disable=True if log is None else None)  # None: a bar on a terminal only
    greedy = torch.arange(len(rows)) < len(rows) // 2  # rollouts="both": the greedy half comes first
    for _ in bar:
        idx = torch.randint(0, len(rows), (cfg.batch_size,), generator=g)
        loss = distill_loss(model, rows[idx], labels[idx], stride, cfg.supervision, cfg.temperature, greedy[idx])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


def save(model, out_dir):
    """Write the adapter to out_dir/distilled/ as a checkpoint of its own (through checkpoint.staged)."""
    folder = os.path.join(out_dir, checkpoint.DISTILLED)
    with checkpoint.staged(folder) as stage:
        lora.save_adapter(model.lora, stage)
    return folder


def distill(out_dir, cfg: DistillConfig, stride, data_path=None, log=print):
    """The whole step on the checkpoint in out_dir: rollouts, adapter, out_dir/distilled/."""
    torch.manual_seed(cfg.seed)
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
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = DistillConfig()
    p.add_argument("--out_dir", default="out", help="the checkpoint to distil (written by train.py; default out)")
    p.add_argument("--data", default=None, help="the text its prompts come from (default: the checkpoint's training data, Shakespeare)")
    p.add_argument("--stride", type=int, default=None, help="N of the masks' blocks (default: the checkpoint's)")
    for k, v in asdict(d).items():
        if k != "seq_len":
            p.add_argument(f"--{k}", type=type(v), default=v, help=f"(default {v})")
    a = p.parse_args(argv)
    if not os.path.isfile(os.path.join(a.out_dir, "config.json")):
        p.error(f"no checkpoint in {a.out_dir} (config.json missing): run python train.py first")
    try:
        cfg = DistillConfig(**{k: getattr(a, k) for k in asdict(d) if k != "seq_len"})
    except ValueError as e:
        p.error(str(e))
    trained = checkpoint.training_config(a.out_dir)
    distill(a.out_dir, cfg, a.stride or trained.get("stride", 4), a.data if a.data is not None else trained.get("data"))


if __name__ == "__main__":
    sys.exit(main())
