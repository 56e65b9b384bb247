"""Benchmarks, measured side by side in one run so that the ratios are fair.

    python bench.py train                 # training tokens/s: objective ar vs idlm (CPU preset shapes)
    python bench.py decode --out_dir=out  # base vs distilled: TPF / acceptance per stride and temperature,
                                          #   sampled drafts vs the exact-marginal ceiling, ISD vs AR tok/s
    python bench.py temperature --out_dir=out --plot=figures/temperature.png   # TPF and ISD/AR against temperature
    python bench.py recipes --models=out-ar,out   # how each checkpoint was made: losses, greedy TPF (base, distilled)
    python bench.py step --out_dir=out    # one batched ISD / AR step (the scheduler's unit): ms per batch size
    python bench.py serve --out_dir=out   # serve.py under load: tokens/s and latency per concurrency
    python bench.py concurrency --idlm=out --bdlm=out-bdlm   # static batches of C prompts: I-DLM vs block diffusion
    python bench.py smollm2 --isd=smollm2,out-rlora   # SmolLM2 chat: ISD / R-ISD vs AR vs transformers
    python bench.py introspect --models=out-ar,out,out-dlm   # the introspection gap: AR vs I-DLM vs DLM
    python bench_mlx.py --out_dir=out     # the MLX port vs PyTorch (its own script: each framework in its own process)
"""
# This file: the one argument parser (the docstring above is its --help) and the train, decode,
# temperature and step benchmarks; serve and concurrency run bench_serve.py, smollm2 bench_chat.py,
# introspect introspect.py.
import argparse
import contextlib
import io
import json
import os
import shlex
import statistics
import sys
import time
from collections import Counter

import torch

import bench_chat
import bench_learn
import bench_serve
import checkpoint
import data
import introspect
import lora
import options
import pretrained
from bench_serve import PROMPTS, validation_prompts
from isd import Request, Stats, ar_generate, cache_length, decode, isd_generate, isd_step, prefill
from model import Model, ar_loss, idlm_logits, idlm_loss, load_config
from sampling import process_logits


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


@torch.no_grad()
def lookahead_accuracy(model, enc, out_dir, rows=16):
    """Why TPF is what it is: top-1 accuracy on validation rows of the clean stream (1 token ahead)
    and of the masks at each block offset (2..N ahead), from one [xt | x0] training forward.
    A greedy draft passes only if its argmax agrees with the clean stream's, so these bound TPF."""
    cfg = checkpoint.training_config(out_dir)
    _, _, val = data.load_corpus(cfg["data"], enc=enc, log=lambda *_: None)
    L, b = cfg["seq_len"], cfg["stride"] - 1
    x0 = torch.from_numpy(data.get_batch(val, data.batch_offsets(len(val), L, rows, seed=0), L))
    logits = torch.cat(idlm_logits(model, x0, stride=cfg["stride"]), 1)  # [xt | x0], every xt token a MASK
    logits[..., model.cfg.mask_token_id] = float("-inf")
    pred, target = logits.argmax(-1), x0[:, 1:]
    clean = (pred[:, L:2 * L - 1] == target).float().mean()
    mask_hit = pred[:, :L - 1] == target
    offset = torch.arange(L - 1) % b
    print(f"top-1 accuracy on {rows} validation rows of {L} tokens: clean (1 ahead) {clean:.3f} | masks: "
          + " | ".join(f"{m + 2} ahead {mask_hit[:, offset == m].float().mean():.3f}" for m in range(b)))


def decode_stats(model, prompts, n, stride, temperature, seed, narrow=False):
    """ISD's Stats summed over prompts (request i has seed + i)."""
    return sum((isd_generate(model, p, n, stride, temperature=temperature, seed=seed + i, narrow=narrow)[1]
                for i, p in enumerate(prompts)), Stats())


