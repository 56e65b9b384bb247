"""SmolLM2-135M-Instruct converted by pretrained.py, checked against an independent implementation:
Hugging Face transformers loading the same GGUF file (its own dequantization, tensor mapping, RoPE
and tokenizer). Each model is loaded once for the module (transformers takes about 20 s)."""
import os
import sys

import pytest
import tiktoken
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pretrained  # noqa: E402
import tokenizer as tok  # noqa: E402
from isd import ar_generate, isd_generate  # noqa: E402
from model import Model, ModelConfig  # noqa: E402
from decoding import SamplingParams  # noqa: E402

PROMPTS = ["The quick brown fox jumps over the lazy dog. " * 3,
           "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # 0 1 1 2 3 5 8",
           "Paris est la capitale de la France ; 東京 est celle du Japon. Ünïcödé, emoji 🎉!"]
TEXTS = PROMPTS + [
    "", " ", "  leading spaces", "trailing spaces   ", "tabs\tand\nnew\n\n\nlines\r\n",
    "x 12345 y  7\n\n 2024-11-23, 3.14159, ½ ² ٣", "a  1 b   22", "I'm, you're, they'll, it's, we've, he'd",
    "<|im_start|>user\nnot special here<|im_end|>", "a\x04b \x1d c", "Ωμέγα, Привет, مرحبا, नमस्ते, 한국어",
    "https://example.org/path?q=1&r=two#frag", "    indented code {\n\treturn;\n}", "!!!???...---",
]


@pytest.fixture(scope="module")
def ours():
    return pretrained.load_smollm2()


@pytest.fixture(scope="module")
def hf_model():
    from transformers import AutoModelForCausalLM
    folder, name = os.path.split(pretrained.gguf_path())
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32, local_files_only=True).eval()


@pytest.fixture(scope="module")
def hf_tokenizer():
    from transformers import AutoTokenizer
    folder, name = os.path.split(pretrained.gguf_path())
    return AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)


def test_config(ours):
    model, enc = ours
    cfg = model.cfg
    assert (cfg.n_layer, cfg.n_head, cfg.n_kv_head, cfg.d_model, cfg.d_ff) == (30, 9, 3, 576, 1536)
    assert (enc.n_vocab, cfg.mask_token_id, cfg.vocab_size, cfg.rope_theta) == (49152, 49152, 49153, 1e5)
    emb = model.embed_tokens.weight
    assert torch.allclose(emb[-1], emb[:-1].mean(0), atol=1e-6)  # the new MASK row


@pytest.mark.slow  # SmolLM2 against transformers (loads both): CI runs it, -m 'not slow' skips it
@torch.no_grad()
def test_logits_match_transformers(ours, hf_model):
    model, enc = ours
    for text in PROMPTS:
        ids = torch.tensor([enc.encode_ordinary(text)])
        a = model(ids)[0, :, :enc.n_vocab]
        b = hf_model(ids).logits[0]
        assert a.shape == b.shape
        assert (a - b).abs().max() < 1e-3, text


@pytest.mark.slow  # SmolLM2 against transformers (loads both): CI runs it, -m 'not slow' skips it
def test_greedy_continuation_matches_transformers(ours, hf_model):
    model, enc = ours
    ids = enc.encode_ordinary("Once upon a time, in a small village by the sea,")
    ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=20, min_new_tokens=20, do_sample=False,
                            attention_mask=torch.ones(1, len(ids), dtype=torch.long))[0, len(ids):].tolist()
    assert ar_generate(model, ids, SamplingParams(20, temperature=0)) == ref


@pytest.mark.slow  # SmolLM2 and transformers' tokenizer: CI runs it, -m 'not slow' skips it
def test_chat_template_and_answer(ours, hf_tokenizer):
    model, enc = ours
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.chat_ids(enc, messages)
    assert ids == hf_tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                                   return_dict=False)
    with_system = [{"role": "system", "content": "Be brief."}] + messages
    assert tok.chat_ids(enc, with_system) == hf_tokenizer.apply_chat_template(
        with_system, tokenize=True, add_generation_prompt=True, return_dict=False)
    out = ar_generate(model, ids, SamplingParams(30, temperature=0, stop_ids=tok.stop_ids(enc)))
    assert out[-1] == enc.encode_single_token("<|im_end|>")
    assert "Paris" in enc.decode(out)


