"""mlx_port/ against the PyTorch files it mirrors, on the same checkpoints.

The references are PyTorch's model.py, isd.py and train.py (tested on their own against brute force
in test_model.py, test_isd.py and test_train.py): the same weights must give the same logits (float32,
within 1e-4) for a plain forward, a cached windowed forward and the [xt | x0] training forward, the
same introspective loss, the same training steps and bit-exact checkpoints both ways, and the same
greedy tokens from the command line (python -m mlx_port.sample as python sample.py; mlx_port/isd.py
itself: test_mlx_isd.py). mlx[cpu] on Linux uses a slow reference BLAS: every model here is tiny.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

mx = pytest.importorskip("mlx.core")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import data  # noqa: E402
from decoding import SamplingParams  # noqa: E402
import isd  # noqa: E402
import tokenizer as tok  # noqa: E402
import train  # noqa: E402
from model import Model as TorchModel, ModelConfig, idlm_loss as torch_idlm_loss  # noqa: E402
from model import ar_loss as torch_ar_loss, idlm_mask as torch_idlm_mask  # noqa: E402
from mlx_port import model as mm, train as mlx_train  # noqa: E402
from reference import torch_model  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-4


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(PyTorch model, the MLX model loaded from its checkpoint with mx.load)."""
    d = str(tmp_path_factory.mktemp("ckpt"))
    t = torch_model()
    t.save(d)
    return t, mm.Model.load(d)


def to_mx(x):
    return mx.array(x.numpy())


def close(torch_out, mlx_out):
    return float(np.abs(torch_out.detach().numpy() - np.array(mlx_out)).max())


def test_plain_forward_matches_pytorch(pair):
    t, m = pair
    x = torch.randint(0, 15, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = t(x)
    assert close(ref, m(to_mx(x))) < TOL


def test_cached_windowed_forward_matches_pytorch(pair):
    """ISD's pattern: rows of different lengths, rollback, then windows for a subset of the rows."""
    t, m = pair
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, 15, (3, 12), generator=g)
    tc, mc = t.new_cache(3, 40), m.new_cache(3, 40)
    with torch.no_grad():
        ref = t(prompt, cache=tc)
    assert close(ref, m(to_mx(prompt), cache=mc)) < TOL
    tc.truncate([5, 9, 12])
    mc.truncate([5, 9, 12])
    for rows in ([2, 0], [1], [0, 1, 2]):
        window = torch.randint(0, 16, (len(rows), 7), generator=g)  # MASK (15) included
        with torch.no_grad():
            ref = t(window, cache=tc, rows=rows)
        assert close(ref, m(to_mx(window), cache=mc, rows=rows)) < TOL
        assert np.array(mc.lengths).tolist() == tc.lengths.tolist()
        tc.truncate([n - 3 for n in tc.lengths[rows].tolist()], rows)
        mc.truncate([n - 3 for n in np.array(mc.lengths)[rows].tolist()], rows)
    with pytest.raises(ValueError, match="overflow"):
        m(mx.zeros((1, 40), dtype=mx.int64), cache=mc, rows=[0])


def test_training_forward_and_introspective_loss_match_pytorch(pair):
    t, m = pair
    g = torch.Generator().manual_seed(3)
    x0 = torch.randint(0, 15, (2, 17), generator=g)
    labels = x0.clone()
    labels[0, :5] = -100  # a prompt without loss, as in chat data
    for L, b in ((6, 2), (17, 3), (9, 1)):
        assert np.array_equal(np.array(mm.idlm_mask(L, b)), torch_idlm_mask(L, b).numpy())
    for stride in (2, 4):
        # the [xt | x0] forward itself: positions 0..L-1 twice, the block mask
        xt = torch.where(labels != -100, torch.full_like(x0, 15), x0)
        pos = torch.arange(17).repeat(2)
        with torch.no_grad():
            ref = t(torch.cat([xt, x0], 1), pos=pos, mask=torch_idlm_mask(17, stride - 1))
        got = m(to_mx(torch.cat([xt, x0], 1)), pos=to_mx(pos), mask=mm.idlm_mask(17, stride - 1))
        assert close(ref, got) < TOL
        for alpha in (0.2, "auto"):
            with torch.no_grad():
                want = torch_idlm_loss(t, x0, labels, stride=stride, alpha=alpha)
            got = mm.idlm_loss(m, to_mx(x0), to_mx(labels), stride=stride, alpha=alpha)
            for w, v in zip(want, got):
                assert abs(w.item() - v.item()) < TOL
    with torch.no_grad():
        assert abs(torch_ar_loss(t, x0, labels).item() - mm.ar_loss(m, to_mx(x0), to_mx(labels)).item()) < TOL


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_checkpoint_pytorch_to_mlx_to_pytorch_is_bit_exact(tmp_path, dtype):
    t = torch_model(seed=4, dtype=dtype)
    t.save(tmp_path / "a")
    m = mm.Model.load(tmp_path / "a")
    m.save(tmp_path / "b")
    back = TorchModel.load(tmp_path / "b")
    want, got = t.state_dict(), back.state_dict()
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == dtype and torch.equal(got[k], want[k]), k
    assert (tmp_path / "b" / "config.json").read_text() == (tmp_path / "a" / "config.json").read_text()


