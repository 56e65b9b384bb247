"""Train an Introspective Diffusion LM (or a plain AR model) with MLX: train.py, framework for framework.

    python -m mlx_port.train                                   # the cpu preset (Metal on a Mac): AR pretraining
                                                               #   (out/ar), conversion (out), self-distillation (out/distilled)
    python -m mlx_port.train --preset=tiny --out_dir=out-tiny  # a few seconds
    python -m mlx_port.train --init_from=out-ar --out_dir=out-conv  # convert an AR model into an I-DLM

The same options, presets, data order and checkpoint files as train.py (options.py and checkpoint.py hold
them, in no framework), so each checkpoint and adapter loads in either framework (--init_from takes a
PyTorch one). --device is auto (MLX's default device: the GPU on a Mac), cpu or gpu. Not in the port:
several processes (DDP), --compile, --lora and the diffusion baselines; --resume continues runs of this
trainer only (the optimizer states differ).
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

import checkpoint
import data
import tokenizer as tok
from mlx_port import distill
from decoding import SamplingParams
from mlx_port.isd import ar_generate
from mlx_port.model import Model, ar_loss, idlm_loss, pick_device
from options import (BETAS, UsageError, check_options, decays, distill_config, evaluates_at, load_data, log_progress,
                     lr_at, micro_batches, model_config, parse_args, recipe, refuse, run_line, start_from)


def check_port_options(cfg):
    """Refuse what the port does not do; make --device MLX's default device."""
    refuse([(cfg["compile"], "--compile is torch.compile: the MLX port runs without it"),
            (cfg["objective"] in checkpoint.DIFFUSION,
             f"--objective={cfg['objective']}: the diffusion baselines train with train.py; the MLX port trains idlm and ar"),
            (cfg["lora"], "--lora: gated LoRA (R-ISD) training of a pretrained model is in train.py; the MLX port "
                          "trains whole models and self-distils their adapter (--distill_iters)")])
    try:
        mx.set_default_device(pick_device(cfg["device"]))
    except ValueError as e:
        raise UsageError(str(e)) from None


def losses(model, x, cfg):
    """(loss to optimise, task, clean); task is nan for the AR objective."""
    if cfg["objective"] == "ar":
        clean = ar_loss(model, x)
        return clean, mx.full(clean.shape, float("nan")), clean
    return idlm_loss(model, x, stride=cfg["stride"], alpha=cfg["alpha"])


def evaluate(model, val, cfg):
    """Mean validation task and clean losses over train.py's fixed set of eval_iters batches."""
    bs = cfg["batch_size"]
    offsets = data.batch_offsets(len(val), cfg["seq_len"], cfg["eval_iters"] * bs, seed=0)
    out = [0.0, 0.0]
    # an AR model is scored as an I-DLM too: idlm_loss's clean term IS the AR loss, one forward gives both
    scored = {**cfg, "objective": "idlm"} if cfg["objective"] == "ar" and cfg["stride"] >= 2 else cfg
    for i in range(cfg["eval_iters"]):
        x = mx.array(data.get_batch(val, offsets[i * bs:(i + 1) * bs], cfg["seq_len"]))
        _, task, clean = losses(model, x, scored)
        out = [out[0] + task.item(), out[1] + clean.item()]
    return [v / cfg["eval_iters"] for v in out]


# ----------------------------------------------------------------------------------------------
# checkpoints: model.safetensors + config.json + the tokenizer's files (+ optimizer and train state)

def save_checkpoint(out_dir, model, enc, opt, state, new_run=False):
    """train.py's files, as train.save_checkpoint writes them (optimizer.safetensors: all that --resume reads,
    the weights among it). The optimizer state is MLX's, so the train state says framework "mlx" (train.py will
    not resume it)."""
    tensors = {**dict(tree_flatten(opt.state)), **{f"weights.{k}": v for k, v in tree_flatten(model.parameters())}}
    text = json.dumps({**state, "framework": "mlx"}, indent=1)
    with checkpoint.staged(out_dir, new_run) as stage:
        model.save(stage)
        tok.save(enc, stage, context=model.cfg.max_seq_len)
        mx.save_safetensors(os.path.join(stage, "optimizer.safetensors"), tensors, metadata={"state": text})
        Path(stage, "train_state.json").write_text(text)


def make_optimizer(model, cfg):
    """train.py's AdamW (torch's bias correction, train.BETAS), weight decay on matrices only (train.decays)."""
    opt = optim.MultiOptimizer([optim.AdamW(cfg["lr"], betas=list(BETAS), weight_decay=wd, bias_correction=True)
                                for wd in (cfg["weight_decay"], 0.0)], [lambda path, p: decays(p.ndim, cfg) != 0.0])
    opt.init(model.trainable_parameters())
    return opt


