"""The presets of train.py (--preset): a model shape and training defaults for each kind of machine;
any option given on the command line overrides its preset.

    python train.py --preset=tiny        # seconds: for trying the code paths
    python train.py --preset=gpu         # GPT-2-small shapes
"""
import pretrained
from model import ModelConfig, load_config

MODEL_KEYS = ("n_layer", "n_head", "n_kv_head", "d_model", "d_ff", "rope_theta")
PRESETS = {
    # ~1M parameters, a 2,048-token BPE: the default, about 4 minutes of training on a 2-core CPU, then
    # about 4 of self-distillation; alpha 1: at this size it beat the paper's 0.2 on BOTH validation
    # losses (docs/results.md, AR vs I-DLM quality)
    "cpu": dict(n_layer=4, n_head=4, n_kv_head=2, d_model=128, d_ff=384, seq_len=128, tokenizer="bpe",
                vocab_size=2048, batch_size=16, grad_accum=1, max_iters=800, lr=3e-3, warmup_iters=50,
                eval_interval=200, eval_iters=8, alpha=1.0, distill_iters=1000),
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
                lora=0, lora_alpha=16.0, distill_iters=0, block_size=4)


def model_config(cfg, n_vocab):
    """The model of a run from scratch: cfg's shape (a preset's, or the options given), the
    tokenizer's n_vocab ids + MASK."""
    return ModelConfig(vocab_size=n_vocab + 1, mask_token_id=n_vocab, max_seq_len=cfg["seq_len"],
                       **{k: cfg[k] for k in MODEL_KEYS})


def preset_model_config(preset):
    """The model of `python train.py --preset=<preset>` with no other option: the preset's shape and its
    vocab_size ids + MASK (a BPE reaches vocab_size on all but tiny data); for smollm2, which starts
    from SmolLM2 (--init_from=smollm2), SmolLM2's, converted on first use."""
    if preset == "smollm2":
        return load_config(pretrained.smollm2_dir())
    cfg = {**DEFAULTS, **PRESETS[preset]}
    return model_config(cfg, cfg["vocab_size"])
