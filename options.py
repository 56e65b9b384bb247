"""The options of train.py (and mlx_port/train.py): the presets, a model shape and training defaults for
each kind of machine; the command line, where any option given overrides its preset; and the checks
that refuse a bad combination in one line.
"""
import argparse
import json
import math
import os
import time
from dataclasses import dataclass

from safetensors import safe_open

import checkpoint
import data
import tokenizer as tok
from checkpoint import PRETRAINED, ModelConfig, load_config

OBJECTIVES = ("idlm", "ar", *checkpoint.DIFFUSION)
MODEL_KEYS = ("n_layer", "n_head", "n_kv_head", "d_model", "d_ff", "rope_theta")
PRESETS = {
    # ~1M parameters, a 2,048-token BPE, the default: the paper's recipe (AR pretraining, conversion, self-distillation)
    # in about 10 minutes on a 2-core CPU; a sweep chose the split and alpha (docs/results.md, the paper's recipe)
    "cpu": dict(n_layer=4, n_head=4, n_kv_head=2, d_model=128, d_ff=384, seq_len=128, tokenizer="bpe",
                vocab_size=2048, batch_size=16, grad_accum=1, max_iters=800, lr=3e-3, warmup_iters=50,
                eval_interval=200, eval_iters=8, alpha=3.0, distill_iters=1000, ar_iters=400),
    # a few seconds; for tests and for trying the code paths
    "tiny": dict(n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=128, seq_len=64, tokenizer="bpe",
                 vocab_size=512, batch_size=8, grad_accum=1, max_iters=50, lr=3e-3, warmup_iters=5,
                 eval_interval=25, eval_iters=2),
    # GPT-2-small sized, gpt2 tokenizer: for a GPU
    "gpu": dict(n_layer=12, n_head=12, n_kv_head=4, d_model=768, d_ff=2048, seq_len=1024, tokenizer="gpt2",
                vocab_size=50257, batch_size=16, grad_accum=4, max_iters=20000, lr=6e-4, warmup_iters=1000,
                eval_interval=1000, eval_iters=50),
    # fine-tuning SmolLM2-135M (--init_from=smollm2 picks it): the model and tokenizer are SmolLM2's, so
    # training options only; lr for full fine-tuning (an adapter, --lora, wants about 1e-3)
    "smollm2": dict(seq_len=256, batch_size=4, grad_accum=4, max_iters=500, lr=1e-4, warmup_iters=20,
                    eval_interval=100, eval_iters=4),
}
# the other options' defaults (a preset's values take precedence)
DEFAULTS = dict(preset="cpu", objective="idlm", stride=4, alpha=0.2, data=None, out_dir="out",
                rope_theta=10000.0, weight_decay=0.1, grad_clip=1.0, min_lr_frac=0.1, log_interval=10,
                seed=1337, device="auto", compile=False, resume=False, init_from=None, overwrite=False,
                lora=0, lora_alpha=16.0, distill_iters=0, block_size=4, ar_iters=0)


def model_config(cfg, n_vocab):
    """The model of a run from scratch: cfg's shape, the tokenizer's n_vocab ids + MASK."""
    return ModelConfig(vocab_size=n_vocab + 1, mask_token_id=n_vocab, max_seq_len=cfg["seq_len"],
                       **{k: cfg[k] for k in MODEL_KEYS})


def idlm_from_scratch(cfg):
    """Whether the run makes an I-DLM from nothing: the only run --ar_iters applies to."""
    return cfg["objective"] == "idlm" and not cfg["init_from"] and not cfg["lora"]


class UsageError(ValueError):
    """Bad options or inputs: reported as one line, exit code 2."""


def refuse(rules, error=UsageError):
    """Raise `error` with the message of the first (bad, message) rule that holds: the checks read as a table."""
    for bad, message in rules:
        if bad:
            raise error(message)


def alpha_option(text):
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number or 'auto', got {text!r}") from None


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other error of train.py
        raise UsageError(f"{message} (see python train.py --help)")


