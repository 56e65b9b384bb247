"""Train an Introspective Diffusion LM (or a plain AR model) with MLX: train.py, framework for framework.

    python -m mlx_port.train                                   # the cpu preset (Metal on a Mac)
    python -m mlx_port.train --preset=tiny --out_dir=out-tiny  # a few seconds
    python -m mlx_port.train --init_from=out-ar --out_dir=out  # convert an AR model into an I-DLM

train.py's options, presets, data, data order and checkpoint files: its parser and helpers are used
as they are, and each checkpoint loads in either framework (--init_from takes a PyTorch one).
--device is auto (MLX's default device: the GPU on a Mac), cpu or gpu. Not in the port: several
processes (DDP) and --compile; --resume continues runs of this trainer only.
"""
import json
import os
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map, tree_unflatten

import data
import lora
import tokenizer as tok
from mlx_port.isd import ar_generate
from mlx_port.model import Model, ModelConfig, ar_loss, idlm_loss, pick_device
from train import (MODEL_KEYS, RESUMABLE, UsageError, check_options, checkpoint_folder, load_pretrained, lr_at,
                   parse_args, progress_line, read_train_state, staged)


def get_batch(ids, offsets, seq_len):
    """data.get_batch's rows as an MLX array."""
    return mx.array(data.get_batch(ids, offsets, seq_len).numpy())


def losses(model, x, cfg):
    """(loss to optimise, task, clean); task is nan for the AR objective."""
    if cfg["objective"] == "ar":
        clean = ar_loss(model, x)
        return clean, mx.full(clean.shape, float("nan")), clean
    alpha = cfg["alpha"] if cfg["alpha"] == "auto" else float(cfg["alpha"])
    return idlm_loss(model, x, stride=cfg["stride"], alpha=alpha)


def evaluate(model, val, cfg):
    """Mean validation task and clean losses over train.py's fixed set of eval_iters batches."""
    bs = cfg["batch_size"]
    offsets = data.batch_offsets(len(val), cfg["seq_len"], cfg["eval_iters"] * bs, seed=0)
    out = [0.0, 0.0]
    for i in range(cfg["eval_iters"]):
        x = get_batch(val, offsets[i * bs:(i + 1) * bs], cfg["seq_len"])
        if cfg["stride"] >= 2:  # idlm_loss's clean term IS the AR loss: one forward gives both
            _, task, clean = idlm_loss(model, x, stride=cfg["stride"])
        else:
            task, clean = mx.array(float("nan")), ar_loss(model, x)
        out = [out[0] + task.item(), out[1] + clean.item()]
    return [v / cfg["eval_iters"] for v in out]


# ----------------------------------------------------------------------------------------------
# checkpoints: model.safetensors + config.json + tokenizer.json (+ optimizer and train state)

def save_checkpoint(out_dir, model, enc, opt, state):
    """train.py's files, replacing out_dir's together (train.staged); `it` is stamped into both tensor
    files. The optimizer state is MLX's, so train_state.json says framework "mlx" (train.py will not
    resume it)."""
    meta = {"iter": str(state["iter"])}
    tensors = dict(tree_flatten(opt.state))
    text = json.dumps({**state, "framework": "mlx"}, indent=1)
    with staged(out_dir) as stage:
        model.save(stage, metadata=meta)
        tok.save(enc, stage)
        mx.save_safetensors(os.path.join(stage, "optimizer.safetensors"), tensors, metadata=meta)
        Path(stage, "train_state.json").write_text(text)


def load_optimizer(out_dir, opt, state):
    """Restore the optimizer state saved by save_checkpoint (same step as the weights)."""
    tensors, meta = mx.load(os.path.join(out_dir, "optimizer.safetensors"), return_metadata=True)
    _, m_meta = mx.load(os.path.join(out_dir, "model.safetensors"), return_metadata=True)
    if meta.get("iter") != m_meta.get("iter") or meta.get("iter") != str(state["iter"]):
        raise UsageError(f"--resume: the files in {out_dir} come from different steps; "
                         f"the checkpoint is inconsistent, start a new run")
    opt.state = tree_unflatten(list(tensors.items()))


