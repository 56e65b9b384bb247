"""The serving benchmarks: serve.py under load, tokens/s and latency per number of concurrent clients,
for the servers of SERVERS side by side (they take turns, so that drift hits all of them alike); and
static batches of C held-out prompts decoded together, I-DLM against block diffusion, per C.

    python -m bench serve --out_dir=out --plot=figures/serve.png   # options: python -m bench serve --help
    python -m bench concurrency --idlm=out --bdlm=out-bdlm           # python -m bench concurrency --help
"""
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import torch

import checkpoint
import data
import dlm
import lora
import pretrained
import tokenizer as tok
from bench import introspect
from isd import Request, Stats, decode
from decoding import SamplingParams

# the requests' prompts (request i gets PROMPTS[i % 4]); python -m bench step decodes the same
PROMPTS = ["ROMEO:\n", "KING HENRY.\nOnce more unto the breach", "First Citizen.\n", "HAMLET.\nTo be, or not to be"]

SERVERS = [  # label, serve.py options (serve.py loads out_dir/distilled by default; --base: the base model)
    ("(a) ISD stride 4, adaptive policy", ["--stride=4", "--max_batch=32"]),
    ("(b) stride 1 (AR), base", ["--stride=1", "--max_batch=32", "--base"]),
    ("(c) ISD stride 4, fixed wide window", ["--stride=4", "--max_batch=32", "--policy=fixed"]),
    ("(d) ISD stride 4, fixed narrow window", ["--stride=4", "--max_batch=32", "--policy=fixed", "--narrow"]),
]


def validation_prompts(out_dir, enc, n, length=16, seed=1):
    """n held-out prompts of `length` tokens from the validation split of the checkpoint's data."""
    _, _, val = data.load_corpus(checkpoint.training_config(out_dir).get("data"), enc=enc, log=lambda *_: None)
    return [row.tolist() for row in data.get_batch(val, data.batch_offsets(len(val), length, n, seed), length)]



def start_server(out_dir, options, threads):
    """serve.py in a subprocess on a free loopback port; returns (process, base url) once healthy."""
    import httpx
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen([sys.executable, "serve.py", f"--out_dir={out_dir}", f"--port={port}", "--no_access_log", *options],
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env=env)  # the repository
    url = f"http://127.0.0.1:{port}"
    while proc.poll() is None:
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    raise RuntimeError(f"serve.py {' '.join(options)} exited with code {proc.returncode}")


async def load(url, model, n_requests, concurrency, max_tokens, temperature):
    """`concurrency` clients send `n_requests` streamed completions back to back (closed loop); returns
    (completion tokens, wall seconds, per-request latencies, per-request times to the first text)."""
    import httpx
    todo = list(range(n_requests))
    latencies, firsts, tokens = [], [], 0

    async def client(http):
        nonlocal tokens
        while todo:
            i = todo.pop()
            t0, first = time.perf_counter(), None
            body = {"model": model, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens,
                    "temperature": temperature, "seed": i, "stream": True, "stream_options": {"include_usage": True}}
            async with http.stream("POST", f"{url}/v1/completions", json=body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    if first is None and any(c.get("text") for c in chunk["choices"]):
                        first = time.perf_counter() - t0
                    if chunk.get("usage"):
                        tokens += chunk["usage"]["completion_tokens"]
            latencies.append(time.perf_counter() - t0)
            firsts.append(first if first is not None else latencies[-1])

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency)) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    return tokens, time.perf_counter() - t0, latencies, firsts


