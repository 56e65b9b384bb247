"""Decoding benchmarks on held-out validation prompts: ISD statistics and speed against AR, base vs
self-distilled, per stride and temperature; how each checkpoint was made; the cost of one batched step.

    python -m bench decode --out_dir=out        # TPF / acceptance per stride and temperature, ISD vs AR tok/s
    python -m bench temperature --out_dir=out   # TPF and ISD/AR against temperature (plot)
    python -m bench recipes --models=out-ar,out # losses and greedy TPF of each checkpoint
    python -m bench step --out_dir=out          # one batched ISD / AR step: ms per batch size
"""
import json
import os
import time
from collections import Counter

import torch

import checkpoint
import data
import sample
from bench.serving import PROMPTS, validation_prompts
from isd import Request, Stats, ar_generate, cache_length, decode, isd_generate, isd_step, prefill
from model import idlm_logits
from sampling import process_logits
from decoding import SamplingParams


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
    return sum((isd_generate(model, p,
                             SamplingParams(n, temperature=temperature, seed=seed + i), stride=stride, narrow=narrow)[1]
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
        reqs = [Request(prompt,
                        SamplingParams(b, temperature=temperature, seed=seed + samples * i + m)) for m in range(samples)]
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
    base, enc = sample.load_model(a.out_dir, None)
    models = [("base", base)]
    folder = checkpoint.distilled_or_base(a.out_dir)
    if folder != a.out_dir:
        models.append(("distilled", sample.load_model(folder, None)[0]))
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
    runs = [("AR (base)", lambda p, n: ar_generate(base, p, SamplingParams(n, temperature=0)))]
    runs += [(f"ISD {name}", lambda p, n, m=model: isd_generate(m, p,
                                                                SamplingParams(n, temperature=0),
                                                                stride=a.speed_stride)[0])
             for name, model in models]
    runs += [(f"ISD {models[-1][0]}, narrow window",
              lambda p, n: isd_generate(models[-1][1], p,
                                        SamplingParams(n, temperature=0), stride=a.speed_stride, narrow=True)[0])]
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
            raise SystemExit(f"python -m bench recipes: error: {out_dir} is not a train.py checkpoint "
                             "(no train_state.json)")
        _, task, clean = json.load(open(os.path.join(out_dir, "train_state.json")))["evals"][-1]
        parent = checkpoint.training_config(cfg["init_from"]) if cfg.get("init_from") else {}  # converted from
        ar_steps = cfg["max_iters"] if cfg["objective"] == "ar" else (
            parent["max_iters"] if parent.get("objective") == "ar" else 0)
        row = {"checkpoint": out_dir, "ar_steps": ar_steps, "idlm_steps": cfg["max_iters"] if cfg["objective"] == "idlm" else 0,
               "alpha": cfg["alpha"] if cfg["objective"] == "idlm" else None, "lr": cfg["lr"], "val_clean_loss": clean,
               "val_task_loss": task}
        base, enc = sample.load_model(out_dir, None)
        prompts = validation_prompts(out_dir, enc, a.prompts)
        tpf = lambda model: decode_stats(model, prompts, a.max_new_tokens, a.stride, 0, a.seed).tpf  # noqa: E731
        distilled = checkpoint.distilled_or_base(out_dir)
        row["tpf"] = tpf(base)
        row["tpf_distilled"] = tpf(sample.load_model(distilled, None)[0]) if distilled != out_dir else None
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
    base, enc = sample.load_model(a.out_dir, None)
    models = [("base", base)]
    folder = checkpoint.distilled_or_base(a.out_dir)
    if folder != a.out_dir:
        models.append(("distilled", sample.load_model(folder, None)[0]))
    prompts = validation_prompts(a.out_dir, enc, a.prompts)
    rows = []
    print(f"{a.out_dir}: {len(prompts)} validation prompts x {a.max_new_tokens} tokens, stride {a.stride}")
    print("\n| temperature | model | TPF | acceptance | ISD tok/s | AR (base) tok/s | ISD/AR |\n|---|---|---|---|---|---|---|")
    for temp in a.temperatures:
        runs = [("AR", lambda p, n, i=0: ar_generate(base, p, SamplingParams(n, temperature=temp, seed=a.seed)))]
        runs += [(name, lambda p, n, m=model: isd_generate(m, p,
                                                           SamplingParams(n, temperature=temp, seed=a.seed),
                                                           stride=a.stride)[0])
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
    model, enc = sample.load_model(source, None)
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
                reqs = [Request(enc.encode_ordinary(PROMPTS[i % len(PROMPTS)]),
                                SamplingParams(a.stride * a.steps, temperature=a.temperature, seed=i)) for i in range(B)]
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
