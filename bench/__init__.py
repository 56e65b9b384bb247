"""The benchmarks, one command line: python -m bench <benchmark> (from the repository root; bench/__main__.py)."""