def bench_serve(a):
    """Aggregate tokens/s and latency of serve.py at each concurrency for SERVERS; a table and a plot."""
    import httpx
    model = os.path.basename(os.path.normpath(os.path.abspath(a.out_dir)))

    # the load: every server at every concurrency, taking turns
    runs = {label: {c: [] for c in a.concurrency} for label, _ in SERVERS}  # (tokens/s, latencies, ttfts) per repeat
    servers = {}  # all of them run at once; an idle one sleeps
    try:
        for label, options in SERVERS:
            servers[label] = start_server(a.out_dir, options, a.threads)
        for label, (_, url) in servers.items():
            asyncio.run(load(url, model, 4, 4, a.max_tokens, a.temperature))  # warm-up
        for c in a.concurrency:
            n = max(a.per_client * c, a.min_requests)
            for rep in range(a.repeats):  # the servers take turns, so that drift hits all of them alike
                for label, (_, url) in servers.items():
                    tokens, wall, lat, ttft = asyncio.run(load(url, model, n, c, a.max_tokens, a.temperature))
                    runs[label][c].append((tokens / wall, lat, ttft))
                    print(f"{label} | concurrency {c:3d} | {n} requests, {tokens} tokens in {wall:.1f} s | "
                          f"{tokens / wall:.0f} tok/s | latency mean {statistics.mean(lat):.2f} s", flush=True)
        tpf, modes = {}, {}
        for label, (_, url) in servers.items():
            m = dict(line.rsplit(" ", 1) for line in httpx.get(f"{url}/metrics").text.splitlines()
                     if not line.startswith("#"))
            tpf[label] = float(m["idlm_tokens_per_forward"])
            modes[label] = {k.split('"')[1]: int(float(v)) for k, v in m.items() if k.startswith("idlm_steps_total{")}
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait()

    # the table: label -> [(median tokens/s over the repeats, mean latency, mean time to first text over all their
    # requests)] per concurrency
    results = {label: [(statistics.median(r[0] for r in runs[label][c]),
                        statistics.mean(x for r in runs[label][c] for x in r[1]),
                        statistics.mean(x for r in runs[label][c] for x in r[2])) for c in a.concurrency]
               for label in runs}
    labels = [label for label, _ in SERVERS]
    ids = [label.split(" ", 1)[0] for label in labels]  # (a), (b), ..
    la = labels[0]
    print(f"\n{a.out_dir}: {a.max_tokens} tokens per request, temperature {a.temperature}, "
          f"max({a.per_client} x concurrency, {a.min_requests}) requests per point, median of {a.repeats} "
          f"repeats (the servers take turns), server threads {a.threads}")
    print("TPF: " + ", ".join(f"{k.split(' ', 1)[0]} {v:.2f}" for k, v in tpf.items()))
    print("steps by mode, (a): " + ", ".join(f"{k} {v}" for k, v in modes[labels[0]].items()))
    vs_ar = [k for k in ids if k != "(b)"]  # every ISD server against (b), AR
    print("\n| concurrency | " + " | ".join(f"{k} tok/s" for k in ids) + " | " + " | ".join(f"{k}/(b)" for k in vs_ar)
          + " | (a) vs (a) at 1 | " + " | ".join(f"{k} latency s" for k in ids) + " | (a) TTFT s | (b) TTFT s |")
    print("|---" * (2 * len(ids) + len(vs_ar) + 4) + "|")
    for i, c in enumerate(a.concurrency):
        r = {k: results[label][i] for k, label in zip(ids, labels)}
        print(f"| {c} | " + " | ".join(f"{r[k][0]:.0f}" for k in ids) + " | "
              + " | ".join(f"{r[k][0] / r['(b)'][0]:.2f}x" for k in vs_ar)
              + f" | {r['(a)'][0] / results[la][0][0]:.1f}x | " + " | ".join(f"{r[k][1]:.2f}" for k in ids)
              + f" | {r['(a)'][2]:.3f} | {r['(b)'][2]:.3f} |")
    serve_plot(results, a, model)
    return [{"concurrency": c, **{k: {"tokens_per_s": results[label][i][0], "latency_s": results[label][i][1],
                                      "ttft_s": results[label][i][2]} for k, label in zip(ids, labels)}}
            for i, c in enumerate(a.concurrency)]


def serve_plot(results, a, model):
    """bench_serve's figure: throughput and latency against the number of concurrent clients."""
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


# ----------------------------------------------------------------------------------------------
# static batches: I-DLM vs block diffusion per concurrency

def concurrency_settings(a):
    """([(label, decode(requests))] of every setting, the tokenizer, a line on the models): I-DLM by ISD
    (its distilled adapter unless --base), the block diffusion LM by dlm.bdlm_decode at each --dlm_steps,
    with --ar AR (stride 1) through the I-DLM's base."""
    folder = a.idlm if a.base else checkpoint.distilled_or_base(a.idlm)
    idlm, enc = lora.load_model(folder, device=a.device)
    bdlm, benc, family, block = dlm.load(a.bdlm, device=a.device)
    if tok.fingerprint(benc) != tok.fingerprint(enc):
        raise SystemExit(f"python -m bench concurrency: error: {a.bdlm} has another tokenizer than {a.idlm}")
    settings = [(f"I-DLM, ISD N={a.stride}", lambda rs: decode(idlm, rs, a.stride))]
    settings += [(f"bdlm, {steps} steps/block", lambda rs, s=steps: dlm.bdlm_decode(bdlm, family, rs, block, s))
                 for steps in a.dlm_steps]
    if a.ar:
        base = idlm if folder == a.idlm else lora.load_model(a.idlm, device=a.device)[0]
        settings.append(("AR (I-DLM's base)", lambda rs: decode(base, rs, 1)))
    return settings, enc, f"I-DLM {folder} (ISD stride {a.stride}), bdlm {a.bdlm} (blocks of {block}, KV cache)"


