"""One measurement of `python -m bench mlx` (bench/mlx_vs_torch.py), one framework, in a process of its own:

    python -m bench.mlx_vs_torch_worker '{"framework": "MLX", "what": "decode", "out_dir": "out", ...}'

prints its result as a JSON line. bench/mlx_vs_torch.py starts it with the options of `python -m bench mlx` as
one JSON object. It imports mlx_port before torch, which the benchmarks' own process (it imports torch) cannot.
"""
import argparse
import json
import statistics
import sys
import time

import mlx_port  # noqa: F401  (first: where allowed, it loads OpenBLAS for MLX before mlx.core is imported)
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import torch

import checkpoint
import isd
import lora
import options
from bench.serving import validation_prompts
from mlx_port import isd as mlx_isd, lora as mlx_lora, model as mlx_model
from model import Model, idlm_loss
from decoding import SamplingParams

DECODERS = {"PyTorch": (isd, lora.load_model), "MLX": (mlx_isd, mlx_lora.load_model)}


def decode_speed(a):
    """tok/s of greedy decoding of the held-out prompts, --batch (one size here) at a time, with ISD (--stride) and AR
    (stride 1, batched the same way), best of --repeats after a warm-up; and ISD's tokens per forward."""
    decoder, load = DECODERS[a.framework]
    model = load(checkpoint.distilled_or_base(a.out_dir))[0]
    prompts = validation_prompts(a.out_dir, lora.load_model(a.out_dir)[1] if a.framework == "PyTorch"
                                 else mlx_lora.load_model(a.out_dir)[1], a.prompts)
    out = {}
    for kind, stride in (("AR", 1), ("ISD", a.stride)):
        best, st = 0.0, None
        for rep in range(a.repeats + 1):
            t0, reqs = time.perf_counter(), []
            for at in range(0, len(prompts), a.batch):
                reqs += decoder.decode(model, [decoder.Request(list(p), SamplingParams(a.max_new_tokens, temperature=0))
                                               for p in prompts[at:at + a.batch]], stride)
            if rep:
                best = max(best, sum(len(r.out) for r in reqs) / (time.perf_counter() - t0))
            st = sum((r.stats for r in reqs), decoder.Stats())
        out[kind], out[f"{kind} TPF"] = best, st.tpf
    return out


def train_speed(a):
    """Tokens/s of one introspective-loss optimizer step (forward, backward, AdamW) at --preset's shapes on a
    fixed batch, median of --steps after two warm-up steps; MLX with and without mx.compile."""
    pre = {**options.DEFAULTS, **options.PRESETS[a.preset]}
    cfg = options.model_config(pre, pre["vocab_size"])
    x = np.random.default_rng(0).integers(0, cfg.mask_token_id, (pre["batch_size"], pre["seq_len"]))
    if a.framework == "PyTorch":
        model = Model(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        xt = torch.from_numpy(x)

        def step():
            idlm_loss(model, xt, stride=4)[0].backward()
            opt.step()
            opt.zero_grad()
        steps = {"PyTorch": step}
    else:
        steps = {"MLX": mlx_step(cfg, x, False), "MLX, mx.compile": mlx_step(cfg, x, True)}
    out = {}
    for name, step in steps.items():
        times = []
        for i in range(a.steps + 2):
            t0 = time.perf_counter()
            step()
            if i >= 2:
                times.append(time.perf_counter() - t0)
        out[name] = x.size / statistics.median(times)
    return out


def mlx_step(cfg, x, compiled):
    """One MLX optimizer step on batch x as a function (mx.compile'd with the model and optimizer state)."""
    model, opt = mlx_model.Model(cfg), optim.AdamW(1e-4)
    grad = nn.value_and_grad(model, lambda xm: mlx_model.idlm_loss(model, xm, stride=4)[0])
    state = [model.state, opt.state]

    def step(xm):
        loss, g = grad(xm)
        opt.update(model, g)
        return loss
    step = mx.compile(step, inputs=state, outputs=state) if compiled else step
    xm = mx.array(x)
    return lambda: mx.eval(step(xm), model.parameters(), opt.state)


MEASUREMENTS = {"decode": decode_speed, "train": train_speed}

if __name__ == "__main__":
    a = argparse.Namespace(**json.loads(sys.argv[1]))
    print(json.dumps(MEASUREMENTS[a.what](a)))
