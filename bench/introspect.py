"""The introspection gap, measured: AR, I-DLM and the masked-diffusion baselines side by side (the
tables of docs/introspection.md). Run it as `python -m bench introspect` (options: `--help` there).

The metric, one function for every family (`introspective_acceptance`): each generated token x, drawn
from a distribution q when it was generated, scores min(1, p(x) / q(x)), p being the same model's
distribution for that position read left to right (earlier tokens given, that position and every later
one hidden), from a separate forward over the finished text; the rate is the mean over ALL generated
tokens. Where q comes from:
  AR      its next-token distribution while decoding (so p = q: exactly 1)
  I-DLM   what ISD really drew each committed token from (isd.drawn_from): an accepted draft from its
          mask's q, a correction from normalize((p - q)+), a clean token from p (scoring 1)
  dlm, bdlm  the distribution of the step that unmasked the token
ISD's draft acceptance (the mean min(1, p/q) of the drafts it verified, Stats.acceptance_rate) is a
different figure, reported in its own column; for the diffusion models, so is the rate over the tokens
committed in parallel (dlm.dlm_generate's flags), where their inconsistency lives.
"""
import json
import math
import os
import sys

import torch
from tqdm import tqdm

import checkpoint
import data
import dlm
import lora
import pretrained
import tokenizer as tok
from isd import Request, Stats, decode
from model import Model
from sampling import probs, process_logits
from decoding import SamplingParams


VAL_LOSS_KIND = {"ar": "NLL", "idlm": "clean-stream NLL", "dlm": "diffusion bound (>= NLL)",
                 "bdlm": "diffusion bound (>= NLL)"}
PAPER_TPF = 2.93  # the paper's ISD at N = 4 (Qwen3-8B based, MATH-500)


def introspective_acceptance(p, q, x):
    """min(1, p(x) / q(x)) for each token x (n,), p and q (n, V) probabilities (sampling.probs of
    the filtered logits): the probability that the model, reading left to right, accepts the token it
    generated from q. At temperature 0 both are point masses: 1 if x is p's argmax, else 0."""
    px, qx = p.gather(-1, x[:, None])[:, 0], q.gather(-1, x[:, None])[:, 0]
    return (px / qx).clamp(max=1)


def implied_draft_acceptance(tpf=PAPER_TPF, stride=4):
    """The per-draft acceptance a that gives `tpf` tokens per forward with the paper's window (a cold
    start after each rejection), each draft kept independently with probability a: a verify forward
    commits N tokens with probability a^(N-1), else j+1 (the first rejection at d_{j+1}) and a cold
    start (1 token) follows. Solved by bisection."""
    def tpf_of(a):
        keep = a ** (stride - 1)
        verify = stride * keep + sum(a ** j * (1 - a) * (j + 1) for j in range(stride - 1))
        return (verify + (1 - keep)) / (1 + (1 - keep))  # per verify forward, (1 - keep) cold starts follow
    lo, hi = 0.0, 1.0
    for _ in range(60):
        lo, hi = ((lo + hi) / 2, hi) if tpf_of((lo + hi) / 2) < tpf else (lo, (lo + hi) / 2)
    return lo


def introspect_settings(a):
    """The rows of the table, each a dict: label, folder (what decodes: a checkpoint, or its
    self-distilled adapter), base (the checkpoint whose validation loss it reports), family (how it
    decodes: ar, idlm = ISD, dlm, bdlm), opts. A checkpoint with a self-distilled adapter
    (out_dir/distilled) gives a second row, decoded through it, whose label ends in "distilled"; for an
    AR checkpoint that row is R-ISD: the AR model's own text, drafted by the adapter's masks."""
    rows = []
    for out_dir in a.models:
        cfg = checkpoint.training_config(out_dir)
        family, block = cfg.get("objective", "idlm"), cfg.get("block_size") or 4
        if not cfg:
            raise SystemExit(f"python -m bench introspect: error: {out_dir} is not a train.py checkpoint "
                             "(no train_state.json)")
        name = os.path.basename(os.path.normpath(out_dir))
        row = dict(folder=out_dir, base=out_dir, family=family)
        if family in ("ar", "idlm"):
            rows.append({**row, "label": f"{name} ({'AR' if family == 'ar' else f'I-DLM, ISD N={a.stride}'})",
                         "opts": {"stride": 1 if family == "ar" else a.stride}})
            distilled = checkpoint.distilled_or_base(out_dir)
            if distilled != out_dir:
                kind = "R-ISD: AR + gated adapter" if family == "ar" else "I-DLM"
                rows.append({**row, "label": f"{name} ({kind}, ISD N={a.stride}) distilled", "folder": distilled,
                             "family": "idlm", "opts": {"stride": a.stride}})
            continue
        for steps in a.dlm_steps:
            rows.append({**row, "label": f"{name} ({family}, {steps} steps/block)", "opts": {"block": block, "steps": steps}})
        if a.threshold is not None:
            rows.append({**row, "label": f"{name} ({family}, threshold {a.threshold})",
                         "opts": {"block": block, "steps": block, "threshold": a.threshold}})
    return rows