def build_model(cfg, mcfg, weights=None):
    """The model to train, seeded: mcfg's, with the checkpoint's weights if any."""
    mx.random.seed(cfg["seed"])
    model = Model(mcfg)
    if weights is not None:
        model.load_weights(list(weights.items()))
    return model


def train_step(model, opt, loss_and_grad, batches, lr, cfg):
    """One optimizer step at learning rate lr over the micro-batches (numpy rows, options.micro_batches);
    returns [loss, task, clean] averaged over them."""
    opt.learning_rate = lr
    grads, stats = None, mx.zeros(3)
    for x in batches:
        (loss, task, clean), g = loss_and_grad(mx.array(x))
        g = tree_map(lambda a: a / len(batches), g)
        grads = g if grads is None else tree_map(mx.add, grads, g)
        stats += mx.stack([loss, task, clean]).astype(mx.float32) / len(batches)
    if cfg["grad_clip"] > 0:
        grads, _ = optim.clip_grad_norm(grads, cfg["grad_clip"])
    opt.update(model, grads)
    mx.eval(model.parameters(), opt.state, stats)
    return stats.tolist()


def restore(out_dir, model, opt, state):
    """--resume: the weights and the optimizer state as save_checkpoint left them in optimizer.safetensors;
    returns the step, history and evaluations of the train state to go on from."""
    tensors = mx.load(os.path.join(out_dir, "optimizer.safetensors"))
    model.load_weights([(k[len("weights."):], v) for k, v in tensors.items() if k.startswith("weights.")])
    opt.state = tree_unflatten([(k, v) for k, v in tensors.items() if not k.startswith("weights.")])
    return state["iter"], state["history"], state["evals"]


def main(argv=None):
    # set-up: train.py's options, less what the port does not do; the device; then train.py's runs (the
    # cpu preset: AR pretraining, then the conversion)
    cfg, given = parse_args(argv, doc=__doc__)
    check_options(cfg, given)
    check_port_options(cfg)
    for run_cfg, run_given in recipe(cfg, given, "mlx"):
        train(run_cfg, run_given)


def train(cfg, given):
    """One training run, as train.train: from the options to a checkpoint in out_dir."""
    # the start point: train.py's (the run in out_dir, another checkpoint or scratch), in MLX
    cfg, mcfg, enc, weights, state = start_from(cfg, given, "mlx", mx.load)
    enc, train_ids, val_ids = load_data(cfg, enc, print)
    model = build_model(cfg, mcfg or model_config(cfg, enc.n_vocab), weights)
    opt = make_optimizer(model, cfg)
    start, history, evals = restore(cfg["out_dir"], model, opt, state) if state else (0, [], [])
    loss_and_grad = nn.value_and_grad(model, lambda x: losses(model, x, cfg))  # gradient of the first output
    print(run_line(cfg, sum(p.size for _, p in tree_flatten(model.parameters())), model.cfg, len(train_ids),
                   f"MLX on {mx.default_device()}"))

    # the loop: train.py's, in one process
    t0 = t_last = time.time()
    for it in range(start, cfg["max_iters"] + 1):
        if evaluates_at(it, start, cfg):
            val = evaluate(model, val_ids, cfg)
            evals.append([it, *val])
            print(f"step {it}: val task {val[0]:.4f} clean {val[1]:.4f}")
            save_checkpoint(cfg["out_dir"], model, enc, opt, {"iter": it, "config": cfg, "history": history,
                                                              "evals": evals}, new_run=state is None)
        if it == cfg["max_iters"]:
            break
        lr = lr_at(it, cfg)
        stats = train_step(model, opt, loss_and_grad, micro_batches(train_ids, it, cfg), lr, cfg)
        history.append([it, *[round(v, 6) for v in stats]])
        t_last = log_progress(it, stats, lr, start, t0, t_last, cfg)
    print(f"done in {time.time() - t0:.0f}s; checkpoint in {cfg['out_dir']}/")

    # the end: a sample; then (the cpu preset, --distill_iters) self-distillation of the masks
    prompt = enc.encode_ordinary("\n")
    params = SamplingParams(min(100, model.cfg.max_seq_len - len(prompt)), temperature=0.8, seed=cfg["seed"])
    out = ar_generate(model, prompt, params)
    print("sample:\n" + enc.decode(out))
    if cfg.get("distill_iters") and cfg["objective"] == "idlm":
        print(f"self-distillation: the masks learn the model's own continuations ({cfg['distill_iters']} steps)")
        distill.distill(cfg["out_dir"], distill_config(cfg), cfg["stride"], cfg["data"])


if __name__ == "__main__":
    try:
        main()
    except UsageError as e:
        print(f"mlx_port.train: error: {e}", file=sys.stderr)
        sys.exit(2)
