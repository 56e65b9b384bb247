"""The command line that samples from a checkpoint, in no framework: the options, the statistics line,
the trace of each forward in colour or as HTML. sample.py (PyTorch) and mlx_port/sample.py (MLX) run
it with their decoder and their load_model; sample.py also decodes the diffusion-LM baselines (dlm.py).
"""
import argparse
import html
import json
import sys
import time
from dataclasses import replace

import checkpoint
import tokenizer as tok
from decoding import SamplingParams

COLORS = {"accepted": ("\033[32m", "#c8f0c8"), "correction": ("\033[31m", "#f6c6c6"), "clean": ("\033[34m", "#c8d8f8"),
          "rejected": ("\033[9;2m", "#eeeeee")}  # rejected drafts: struck through, not committed
ISD_ONLY, DLM_ONLY = ("stride", "narrow", "compare", "visualize", "chat"), ("steps", "threshold", "block")


def stats_line(st, head):
    """One line of a decode's Stats after `head` (the stride; a diffusion LM's family and block: no drafts)."""
    f = max(1, st.forwards)
    isd = (f"acceptance {st.acceptance_rate:.3f} | rounds V {st.rounds_v / f:.0%} R {st.rounds_r / f:.0%} "
           f"C {st.rounds_c / f:.0%} | ") if st.rounds_c else ""  # every ISD decode starts cold
    return f"{head} | {st.tokens} tokens in {st.forwards} forwards | TPF {st.tpf:.2f} | {isd}{st.tokens_per_s:.1f} tok/s"


def show_trace(trace, enc):
    """Each forward on its own line, coloured by kind (COLORS), the drafts verification rejected struck through."""
    for step, toks in enumerate(trace):
        parts = "".join(f"{COLORS[k][0]}{enc.decode([t])}\033[0m" for t, k in toks)
        print(f"{step:4d} {parts.replace(chr(10), '⏎')}")


def trace_html(trace, enc, prompt, st, stride):
    """A self-contained HTML page of the decode, one row per forward."""
    rows = []
    for step, toks in enumerate(trace):
        spans = "".join(f'<span style="background:{COLORS[k][1]}{";text-decoration:line-through" if k == "rejected" else ""}"'
                        f' title="{k}">{html.escape(enc.decode([t]))}</span>' for t, k in toks)
        rows.append(f"<tr><td>{step}</td><td>{sum(k != 'rejected' for _, k in toks)}</td><td><pre>{spans}</pre></td></tr>")
    legend = " ".join(f'<span style="background:{c[1]}">{k}</span>' for k, c in COLORS.items())
    return (f"<!doctype html><meta charset=utf-8><title>ISD trace</title>"
            f"<style>body{{font-family:sans-serif}}pre{{margin:0;white-space:pre-wrap}}td{{vertical-align:top;padding:2px 8px}}</style>"
            f"<h2>Introspective Strided Decoding, stride {stride}</h2><p>{legend}</p>"
            f"<p>{html.escape(stats_line(st, f'stride {stride}'))}</p><p>prompt: <code>{html.escape(prompt)}</code></p>"
            f"<table><tr><th>forward</th><th>tokens</th><th>committed</th></tr>{''.join(rows)}</table>")


def add_model_options(p):
    """--out_dir, --init_from, --base: the model to load (model_source), for sample.py and serve.py alike."""
    p.add_argument("--out_dir", default="out", help="checkpoint folder written by train.py, or one with a LoRA "
                                                    "adapter (its base model + the adapter) (default out)")
    p.add_argument("--init_from", default=None, help="a pretrained model by name instead of --out_dir: smollm2")
    p.add_argument("--base", action="store_true", help="the base checkpoint without its self-distilled adapter "
                   "(out_dir/distilled, loaded by default: the same tokens, more of them per forward)")


def model_source(a):
    """The folder (or pretrained name) that add_model_options' options name: with its self-distilled adapter
    (distilled/) when there is one, unless --base."""
    source = a.init_from or a.out_dir
    return source if a.base else checkpoint.distilled_or_base(source)