def generate(model, family, prompt, a, seed, opts):
    """One continuation of a.max_new_tokens tokens at batch 1: (new ids, q (n, V): the probabilities
    each was drawn from, flags of the tokens committed in parallel or None, Stats). AR and I-DLM decode
    with ISD (stride 1 is plain AR), recording what each committed token was drawn from; the diffusion
    models by low-confidence remasking (bdlm over a KV cache: dlm.bdlm_decode, the same tokens as
    dlm_generate's)."""
    if family in ("ar", "idlm"):
        r = Request(list(prompt),
                    SamplingParams(a.max_new_tokens, a.temperature, a.top_k, a.top_p, seed),
                    drawn_from=[])
        decode(model, [r], opts["stride"])
        return r.out, torch.stack(r.drawn_from), None, r.stats
    if family == "bdlm":  # over a KV cache of the committed blocks
        r = Request(list(prompt),
                    SamplingParams(a.max_new_tokens, a.temperature, a.top_k, a.top_p, seed))
        (q, parallel), = dlm.bdlm_decode(model, family, [r], opts["block"], opts["steps"], opts.get("threshold"))
        out, st = r.out, r.stats
    else:
        out, q, parallel, st = dlm.dlm_generate(model, family, prompt,
                                                SamplingParams(a.max_new_tokens, a.temperature, a.top_k, a.top_p, seed),
                                                block=opts["block"], steps=opts["steps"], threshold=opts.get("threshold"))
    return out, probs(q, a.temperature), parallel, st


def scores(a, model, family, opts, prompt, out, q):
    """introspective_acceptance of each token of `out`: p from a separate forward of the same model
    over prompt + out, read left to right (dlm.left_to_right_logits), filtered as q was."""
    ids = torch.tensor([prompt + out])
    p = dlm.left_to_right_logits(model, family, ids, len(prompt), opts.get("block", 4))[0]
    p = probs(process_logits(p, model.cfg.mask_token_id, a.temperature, a.top_k, a.top_p), a.temperature)
    return introspective_acceptance(p, q.to(p.dtype), torch.tensor(out))


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
    """{folder: model in eval mode} of every setting; all must have the tokenizer enc."""
    models = {}
    for s in settings:
        if s["folder"] not in models:
            if s["folder"] == s["base"]:
                models[s["folder"]] = Model.load(s["folder"]).eval()
            else:  # a self-distilled adapter over its base
                models[s["folder"]] = lora.load_model(s["folder"])[0]
            if tok.fingerprint(tok.load(s["base"])) != tok.fingerprint(enc):
                raise SystemExit(f"python -m bench introspect: error: {s['base']} has another tokenizer than "
                                 f"{settings[0]['base']}")
    return models


def generate_all(a, settings, models, prompts):
    """Each setting's continuations of the prompts, after a warm-up, each scored as it is made: per
    setting {"outs", "scores", "parallel", "stats"}. The settings take turns on each prompt, so that
    the machine's load drifts over all of them alike."""
    for s in settings:  # warm-up
        generate(models[s["folder"]], s["family"], prompts[0], a, 0, s["opts"])
    runs = [{"outs": [], "scores": [], "parallel": [], "stats": Stats()} for _ in settings]
    bar = tqdm(total=len(settings) * a.n, desc="introspect", file=sys.stderr,
               disable=True if a.no_progress else None)  # None: a bar on a terminal only
    for i, p in enumerate(prompts):
        for s, run in zip(settings, runs):
            out, q, parallel, st = generate(models[s["folder"]], s["family"], p, a, a.seed + i, s["opts"])
            run["stats"] += st
            run["outs"].append(out)
            if parallel is not None:
                run["parallel"].append(parallel)
            bar.update()
            run["scores"].append(scores(a, models[s["folder"]], s["family"], s["opts"], p, out, q))
    bar.close()
    return runs


