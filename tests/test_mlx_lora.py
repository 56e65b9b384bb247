"""mlx_port/lora.py and mlx_port/distill.py against the PyTorch files they mirror.

The references are PyTorch's lora.py and distill.py (tested on their own against brute force in
test_lora.py and test_distill.py) and torch's OneCycleLR: the same weights and adapter must give the
same logits (float32, within 1e-4) with MASKs in the input, exactly the base model's without, the same
distill loss for every target, the same learning rates, adapter files that load both ways bit-exact,
and an MLX-distilled adapter through which PyTorch's ISD gives the base model's greedy tokens.
"""
import dataclasses
import functools
import json
import os
import sys

import numpy as np
import pytest
import torch

mx = pytest.importorskip("mlx.core")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import checkpoint  # noqa: E402
import data  # noqa: E402
from decoding import SamplingParams  # noqa: E402
import distill  # noqa: E402
import isd  # noqa: E402
import lora  # noqa: E402
import pretrained  # noqa: E402
import tokenizer as tok  # noqa: E402
from model import Model as TorchModel, idlm_logits as torch_idlm_logits  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from mlx_port import distill as mlx_distill, lora as mlx_lora, model as mm  # noqa: E402
from reference import torch_model  # noqa: E402

TOL = 1e-4
CORPUS = "".join(f"ROMEO: line {i} of the play, said the king to the queen.\nJULIET: and {i * 7 % 13} more.\n"
                 for i in range(300))


@functools.lru_cache
def small_tokenizer():
    """A BPE tokenizer of 260 ids (its checkpoints' models read only ids below their vocab)."""
    return tok.get("bpe", train_text=CORPUS[:2000], vocab_size=260, cache_dir=None)


