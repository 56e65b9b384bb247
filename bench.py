"""Benchmarks, measured side by side in one run so that the ratios are fair.

    python bench.py train                 # training tokens/s: objective ar vs idlm (CPU preset shapes)
    python bench.py decode --out_dir=out  # ISD TPF / acceptance per stride and temperature; ISD vs AR tok/s
    python bench.py step --out_dir=out    # one batched ISD / AR step (the scheduler's unit): ms per batch size
    python bench.py serve --out_dir=out   # serve.py under load: tokens/s and latency per concurrency
    python bench.py smollm2 --isd=smollm2,out-rlora   # SmolLM2 chat: ISD / R-ISD vs AR vs transformers
    python bench.py introspect --models=out-ar,out,out-dlm   # the introspection gap: AR vs I-DLM vs DLM
"""
import argparse
import asyncio
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter

import torch

import data
import dlm
import tokenizer as tok
from isd import Request, ar_generate, isd_generate, isd_step, prefill, process_logits
from model import Model, ModelConfig, ar_loss, idlm_loss, idlm_mask
from train import MODEL_KEYS, PRESETS

PROMPTS = ["ROMEO:\n", "KING HENRY.\nOnce more unto the breach", "First Citizen.\n", "HAMLET.\nTo be, or not to be"]


def bench_train(a):
    """Alternate AR and I-DLM steps on the same random batch; report median tokens/s of each."""
    pre = PRESETS[a.preset]
    V = pre["vocab_size"]
    cfg = ModelConfig(vocab_size=V + 1, mask_token_id=V, max_seq_len=pre["seq_len"], **{k: pre[k] for k in MODEL_KEYS if k in pre})
    torch.manual_seed(0)
    x = torch.randint(0, V, (pre["batch_size"], pre["seq_len"]))
    runs = {"ar": lambda m: ar_loss(m, x), "idlm": lambda m: idlm_loss(m, x, stride=4)[0]}
    models = {k: Model(cfg) for k in runs}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    times = {k: [] for k in runs}
    for step in range(a.steps + 2):
        for k, f in runs.items():
            t0 = time.perf_counter()
            f(models[k]).backward()
            opts[k].step()
            opts[k].zero_grad()
            if step >= 2:  # the first steps warm up the allocator
                times[k].append(time.perf_counter() - t0)
    tps = {k: pre["batch_size"] * pre["seq_len"] / statistics.median(v) for k, v in times.items()}
    print(f"preset {a.preset}: {sum(p.numel() for p in models['ar'].parameters()) / 1e6:.2f}M params, "
          f"{pre['batch_size']} x {pre['seq_len']} tokens per step, median of {a.steps} steps, "
          f"{torch.get_num_threads()} threads")
    for k in runs:
        print(f"  {k:5s} {tps[k]:8.0f} tok/s (data tokens; idlm runs 2L per row)")
    print(f"  idlm / ar = {tps['idlm'] / tps['ar']:.2f}x")


@torch.no_grad()
def lookahead_accuracy(model, enc, out_dir, rows=16):
    """Why TPF is what it is: top-1 accuracy on validation rows of the clean stream (1 token ahead)
    and of the masks at each block offset (2..N ahead), from one [xt | x0] training forward.
    A greedy draft passes only if its argmax agrees with the clean stream's, so these bound TPF."""
    with open(os.path.join(out_dir, "train_state.json")) as f:
        cfg = json.load(f)["config"]
    _, _, val = data.load_corpus(cfg["data"], enc=enc, log=lambda *_: None)
    L, b = cfg["seq_len"], cfg["stride"] - 1
    x0 = data.get_batch(val, data.batch_offsets(len(val), L, rows, seed=0), L)
    xt = torch.full_like(x0, model.cfg.mask_token_id)
    logits = model(torch.cat([xt, x0], 1), pos=torch.arange(L).repeat(2), mask=idlm_mask(L, b))
    logits[..., model.cfg.mask_token_id] = float("-inf")
    pred, target = logits.argmax(-1), x0[:, 1:]
    clean = (pred[:, L:2 * L - 1] == target).float().mean()
    mask_hit = pred[:, :L - 1] == target
    offset = torch.arange(L - 1) % b
    print(f"top-1 accuracy on {rows} validation rows of {L} tokens: clean (1 ahead) {clean:.3f} | masks: "
          + " | ".join(f"{m + 2} ahead {mask_hit[:, offset == m].float().mean():.3f}" for m in range(b)))