def main(argv=None):
    cfg, given = parse_args(argv, doc=__doc__)
    check_options(cfg, given)
    if cfg["compile"]:
        raise UsageError("--compile is torch.compile: the MLX port runs without it")
    if cfg["objective"] not in ("idlm", "ar"):
        raise UsageError(f"--objective={cfg['objective']}: the diffusion baselines train with train.py; "
                         f"the MLX port trains idlm and ar")
    if cfg["lora"]:
        raise UsageError("--lora: gated LoRA (R-ISD) training is in train.py; the MLX port trains whole models")
    try:
        mx.set_default_device(pick_device(cfg["device"]))
    except ValueError as e:
        raise UsageError(str(e)) from None
    out_dir = cfg["out_dir"]

    # where the weights and tokenizer come from: a run to resume, another checkpoint, or scratch
    enc, weights, state = None, None, None
    has_ckpt = os.path.isfile(os.path.join(out_dir, "config.json")) or lora.has_adapter(out_dir)
    if cfg["resume"]:
        if not has_ckpt:
            raise UsageError(f"--resume: no checkpoint in {out_dir}; run without --resume first")
        state = read_train_state(out_dir, framework="mlx")
        saved = state["config"]
        diff = [k for k in given - RESUMABLE if saved.get(k) != cfg[k]]
        if diff:
            raise UsageError(f"--resume: the checkpoint in {out_dir} was trained with "
                             + ", ".join(f"--{k}={saved.get(k)}" for k in diff)
                             + "; drop those options or use another --out_dir")
        cfg = {**saved, **{k: cfg[k] for k in given & RESUMABLE}}
        mcfg, enc, _ = load_pretrained(out_dir, "--resume")
        weights = mx.load(os.path.join(out_dir, "model.safetensors"))
    elif has_ckpt and not cfg["overwrite"]:
        raise UsageError(f"{out_dir} already holds a checkpoint: add --resume to continue it, "
                         f"--overwrite to replace it, or choose another --out_dir")
    elif cfg["init_from"]:
        folder = checkpoint_folder(cfg["init_from"], "--init_from")  # smollm2: its converted folder
        mcfg, enc, _ = load_pretrained(folder, "--init_from")
        weights = mx.load(os.path.join(folder, "model.safetensors"))
        clash = [k for k in given & set(MODEL_KEYS) if getattr(mcfg, k) != cfg[k]]
        if clash:
            raise UsageError(f"--init_from={cfg['init_from']} has "
                             + ", ".join(f"{k}={getattr(mcfg, k)}" for k in clash)
                             + ": drop the model-shape options that contradict it")
        if cfg["seq_len"] > mcfg.max_seq_len:
            raise UsageError(f"--seq_len={cfg['seq_len']} exceeds the checkpoint's max_seq_len {mcfg.max_seq_len}")
    if enc is not None and "tokenizer" in given and cfg["tokenizer"] != enc.name.split("-")[0]:
        raise UsageError(f"--tokenizer={cfg['tokenizer']} contradicts the checkpoint's tokenizer {enc.name}")

    try:
        enc, train_ids, val_ids = data.load_corpus(cfg["data"], cfg["tokenizer"], cfg["vocab_size"], enc=enc)
        data.batch_offsets(min(len(train_ids), len(val_ids)), cfg["seq_len"], 1, 0)  # long enough?
    except data.DataError as e:
        raise UsageError(str(e)) from None
    if weights is None:
        mcfg = ModelConfig(vocab_size=enc.n_vocab + 1, mask_token_id=enc.n_vocab, max_seq_len=cfg["seq_len"],
                           **{k: cfg[k] for k in MODEL_KEYS})

    mx.random.seed(cfg["seed"])
    model = Model(mcfg)
    if weights is not None:
        model.load_weights(list(weights.items()))
    # train.py's AdamW (torch's bias correction, betas 0.9/0.95), weight decay on matrices only
    opt = optim.MultiOptimizer([optim.AdamW(cfg["lr"], betas=[0.9, 0.95], weight_decay=wd, bias_correction=True)
                                for wd in (cfg["weight_decay"], 0.0)], [lambda path, p: p.ndim >= 2])
    opt.init(model.trainable_parameters())
    start, history, evals = 0, [], []
    if state is not None:
        load_optimizer(out_dir, opt, state)
        start, history, evals = state["iter"], state["history"], state["evals"]
    loss_and_grad = nn.value_and_grad(model, lambda x: losses(model, x, cfg))  # gradient of the first output

    n_params = sum(p.size for _, p in tree_flatten(model.parameters()))
    rows = cfg["batch_size"] * cfg["grad_accum"]
    print(f"{cfg['objective']} model: {n_params / 1e6:.2f}M parameters, vocab {mcfg.vocab_size} "
          f"(MASK = {mcfg.mask_token_id}), {len(train_ids) / 1e6:.2f}M train tokens, stride {cfg['stride']}, "
          f"{rows} rows x {cfg['seq_len']} tokens per step, MLX on {mx.default_device()}")

    def checkpoint(it, val):
        evals.append([it, *val])
        print(f"step {it}: val task {val[0]:.4f} clean {val[1]:.4f}")
        save_checkpoint(out_dir, model, enc, opt, {"iter": it, "config": cfg, "history": history, "evals": evals})

    t0, t_last, it = time.time(), time.time(), start
    for it in range(start, cfg["max_iters"]):
        if it % cfg["eval_interval"] == 0 and it > start:
            checkpoint(it, evaluate(model, val_ids, cfg))
        lr = lr_at(it, cfg)
        opt.learning_rate = lr
        # the batch of step `it` is train.py's: a function of (seed, it)
        offsets = data.batch_offsets(len(train_ids), cfg["seq_len"], rows, seed=cfg["seed"] * 1_000_003 + it)
        grads, stats = None, mx.zeros(3)
        for micro in range(cfg["grad_accum"]):
            i = micro * cfg["batch_size"]
            x = get_batch(train_ids, offsets[i:i + cfg["batch_size"]], cfg["seq_len"])
            (loss, task, clean), g = loss_and_grad(x)
            g = tree_map(lambda a: a / cfg["grad_accum"], g)
            grads = g if grads is None else tree_map(mx.add, grads, g)
            stats += mx.stack([loss, task, clean]).astype(mx.float32) / cfg["grad_accum"]
        if cfg["grad_clip"] > 0:
            grads, _ = optim.clip_grad_norm(grads, cfg["grad_clip"])
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state, stats)
        history.append([it, *[round(v, 6) for v in stats.tolist()]])
        if (it + 1) % cfg["log_interval"] == 0 or it + 1 == cfg["max_iters"]:
            now = time.time()
            n = (it + 1 - start) % cfg["log_interval"] or cfg["log_interval"]
            tps = n * rows * cfg["seq_len"] / (now - t_last)
            eta = (now - t0) / (it + 1 - start) * (cfg["max_iters"] - it - 1)
            print(progress_line(it + 1, cfg, [v.item() for v in stats], lr, tps, eta), flush=True)
            t_last = now
    if cfg["max_iters"] > start or not cfg["resume"]:
        checkpoint(cfg["max_iters"], evaluate(model, val_ids, cfg))
    print(f"done in {time.time() - t0:.0f}s; checkpoint in {out_dir}/")
    prompt = enc.encode_ordinary("\n")
    out = ar_generate(model, prompt, min(100, mcfg.max_seq_len - len(prompt)), temperature=0.8, seed=cfg["seed"])
    print("sample:\n" + enc.decode(out))


if __name__ == "__main__":
    try:
        main()
    except UsageError as e:
        print(f"mlx_port.train: error: {e}", file=sys.stderr)
        sys.exit(2)