def with_random_adapter(model, cfg, seed=0, std=0.5):
    """lora.add_adapter with A and B both random and large (zero B would test nothing)."""
    lora.add_adapter(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.lora.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(PyTorch base, PyTorch base + random adapter, MLX base, MLX base + adapter, the checkpoint folder):
    PyTorch writes the checkpoint and its adapter (in <checkpoint>/distilled, base ".."); MLX loads both."""
    d = str(tmp_path_factory.mktemp("ckpt"))
    base = torch_model()
    base.save(d)
    tok.save(small_tokenizer(), d)
    adapted = with_random_adapter(TorchModel.load(d).eval(), lora.LoraConfig(rank=4, lora_alpha=8.0, base=".."))
    lora.save_adapter(adapted.lora, os.path.join(d, "distilled"))
    model, _ = mlx_lora.load_model(os.path.join(d, "distilled"), "cpu")
    return base, adapted, mm.Model.load(d), model, d


def to_mx(x):
    return mx.array(x.numpy())


def close(torch_out, mlx_out):
    return float(np.abs(torch_out.detach().numpy() - np.array(mlx_out)).max())


# ----------------------------------------------------------------------------------------------
# 1. the same configs

def test_both_frameworks_read_one_config():
    """adapter.json's fields and self-distillation's options are data both sides share (checkpoint.py,
    options.py), not two copies to keep equal; their checks refuse bad values in either framework."""
    assert mlx_lora.LoraConfig is lora.LoraConfig is checkpoint.LoraConfig and mlx_lora.TARGETS == lora.TARGETS
    assert mlx_distill.DistillConfig is distill.DistillConfig
    for cls, bad in ((lora.LoraConfig, [{"rank": 0}, {"targets": ["q_proj", "lm_head"]}]),
                     (distill.DistillConfig, [{"rollouts": "beam"}, {"supervision": "x"}, {"supervision": "hard"},
                                              {"rollouts": "none", "supervision": "hard"}, {"prompt_len": 128},
                                              {"iters": 0}, {"temperature": 0.0}, {"rollouts": "greedy", "supervision": "mixed"}])):
        for kw in bad:
            with pytest.raises(ValueError):
                cls(**kw)


# ----------------------------------------------------------------------------------------------
# 2. the gated forward

def test_forward_with_masks_matches_pytorch(pair):
    """A plain forward, ISD's cached windowed forward (pos / mask of isd.window_layout, rows of different
    lengths) and the [xt | x0] training forward, with MASKs in every one."""
    _, t, _, m, _ = pair
    M = t.cfg.mask_token_id
    x = torch.randint(0, 16, (3, 20), generator=torch.Generator().manual_seed(1))  # MASK (15) included
    assert (x == M).any()
    with torch.no_grad():
        ref = t(x)
    assert close(ref, m(to_mx(x))) < TOL
    assert sorted(m.lora.rows.tolist()) == sorted(t.lora.rows.tolist())
    # cached: prompts, a rollback, then ISD windows (N = 3, K = 2 drafts: 9 tokens, 6 of them MASK)
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, 15, (3, 10), generator=g)
    tc, mc = t.new_cache(3, 40), m.new_cache(3, 40)
    with torch.no_grad():
        t(prompt, cache=tc)
    m(to_mx(prompt), cache=mc)
    tc.truncate([4, 7, 10])
    mc.truncate([4, 7, 10])
    pos, mask = isd.window_layout(3, 2)
    for rows in ([2, 0], [1], [0, 1, 2]):
        window = torch.tensor([[int(v) for v in torch.randint(0, 15, (3,), generator=g)] + [M] * 6 for _ in rows])
        with torch.no_grad():
            ref = t(window, pos=pos, mask=mask, cache=tc, rows=rows)
        got = m(to_mx(window), pos=to_mx(pos), mask=to_mx(mask), cache=mc, rows=rows)
        assert close(ref, got) < TOL
        assert np.array(mc.lengths).tolist() == tc.lengths.tolist()
        tc.truncate([n - 7 for n in tc.lengths[rows].tolist()], rows)
        mc.truncate([n - 7 for n in np.array(mc.lengths)[rows].tolist()], rows)
    # training: every labelled token of xt is MASK
    x0 = torch.randint(0, 15, (2, 17), generator=g)
    labels = x0.clone()
    labels[0, :5] = -100
    for stride in (2, 4):
        with torch.no_grad():
            want = torch_idlm_logits(t, x0, labels, stride)
        got = mm.idlm_logits(m, to_mx(x0), to_mx(labels), stride)
        assert close(want[0], got[0]) < TOL and close(want[1], got[1]) < TOL


def test_forward_without_masks_is_exactly_the_base(pair):
    tb, t, b, m, _ = pair
    x = torch.randint(0, 15, (3, 20), generator=torch.Generator().manual_seed(3))  # never MASK
    got = m(to_mx(x))
    assert m.lora.rows is None  # nothing computed
    assert np.array_equal(np.array(got), np.array(b(to_mx(x))))
    with torch.no_grad():
        assert close(tb(x), got) < TOL
    # with MASKs: the positions before the first MASK of a row are the base's, bit for bit; the MASKs' are not
    xm = x.clone()
    xm[0, 6:9] = 15
    xm[1, 12] = 15
    got, ref = np.array(m(to_mx(xm))), np.array(b(to_mx(xm)))
    assert sorted(m.lora.rows.tolist()) == [6, 7, 8, 32]
    assert np.array_equal(got[0, :6], ref[0, :6]) and np.array_equal(got[1, :12], ref[1, :12])
    assert np.array_equal(got[2], ref[2])
    assert np.abs(got[0, 6:9] - ref[0, 6:9]).max() > 1e-3


def test_only_the_adapter_trains_and_names_are_pytorchs(pair):
    _, t, _, m, _ = pair
    trainable = dict(tree_flatten(m.trainable_parameters()))
    assert sorted(trainable) == sorted(f"lora.{k}" for k in t.lora.state_dict())
    assert sorted(k for k, _ in tree_flatten(m.parameters())) == sorted(t.state_dict())
    assert len(m.lora.A) == 2 * 7 and m.lora.scale == 2.0


# ----------------------------------------------------------------------------------------------
# 3. adapter files, both ways

def test_pytorch_adapter_loads_in_mlx_bit_exact(pair, tmp_path):
    _, t, _, m, d = pair
    want = {k: v.numpy() for k, v in t.lora.state_dict().items()}
    got = {k: np.array(v) for k, v in tree_flatten(m.lora.parameters())}
    assert sorted(got) == sorted(want) and all(np.array_equal(got[k], want[k]) for k in want)
    assert m.lora.cfg == mlx_lora.LoraConfig(**dataclasses.asdict(t.lora.cfg))
    # written again by MLX: the same files
    mlx_lora.save_adapter(m.lora, tmp_path / "again")
    written = open(os.path.join(d, "distilled", "adapter.json")).read()
    assert (tmp_path / "again" / "adapter.json").read_text() == written
    _, state = lora.load_adapter(str(tmp_path / "again"))
    assert all(torch.equal(state[k], t.lora.state_dict()[k]) for k in want) and len(state) == len(want)


def test_mlx_adapter_loads_in_pytorch(pair):
    *_, d = pair
    m = mlx_lora.add_adapter(mm.Model.load(d), mlx_lora.LoraConfig(rank=3, lora_alpha=6.0, base="..",
                                                                  targets=("q_proj", "v_proj", "down_proj")))
    m.lora.update({"B": {k: 0.5 * mx.random.normal(v.shape) for k, v in m.lora.B.items()}})
    folder = os.path.join(d, "from_mlx")
    mlx_lora.save_adapter(m.lora, folder)
    t, _ = lora.load_model(folder)
    want = {k: np.array(v) for k, v in tree_flatten(m.lora.parameters())}
    got = {k: v.numpy() for k, v in t.lora.state_dict().items()}
    assert sorted(got) == sorted(want) and all(np.array_equal(got[k], want[k]) for k in want)
    assert t.lora.cfg == lora.LoraConfig(3, 6.0, "..", ("q_proj", "v_proj", "down_proj"))
    x = torch.randint(0, 16, (2, 24), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert close(t(x), m(to_mx(x))) < TOL


def test_load_model_names_and_refusals(tmp_path, monkeypatch):
    # a diffusion baseline's checkpoint: refused, as by lora.load_model
    torch_model().save(tmp_path / "dlm")
    (tmp_path / "dlm" / "train_state.json").write_text(json.dumps({"config": {"objective": "dlm"}}))
    with pytest.raises(ValueError, match="python sample.py --out_dir="):
        mlx_lora.load_model(str(tmp_path / "dlm"))
    # smollm2: pretrained.smollm2_dir's folder; not converted yet -> what to run
    cache = tmp_path / "cache"
    monkeypatch.setattr(checkpoint, "CACHE_DIR", str(cache))
    with pytest.raises(ValueError, match="python sample.py --init_from=smollm2"):
        mlx_lora.load_model("smollm2")
    folder = os.path.join(cache, "smollm2-135m-instruct-q4_1-v2")  # stood in for by a tiny checkpoint
    torch_model().save(folder)
    tok.save(small_tokenizer(), folder)
    assert checkpoint.pretrained_dir() == pretrained.smollm2_dir(str(cache))  # where PyTorch converts it
    model, enc = mlx_lora.load_model("smollm2")
    assert isinstance(model, mm.Model) and not hasattr(model, "lora") and enc.n_vocab == 260


# ----------------------------------------------------------------------------------------------
# 4. distill_loss

@pytest.mark.parametrize("mask_token_id", [None, 5])
def test_distill_loss_matches_pytorch(mask_token_id, tmp_path):
    t = torch_model(seed=11, vocab=12, mask_token_id=mask_token_id)
    t.save(tmp_path)
    with_random_adapter(t, lora.LoraConfig(rank=2, lora_alpha=4.0, base=".."), seed=1, std=0.3)
    tok.save(small_tokenizer(), tmp_path)
    lora.save_adapter(t.lora, tmp_path / "a")
    m, _ = mlx_lora.load_model(str(tmp_path / "a"))
    g = torch.Generator().manual_seed(5)
    x0 = torch.randint(0, 11, (3, 13), generator=g)
    x0 += (x0 >= t.cfg.mask_token_id).long()  # never MASK
    labels = x0.clone()
    labels[0, :3] = -100  # a prompt that ends mid-block
    labels[1, :1] = -100
    hard_rows = torch.tensor([True, False, True])
    for stride in (2, 3, 4):
        for target, T in (("hard", 1.0), ("soft", 1.0), ("soft", 0.7), ("mixed", 0.7)):
            with torch.no_grad():
                want = distill.distill_loss(t, x0, labels, stride, target, T, hard_rows).item()
            got = mlx_distill.distill_loss(m, to_mx(x0), to_mx(labels), stride, target, T, to_mx(hard_rows)).item()
            assert abs(got - want) < TOL * max(1.0, abs(want)), (stride, target, T, got, want)


# ----------------------------------------------------------------------------------------------
# 6. rollouts, training, the command line

def test_greedy_rollouts_match_pytorch_and_training_lowers_the_loss(pair):
    tb, _, _, _, d = pair
    train_ids = np.random.default_rng(0).integers(0, 15, 400).astype(np.uint16)  # never MASK (15)
    cfg = mlx_distill.DistillConfig(rollouts="greedy", supervision="hard", n_rollouts=12, prompt_len=3, seq_len=12,
                                    iters=8, batch_size=4, rank=4, lr=3e-2, seed=7)
    rows, labels = mlx_distill.rollouts(mm.Model.load(d), train_ids, cfg, log=None)
    want = distill.rollouts(tb, train_ids, distill.DistillConfig(**dataclasses.asdict(cfg)), log=None)
    assert np.array_equal(np.array(rows), want[0].numpy()) and np.array_equal(np.array(labels), want[1].numpy())
    m = mm.Model.load(d)
    before = mlx_distill.distill_loss(m, rows, labels, 3).item()
    mx.random.seed(cfg.seed)  # the adapter's initial A, as distill() seeds it (else: whatever ran before)
    mlx_distill.train_adapter(m, rows, labels, 3, cfg, log=None)
    assert not m.training and m.lora.cfg.base == ".."
    after = mlx_distill.distill_loss(m, rows, labels, 3).item()
    assert after < before - 0.1, (before, after)
    base = dict(tree_flatten(mm.Model.load(d).parameters()))
    assert all(np.array_equal(np.array(v), np.array(base[k])) for k, v in tree_flatten(m.parameters())
               if not k.startswith("lora."))
    assert all(float(mx.abs(b).max()) > 0 for b in m.lora.B.values())


def test_distill_command_line_writes_an_adapter_pytorch_decodes_losslessly(tmp_path, monkeypatch):
    """python -m mlx_port.distill (default recipe: both rollouts, mixed targets) on a PyTorch checkpoint;
    PyTorch's lora.load_model takes out/distilled, and its greedy ISD gives the base's greedy AR tokens."""
    (tmp_path / "c.txt").write_text(CORPUS)
    monkeypatch.setattr(data, "CACHE_DIR", str(tmp_path / "cache"))
    enc = data.load_corpus(str(tmp_path / "c.txt"), "bpe", 300, log=lambda *a: None)[0]
    out = str(tmp_path / "out")
    torch_model(seed=3, vocab=enc.n_vocab + 1, max_seq_len=32).save(out)
    tok.save(enc, out)
    with pytest.raises(SystemExit):
        mlx_distill.main([f"--out_dir={tmp_path / 'empty'}"])
    mlx_distill.main([f"--out_dir={out}", f"--data={tmp_path / 'c.txt'}", "--n_rollouts=8", "--prompt_len=8",
                      "--iters=4", "--batch_size=4", "--rank=4", "--lr=1e-2", "--device=cpu"])
    folder = os.path.join(out, "distilled")
    assert json.load(open(os.path.join(folder, "adapter.json")))["base"] == ".."
    assert sorted(os.listdir(folder)) == ["adapter.json", "adapter.safetensors"]  # no stage left behind
    model, enc = lora.load_model(folder)
    base, _ = lora.load_model(out)
    assert all(float(b.detach().abs().max()) > 0 for b in model.lora.B.values())  # trained
    prompt = enc.encode_ordinary("ROMEO:")
    want = isd.ar_generate(base, prompt, SamplingParams(16, temperature=0))
    assert isd.ar_generate(model, prompt, SamplingParams(16, temperature=0)) == want
    for stride in (2, 4):
        assert isd.isd_generate(model, prompt, SamplingParams(16, temperature=0), stride=stride)[0] == want