@torch.no_grad()
def acceptance_ceiling(models, prompts, stride, temperature, samples=32, seed=0):
    """How far the masks' sampled drafts are from the best any drafter that sees only the committed
    prefix could do, per draft slot k = 2..N ahead of the last committed token.

    For each prompt, `samples` continuations x_{t+1..t+N-1} are drawn from the model (batched AR at
    `temperature`), and p_k = p(. | x_{<=t+k-1}) is its next-token distribution along each. A draft for
    slot k drawn from q is accepted with probability sum_y min(p_k(y), q(y)) (speculative sampling);
    the best q knowing only x_{<=t} is the model's own k-ahead marginal E[p_k], estimated here
    leaving the continuation itself out. Returns {name: [mean acceptance for k = 2..N]} for each
    (name, model) in `models` (their masks' q_k: one causal forward of [prompt, MASK x (N-1)]) and
    for "exact marginal". The same random continuations serve every model (all share the base's p)."""
    base, mask_id, b = models[0][1], models[0][1].cfg.mask_token_id, stride - 1
    out = {name: torch.zeros(b) for name in [n for n, _ in models] + ["exact marginal"]}
    for i, prompt in enumerate(prompts):
        reqs = [Request(prompt, b, temperature, seed=seed + samples * i + m) for m in range(samples)]
        decode(base, reqs, stride=1)
        t = len(prompt) - 1
        rows = torch.tensor([prompt + r.out for r in reqs])
        probs = lambda logits: (process_logits(logits, mask_id, temperature) / temperature).softmax(-1)  # noqa: E731
        p = probs(base(rows)[:, t + 1:t + stride].double())  # (samples, N-1, V): p_k along each continuation
        loo = (p.sum(0, keepdim=True) - p) / (samples - 1)  # the k-ahead marginal without the row itself
        out["exact marginal"] += torch.minimum(p, loo).sum(-1).mean(0)
        for name, model in models:
            q = probs(model(torch.tensor([prompt + [mask_id] * b]))[0, t + 1:t + stride].double())
            out[name] += torch.minimum(p, q[None]).sum(-1).mean(0)
    return {name: (v / len(prompts)).tolist() for name, v in out.items()}


def speed(runs, prompts, n, repeats):
    """tok/s of each (name, generate(prompt, n) -> tokens) in `runs`, alternated prompt by prompt."""
    t, toks = Counter(), Counter()
    for rep in range(repeats + 1):  # round 0 warms up
        for p in prompts:
            for name, gen in runs:
                t0 = time.perf_counter()
                out = gen(p, n)
                if rep:
                    t[name] += time.perf_counter() - t0
                    toks[name] += len(out)
    return {name: toks[name] / t[name] for name, _ in runs}


def bench_decode(a):
    """Base vs self-distilled model on held-out validation prompts: ISD statistics per stride and
    temperature (and with the narrow window at --speed_stride), then batch-1 speed of ISD against the
    base model's AR (greedy, alternated)."""
    base, enc = lora.load_model(a.out_dir)
    models = [("base", base)]
    folder = checkpoint.distilled_or_base(a.out_dir)
    if folder != a.out_dir:
        models.append(("distilled", lora.load_model(folder)[0]))
    lookahead_accuracy(base, enc, a.out_dir)
    prompts = validation_prompts(a.out_dir, enc, a.prompts)
    print(f"{a.out_dir}: {len(prompts)} validation prompts x {a.max_new_tokens} new tokens, seed {a.seed}; "
          f"models: " + ", ".join(f"{name} ({folder if name == 'distilled' else a.out_dir})" for name, _ in models))
    print("\n| model | stride | temperature | TPF | acceptance | V | R | C |\n|---|---|---|---|---|---|---|---|")
    for name, model in models:
        for stride, narrow in [(s, False) for s in a.strides] + [(a.speed_stride, True)]:
            for temp in a.temperatures:
                st = decode_stats(model, prompts, a.max_new_tokens, stride, temp, a.seed, narrow)
                f = st.forwards
                print(f"| {name} | {stride}{' narrow' if narrow else ''} | {temp} | {st.tpf:.2f} | "
                      f"{st.acceptance_rate:.3f} | {st.rounds_v / f:.0%} | {st.rounds_r / f:.0%} | {st.rounds_c / f:.0%} |")
    for temp in [t for t in a.temperatures if t > 0]:
        ceil = acceptance_ceiling(models, prompts, a.speed_stride, temp)
        print(f"\nsampled drafts at temperature {temp}, stride {a.speed_stride}: acceptance per slot k ahead of the last "
              f"committed token (32 continuations per prompt)\n| q | " + " | ".join(f"k={k + 2}" for k in range(a.speed_stride - 1))
              + " |\n|---|" + "---|" * (a.speed_stride - 1))
        for name, acc in ceil.items():
            print(f"| {name} | " + " | ".join(f"{x:.3f}" for x in acc) + " |")
    runs = [("AR (base)", lambda p, n: ar_generate(base, p, n, temperature=0))]
    runs += [(f"ISD {name}", lambda p, n, m=model: isd_generate(m, p, n, a.speed_stride, temperature=0)[0])
             for name, model in models]
    runs += [(f"ISD {models[-1][0]}, narrow window",
              lambda p, n: isd_generate(models[-1][1], p, n, a.speed_stride, temperature=0, narrow=True)[0])]
    tps = speed(runs, prompts[:a.speed_prompts], a.max_new_tokens, a.repeats)
    print(f"\nbatch 1, greedy, stride {a.speed_stride}, {torch.get_num_threads()} thread(s): "
          + " | ".join(f"{k} {v:.0f} tok/s ({v / tps['AR (base)']:.2f}x)" for k, v in tps.items()))


