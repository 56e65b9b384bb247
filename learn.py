"""Learning the speculator from live traffic: the server distils its own masks from the requests it serves.

    python serve.py --out_dir=out --learn --learn_share=0.5 --learn_save=out/online

distill.py teaches the masks offline, from rollouts of the training text. A deployed model meets other
prompts, and what its masks learned there may not carry over. Here the requests the server finishes are
the rollouts: prompt + completion is the model's own continuation of a real prompt, exactly the target
distill.py uses. Three phases, in a thread beside the scheduler:
  1. observe: each finished request becomes an example (completion tokens are targets, the prompt is
     context); its trace says which tokens a rejected draft stood in for (a "correction"). Those weigh
     `rejected_weight` times as much: the rejections are the traffic's own negative feedback;
  2. train: batches drawn from a bounded buffer of recent examples train the gated adapter with
     distill.distill_loss (hard targets for greedy requests, soft ones for sampled requests), on a
     replica of the model that shares its frozen base weights, within a share of wall time;
  3. publish: every `publish_every` steps a copy of the adapter waits for the scheduler, which swaps it
     into the serving model between two steps (swap), never during one.
Safe in production: the adapter acts only at MASK positions (lora.py), the base is frozen, so p and
with it every committed token stay the base model's; a new adapter changes q, and verification keeps
drafts drawn from the old q exact (each is checked against the q it was drawn from). Only speed moves.
"""
import os
import random
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, replace

import torch

import checkpoint
import lora
from distill import distill_loss
from model import Model
from options import DistillConfig


@dataclass
class LearnConfig:
    share: float = 0.5  # the learner trains at most this fraction of wall time (it sleeps the rest)
    replay: float = 8.0  # and on at most this many target tokens per target token served: idle traffic, idle learner
    buffer: int = 512  # examples kept (the most recent)
    batch_size: int = 8
    lr: float = 2e-3  # AdamW, constant after `warmup` steps
    warmup: int = 20
    rejected_weight: float = 2.0  # loss weight of the tokens whose drafts were rejected (1: plain replay)
    temperature: float = DistillConfig.temperature  # of the soft targets of sampled requests
    publish_every: int = 10  # steps between adapters handed to the scheduler
    save_every: float = 60.0  # seconds between writes of the adapter (with a save folder)
    max_len: int = 256  # an example keeps its last max_len tokens
    rank: int = DistillConfig.rank  # of the adapter a model without one starts with
    lora_alpha: float = DistillConfig.lora_alpha
    targets: str = DistillConfig.targets
    seed: int = 0

    def __post_init__(self):
        if not 0 < self.share <= 1:
            raise ValueError(f"share must be in (0, 1], got {self.share}")
        for k in ("replay", "rejected_weight", "lr", "temperature"):
            if getattr(self, k) <= 0:
                raise ValueError(f"{k} must be > 0, got {getattr(self, k)}")
        for k in ("buffer", "batch_size", "publish_every", "max_len", "rank"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")


def example(req, max_len, rejected_weight):
    """(tokens, labels, weights, greedy) of a finished isd.Request with its trace on: labels are the
    completion (-100 on the prompt), weights `rejected_weight` at tokens committed as a correction of
    a rejected draft, 1 elsewhere. The last max_len tokens."""
    kinds = [k for step in req.trace for _, k in step if k != "rejected"][:len(req.out)]
    tokens = req.prompt + req.out
    labels = [-100] * len(req.prompt) + req.out
    weights = [1.0] * len(req.prompt) + [rejected_weight if k == "correction" else 1.0 for k in kinds]
    return tokens[-max_len:], labels[-max_len:], weights[-max_len:], req.params.temperature == 0


def batch(examples, pad_id):
    """Right-padded tensors (x0, labels, weights, hard_rows) of a list of examples; pads are not targets
    (and, after every real token, never seen by one)."""
    L = max(len(e[0]) for e in examples)
    x0 = torch.tensor([t + [pad_id] * (L - len(t)) for t, _, _, _ in examples])
    labels = torch.tensor([y + [-100] * (L - len(y)) for _, y, _, _ in examples])
    weights = torch.tensor([w + [0.0] * (L - len(w)) for _, _, w, _ in examples])
    return x0, labels, weights, torch.tensor([g for *_, g in examples])


def replica(model):
    """A training copy of `model` that shares its (frozen) base weights and has an adapter of its own,
    a copy of the serving one. The serving model must have an adapter (Learner adds one)."""
    with torch.device("meta"):
        twin = Model(model.cfg)
    twin.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("lora.")}, assign=True)
    return lora.add_adapter(twin, model.lora.cfg, {k: v.clone() for k, v in model.lora.state_dict().items()})


def resume_source(save_dir, base):
    """save_dir, which holds an adapter a learning server wrote, if that adapter belongs to `base` (the model
    being served: a folder or a pretrained name); a ValueError otherwise."""
    own = checkpoint.adapter_base(save_dir)
    same = own == base if checkpoint.PRETRAINED in (own, base) else os.path.realpath(own) == os.path.realpath(base)
    if not same:
        raise ValueError(f"{save_dir} holds an adapter of {own}, not of {base}: give another --learn_save folder")
    return save_dir


