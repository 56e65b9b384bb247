"""The introspection gap, measured: AR, I-DLM and the masked-diffusion baselines side by side (the
table of docs/introspection.md). Run it as `python bench.py introspect` (options: `--help` there).

For each model and decoding setting: validation loss, the judge's perplexity of its continuations
(SmolLM2-135M reading the decoded text), the introspective acceptance rate (dlm.acceptance), tokens
per forward and tokens/s at batch 1.
"""
import json
import math
import os
import sys
import time

import torch
from tqdm import tqdm

import checkpoint
import data
import dlm
import pretrained
import tokenizer as tok
from isd import ar_generate, isd_generate
from model import Model
from sampling import process_logits


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
        logits = logits[-len(out):]  # the forwards that drew the tokens (before them: the prompt's prefill)
        q = process_logits(torch.cat([x[0, -1:] for x in logits]), model.cfg.mask_token_id, temperature)
        return out, len(out), wall, q
    if family == "idlm":
        with dlm.recorded_drafts() as calls:
            out, st = isd_generate(model, prompt, n, opts["stride"], temperature=temperature, seed=seed)
        wall = time.perf_counter() - t0
        acc = [dlm.acceptance(p, q, d, t) for p, q, d, t in calls]
        if sum(map(len, acc)) != st.drafts_verified:
            raise RuntimeError("isd.py verified drafts that dlm.recorded_drafts did not see")
        return out, st.forwards, wall, torch.cat(acc) if acc else torch.zeros(0)
    out, q, st = dlm.dlm_generate(model, family, prompt, n, opts["block"], opts["steps"], opts.get("threshold"),
                                  temperature=temperature, seed=seed)
    return out, st.forwards, time.perf_counter() - t0, q


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


def validation_windows(a, first):
    """(tokenizer, windows): a.n windows of prompt_len + max_new_tokens tokens from the validation split
    of the data of checkpoint `first`, tokenized with its tokenizer."""
    enc = tok.load(first)
    _, _, val = data.load_corpus(checkpoint.training_config(first)["data"], enc=enc, log=lambda *_: None)
    length = a.prompt_len + a.max_new_tokens
    return enc, [val[o:o + length].tolist() for o in data.batch_offsets(len(val), length, a.n, seed=a.seed)]


def load_models(settings, enc):
    """{out_dir: model in eval mode} of every setting; all must have the tokenizer enc."""
    models = {}
    for _, out_dir, _, _ in settings:
        if out_dir not in models:
            models[out_dir] = Model.load(out_dir).eval()
            if tok.fingerprint(tok.load(out_dir)) != tok.fingerprint(enc):
                raise SystemExit(f"bench.py: error: {out_dir} has another tokenizer than {settings[0][1]}")
    return models


def generate_all(a, settings, models, prompts):
    """Each setting's continuations of the prompts, after a warm-up: {"outs", "q"} per continuation, and
    "forwards", "wall" in all. The settings take turns on each prompt, so that the machine's load drifts
    over all of them alike."""
    for _, out_dir, family, opts in settings:  # warm-up
        generate_with_acceptance(models[out_dir], family, prompts[0], 4, a.temperature, 0, opts)
    runs = [{"outs": [], "q": [], "forwards": 0, "wall": 0.0} for _ in settings]
    bar = tqdm(total=len(settings) * a.n, desc="introspect", file=sys.stderr, disable=a.no_progress)
    for i, p in enumerate(prompts):
        for (_, out_dir, family, opts), run in zip(settings, runs):
            out, f, w, q = generate_with_acceptance(models[out_dir], family, p, a.max_new_tokens, a.temperature,
                                                    a.seed + i, opts)
            run["outs"].append(out)
            run["q"].append(q)
            run["forwards"] += f
            run["wall"] += w
            bar.update()
    bar.close()
    return runs


