"""The fused p/q verifier of ISD (docs/method.md section 7): a Triton kernel and its PyTorch reference.

    python kernels.py --bench      # kernel vs reference time (needs a CUDA GPU to mean anything)

For each draft row r, ISD needs from the verify logits (p) and the draft logits (q):
    ratio = min(1, p(d) / q(d)),  accept = u < ratio,
    on rejection: correction = argmax_i [ log (p_i - q_i)+ + g_i ]   (Gumbel-max: a draw from
    normalize((p - q)+)), or argmax_i [ log p_i + g_i ] where (p - q)+ is all zero (only by rounding:
    a rejection means q(d) > p(d), so (p - q)+ has mass elsewhere).
`verify_reference` writes this down with whole softmaxes. The kernel runs one program per row and
streams the vocabulary twice: pass 1 keeps an online max and sum of exp for p and q (the softmax
normalisers) and gathers the draft's logits; pass 2 (rejected rows only) forms p_i and q_i one block
at a time and keeps a running Gumbel-max. The normalised distributions never exist in memory.
The random numbers (u, Gumbel noise g) are inputs, so kernel and reference can be compared exactly.

`verify` picks the kernel for CUDA tensors and the reference otherwise. Without a GPU, Triton's
interpreter runs the kernel on CPU tensors when Python starts with TRITON_INTERPRET=1 in its
environment (Triton reads it when the kernel is defined): that is how the tests check it
(tests/conftest.py sets it); IDLM_VERIFY=triton makes `verify` use the kernel there too.
"""
import argparse
import os
import sys
import time

import torch

try:
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # Triton is Linux-only; the reference serves everywhere else
    triton = None

BACKEND = os.environ.get("IDLM_VERIFY", "auto")  # auto: the kernel on CUDA tensors; or "triton", "torch"


def verify_reference(p_logits, q_logits, drafts, u, gumbel, temperature):
    """Exact acceptance for R draft rows, in plain PyTorch.

    p_logits, q_logits: (R, V) logits already filtered (top-k / top-p / MASK entries are -inf), not
    yet divided by the temperature; drafts: (R,) ids sampled from q; u: (R,) uniforms in [0, 1);
    gumbel: (R, V) standard Gumbel noise. Returns accept (R,) bool, correction (R,) int64 (-1 where
    accepted) and ratio (R,) = min(1, p(d)/q(d)). Temperature 0 is greedy: accept iff d = argmax p,
    correction = argmax p, ratio = 1 or 0."""
    if temperature == 0:
        best = p_logits.argmax(-1)
        accept = drafts == best
        return accept, torch.where(accept, -1, best), accept.to(p_logits.dtype)
    p, q = (p_logits / temperature).softmax(-1), (q_logits / temperature).softmax(-1)
    pd, qd = p.gather(-1, drafts[:, None])[:, 0], q.gather(-1, drafts[:, None])[:, 0]
    ratio = (pd / qd).clamp(max=1.0)
    accept = u < ratio
    correction = torch.full_like(drafts, -1)
    rej = (~accept).nonzero()[:, 0]  # the correction only where a draft was rejected
    residual = (p[rej] - q[rej]).clamp(min=0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p[rej])
    correction[rej] = (residual.log() + gumbel[rej]).argmax(-1)
    return accept, correction, ratio


