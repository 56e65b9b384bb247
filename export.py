"""Export a checkpoint in the Hugging Face Llama layout, for transformers, vLLM, SGLang and llama.cpp.

    python export.py --out_dir=out --to=hf/idlm           # out's base model, and out/distilled's adapter beside it
    python export.py --init_from=smollm2 --to=hf/smollm2  # the converted SmolLM2 (pretrained.py)
    python export.py --out_dir=out --to=hf/idlm --force --base --dtype=bfloat16
    python -c "from transformers import pipeline; print(pipeline('text-generation', 'hf/idlm')('ROMEO:'))"

Our decoder is Llama's (model.py): the parameter names are Hugging Face's without the `model.` prefix,
RoPE is the same rotate-half convention (model.apply_rope pairs dims i and i + head_dim/2, as
transformers' rotate_half does), so the weights are written as they are: no q/k row permutation (a
GGUF file needs one, pretrained.unpermute undoes it). The output layer is tied to the embedding
(tie_word_embeddings, no lm_head.weight). The folder holds:

    model.safetensors       model.embed_tokens.weight, model.layers.{i}.self_attn.q_proj.weight, ..., model.norm.weight
    config.json             LlamaForCausalLM; plus mask_token_id (the id the tokenizer never produces)
    generation_config.json  the stop ids (<|endoftext|>, and <|im_end|> for chat) and suppress_tokens = [MASK]
    tokenizer.json, tokenizer_config.json   Hugging Face's (tokenizer.py), with MASK added as <|mask|>
    tiktoken.json           this project's tokenizer file
    isd_adapter/            the self-distilled gated adapter, if any (adapter.safetensors + adapter.json)
    model-f32.gguf          with --gguf: the base model and its tokenizer for llama.cpp

The gated adapter (lora.py) acts only at MASK inputs, which AR decoding never feeds, so the base
weights alone are exactly the model an AR engine runs: it is never merged. It is written next to
them, in a subfolder so that engines loading every *.safetensors of the folder do not see it, with
PEFT's tensor names but no PEFT adapter_config.json (PEFT or vLLM would apply it at every position).
What an engine needs to run ISD itself: docs/export.md. The folder is written into a hidden folder
beside --to and renamed into place, so an interrupted export leaves no half-written --to.
"""
import argparse
import json
import os
import shutil
import tempfile

import gguf
import torch
from safetensors.torch import save_file

import checkpoint
import lora
import pretrained
import tokenizer as tok

MASK_TOKEN = "<|mask|>"  # the MASK id's text in Hugging Face's tokenizer files (a special token)
ADAPTER_DIR = "isd_adapter"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GGUF_FILE = "model-f32.gguf"
GGUF_PRE = {tok.GPT2_PATTERN: "gpt-2", pretrained.SMOLLM_PATTERN: "smollm"}  # llama.cpp's names of the two splits


def hf_state(model, dtype=torch.float32):
    """The base model's tensors under Hugging Face Llama's names (the gated adapter left out)."""
    return {f"model.{k}": v.detach().to(dtype).contiguous().cpu()
            for k, v in model.state_dict().items() if not k.startswith("lora.")}


def special_ids(enc):
    """(bos, eos, stop ids) of a tokenizer: bos is <|endoftext|>, recorded but never prepended (the model
    was trained without a BOS, and the tokenizer files add none); eos is tokenizer_config.json's eos_token
    (<|im_end|> for a chat tokenizer); generation stops at any of tokenizer.stop_ids."""
    eos = enc.encode_single_token(tok.hf_config(enc)["eos_token"])
    return enc.eot_token, eos, tok.stop_ids(enc)