def bench_recipes(a):
    """How each checkpoint was made and what it gives: the AR steps it was converted from (its --init_from
    chain) and its own steps and alpha, its validation losses (the clean loss against the first model's,
    an AR baseline), and greedy ISD tokens per forward on held-out prompts, base and self-distilled."""
    rows = []
    print(f"{a.prompts} held-out validation prompts x {a.max_new_tokens} tokens, greedy ISD, stride {a.stride}\n")
    print("| checkpoint | AR steps | I-DLM steps | alpha | lr | val clean loss | vs first | val task loss "
          "| greedy TPF | greedy TPF distilled |\n|---|---|---|---|---|---|---|---|---|---|")
    for out_dir in a.models:
        cfg = checkpoint.training_config(out_dir)
        if not cfg:
            raise SystemExit(f"bench.py: error: {out_dir} is not a train.py checkpoint (no train_state.json)")
        _, task, clean = json.load(open(os.path.join(out_dir, "train_state.json")))["evals"][-1]
        parent = checkpoint.training_config(cfg["init_from"]) if cfg.get("init_from") else {}  # converted from
        ar_steps = cfg["max_iters"] if cfg["objective"] == "ar" else (
            parent["max_iters"] if parent.get("objective") == "ar" else 0)
        row = {"checkpoint": out_dir, "ar_steps": ar_steps, "idlm_steps": cfg["max_iters"] if cfg["objective"] == "idlm" else 0,
               "alpha": cfg["alpha"] if cfg["objective"] == "idlm" else None, "lr": cfg["lr"], "val_clean_loss": clean,
               "val_task_loss": task}
        base, enc = lora.load_model(out_dir)
        prompts = validation_prompts(out_dir, enc, a.prompts)
        tpf = lambda model: decode_stats(model, prompts, a.max_new_tokens, a.stride, 0, a.seed).tpf  # noqa: E731
        distilled = checkpoint.distilled_or_base(out_dir)
        row["tpf"] = tpf(base)
        row["tpf_distilled"] = tpf(lora.load_model(distilled)[0]) if distilled != out_dir else None
        rows.append(row)
        fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        print(f"| {out_dir} | {ar_steps} | {row['idlm_steps']} | {row['alpha'] if row['alpha'] is not None else '-'} "
              f"| {cfg['lr']:g} | {clean:.4f} | {clean / rows[0]['val_clean_loss'] - 1:+.1%} | {task:.4f} | {fmt(row['tpf'])} "
              f"| {fmt(row['tpf_distilled'])} |", flush=True)
    return rows


