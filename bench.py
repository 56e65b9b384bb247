"""Benchmarks, measured side by side in one run so that the ratios are fair.

    python bench.py train                 # training tokens/s: objective ar vs idlm (CPU preset shapes)
    python bench.py decode --out_dir=out  # ISD TPF / acceptance per stride and temperature; ISD vs AR tok/s
"""
import argparse
import json
import os
import statistics
import time

import torch

import data
import tokenizer as tok
from isd import ar_generate, isd_generate
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


def main():
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
    a = p.parse_args()
    if a.what == "decode" and a.repeats < 1:
        p.error("--repeats must be >= 1")
    bench_train(a) if a.what == "train" else bench_decode(a)


if __name__ == "__main__":
    main()