@pytest.mark.slow  # SmolLM2 against transformers (loads both): CI runs it, -m 'not slow' skips it
def test_replies_are_transformers_greedy_chat_replies(tmp_path, monkeypatch, ours, hf_model, hf_tokenizer):
    """pretrained.py --replies appends, per prompt, the reply transformers' greedy generate() gives to the
    prompt in the chat template (stopping at <|im_end|>), then a blank line, to the file."""
    monkeypatch.setattr(pretrained, "load_smollm2", lambda device="cpu": ours)
    monkeypatch.setattr(pretrained, "write_replies", lambda *a, w=pretrained.write_replies: w(*a, max_new_tokens=12))
    path = tmp_path / "smol.txt"
    path.write_text("kept\n\n")
    pretrained.main([f"--replies={path}", "--n_replies=2"])
    expected = ["kept"]
    for prompt in [t.format(pretrained.TOPICS[0]) for t in pretrained.TEMPLATES[:2]]:
        ids = hf_tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True,
                                               add_generation_prompt=True, return_dict=False)
        out = hf_model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=2,
                                attention_mask=torch.ones(1, len(ids), dtype=torch.long))[0, len(ids):].tolist()
        expected.append(hf_tokenizer.decode([t for t in out if t not in (0, 2)]).strip())
    assert path.read_text() == "".join(e + "\n\n" for e in expected)
    with pytest.raises(SystemExit):
        pretrained.main([f"--replies={path}", "--n_replies=0"])


@pytest.mark.slow  # SmolLM2 and transformers' tokenizer: CI runs it, -m 'not slow' skips it
def test_tokenizer_matches_transformers(ours, hf_tokenizer):
    """Same ids as Hugging Face's tokenizer built from the same GGUF metadata. transformers gives a
    GGUF with pre-tokenizer "smollm" the plain GPT-2 split; SmolLM2's own tokenizer.json (and
    llama.cpp's "smollm") also isolates every digit, which only changes whitespace before digits.
    So: equal ids with SmolLM2's pre-tokenizer set on the Hugging Face tokenizer, and equal ids with
    transformers' as loaded on digit-free text."""
    from tokenizers import pre_tokenizers
    _, enc = ours
    backend = hf_tokenizer.backend_tokenizer
    as_loaded, smollm = (type(backend).from_str(backend.to_str()) for _ in range(2))
    smollm.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False)])
    special = smollm.encode("<|im_start|><|endoftext|>", add_special_tokens=False).ids
    as_loaded.encode_special_tokens = smollm.encode_special_tokens = True  # special-token text is text
    differs = 0
    for text in TEXTS:
        ids = enc.encode_ordinary(text)
        assert ids == smollm.encode(text, add_special_tokens=False).ids, repr(text)
        plain = as_loaded.encode(text, add_special_tokens=False).ids
        if not any(c.isdigit() for c in text):
            assert ids == plain, repr(text)
        differs += ids != plain
        if "\x04" not in text:
            assert enc.decode(ids) == text
    assert differs > 0  # the digit rule was exercised
    assert enc.encode("<|im_start|><|endoftext|>", allowed_special="all") == special == [1, 0]
    assert tok.stop_ids(enc) == [0, 2]


@pytest.mark.slow  # SmolLM2, 135M parameters: CI runs it, -m 'not slow' skips it
def test_risd_on_smollm2_is_lossless(ours):
    """Greedy ISD on SmolLM2 + a random non-zero gated adapter == greedy AR of SmolLM2 itself."""
    import copy

    import lora
    base, enc = ours
    model = lora.add_adapter(copy.deepcopy(base), lora.LoraConfig(rank=4))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.lora.B.values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    ids = tok.chat_ids(enc, [{"role": "user", "content": "Name three colours."}])
    ref = ar_generate(base, ids, SamplingParams(12, temperature=0))
    out, st = isd_generate(model, ids, SamplingParams(12, temperature=0), stride=4)
    assert out == ref
    assert st.forwards < 12 or st.rounds_r > 0  # drafts were verified, not only cold starts