def bench_temperature(a):
    """TPF and batch-1 ISD/AR speed against temperature, base vs distilled, on held-out prompts; a plot."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    base, enc = lora.load_model(a.out_dir)
    models = [("base", base)]
    folder = checkpoint.distilled_or_base(a.out_dir)
    if folder != a.out_dir:
        models.append(("distilled", lora.load_model(folder)[0]))
    prompts = validation_prompts(a.out_dir, enc, a.prompts)
    rows = []
    print(f"{a.out_dir}: {len(prompts)} validation prompts x {a.max_new_tokens} tokens, stride {a.stride}")
    print("\n| temperature | model | TPF | acceptance | ISD tok/s | AR (base) tok/s | ISD/AR |\n|---|---|---|---|---|---|---|")
    for temp in a.temperatures:
        runs = [("AR", lambda p, n, i=0: ar_generate(base, p, n, temperature=temp, seed=a.seed))]
        runs += [(name, lambda p, n, m=model: isd_generate(m, p, n, a.stride, temperature=temp, seed=a.seed)[0])
                 for name, model in models]
        tps = speed(runs, prompts[:a.speed_prompts], a.max_new_tokens, a.repeats)
        for name, model in models:
            st = decode_stats(model, prompts, a.max_new_tokens, a.stride, temp, a.seed)
            rows.append(dict(temperature=temp, model=name, tpf=st.tpf, acceptance=st.acceptance_rate,
                             isd_tps=tps[name], ar_tps=tps["AR"], ratio=tps[name] / tps["AR"]))
            r = rows[-1]
            print(f"| {temp} | {name} | {r['tpf']:.2f} | {r['acceptance']:.3f} | {r['isd_tps']:.0f} | "
                  f"{r['ar_tps']:.0f} | {r['ratio']:.2f}x |", flush=True)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, _ in models:
        rs = [r for r in rows if r["model"] == name]
        ax1.plot([r["temperature"] for r in rs], [r["tpf"] for r in rs], "o-", label=name)
        ax2.plot([r["temperature"] for r in rs], [r["ratio"] for r in rs], "o-", label=name)
    ax1.set(xlabel="temperature", ylabel="tokens per forward", title=f"ISD, stride {a.stride}")
    ax2.axhline(1.0, color="gray", lw=0.8)
    ax2.set(xlabel="temperature", ylabel="ISD tok/s / base AR tok/s", title="batch 1 speed vs AR")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(a.plot, dpi=120)
    print(f"wrote {a.plot}")


def bench_step(a):
    """What one step of the batched core costs (isd.isd_step, as the scheduler runs it) on B rows: ISD at
    --stride with the N*N window and with the narrow one vs AR (stride 1), and how much of it is the
    model's forward. Best of --repeats. The model is the distilled one where there is one (AR through
    it runs the base weights only)."""
    source = checkpoint.distilled_or_base(a.out_dir)
    model, enc = lora.load_model(source)
    forward, spent = model.forward, []

    def timed_forward(*args, **kw):
        t0 = time.perf_counter()
        out = forward(*args, **kw)
        spent.append(time.perf_counter() - t0)
        return out
    model.forward = timed_forward
    print(f"{source}: {a.steps} steps per run, temperature {a.temperature}, {torch.get_num_threads()} thread(s)")
    kinds = {"ISD": (a.stride, False), "ISD narrow": (a.stride, True), "AR": (1, False)}
    print("\n| batch | " + " | ".join(f"{k} step ms | its forward ms | tokens per row-step" for k in kinds)
          + " | AR tok/s | ISD/AR | ISD narrow/AR |")
    print("|---" * (3 * len(kinds) + 4) + "|")
    for B in a.batch:
        best = {}
        for rep in range(a.repeats + 1):  # run 0 warms up; the kinds take turns
            for kind, (stride, narrow) in kinds.items():
                reqs = [Request(enc.encode_ordinary(PROMPTS[i % len(PROMPTS)]), a.stride * a.steps, a.temperature,
                                seed=i) for i in range(B)]
                cache = model.new_cache(B, cache_length(model, reqs, a.stride))
                prefill(model, cache, list(range(B)), reqs)
                spent.clear()
                t0 = time.perf_counter()
                tokens = sum(len(new) for _ in range(a.steps)
                             for new in isd_step(model, cache, list(range(B)), reqs, stride, narrow))
                run = ((time.perf_counter() - t0) / a.steps, sum(spent) / a.steps, tokens / (B * a.steps))
                if rep and (kind not in best or run[0] < best[kind][0]):
                    best[kind] = run
        tps = {k: B * tpf / step for k, (step, _, tpf) in best.items()}
        print(f"| {B} | " + " | ".join(f"{1e3 * s:.1f} | {1e3 * f:.1f} | {n:.2f}" for s, f, n in best.values())
              + f" | {tps['AR']:.0f} | {tps['ISD'] / tps['AR']:.2f}x | {tps['ISD narrow'] / tps['AR']:.2f}x |")


def parse_args(argv):
    """The subcommands and their options, one block each."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    common = argparse.ArgumentParser(add_help=False)  # every subcommand
    common.add_argument("--markdown", metavar="FILE.md", help="also write what the benchmark prints to this file, under "
                        "the command that made it (less this option; with OMP_NUM_THREADS when set): the form the tables "
                        "in README.md and docs/ take; and its rows as JSON to FILE.json where the benchmark returns them")
    held_out = argparse.ArgumentParser(add_help=False)  # introspect, concurrency: continuations of held-out prompts
    held_out.add_argument("--prompt_len", type=int, default=16,
                          help="prompt tokens, from the validation split (default 16)")
    held_out.add_argument("--max_new_tokens", type=int, default=64, help="tokens per continuation (default 64)")
    held_out.add_argument("--temperature", type=float, default=1.0,
                          help="sampling temperature of every model (default 1)")
    held_out.add_argument("--top_k", type=int, default=50,
                          help="top-k of every model, 0 = off (default 50: the paper's evaluation)")
    held_out.add_argument("--top_p", type=float, default=0.95,
                          help="top-p of every model, 1 = off (default 0.95: the paper's)")
    held_out.add_argument("--seed", type=int, default=0,
                          help="picks the prompts; continuation i has seed+i (default 0)")
    held_out.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    # train
    t = sub.add_parser("train", parents=[common], help="training throughput, ar vs idlm")
    t.add_argument("--preset", default="cpu", choices=sorted(options.PRESETS))
    t.add_argument("--steps", type=int, default=10)
    t.add_argument("--device", default="cpu", help="cpu, cuda (default cpu)")
    # decode
    d = sub.add_parser("decode", parents=[common], help="ISD statistics per stride, and ISD vs AR speed")
    d.add_argument("--out_dir", default="out", help="base checkpoint; its distilled/ adapter is measured too")
    d.add_argument("--strides", type=lambda s: [int(x) for x in s.split(",")], default=[2, 4, 6])
    d.add_argument("--temperatures", type=lambda s: [float(x) for x in s.split(",")], default=[0.0, 0.8])
    d.add_argument("--prompts", type=int, default=16, help="held-out validation prompts (default 16)")
    d.add_argument("--max_new_tokens", type=int, default=100)
    d.add_argument("--speed_stride", type=int, default=4)
    d.add_argument("--speed_prompts", type=int, default=4, help="prompts in the speed runs (default 4)")
    d.add_argument("--repeats", type=int, default=3)
    d.add_argument("--seed", type=int, default=1)
    # temperature
    s = sub.add_parser("temperature", parents=[common], help="TPF and ISD/AR speed against temperature, base vs distilled (plot)")
    s.add_argument("--out_dir", default="out")
    s.add_argument("--temperatures", type=lambda s: [float(x) for x in s.split(",")], default=[0, 0.2, 0.4, 0.6, 0.8, 1.0])
    s.add_argument("--stride", type=int, default=4)
    s.add_argument("--prompts", type=int, default=16, help="held-out validation prompts for TPF (default 16)")
    s.add_argument("--speed_prompts", type=int, default=4, help="of them, in the speed runs (default 4)")
    s.add_argument("--max_new_tokens", type=int, default=100)
    s.add_argument("--repeats", type=int, default=2)
    s.add_argument("--seed", type=int, default=1)
    s.add_argument("--plot", default="temperature.png", help="where to write the PNG plot (default temperature.png)")
    # recipes
    s = sub.add_parser("recipes", parents=[common], help="how each checkpoint was made (AR steps, I-DLM steps, alpha), "
                       "its validation losses and greedy TPF, base and distilled")
    s.add_argument("--models", type=lambda v: v.split(","), required=True,
                   help="comma-separated train.py checkpoints; the first (an AR baseline) is the reference loss")
    s.add_argument("--prompts", type=int, default=16, help="held-out validation prompts (default 16)")
    s.add_argument("--max_new_tokens", type=int, default=100)
    s.add_argument("--stride", type=int, default=4)
    s.add_argument("--seed", type=int, default=1)
    # step
    s = sub.add_parser("step", parents=[common], help="the cost of one batched ISD / AR step, and of its forward, per batch size")
    s.add_argument("--out_dir", default="out")
    s.add_argument("--batch", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16, 32])
    s.add_argument("--stride", type=int, default=4)
    s.add_argument("--temperature", type=float, default=0.8)
    s.add_argument("--steps", type=int, default=16, help="steps per run (default 16)")
    s.add_argument("--repeats", type=int, default=5, help="runs per point; the best is shown (default 5)")
    # serve
    s = sub.add_parser("serve", parents=[common], help="serve.py under load: (a) ISD stride 4, (b) stride 1, (c) one at a time, (d) the narrow window")
    s.add_argument("--out_dir", default="out", help="checkpoint folder to serve (default out)")
    s.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8, 16, 32],
                   help="numbers of concurrent clients (default 1,2,4,8,16,32)")
    s.add_argument("--max_tokens", type=int, default=64, help="tokens per request, fewer at EOS (default 64)")
    s.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; request i has seed i (default 0.8)")
    s.add_argument("--per_client", type=int, default=4,
                   help="requests each client sends back to back, so that the batch stays full while requests "
                        "come and go, as in steady serving (default 4)")
    s.add_argument("--repeats", type=int, default=3, help="runs per point; the table shows the median (default 3)")
    s.add_argument("--min_requests", type=int, default=8,
                   help="requests per point: max(per_client x concurrency, this) (default 8)")
    s.add_argument("--threads", type=int, default=1, help="torch threads of the server, as OMP_NUM_THREADS (default 1)")
    s.add_argument("--plot", default="serve.png", help="where to write the PNG plot (default serve.png)")
    # concurrency
    s = sub.add_parser("concurrency", parents=[common, held_out],
                       help="static batches of C held-out prompts: I-DLM (ISD) vs block diffusion (KV cache) tokens/s per C")
    s.add_argument("--idlm", default="out", help="I-DLM checkpoint; its distilled adapter is used where there is one "
                   "(default out)")
    s.add_argument("--base", action="store_true", help="decode the I-DLM without its distilled adapter")
    s.add_argument("--bdlm", default="out-bdlm", help="block diffusion checkpoint, train.py --objective=bdlm "
                   "(default out-bdlm)")
    s.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8, 16, 32, 64],
                   help="prompts per static batch (default 1,2,4,8,16,32,64)")
    s.add_argument("--dlm_steps", type=lambda s: [int(x) for x in s.split(",")], default=[2, 1],
                   help="bdlm denoising steps per block, one setting each (default 2,1: 2 and 4 tokens per forward "
                        "with blocks of 4)")
    s.add_argument("--stride", type=int, default=4, help="ISD stride N of the I-DLM (default 4)")
    s.add_argument("--ar", action="store_true", help="also AR: stride-1 decoding of the I-DLM's base model")
    s.add_argument("--repeats", type=int, default=1, help="runs per point, the median is shown (default 1)")
    s.add_argument("--device", default="cpu", help="cpu, cuda (default cpu; the judge runs on the CPU)")
    # smollm2
    s = sub.add_parser("smollm2", parents=[common], help="SmolLM2 chat: ISD / R-ISD vs AR vs transformers generate()")
    s.add_argument("--isd", type=lambda v: v.split(","), default=["smollm2"],
                   help="comma-separated models to decode with ISD: smollm2, checkpoint or adapter folders")
    s.add_argument("--stride", type=int, default=4, help="ISD stride N (default 4)")
    s.add_argument("--max_new_tokens", type=int, default=48, help="reply length cap per prompt (default 48)")
    s.add_argument("--repeats", type=int, default=1, help="passes over the prompts (default 1)")
    s.add_argument("--no_hf", action="store_true", help="leave out transformers' generate()")
    s.add_argument("--device", default="cpu", help="cpu, cuda (default cpu)")
    # introspect
    s = sub.add_parser("introspect", parents=[common, held_out],
                       help="the introspection gap: quality, acceptance and speed of AR, I-DLM, DLM")
    s.add_argument("--models", type=lambda v: v.split(","), default=["out-ar", "out", "out-dlm", "out-bdlm"],
                   help="comma-separated train.py checkpoints of any objective, same tokenizer "
                        "(default out-ar,out,out-dlm,out-bdlm)")
    s.add_argument("--dlm_steps", type=lambda s: [int(x) for x in s.split(",")], default=[4, 2, 1],
                   help="denoising steps per block of the diffusion models, one row each (default 4,2,1)")
    s.add_argument("--threshold", type=float, default=None, help="also a Fast-dLLM row with this confidence threshold")
    s.add_argument("--stride", type=int, default=4, help="ISD stride N of the I-DLM models (default 4)")
    s.add_argument("--n", type=int, default=64, help="continuations per row (default 64)")
    s.add_argument("--quick", action="store_true", help="8 continuations of 24 tokens, two steps settings")
    s.add_argument("--json", action="store_true", help="print the rows as a JSON list instead of the table")
    s.add_argument("--no_progress", action="store_true", help="no progress bar")
    s.add_argument("--plot", default=None, help="also write the quality vs speed plot (PNG) here")
    # learn
    bench_learn.add_arguments(sub.add_parser("learn", parents=[common], help="a server learning its speculator from "
                                             "the traffic it serves: TPF and tok/s against requests served (plot)"))
    a = p.parse_args(argv)
    if a.what in ("introspect", "concurrency"):
        a.top_k, a.top_p = a.top_k or None, (a.top_p if a.top_p < 1 else None)
    if a.what in ("decode", "concurrency") and a.repeats < 1:
        p.error("--repeats must be >= 1")
    return a


