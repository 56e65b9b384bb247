"""Sample from a checkpoint, in PyTorch: with Introspective Strided Decoding (isd.py), or a diffusion-LM
baseline's (train.py --objective=dlm or bdlm) with its own decoder (dlm.py).

    python sample.py --out_dir=out --prompt="ROMEO:" --stride=4 --max_new_tokens=200 --temperature=0.8 --seed=1
    python sample.py --init_from=smollm2 --chat --prompt="What is the capital of France?" --temperature=0
    python sample.py --out_dir=out-rlora --chat --prompt="..."   # a folder with an adapter: base + gated LoRA
    python sample.py --out_dir=out-dlm --prompt="ROMEO:" --steps=2 --json   # a diffusion LM: --steps, --threshold, --block

It prints the text and one line of statistics; --compare also decodes with AR, --visualize shows what
each forward drafted and kept. The command line itself is cli.py's, shared with python -m mlx_port.sample.
"""
import os

import torch

import cli
import dlm
import isd
import lora
from decoding import SamplingParams

SMALL_MODEL = 20_000_000  # parameters: below this a CPU decodes on one torch thread (decode_threads)


def decode_threads(model):
    """Torch threads for decoding `model` on a CPU, unless OMP_NUM_THREADS says: one for a small model, whose
    matrices are too small to split; with two, a 1M-parameter model decodes 4x slower as soon as anything
    else runs on a 2-core machine (docs/results.md). Returns the number set."""
    small = sum(p.numel() for p in model.parameters()) < SMALL_MODEL
    if "OMP_NUM_THREADS" not in os.environ and small and next(model.parameters()).device.type == "cpu":
        torch.set_num_threads(1)
    return torch.get_num_threads()


def load_model(source, device):
    """(model, tokenizer) of a checkpoint folder, one with a gated LoRA adapter (its base + the adapter) or
    a pretrained name, on --device (default cpu), with decode_threads' torch threads."""
    model, enc = lora.load_model(source, device=device or "cpu")
    decode_threads(model)
    return model, enc


def diffuse(a):
    """cli.main's `diffuse`: a diffusion LM's checkpoint (cli.py's options `a`) decoded with dlm.dlm_generate."""
    model, enc, family, block = dlm.load(a.out_dir, a.device or "cpu")
    if family == "bdlm" and a.block not in (None, block):
        raise ValueError(f"{a.out_dir} is a block DLM trained with blocks of {block}: --block must be {block}")
    block = a.block or block
    decode_threads(model)
    params = SamplingParams(a.max_new_tokens, a.temperature, a.top_k, a.top_p, a.seed)
    out, _, _, st = dlm.dlm_generate(model, family, enc.encode_ordinary(a.prompt), params, block, a.steps or block,
                                     a.threshold)
    return enc, out, st, f"{family} | block {block}"


def main(argv=None):
    cli.main(argv, isd, load_model, __doc__, diffuse)


if __name__ == "__main__":
    main()