if triton is not None:
    @triton.jit
    def _argmax_update(best, best_i, score, offs):
        """Per-lane running argmax; lanes see increasing offsets, so `>` keeps the first maximum."""
        better = score > best
        return tl.where(better, score, best), tl.where(better, offs, best_i)

    @triton.jit
    def _argmax_final(best, best_i, V):
        """The first index of the row's maximum (torch.argmax's choice among ties)."""
        m = tl.max(best, 0)
        return tl.min(tl.where(best == m, best_i, V), 0)

    @triton.jit
    def _verify_kernel(p_ptr, q_ptr, d_ptr, u_ptr, g_ptr, t_ptr, acc_ptr, cor_ptr, ratio_ptr, V,
                       GREEDY: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        p_row, q_row, g_row = p_ptr + row * V, q_ptr + row * V, g_ptr + row * V
        d = tl.load(d_ptr + row)
        lanes = tl.arange(0, BLOCK)
        dtype = p_ptr.dtype.element_ty
        neg_inf = tl.full([BLOCK], float("-inf"), dtype)
        if GREEDY:  # accept iff d = argmax p; the correction is argmax p
            best, best_i = neg_inf, lanes
            for start in range(0, V, BLOCK):
                offs = start + lanes
                x = tl.load(p_row + offs, mask=offs < V, other=float("-inf"))
                best, best_i = _argmax_update(best, best_i, x, offs)
            top = _argmax_final(best, best_i, V)
            accept = top == d
            tl.store(acc_ptr + row, accept.to(tl.int8))
            tl.store(cor_ptr + row, tl.where(accept, -1, top).to(tl.int64))
            tl.store(ratio_ptr + row, accept.to(dtype))
        else:
            t = tl.load(t_ptr)
            # pass 1: online softmax statistics, per lane (max m, sum of exp(x - m)), for p and q
            mp = tl.full([BLOCK], -1e30, dtype)  # a finite floor: exp(-inf - floor) = 0, never nan
            mq = tl.full([BLOCK], -1e30, dtype)
            sp = tl.zeros([BLOCK], dtype)
            sq = tl.zeros([BLOCK], dtype)
            for start in range(0, V, BLOCK):
                offs = start + lanes
                xp = tl.load(p_row + offs, mask=offs < V, other=float("-inf")) / t
                xq = tl.load(q_row + offs, mask=offs < V, other=float("-inf")) / t
                mp_new, mq_new = tl.maximum(mp, xp), tl.maximum(mq, xq)
                sp = sp * tl.exp(mp - mp_new) + tl.exp(xp - mp_new)
                sq = sq * tl.exp(mq - mq_new) + tl.exp(xq - mq_new)
                mp, mq = mp_new, mq_new
            Mp, Mq = tl.max(mp, 0), tl.max(mq, 0)
            Sp, Sq = tl.sum(sp * tl.exp(mp - Mp), 0), tl.sum(sq * tl.exp(mq - Mq), 0)
            pd = tl.exp(tl.load(p_row + d) / t - Mp) / Sp
            qd = tl.exp(tl.load(q_row + d) / t - Mq) / Sq
            ratio = tl.minimum(pd / qd, 1.0)
            accept = tl.load(u_ptr + row) < ratio
            tl.store(acc_ptr + row, accept.to(tl.int8))
            tl.store(ratio_ptr + row, ratio)
            correction = tl.full([], -1, tl.int32)
            if accept == 0:  # pass 2: Gumbel-max over log (p-q)+, and over log p as the fallback
                best_r, best_ri = neg_inf, lanes
                best_p, best_pi = neg_inf, lanes
                any_r = tl.zeros([BLOCK], tl.int32)
                for start in range(0, V, BLOCK):
                    offs = start + lanes
                    inside = offs < V
                    p = tl.exp(tl.load(p_row + offs, mask=inside, other=float("-inf")) / t - Mp) / Sp
                    q = tl.exp(tl.load(q_row + offs, mask=inside, other=float("-inf")) / t - Mq) / Sq
                    g = tl.load(g_row + offs, mask=inside, other=0.0)
                    r = p - q
                    any_r = tl.maximum(any_r, (r > 0).to(tl.int32))
                    score_r = tl.where(r > 0, tl.log(tl.where(r > 0, r, 1.0)) + g, neg_inf)  # never log(<= 0)
                    score_p = tl.where(p > 0, tl.log(tl.where(p > 0, p, 1.0)) + g, neg_inf)
                    best_r, best_ri = _argmax_update(best_r, best_ri, score_r, offs)
                    best_p, best_pi = _argmax_update(best_p, best_pi, score_p, offs)
                if tl.max(any_r, 0) > 0:
                    correction = _argmax_final(best_r, best_ri, V)
                else:
                    correction = _argmax_final(best_p, best_pi, V)
            tl.store(cor_ptr + row, correction.to(tl.int64))


def verify_triton(p_logits, q_logits, drafts, u, gumbel, temperature, block=None):
    """The same contract as verify_reference, computed by the fused kernel."""
    R, V = p_logits.shape
    dev, dtype = p_logits.device, p_logits.dtype
    if not p_logits.is_cuda and not isinstance(_verify_kernel, InterpretedFunction):
        raise RuntimeError("the Triton kernel needs CUDA tensors; to run it on the CPU, start Python with "
                           "TRITON_INTERPRET=1 (Triton's interpreter)")
    accept = torch.empty(R, dtype=torch.int8, device=dev)
    correction = torch.empty(R, dtype=torch.int64, device=dev)
    ratio = torch.empty(R, dtype=dtype, device=dev)
    if R == 0:
        return accept.bool(), correction, ratio
    block = block or min(4096, triton.next_power_of_2(V))
    greedy = temperature == 0
    _verify_kernel[(R,)](p_logits.contiguous(), q_logits.to(dtype).contiguous(), drafts.contiguous(),
                         u.to(dtype).contiguous(), gumbel.to(dtype).contiguous(),
                         torch.tensor([temperature if not greedy else 1.0], dtype=dtype, device=dev),
                         accept, correction, ratio, V, GREEDY=greedy, BLOCK=block)
    return accept.bool(), correction, ratio


def verify(p_logits, q_logits, drafts, u, gumbel, temperature):
    """ISD's acceptance (see verify_reference): the Triton kernel on CUDA tensors, else the reference."""
    use = BACKEND if BACKEND != "auto" else ("triton" if p_logits.is_cuda else "torch")
    if use == "triton":
        if triton is None:
            raise RuntimeError("IDLM_VERIFY=triton but Triton is not installed (pip install triton; Linux only)")
        return verify_triton(p_logits, q_logits, drafts, u, gumbel, temperature)
    return verify_reference(p_logits, q_logits, drafts, u, gumbel, temperature)


# ----------------------------------------------------------------------------------------------
# benchmark: kernel vs reference, as ratios measured side by side

def random_inputs(R, V, device, dtype=torch.float32, seed=0):
    """Verifier inputs for R rows of a V-token vocabulary: p, q = p + noise, drafts sampled from q,
    u and Gumbel noise. The same (R, V, seed) gives the same inputs on the same device."""
    gen = torch.Generator(device=device).manual_seed(seed)
    p = torch.randn(R, V, device=device, dtype=dtype, generator=gen)
    q = p + 0.5 * torch.randn(R, V, device=device, dtype=dtype, generator=gen)
    d = torch.multinomial(q.softmax(-1), 1, generator=gen)[:, 0]
    u = torch.rand(R, device=device, dtype=dtype, generator=gen)
    g = -torch.log(-torch.log(torch.rand(R, V, device=device, dtype=dtype, generator=gen)))
    return p, q, d, u, g


def bench(vocabs, rows, repeats, dtype=torch.float32, device="cuda", stop=lambda: False):
    """Kernel vs reference time per (vocab, rows) cell, printed as a Markdown table and returned as
    a list of dicts. `stop()` is asked before each cell; True ends the table there."""
    def timed(fn):
        fn()  # warm-up (and compilation)
        sync()
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        sync()
        return (time.perf_counter() - t0) / repeats * 1e3

    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    name = torch.cuda.get_device_name(device) if str(device).startswith("cuda") else "cpu (Triton interpreter)"
    print(f"device: {name} | {str(dtype).split('.')[-1]} | temperature 1 | mean of {repeats} calls")
    print("| vocab | rows | reference ms | kernel ms | kernel speed-up |")
    print("|---:|---:|---:|---:|---:|")
    cells = []
    for V in vocabs:
        for R in rows:
            if stop():
                return cells
            p, q, d, u, g = random_inputs(R, V, device, dtype)
            ref = timed(lambda: verify_reference(p, q, d, u, g, 1.0))
            ker = timed(lambda: verify_triton(p, q, d, u, g, 1.0))
            cells.append({"vocab": V, "rows": R, "reference_ms": ref, "kernel_ms": ker, "speedup": ref / ker})
            print(f"| {V} | {R} | {ref:.3f} | {ker:.3f} | {ref / ker:.2f}x |", flush=True)
    return cells


def compare(V, R, temperature, device, seed=0):
    """The kernel against the reference on the same random inputs, decision for decision: counts of
    rows whose accept / correction differ, and the largest difference of ratio."""
    p, q, d, u, g = random_inputs(R, V, device, seed=seed)
    ra, rc, rr = verify_reference(p, q, d, u, g, temperature)
    ka, kc, kr = verify_triton(p, q, d, u, g, temperature)
    return {"vocab": V, "rows": R, "temperature": temperature, "accepted": int(ra.sum()),
            "accept_differs": int((ra != ka).sum()), "correction_differs": int((rc != kc).sum()),
            "max_ratio_diff": float((rr - kr).abs().max())}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", action="store_true", help="time the kernel against the reference on the GPU")
    ap.add_argument("--vocabs", default="32000,50257,151936", help="vocabulary sizes (default: Llama, GPT-2, Qwen)")
    ap.add_argument("--rows", default="1,4,16,64,256", help="draft rows per call")
    ap.add_argument("--repeats", type=int, default=50, help="timed calls per cell (default 50)")
    a = ap.parse_args(argv)
    if not a.bench:
        ap.print_help()
        return
    if not torch.cuda.is_available() or triton is None:
        sys.exit("kernels.py --bench needs a CUDA GPU and Triton: on a CPU the kernel only runs in Triton's "
                 "interpreter, whose timings mean nothing")
    bench([int(v) for v in a.vocabs.split(",")], [int(r) for r in a.rows.split(",")], a.repeats)


if __name__ == "__main__":
    main()