def bench_concurrency(a):
    """Throughput against concurrency, static batches: for each C, C held-out validation prompts
    decoded together, the same number of new tokens, by every setting (concurrency_settings; they
    take turns). Per setting and C: total tokens/s (all tokens / the batch's wall time, prefill
    included, median of --repeats), tokens per forward (tokens / the requests' forwards: ISD's prefill
    forward is not counted, bdlm has none, its prompt rides along its first counted forward), I-DLM's
    tokens/s over the setting's, and at the largest C the judge's perplexity of the text
    (introspect.judge_ppl, SmolLM2-135M). Prints a table; returns its rows."""
    torch.set_num_threads(a.threads)
    settings, enc, models = concurrency_settings(a)
    C_max = max(a.concurrency)
    prompts = validation_prompts(a.idlm, enc, C_max, a.prompt_len, a.seed)
    kw = dict(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p)

    def run(dec, C, n):
        reqs = [Request(p, SamplingParams(n, seed=a.seed + i, **kw)) for i, p in enumerate(prompts[:C])]
        t0 = time.perf_counter()
        dec(reqs)
        return reqs, time.perf_counter() - t0

    for _, dec in settings:  # warm-up
        run(dec, min(2, C_max), 4)
    rows, texts = [], {}
    for C in a.concurrency:
        runs = {label: [] for label, _ in settings}  # (requests, wall seconds) of each repeat
        for _ in range(a.repeats):  # the settings take turns, so that drift hits all of them alike
            for label, dec in settings:
                runs[label].append(run(dec, C, a.max_new_tokens))
        first = len(rows)
        for label, done in runs.items():
            reqs = done[-1][0]  # every repeat decodes the same requests (same seeds)
            st = sum((r.stats for r in reqs), Stats())
            rows.append({"setting": label, "concurrency": C, "tokens": st.tokens, "forwards": st.forwards,
                         "tokens_per_forward": st.tpf,
                         "tokens_per_s": st.tokens / statistics.median(w for _, w in done)})
            if C == C_max:
                texts[label] = [enc.decode(r.out) for r in reqs]
        for r in rows[first:]:
            r["idlm_ratio"] = rows[first]["tokens_per_s"] / r["tokens_per_s"]
            print(f"C={C} | {r['setting']} | {r['tokens_per_s']:.0f} tok/s | TPF {r['tokens_per_forward']:.2f}",
                  file=sys.stderr, flush=True)
    judge, jenc = pretrained.load_smollm2()
    prompt_texts = [enc.decode(p) for p in prompts]
    ppl = {label: introspect.judge_ppl(judge, jenc, prompt_texts, t) for label, t in texts.items()}
    for r in rows:
        r["judge_ppl"] = ppl[r["setting"]] if r["concurrency"] == C_max else None
    print(f"\n{C_max} held-out validation prompts of {a.prompt_len} tokens ({a.idlm}'s data, seed {a.seed}), "
          f"{a.max_new_tokens} new tokens each; temperature {a.temperature}, top-k {a.top_k or 'off'}, "
          f"top-p {a.top_p or 'off'}; C prompts per static batch, median of {a.repeats} run(s), "
          f"{torch.get_num_threads()} thread(s), {a.device}; {models}; judge SmolLM2-135M-Instruct at C={C_max}")
    print("\n| C | setting | tokens/s | tokens/forward | I-DLM / setting | judge ppl |\n|---|---|---|---|---|---|")
    for r in rows:
        ppl_cell = "-" if r["judge_ppl"] is None else f"{r['judge_ppl']:.1f}"
        print(f"| {r['concurrency']} | {r['setting']} | {r['tokens_per_s']:.0f} | {r['tokens_per_forward']:.2f} "
              f"| {r['idlm_ratio']:.2f}x | {ppl_cell} |")
    return rows