def acceptance_of(a, model, family, opts, prompts, run):
    """The introspective acceptance of every generated token of a setting: as ISD scored it while
    verifying the drafts (I-DLM), else min(1, p/q) with p the same model reading each continuation left
    to right."""
    if family == "idlm":
        return torch.cat(run["q"])
    ids = torch.tensor([p + o for p, o in zip(prompts, run["outs"])])
    p_logits = dlm.left_to_right_logits(model, family, ids, a.prompt_len, opts.get("block", 4))
    mask_id = model.cfg.mask_token_id
    return torch.cat([dlm.acceptance(process_logits(p_logits[i], mask_id, a.temperature), q, torch.tensor(o),
                                     a.temperature) for i, (o, q) in enumerate(zip(run["outs"], run["q"]))])


def setting_rows(a, settings, runs, models, prompts, enc, ppl):
    """The table's row of each setting; ppl(texts): the judge's perplexity of continuation texts."""
    rows = []
    for (label, out_dir, family, opts), run in tqdm(list(zip(settings, runs)), desc="acceptance and judge",
                                                     file=sys.stderr, disable=a.no_progress):
        acc = acceptance_of(a, models[out_dir], family, opts, prompts, run)
        evals = json.load(open(os.path.join(out_dir, "train_state.json")))["evals"][-1]
        tokens = sum(map(len, run["outs"]))
        rows.append({"model": label, "family": family, "val_loss": evals[2] if family in ("ar", "idlm") else evals[1],
                     "val_loss_kind": VAL_LOSS_KIND[family], "judge_ppl": ppl([enc.decode(o) for o in run["outs"]]),
                     "introspective_acceptance": float(acc.mean()) if len(acc) else None,
                     "tokens_per_forward": tokens / run["forwards"], "tokens_per_s": tokens / run["wall"]})
    return rows


def print_table(a, results):
    """The rows as a markdown table after a line on the setup, or (--json) as a JSON list."""
    if a.json:
        print(json.dumps(results, indent=1))
        return
    print(f"{a.n} continuations of {a.max_new_tokens} tokens after {a.prompt_len}-token validation prompts, "
          f"temperature {a.temperature}, batch 1, {torch.get_num_threads()} thread(s); judge SmolLM2-135M-Instruct")
    print("\n| model | validation loss | judge ppl | introspective acceptance | tokens/forward | tokens/s |")
    print("|---|---|---|---|---|---|")
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for r in results:
        loss = "-" if r["val_loss"] is None else f"{r['val_loss']:.3f} ({r['val_loss_kind']})"
        print(f"| {r['model']} | {loss} | {r['judge_ppl']:.1f} | {fmt(r['introspective_acceptance'], '.3f')} "
              f"| {fmt(r['tokens_per_forward'], '.2f')} | {fmt(r['tokens_per_s'], '.0f')} |")


def plot(a, results):
    """Judge perplexity against tokens/s, one point per setting, the validation text as a line; to a.plot."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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


def table(a):
    """The table of the introspection gap: for each model and decoding setting, validation loss,
    judge perplexity of its continuations, introspective acceptance, tokens per forward, tokens/s."""
    if a.quick:
        a.n, a.max_new_tokens, a.dlm_steps = min(a.n, 8), min(a.max_new_tokens, 24), a.dlm_steps[:2]
    torch.set_num_threads(a.threads)
    settings = introspect_settings(a)
    # the prompts, and the judge's perplexity of the validation text that follows them (the reference row)
    enc, windows = validation_windows(a, settings[0][1])
    prompts = [w[:a.prompt_len] for w in windows]
    prompt_texts = [enc.decode(p) for p in prompts]
    judge, jenc = pretrained.load_smollm2()
    ppl = lambda texts: judge_ppl(judge, jenc, prompt_texts, texts)  # noqa: E731
    results = [{"model": "validation text (reference)", "family": "data", "val_loss": None, "val_loss_kind": None,
                "judge_ppl": ppl([enc.decode(w[a.prompt_len:]) for w in windows]),
                "introspective_acceptance": None, "tokens_per_forward": None, "tokens_per_s": None}]
    # every setting's continuations, then their rows
    models = load_models(settings, enc)
    runs = generate_all(a, settings, models, prompts)
    results += setting_rows(a, settings, runs, models, prompts, enc, ppl)
    print_table(a, results)
    plot(a, results)
    return results