def bench_decode(a):
    model, enc = Model.load(a.out_dir).eval(), tok.load(a.out_dir)
    lookahead_accuracy(model, enc, a.out_dir)
    prompts = [enc.encode_ordinary(p) for p in PROMPTS]
    n = min(a.max_new_tokens, model.cfg.max_seq_len - max(map(len, prompts)))
    print(f"{a.out_dir}: {len(prompts)} prompts x {n} new tokens, seed {a.seed}")
    print("stride  temp   TPF   accept   V    R    C")
    for stride in a.strides:
        for temp in (0.0, 0.8):
            tot = {"tokens": 0, "forwards": 0, "drafts_verified": 0, "acceptance_sum": 0.0,
                   "rounds_v": 0, "rounds_r": 0, "rounds_c": 0}
            for i, p in enumerate(prompts):
                st = isd_generate(model, p, n, stride, temperature=temp, seed=a.seed + i)[1]
                for k in tot:
                    tot[k] += st[k]
            f = tot["forwards"]
            print(f"{stride:6d} {temp:5.1f} {tot['tokens'] / f:5.2f}  {tot['acceptance_sum'] / max(1, tot['drafts_verified']):6.3f}"
                  f" {tot['rounds_v'] / f:4.0%} {tot['rounds_r'] / f:4.0%} {tot['rounds_c'] / f:4.0%}")
    # speed at batch 1, ISD and AR alternated on the same prompts (greedy), a few rounds
    t = {"isd": 0.0, "ar": 0.0}
    toks = {"isd": 0, "ar": 0}
    for rep in range(a.repeats + 1):
        for p in prompts:
            for k in t:
                t0 = time.perf_counter()
                out = isd_generate(model, p, n, a.speed_stride, temperature=0)[0] if k == "isd" else \
                    ar_generate(model, p, n, temperature=0)
                if rep:  # round 0 warms up
                    t[k] += time.perf_counter() - t0
                    toks[k] += len(out)
    isd_tps, ar_tps = toks["isd"] / t["isd"], toks["ar"] / t["ar"]
    print(f"batch 1, greedy: ISD stride {a.speed_stride} {isd_tps:.0f} tok/s | AR {ar_tps:.0f} tok/s | "
          f"ISD/AR = {isd_tps / ar_tps:.2f}x")


def bench_step(a):
    """What one step of the batched core costs (isd.isd_step, as the scheduler runs it) on B rows: ISD at
    --stride vs AR (stride 1), and how much of it is the model's forward. Best of --repeats."""
    model, enc = Model.load(a.out_dir).eval(), tok.load(a.out_dir)
    forward, spent = model.forward, []

    def timed_forward(*args, **kw):
        t0 = time.perf_counter()
        out = forward(*args, **kw)
        spent.append(time.perf_counter() - t0)
        return out
    model.forward = timed_forward
    print(f"{a.out_dir}: {a.steps} steps per run, temperature {a.temperature}, {torch.get_num_threads()} thread(s)")
    print(f"\n| batch | ISD (stride {a.stride}) step ms | its forward ms | tokens per row-step | AR step ms "
          f"| its forward ms | ISD tok/s | AR tok/s | ISD/AR |")
    print("|---|---|---|---|---|---|---|---|---|")
    for B in a.batch:
        best = {}
        for stride in (a.stride, 1):
            for rep in range(a.repeats + 1):  # run 0 warms up
                reqs = [Request(enc.encode_ordinary(PROMPTS[i % len(PROMPTS)]), a.stride * a.steps, a.temperature,
                                seed=i) for i in range(B)]
                cache = model.new_cache(B, model.cfg.max_seq_len + 2 * a.stride)
                prefill(model, cache, list(range(B)), reqs)
                spent.clear()
                t0 = time.perf_counter()
                tokens = sum(len(new) for _ in range(a.steps) for new in isd_step(model, cache, list(range(B)), reqs, stride))
                run = ((time.perf_counter() - t0) / a.steps, sum(spent) / a.steps, tokens)
                if rep and (stride not in best or run[0] < best[stride][0]):
                    best[stride] = run
        (ti, fi, ni), (ta, fa, na) = best[a.stride], best[1]
        isd_tps, ar_tps = ni / (ti * a.steps), na / (ta * a.steps)
        print(f"| {B} | {1e3 * ti:.1f} | {1e3 * fi:.1f} | {ni / (B * a.steps):.2f} | {1e3 * ta:.1f} | {1e3 * fa:.1f} "
              f"| {isd_tps:.0f} | {ar_tps:.0f} | {isd_tps / ar_tps:.2f}x |")


