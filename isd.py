"""Decoding: the autoregressive baseline (and, next, Introspective Strided Decoding).

Sampling settings are applied by `process_logits`, the one place that turns logits into a
distribution: MASK removed, temperature, top-k, top-p.
"""
import torch


def process_logits(logits, mask_token_id, temperature=1.0, top_k=None, top_p=None):
    """Filtered, temperature-scaled logits (..., V); filtered entries are -inf, MASK always is.

    temperature 0 leaves the scale alone (greedy takes the argmax)."""
    logits = logits.clone()
    logits[..., mask_token_id] = float("-inf")
    if temperature > 0:
        logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def sample(logits, temperature, generator=None):
    """One token id from processed logits (V,): argmax at temperature 0."""
    if temperature == 0:
        return int(logits.argmax())
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


def check_prompt(model, prompt_ids, max_new_tokens, extra=0):
    if len(prompt_ids) == 0:
        raise ValueError("the prompt is empty: give at least one token")
    need = len(prompt_ids) + max_new_tokens + extra
    if need > model.cfg.max_seq_len:
        raise ValueError(f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) "
                         f"exceeds the context of {model.cfg.max_seq_len} tokens")


@torch.no_grad()
def ar_generate(model, prompt_ids, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                seed=None, stop_ids=None):
    """The baseline: one token per forward over a KV cache. Returns the new token ids."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    check_prompt(model, prompt_ids, max_new_tokens)
    dev = model.embed_tokens.weight.device
    gen = torch.Generator(device=dev)
    if seed is not None:
        gen.manual_seed(seed)
    else:
        gen.seed()
    stop = set(stop_ids or ())
    cache = model.new_cache(1, len(prompt_ids) + max_new_tokens)
    logits = model(torch.tensor([prompt_ids], device=dev), cache=cache)[0, -1]
    out = []
    while len(out) < max_new_tokens:
        p = process_logits(logits, model.cfg.mask_token_id, temperature, top_k, top_p)
        out.append(sample(p, temperature, gen))
        if out[-1] in stop or len(out) == max_new_tokens:
            break
        logits = model(torch.tensor([[out[-1]]], device=dev), cache=cache)[0, -1]
    return out
