"""The MLX port against PyTorch on the same checkpoint: decoding tokens/s (ISD and AR, batch 1 and a batch of
8, greedy) and training tokens/s (one introspective-loss optimizer step at the cpu preset's shapes).

    python bench_mlx.py --out_dir=out                   # the tables of docs/mlx.md
    python bench_mlx.py --out_dir=out --markdown=docs/figures/mlx.md

Each measurement runs in a process of its own that imports one framework's decoder (`--worker`), and the
two frameworks take turns, round after round: in one process their thread pools (torch's OpenMP, the
OpenBLAS that mlx_port loads on Linux) would spin against each other on a small CPU and slow both.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import mlx_port  # noqa: F401  (first: where allowed, it loads OpenBLAS for MLX before mlx.core is imported)
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import torch

import bench
import checkpoint
import isd
import lora
import options
from bench_serve import validation_prompts
from mlx_port import isd as mlx_isd, lora as mlx_lora, model as mlx_model
from model import Model, idlm_loss

DECODERS = {"PyTorch": (isd, lora.load_model), "MLX": (mlx_isd, mlx_lora.load_model)}


# ----------------------------------------------------------------------------------------------
# the workers: one framework, one measurement, a JSON line on stdout

def decode_speed(a):
    """tok/s of greedy decoding of the held-out prompts, --batch (one number here) at a time, with ISD (--stride) and with AR
    (stride 1, batched the same way), best of --repeats after a warm-up; and ISD's tokens per forward."""
    decoder, load = DECODERS[a.worker]
    model = load(checkpoint.distilled_or_base(a.out_dir))[0]
    prompts = validation_prompts(a.out_dir, lora.load_model(a.out_dir)[1] if a.worker == "PyTorch"
                                 else mlx_lora.load_model(a.out_dir)[1], a.prompts)
    out = {}
    for kind, stride in (("AR", 1), ("ISD", a.stride)):
        best, st = 0.0, None
        for rep in range(a.repeats + 1):
            t0, reqs = time.perf_counter(), []
            for at in range(0, len(prompts), a.batch[0]):
                reqs += decoder.decode(model, [decoder.Request(list(p), a.max_new_tokens, temperature=0)
                                               for p in prompts[at:at + a.batch[0]]], stride)
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
    if a.worker == "PyTorch":
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


# ----------------------------------------------------------------------------------------------
# the parent: workers in turn, the tables

def worker(what, framework, a, **kw):
    """Run one measurement in a fresh process; its JSON result."""
    args = [sys.executable, os.path.abspath(__file__), f"--worker={framework}", f"--what={what}"]
    args += [f"--{k}={v}" for k, v in {**vars(a), "batch": 1, **kw}.items() if k not in ("worker", "what", "markdown", "rounds")]
    env = {**os.environ, "IDLM_MLX_BLAS": "bundled" if framework == "PyTorch" else os.environ.get("IDLM_MLX_BLAS", "")}
    r = subprocess.run(args, capture_output=True, text=True, check=False, env=env)  # (OpenBLAS would slow PyTorch)
    if r.returncode:
        raise SystemExit(f"bench_mlx.py worker failed:\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def tables(a):
    rounds = range(a.rounds)
    print(f"{checkpoint.distilled_or_base(a.out_dir)}: {a.prompts} held-out prompts x {a.max_new_tokens} tokens, greedy, "
          f"ISD stride {a.stride}; each figure the median of {a.rounds} rounds (PyTorch and MLX in turn, a process "
          f"each; best of {a.repeats} runs inside); torch threads {torch.get_num_threads()}, MLX on {mx.default_device()}\n")
    print("| batch | PyTorch AR | PyTorch ISD | PyTorch ISD/AR | MLX AR | MLX ISD | MLX ISD/AR | MLX/PyTorch (ISD) | TPF |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for batch in a.batch:
        runs = [{fw: worker("decode", fw, a, batch=batch) for fw in DECODERS} for _ in rounds]
        med = {(fw, k): statistics.median(r[fw][k] for r in runs) for fw in DECODERS for k in ("AR", "ISD")}
        tpf = {fw: runs[0][fw]["ISD TPF"] for fw in DECODERS}
        rows.append({"batch": batch, **{f"{fw} {k}": v for (fw, k), v in med.items()}, "TPF": tpf})
        print(f"| {batch} | " + " | ".join(f"{med[fw, 'AR']:.0f} | {med[fw, 'ISD']:.0f} | {med[fw, 'ISD'] / med[fw, 'AR']:.2f}x"
                                          for fw in DECODERS)
              + f" | {med['MLX', 'ISD'] / med['PyTorch', 'ISD']:.2f}x | "
              + ("{:.2f}".format(tpf["MLX"]) if tpf["MLX"] == tpf["PyTorch"] else f"{tpf['PyTorch']:.2f} vs {tpf['MLX']:.2f}")
              + " |")
    runs = [{k: v for fw in DECODERS for k, v in worker("train", fw, a).items()} for _ in rounds]
    tps = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    pre = options.PRESETS[a.preset]
    print(f"\ntraining, preset {a.preset} ({pre['batch_size']} x {pre['seq_len']} tokens per step, introspective loss at "
          f"stride 4), median of {a.steps} steps, then of {a.rounds} rounds\n\n| framework | tok/s | vs PyTorch |\n|---|---|---|")
    for k, v in tps.items():
        print(f"| {k} | {v:.0f} | {v / tps['PyTorch']:.2f}x |")
    return {"decode": rows, "train": tps}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default="out", help="checkpoint; its distilled/ adapter is used where there is one (default out)")
    p.add_argument("--batch", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8], help="batch sizes (default 1,8)")
    p.add_argument("--prompts", type=int, default=8, help="held-out validation prompts (default 8)")
    p.add_argument("--max_new_tokens", type=int, default=64, help="tokens per prompt (default 64)")
    p.add_argument("--stride", type=int, default=4, help="ISD stride N (default 4)")
    p.add_argument("--repeats", type=int, default=2, help="decoding runs per worker, the best is kept (default 2)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of PyTorch then MLX; the median is shown (default 3)")
    p.add_argument("--preset", default="cpu", choices=sorted(options.PRESETS), help="training shapes (default cpu)")
    p.add_argument("--steps", type=int, default=8, help="training steps per worker (default 8)")
    p.add_argument("--markdown", metavar="FILE.md", help="also write the tables under their command (as bench.py)")
    p.add_argument("--worker", choices=sorted(DECODERS), help=argparse.SUPPRESS)
    p.add_argument("--what", choices=["decode", "train"], help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    if a.worker:
        print(json.dumps((decode_speed if a.what == "decode" else train_speed)(a)))
        return None
    return bench.record(tables, a, argv, "bench_mlx.py")


if __name__ == "__main__":
    main()