SERVERS = [  # label, serve.py options
    ("(a) scheduler, ISD stride 4", ["--stride=4", "--max_batch=32"]),
    ("(b) scheduler, stride 1 (AR)", ["--stride=1", "--max_batch=32"]),
    ("(c) one request at a time, stride 4", ["--stride=4", "--max_batch=1"]),
]


def start_server(out_dir, options, threads):
    """serve.py in a subprocess on a free loopback port; returns (process, base url) once healthy."""
    import httpx
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen([sys.executable, "serve.py", f"--out_dir={out_dir}", f"--port={port}", *options],
                            cwd=os.path.dirname(os.path.abspath(__file__)), env=env)
    url = f"http://127.0.0.1:{port}"
    while proc.poll() is None:
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    raise RuntimeError(f"serve.py {' '.join(options)} exited with code {proc.returncode}")


async def load(url, model, n_requests, concurrency, max_tokens, temperature):
    """`concurrency` clients send `n_requests` completions back to back (closed loop); returns
    (completion tokens, wall seconds, per-request latencies)."""
    import httpx
    todo = list(range(n_requests))
    latencies, tokens = [], 0

    async def client(http):
        nonlocal tokens
        while todo:
            i = todo.pop()
            t0 = time.perf_counter()
            r = await http.post(f"{url}/v1/completions", json={
                "model": model, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens,
                "temperature": temperature, "seed": i})
            r.raise_for_status()
            latencies.append(time.perf_counter() - t0)
            tokens += r.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency)) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    return tokens, time.perf_counter() - t0, latencies


