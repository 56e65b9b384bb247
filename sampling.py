"""Drawing tokens from a model's logits, the same way for ISD, AR and the diffusion baselines: filter
(MASK never, then top-k / top-p), then Gumbel-max at a temperature, from a request's own random stream.
"""
import torch


def process_logits(logits, mask_token_id, temperature=1.0, top_k=None, top_p=None, bias=None):
    """Filtered logits (..., V): `bias` ({token id: value}, OpenAI's logit_bias) added first, then MASK, and
    whatever top-k / top-p drop, become -inf. Applied identically to p (verify) and q (drafts) (**exact here**: the
    released code filters only the clean token). The temperature is applied where probabilities are formed (`sample`
    and `kernels.verify`); here it only decides which tokens top-p keeps."""
    logits = logits.clone()
    if bias:
        ids, values = zip(*dict(bias).items())
        logits[..., list(ids)] += torch.tensor(values, dtype=logits.dtype, device=logits.device)
    logits[..., mask_token_id] = float("-inf")
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0 and temperature > 0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        mass = (sorted_logits / temperature).softmax(-1)
        drop = mass.cumsum(-1) - mass >= top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def gumbel(shape, generator, dtype, device):
    """Standard Gumbel noise, drawn on the CPU from a request's own stream (so a seed gives the same
    tokens on every device), then moved to the logits' device."""
    return -torch.log(-torch.log(torch.rand(shape, generator=generator, dtype=dtype))).to(device)


def probs(logits, temperature):
    """The distribution (..., V) that `sample` draws from: softmax(logits / temperature), or at
    temperature 0 the point mass on the argmax."""
    if temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)
    return (logits / temperature).softmax(-1)


def sample(logits, temperature, generator=None):
    """Token ids (...,) from filtered logits (..., V): Gumbel-max over logits / temperature, which is
    a draw from softmax(logits / temperature); argmax at temperature 0."""
    if temperature == 0:
        return logits.argmax(-1)
    return (logits / temperature + gumbel(logits.shape, generator, logits.dtype, logits.device)).argmax(-1)
