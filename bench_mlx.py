"""The MLX port against PyTorch on the same checkpoint, side by side in one run (python bench.py mlx):
decoding tokens/s (ISD and AR, batch 1 and a batch of 8) and training tokens/s (the introspective loss,
one optimizer step at the cpu preset's shapes). Each pair of runs alternates, so both see the same machine.
"""
import statistics
import time

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import torch

import checkpoint
import isd
import lora
import options
from bench_serve import validation_prompts
from mlx_port import isd as mlx_isd, lora as mlx_lora, model as mlx_model
from model import Model, idlm_loss

FRAMEWORKS = {"PyTorch": isd, "MLX": mlx_isd}


def batch_speed(decoder, model, prompts, n, stride, batch, repeats):
    """tok/s of `decoder` (the module isd or mlx_port.isd) decoding `prompts` greedily, `batch` at a time
    (stride 1: AR, one token per forward, batched the same way), best of `repeats` after a warm-up."""
    best = 0.0
    for rep in range(repeats + 1):
        t0, tokens = time.perf_counter(), 0
        for at in range(0, len(prompts), batch):
            reqs = [decoder.Request(list(p), n, temperature=0) for p in prompts[at:at + batch]]
            decoder.decode(model, reqs, stride)
            tokens += sum(len(r.out) for r in reqs)
        if rep:
            best = max(best, tokens / (time.perf_counter() - t0))
    return best


def decode_table(a):
    """ISD and AR tokens/s of the same checkpoint (and its self-distilled adapter) in both frameworks."""
    folder = checkpoint.distilled_or_base(a.out_dir)
    models = {"PyTorch": lora.load_model(folder)[0], "MLX": mlx_lora.load_model(folder)[0]}
    enc = lora.load_model(a.out_dir)[1]
    prompts = validation_prompts(a.out_dir, enc, a.prompts)
    print(f"{folder}: {len(prompts)} held-out prompts x {a.max_new_tokens} tokens, greedy, ISD stride {a.stride}; "
          f"torch {torch.get_num_threads()} threads, MLX on {mx.default_device()}\n")
    print("| batch | PyTorch AR | PyTorch ISD | PyTorch ISD/AR | MLX AR | MLX ISD | MLX ISD/AR | MLX/PyTorch (ISD) |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for batch in a.batch:
        tps = {}
        for name, dec in FRAMEWORKS.items():  # alternated, so both see the same machine
            for kind, stride in (("AR", 1), ("ISD", a.stride)):
                tps[name, kind] = batch_speed(dec, models[name], prompts, a.max_new_tokens, stride, batch, a.repeats)
        r = {"batch": batch, **{f"{n} {k}": v for (n, k), v in tps.items()}}
        rows.append(r)
        print(f"| {batch} | " + " | ".join(f"{tps[n, 'AR']:.0f} | {tps[n, 'ISD']:.0f} | {tps[n, 'ISD'] / tps[n, 'AR']:.2f}x"
                                          for n in FRAMEWORKS) + f" | {tps['MLX', 'ISD'] / tps['PyTorch', 'ISD']:.2f}x |")
    return rows


def train_table(a):
    """Tokens/s of one introspective-loss optimizer step (forward, backward, AdamW) at a preset's shapes, PyTorch
    and MLX alternated step by step on the same batch, with and without mx.compile."""
    pre = {**options.DEFAULTS, **options.PRESETS[a.preset]}
    cfg = options.model_config(pre, pre["vocab_size"])
    x = np.random.default_rng(0).integers(0, cfg.mask_token_id, (pre["batch_size"], pre["seq_len"]))
    tmodel = Model(cfg)
    topt = torch.optim.AdamW(tmodel.parameters(), lr=1e-4)
    xt = torch.from_numpy(x)

    def torch_step():
        idlm_loss(tmodel, xt, stride=4)[0].backward()
        topt.step()
        topt.zero_grad()

    def mlx_stepper(compiled):
        model = mlx_model.Model(cfg)
        opt = optim.AdamW(1e-4)
        grad = nn.value_and_grad(model, lambda xm: mlx_model.idlm_loss(model, xm, stride=4)[0])
        state = [model.state, opt.state]

        def step(xm):
            loss, g = grad(xm)
            opt.update(model, g)
            return loss
        step = mx.compile(step, inputs=state, outputs=state) if compiled else step
        xm = mx.array(x)
        return lambda: mx.eval(step(xm), model.parameters(), opt.state)

    runs = {"PyTorch": torch_step, "MLX": mlx_stepper(False), "MLX, mx.compile": mlx_stepper(True)}
    times = {k: [] for k in runs}
    for i in range(a.steps + 2):
        for k, f in runs.items():
            t0 = time.perf_counter()
            f()
            if i >= 2:  # the first steps warm up (and compile)
                times[k].append(time.perf_counter() - t0)
    tokens = pre["batch_size"] * pre["seq_len"]
    tps = {k: tokens / statistics.median(v) for k, v in times.items()}
    print(f"\ntraining, preset {a.preset} ({pre['batch_size']} x {pre['seq_len']} tokens per step, introspective loss "
          f"at stride 4), median of {a.steps} steps\n\n| framework | tok/s | vs PyTorch |\n|---|---|---|")
    for k, v in tps.items():
        print(f"| {k} | {v:.0f} | {v / tps['PyTorch']:.2f}x |")
    return [{"framework": k, "tokens_per_s": v} for k, v in tps.items()]


def bench_mlx(a):
    mx.set_default_device(mlx_model.pick_device(a.device))
    rows = decode_table(a)
    return {"decode": rows, "train": train_table(a)}