def mean(x):
    return float(x.mean()) if len(x) else None


def setting_rows(settings, runs, enc, ppl):
    """The table's row of each setting; ppl(texts): the judge's perplexity of continuation texts."""
    rows = []
    for s, run in zip(settings, runs):
        evals = json.load(open(os.path.join(s["base"], "train_state.json")))["evals"][-1]
        family = checkpoint.objective(s["base"])
        acc, st = torch.cat(run["scores"]), run["stats"]
        parallel = torch.cat(run["parallel"]) if run["parallel"] else None
        rows.append({"model": s["label"], "family": family,
                     "val_loss": evals[2] if family in ("ar", "idlm") else evals[1], "val_loss_kind": VAL_LOSS_KIND[family],
                     "judge_ppl": ppl([enc.decode(o) for o in run["outs"]]),
                     "introspective_acceptance": mean(acc),
                     "draft_acceptance": st.acceptance_rate if st.drafts_verified else None,
                     "parallel_acceptance": mean(acc[parallel]) if parallel is not None else None,
                     "parallel_share": float(parallel.double().mean()) if parallel is not None else None,
                     "tokens_per_forward": st.tpf, "tokens_per_s": st.tokens / st.wall_s})
    return rows


def print_table(a, results):
    """The rows as a markdown table after a line on the setup, or (--json) as a JSON list."""
    if a.json:
        print(json.dumps(results, indent=1))
        return
    sampling = f"temperature {a.temperature}" + (f", top-k {a.top_k}" if a.top_k else "") + (
        f", top-p {a.top_p}" if a.top_p else "")
    print(f"{a.n} continuations of {a.max_new_tokens} tokens after {a.prompt_len}-token validation prompts, {sampling}, "
          f"batch 1, {torch.get_num_threads()} thread(s); judge SmolLM2-135M-Instruct. Introspective acceptance: "
          f"every generated token; ISD's drafts alone in their own column (the paper's TPF {PAPER_TPF} at N=4 "
          f"implies drafts accepted {implied_draft_acceptance():.2f} of the time); diffusion rows: also the tokens "
          f"committed in parallel (their share after the slash)")
    print("\n| model | validation loss | judge ppl | introspective acceptance | draft acceptance (ISD) "
          "| parallel acceptance / share (diffusion) | tokens/forward | tokens/s |")
    print("|---|---|---|---|---|---|---|---|")
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for r in results:
        loss = "-" if r["val_loss"] is None else f"{r['val_loss']:.3f} ({r['val_loss_kind']})"
        par = "-" if r["parallel_acceptance"] is None and r["parallel_share"] is None else (
            f"{fmt(r['parallel_acceptance'], '.3f')} / {r['parallel_share']:.2f}")
        print(f"| {r['model']} | {loss} | {r['judge_ppl']:.1f} | {fmt(r['introspective_acceptance'], '.3f')} "
              f"| {fmt(r['draft_acceptance'], '.3f')} | {par} "
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
    """The table of the introspection gap: for each model and decoding setting, validation loss, judge
    perplexity of its continuations, introspective acceptance (every token; drafts; parallel tokens),
    tokens per forward, tokens/s. Returns the rows."""
    if a.quick:
        a.n, a.max_new_tokens, a.dlm_steps = min(a.n, 8), min(a.max_new_tokens, 24), a.dlm_steps[:2]
    torch.set_num_threads(a.threads)
    settings = introspect_settings(a)
    # the prompts, and the judge's perplexity of the validation text that follows them (the reference row)
    enc, windows = validation_windows(a, settings[0]["base"])
    prompts = [w[:a.prompt_len] for w in windows]
    prompt_texts = [enc.decode(p) for p in prompts]
    judge, jenc = pretrained.load_smollm2()
    ppl = lambda texts: judge_ppl(judge, jenc, prompt_texts, texts)  # noqa: E731
    results = [{"model": "validation text (reference)", "family": "data", "val_loss": None, "val_loss_kind": None,
                "judge_ppl": ppl([enc.decode(w[a.prompt_len:]) for w in windows]), "introspective_acceptance": None,
                "draft_acceptance": None, "parallel_acceptance": None, "parallel_share": None,
                "tokens_per_forward": None, "tokens_per_s": None}]
    # every setting's continuations, scored, then their rows
    models = load_models(settings, enc)
    runs = generate_all(a, settings, models, prompts)
    results += setting_rows(settings, runs, enc, ppl)
    print_table(a, results)
    if a.plot:
        plot(a, results)
    return results
