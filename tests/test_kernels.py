"""The Triton verifier (kernels.py) against its PyTorch reference, run by Triton's interpreter on CPU.

The reference itself is checked against hand-computed distributions in tests/test_isd.py (section 3);
here the kernel must make the same decisions and draw the same corrections from the same random
inputs, and its corrections must follow normalize((p-q)+). The interpreter runs each program in
Python (tens of milliseconds a row), so the problems are small.
"""
import os
import sys
from collections import Counter

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import kernels  # noqa: E402  (tests/conftest.py set TRITON_INTERPRET: the kernel runs in the interpreter)
import isd  # noqa: E402
from decoding import SamplingParams  # noqa: E402

if kernels.triton is None:
    pytest.skip("Triton is not installed (Linux only)", allow_module_level=True)
from kernels import verify_reference, verify_triton  # noqa: E402
from reference import P_MIN, P_WRONG, chi2_pvalue, tiny_model  # noqa: E402


def gumbel(gen, shape, dtype):
    return -torch.log(-torch.log(torch.rand(shape, generator=gen, dtype=dtype)))


def case(V, R, temperature, dtype, seed):
    """Random logits with the special rows the kernel must get right: -inf entries in p and in q,
    p == q (always accepted; the fallback to p if forced), q with all its mass on the draft."""
    gen = torch.Generator().manual_seed(seed)
    p = 2 * torch.randn(R, V, generator=gen, dtype=dtype)
    q = p + torch.randn(R, V, generator=gen, dtype=dtype)
    if V > 2:
        p[0, : V // 2] = float("-inf")  # p filtered (top-k style)
        q[1, ::2] = float("-inf")  # q filtered
        q[2] = p[2]  # p == q
    scale = temperature or 1.0
    drafts = torch.multinomial((q / scale).softmax(-1), 1, generator=gen)[:, 0]
    if V > 1 and R > 3:
        q[3] = float("-inf")
        q[3, drafts[3]] = 0.0  # q puts all its mass on the draft
    u = torch.rand(R, generator=gen, dtype=dtype)
    u[-1] = 1.0 - 1e-7  # (nearly) always a rejection: the residual pass runs
    return p, q, drafts, u, gumbel(gen, (R, V), dtype)


@pytest.mark.parametrize("V", [1, 7, 1000, 5003])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_equals_reference(V, dtype):
    for i, temperature in enumerate([0, 0.7, 1.0, 1.6]):
        p, q, d, u, g = case(V, 6, temperature, dtype, seed=V + i)
        acc_r, cor_r, ratio_r = verify_reference(p, q, d, u, g, temperature)
        acc_k, cor_k, ratio_k = verify_triton(p, q, d, u, g, temperature)
        assert torch.equal(acc_k, acc_r), (V, temperature)
        assert torch.equal(cor_k, cor_r), (V, temperature)
        assert torch.allclose(ratio_k, ratio_r, rtol=0, atol=1e-6), (V, temperature)
        if V > 2 and temperature > 0:
            assert acc_k[2]  # p == q: always accepted
        if V > 1 and temperature > 0:
            assert ratio_k[3] == pytest.approx(float((p[3] / temperature).softmax(-1)[d[3]]), abs=1e-6)
    assert (cor_k >= -1).all() and (cor_k < V).all()


def test_kernel_block_boundaries_and_forced_fallback():
    """Vocabularies split over several blocks (the online softmax merges them) and p == q rows
    rejected by u = 1, where (p-q)+ is all zero and the correction must fall back to p."""
    for V, block in ((1000, 64), (5003, 1024)):
        p, q, d, u, g = case(V, 5, 0.9, torch.float32, seed=V)
        q[4] = p[4]
        u[4] = 1.0  # min(1, p/q) = 1 is never > 1: a forced rejection of a p == q row
        ref = verify_reference(p, q, d, u, g, 0.9)
        got = verify_triton(p, q, d, u, g, 0.9, block=block)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
        assert torch.allclose(got[2], ref[2], rtol=0, atol=1e-6)
        assert not got[0][4] and got[1][4] == ((p[4] / 0.9).log_softmax(-1) + g[4]).argmax()
        # greedy with the maximum tied in one lane of two blocks: the first index wins, as in torch
        p[:, 5] = p[:, 5 + block] = p.max() + 1
        d[:] = 5 + block
        acc, cor, _ = verify_triton(p, q, d, u, g, 0, block=block)
        assert not acc.any() and (cor == 5).all()


def test_kernel_corrections_follow_the_residual():
    """Forced rejections (u = 1) of one (p, q) pair: the kernel's corrections ~ normalize((p-q)+).
    Chi-square p-value > 1e-4 (false-failure rate 1e-4 with fresh noise; the seed is fixed); the
    same counts against p itself must give p-value < 1e-6, so the check has power."""
    R = 200  # the interpreter is slow; (p-q)+ and p differ enough for this size to have power
    gen = torch.Generator().manual_seed(5)
    pl = torch.tensor([1.5, 1.0, 0.0, -0.5, 0.5], dtype=torch.float64)
    ql = torch.tensor([2.0, -1.0, -1.0, -1.5, -1.5], dtype=torch.float64)  # (p-q)+ > 0 on tokens 1-4
    p, q = pl.softmax(-1), ql.softmax(-1)
    res = (p - q).clamp(min=0)
    res = res / res.sum()
    drafts = torch.zeros(R, dtype=torch.long)  # q(0) > p(0): u = 1 rejects
    acc, cor, _ = verify_triton(pl.expand(R, 5).contiguous(), ql.expand(R, 5).contiguous(), drafts,
                                torch.ones(R, dtype=torch.float64), gumbel(gen, (R, 5), torch.float64), 1.0)
    assert not acc.any()
    counts = Counter(cor.tolist())
    assert chi2_pvalue(counts, dict(enumerate(res.tolist()))) > P_MIN
    assert chi2_pvalue(counts, dict(enumerate(p.tolist()))) < P_WRONG


@pytest.mark.parametrize("temperature,top_k", [(0, None), (1.0, None), (0.8, 5)])
def test_isd_generate_same_tokens_with_kernel_and_reference(monkeypatch, temperature, top_k):
    """isd.py's acceptance goes through kernels.verify: forcing the kernel (interpreted) gives the
    same tokens as the reference, and the kernel really ran."""
    model = tiny_model(seed=3)
    prompt = [1, 5, 2]
    params = SamplingParams(16, temperature=temperature, top_k=top_k, seed=11)
    ref, ref_stats = isd.isd_generate(model, prompt, params, stride=3)
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return verify_triton(*args, **kwargs)
    monkeypatch.setattr(kernels, "BACKEND", "triton")
    monkeypatch.setattr(kernels, "verify_triton", counted)
    got, got_stats = isd.isd_generate(model, prompt, params, stride=3)
    assert calls, "the kernel was not used"
    assert got == ref
    assert got_stats.acceptance_rate == pytest.approx(ref_stats.acceptance_rate, abs=1e-6)
    assert ref_stats.rounds_r > 0 and ref_stats.drafts_verified > ref_stats.rounds_r



COMPILE = """
import kernels, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
assert type(kernels._verify_kernel).__name__ == "JITFunction"  # compiled, not interpreted
for dtype in ("fp32",):  # float64 compiles as well, 5x slower
    sig = dict(p_ptr=f"*{dtype}", q_ptr=f"*{dtype}", d_ptr="*i64", u_ptr=f"*{dtype}", g_ptr=f"*{dtype}",
               t_ptr=f"*{dtype}", acc_ptr="*i8", cor_ptr="*i64", ratio_ptr=f"*{dtype}", V="i32",
               GREEDY="constexpr", BLOCK="constexpr")
    for greedy in (True, False):
        src = ASTSource(fn=kernels._verify_kernel, signature=sig, constexprs={"GREEDY": greedy, "BLOCK": 4096})
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32))  # an H100, no GPU needed
        assert "ptx" in compiled.asm and "cubin" in compiled.asm
print("compiled")
"""


@pytest.mark.slow  # end to end (a subprocess, a whole command): CI runs it, -m 'not slow' skips it
def test_kernel_compiles_for_a_gpu(tmp_path):
    """The interpreter is lenient about types that the compiler rejects: compile the kernel for an
    H100 (sm_90: Triton IR -> PTX -> cubin with the ptxas that ships with Triton), no GPU needed."""
    import subprocess
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", COMPILE], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "compiled" in out.stdout, out.stderr[-2000:]
