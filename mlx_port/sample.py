"""Sample from a checkpoint with Introspective Strided Decoding (mlx_port/isd.py), in MLX.

    python -m mlx_port.sample --out_dir=out --prompt="ROMEO:" --stride=4 --max_new_tokens=200 --temperature=0.8 --seed=1
    python -m mlx_port.sample --init_from=smollm2 --chat --prompt="What is the capital of France?" --temperature=0
    python -m mlx_port.sample --out_dir=out-rlora --chat --prompt="..."   # a folder with an adapter: base + gated LoRA

sample.py in MLX (diff them): the same command line (cli.py), the same output; --device is auto (MLX's
default device: the GPU on a Mac), cpu or gpu. No diffusion-LM baselines: cli.py refuses their checkpoints.
"""
import mlx.core as mx

import cli
from mlx_port import isd, lora
from mlx_port.model import pick_device


def load_model(source, device):
    """(MLX model, tokenizer) of a checkpoint folder, one with a gated LoRA adapter (its base + the
    adapter) or a pretrained name, on --device (auto, cpu, gpu)."""
    mx.set_default_device(pick_device(device))
    return lora.load_model(source)


def main(argv=None):
    cli.main(argv, isd, load_model, __doc__)


if __name__ == "__main__":
    main()