def parse_args(argv, doc):
    """(parser, options, family): the objective train.py gave the checkpoint (idlm for a pretrained model);
    an option of the other kind of checkpoint (ISD's, a diffusion LM's) is an error."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(p)
    p.add_argument("--chat", action="store_true", help="put --prompt as a user message in the chat template (ChatML)")
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    p.add_argument("--stride", type=int, default=None, help="N: up to N tokens per forward; 1 = plain AR (default 4)")
    p.add_argument("--narrow", action="store_true", help="the narrow window: 2N-1 tokens per forward instead of N*N, "
                   "with a cold start after each rejection (fewer tokens per forward, cheaper forwards)")
    p.add_argument("--max_new_tokens", type=int, default=None, help="tokens to generate (default 200; 64 for a "
                   "diffusion LM)")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default 0.8; 1 for a diffusion LM)")
    p.add_argument("--top_k", type=int, default=None, help="keep the k most likely tokens (p and q alike)")
    p.add_argument("--top_p", type=float, default=None, help="nucleus sampling mass (p and q alike)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: fresh)")
    p.add_argument("--device", default=None, help="cpu, cuda, mps (default cpu); for python -m mlx_port.sample: "
                   "auto, cpu, gpu (default auto: MLX's default device, the GPU on a Mac)")
    p.add_argument("--json", action="store_true", help='print {"model", "text", "tokens", "stats"} as JSON')
    p.add_argument("--compare", action="store_true", help="also decode with AR and print both speeds and their ratio")
    p.add_argument("--visualize", nargs="?", const="-", default=None, metavar="FILE.html",
                   help="show each forward's accepted drafts / corrections / clean tokens and the drafts "
                        "verification rejected (struck through); with a file, write HTML")
    d = p.add_argument_group("a diffusion-LM baseline (train.py --objective=dlm or bdlm), decoded by dlm.py")
    d.add_argument("--steps", type=int, default=None, help="denoising steps per block: the speed/quality knob "
                   "(default: one per position)")
    d.add_argument("--threshold", type=float, default=None, help="Fast-dLLM: keep every token more confident "
                   "than this in each step (at least one); --steps is then unused")
    d.add_argument("--block", type=int, default=None, help="positions per block (default: the checkpoint's "
                   "--block_size; a bdlm model must keep it)")
    a = p.parse_args(argv)
    source = a.init_from or a.out_dir
    family = checkpoint.objective(source)
    diffusion = family in checkpoint.DIFFUSION
    wrong = [o for o in (ISD_ONLY if diffusion else DLM_ONLY) if getattr(a, o) != p.get_default(o)]  # given
    if wrong:
        p.error(f"--{wrong[0]} is for " + (f"I-DLM and AR checkpoints: {source} holds a diffusion LM (objective={family})"
                if diffusion else f"a diffusion LM (objective=dlm or bdlm): {source} is decoded by ISD"))
    a.max_new_tokens = (64 if diffusion else 200) if a.max_new_tokens is None else a.max_new_tokens
    a.temperature = (1.0 if diffusion else 0.8) if a.temperature is None else a.temperature
    for o, low in (("stride", 1), ("max_new_tokens", 1), ("temperature", 0), ("steps", 1), ("block", 1)):
        if getattr(a, o) is not None and getattr(a, o) < low:
            p.error(f"--{o} must be >= {low}, got {getattr(a, o)}")
    return p, a, family


def main(argv, decoder, load_model, doc, diffuse=None):
    """The command line of `decoder` (the module isd or mlx_port.isd: its Request, decode, isd_generate, ar_generate)
    with `load_model(source, device)`: (model, tokenizer); `doc` heads --help. A diffusion LM's checkpoint goes to
    `diffuse(options)`, if given: (tokenizer, new tokens, Stats, the stats line's head)."""
    p, a, family = parse_args(argv, doc)
    source, stride = a.init_from or a.out_dir, a.stride or 4
    try:
        if family in checkpoint.DIFFUSION:  # no trace, no stop: the canvas is decoded whole
            if diffuse is None:
                raise ValueError(f"{source} holds a diffusion LM (objective={family}), which only PyTorch decodes: "
                                 f"python sample.py --out_dir={source}")
            enc, out, st, head = diffuse(a)
            stops = ()
        else:
            source = model_source(a)
            model, enc = load_model(source, a.device)
            if a.chat and not tok.has_chat_template(enc):
                raise ValueError(f"--chat: the tokenizer {enc.name} has no chat template (no <|im_start|>)")
            ids = tok.chat_ids(enc, [{"role": "user", "content": a.prompt}]) if a.chat else enc.encode_ordinary(a.prompt)
            params = SamplingParams(a.max_new_tokens, a.temperature, a.top_k, a.top_p, a.seed, tok.stop_ids(enc))
            decoder.isd_generate(model, ids, replace(params, max_tokens=2), stride, a.narrow)  # warm-up: first calls are slow
            r = decoder.Request(ids, params, trace=[])
            out, st, head = decoder.decode(model, [r], stride, a.narrow)[0].out, r.stats, f"stride {stride}"
            stops = params.stop_ids
    except (FileNotFoundError, ValueError) as e:
        p.error(str(e))

    text = enc.decode(out[:-1] if out and out[-1] in stops else out)  # the stop token is not text
    if a.json:
        print(json.dumps({"model": source, "text": text, "tokens": out, "stats": st.as_dict()}))
    elif a.visualize == "-":
        show_trace(r.trace, enc)
    else:
        print(text if a.chat else a.prompt + text)
    if a.visualize and a.visualize != "-":
        with open(a.visualize, "w") as f:
            f.write(trace_html(r.trace, enc, a.prompt, st, stride))
        print(f"wrote {a.visualize}", file=sys.stderr)
    if not a.json:
        print(f"model {source} | " + stats_line(st, head), file=sys.stderr if a.visualize == "-" else sys.stdout)
    if a.compare:
        t0 = time.time()
        ar = decoder.ar_generate(model, ids, params)
        ar_tps = len(ar) / (time.time() - t0)
        print(f"AR {ar_tps:.1f} tok/s | ISD {st.tokens_per_s:.1f} tok/s | ISD/AR {st.tokens_per_s / ar_tps:.2f}x"
              + (" | identical tokens" if a.temperature == 0 and ar == out else ""))