def parse_args(argv=None, doc=None):
    """(the run's options: preset < given, the names of those given); `doc` heads --help."""
    p = Parser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--preset", choices=sorted(PRESETS), help="defaults for everything below (default: cpu; smollm2 with --init_from=smollm2)")
    a("--objective", choices=OBJECTIVES,
      help="idlm: task + alpha*clean on [xt|x0]; ar: plain next-token loss; dlm / bdlm: the masked-diffusion "
           "baseline of dlm.py, whole-row / in blocks (default idlm)")
    a("--block_size", type=int, help="bdlm: tokens per block (default 4)")
    a("--stride", type=int, help="N, tokens per forward in ISD; the loss uses N-1 masks per block (default 4)")
    a("--alpha", type=alpha_option, help="weight of the clean (AR) term: a number or 'auto' = (task/clean).detach() "
                                         "(paper 0.2; cpu preset 3; from scratch, 1 measured best)")
    a("--data", help="a UTF-8 text file or a folder of .txt files (default: the Shakespeare plays)")
    a("--tokenizer", choices=["bpe", "gpt2"], help="bpe: trained on the train split; gpt2: the GPT-2 encoding")
    a("--vocab_size", type=int, help="BPE vocabulary size, end-of-text included (MASK is one more id)")
    a("--out_dir", help="where checkpoints go (default out)")
    a("--init_from", help="start from the weights (and tokenizer) of this checkpoint folder, e.g. an AR model, "
                          "or of a pretrained model by name: smollm2 (SmolLM2-135M-Instruct)")
    a("--lora", type=int, help="R-ISD: freeze the --init_from model and train gated LoRA adapters of this rank "
                               "(attention and MLP projections, active only at MASK positions); out_dir holds only "
                               "the adapter, adapter.safetensors + adapter.json (default 0 = off: train every weight)")
    a("--lora_alpha", type=float, help="LoRA scale numerator: the adapter's output is scaled by alpha/rank (default 16)")
    a("--distill_iters", type=int, help="after training, self-distil the masks (distill.py: the model's own greedy "
                                        "and sampled continuations, a gated LoRA adapter in out_dir/distilled) for "
                                        "this many steps; 0 = off (default: 1000 for the cpu preset, else 0)")
    a("--ar_iters", type=int, help="the paper's recipe: pretrain an AR model for this many of the --max_iters steps "
                                   "(in out_dir/ar), then convert it into an I-DLM with the introspective loss for the "
                                   f"rest (default: {PRESETS['cpu']['ar_iters']} for the cpu preset, else 0 = an I-DLM "
                                   "from scratch; not with --init_from, --lora or another --objective)")
    a("--resume", action="store_true", default=None, help="continue the run in --out_dir exactly where it stopped")
    a("--overwrite", action="store_true", default=None, help="replace a checkpoint already in --out_dir")
    for k in MODEL_KEYS:
        a(f"--{k}", type=float if k == "rope_theta" else int, help="model shape (from the preset)")
    a("--seq_len", type=int, help="tokens per training row L (the idlm input is 2L long)")
    a("--batch_size", type=int, help="rows per micro-batch")
    a("--grad_accum", type=int, help="micro-batches per optimizer step, over all processes (a multiple of their "
                                     "number): batch_size*grad_accum rows per step whatever the number of processes")
    a("--max_iters", type=int, help="optimizer steps in all")
    a("--lr", type=float, help="peak learning rate (AdamW); linear warmup, then cosine to min_lr_frac*lr")
    a("--warmup_iters", type=int, help="warmup steps")
    a("--min_lr_frac", type=float, help="final lr as a fraction of lr (default 0.1)")
    a("--weight_decay", type=float, help="AdamW weight decay of matrices (default 0.1)")
    a("--grad_clip", type=float, help="clip the gradient norm to this; 0 = off (default 1.0)")
    a("--eval_interval", type=int, help="evaluate and checkpoint every this many steps")
    a("--eval_iters", type=int, help="validation batches per evaluation")
    a("--log_interval", type=int, help="print progress every this many steps (default 10)")
    a("--seed", type=int, help="seed of the initial weights and of the data order (default 1337)")
    a("--device", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps; mlx_port.train: auto, cpu, gpu")
    a("--compile", action="store_true", default=None, help="torch.compile the model (not in mlx_port.train)")
    args = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    preset = args.get("preset", "smollm2" if args.get("init_from") == PRETRAINED else DEFAULTS["preset"])
    cfg = {**DEFAULTS, **PRESETS[preset], **args, "preset": preset}
    if "ar_iters" not in args and not idlm_from_scratch(cfg):
        cfg["ar_iters"] = 0  # the preset's recipe makes an I-DLM from scratch; this run starts elsewhere
    scale_recipe(cfg, args)
    return cfg, set(args)


def scale_recipe(cfg, args):
    """A run of another --max_iters than its preset's keeps the recipe's proportions: --ar_iters and --distill_iters
    scale with it unless given (a quick try takes seconds, not 1000 distillation steps); says so in one line."""
    f, scaled = cfg["max_iters"] / PRESETS[cfg["preset"]]["max_iters"], []
    if f == 1 or cfg["resume"]:  # a resumed run's recipe is its checkpoint's
        return
    for k, lo, hi in (("ar_iters", 0, cfg["max_iters"] - 1), ("distill_iters", 1, math.inf)):
        if k not in args and cfg[k]:
            cfg[k] = max(lo, min(round(cfg[k] * f), hi))
            scaled.append(f"--{k}={cfg[k]}")
    if scaled:
        print(f"--max_iters={cfg['max_iters']} ({f:.3g}x the {cfg['preset']} preset's): the recipe scaled with it: "
              f"{', '.join(scaled)} (give them to choose)")


def check_options(cfg, given):
    """Refuse a bad combination of options: the first row of this table that holds."""
    c, lora, new = cfg, cfg["lora"], not cfg["resume"]  # a resumed run's recipe is its checkpoints'

    def at_least(k, lo):
        return c[k] < lo, f"--{k} must be >= {lo}, got {c[k]}"
    refuse([
        at_least("stride", 1),
        (c["objective"] == "idlm" and c["stride"] < 2, "--stride=1 has no masks to train: use --objective=ar for plain AR"),
        at_least("distill_iters", 0),
        ("distill_iters" in given and c["distill_iters"] and (lora or c["objective"] == "ar"),
         "--distill_iters distils the masks of a full I-DLM: not with --lora or --objective=ar"),
        *(at_least(k, 1) for k in ("batch_size", "grad_accum", "max_iters", "seq_len", "eval_interval", "eval_iters",
                                   "log_interval")),
        ((new or "ar_iters" in given) and not 0 <= c["ar_iters"] < c["max_iters"],
         f"--ar_iters must be in [0, --max_iters={c['max_iters']}), got {c['ar_iters']}"),
        (new and c["ar_iters"] and not idlm_from_scratch(c),
         "--ar_iters pretrains AR, then converts it into an I-DLM: only for --objective=idlm from scratch (not with "
         "--init_from or --lora)"),
        (c["resume"] and c["init_from"], "--resume continues --out_dir; it cannot be combined with --init_from"),
        at_least("lora", 0),
        (lora and not (c["init_from"] or c["resume"]),
         "--lora adapts a frozen model: give it with --init_from (e.g. --init_from=smollm2)"),
        (lora and c["init_from"] and os.path.abspath(c["init_from"]) == os.path.abspath(c["out_dir"]),
         "--lora saves only the adapter, which refers to its base: --out_dir must not be --init_from"),
        ("lora_alpha" in given and not lora, "--lora_alpha scales the adapter: give it with --lora=RANK"),
        at_least("block_size", 1),
        (lora and c["objective"] != "idlm", "--lora adapters act only at MASK positions: they need --objective=idlm"),
        (c["preset"] == "smollm2" and not (c["init_from"] or c["resume"]),
         "--preset=smollm2 fine-tunes SmolLM2: add --init_from=smollm2")])


# ----------------------------------------------------------------------------------------------
# a run's schedules, optimizer settings and batches, in no framework (both trainers follow them alike)

# options that may change when resuming; every other one must match the checkpoint
RESUMABLE = {"max_iters", "eval_interval", "eval_iters", "log_interval", "device", "compile", "resume", "overwrite",
             "out_dir", "distill_iters"}  # out_dir: the same folder may be named from another working directory


def lr_at(it, cfg):
    """Linear warmup, then cosine decay to min_lr_frac * lr."""
    if it < cfg["warmup_iters"]:
        return cfg["lr"] * (it + 1) / cfg["warmup_iters"]
    t = (it - cfg["warmup_iters"]) / max(1, cfg["max_iters"] - cfg["warmup_iters"])
    lo = cfg["lr"] * cfg["min_lr_frac"]
    return lo + 0.5 * (cfg["lr"] - lo) * (1 + math.cos(math.pi * min(1.0, t)))


def one_cycle_lr(step, max_lr, total_steps, pct_start=0.05, div_factor=25.0, final_div_factor=1e4):
    """Self-distillation's learning rate at optimizer step `step` (from 0): torch's OneCycleLR(max_lr, total_steps,
    pct_start) with its defaults, cosine from max_lr / div_factor up to max_lr over the first pct_start of the
    steps, then cosine down to that start / final_div_factor. A warm-up ending exactly at step 0 counts as done
    (torch divides by zero there: iters=20)."""
    initial, warm_end = max_lr / div_factor, float(pct_start * total_steps) - 1  # the warm-up's last step
    start, end, lr_from, lr_to = ((0.0, warm_end, initial, max_lr) if step <= warm_end else
                                  (warm_end, total_steps - 1, max_lr, initial / final_div_factor))
    pct = (step - start) / (end - start) if end != start else 1.0
    return lr_to + (lr_from - lr_to) / 2.0 * (math.cos(math.pi * pct) + 1)


@dataclass
class DistillConfig:
    """Self-distillation's options (docs/distillation.md)."""
    rollouts: str = "both"  # greedy | sampled | both (half each) | none (the training text itself)
    supervision: str = "mixed"  # hard: the rollout's tokens; soft: the clean stream's distribution at `temperature`;
    # mixed (with rollouts=both): hard on the greedy rollouts, soft on the sampled ones
    temperature: float = 0.8  # of sampled rollouts and of soft targets
    n_rollouts: int = 1024
    prompt_len: int = 16  # rollouts continue prompts of this many tokens of training text
    seq_len: int = 128  # prompt + continuation
    rank: int = 32
    lora_alpha: float = 32.0
    targets: str = "gate_proj,up_proj,down_proj"  # the MLP only: 3 hooks a layer instead of 7 (docs/distillation.md)
    lr: float = 3e-3
    iters: int = 1000
    batch_size: int = 16
    seed: int = 1337

    def __post_init__(self):
        refuse([(self.rollouts not in ("greedy", "sampled", "both", "none"),
                 f"rollouts must be greedy, sampled, both or none, got {self.rollouts!r}"),
                (self.supervision not in ("hard", "soft", "mixed"),
                 f"supervision must be hard, soft or mixed, got {self.supervision!r}"),
                ((self.supervision == "mixed") != (self.rollouts == "both"),
                 "supervision=mixed (hard on greedy rollouts, soft on sampled ones) goes with rollouts=both"),
                (self.rollouts == "none" and self.supervision == "hard",
                 "rollouts=none with supervision=hard is ordinary training: use supervision=soft"),
                (not 0 < self.prompt_len < self.seq_len,
                 f"need 0 < prompt_len < seq_len, got {self.prompt_len} and {self.seq_len}"),
                *((getattr(self, k) < 1, f"{k} must be >= 1, got {getattr(self, k)}")
                  for k in ("n_rollouts", "rank", "iters", "batch_size")),
                (self.temperature <= 0, f"temperature must be > 0, got {self.temperature}")], ValueError)


def distill_config(cfg):
    """The self-distillation a training run ends with: --distill_iters steps, no more rollouts than they read."""
    d = DistillConfig()
    return DistillConfig(iters=cfg["distill_iters"], seq_len=cfg["seq_len"], seed=cfg["seed"],
                         n_rollouts=min(d.n_rollouts, cfg["distill_iters"] * d.batch_size))


def decays(ndim, cfg):
    """AdamW's weight decay for a parameter of `ndim` dimensions: matrices decay, vectors do not."""
    return cfg["weight_decay"] if ndim >= 2 else 0.0


BETAS = (0.9, 0.95)  # AdamW's, in both trainers


def micro_steps(cfg, world):
    """Micro-batches per optimizer step in each of `world` processes: grad_accum / world (as in nanoGPT)."""
    if cfg["grad_accum"] % world:
        raise UsageError(f"--grad_accum={cfg['grad_accum']} is split among the {world} processes: make it a "
                         f"multiple of {world} (the global batch, batch_size*grad_accum rows, stays the same)")
    return cfg["grad_accum"] // world


def micro_batches(ids, it, cfg, rank=0, world=1):
    """The micro-batches (numpy arrays) of process `rank` in step `it`: the step's global batch is a function of
    (seed, it) only, so --resume and any number of processes see the same rows in the same order; it is dealt
    out row block by row block, micro_steps(cfg, world) blocks to each process."""
    bs, seed = cfg["batch_size"], cfg["seed"] * 1_000_003 + it
    offsets = data.batch_offsets(len(ids), cfg["seq_len"], bs * cfg["grad_accum"], seed)
    starts = [(micro * world + rank) * bs for micro in range(micro_steps(cfg, world))]
    return [data.get_batch(ids, offsets[i:i + bs], cfg["seq_len"]) for i in starts]


# ----------------------------------------------------------------------------------------------
# the start-up decision

def recipe(cfg, given, framework, log=print):
    """The runs that make the model asked for, as (options, options given) pairs: the one run asked for, or with
    --ar_iters=K the paper's recipe, an AR run of K steps in out_dir/ar, then the conversion in out_dir
    (--init_from=out_dir/ar, a schedule of its own for the other max_iters - K steps). With --resume, each run
    continues where it stopped and a finished AR run is kept; once the conversion has begun, it is the one run.
    A checkpoint already in a run's out_dir is replaced only with --overwrite: refused before the first run."""
    out_dir, ar_dir, K = cfg["out_dir"], os.path.join(cfg["out_dir"], "ar"), cfg["ar_iters"]
    refuse([(cfg["resume"] and not (has_checkpoint(out_dir) or K and has_checkpoint(ar_dir)),
             f"--resume: no checkpoint in {out_dir}; run without --resume first")])
    runs = [cfg]
    if K and not (cfg["resume"] and has_checkpoint(out_dir)):
        ar_state = read_train_state(ar_dir, framework) if cfg["resume"] and has_checkpoint(ar_dir) else None
        runs = [{**cfg, "max_iters": cfg["max_iters"] - K, "resume": False, "init_from": ar_dir}]
        if ar_state is None or ar_state["iter"] < K:
            runs.insert(0, {**cfg, "objective": "ar", "max_iters": K, "out_dir": ar_dir, "ar_iters": 0,
                            "distill_iters": 0, "resume": ar_state is not None})
    for run in runs[::-1]:  # out_dir's, then out_dir/ar's
        if has_checkpoint(run["out_dir"]) and not (run["resume"] or run["overwrite"]):
            raise UsageError(f"{run['out_dir']} already holds a checkpoint: add --resume to continue it, "
                             f"--overwrite to replace it, or choose another --out_dir")
    if K:
        log(f"the paper's recipe: {K} steps of AR pretraining ({ar_dir}), then {cfg['max_iters'] - K} "
            f"converting it into an I-DLM ({out_dir})")
    return [(run, given) for run in runs]


def start_from(cfg, given, framework, load_weights):
    """Where a run starts: the run in out_dir (--resume), another checkpoint (--init_from) or scratch. Returns
    (cfg, model config, tokenizer, weights, train state); all but cfg are None from scratch, the state only when
    resuming. With --lora, the weights are the frozen base's (the adapter is the trainer's business). With
    --init_from, cfg records the checkpoint's model shape and tokenizer, not the preset's. load_weights reads a
    model.safetensors file with the framework's own loader."""
    out_dir, state = cfg["out_dir"], None
    if cfg["resume"]:
        state = read_train_state(out_dir, framework)
        cfg = resumed_config(state, cfg, given)
        source, what = out_dir, "--resume"
        if cfg["lora"]:  # the frozen base, under the adapter trained so far
            try:
                source, what = checkpoint.adapter_base(out_dir), "--resume: the adapter's base model"
            except (OSError, ValueError, KeyError) as e:
                raise UsageError(f"--resume: the adapter in {out_dir} cannot be read: {e}") from None
    elif cfg["init_from"]:
        source, what = cfg["init_from"], "--init_from"
    else:
        return cfg, None, None, None, None
    mcfg, enc, weights = load_pretrained(source, what, load_weights)
    check_against(mcfg, enc, cfg, given)
    if not cfg["resume"]:
        cfg = {**cfg, **{k: getattr(mcfg, k) for k in MODEL_KEYS}, "tokenizer": enc.name, "vocab_size": enc.n_vocab}
    return cfg, mcfg, enc, weights, state


def resumed_config(state, cfg, given):
    """The options of the run being resumed, with the ones given that may change (RESUMABLE). A --max_iters
    given counts the whole recipe: a conversion's own steps are those after its AR part (ar_iters)."""
    saved = state["config"]
    diff = [k for k in given - RESUMABLE if saved.get(k) != cfg[k]]
    if diff:
        raise UsageError(f"--resume: the checkpoint in {cfg['out_dir']} was trained with "
                         + ", ".join(f"--{k}={saved.get(k)}" for k in diff)
                         + "; drop those options or use another --out_dir")
    resumed = {**saved, **{k: cfg[k] for k in given & RESUMABLE}}
    if "max_iters" in given:
        resumed["max_iters"] -= saved.get("ar_iters", 0)
    return resumed


def check_against(mcfg, enc, cfg, given):
    """Refuse options that contradict the checkpoint the run starts from (--init_from or --resume)."""
    if not cfg["resume"]:  # --init_from; when resuming, resumed_config compared the model shape
        clash = [k for k in given & set(MODEL_KEYS) if getattr(mcfg, k) != cfg[k]]
        if clash:
            raise UsageError(f"--init_from={cfg['init_from']} has " + ", ".join(f"{k}={getattr(mcfg, k)}" for k in clash)
                             + ": drop the model-shape options that contradict it")
        if cfg["seq_len"] > mcfg.max_seq_len:
            raise UsageError(f"--seq_len={cfg['seq_len']} exceeds the checkpoint's max_seq_len {mcfg.max_seq_len}")
    if "tokenizer" in given and cfg["tokenizer"] != enc.name.split("-")[0]:
        raise UsageError(f"--tokenizer={cfg['tokenizer']} contradicts the checkpoint's tokenizer {enc.name}")
    if "vocab_size" in given and cfg["vocab_size"] != enc.n_vocab:
        raise UsageError(f"--vocab_size={cfg['vocab_size']} contradicts the checkpoint's tokenizer {enc.name} "
                         f"({enc.n_vocab} tokens)")


def has_checkpoint(out_dir):
    """Whether out_dir holds a model or an adapter."""
    return os.path.isfile(os.path.join(out_dir, "config.json")) or checkpoint.has_adapter(out_dir)


def read_train_state(out_dir, framework):
    """The train state --resume continues: the metadata of optimizer.safetensors (train.save_checkpoint)."""
    path = os.path.join(out_dir, "optimizer.safetensors")
    refuse([(not has_checkpoint(out_dir), f"--resume: no checkpoint in {out_dir}; run without --resume first"),
            (not os.path.isfile(path),
             f"--resume: {out_dir} has no optimizer.safetensors (not a training run); drop --resume")])
    with safe_open(path, "np") as f:
        state = json.loads((f.metadata() or {}).get("state", "{}"))
    made_with = state.get("framework", "pytorch")  # the optimizer state is the framework's own
    refuse([(not state, f"--resume: {path} holds no train state (an older train.py wrote it); "
                        f"start from its weights with --init_from={out_dir} instead"),
            (made_with != framework, f"--resume: {out_dir} was trained with {made_with}: resume it "
                                     f"with that trainer, or start from its weights with --init_from")])
    return state


def load_pretrained(path, what, load_weights):
    """(model config, tokenizer, weights) of a checkpoint folder or a pretrained name (smollm2: the folder
    train.py converts it into before it starts), or a one-line UsageError."""
    if path == PRETRAINED:
        try:
            path = checkpoint.converted_pretrained()
        except ValueError as e:
            raise UsageError(f"{what}={PRETRAINED}: {e}") from None
    if not os.path.isdir(path):
        raise UsageError(f"{what}={path}: no such folder")
    try:
        mcfg, enc = load_config(path), tok.load(path)
        weights = load_weights(os.path.join(path, "model.safetensors"))
    except (FileNotFoundError, ValueError, OSError) as e:
        raise UsageError(f"{what}={path} is not a checkpoint of this project: {e}") from None
    if mcfg.mask_token_id != enc.n_vocab or mcfg.vocab_size != enc.n_vocab + 1:
        raise UsageError(f"{what}={path}: config.json does not match its tokenizer "
                         f"({mcfg.vocab_size} ids vs {enc.n_vocab} + MASK)")
    return mcfg, enc, weights


def load_data(cfg, enc=None, log=print):
    """(tokenizer, train ids, val ids) of --data (the tokenizer trained on it unless `enc` is given),
    long enough for --seq_len; a UsageError if not."""
    try:
        enc, train_ids, val_ids = data.load_corpus(cfg["data"], cfg["tokenizer"], cfg["vocab_size"], enc=enc, log=log)
        data.batch_offsets(min(len(train_ids), len(val_ids)), cfg["seq_len"], 1, 0)  # long enough?
    except data.DataError as e:
        raise UsageError(str(e)) from None
    return enc, train_ids, val_ids


# ----------------------------------------------------------------------------------------------
# what a run prints

def run_line(cfg, n_params, mcfg, n_train, where):
    """The run at a glance, printed before its first step; `where`: the processes or framework and device."""
    return (f"{cfg['objective']} model: {n_params / 1e6:.2f}M parameters, vocab {mcfg.vocab_size} (MASK = "
            f"{mcfg.mask_token_id}), {n_train / 1e6:.2f}M train tokens, stride {cfg['stride']}, "
            f"{cfg['batch_size'] * cfg['grad_accum']} rows x {cfg['seq_len']} tokens per step, {where}")


def evaluates_at(it, start, cfg):
    """Whether the run evaluates and saves before step `it`: every eval_interval steps and at the end."""
    return it > start and (it % cfg["eval_interval"] == 0 or it == cfg["max_iters"])


def progress_line(step, cfg, losses, lr, tps, eta):
    """One line of progress: step, losses (loss, task, clean; no task for the AR objective), lr, speed, ETA."""
    parts = {"idlm": f"task {losses[1]:.4f} clean {losses[2]:.4f}", "ar": f"clean {losses[2]:.4f}"}.get(
        cfg["objective"], "(diffusion bound)")
    speed = f"{tps / 1e3:.1f}k" if tps >= 1000 else f"{tps:.1f}"
    minutes, seconds = divmod(round(eta), 60)
    return (f"step {step}/{cfg['max_iters']} | loss {losses[0]:.4f} {parts} | lr {lr:.2e} | {speed} tok/s"
            f" | ETA {minutes}m{seconds:02d}s")


def log_progress(it, losses, lr, start, t0, t_last, cfg, log=print):
    """After step `it`, every log_interval steps and at the last: the progress line (speed since the
    last line, at t_last; ETA from the run's start step and time t0). Returns the time of the last line."""
    if (it + 1) % cfg["log_interval"] and it + 1 != cfg["max_iters"]:
        return t_last
    now = time.time()
    n = (it + 1 - start) % cfg["log_interval"] or cfg["log_interval"]
    tps = n * cfg["batch_size"] * cfg["grad_accum"] * cfg["seq_len"] / (now - t_last)
    eta = (now - t0) / (it + 1 - start) * (cfg["max_iters"] - it - 1)
    log(progress_line(it + 1, cfg, losses, lr, tps, eta), flush=True)
    return time.time()
