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
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, safe_open, save_file

import checkpoint
import data
import distill
import dlm
import lora
import pretrained
import tokenizer as tok
from isd import ar_generate
from model import Model, ar_loss, idlm_loss, load_config
from options import MODEL_KEYS, UsageError, check_options, model_config, parse_args

# options that may change when resuming; every other one must match the checkpoint
RESUMABLE = {"max_iters", "eval_interval", "eval_iters", "log_interval", "device", "compile", "resume", "overwrite",
             "out_dir", "distill_iters"}  # out_dir: the same folder may be named from another working directory


def pick_device(name):
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def init_processes(cfg):
    """(ddp, rank, world, device) of this process: the only one, or one of torchrun's (ddp), which join a
    process group (nccl on CUDA, each on its own GPU; gloo elsewhere) once --grad_accum is known to split."""
    if "WORLD_SIZE" not in os.environ:
        return False, 0, 1, pick_device(cfg["device"])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    micro_steps(cfg, world)
    device = pick_device(cfg["device"])
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return True, rank, world, device


def lr_at(it, cfg):
    """Linear warmup, then cosine decay to min_lr_frac * lr."""
    if it < cfg["warmup_iters"]:
        return cfg["lr"] * (it + 1) / cfg["warmup_iters"]
    t = (it - cfg["warmup_iters"]) / max(1, cfg["max_iters"] - cfg["warmup_iters"])
    lo = cfg["lr"] * cfg["min_lr_frac"]
    return lo + 0.5 * (cfg["lr"] - lo) * (1 + math.cos(math.pi * min(1.0, t)))


def losses(model, x, cfg):
    """(loss to optimise, task, clean); task is nan for the AR objective; for dlm / bdlm the loss is
    the diffusion bound and clean is nan."""
    if cfg["objective"] in dlm.FAMILIES:
        bound = dlm.dlm_loss(model, x, cfg["block_size"] if cfg["objective"] == "bdlm" else None)
        return bound, bound, torch.full_like(bound, float("nan"))
    if cfg["objective"] == "ar":
        clean = ar_loss(model, x)
        return clean, torch.full_like(clean, float("nan")), clean
    return idlm_loss(model, x, stride=cfg["stride"], alpha=cfg["alpha"])


@torch.no_grad()
def evaluate(model, val, cfg, device, rank=0, world=1):
    """Mean validation task and clean losses over a fixed set of eval_iters batches (the same every
    time, whatever the number of processes); process `rank` scores every world-th batch."""
    model.eval()
    bs = cfg["batch_size"]
    offsets = data.batch_offsets(len(val), cfg["seq_len"], cfg["eval_iters"] * bs, seed=0)
    out = torch.zeros(2)
    for i in range(rank, cfg["eval_iters"], world):
        x = torch.from_numpy(data.get_batch(val, offsets[i * bs:(i + 1) * bs], cfg["seq_len"])).to(device)
        if cfg["objective"] in dlm.FAMILIES:  # the diffusion bound, with a fixed draw of t and masks
            task = dlm.dlm_loss(model, x, cfg["block_size"] if cfg["objective"] == "bdlm" else None,
                                torch.Generator().manual_seed(i))
            clean = torch.tensor(float("nan"))
        elif cfg["stride"] >= 2:  # idlm_loss's clean term IS the AR loss: one forward gives both
            _, task, clean = idlm_loss(model, x, stride=cfg["stride"])
        else:
            task, clean = torch.tensor(float("nan")), ar_loss(model, x)
        out += torch.stack([task.float().cpu(), clean.float().cpu()])
    if world > 1:
        dist.all_reduce(out)
    model.train()
    return (out / cfg["eval_iters"]).tolist()


def micro_steps(cfg, world):
    """Micro-batches per optimizer step in each of `world` processes: grad_accum / world, so that a
    step sees batch_size * grad_accum rows whatever the number of processes (as in nanoGPT)."""
    if cfg["grad_accum"] % world:
        raise UsageError(f"--grad_accum={cfg['grad_accum']} is split among the {world} processes: make it a "
                         f"multiple of {world} (the global batch, batch_size*grad_accum rows, stays the same)")
    return cfg["grad_accum"] // world