def hf_config(cfg, enc, dtype="float32"):
    """config.json for LlamaForCausalLM. RoPE is written both ways (rope_theta for transformers 4,
    vLLM and llama.cpp's converter; rope_parameters for transformers 5), and the dtype too."""
    bos, eos, _ = special_ids(enc)
    rope = {"rope_type": "default", "rope_theta": float(cfg.rope_theta)}
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layer,
            "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim,
            "max_position_embeddings": cfg.max_seq_len, "rope_theta": rope["rope_theta"], "rope_parameters": rope,
            "rms_norm_eps": cfg.norm_eps, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
            "attention_dropout": 0.0, "initializer_range": 0.02, "pretraining_tp": 1, "use_cache": True,
            "tie_word_embeddings": True, "bos_token_id": bos, "eos_token_id": eos,
            "mask_token_id": cfg.mask_token_id, "torch_dtype": dtype, "dtype": dtype}


def generation_config(cfg, enc):
    """generation_config.json: transformers' generate() stops at every stop id and never emits MASK."""
    bos, _, stops = special_ids(enc)
    return {"bos_token_id": bos, "eos_token_id": stops if len(stops) > 1 else stops[0],
            "suppress_tokens": [cfg.mask_token_id]}


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_tokenizer(enc, cfg, folder):
    """The tokenizer files (tokenizer.save), with MASK as the special token <|mask|> in Hugging Face's
    (skipped if that text or the id is already the tokenizer's). Returns whether MASK was added."""
    tok.save(enc, folder, context=cfg.max_seq_len)
    taken = MASK_TOKEN in enc._special_tokens or MASK_TOKEN.encode() in enc._mergeable_ranks
    if cfg.mask_token_id < enc.n_vocab or taken:
        return False
    paths = [os.path.join(folder, n) for n in (tok.HF_FILE, tok.HF_CONFIG_FILE)]
    hf, conf = (read_json(p) for p in paths)
    hf["added_tokens"].append({"id": cfg.mask_token_id, "content": MASK_TOKEN, "single_word": False, "lstrip": False,
                               "rstrip": False, "normalized": False, "special": True})
    hf["model"]["vocab"][MASK_TOKEN] = cfg.mask_token_id  # as tokenizer.hf_tokenizer does for the other specials
    conf.update(mask_token=MASK_TOKEN, add_bos_token=False, add_eos_token=False)
    for p, d in zip(paths, (hf, conf)):
        with open(p, "w", encoding="utf-8") as f:
            json.dump(d, f, ensure_ascii=False)
    return True


def adapter_files(model, dtype=torch.float32):
    """(tensors, adapter.json) of model.lora, the gated adapter, under PEFT's names:
    base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight (rank x in) and .lora_B.weight
    (out x rank); y = W x + scale * B (A x) at positions whose input id is gate_token_id, W x elsewhere."""
    a = model.lora
    tensors = {}
    for name, _ in model.named_modules():
        key = name.replace(".", "_")
        if name.rsplit(".", 1)[-1] in a.cfg.targets and key in a.A:
            for part, p in (("lora_A", a.A[key]), ("lora_B", a.B[key])):
                tensors[f"base_model.model.model.{name}.{part}.weight"] = p.detach().to(dtype).contiguous().cpu()
    meta = {"format": "gated LoRA of idlm's lora.py: y = W x + scale * lora_B @ lora_A @ x at the positions whose "
                      "input token id is gate_token_id (MASK), y = W x everywhere else; never merge it into W",
            "gate_token_id": model.cfg.mask_token_id, "r": a.cfg.rank, "lora_alpha": a.cfg.lora_alpha, "scale": a.scale,
            "target_modules": list(a.cfg.targets), "base": ".."}
    return tensors, meta


