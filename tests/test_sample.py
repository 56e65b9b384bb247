"""sample.py, the command line, on a tiny trained checkpoint: JSON output, the HTML trace, errors, torch threads."""
import json
import os
import subprocess
import sys

import pytest
import torch

import sample
import tokenizer as tok
from decoding import SamplingParams
from isd import ar_generate
from model import Model, ModelConfig
from reference import train_tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    train_tiny(d, [["--max_iters=5", f"--out_dir={d}/out"]])
    return str(d / "out")


def sample_cli(*args):
    return subprocess.run([sys.executable, "sample.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_json_greedy_equals_ar_and_html_trace(ckpt, tmp_path):
    html = tmp_path / "trace.html"
    r = sample_cli(f"--out_dir={ckpt}", "--prompt=ROMEO:", "--temperature=0", "--max_new_tokens=12", "--json",
                   f"--visualize={html}")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    model, enc = Model.load(ckpt).eval(), tok.load(ckpt)
    ref = ar_generate(model, enc.encode_ordinary("ROMEO:"), SamplingParams(12, temperature=0, stop_ids=[enc.eot_token]))
    assert got["tokens"] == ref and got["text"] == enc.decode(ref)
    assert got["stats"]["tokens"] == len(ref) and got["stats"]["tpf"] >= 1
    page = html.read_text()
    assert page.startswith("<!doctype html>") and page.count("<tr>") == got["stats"]["forwards"] + 1


@pytest.mark.slow  # end to end (a subprocess, a whole command): CI runs it, -m 'not slow' skips it
def test_cli_errors(ckpt, tmp_path):
    for args, needle in [([f"--out_dir={tmp_path}/none"], "run python train.py first"),
                         ([f"--out_dir={ckpt}", "--prompt="], "prompt is empty"),
                         ([f"--out_dir={ckpt}", "--stride=0"], "--stride must be >= 1"),
                         ([f"--out_dir={ckpt}", "--temperature=-1"], "--temperature must be >= 0"),
                         ([f"--out_dir={ckpt}", "--max_new_tokens=0"], "max_new_tokens must be >= 1"),
                         ([f"--out_dir={ckpt}", "--top_k=0"], "top_k must be >= 1")]:
        r = sample_cli(*args)
        assert r.returncode == 2 and needle in r.stderr, (args, r.stderr)


def test_decode_threads_one_for_a_small_model_unless_omp_num_threads(monkeypatch):
    """A model under sample.SMALL_MODEL parameters decodes on one torch thread; OMP_NUM_THREADS, when set, wins;
    a large model keeps torch's count. (The count is restored afterwards: it is process-wide.)"""
    before = torch.get_num_threads()
    small = Model(ModelConfig(vocab_size=17, mask_token_id=16, n_layer=1, n_head=2, n_kv_head=1, d_model=8, d_ff=16))
    big = torch.nn.Linear(1, 1)
    big.weight = torch.nn.Parameter(torch.empty(sample.SMALL_MODEL, 1))  # as many parameters as the threshold
    try:
        torch.set_num_threads(2)
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert sample.decode_threads(big) == 2
        assert sample.decode_threads(small) == 1
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert sample.decode_threads(small) == 2
    finally:
        torch.set_num_threads(before)