def bench_serve(a):
    """Aggregate tokens/s and latency of serve.py at each concurrency for SERVERS; a table and a plot."""
    import httpx
    model = os.path.basename(os.path.normpath(os.path.abspath(a.out_dir)))
    runs = {label: {c: [] for c in a.concurrency} for label, _ in SERVERS}  # (tokens/s, latencies) per repeat
    servers = {}  # all three run at once; an idle one sleeps
    try:
        for label, options in SERVERS:
            servers[label] = start_server(a.out_dir, options, a.threads)
        for label, (_, url) in servers.items():
            asyncio.run(load(url, model, 4, 4, a.max_tokens, a.temperature))  # warm-up
        for c in a.concurrency:
            n = max(a.per_client * c, a.min_requests)
            for rep in range(a.repeats):  # the servers take turns, so that drift hits all of them alike
                for label, (_, url) in servers.items():
                    tokens, wall, lat = asyncio.run(load(url, model, n, c, a.max_tokens, a.temperature))
                    runs[label][c].append((tokens / wall, lat))
                    print(f"{label} | concurrency {c:3d} | {n} requests, {tokens} tokens in {wall:.1f} s | "
                          f"{tokens / wall:.0f} tok/s | latency mean {statistics.mean(lat):.2f} s", flush=True)
        tpf = {}
        for label, (_, url) in servers.items():
            m = dict(line.rsplit(" ", 1) for line in httpx.get(f"{url}/metrics").text.splitlines()
                     if not line.startswith("#"))
            tpf[label] = float(m["idlm_tokens_per_forward"])
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait()
    # label -> [(median tokens/s over the repeats, mean latency over all their requests)] per concurrency
    results = {label: [(statistics.median(t for t, _ in runs[label][c]),
                        statistics.mean(x for _, lat in runs[label][c] for x in lat)) for c in a.concurrency]
               for label in runs}
    (la, lb, lc) = [label for label, _ in SERVERS]
    print(f"\n{a.out_dir}: {a.max_tokens} tokens per request, temperature {a.temperature}, "
          f"max({a.per_client} x concurrency, {a.min_requests}) requests per point, median of {a.repeats} "
          f"repeats (the servers take turns), server threads {a.threads}")
    print("TPF: " + ", ".join(f"{k.split(' ', 1)[0]} {v:.2f}" for k, v in tpf.items()))
    print("\n| concurrency | (a) tok/s | (b) tok/s | (c) tok/s | (a)/(b) | (a) vs (a) at 1 "
          "| (a) latency s | (b) latency s | (c) latency s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for i, c in enumerate(a.concurrency):
        ra, rb, rc = results[la][i], results[lb][i], results[lc][i]
        print(f"| {c} | {ra[0]:.0f} | {rb[0]:.0f} | {rc[0]:.0f} | {ra[0] / rb[0]:.2f}x | {ra[0] / results[la][0][0]:.1f}x "
              f"| {ra[1]:.2f} | {rb[1]:.2f} | {rc[1]:.2f} |")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for label, _ in SERVERS:
        ax1.plot(a.concurrency, [r[0] for r in results[label]], "o-", label=label)
        ax2.plot(a.concurrency, [r[1] for r in results[label]], "o-", label=label)
    for ax, title in ((ax1, "aggregate throughput (tokens/s)"), (ax2, "mean request latency (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(a.concurrency, [str(c) for c in a.concurrency])
        ax.set_xlabel("concurrent clients")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ax2.set_yscale("log")
    ax1.legend()
    fig.suptitle(f"serve.py on {model}: {a.max_tokens} tokens per request, temperature {a.temperature}")
    fig.tight_layout()
    fig.savefig(a.plot, dpi=120)
    print(f"\nwrote {a.plot}")
CHAT_PROMPTS = ["What is the capital of France?", "Explain how a compass works.",  # topics not in the
                "Write a short paragraph about autumn.", "Give me three tips for learning to cook."]  # replies of pretrained.py


def bench_smollm2(a):
    """Greedy chat replies of SmolLM2, side by side in one run: its AR decoding (our KV cache), Hugging
    Face transformers' generate() (KV cache), and ISD on each model of --isd (a converted checkpoint,
    a folder with an adapter = R-ISD, or smollm2 itself with its untrained MASK row)."""
    import pretrained
    base, enc = pretrained.load_smollm2()
    stops = pretrained.stop_ids(enc)
    prompts = [pretrained.chat_ids(enc, [{"role": "user", "content": p}]) for p in CHAT_PROMPTS]
    isd_models = {src: pretrained.load_model(src)[0] for src in a.isd}
    runs = {"AR (ours)": lambda p: (ar_generate(base, p, a.max_new_tokens, temperature=0, stop_ids=stops), None)}
    if not a.no_hf:
        from transformers import AutoModelForCausalLM
        folder, name = os.path.split(pretrained.gguf_path())
        hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                  local_files_only=True).eval()  # a local file, never the hub

        def hf_generate(p):
            out = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              max_new_tokens=a.max_new_tokens, do_sample=False, eos_token_id=stops, pad_token_id=0)
            return out[0, len(p):].tolist(), None
        runs["transformers generate()"] = hf_generate
    for src, m in isd_models.items():
        runs[f"ISD {src}"] = lambda p, m=m: isd_generate(m, p, a.max_new_tokens, a.stride, temperature=0, stop_ids=stops)
    for f in runs.values():  # warm-up
        f(prompts[0][:8])
    t = {k: 0.0 for k in runs}
    tot = {k: Counter() for k in runs}
    same = {k: 0 for k in runs}
    with torch.no_grad():
        for rep in range(a.repeats):
            for p in prompts:
                ref = None
                for k, f in runs.items():  # interleaved: every method sees the same machine load
                    t0 = time.perf_counter()
                    out, st = f(p)
                    t[k] += time.perf_counter() - t0
                    ref = out if ref is None else ref
                    same[k] += out == ref
                    tot[k].update(st or {"tokens": len(out), "forwards": len(out)})
    n_runs = a.repeats * len(prompts)
    print(f"SmolLM2-135M-Instruct, {len(prompts)} chat prompts x {a.repeats} repeats, greedy, <= {a.max_new_tokens} "
          f"new tokens, ISD stride {a.stride}, {torch.get_num_threads()} threads, {base.embed_tokens.weight.device}")
    print(f"{'method':40s}   TPF  accept  V/R/C %        tok/s  vs AR  same as AR")
    ar_tps = tot["AR (ours)"]["tokens"] / t["AR (ours)"]
    for k in runs:
        c, f = tot[k], max(1, tot[k]["forwards"])
        tps = c["tokens"] / t[k]
        mix = (f"{100 * c['rounds_v'] / f:3.0f}/{100 * c['rounds_r'] / f:3.0f}/{100 * c['rounds_c'] / f:3.0f}"
               if "rounds_c" in c else "      -    ")
        acc = f"{c['acceptance_sum'] / c['drafts_verified']:6.3f}" if c.get("drafts_verified") else "     -"
        print(f"{k:40s} {c['tokens'] / f:5.2f}  {acc}  {mix}  {tps:9.1f}  {tps / ar_tps:4.2f}x  {same[k]}/{n_runs}")


# ----------------------------------------------------------------------------------------------
# the introspection gap: AR, I-DLM and the diffusion baselines side by side

VAL_LOSS_KIND = {"ar": "NLL", "idlm": "clean-stream NLL", "dlm": "diffusion bound (>= NLL)",
                 "bdlm": "diffusion bound (>= NLL)"}


def introspect_settings(a):
    """(label, out_dir, family, decode options) for every row of the table."""
    rows = []
    for out_dir in a.models:
        family, block = dlm.checkpoint_family(out_dir)
        if family is None:
            raise SystemExit(f"bench.py: error: {out_dir} is not a train.py checkpoint (no train_state.json)")
        name = os.path.basename(os.path.normpath(out_dir))
        if family == "ar":
            rows.append((f"{name} (AR)", out_dir, family, {}))
        elif family == "idlm":
            rows.append((f"{name} (I-DLM, ISD N={a.stride})", out_dir, family, {"stride": a.stride}))
        else:
            for steps in a.dlm_steps:
                rows.append((f"{name} ({family}, {steps} steps/block)", out_dir, family,
                             {"block": block or 4, "steps": steps}))
            if a.threshold is not None:
                rows.append((f"{name} ({family}, threshold {a.threshold})", out_dir, family,
                             {"block": block or 4, "steps": block or 4, "threshold": a.threshold}))
    return rows


def generate_with_acceptance(model, family, prompt, n, temperature, seed, opts):
    """(new ids, forwards, seconds, acceptances or the q logits to score later) of one continuation at batch 1.
    q is what each generated token was drawn from: the AR model's own next-token distribution, I-DLM's
    mask drafts (scored by ISD against the clean stream as it verifies them), the diffusion decoder's
    distribution in the step that unmasked the token."""
    t0 = time.perf_counter()
    if family == "ar":
        with dlm.recorded_forwards(model) as logits:
            out = ar_generate(model, prompt, n, temperature=temperature, seed=seed)
        wall = time.perf_counter() - t0
        q = process_logits(torch.cat([x[0, -1:] for x in logits]), model.cfg.mask_token_id, temperature)
        return out, len(out), wall, q
    if family == "idlm":
        with dlm.recorded_drafts() as calls:
            out, st = isd_generate(model, prompt, n, opts["stride"], temperature=temperature, seed=seed)
        wall = time.perf_counter() - t0
        acc = [dlm.acceptance(p, q, d, t) for p, q, d, t in calls]
        if sum(map(len, acc)) != st["drafts_verified"]:
            raise RuntimeError("isd.py verified drafts that dlm.recorded_drafts did not see")
        return out, st["forwards"], wall, torch.cat(acc) if acc else torch.zeros(0)
    out, q, st = dlm.dlm_generate(model, family, prompt, n, opts["block"], opts["steps"], opts.get("threshold"),
                                  temperature=temperature, seed=seed)
    return out, st["forwards"], time.perf_counter() - t0, q


@torch.no_grad()
def judge_ppl(judge, jenc, prompts, continuations, batch=8):
    """Perplexity of the continuation texts under the judge, each read after its prompt text, both
    tokenized with the judge's own tokenizer."""
    rows = [(jenc.encode_ordinary(p), jenc.encode_ordinary(c)) for p, c in zip(prompts, continuations)]
    nll, count = 0.0, 0
    for at in range(0, len(rows), batch):
        chunk = rows[at:at + batch]
        T = max(len(p) + len(c) for p, c in chunk)
        ids = torch.tensor([p + c + [0] * (T - len(p) - len(c)) for p, c in chunk])
        logp = torch.log_softmax(judge(ids).float(), -1)
        for r, (p, c) in enumerate(chunk):
            pos = torch.arange(len(p), len(p) + len(c))
            nll -= float(logp[r, pos - 1, torch.tensor(c)].sum())
            count += len(c)
    return math.exp(nll / count)


def bench_introspect(a):
    """The table of the introspection gap: for each model and decoding setting, validation loss,
    judge perplexity of its continuations, introspective acceptance, tokens per forward, tokens/s."""
    import matplotlib
    import pretrained
    from tqdm import tqdm
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if a.quick:
        a.n, a.max_new_tokens, a.dlm_steps = min(a.n, 8), min(a.max_new_tokens, 24), a.dlm_steps[:2]
    torch.set_num_threads(a.threads)
    settings = introspect_settings(a)
    first = settings[0][1]
    enc = tok.load(first)
    with open(os.path.join(first, "train_state.json")) as f:
        data_path = json.load(f)["config"]["data"]
    _, _, val = data.load_corpus(data_path, enc=enc, log=lambda *_: None)
    windows = [val[o:o + a.prompt_len + a.max_new_tokens].tolist()
               for o in data.batch_offsets(len(val), a.prompt_len + a.max_new_tokens, a.n, seed=a.seed)]
    prompts = [w[:a.prompt_len] for w in windows]
    prompt_texts = [enc.decode(p) for p in prompts]
    judge, jenc = pretrained.load_smollm2()
    results = [{"model": "validation text (reference)", "family": "data", "val_loss": None, "val_loss_kind": None,
                "judge_ppl": judge_ppl(judge, jenc, prompt_texts, [enc.decode(w[a.prompt_len:]) for w in windows]),
                "introspective_acceptance": None, "tokens_per_forward": None, "tokens_per_s": None}]
    models = {}
    for _, out_dir, _, _ in settings:
        if out_dir not in models:
            models[out_dir] = Model.load(out_dir).eval()
            if tok.fingerprint(tok.load(out_dir)) != tok.fingerprint(enc):
                raise SystemExit(f"bench.py: error: {out_dir} has another tokenizer than {first}")
    for _, out_dir, family, opts in settings:  # warm-up
        generate_with_acceptance(models[out_dir], family, prompts[0], 4, a.temperature, 0, opts)
    # the settings take turns on each prompt, so that the machine's load drifts over all of them alike
    runs = [{"outs": [], "q": [], "forwards": 0, "wall": 0.0} for _ in settings]
    bar = tqdm(total=len(settings) * a.n, desc="introspect", file=sys.stderr, disable=a.no_progress)
    for i, p in enumerate(prompts):
        for (label, out_dir, family, opts), run in zip(settings, runs):
            out, f, w, q = generate_with_acceptance(models[out_dir], family, p, a.max_new_tokens, a.temperature,
                                                    a.seed + i, opts)
            run["outs"].append(out)
            run["q"].append(q)
            run["forwards"] += f
            run["wall"] += w
            bar.update()
    bar.close()
    for (label, out_dir, family, opts), run in tqdm(list(zip(settings, runs)), desc="acceptance and judge",
                                                     file=sys.stderr, disable=a.no_progress):
        model, outs = models[out_dir], run["outs"]
        if family == "idlm":  # scored by ISD as it verified the drafts
            accs = run["q"]
        else:  # p: the same model reading each continuation left to right
            ids = torch.tensor([p + o for p, o in zip(prompts, outs)])
            p_logits = dlm.left_to_right_logits(model, family, ids, a.prompt_len, opts.get("block", 4))
            mask_id = model.cfg.mask_token_id
            accs = [dlm.acceptance(process_logits(p_logits[i], mask_id, a.temperature), q, torch.tensor(o),
                                   a.temperature) for i, (o, q) in enumerate(zip(outs, run["q"]))]
        acc = torch.cat(accs)
        evals = json.load(open(os.path.join(out_dir, "train_state.json")))["evals"][-1]
        tokens = sum(map(len, outs))
        results.append({"model": label, "family": family, "val_loss": evals[2] if family in ("ar", "idlm") else evals[1],
                        "val_loss_kind": VAL_LOSS_KIND[family],
                        "judge_ppl": judge_ppl(judge, jenc, prompt_texts, [enc.decode(o) for o in outs]),
                        "introspective_acceptance": float(acc.mean()) if len(acc) else None,
                        "tokens_per_forward": tokens / run["forwards"], "tokens_per_s": tokens / run["wall"]})
    if a.json:
        print(json.dumps(results, indent=1))
    else:
        print(f"{a.n} continuations of {a.max_new_tokens} tokens after {a.prompt_len}-token validation prompts, "
              f"temperature {a.temperature}, batch 1, {torch.get_num_threads()} thread(s); judge SmolLM2-135M-Instruct")
        print("\n| model | validation loss | judge ppl | introspective acceptance | tokens/forward | tokens/s |")
        print("|---|---|---|---|---|---|")
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        for r in results:
            loss = "-" if r["val_loss"] is None else f"{r['val_loss']:.3f} ({r['val_loss_kind']})"
            print(f"| {r['model']} | {loss} | {r['judge_ppl']:.1f} | {fmt(r['introspective_acceptance'], '.3f')} "
                  f"| {fmt(r['tokens_per_forward'], '.2f')} | {fmt(r['tokens_per_s'], '.0f')} |")
    fig, ax = plt.subplots(figsize=(10, 5))
    markers = {"ar": "s", "idlm": "*", "dlm": "o", "bdlm": "^"}
    for r in results[1:]:  # one legend entry per point: labels on the plot would overlap
        acc = "-" if r["introspective_acceptance"] is None else f"{r['introspective_acceptance']:.2f}"
        ax.scatter(r["tokens_per_s"], r["judge_ppl"], marker=markers[r["family"]], s=110 if r["family"] == "idlm" else 55,
                   label=f"{r['model']}: acceptance {acc}")
    ax.axhline(results[0]["judge_ppl"], color="gray", ls="--", lw=1, label="validation text")
    ax.set_xlabel("tokens/s at batch 1 (higher is faster)")
    ax.set_ylabel("judge perplexity (lower is better)")
    ax.set_yscale("log")
    ax.margins(x=0.1, y=0.1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_title(f"quality vs speed: {a.n} continuations of {a.max_new_tokens} tokens, T={a.temperature}", fontsize=9)
    fig.tight_layout()
    fig.savefig(a.plot, dpi=120)
    print(f"wrote {a.plot}", file=sys.stderr)
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    t = sub.add_parser("train", help="training throughput, ar vs idlm")
    t.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    t.add_argument("--steps", type=int, default=10)
    d = sub.add_parser("decode", help="ISD statistics per stride, and ISD vs AR speed")
    d.add_argument("--out_dir", default="out")
    d.add_argument("--strides", type=lambda s: [int(x) for x in s.split(",")], default=[2, 3, 4, 6, 8])
    d.add_argument("--max_new_tokens", type=int, default=100)
    d.add_argument("--speed_stride", type=int, default=4)
    d.add_argument("--repeats", type=int, default=3)
    d.add_argument("--seed", type=int, default=1)
    s = sub.add_parser("step", help="the cost of one batched ISD / AR step, and of its forward, per batch size")
    s.add_argument("--out_dir", default="out")
    s.add_argument("--batch", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16, 32])
    s.add_argument("--stride", type=int, default=4)
    s.add_argument("--temperature", type=float, default=0.8)
    s.add_argument("--steps", type=int, default=16, help="steps per run (default 16)")
    s.add_argument("--repeats", type=int, default=5, help="runs per point; the best is shown (default 5)")
    s = sub.add_parser("serve", help="serve.py under load: (a) ISD stride 4, (b) stride 1, (c) one at a time")
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
    s = sub.add_parser("smollm2", help="SmolLM2 chat: ISD / R-ISD vs AR vs transformers generate()")
    s.add_argument("--isd", type=lambda v: v.split(","), default=["smollm2"],
                   help="comma-separated models to decode with ISD: smollm2, checkpoint or adapter folders")
    s.add_argument("--stride", type=int, default=4, help="ISD stride N (default 4)")
    s.add_argument("--max_new_tokens", type=int, default=48, help="reply length cap per prompt (default 48)")
    s.add_argument("--repeats", type=int, default=1, help="passes over the prompts (default 1)")
    s.add_argument("--no_hf", action="store_true", help="leave out transformers' generate()")
    s = sub.add_parser("introspect", help="the introspection gap: quality, acceptance and speed of AR, I-DLM, DLM")
    s.add_argument("--models", type=lambda v: v.split(","), default=["out-ar", "out", "out-dlm", "out-bdlm"],
                   help="comma-separated train.py checkpoints of any objective, same tokenizer "
                        "(default out-ar,out,out-dlm,out-bdlm)")
    s.add_argument("--dlm_steps", type=lambda s: [int(x) for x in s.split(",")], default=[4, 2, 1],
                   help="denoising steps per block of the diffusion models, one row each (default 4,2,1)")
    s.add_argument("--threshold", type=float, default=None, help="also a Fast-dLLM row with this confidence threshold")
    s.add_argument("--stride", type=int, default=4, help="ISD stride N of the I-DLM models (default 4)")
    s.add_argument("--n", type=int, default=64, help="continuations per row (default 64)")
    s.add_argument("--prompt_len", type=int, default=16, help="prompt tokens, from the validation split (default 16)")
    s.add_argument("--max_new_tokens", type=int, default=64, help="tokens per continuation (default 64)")
    s.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of every model (default 1)")
    s.add_argument("--seed", type=int, default=0, help="picks the prompts; continuation i has seed+i (default 0)")
    s.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    s.add_argument("--quick", action="store_true", help="8 continuations of 24 tokens, two steps settings")
    s.add_argument("--json", action="store_true", help="print the rows as a JSON list instead of the table")
    s.add_argument("--no_progress", action="store_true", help="no progress bar")
    s.add_argument("--plot", default="introspect.png", help="where to write the quality vs speed plot")
    a = p.parse_args(argv)
    if a.what == "decode" and a.repeats < 1:
        p.error("--repeats must be >= 1")
    {"train": bench_train, "decode": bench_decode, "step": bench_step, "serve": bench_serve,
     "smollm2": bench_smollm2, "introspect": bench_introspect}[a.what](a)


if __name__ == "__main__":
    main()