# ----------------------------------------------------------------------------------------------
# training and the command lines, on a checkpoint written by PyTorch's train.py

TINY = ["--preset=tiny", "--vocab_size=300", "--seq_len=32", "--batch_size=4", "--log_interval=1",
        "--eval_iters=1", "--lr=1e-2", "--warmup_iters=1"]


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """(corpus, cache dir, an untrained PyTorch checkpoint with its tokenizer)."""
    d = tmp_path_factory.mktemp("train")
    corpus = d / "c.txt"
    corpus.write_text("".join(f"ROMEO: line {i} of the play, said the king to the queen.\n" for i in range(300)))
    enc = data.load_corpus(str(corpus), "bpe", 300, cache_dir=str(d / "cache"), log=lambda *a: None)[0]
    torch.manual_seed(0)
    TorchModel(ModelConfig(vocab_size=enc.n_vocab + 1, mask_token_id=enc.n_vocab, max_seq_len=32, n_layer=2,
                           n_head=4, n_kv_head=2, d_model=64, d_ff=128)).save(d / "init")
    tok.save(enc, d / "init")
    return str(corpus), str(d / "cache"), str(d / "init")


def run_train(main, args, start, monkeypatch):
    corpus, cache, _ = start
    monkeypatch.setattr(data, "CACHE_DIR", cache)
    main(TINY + [f"--data={corpus}", *args])
    out = next(a.split("=", 1)[1] for a in args if a.startswith("--out_dir="))
    return json.load(open(os.path.join(out, "train_state.json")))


def test_mlx_training_steps_match_pytorch_and_lower_the_loss(start, tmp_path, monkeypatch):
    init = start[2]
    args = [f"--init_from={init}", "--max_iters=6", "--eval_interval=6"]
    ref = run_train(train.main, args + [f"--out_dir={tmp_path}/torch"], start, monkeypatch)
    got = run_train(mlx_train.main, args + [f"--out_dir={tmp_path}/mlx"], start, monkeypatch)
    # same weights, batches, AdamW and schedule: the same losses, step for step
    for h_ref, h in zip(ref["history"], got["history"], strict=True):
        assert h[1:] == pytest.approx(h_ref[1:], abs=1e-4), (h_ref, h)
    assert got["history"][-1][1] < got["history"][0][1] - 0.5
    # PyTorch scores the MLX-trained checkpoint: lower validation loss than the start
    enc = tok.load(init)
    val = data.load_corpus(start[0], enc=enc, cache_dir=start[1])[2]
    x = torch.from_numpy(data.get_batch(val, data.batch_offsets(len(val), 32, 4, seed=0), 32))
    with torch.no_grad():
        before = torch_idlm_loss(TorchModel.load(init), x, stride=4)[0].item()
        after = torch_idlm_loss(TorchModel.load(f"{tmp_path}/mlx"), x, stride=4)[0].item()
    assert after < before - 0.5


def test_mlx_resume_is_exact_and_frameworks_do_not_mix(start, tmp_path, monkeypatch):
    common = [f"--init_from={start[2]}", "--eval_interval=2"]
    full = run_train(mlx_train.main, common + [f"--out_dir={tmp_path}/full", "--max_iters=4"], start, monkeypatch)
    run_train(mlx_train.main, common + [f"--out_dir={tmp_path}/cut", "--max_iters=2"], start, monkeypatch)
    resumed = run_train(mlx_train.main, [f"--out_dir={tmp_path}/cut", "--max_iters=4", "--resume"], start, monkeypatch)
    assert resumed["history"] == full["history"] and resumed["evals"] == full["evals"]
    with pytest.raises(train.UsageError, match="trained with mlx"):
        train.main([f"--out_dir={tmp_path}/cut", "--resume"])
    run_train(train.main, common + [f"--out_dir={tmp_path}/torch", "--max_iters=1"], start, monkeypatch)
    with pytest.raises(train.UsageError, match="trained with pytorch"):
        mlx_train.main([f"--out_dir={tmp_path}/torch", "--resume"])
    with pytest.raises(train.UsageError, match="--device"):
        mlx_train.main(TINY + ["--device=cuda", f"--out_dir={tmp_path}/x"])


