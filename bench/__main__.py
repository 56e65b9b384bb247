"""Benchmarks, measured side by side in one run so that the ratios are fair. Run from the repository root:

    python -m bench train                 # training tokens/s: objective ar vs idlm (CPU preset shapes)
    python -m bench decode --out_dir=out  # base vs distilled: TPF / acceptance per stride and temperature,
                                          #   sampled drafts vs the exact-marginal ceiling, ISD vs AR tok/s
    python -m bench temperature --out_dir=out --plot=figures/temperature.png   # TPF and ISD/AR against temperature
    python -m bench recipes --models=out-ar,out   # how each checkpoint was made: losses, greedy TPF (base, distilled)
    python -m bench step --out_dir=out    # one batched ISD / AR step (the scheduler's unit): ms per batch size
    python -m bench serve --out_dir=out   # serve.py under load: tokens/s and latency per concurrency
    python -m bench concurrency --idlm=out --bdlm=out-bdlm   # static batches of C prompts: I-DLM vs block diffusion
    python -m bench smollm2 --isd=smollm2,out-rlora   # SmolLM2 chat: ISD / R-ISD vs AR vs transformers
    python -m bench introspect --models=out-ar,out,out-dlm   # the introspection gap: AR vs I-DLM vs DLM
    python -m bench learn                 # a server learning its speculator from the traffic it serves
    python -m bench mlx --out_dir=out     # the MLX port vs PyTorch (each framework in a process of its own)
    python -m bench gpu                   # every figure that needs a GPU, in one short window

Options: python -m bench <benchmark> --help.
"""
# This file: the one argument parser (the docstring above is its --help) and `record`; the benchmarks are the
# package's other modules: training (train), isd_decoding (decode, temperature, recipes, step), serving (serve,
# concurrency), chat (smollm2), introspect, learning (learn), mlx_vs_torch (mlx), gpu.
import argparse
import contextlib
import io
import json
import os
import shlex
import sys

import options
from bench import chat, gpu, introspect, isd_decoding, learning, mlx_vs_torch, serving, training


