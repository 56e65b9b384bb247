"""The I-DLM in MLX (Apple's array framework): model.py, train.py and isd.py mirror the PyTorch files
of the same names, with the same config, parameter names and checkpoint format. Decoding runs
isd.py's batched core (the one the PyTorch side uses) with an MLX forward."""