@pytest.mark.slow  # end to end (a subprocess, a whole command): CI runs it, -m 'not slow' skips it
def test_sample_command_line_matches_pytorch(start):
    init = start[2]
    args = [f"--out_dir={init}", "--prompt=ROMEO:", "--temperature=0", "--max_new_tokens=12", "--stride=3", "--json"]
    runs = [subprocess.run([sys.executable, *cmd, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
            for cmd in (["sample.py"], ["-m", "mlx_port.sample", "--device=cpu"])]
    for r in runs:
        assert r.returncode == 0, r.stderr
    want, got = (json.loads(r.stdout) for r in runs)
    assert got["tokens"] == want["tokens"] and got["text"] == want["text"]
    for cmd, err in ((["mlx_port.sample", "--out_dir=/nonexistent"], "no checkpoint"),
                     (["mlx_port.train", "--device=cuda"], "--device=cuda")):
        bad = subprocess.run([sys.executable, "-m", *cmd], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert bad.returncode == 2 and err in bad.stderr.strip().splitlines()[-1], bad.stderr
        assert "Traceback" not in bad.stderr


def test_pretrained_name_in_training(start, tmp_path, monkeypatch):
    """--init_from=smollm2 means the converted folder in both trainers (stood in for here by the tiny
    checkpoint: the real one is tested in test_pretrained.py); the MLX trainer cannot convert it (that reads
    the GGUF file with torch) and says what to run; --lora (R-ISD on a pretrained model) is PyTorch's."""
    import checkpoint
    import pretrained
    monkeypatch.setattr(checkpoint, "pretrained_dir", lambda cache_dir=None: str(tmp_path / "not-converted"))
    with pytest.raises(train.UsageError, match="python sample.py --init_from=smollm2"):
        mlx_train.main(TINY + ["--init_from=smollm2", f"--out_dir={tmp_path}/x"])
    monkeypatch.setattr(checkpoint, "pretrained_dir", lambda cache_dir=None: start[2])
    monkeypatch.setattr(pretrained, "smollm2_dir", lambda cache_dir=None: start[2])
    args = ["--init_from=smollm2", "--max_iters=1"]
    got = run_train(mlx_train.main, args + [f"--out_dir={tmp_path}/mlx"], start, monkeypatch)
    ref = run_train(train.main, args + [f"--out_dir={tmp_path}/torch"], start, monkeypatch)
    assert got["history"][0][1:] == pytest.approx(ref["history"][0][1:], abs=1e-4)
    with pytest.raises(train.UsageError, match="--lora"):
        mlx_train.main(TINY + [f"--init_from={start[2]}", "--lora=4", f"--out_dir={tmp_path}/x"])


def test_mlx_train_ends_like_train_py_with_a_distilled_adapter(start, tmp_path, monkeypatch):
    """The paper's recipe end to end in MLX, as python train.py runs it: AR pretraining (out/ar), the
    conversion (out), self-distillation (out/distilled). PyTorch loads what MLX wrote: the adapter over its
    base decodes the base model's own greedy tokens (the adapter is lossless) in fewer forwards."""
    import checkpoint
    import lora
    out = f"{tmp_path}/o"
    got = run_train(mlx_train.main, ["--max_iters=6", "--ar_iters=3", "--distill_iters=4", "--eval_interval=3",
                                     f"--out_dir={out}"], start, monkeypatch)
    assert got["config"]["init_from"] == f"{out}/ar" and got["iter"] == 3
    assert json.load(open(f"{out}/ar/train_state.json"))["config"]["objective"] == "ar"
    assert checkpoint.distilled_or_base(out) == f"{out}/distilled"
    base, enc = lora.load_model(out)
    adapted = lora.load_model(f"{out}/distilled")[0]
    prompt = enc.encode_ordinary("ROMEO:")
    want = isd.ar_generate(base, prompt, SamplingParams(20, temperature=0))
    assert isd.isd_generate(adapted, prompt, SamplingParams(20, temperature=0), stride=4)[0] == want
