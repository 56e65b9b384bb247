"""The MLX port against PyTorch on the same checkpoint: decoding tokens/s (ISD and AR, batch 1 and a batch of
8, greedy) and training tokens/s (one introspective-loss optimizer step at the cpu preset's shapes).

    python -m bench mlx --out_dir=out                   # the tables of docs/mlx.md
    python -m bench mlx --out_dir=out --markdown=docs/figures/mlx.md

Each measurement runs in a process of its own that imports one framework's decoder (bench/mlx_vs_torch_worker.py),
and the two frameworks take turns, round after round: in one process their thread pools (torch's OpenMP, the
OpenBLAS that mlx_port loads on Linux) would spin against each other on a small CPU and slow both.
"""
import json
import os
import statistics
import subprocess
import sys

import torch

import checkpoint
import options

FRAMEWORKS = ["PyTorch", "MLX"]  # bench/mlx_vs_torch_worker.py's DECODERS, in turn


def worker(what, framework, a, **kw):
    """Run one measurement in a fresh process (bench/mlx_vs_torch_worker.py, the options as JSON); its JSON result."""
    opts = {k: v for k, v in {**vars(a), "batch": 1, **kw}.items() if k not in ("what", "markdown", "rounds")}
    opts.update(framework=framework, what=what)
    args = [sys.executable, "-m", "bench.mlx_vs_torch_worker", json.dumps(opts)]
    env = {**os.environ, "IDLM_MLX_BLAS": "bundled" if framework == "PyTorch" else os.environ.get("IDLM_MLX_BLAS", "")}
    r = subprocess.run(args, capture_output=True, text=True, check=False, env=env)  # (OpenBLAS would slow PyTorch)
    if r.returncode:
        raise SystemExit(f"python -m bench mlx: worker failed:\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def tables(a):
    """The decoding table (per batch size) and the training table, PyTorch and MLX in turn, a median of a.rounds."""
    import mlx.core as mx  # the device's name only: the measurements import MLX in their own processes
    rounds = range(a.rounds)
    print(f"{checkpoint.distilled_or_base(a.out_dir)}: {a.prompts} held-out prompts x {a.max_new_tokens} tokens, greedy, "
          f"ISD stride {a.stride}; each figure the median of {a.rounds} rounds (PyTorch and MLX in turn, a process "
          f"each; best of {a.repeats} runs inside); torch threads {torch.get_num_threads()}, MLX on {mx.default_device()}\n")
    print("| batch | PyTorch AR | PyTorch ISD | PyTorch ISD/AR | MLX AR | MLX ISD | MLX ISD/AR | MLX/PyTorch (ISD) | TPF |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for batch in a.batch:
        runs = [{fw: worker("decode", fw, a, batch=batch) for fw in FRAMEWORKS} for _ in rounds]
        med = {(fw, k): statistics.median(r[fw][k] for r in runs) for fw in FRAMEWORKS for k in ("AR", "ISD")}
        tpf = {fw: runs[0][fw]["ISD TPF"] for fw in FRAMEWORKS}
        rows.append({"batch": batch, **{f"{fw} {k}": v for (fw, k), v in med.items()}, "TPF": tpf})
        print(f"| {batch} | " + " | ".join(f"{med[fw, 'AR']:.0f} | {med[fw, 'ISD']:.0f} | {med[fw, 'ISD'] / med[fw, 'AR']:.2f}x"
                                          for fw in FRAMEWORKS)
              + f" | {med['MLX', 'ISD'] / med['PyTorch', 'ISD']:.2f}x | "
              + ("{:.2f}".format(tpf["MLX"]) if tpf["MLX"] == tpf["PyTorch"] else f"{tpf['PyTorch']:.2f} vs {tpf['MLX']:.2f}")
              + " |")
    runs = [{k: v for fw in FRAMEWORKS for k, v in worker("train", fw, a).items()} for _ in rounds]
    tps = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    pre = options.PRESETS[a.preset]
    print(f"\ntraining, preset {a.preset} ({pre['batch_size']} x {pre['seq_len']} tokens per step, introspective loss at "
          f"stride 4), median of {a.steps} steps, then of {a.rounds} rounds\n\n| framework | tok/s | vs PyTorch |\n|---|---|---|")
    for k, v in tps.items():
        print(f"| {k} | {v:.0f} | {v / tps['PyTorch']:.2f}x |")
    return {"decode": rows, "train": tps}