def parse_args(argv):
    """The subcommands and their options, one block each."""
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    common = argparse.ArgumentParser(add_help=False)  # every subcommand
    common.add_argument("--markdown", metavar="FILE.md", help="also write what the benchmark prints to this file, under "
                        "the command that made it (less this option; with OMP_NUM_THREADS when set): the form the tables "
                        "in README.md and docs/ take; and its rows as JSON to FILE.json where the benchmark returns them")
    held_out = argparse.ArgumentParser(add_help=False)  # introspect, concurrency: continuations of held-out prompts
    held_out.add_argument("--prompt_len", type=int, default=16,
                          help="prompt tokens, from the validation split (default 16)")
    held_out.add_argument("--max_new_tokens", type=int, default=64, help="tokens per continuation (default 64)")
    held_out.add_argument("--temperature", type=float, default=1.0,
                          help="sampling temperature of every model (default 1)")
    held_out.add_argument("--top_k", type=int, default=50,
                          help="top-k of every model, 0 = off (default 50: the paper's evaluation)")
    held_out.add_argument("--top_p", type=float, default=0.95,
                          help="top-p of every model, 1 = off (default 0.95: the paper's)")
    held_out.add_argument("--seed", type=int, default=0,
                          help="picks the prompts; continuation i has seed+i (default 0)")
    held_out.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    # train
    t = sub.add_parser("train", parents=[common], help="training throughput, ar vs idlm")
    t.add_argument("--preset", default="cpu", choices=sorted(options.PRESETS))
    t.add_argument("--steps", type=int, default=10)
    t.add_argument("--device", default="cpu", help="cpu, cuda (default cpu)")
    # decode
    d = sub.add_parser("decode", parents=[common], help="ISD statistics per stride, and ISD vs AR speed")
    d.add_argument("--out_dir", default="out", help="base checkpoint; its distilled/ adapter is measured too")
    d.add_argument("--strides", type=lambda s: [int(x) for x in s.split(",")], default=[2, 4, 6])
    d.add_argument("--temperatures", type=lambda s: [float(x) for x in s.split(",")], default=[0.0, 0.8])
    d.add_argument("--prompts", type=int, default=16, help="held-out validation prompts (default 16)")
    d.add_argument("--max_new_tokens", type=int, default=100)
    d.add_argument("--speed_stride", type=int, default=4)
    d.add_argument("--speed_prompts", type=int, default=4, help="prompts in the speed runs (default 4)")
    d.add_argument("--repeats", type=int, default=3)
    d.add_argument("--seed", type=int, default=1)
    # temperature
    s = sub.add_parser("temperature", parents=[common], help="TPF and ISD/AR speed against temperature, base vs distilled (plot)")
    s.add_argument("--out_dir", default="out")
    s.add_argument("--temperatures", type=lambda s: [float(x) for x in s.split(",")], default=[0, 0.2, 0.4, 0.6, 0.8, 1.0])
    s.add_argument("--stride", type=int, default=4)
    s.add_argument("--prompts", type=int, default=16, help="held-out validation prompts for TPF (default 16)")
    s.add_argument("--speed_prompts", type=int, default=4, help="of them, in the speed runs (default 4)")
    s.add_argument("--max_new_tokens", type=int, default=100)
    s.add_argument("--repeats", type=int, default=2)
    s.add_argument("--seed", type=int, default=1)
    s.add_argument("--plot", default="temperature.png", help="where to write the PNG plot (default temperature.png)")
    # recipes
    s = sub.add_parser("recipes", parents=[common], help="how each checkpoint was made (AR steps, I-DLM steps, alpha), "
                       "its validation losses and greedy TPF, base and distilled")
    s.add_argument("--models", type=lambda v: v.split(","), required=True,
                   help="comma-separated train.py checkpoints; the first (an AR baseline) is the reference loss")
    s.add_argument("--prompts", type=int, default=16, help="held-out validation prompts (default 16)")
    s.add_argument("--max_new_tokens", type=int, default=100)
    s.add_argument("--stride", type=int, default=4)
    s.add_argument("--seed", type=int, default=1)
    # step
    s = sub.add_parser("step", parents=[common], help="the cost of one batched ISD / AR step, and of its forward, per batch size")
    s.add_argument("--out_dir", default="out")
    s.add_argument("--batch", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16, 32])
    s.add_argument("--stride", type=int, default=4)
    s.add_argument("--temperature", type=float, default=0.8)
    s.add_argument("--steps", type=int, default=16, help="steps per run (default 16)")
    s.add_argument("--repeats", type=int, default=5, help="runs per point; the best is shown (default 5)")
    # serve
    s = sub.add_parser("serve", parents=[common], help="serve.py under load: (a) ISD stride 4, (b) stride 1, (c) one at a time, (d) the narrow window")
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
    # concurrency
    s = sub.add_parser("concurrency", parents=[common, held_out],
                       help="static batches of C held-out prompts: I-DLM (ISD) vs block diffusion (KV cache) tokens/s per C")
    s.add_argument("--idlm", default="out", help="I-DLM checkpoint; its distilled adapter is used where there is one "
                   "(default out)")
    s.add_argument("--base", action="store_true", help="decode the I-DLM without its distilled adapter")
    s.add_argument("--bdlm", default="out-bdlm", help="block diffusion checkpoint, train.py --objective=bdlm "
                   "(default out-bdlm)")
    s.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8, 16, 32, 64],
                   help="prompts per static batch (default 1,2,4,8,16,32,64)")
    s.add_argument("--dlm_steps", type=lambda s: [int(x) for x in s.split(",")], default=[2, 1],
                   help="bdlm denoising steps per block, one setting each (default 2,1: 2 and 4 tokens per forward "
                        "with blocks of 4)")
    s.add_argument("--stride", type=int, default=4, help="ISD stride N of the I-DLM (default 4)")
    s.add_argument("--ar", action="store_true", help="also AR: stride-1 decoding of the I-DLM's base model")
    s.add_argument("--repeats", type=int, default=1, help="runs per point, the median is shown (default 1)")
    s.add_argument("--device", default="cpu", help="cpu, cuda (default cpu; the judge runs on the CPU)")
    # smollm2
    s = sub.add_parser("smollm2", parents=[common], help="SmolLM2 chat: ISD / R-ISD vs AR vs transformers generate()")
    s.add_argument("--isd", type=lambda v: v.split(","), default=["smollm2"],
                   help="comma-separated models to decode with ISD: smollm2, checkpoint or adapter folders")
    s.add_argument("--stride", type=int, default=4, help="ISD stride N (default 4)")
    s.add_argument("--max_new_tokens", type=int, default=48, help="reply length cap per prompt (default 48)")
    s.add_argument("--repeats", type=int, default=1, help="passes over the prompts (default 1)")
    s.add_argument("--no_hf", action="store_true", help="leave out transformers' generate()")
    s.add_argument("--device", default="cpu", help="cpu, cuda (default cpu)")
    # introspect
    s = sub.add_parser("introspect", parents=[common, held_out],
                       help="the introspection gap: quality, acceptance and speed of AR, I-DLM, DLM")
    s.add_argument("--models", type=lambda v: v.split(","), default=["out-ar", "out", "out-dlm", "out-bdlm"],
                   help="comma-separated train.py checkpoints of any objective, same tokenizer "
                        "(default out-ar,out,out-dlm,out-bdlm)")
    s.add_argument("--dlm_steps", type=lambda s: [int(x) for x in s.split(",")], default=[4, 2, 1],
                   help="denoising steps per block of the diffusion models, one row each (default 4,2,1)")
    s.add_argument("--threshold", type=float, default=None, help="also a Fast-dLLM row with this confidence threshold")
    s.add_argument("--stride", type=int, default=4, help="ISD stride N of the I-DLM models (default 4)")
    s.add_argument("--n", type=int, default=64, help="continuations per row (default 64)")
    s.add_argument("--quick", action="store_true", help="8 continuations of 24 tokens, two steps settings")
    s.add_argument("--json", action="store_true", help="print the rows as a JSON list instead of the table")
    s.add_argument("--no_progress", action="store_true", help="no progress bar")
    s.add_argument("--plot", default=None, help="also write the quality vs speed plot (PNG) here")
    # learn
    learning.add_arguments(sub.add_parser("learn", parents=[common], help="a server learning its speculator from "
                                          "the traffic it serves: TPF and tok/s against requests served (plot)"))
    # mlx
    s = sub.add_parser("mlx", parents=[common], help="the MLX port vs PyTorch: decoding and training tokens/s",
                       description=mlx_vs_torch.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--out_dir", default="out", help="checkpoint; its distilled/ adapter is used where there is one (default out)")
    s.add_argument("--batch", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8], help="batch sizes (default 1,8)")
    s.add_argument("--prompts", type=int, default=8, help="held-out validation prompts (default 8)")
    s.add_argument("--max_new_tokens", type=int, default=64, help="tokens per prompt (default 64)")
    s.add_argument("--stride", type=int, default=4, help="ISD stride N (default 4)")
    s.add_argument("--repeats", type=int, default=2, help="decoding runs per worker, the best is kept (default 2)")
    s.add_argument("--rounds", type=int, default=3, help="rounds of PyTorch then MLX; the median is shown (default 3)")
    s.add_argument("--preset", default="cpu", choices=sorted(options.PRESETS), help="training shapes (default cpu)")
    s.add_argument("--steps", type=int, default=8, help="training steps per worker (default 8)")
    # gpu (no --markdown: it writes its own results file)
    g = sub.add_parser("gpu", help="every figure that needs a GPU, in one command that fits a short GPU window",
                       description=gpu.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g.add_argument("--dry_run", action="store_true", help="every stage at tiny sizes (on the CPU without a GPU): for tests")
    g.add_argument("--budget", type=float, default=480.0,
                   help="seconds for the five stages together, split by their shares (default 480)")
    g.add_argument("--stages", type=lambda v: v.split(","), default=[n for n, _ in gpu.STAGES],
                   help=f"comma-separated stages to run (default all: {','.join(n for n, _ in gpu.STAGES)})")
    g.add_argument("--work_dir", help="where the replies and the adapter go (default: a temporary folder, removed)")
    a = p.parse_args(argv)
    if a.what in ("introspect", "concurrency"):
        a.top_k, a.top_p = a.top_k or None, (a.top_p if a.top_p < 1 else None)
    if a.what in ("decode", "concurrency") and a.repeats < 1:
        p.error("--repeats must be >= 1")
    if a.what == "gpu" and not set(a.stages) <= {n for n, _ in gpu.STAGES}:
        g.error(f"--stages: unknown {sorted(set(a.stages) - {n for n, _ in gpu.STAGES})}; "
                f"choose from {','.join(n for n, _ in gpu.STAGES)}")
    if a.what == "gpu" and a.budget <= 0:
        g.error(f"--budget must be > 0, got {a.budget}")
    return a


class Tee(io.StringIO):
    """What is printed goes where it went before (the terminal) and is kept."""

    def __init__(self):
        super().__init__()
        self.out = sys.stdout

    def write(self, text):
        self.out.write(text)
        return super().write(text)


def record(run, a, argv):
    """Run the benchmark `run(a)`; with --markdown, also write what it printed under the command that made it
    (argv less --markdown, with OMP_NUM_THREADS when set) and its rows as JSON beside it."""
    if not a.markdown:
        return run(a)
    args = [x for x in (sys.argv[1:] if argv is None else argv) if not x.startswith("--markdown")]
    threads = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    command = threads + "python -m bench " + shlex.join(args)
    with contextlib.redirect_stdout(Tee()) as out:
        rows = run(a)
    with open(a.markdown, "w") as f:
        f.write(f"Command: `{command}`\n\n{out.getvalue()}")
    if rows is not None:
        with open(os.path.splitext(a.markdown)[0] + ".json", "w") as f:
            json.dump({"command": command, "rows": rows}, f, indent=1)
    print(f"wrote {a.markdown}", file=sys.stderr)
    return rows


def main(argv=None):
    a = parse_args(argv)
    if a.what == "gpu":  # its results file is $OUT/gpu_bench.md; it exits with 1 without a GPU or when a stage fails
        return gpu.run(a)
    run = {"train": training.bench_train, "decode": isd_decoding.bench_decode,
           "temperature": isd_decoding.bench_temperature, "recipes": isd_decoding.bench_recipes,
           "step": isd_decoding.bench_step, "serve": serving.bench_serve,
           "concurrency": serving.bench_concurrency, "smollm2": chat.bench_smollm2, "introspect": introspect.table,
           "learn": learning.bench_learn, "mlx": mlx_vs_torch.tables}[a.what]
    return record(run, a, argv)


if __name__ == "__main__":
    main()
