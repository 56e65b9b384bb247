"""Drawing tokens from a model's logits in MLX, as sampling.py does it: filter (MASK never, then top-k /
top-p), then Gumbel-max at a temperature. The random numbers come from a request's own key: MLX's
random functions are pure (a key in, numbers out), so a request's stream is a chain of key splits
(mlx_port.isd.Request.next_key), and a row of a batch draws exactly what it draws alone.
"""
import mlx.core as mx


def process_logits(logits, mask_token_id, temperature=1.0, top_k=None, top_p=None):
    """Filtered logits (..., V): MASK, and whatever top-k / top-p drop, become -inf.

    Applied identically to p (verify) and q (drafts). The temperature is applied where probabilities
    are formed (`sample` and `kernels.verify`); here it only decides which tokens top-p keeps."""
    V = logits.shape[-1]
    logits = mx.where(mx.arange(V) == mask_token_id, float("-inf"), logits)
    if top_k is not None and top_k < V:
        kth = mx.topk(logits, top_k, axis=-1).min(axis=-1, keepdims=True)  # the k-th largest
        logits = mx.where(logits < kth, float("-inf"), logits)
    if top_p is not None and top_p < 1.0 and temperature > 0:
        order = mx.argsort(-logits, axis=-1)  # most likely first
        mass = mx.softmax(mx.take_along_axis(logits, order, axis=-1) / temperature, axis=-1)
        drop = mx.cumsum(mass, axis=-1) - mass >= top_p  # keep the smallest prefix whose mass reaches top_p
        logits = mx.where(mx.take_along_axis(drop, mx.argsort(order, axis=-1), axis=-1), float("-inf"), logits)
    return logits


def gumbel(shape, key, dtype=mx.float32):
    """Standard Gumbel noise from `key` (a request's stream), drawn in float32 (MLX draws no float64)."""
    return mx.random.gumbel(shape, mx.float32, key=key).astype(dtype)


def probs(logits, temperature):
    """The distribution (..., V) that `sample` draws from: softmax(logits / temperature), or at
    temperature 0 the point mass on the argmax."""
    if temperature == 0:
        best = mx.argmax(logits, axis=-1, keepdims=True)
        return (mx.arange(logits.shape[-1]) == best).astype(logits.dtype)
    return mx.softmax(logits / temperature, axis=-1)


def sample(logits, temperature, key=None):
    """Token ids (...,) from filtered logits (..., V): Gumbel-max over logits / temperature, which is
    a draw from softmax(logits / temperature); argmax at temperature 0 (no key needed)."""
    if temperature == 0:
        return mx.argmax(logits, axis=-1)
    return mx.argmax(logits / temperature + gumbel(logits.shape, key, logits.dtype), axis=-1)