@pytest.mark.slow  # end to end (a subprocess, a whole command): CI runs it, -m 'not slow' skips it
def test_server_chat_on_smollm2(ours, hf_tokenizer):
    """serve.py on SmolLM2: /v1/chat/completions uses the ChatML template (ids checked against
    transformers' apply_chat_template) and stops at <|im_end|>; at temperature 0 the reply equals
    the base model's greedy AR reply."""
    from fastapi.testclient import TestClient

    import serve
    from scheduler import Scheduler
    model, enc = ours
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = hf_tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
    want = ar_generate(model, ids, SamplingParams(30, temperature=0, stop_ids=tok.stop_ids(enc)))
    assert want[-1] == enc.encode_single_token("<|im_end|>")
    engine = serve.Engine(Scheduler(model, stride=3, max_batch=2), enc).start()
    with TestClient(serve.make_app(engine, enc, "smollm2")) as client:
        r = client.post("/v1/chat/completions", json={"model": "smollm2", "messages": messages,
                                                       "max_tokens": 30, "temperature": 0})
        assert r.status_code == 200, r.text
        body = r.json()
    assert body["choices"][0]["message"]["content"] == enc.decode(want[:-1])
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["prompt_tokens"] == len(ids) and "Paris" in body["choices"][0]["message"]["content"]


# ----------------------------------------------------------------------------------------------
# the conversion cache, with a stand-in conversion (a tiny model, no GGUF): it appears whole or not at all

def tiny_conversion(fill):
    """What pretrained.convert returns, for a tiny model whose every weight is `fill`."""
    enc = tiktoken.Encoding("tiny", pat_str=r"\S+|\s+", mergeable_ranks={bytes([b]): b for b in range(256)},
                            special_tokens={})
    cfg = ModelConfig(vocab_size=257, mask_token_id=256, n_layer=1, n_head=2, n_kv_head=1, d_model=8, d_ff=16,
                      max_seq_len=16)
    return cfg, {k: torch.full_like(v, fill) for k, v in Model(cfg).state_dict().items()}, enc


def converted(cache):
    """The fill of the cached conversion in `cache`, after checking it loads whole."""
    model, enc = pretrained.load_smollm2(cache_dir=str(cache))
    assert enc.encode_ordinary("ab c") == [97, 98, 32, 99]
    fills = {v for p in model.state_dict().values() for v in p.flatten().tolist()}
    assert len(fills) == 1
    return fills.pop()


@pytest.mark.parametrize("fail_at", ["model.save", "tok.save", "rename"])
def test_conversion_cut_short_leaves_no_folder(tmp_path, monkeypatch, fail_at):
    cache = tmp_path / "cache"
    monkeypatch.setattr(pretrained, "convert", lambda path=None: tiny_conversion(1.0))

    def cut_short(*args, **kwargs):
        raise KeyboardInterrupt

    def half_written(self, out_dir, metadata=None):
        open(os.path.join(out_dir, "model.safetensors"), "wb").write(b"\0" * 100)
        raise KeyboardInterrupt
    with monkeypatch.context() as m:
        if fail_at == "model.save":
            m.setattr(Model, "save", half_written)
        elif fail_at == "tok.save":
            m.setattr(tok, "save", cut_short)
        else:
            m.setattr(os, "rename", cut_short)
        with pytest.raises(KeyboardInterrupt):
            pretrained.smollm2_dir(str(cache))
    assert os.listdir(cache) == []  # neither the folder nor the hidden one it was written in
    folder = pretrained.smollm2_dir(str(cache))
    assert os.listdir(cache) == [os.path.basename(folder)] and converted(cache) == 1.0
    monkeypatch.setattr(pretrained, "convert", cut_short)  # cached: not converted again
    assert pretrained.smollm2_dir(str(cache)) == folder


def test_concurrent_conversions_keep_the_first_folder(tmp_path, monkeypatch):
    """Another process's conversion finishes while this one converts: its folder stays, ours goes."""
    cache = tmp_path / "cache"
    calls = []

    def convert(path=None):
        calls.append(path)
        if len(calls) == 1:
            pretrained.smollm2_dir(str(cache))  # the other process, done first
            return tiny_conversion(1.0)
        return tiny_conversion(2.0)
    monkeypatch.setattr(pretrained, "convert", convert)
    folder = pretrained.smollm2_dir(str(cache))
    assert len(calls) == 2 and os.listdir(cache) == [os.path.basename(folder)] and converted(cache) == 2.0