def micro_batches(ids, it, cfg, rank=0, world=1):
    """The micro-batches of process `rank` in step `it`: rows of the step's global batch, which is a function
    of (seed, it) only, so --resume and any number of processes see the same rows in the same order; it is
    dealt out row block by row block, micro_steps(cfg, world) blocks to each process."""
    bs, seed = cfg["batch_size"], cfg["seed"] * 1_000_003 + it
    offsets = data.batch_offsets(len(ids), cfg["seq_len"], bs * cfg["grad_accum"], seed)
    starts = [(micro * world + rank) * bs for micro in range(micro_steps(cfg, world))]
    return [torch.from_numpy(data.get_batch(ids, offsets[i:i + bs], cfg["seq_len"])) for i in starts]


def decays(ndim, cfg):
    """AdamW's weight decay for a parameter of `ndim` dimensions: matrices decay, vectors do not."""
    return cfg["weight_decay"] if ndim >= 2 else 0.0


BETAS = (0.9, 0.95)  # AdamW's, in both trainers


def make_optimizer(model, cfg):
    """AdamW over the trainable parameters (an adapter's only, with --lora), weight decay on matrices."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if decays(p.dim(), cfg) == wd], "weight_decay": wd}
              for wd in (cfg["weight_decay"], 0.0)]
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
                loss, task, clean = losses(net, x.to(device), cfg)
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
# checkpoints: model.safetensors + config.json + tokenizer.json (+ optimizer and train state), written
# together by checkpoint.staged

def save_checkpoint(out_dir, model, enc, opt, state, new_run=False):
    """Write the checkpoint's files (with an adapter, --lora: the adapter, not the frozen base).
    `it` is stamped into both tensor files to detect a mix. new_run: see staged."""
    meta = {"iter": str(state["iter"])}
    sd = opt.state_dict()
    tensors = {f"{i}.{k}": v.contiguous().cpu() for i, s in sd["state"].items() for k, v in s.items()}
    text = json.dumps({**state, "param_groups": sd["param_groups"]}, indent=1)
    with checkpoint.staged(out_dir, new_run) as stage:
        if hasattr(model, "lora"):
            lora.save_adapter(model.lora, stage, metadata=meta)
        else:
            model.save(stage, metadata=meta)
        tok.save(enc, stage)
        save_file(tensors, os.path.join(stage, "optimizer.safetensors"), metadata=meta)
        Path(stage, "train_state.json").write_text(text)


def read_train_state(out_dir, framework="pytorch"):
    path = os.path.join(out_dir, "train_state.json")
    if not os.path.isfile(path):
        raise UsageError(f"--resume: {out_dir} has no train_state.json (not a training run); drop --resume")
    state = json.load(open(path))
    if state.get("framework", "pytorch") != framework:  # the optimizer state is the framework's own
        raise UsageError(f"--resume: {out_dir} was trained with {state.get('framework', 'pytorch')}: resume it "
                         f"with that trainer, or start from its weights with --init_from")
    if state["config"]["alpha"] != "auto":  # a number; an older train.py saved it as a string
        state["config"]["alpha"] = float(state["config"]["alpha"])
    return state


def load_optimizer(out_dir, opt, state):
    """Restore the optimizer in place from optimizer.safetensors and the saved param groups."""
    opt_path = os.path.join(out_dir, "optimizer.safetensors")
    weights = "adapter.safetensors" if state["config"].get("lora") else "model.safetensors"
    with safe_open(opt_path, "pt") as f, safe_open(os.path.join(out_dir, weights), "pt") as m:
        if f.metadata().get("iter") != m.metadata().get("iter") or f.metadata().get("iter") != str(state["iter"]):
            raise UsageError(f"--resume: the files in {out_dir} come from different steps; "
                             f"the checkpoint is inconsistent, start a new run")
    tensors = load_file(opt_path)
    sd = {"state": {}, "param_groups": state["param_groups"]}
    for key, v in tensors.items():
        i, name = key.split(".", 1)
        sd["state"].setdefault(int(i), {})[name] = v
    opt.load_state_dict(sd)


def checkpoint_folder(path, what):
    """`path`, or the converted checkpoint folder of a pretrained name (smollm2); a UsageError if none."""
    if path == pretrained.NAME:
        try:
            path = pretrained.smollm2_dir()
        except (FileNotFoundError, ValueError) as e:
            raise UsageError(f"{what}={pretrained.NAME}: {e}") from None
    if not os.path.isdir(path):
        raise UsageError(f"{what}={path}: no such folder")
    return path


def load_pretrained(path, what, load_weights=load_file):
    """(model config, tokenizer, weights) from a checkpoint folder or a pretrained name (smollm2),
    or a one-line UsageError. load_weights reads model.safetensors (the framework's own loader)."""
    path = checkpoint_folder(path, what)
    try:
        mcfg = load_config(path)
        enc = tok.load(path)
        weights = load_weights(os.path.join(path, "model.safetensors"))
    except (FileNotFoundError, ValueError, OSError) as e:
        raise UsageError(f"{what}={path} is not a checkpoint of this project: {e}") from None
    if mcfg.mask_token_id != enc.n_vocab or mcfg.vocab_size != enc.n_vocab + 1:
        raise UsageError(f"{what}={path}: config.json does not match its tokenizer "
                         f"({mcfg.vocab_size} ids vs {enc.n_vocab} + MASK)")
    return mcfg, enc, weights


# ----------------------------------------------------------------------------------------------
# the start-up decision, shared with mlx_port/train.py

def resumed_config(state, cfg, given):
    """The options of the run being resumed, with the ones given that may change (RESUMABLE)."""
    saved = state["config"]
    diff = [k for k in given - RESUMABLE if saved.get(k) != cfg[k]]
    if diff:
        raise UsageError(f"--resume: the checkpoint in {cfg['out_dir']} was trained with "
                         + ", ".join(f"--{k}={saved.get(k)}" for k in diff)
                         + "; drop those options or use another --out_dir")
    return {**saved, **{k: cfg[k] for k in given & RESUMABLE}}


def check_against(mcfg, enc, cfg, given):
    """Refuse options that contradict the checkpoint the run starts from (--init_from or --resume)."""
    if cfg["init_from"] and not cfg["resume"]:
        clash = [k for k in given & set(MODEL_KEYS) if getattr(mcfg, k) != cfg[k]]
        if clash:
            raise UsageError(f"--init_from={cfg['init_from']} has "
                             + ", ".join(f"{k}={getattr(mcfg, k)}" for k in clash)
                             + ": drop the model-shape options that contradict it")
        if cfg["seq_len"] > mcfg.max_seq_len:
            raise UsageError(f"--seq_len={cfg['seq_len']} exceeds the checkpoint's max_seq_len {mcfg.max_seq_len}")
    if "tokenizer" in given and cfg["tokenizer"] != enc.name.split("-")[0]:
        raise UsageError(f"--tokenizer={cfg['tokenizer']} contradicts the checkpoint's tokenizer {enc.name}")
    if "vocab_size" in given and cfg["vocab_size"] != enc.n_vocab:
        raise UsageError(f"--vocab_size={cfg['vocab_size']} contradicts the checkpoint's tokenizer {enc.name} "
                         f"({enc.n_vocab} tokens)")


def has_checkpoint(out_dir):
    """Whether out_dir holds a model or an adapter."""
    return os.path.isfile(os.path.join(out_dir, "config.json")) or checkpoint.has_adapter(out_dir)


def start_from(cfg, given, framework="pytorch", load_weights=load_file):
    """Where the run starts: the run in out_dir (--resume), another checkpoint (--init_from) or
    scratch; a checkpoint already in out_dir is replaced only with --overwrite. Returns (cfg, model
    config, tokenizer, weights, train state, adapter); all but cfg are None from scratch, the state
    only when resuming, the adapter (LoraConfig, tensors or None) only with --lora. With --init_from,
    cfg records the checkpoint's model shape and tokenizer (the run's), not the preset's."""
    out_dir = cfg["out_dir"]
    mcfg = enc = weights = state = adapter = None
    has_ckpt = has_checkpoint(out_dir)
    if cfg["resume"]:
        if not has_ckpt:
            raise UsageError(f"--resume: no checkpoint in {out_dir}; run without --resume first")
        state = read_train_state(out_dir, framework)
        cfg = resumed_config(state, cfg, given)
        if cfg["lora"]:  # the frozen base, then the adapter trained so far
            try:
                adapter = lora.load_adapter(out_dir)
            except (OSError, ValueError, TypeError) as e:
                raise UsageError(f"--resume: the adapter in {out_dir} cannot be read: {e}") from None
            mcfg, enc, weights = load_pretrained(lora.base_of(out_dir, adapter[0]),
                                                 "--resume: the adapter's base model", load_weights)
        else:
            mcfg, enc, weights = load_pretrained(out_dir, "--resume", load_weights)
        check_against(mcfg, enc, cfg, given)
    elif has_ckpt and not cfg["overwrite"]:
        raise UsageError(f"{out_dir} already holds a checkpoint: add --resume to continue it, "
                         f"--overwrite to replace it, or choose another --out_dir")
    elif cfg["init_from"]:
        mcfg, enc, weights = load_pretrained(cfg["init_from"], "--init_from", load_weights)
        check_against(mcfg, enc, cfg, given)
        cfg = {**cfg, **{k: getattr(mcfg, k) for k in MODEL_KEYS}, "tokenizer": enc.name, "vocab_size": enc.n_vocab}
        if cfg["lora"]:  # a new adapter on the base as resolved now
            base = cfg["init_from"] if cfg["init_from"] == pretrained.NAME else os.path.abspath(cfg["init_from"])
            adapter = (lora.LoraConfig(cfg["lora"], cfg["lora_alpha"], base), None)
    return cfg, mcfg, enc, weights, state, adapter


def load_data(cfg, enc=None, log=print):
    """(tokenizer, train ids, val ids) of --data (the tokenizer trained on it unless `enc` is given),
    long enough for --seq_len; a UsageError if not."""
    try:
        enc, train_ids, val_ids = data.load_corpus(cfg["data"], cfg["tokenizer"], cfg["vocab_size"], enc=enc, log=log)
        data.batch_offsets(min(len(train_ids), len(val_ids)), cfg["seq_len"], 1, 0)  # long enough?
    except data.DataError as e:
        raise UsageError(str(e)) from None
    return enc, train_ids, val_ids


def build_model(cfg, mcfg, weights=None, adapter=None):
    """The model to train, seeded: mcfg's, with the checkpoint's weights if any; with an adapter (R-ISD,
    --lora) the base is frozen and only the gated adapter trains."""
    torch.manual_seed(cfg["seed"])
    model = Model(mcfg)
    if weights is not None:
        model.load_state_dict(weights)
    if adapter is not None:
        lora.add_adapter(model, *adapter)
    return model


# ----------------------------------------------------------------------------------------------
# what a run prints, shared with mlx_port/train.py

def run_line(cfg, n_params, mcfg, n_train, where):
    """The run at a glance, printed before its first step; `where`: the processes or framework and device."""
    return (f"{cfg['objective']} model: {n_params / 1e6:.2f}M parameters, vocab {mcfg.vocab_size} (MASK = "
            f"{mcfg.mask_token_id}), {n_train / 1e6:.2f}M train tokens, stride {cfg['stride']}, "
            f"{cfg['batch_size'] * cfg['grad_accum']} rows x {cfg['seq_len']} tokens per step, {where}")


def evaluates_at(it, start, cfg):
    """Whether the run evaluates and saves before step `it`: every eval_interval steps and at the end."""
    return it > start and (it % cfg["eval_interval"] == 0 or it == cfg["max_iters"])


def progress_line(step, cfg, losses, lr, tps, eta):
    """One line of progress: step, losses (loss, task, clean; no task for the AR objective), lr, speed, ETA."""
    parts = {"idlm": f"task {losses[1]:.4f} clean {losses[2]:.4f}", "ar": f"clean {losses[2]:.4f}"}.get(
        cfg["objective"], "(diffusion bound)")
    speed = f"{tps / 1e3:.1f}k" if tps >= 1000 else f"{tps:.1f}"
    minutes, seconds = divmod(round(eta), 60)
    return (f"step {step}/{cfg['max_iters']} | loss {losses[0]:.4f} {parts} | lr {lr:.2e} | {speed} tok/s"
            f" | ETA {minutes}m{seconds:02d}s")


def log_progress(it, losses, lr, start, t0, t_last, cfg, log=print):
    """After step `it`, every log_interval steps and at the last: the progress line (speed since the
    last line, at t_last; ETA from the run's start step and time t0). Returns the time of the last line."""
    if (it + 1) % cfg["log_interval"] and it + 1 != cfg["max_iters"]:
        return t_last
    now = time.time()
    n = (it + 1 - start) % cfg["log_interval"] or cfg["log_interval"]
    tps = n * cfg["batch_size"] * cfg["grad_accum"] * cfg["seq_len"] / (now - t_last)
    eta = (now - t0) / (it + 1 - start) * (cfg["max_iters"] - it - 1)
    log(progress_line(it + 1, cfg, losses, lr, tps, eta), flush=True)
    return time.time()


def sample(model, enc, cfg):
    """The model's continuation of a line break (100 tokens at most, temperature 0.8), decoded: AR, or the
    diffusion decoder for dlm / bdlm."""
    model.eval()
    prompt = enc.encode_ordinary("\n")
    n = min(100, model.cfg.max_seq_len - len(prompt))
    if cfg["objective"] in dlm.FAMILIES:
        out = dlm.dlm_generate(model, cfg["objective"], prompt, n, cfg["block_size"], cfg["block_size"],
                               temperature=0.8, seed=cfg["seed"])[0]
    else:
        out = ar_generate(model, prompt, n, temperature=0.8, seed=cfg["seed"])
    return enc.decode(out)


def recipe(cfg, given, framework="pytorch"):
    """The runs that make the model asked for, as (options, options given) pairs. With --ar_iters=K
    (the cpu preset's default) the paper's recipe: an AR model pretrained for K of the max_iters steps in
    out_dir/ar, then converted with the introspective loss for the other max_iters - K steps in out_dir
    (--init_from=out_dir/ar, a schedule of its own). With --resume, each run continues where it
    stopped and a finished AR run is kept. Without --ar_iters: the one run asked for."""
    out_dir, ar_dir, K = cfg["out_dir"], os.path.join(cfg["out_dir"], "ar"), cfg["ar_iters"]
    if cfg["resume"] and has_checkpoint(out_dir):  # the conversion (or a run from scratch) had begun: go on
        K = read_train_state(out_dir, framework)["config"].get("ar_iters", 0)
        return [({**cfg, "max_iters": cfg["max_iters"] - K}, given)]
    if not K:
        return [(cfg, given)]
    if has_checkpoint(out_dir) and not (cfg["resume"] or cfg["overwrite"]):  # before the AR run, not after
        raise UsageError(f"{out_dir} already holds a checkpoint: add --resume to continue it, "
                         f"--overwrite to replace it, or choose another --out_dir")
    runs = []
    ar_state = read_train_state(ar_dir, framework) if cfg["resume"] and has_checkpoint(ar_dir) else None
    if ar_state is None or ar_state["iter"] < K:
        runs.append(({**cfg, "objective": "ar", "max_iters": K, "out_dir": ar_dir, "ar_iters": 0, "distill_iters": 0,
                      "resume": ar_state is not None}, given))
    runs.append(({**cfg, "max_iters": cfg["max_iters"] - K, "resume": False, "init_from": ar_dir}, given))
    return runs


def main(argv=None):
    cfg, given = parse_args(argv, doc=__doc__)
    check_options(cfg, given)
    ddp, rank, world, device = init_processes(cfg)
    runs = recipe(cfg, given)
    if cfg["ar_iters"] and rank == 0:
        print(f"the paper's recipe: {cfg['ar_iters']} steps of AR pretraining ({os.path.join(cfg['out_dir'], 'ar')}), "
              f"then {cfg['max_iters'] - cfg['ar_iters']} converting it into an I-DLM ({cfg['out_dir']})")
    for run_cfg, run_given in runs:
        train(run_cfg, run_given, rank, world, device, ddp)
    if ddp:
        dist.barrier()  # leave together: a process that tears gloo down while another still runs can abort
        dist.destroy_process_group()


def train(cfg, given, rank=0, world=1, device="cpu", ddp=False):
    """One training run: from the options to a checkpoint in out_dir (and its self-distilled adapter)."""
    log = print if rank == 0 else (lambda *a, **k: None)

    # the start point: the run in out_dir (--resume), another checkpoint (--init_from) or scratch
    cfg, mcfg, enc, weights, state, adapter = start_from(cfg, given)
    enc, train_ids, val_ids = load_data(cfg, enc, log)
    model = build_model(cfg, mcfg or model_config(cfg, enc.n_vocab), weights, adapter).to(device)
    opt = make_optimizer(model, cfg)
    start, history, evals = 0, [], []
    if state is not None:
        load_optimizer(cfg["out_dir"], opt, state)
        start, history, evals = state["iter"], state["history"], state["evals"]
    net = torch.compile(model) if cfg["compile"] else model
    if ddp:
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
            dcfg = distill.DistillConfig(iters=cfg["distill_iters"], seq_len=cfg["seq_len"], seed=cfg["seed"])
            distill.distill(cfg["out_dir"], dcfg, cfg["stride"], cfg["data"])


if __name__ == "__main__":
    try:
        main()
    except UsageError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(2)
