"""python -m bench gpu (bench/gpu.py): the dry run goes through all five stages end to end and writes its results file;
without a GPU the real run refuses in one line; a stage's share stops work that would overrun it."""
import os
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import gpu  # noqa: E402


def run(tmp_path, *args):
    env = {**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "bench", "gpu", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow  # end to end (a subprocess, a whole command): CI runs it, -m 'not slow' skips it
def test_dry_run_end_to_end(tmp_path):
    p = run(tmp_path, "--dry_run")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for i, name in enumerate(["kernel", "train", "smollm2", "serve", "learn"], 1):
        assert f"[{i}/5] {name}: done in" in p.stdout  # a progress line per stage
    text = (tmp_path / "gpu_bench.md").read_text()
    r = gpu.read_results(tmp_path / "gpu_bench.md")
    assert r["dry_run"] and list(r["stages"]) == ["kernel", "train", "smollm2", "serve", "learn"]
    for name, s in r["stages"].items():
        assert s["error"] is None and s["stopped"] is None and 0 < s["wall_s"] < s["share_s"], (name, s)
        assert f"## {name}: done in" in text
    z = gpu.SIZES["dry_run"]
    k = r["stages"]["kernel"]
    assert [(c["vocab"], c["rows"]) for c in k["timing"]] == [(v, n) for v in z["vocabs"] for n in z["rows"]]
    assert len(k["check"]) == len(z["vocabs"]) * len(z["check_temperatures"])
    assert all(c["accept_differs"] == 0 and c["correction_differs"] == 0 and c["max_ratio_diff"] < 1e-5
               for c in k["check"])  # the interpreter computes what the reference does
    t = r["stages"]["train"]
    assert t["steps"] == z["train_steps"] and t["ar"] > 0 and t["idlm"] > 0
    s = r["stages"]["smollm2"]
    assert s["recipe"]["train_steps"] == 2 and s["recipe"]["data_tokens"] > 0
    dec = s["decoders"]
    assert len(dec) == 3 and any("R-ISD" in k for k in dec)
    for k, d in dec.items():  # greedy ISD, with or without the adapter, gives AR's tokens
        assert d["prompts"] == z["n_held_out"] and d["same"] == d["prompts"] and d["tokens"] > 0, (k, d)
    pts = r["stages"]["serve"]["points"]
    assert sorted((p["stride"], p["concurrency"]) for p in pts) == [(1, 1), (1, 2), (4, 1), (4, 2)]
    assert all(0 < p["tokens"] <= max(2 * p["concurrency"], z["min_requests"]) * z["serve_tokens"]
               and p["tpf"] >= 1 for p in pts)
    le = r["stages"]["learn"]
    assert le["requests"] == z["learn_requests"] and len(le["points"]) == z["learn_requests"] // z["learn_window"]
    assert all(p["tpf"] >= 1 for p in le["points"]) and le["learner"]["examples"] == z["learn_requests"]
    for header in ("| vocab | rows | reference ms", "| AR tok/s | I-DLM tok/s", "| method | TPF",
                   "| concurrency | stride 4 tok/s", "| requests served | TPF"):
        assert header in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is here")
def test_without_gpu_one_line_and_nonzero_exit(tmp_path):
    p = run(tmp_path)
    assert p.returncode != 0
    assert p.stdout == "" and len(p.stderr.strip().splitlines()) == 1 and "no CUDA GPU" in p.stderr
    assert not (tmp_path / "gpu_bench.md").exists()


def test_share_stops_work_that_would_overrun():
    s = gpu.Share("x", 0.2)
    assert not s.stop()  # nothing measured yet
    time.sleep(0.12)
    assert s.stop("piece 2")  # the first piece took 0.12 s: a second one would end after 0.24 s
    assert s.stop() and len(s.notes) == 1 and "piece 2" in s.notes[0] and "overrun" in s.notes[0]
    s = gpu.Share("y", 10)
    s.stop()
    time.sleep(0.01)
    assert not s.stop() and not s.notes


@pytest.mark.slow  # end to end (a subprocess, a whole command): CI runs it, -m 'not slow' skips it
def test_stages_stop_at_their_share_and_say_so(tmp_path):
    p = run(tmp_path, "--dry_run", "--budget=0.1", "--stages=kernel,train")  # 0.01 s, 0.016 s: over after one piece
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "kernel: stopped before the next cell" in p.stdout and "[2/2] train: stopped in" in p.stdout
    r = gpu.read_results(tmp_path / "gpu_bench.md")
    assert list(r["stages"]) == ["kernel", "train"]
    k, t = r["stages"]["kernel"], r["stages"]["train"]
    assert "overrun" in k["stopped"] and len(k["timing"]) == 1 and k["check"] == []  # the first cell always runs
    assert "overrun" in t["stopped"] and t["steps"] == 1 and t["ar"] > 0
    assert "**stopped before the next cell" in (tmp_path / "gpu_bench.md").read_text()
