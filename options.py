"""The options of train.py (and mlx_port/train.py): the presets, a model shape and training defaults for
each kind of machine; the command line, where any option given overrides its preset; and the checks
that refuse a bad combination in one line.

    python train.py --preset=tiny        # seconds: for trying the code paths
    python train.py --preset=gpu         # GPT-2-small shapes
"""
import argparse
import os

from checkpoint import PRETRAINED, ModelConfig

OBJECTIVES = ("idlm", "ar", "dlm", "bdlm")  # the last two: dlm.FAMILIES, the diffusion baselines
MODEL_KEYS = ("n_layer", "n_head", "n_kv_head", "d_model", "d_ff", "rope_theta")
PRESETS = {
    # ~1M parameters, a 2,048-token BPE: the default. The paper's recipe: 400 steps of AR pretraining,
    # 400 converting it (alpha 3), then self-distillation; about 10 minutes on a 2-core CPU. The split
    # and alpha were chosen by a sweep at 800 steps in all (docs/results.md, the paper's recipe)
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
    """The model of a run from scratch: cfg's shape (a preset's, or the options given), the
    tokenizer's n_vocab ids + MASK."""
    return ModelConfig(vocab_size=n_vocab + 1, mask_token_id=n_vocab, max_seq_len=cfg["seq_len"],
                       **{k: cfg[k] for k in MODEL_KEYS})


def idlm_from_scratch(cfg):
    """Whether the run makes an I-DLM from nothing: the only run --ar_iters (AR first, then a
    conversion) applies to."""
    return cfg["objective"] == "idlm" and not cfg["init_from"] and not cfg["lora"]


class UsageError(ValueError):
    """Bad options or inputs: reported as one line, exit code 2."""


def alpha_option(text):
    """--alpha: a number, or "auto"."""
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
    a("--alpha", type=alpha_option,
      help="weight of the clean (AR) term: a number or 'auto' = (task/clean).detach() (paper 0.2; cpu preset 3; "
           "from scratch, 1 measured best)")
    a("--data", help="a UTF-8 text file or a folder of .txt files (default: the Shakespeare plays)")
    a("--tokenizer", choices=["bpe", "gpt2"], help="bpe: trained on the train split; gpt2: the GPT-2 encoding")
    a("--vocab_size", type=int, help="BPE vocabulary size, end-of-text included (MASK is one more id)")
    a("--out_dir", help="where checkpoints go (default out)")
    a("--init_from", help="start from the weights (and tokenizer) of this checkpoint folder, e.g. an AR model, "
                          "or of a pretrained model by name: smollm2 (SmolLM2-135M-Instruct)")
    a("--lora", type=int, help="R-ISD: freeze the --init_from model and train gated LoRA adapters of this rank "
                               "(attention and MLP projections, active only at MASK positions); the checkpoint holds the "
                               "adapter (adapter.safetensors + adapter.json) instead of the frozen base weights "
                               "(default 0 = off, train every weight)")
    a("--lora_alpha", type=float, help="LoRA scale numerator: the adapter's output is scaled by alpha/rank (default 16)")
    a("--distill_iters", type=int, help="after training, self-distil the masks (distill.py: the model's own greedy "
                                        "and sampled continuations, a gated LoRA adapter in out_dir/distilled) for "
                                        "this many steps; "
                                        "0 = off (default: 1000 for the cpu preset, else 0)")
    a("--ar_iters", type=int, help=f"the paper's recipe: pretrain an AR model for this many of the --max_iters steps "
                                   "(in out_dir/ar), then convert it into an I-DLM with the introspective loss for the "
                                   "rest; 0 = train the I-DLM from scratch (default: {PRESETS['cpu']['ar_iters']} for the cpu preset, else 0; "
                                   "only for an I-DLM from scratch: not with --init_from, --lora or another --objective)")
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
    return cfg, set(args)


def check_options(cfg, given):
    if cfg["stride"] < 1:
        raise UsageError(f"--stride must be >= 1, got {cfg['stride']}")
    if cfg["objective"] == "idlm" and cfg["stride"] < 2:
        raise UsageError("--stride=1 has no masks to train: use --objective=ar for plain AR")
    if cfg["distill_iters"] < 0:
        raise UsageError(f"--distill_iters must be >= 0, got {cfg['distill_iters']}")
    if "distill_iters" in given and cfg["distill_iters"] and (cfg["lora"] or cfg["objective"] == "ar"):
        raise UsageError("--distill_iters distils the masks of a full I-DLM: not with --lora or --objective=ar")
    for k in ("batch_size", "grad_accum", "max_iters", "seq_len", "eval_interval", "eval_iters", "log_interval"):
        if cfg[k] < 1:
            raise UsageError(f"--{k} must be >= 1, got {cfg[k]}")
    if not cfg["resume"]:  # when resuming, the checkpoints say how they were made (train.recipe)
        if cfg["ar_iters"] < 0 or cfg["ar_iters"] >= cfg["max_iters"]:
            raise UsageError(f"--ar_iters must be in [0, --max_iters={cfg['max_iters']}), got {cfg['ar_iters']}")
        if cfg["ar_iters"] and not idlm_from_scratch(cfg):
            raise UsageError("--ar_iters pretrains AR, then converts it into an I-DLM: only for --objective=idlm "
                             "from scratch (not with --init_from or --lora)")
    if cfg["resume"] and cfg["init_from"]:
        raise UsageError("--resume continues --out_dir; it cannot be combined with --init_from")
    if cfg["lora"] < 0:
        raise UsageError(f"--lora must be >= 0, got {cfg['lora']}")
    if cfg["lora"] and not (cfg["init_from"] or cfg["resume"]):
        raise UsageError("--lora adapts a frozen model: give it with --init_from (e.g. --init_from=smollm2)")
    if cfg["lora"] and cfg["init_from"] and os.path.abspath(cfg["init_from"]) == os.path.abspath(cfg["out_dir"]):
        raise UsageError("--lora saves only the adapter, which refers to its base: --out_dir must not be --init_from")
    if "lora_alpha" in given and not cfg["lora"]:
        raise UsageError("--lora_alpha scales the adapter: give it with --lora=RANK")
    if cfg["block_size"] < 1:
        raise UsageError(f"--block_size must be >= 1, got {cfg['block_size']}")
    if cfg["lora"] and cfg["objective"] != "idlm":
        raise UsageError("--lora adapters act only at MASK positions: they need --objective=idlm")
    if cfg["preset"] == "smollm2" and not (cfg["init_from"] or cfg["resume"]):
        raise UsageError("--preset=smollm2 fine-tunes SmolLM2: add --init_from=smollm2")