def write_export(model, enc, folder, dtype="float32", adapter=True, with_gguf=False):
    """Write the export of `model` (with model.lora, if any and `adapter`; a GGUF file too with `with_gguf`)
    into the existing `folder`."""
    cfg, torch_dtype = model.cfg, DTYPES[dtype]
    save_file(hf_state(model, torch_dtype), os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    os.chmod(os.path.join(folder, "model.safetensors"), 0o644)  # safetensors writes it private
    for name, d in (("config.json", hf_config(cfg, enc, dtype)),
                    ("generation_config.json", generation_config(cfg, enc))):
        with open(os.path.join(folder, name), "w") as f:
            json.dump(d, f, indent=2)
    write_tokenizer(enc, cfg, folder)
    if adapter and hasattr(model, "lora"):
        tensors, meta = adapter_files(model, torch_dtype)
        os.makedirs(os.path.join(folder, ADAPTER_DIR))
        save_file(tensors, os.path.join(folder, ADAPTER_DIR, "adapter.safetensors"), metadata={"format": "pt"})
        os.chmod(os.path.join(folder, ADAPTER_DIR, "adapter.safetensors"), 0o644)
        with open(os.path.join(folder, ADAPTER_DIR, "adapter.json"), "w") as f:
            json.dump(meta, f, indent=2)
    if with_gguf:
        write_gguf(model, enc, os.path.join(folder, GGUF_FILE))


def permute(w, n_head):
    """llama.cpp's row order of q/k for its interleaved-pair RoPE (the inverse of pretrained.unpermute)."""
    out, d_in = w.shape
    return w.reshape(n_head, 2, out // n_head // 2, d_in).swapaxes(1, 2).reshape(out, d_in)


def write_gguf(model, enc, path):
    """The base model as a float32 GGUF file for llama.cpp (llama-quantize makes it smaller), with its
    tokenizer: llama.cpp's convert_hf_to_gguf.py refuses a tokenizer it does not know by hash, such as a
    BPE trained here. Only GPT-2's and SmolLM2's pre-tokenizers have a name in llama.cpp."""
    cfg, ranks = model.cfg, enc._mergeable_ranks
    if enc._pat_str not in GGUF_PRE:
        raise ValueError(f"the tokenizer {enc.name} splits text in a way llama.cpp has no name for: no GGUF")
    w = gguf.GGUFWriter(path, "llama")
    for add, v in ((w.add_context_length, cfg.max_seq_len), (w.add_embedding_length, cfg.d_model),
                   (w.add_block_count, cfg.n_layer), (w.add_feed_forward_length, cfg.d_ff),
                   (w.add_head_count, cfg.n_head), (w.add_head_count_kv, cfg.n_kv_head),
                   (w.add_rope_dimension_count, cfg.head_dim), (w.add_vocab_size, cfg.vocab_size),
                   (w.add_file_type, gguf.LlamaFileType.ALL_F32)):
        add(v)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    chars = tok.byte_chars()
    spell = lambda b: "".join(chars[x] for x in b)  # noqa: E731 (GPT-2's byte alphabet, as in tokenizer.json)
    tokens, types = [f"[PAD{i}]" for i in range(cfg.vocab_size)], [gguf.TokenType.UNUSED] * cfg.vocab_size
    for t, r in ranks.items():
        tokens[r], types[r] = spell(t), gguf.TokenType.NORMAL
    mask = [(MASK_TOKEN, cfg.mask_token_id)] if cfg.mask_token_id >= enc.n_vocab else []
    for t, i in [*enc._special_tokens.items(), *mask]:
        tokens[i], types[i] = t, gguf.TokenType.CONTROL
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(GGUF_PRE[enc._pat_str])
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([f"{spell(a)} {spell(b)}" for a, b in tok.bpe_merges(ranks)])
    bos, eos, _ = special_ids(enc)
    w.add_bos_token_id(bos)
    w.add_eos_token_id(eos)
    w.add_mask_token_id(cfg.mask_token_id)
    w.add_add_bos_token(False)
    if tok.has_chat_template(enc):
        w.add_chat_template(tok.CHATML_TEMPLATE)
    names = {"embed_tokens": "token_embd", "norm": "output_norm", **{v: k for k, v in pretrained.LAYER_NAMES.items()}}
    for k, v in hf_state(model).items():
        parts = k[len("model."):-len(".weight")].split(".", 2)  # "layers", i, "self_attn.q_proj"
        v = v.numpy()
        if parts[0] != "layers":
            w.add_tensor(f"{names[parts[0]]}.weight", v)
            continue
        if parts[2] in ("self_attn.q_proj", "self_attn.k_proj"):
            v = permute(v, cfg.n_head if parts[2] == "self_attn.q_proj" else cfg.n_kv_head)
        w.add_tensor(f"blk.{parts[1]}.{names[parts[2]]}.weight", v)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def check_destination(to, force, source=None):
    """Refuse a --to that is a file, or a non-empty folder without force, or the checkpoint exported."""
    if os.path.lexists(to) and not os.path.isdir(to):
        raise FileExistsError(f"--to {to} exists and is not a folder")
    if os.path.isdir(to) and os.listdir(to) and not force:
        raise FileExistsError(f"--to {to} exists and is not empty: choose another folder, or replace it with --force")
    if source and os.path.isdir(source):
        real, src = os.path.realpath(to), os.path.realpath(source)
        if src == real or src.startswith(real + os.sep):
            raise ValueError(f"--to {to} holds the checkpoint being exported ({source})")


def export(source, to, dtype="float32", force=False, adapter=True, with_gguf=False):
    """Export `source` (a checkpoint folder, an adapter folder, or the name smollm2) into the folder `to`;
    with `adapter`, a checkpoint's self-distilled adapter (source/distilled) goes into to/isd_adapter/;
    with `with_gguf`, a float32 GGUF file of the base model goes into to/model-f32.gguf."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype}")
    check_destination(to, force, source)
    if source != checkpoint.PRETRAINED and not os.path.isdir(source):
        raise FileNotFoundError(f"no checkpoint at {source}: run python train.py first, or give --out_dir")
    if adapter and source != checkpoint.PRETRAINED:
        source = checkpoint.distilled_or_base(source)
    model, enc = lora.load_model(source)
    parent = os.path.dirname(os.path.abspath(to))
    os.makedirs(parent, exist_ok=True)
    stage = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(to))}-", dir=parent)
    trash = None
    try:
        write_export(model, enc, stage, dtype, adapter, with_gguf)
        os.chmod(stage, 0o755)  # mkdtemp makes it private
        if os.path.isdir(to):  # checked above: empty, or force; moved aside, removed once replaced
            trash = tempfile.mkdtemp(prefix=".old-", dir=parent)
            os.replace(to, os.path.join(trash, "old"))
        try:
            os.replace(stage, to)
        except OSError:
            if trash:
                os.replace(os.path.join(trash, "old"), to)
            raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)  # gone already if the rename made it `to`
        if trash:
            shutil.rmtree(trash, ignore_errors=True)
    return to


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, epilog="Layout, engines, and what ISD needs "
                                "from an engine: docs/export.md", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default="out", help="checkpoint folder written by train.py (its distilled/ adapter "
                   "is exported beside it), or an adapter folder such as out/distilled (default out)")
    p.add_argument("--init_from", default=None, help="a pretrained model by name instead of --out_dir: smollm2")
    p.add_argument("--to", required=True, help="the folder to write (must not exist, or be empty, unless --force)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --to (only once the export is written)")
    p.add_argument("--base", action="store_true", help="export the base model alone, without its self-distilled "
                   "adapter (the adapter never changes what AR decoding gives)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="weights' dtype (default float32)")
    p.add_argument("--gguf", action="store_true", help=f"also write {GGUF_FILE} for llama.cpp (float32, the base "
                   "model and its tokenizer; GPT-2's or SmolLM2's pre-tokenizer only)")
    a = p.parse_args(argv)
    try:
        to = export(a.init_from or a.out_dir, a.to, a.dtype, a.force, adapter=not a.base, with_gguf=a.gguf)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        p.error(str(e))
    print(f"wrote {to}: " + ", ".join(sorted(os.listdir(to))))


if __name__ == "__main__":
    main()
