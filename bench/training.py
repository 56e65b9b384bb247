"""Training throughput: AR and I-DLM optimizer steps alternated on the same batch of a train.py preset.

    python -m bench train                 # the cpu preset's shapes (options: python -m bench train --help)
"""
import statistics
import time

import torch

import options
import pretrained
from model import Model, ar_loss, idlm_loss, load_config


def preset_model_config(preset):
    """The model of `python train.py --preset=<preset>` with no other option: the preset's shape and its
    vocab_size ids + MASK (a BPE reaches vocab_size on all but tiny data); for smollm2, which starts
    from SmolLM2 (--init_from=smollm2), SmolLM2's, converted on first use."""
    if preset == "smollm2":
        return load_config(pretrained.smollm2_dir())
    cfg = {**options.DEFAULTS, **options.PRESETS[preset]}
    return options.model_config(cfg, cfg["vocab_size"])


def train_throughput(preset, steps, device="cpu", stop=lambda: False):
    """Alternate AR and I-DLM steps on the same random batch of a train.py preset, with the model train.py
    builds for it (bfloat16 autocast on CUDA, as train.py); median tokens/s of each. `stop()` is asked before each step pair after the
    warm-up; True ends the run early. Returns {"ar", "idlm": tok/s, "steps", "params", "tokens_per_step"}."""
    pre, cfg = options.PRESETS[preset], preset_model_config(preset)
    V = cfg.mask_token_id  # the ids below MASK
    torch.manual_seed(0)
    x = torch.randint(0, V, (pre["batch_size"], pre["seq_len"]), device=device)
    runs = {"ar": lambda m: ar_loss(m, x), "idlm": lambda m: idlm_loss(m, x, stride=4)[0]}
    models = {k: Model(cfg).to(device) for k in runs}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    cuda = str(device).startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times = {k: [] for k in runs}
    for step in range(steps + 2):
        if step > 2 and stop():
            break
        for k, f in runs.items():
            sync()
            t0 = time.perf_counter()
            with torch.autocast("cuda", torch.bfloat16, enabled=cuda):
                loss = f(models[k])
            loss.backward()
            opts[k].step()
            opts[k].zero_grad()
            sync()
            if step >= 2:  # the first steps warm up the allocator
                times[k].append(time.perf_counter() - t0)
    tokens = pre["batch_size"] * pre["seq_len"]
    return {**{k: tokens / statistics.median(v) for k, v in times.items()}, "steps": len(times["ar"]),
            "params": sum(p.numel() for p in models["ar"].parameters()), "tokens_per_step": tokens}


def bench_train(a):
    """Training tokens/s of the two objectives on a preset's shapes, and their ratio."""
    r = train_throughput(a.preset, a.steps, a.device)
    pre = options.PRESETS[a.preset]
    print(f"preset {a.preset}: {r['params'] / 1e6:.2f}M params, "
          f"{pre['batch_size']} x {pre['seq_len']} tokens per step, median of {r['steps']} steps, "
          f"{torch.get_num_threads()} threads, {a.device}")
    for k in ("ar", "idlm"):
        print(f"  {k:5s} {r[k]:8.0f} tok/s (data tokens; idlm runs 2L per row)")
    print(f"  idlm / ar = {r['idlm'] / r['ar']:.2f}x")