class Tee(io.StringIO):
    """What is printed goes where it went before (the terminal) and is kept."""

    def __init__(self):
        super().__init__()
        self.out = sys.stdout

    def write(self, text):
        self.out.write(text)
        return super().write(text)


def record(run, a, argv, script="bench.py"):
    """Run the benchmark `run(a)`; with --markdown, also write what it printed under the command that made it
    (argv less --markdown, with OMP_NUM_THREADS when set) and its rows as JSON beside it."""
    if not a.markdown:
        return run(a)
    args = [x for x in (sys.argv[1:] if argv is None else argv) if not x.startswith("--markdown")]
    threads = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    command = threads + f"python {script} " + shlex.join(args)
    with contextlib.redirect_stdout(Tee()) as out:
        rows = run(a)
    with open(a.markdown, "w") as f:
        f.write(f"Command: `{command}`\n\n{out.getvalue()}")
    if rows is not None:
        with open(os.path.splitext(a.markdown)[0] + ".json", "w") as f:
            json.dump({"command": command, "rows": rows}, f, indent=1)
    print(f"wrote {a.markdown}", file=sys.stderr)
    return rows


def main(argv=None):
    a = parse_args(argv)
    run = {"train": bench_train, "decode": bench_decode, "temperature": bench_temperature, "step": bench_step,
           "serve": bench_serve.bench_serve, "concurrency": bench_serve.bench_concurrency,
           "smollm2": bench_chat.bench_smollm2, "introspect": introspect.table, "recipes": bench_recipes, "learn": bench_learn.bench_learn}[a.what]
    return record(run, a, argv)


if __name__ == "__main__":
    main()
