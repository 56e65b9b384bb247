"""The I-DLM in MLX (Apple's array framework): model.py, isd.py (with sampling.py and kernels.py), sample.py,
lora.py, distill.py and train.py mirror the PyTorch files of the same names (diff them), with the same
config, parameter names and checkpoint files. Nothing here imports torch; what both sides share is
framework-free: checkpoint.py (formats), data.py, tokenizer.py, options.py (the run's plan), decoding.py,
cli.py (the command line).

On Linux, the mlx[cpu] wheel does its matrix products with the reference BLAS it bundles, about 20x
slower than an optimized one. When the system has OpenBLAS (apt install libopenblas0), it is loaded
here, before mlx.core, with its symbols global, so MLX's calls to cblas_sgemm resolve to it (docs/mlx.md).
Not in a process that has imported torch: there OpenBLAS's threads fight torch's and PyTorch runs up to
10x slower (measured on 2 cores); nor with IDLM_MLX_BLAS=bundled.
"""
import ctypes
import ctypes.util
import os
import sys

if (sys.platform == "linux" and os.environ.get("IDLM_MLX_BLAS") != "bundled"
        and "mlx.core" not in sys.modules and "torch" not in sys.modules):
    _openblas = ctypes.util.find_library("openblas")
    if _openblas:
        ctypes.CDLL(_openblas, mode=ctypes.RTLD_GLOBAL)
