"""Train an Introspective Diffusion LM (or a plain AR model) on Shakespeare, offline.

    python train.py                                   # the CPU preset, the paper's recipe: AR pretraining (out/ar),
                                                      #   conversion into an I-DLM (out), self-distillation (out/distilled)
    python train.py --ar_iters=0 --out_dir=out-scratch  # an I-DLM from scratch instead
    python train.py --objective=ar --out_dir=out-ar   # the autoregressive baseline
    python train.py --init_from=out-ar --out_dir=out-conv  # convert an AR model of your own into an I-DLM
    python train.py --objective=dlm --out_dir=out-dlm # the masked-diffusion baseline (dlm.py; bdlm: blocks)
    python train.py --init_from=smollm2 --data=my.txt --out_dir=out-smol         # convert SmolLM2-135M
    python train.py --init_from=smollm2 --lora=8 --lr=1e-3 --out_dir=out-rlora  # R-ISD: gated LoRA only
    torchrun --nproc_per_node=2 train.py --grad_accum=2 --out_dir=out-ddp  # DDP (gloo on CPU, nccl on CUDA): the same run, 2 processes

Every option is `--key=value`; a preset gives the defaults, any option given overrides it.
"""
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

import checkpoint
import data
import distill
import dlm
import lora
import pretrained
import tokenizer as tok
from checkpoint import PRETRAINED
from decoding import SamplingParams
from isd import ar_generate
from model import Model, ar_loss, idlm_loss
from options import (BETAS, UsageError, check_options, decays, distill_config, evaluates_at, load_data, log_progress,
                     lr_at, micro_batches, micro_steps, model_config, parse_args, recipe, run_line, start_from)


def init_processes(cfg):
    """(rank, world, device) of this process: the only one, or one of torchrun's, which join a process
    group (nccl on CUDA, each on its own GPU; gloo elsewhere) once --grad_accum is known to split."""
    device = cfg["device"]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if "WORLD_SIZE" not in os.environ:
        return 0, 1, device
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    micro_steps(cfg, world)
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return rank, world, device


def losses(model, x, cfg, generator=None):
    """(loss to optimise, task, clean); task is nan for the AR objective; for dlm / bdlm the loss is
    the diffusion bound (t and the masks drawn with `generator`) and clean is nan."""
    if cfg["objective"] in dlm.FAMILIES:
        bound = dlm.dlm_loss(model, x, cfg["block_size"] if cfg["objective"] == "bdlm" else None, generator)
        return bound, bound, torch.full_like(bound, float("nan"))
    if cfg["objective"] == "ar":
        clean = ar_loss(model, x)
        return clean, torch.full_like(clean, float("nan")), clean
    return idlm_loss(model, x, stride=cfg["stride"], alpha=cfg["alpha"])


@torch.no_grad()
def evaluate(model, val, cfg, device, rank=0, world=1):
    """Mean validation task and clean losses over eval_iters fixed batches (the same whatever the number of
    processes; dlm / bdlm: a fixed draw of t and masks too); process `rank` scores every world-th batch."""
    model.eval()
    bs = cfg["batch_size"]
    offsets = data.batch_offsets(len(val), cfg["seq_len"], cfg["eval_iters"] * bs, seed=0)
    out = torch.zeros(2)
    # an AR model is scored as an I-DLM too: idlm_loss's clean term IS the AR loss, one forward gives both
    scored = {**cfg, "objective": "idlm"} if cfg["objective"] == "ar" and cfg["stride"] >= 2 else cfg
    for i in range(rank, cfg["eval_iters"], world):
        x = torch.from_numpy(data.get_batch(val, offsets[i * bs:(i + 1) * bs], cfg["seq_len"])).to(device)
        out += torch.stack(losses(model, x, scored, torch.Generator().manual_seed(i))[1:]).float().cpu()
    if world > 1:
        dist.all_reduce(out)
    model.train()
    return (out / cfg["eval_iters"]).tolist()


