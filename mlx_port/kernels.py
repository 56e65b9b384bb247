"""ISD's p/q verifier (docs/method.md section 7) in MLX: kernels.verify_reference's rule, decision for decision.

For each draft row r, from the verify logits (p) and the draft logits (q):
    ratio = min(1, p(d) / q(d)),  accept = u < ratio,
    on rejection: correction = argmax_i [ log (p_i - q_i)+ + g_i ]   (Gumbel-max: a draw from
    normalize((p - q)+)), or argmax_i [ log p_i + g_i ] where (p - q)+ is all zero.
MLX has no Triton, so this is the reference rule written with whole softmaxes, not kernels.py's fused
kernel (on Metal one could fuse it the same way with mx.fast.metal_kernel; not done). The random
numbers (u, Gumbel noise g) are inputs, so it can be compared with kernels.verify_reference exactly.
"""
import mlx.core as mx


def verify(p_logits, q_logits, drafts, u, gumbel, temperature):
    """Exact acceptance for R draft rows.

    p_logits, q_logits: (R, V) logits already filtered (top-k / top-p / MASK entries are -inf), not
    yet divided by the temperature; drafts: (R,) ids sampled from q; u: (R,) uniforms in [0, 1);
    gumbel: (R, V) standard Gumbel noise. Returns accept (R,) bool, correction (R,) int64 (-1 where
    accepted) and ratio (R,) = min(1, p(d)/q(d)). Temperature 0 is greedy: accept iff d = argmax p,
    correction = argmax p, ratio = 1 or 0."""
    drafts = drafts.astype(mx.int64)
    if temperature == 0:
        best = mx.argmax(p_logits, axis=-1).astype(mx.int64)
        accept = drafts == best
        return accept, mx.where(accept, -1, best), accept.astype(p_logits.dtype)
    p, q = mx.softmax(p_logits / temperature, axis=-1), mx.softmax(q_logits / temperature, axis=-1)
    pd = mx.take_along_axis(p, drafts[:, None], axis=-1)[:, 0]
    qd = mx.take_along_axis(q, drafts[:, None], axis=-1)[:, 0]
    ratio = mx.minimum(pd / qd, 1.0)
    accept = u < ratio
    # the correction of every row at once (the reference forms it for rejected rows only: the same values)
    residual = mx.maximum(p - q, 0)
    residual = mx.where(residual.sum(axis=-1, keepdims=True) > 0, residual, p)
    correction = mx.argmax(mx.log(residual) + gumbel, axis=-1).astype(mx.int64)
    return accept, mx.where(accept, -1, correction), ratio