class Learner:
    """Trains the serving model's adapter on finished requests (observe) in a thread of its own (start,
    stop), and hands new weights to the scheduler (swap). `base`: how a saved adapter names its base
    model (a folder, or a pretrained name); `save_dir`: where the adapter is written now and then."""

    def __init__(self, model, stride, cfg=LearnConfig(), save_dir=None, base=None):
        if save_dir is not None and base is None:
            raise ValueError("a Learner that saves its adapter needs the name or folder of the base model (base=)")
        self.cfg, self.stride, self.save_dir = cfg, stride, save_dir
        self.max_len = min(cfg.max_len, model.cfg.max_seq_len)  # what the served model sees: its context
        if getattr(model, "lora", None) is None:  # a cold start: B = 0, the adapter changes nothing yet
            lora.add_adapter(model, lora.LoraConfig(cfg.rank, cfg.lora_alpha, base="..", targets=cfg.targets.split(",")))
        self.twin = replica(model).train()
        if save_dir is not None:  # the folder names its base relative to itself, as distill.py's does
            ref = base if base == checkpoint.PRETRAINED else os.path.relpath(base, save_dir)
            self.twin.lora.cfg = replace(self.twin.lora.cfg, base=ref)
        self.params = list(self.twin.lora.parameters())
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
        self.pad_id = 0 if model.cfg.mask_token_id else 1
        self.buffer = deque(maxlen=cfg.buffer)
        self.recent = deque(maxlen=64)  # (tokens, forwards, drafts verified, acceptance sum) of recent requests
        self.rng = random.Random(cfg.seed)
        self.lock, self.wake, self.fresh = threading.Lock(), threading.Event(), None
        self.counters = dict.fromkeys(["examples", "target_tokens", "trained_tokens", "steps", "swaps", "saves",
                                       "seconds", "failed"], 0)
        self.loss = float("nan")
        self.stopped = False
        self.thread = threading.Thread(target=self._loop, name="learner", daemon=True)

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        """End the thread (after the step it is in) and write the adapter a last time."""
        self.stopped = True
        self.wake.set()
        if self.thread.is_alive():
            self.thread.join()
        if self.save_dir is not None and self.counters["steps"]:
            self.save()

    # ------------------------------------------------------------------------------------------
    # the scheduler's side (the thread that steps it): finished requests in, new weights out between steps

    def observe(self, req):
        """A finished request (with its trace) becomes an example; requests with a logit_bias do not (their
        tokens follow another distribution than the model's)."""
        st = req.stats
        with self.lock:
            self.recent.append((st.tokens, st.forwards, st.drafts_verified, st.acceptance_sum))
            if req.logit_bias or not req.out or req.trace is None:
                return
            ex = example(req, self.max_len, self.cfg.rejected_weight)
            self.buffer.append(ex)
            self.counters["examples"] += 1
            self.counters["target_tokens"] += sum(y != -100 for y in ex[1][1:])  # as train_step counts them
        self.wake.set()

    def swap(self, model):
        """Copy the newest published adapter into the serving `model` (call between scheduler steps)."""
        if self.fresh is None:
            return False
        with self.lock:
            state, self.fresh = self.fresh, None
        with torch.no_grad():
            for k, v in model.lora.state_dict().items():
                v.copy_(state[k])
        self.counters["swaps"] += 1
        return True

    def metrics(self):
        with self.lock:
            c = dict(self.counters, buffered=len(self.buffer), loss=self.loss)
            tokens, forwards, drafts, accepted = (sum(x) for x in zip(*self.recent)) if self.recent else (0,) * 4
        c["recent_tokens_per_forward"] = tokens / max(1, forwards)
        c["recent_acceptance_rate"] = accepted / max(1, drafts)
        return c

    # ------------------------------------------------------------------------------------------
    # the learner thread

    def _loop(self):
        try:
            self._learn()
        except Exception:  # serving goes on with the last adapter; /metrics shows idlm_learn_failed 1
            traceback.print_exc()
            print("learn.py: the learner stopped after the error above; serving goes on", file=sys.stderr, flush=True)
            self.counters["failed"] = 1

    def _learn(self):
        last_save = time.perf_counter()
        while not self.stopped:
            with self.lock:
                due = self.counters["trained_tokens"] < self.cfg.replay * self.counters["target_tokens"]
                examples = [self.rng.choice(self.buffer) for _ in range(self.cfg.batch_size)] if due else None
            if examples is None:  # nothing new to learn from: sleep until a request finishes
                self.wake.wait()
                self.wake.clear()
                continue
            t0 = time.perf_counter()
            self.train_step(examples)
            busy = time.perf_counter() - t0
            self.counters["seconds"] += busy
            if self.counters["steps"] % self.cfg.publish_every == 0:
                state = {k: v.detach().clone() for k, v in self.twin.lora.state_dict().items()}
                with self.lock:
                    self.fresh = state
            if self.save_dir is not None and time.perf_counter() - last_save > self.cfg.save_every:
                self.save()
                last_save = time.perf_counter()
            time.sleep(busy * (1 / self.cfg.share - 1))  # the share of wall time: busy / (busy + sleep)

    def train_step(self, examples):
        """One AdamW step of distill_loss on a batch of examples (hard targets for greedy requests,
        soft targets for sampled ones, rejected tokens weighed up)."""
        x0, labels, weights, hard_rows = batch(examples, self.pad_id)
        for g in self.opt.param_groups:
            g["lr"] = self.cfg.lr * min(1.0, (self.counters["steps"] + 1) / self.cfg.warmup)
        supervision = "hard" if hard_rows.all() else "soft" if not hard_rows.any() else "mixed"
        dev = self.params[0].device
        loss = distill_loss(self.twin, x0.to(dev), labels.to(dev), self.stride, supervision, self.cfg.temperature,
                            hard_rows.to(dev), weights.to(dev))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.loss = loss.item()
        self.counters["steps"] += 1
        self.counters["trained_tokens"] += int((labels[:, 1:] != -100).sum())

    def save(self):
        """Write the adapter into save_dir as a checkpoint of its own (checkpoint.staged: an interrupted
        write leaves the previous one whole); serve.py --learn_save=DIR continues from it."""
        with checkpoint.staged(self.save_dir) as stage:
            lora.save_adapter(self.twin.lora, stage)
        self.counters["saves"] += 1