def make_optimizer(model, cfg):
    """AdamW over the trainable parameters (an adapter's only, with --lora), weight decay on matrices."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if (decays(p.dim(), cfg) != 0) == matrices], "weight_decay": wd}
              for matrices, wd in ((True, cfg["weight_decay"]), (False, 0.0))]  # --weight_decay=0: all in the second
    return torch.optim.AdamW(groups, lr=cfg["lr"], betas=BETAS)


def train_step(net, opt, batches, lr, cfg, device):
    """One optimizer step at learning rate lr over this process's micro-batches (with DDP the gradients
    are averaged over the processes at the last one); returns [loss, task, clean] averaged over all."""
    for g in opt.param_groups:
        g["lr"] = lr
    ddp, stats = isinstance(net, torch.nn.parallel.DistributedDataParallel), torch.zeros(3)
    for micro, x in enumerate(batches):
        last = micro == len(batches) - 1
        with contextlib.nullcontext() if last or not ddp else net.no_sync():
            with torch.autocast("cuda", torch.bfloat16, enabled=device.startswith("cuda")):
                loss, task, clean = losses(net, torch.from_numpy(x).to(device), cfg)
            (loss / len(batches)).backward()
        stats += torch.stack([loss, task, clean]).detach().float().cpu() / len(batches)
    if cfg["grad_clip"] > 0:
        torch.nn.utils.clip_grad_norm_([p for p in net.parameters() if p.requires_grad], cfg["grad_clip"])
    opt.step()
    opt.zero_grad(set_to_none=True)
    if ddp:
        dist.all_reduce(stats)
        stats /= dist.get_world_size()
    return stats.tolist()


# ----------------------------------------------------------------------------------------------
# checkpoints: model.safetensors + config.json + the tokenizer's files (+ optimizer and train state)

def trained(model):
    """The module whose weights the run trains: the adapter (--lora; the base is frozen) or the model."""
    return model.lora if hasattr(model, "lora") else model


def save_checkpoint(out_dir, model, enc, opt, state, new_run=False):
    """Write the checkpoint's files (with --lora: the adapter, not the frozen base) through checkpoint.staged.
    optimizer.safetensors holds all that --resume reads, so one os.replace makes a step resumable: AdamW's
    moments, the trained weights of that step ("weights." + their names) and the train state (its metadata);
    train_state.json, written after it, is the readable copy."""
    sd = opt.state_dict()
    tensors = {f"{i}.{k}": v.contiguous().cpu() for i, s in sd["state"].items() for k, v in s.items()}
    tensors.update({f"weights.{k}": v.detach().contiguous().cpu() for k, v in trained(model).state_dict().items()})
    text = json.dumps({**state, "param_groups": sd["param_groups"]}, indent=1)
    with checkpoint.staged(out_dir, new_run) as stage:
        if hasattr(model, "lora"):
            lora.save_adapter(model.lora, stage)
        else:
            model.save(stage)
        tok.save(enc, stage, context=model.cfg.max_seq_len)
        save_file(tensors, os.path.join(stage, "optimizer.safetensors"), metadata={"state": text})
        Path(stage, "train_state.json").write_text(text)


def restore(out_dir, model, opt, state):
    """--resume: the trained weights and the optimizer from optimizer.safetensors; returns (step, history, evals)."""
    sd = {"state": {}, "param_groups": state["param_groups"]}
    weights = {}
    for key, v in load_file(os.path.join(out_dir, "optimizer.safetensors")).items():
        i, name = key.split(".", 1)
        if i == "weights":
            weights[name] = v
        else:
            sd["state"].setdefault(int(i), {})[name] = v
    trained(model).load_state_dict(weights)
    opt.load_state_dict(sd)
    return state["iter"], state["history"], state["evals"]


def build_model(cfg, mcfg, weights=None, resuming=False):
    """The model to train, seeded: mcfg's, with the checkpoint's weights if any. With --lora (R-ISD) the
    base is frozen and only a gated adapter trains: the one in out_dir when resuming, else a new one on
    --init_from as resolved now."""
    torch.manual_seed(cfg["seed"])
    model = Model(mcfg)
    if weights is not None:
        model.load_state_dict(weights)
    if cfg["lora"] and resuming:
        try:
            adapter = lora.load_adapter(cfg["out_dir"])
        except (OSError, ValueError, TypeError) as e:
            raise UsageError(f"--resume: the adapter in {cfg['out_dir']} cannot be read: {e}") from None
        lora.add_adapter(model, *adapter)
    elif cfg["lora"]:
        base = cfg["init_from"] if cfg["init_from"] == PRETRAINED else os.path.abspath(cfg["init_from"])
        lora.add_adapter(model, lora.LoraConfig(cfg["lora"], cfg["lora_alpha"], base))
    return model


def sample(model, enc, cfg):
    """The model's continuation of a line break (100 tokens at most, temperature 0.8), decoded: AR, or the
    diffusion decoder for dlm / bdlm."""
    model.eval()
    prompt = enc.encode_ordinary("\n")
    params = SamplingParams(min(100, model.cfg.max_seq_len - len(prompt)), temperature=0.8, seed=cfg["seed"])
    if cfg["objective"] in dlm.FAMILIES:
        out = dlm.dlm_generate(model, cfg["objective"], prompt, params, cfg["block_size"], cfg["block_size"])[0]
    else:
        out = ar_generate(model, prompt, params)
    return enc.decode(out)


def main(argv=None):
    cfg, given = parse_args(argv, doc=__doc__)
    check_options(cfg, given)
    rank, world, device = init_processes(cfg)
    if cfg["init_from"] == PRETRAINED:
        pretrained.smollm2_dir()  # converted once (the GGUF file is read with torch), before the run reads it
    log = print if rank == 0 else (lambda *a, **k: None)
    for run_cfg, run_given in recipe(cfg, given, "pytorch", log):
        train(run_cfg, run_given, rank, world, device, log)
        if dist.is_initialized():  # wait for process 0's checkpoint: the next run (the conversion) reads it,
            dist.barrier()  # and a process that tears gloo down while another still runs can abort
    if dist.is_initialized():
        dist.destroy_process_group()


def train(cfg, given, rank=0, world=1, device="cpu", log=print):
    """One training run: from the options to a checkpoint in out_dir (and its self-distilled adapter);
    `log` prints in the first process only."""
    cfg, mcfg, enc, weights, state = start_from(cfg, given, "pytorch", load_file)
    enc, train_ids, val_ids = load_data(cfg, enc, log)
    model = build_model(cfg, mcfg or model_config(cfg, enc.n_vocab), weights, state is not None).to(device)
    opt = make_optimizer(model, cfg)
    start, history, evals = restore(cfg["out_dir"], model, opt, state) if state else (0, [], [])
    net = torch.compile(model) if cfg["compile"] else model
    if dist.is_initialized():
        net = torch.nn.parallel.DistributedDataParallel(net)
    if cfg["lora"]:
        n_adapter = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log(f"gated LoRA rank {cfg['lora']}: training {n_adapter / 1e6:.2f}M adapter parameters on a frozen base")
    log(run_line(cfg, sum(p.numel() for p in model.parameters()), model.cfg, len(train_ids),
                 f"{world} process(es) on {device}"))

    # the loop: evaluate and save every eval_interval steps and at the end; between, optimizer steps
    t0 = t_last = time.time()
    for it in range(start, cfg["max_iters"] + 1):
        if evaluates_at(it, start, cfg):
            val = evaluate(model, val_ids, cfg, device, rank, world)
            evals.append([it, *val])
            log(f"step {it}: val task {val[0]:.4f} clean {val[1]:.4f}")
            if rank == 0:
                save_checkpoint(cfg["out_dir"], model, enc, opt, {"iter": it, "config": cfg, "history": history,
                                                                  "evals": evals}, new_run=state is None)
        if it == cfg["max_iters"]:
            break
        lr = lr_at(it, cfg)
        stats = train_step(net, opt, micro_batches(train_ids, it, cfg, rank, world), lr, cfg, device)
        history.append([it, *[round(v, 6) for v in stats]])
        t_last = log_progress(it, stats, lr, start, t0, t_last, cfg, log)
    log(f"done in {time.time() - t0:.0f}s; checkpoint in {cfg['out_dir']}/")

    # the end: a sample; then (the cpu preset, --distill_iters) self-distillation of the masks
    if rank == 0:
        print("sample:\n" + sample(model, enc, cfg))
        if cfg.get("distill_iters") and cfg["objective"] == "idlm" and not cfg["lora"]:
            log(f"self-distillation: the masks learn the model's own continuations ({cfg['distill_iters']} steps)")
            distill.distill(cfg["out_dir"], distill_config(cfg), cfg["stride"], cfg["data"])


if __name__ == "__main__":
    try:
        main()
    except UsageError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(2)
