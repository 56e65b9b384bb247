"""Stationary-batch scheduling (docs/method.md section 6): many requests decode together in one resident
batch, each exactly as it would alone. Tokens only, and synchronous: the caller steps it (serve.Engine
runs it in a thread and turns tokens into text; a benchmark or a test can drive it directly).

    sched = Scheduler(model, stride=4, max_batch=16)
    params = SamplingParams(50, temperature=0.8, seed=1, stop_ids=tok.stop_ids(enc))  # decoding.SamplingParams
    row = sched.add(sched.request(enc.encode_ordinary("ROMEO:"), params))
    while sched.busy:
        sched.step()
    print(enc.decode(row.req.out), row.finish_reason)

One KV cache of `max_batch` rows (slots) stays allocated. Each step():
  1. drops cancelled requests (cancel()) from the FIFO queue and the slots (add() queues between steps);
  2. gives free slots to queued requests and prefills their prompts, at most `prefill_budget`
     prompt tokens per step in all (a long prompt takes several steps, running rows keep stepping);
  3. chooses how this step decodes (choose_mode): the wide ISD window (W = N*N tokens per row), the
     narrow one (2N-1) or a plain AR step (1 token), the mode with the most committed tokens per second
     for the batch, from the step times it measures and each request's running acceptance (--policy=fixed:
     always the wide, or --narrow, window);
  4. runs ONE forward for every row whose prompt is in: isd.isd_step in that mode, each row with its own
     cache length, rollback, settings and random stream;
  5. hands each row's committed tokens to the caller (on_commit, which may end the row: serve.py's stop
     strings), frees the slot of every finished request (a stop id, max_tokens, finish() or cancel())
     and returns what each row committed.
Requests join and leave only between steps. Every mode is exact (each committed token follows the model's
own AR distribution), so greedy text is the model's greedy text whatever the mode; a seeded sampled
request gives the same text whatever else runs only under --policy=fixed and without a learner, since
the adaptive policy changes the window with the load, and a learner (learn.py) the drafts' q with time,
and with them which random numbers make the text.
"""
import time
from collections import deque

import torch

import isd
from decoding import SamplingParams, SettingError

REASONS = ("stop", "length", "cancelled", "error")
# latency histograms (Prometheus): name -> upper bounds of the buckets in seconds (+Inf is implied)
LATENCIES = {
    "time_to_first_token_seconds": (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    "inter_token_latency_seconds": (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
    "e2e_request_latency_seconds": (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
}


class Histogram:
    """Counts of observations per bucket (cumulative, as Prometheus wants them), their sum and count."""

    def __init__(self, bounds):
        self.bounds = tuple(bounds) + (float("inf"),)
        self.counts = [0] * len(self.bounds)
        self.sum = 0.0
        self.count = 0

    def observe(self, value, times=1):
        for i, b in enumerate(self.bounds):
            if value <= b:
                self.counts[i] += times
        self.sum += value * times
        self.count += times


class Row:
    """One request in the scheduler: the isd.Request that decodes it, its slot and its timestamps."""

    def __init__(self, req):
        self.req = req
        self.slot = None
        self.ready = False  # prompt prefilled: the row decodes
        self.cancelled = False
        self.finish_reason = None  # one of REASONS once finished
        self.submitted = time.perf_counter()
        self.first_token_at = self.last_token_at = self.finished_at = None  # perf_counter() times

    @property
    def prompt_tokens(self):
        return len(self.req.prompt)

    @property
    def completion_tokens(self):
        return len(self.req.out)


MODES = ("wide", "narrow", "ar")  # a step's window: N*N tokens per row, 2N-1, or 1 (isd_step at stride 1)
EXPLORE = 256  # steps: a mode the policy has not chosen for this long runs (an ISD mode twice: its first step
# proposes drafts, the second verifies them), so that its time and the acceptance it would see are measured
# again (they drift: longer contexts, other prompts, an adapter that learns)


def expected_tpf(mode, alpha, stride):
    """Tokens a row commits per forward in `mode`, in the long run, if each draft is accepted with
    probability alpha: with K = N-1 drafts, 1 + alpha + .. + alpha^K; the narrow window pays a cold step
    (1 token) after each rejection, which happens with probability 1 - alpha^K."""
    if mode == "ar" or stride == 1:
        return 1.0
    with_drafts = sum(alpha ** j for j in range(stride))
    if mode == "wide":
        return with_drafts
    reject = 1 - alpha ** (stride - 1)
    return (with_drafts + reject) / (1 + reject)


class Scheduler:
    def __init__(self, model, stride=4, max_batch=16, prefill_budget=256, narrow=False, policy="adaptive",
                 learner=None):
        for name, v in (("stride", stride), ("max_batch", max_batch), ("prefill_budget", prefill_budget)):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if policy not in ("adaptive", "fixed"):
            raise ValueError(f"policy must be adaptive or fixed, got {policy!r}")
        self.model, self.stride, self.narrow = model.eval(), stride, narrow
        self.policy = "fixed" if stride == 1 else policy  # stride 1 is AR: nothing to choose
        self.step_time = {}  # (mode, rows) -> seconds of an isd_step, measured (calibrate, then a running mean)
        self.alpha = 0.5  # running acceptance of all drafts: the prior of a request with few of its own
        self.last_step = {}  # mode -> the step it last ran (a mode left unused for EXPLORE steps runs again)
        self.probe = None  # an explored ISD mode, for the step that verifies its drafts
        self.prefill_budget = prefill_budget
        self.learner = learner  # learn.Learner: finished requests go to it, its new adapters come in between steps
        # a row holds the context plus one window; older tokens leave the cache (KVCache.make_room)
        self.cache = model.new_cache(max_batch, model.cfg.max_seq_len + isd.window_size(stride) + prefill_budget)
        self.slots = [None] * max_batch
        self.queue = deque()  # FIFO of rows waiting for a slot
        self.prefilling = []  # rows in a slot whose prompt is not all in the cache, oldest first
        self.counters = dict.fromkeys(["prompt_tokens", "prefill_tokens", "completion_tokens", "steps",
                                       "row_forwards", "drafts_verified", "acceptance_sum", "step_seconds"]
                                      + [f"requests_{r}" for r in REASONS] + [f"steps_{m}" for m in MODES], 0)
        self.histograms = {name: Histogram(bounds) for name, bounds in LATENCIES.items()}

    def request(self, prompt, params, logit_bias=None, logprobs=None):
        """A Row for a request (prompt: token ids, sampled as `params` says: decoding.SamplingParams; with
        stop_ids=tok.stop_ids(enc) it ends at the end of text), not yet queued: it touches nothing, so a
        bad setting raises SettingError in the caller's thread. logit_bias: {token id: value} added to the
        logits; logprobs: None, or k to record each committed token's log p and top k (isd.Request.logprobs)."""
        for param, ids in (("prompt", prompt), ("logit_bias", logit_bias or ())):
            bad = [t for t in ids if not 0 <= t < self.model.cfg.vocab_size or t == self.model.cfg.mask_token_id]
            if bad:
                raise SettingError(param, f"{param}: {bad[0]} is not a token id of the model")
        return Row(isd.Request(list(prompt), params, logit_bias=dict(logit_bias or {}) or None,
                               logprobs=None if logprobs is None else [], top_logprobs=logprobs or 0,
                               trace=None if self.learner is None else []))

    def add(self, row):
        """Queue a row (from request()); it gets a slot at a step when one is free. Returns it."""
        self.queue.append(row)
        return row

    def cancel(self, row):
        """Finish `row` at the next step boundary and free its slot (a no-op once it has finished). A flag
        only: safe from any thread."""
        row.cancelled = True

    @property
    def busy(self):
        """A row is queued or in a slot: step() has work."""
        return bool(self.queue) or any(r is not None for r in self.slots)

    def rows(self):
        """Every unfinished row: queued, then in the slots."""
        return list(self.queue) + [r for r in self.slots if r is not None]

    def metrics(self):
        """Counters and gauges for /metrics (read from any thread)."""
        c = dict(self.counters)
        c["queue_length"] = len(self.queue)
        c["busy_slots"] = sum(r is not None for r in self.slots)
        c["slots"] = len(self.slots)
        c["tokens_per_forward"] = c["completion_tokens"] / max(1, c["row_forwards"])
        c["acceptance_rate"] = c["acceptance_sum"] / max(1, c["drafts_verified"])
        return c

    # ------------------------------------------------------------------------------------------
    # the decoding policy: per step, the mode with the most committed tokens per second

    def modes(self):
        """The modes this scheduler may choose from (fixed: one)."""
        if self.policy == "fixed":
            return ["ar" if self.stride == 1 else "narrow" if self.narrow else "wide"]
        return list(MODES)

    def choose_mode(self, reqs):
        """The mode of this step for the rows `reqs`: argmax over modes of (sum of each row's expected tokens per
        forward) / (the step's measured time at this many rows). A row's acceptance is its own running mean,
        pulled toward the batch's (self.alpha) while it has verified few drafts."""
        modes = self.modes()
        if len(modes) == 1:
            return modes[0]
        if self.probe is not None:
            mode, self.probe = self.probe, None
            return mode
        stale = [m for m in modes if self.counters["steps"] - self.last_step.get(m, 0) > EXPLORE]
        if stale:
            self.probe = None if stale[0] == "ar" else stale[0]
            return stale[0]
        prior = 8  # drafts' worth of weight on the batch's acceptance
        alphas = [(r.stats.acceptance_sum + prior * self.alpha) / (r.stats.drafts_verified + prior) for r in reqs]
        rate = {m: sum(expected_tpf(m, a, self.stride) for a in alphas) / self.cost(m, len(reqs)) for m in modes}
        return max(modes, key=rate.get)

    def cost(self, mode, rows):
        """The measured time of a step in `mode` with `rows` rows: linear between the nearest row counts
        measured (steps grow with the tokens in them)."""
        known = sorted(n for m, n in self.step_time if m == mode)
        lo = max([n for n in known if n <= rows], default=known[0])
        hi = min([n for n in known if n >= rows], default=known[-1])
        t_lo, t_hi = self.step_time[mode, lo], self.step_time[mode, hi]
        return t_lo if hi == lo else t_lo + (t_hi - t_lo) * (rows - lo) / (hi - lo)

    def measured(self, mode, rows, seconds):
        """A step's time into the running mean of its (mode, rows)."""
        old = self.step_time.get((mode, rows))
        self.step_time[mode, rows] = seconds if old is None else 0.8 * old + 0.2 * seconds

    @torch.no_grad()
    def calibrate(self, steps=3):
        """Time each mode at 1, 2, 4, .. max_batch rows of dummy requests in the (empty) cache before serving;
        the running mean takes over from there. The best of `steps` steps after one that gives the rows drafts."""
        B = len(self.slots)
        for rows in sorted({min(2 ** k, B) for k in range(B.bit_length() + 1)}):
            # sampled requests: their steps cost more than greedy ones (softmaxes, noise), and it is for them
            # that ISD is a close call; a greedy batch's own running mean corrects the chosen mode's time
            reqs = [isd.Request([(7 * i + 3) % self.model.cfg.mask_token_id] * 8, SamplingParams(10 ** 6, seed=i))
                    for i in range(rows)]
            self.cache.reset(list(range(rows)))
            isd.prefill(self.model, self.cache, list(range(rows)), reqs)
            for mode in MODES:
                stride, narrow = (1, False) if mode == "ar" else (self.stride, mode == "narrow")
                isd.isd_step(self.model, self.cache, list(range(rows)), reqs, stride, narrow)
                times = []
                for _ in range(steps):
                    t0 = time.perf_counter()
                    isd.isd_step(self.model, self.cache, list(range(rows)), reqs, stride, narrow)
                    times.append(time.perf_counter() - t0)
                self.step_time[mode, rows] = min(times)
        self.cache.reset(list(range(B)))

    # ------------------------------------------------------------------------------------------
    # one step

    @torch.no_grad()
    def step(self, on_commit=None):
        """One step: drop cancelled rows, admit, prefill under the budget, one ISD forward for the ready rows,
        finish. on_commit(row, new tokens) sees each row's commit before the scheduler checks it for a stop id
        or max_tokens; it may end the row (finish(row, "stop", keep=k)). Returns [(row, new tokens)] of every
        row that committed or finished in this step (finish_reason set once finished)."""
        if self.policy == "adaptive" and not self.step_time:  # the first step, before any row is in use
            self.calibrate()
        t0 = time.perf_counter()
        if self.learner is not None:
            self.learner.swap(self.model)  # between steps: drafts of the old adapter stay exact (see learn.py)
        out = self._admit()
        self._prefill()
        ready = [r for r in self.slots if r is not None and r.ready]
        if ready:
            for row, new in zip(ready, self._forward(ready)):
                self._output(row, new, on_commit)
                out.append((row, new))
        self.counters["step_seconds"] += time.perf_counter() - t0
        return out

    def _admit(self):
        """Cancelled rows leave, free slots go to the queue's oldest; [(row, [])] of the cancelled."""
        gone = [r for r in self.rows() if r.cancelled]
        for row in gone:
            self.finish(row, "cancelled")
        for i, row in enumerate(self.slots):
            if row is None and self.queue:
                row = self.slots[i] = self.queue.popleft()
                row.slot = i
                self.cache.reset([i])  # forget the slot's previous request
                self.prefilling.append(row)
                self.counters["prompt_tokens"] += row.prompt_tokens
        return [(r, []) for r in gone]

    def _prefill(self):
        """Prompts into the cache, oldest admission first, at most prefill_budget tokens in all; a row
        whose prompt is in (all but its last token, which the first forward reads) is ready."""
        budget = self.prefill_budget
        for row in list(self.prefilling):
            left = row.prompt_tokens - 1 - row.req.prefilled
            n = min(left, budget)
            if n > 0:
                isd.prefill(self.model, self.cache, [row.slot], [row.req], chunk=n)
                budget -= n
                self.counters["prefill_tokens"] += n
            if n == left:
                row.ready = True
                self.prefilling.remove(row)

    def _forward(self, ready):
        """ONE forward for all ready rows (isd.isd_step) in the mode choose_mode picks; the tokens each row
        committed. The step's time and acceptance update what the policy knows."""
        reqs = [r.req for r in ready]
        mode = self.choose_mode(reqs)
        stride, narrow = (1, False) if mode == "ar" else (self.stride, mode == "narrow")
        before = [(r.stats.drafts_verified, r.stats.acceptance_sum) for r in reqs]
        t0 = time.perf_counter()
        committed = isd.isd_step(self.model, self.cache, [r.slot for r in ready], reqs, stride, narrow)
        self.measured(mode, len(ready), time.perf_counter() - t0)
        drafts = sum(r.stats.drafts_verified - d for r, (d, _) in zip(reqs, before))
        if drafts:
            accepted = sum(r.stats.acceptance_sum - a for r, (_, a) in zip(reqs, before))
            self.alpha = 0.9 * self.alpha + 0.1 * accepted / drafts
        self.counters["steps"] += 1
        self.counters[f"steps_{mode}"] += 1
        self.last_step[mode] = self.counters["steps"]
        self.counters["row_forwards"] += len(ready)
        return committed

    def _output(self, row, new, on_commit):
        """Count the committed tokens, let the caller see them, finish at a stop id or max_tokens."""
        req = row.req
        self.counters["completion_tokens"] += len(new)
        self._timestamps(row, len(new))
        if on_commit is not None:
            on_commit(row, new)
        if row.finish_reason is None and req.done:
            self.finish(row, "stop" if req.out[-1] in req.params.stop_ids else "length")

    def _timestamps(self, row, n):
        """The latencies of a step that committed n tokens: the time to the first token (the first step),
        or the time since the previous commit, shared by the n tokens (observed n times)."""
        now = time.perf_counter()
        if row.first_token_at is None:
            row.first_token_at = now
            self.histograms["time_to_first_token_seconds"].observe(now - row.submitted)
        else:
            self.histograms["inter_token_latency_seconds"].observe((now - row.last_token_at) / n, n)
        row.last_token_at = now

    def finish(self, row, reason, keep=None):
        """End `row` now (between steps, or from on_commit) with `reason` (REASONS) and free its slot.
        keep: end its output at its first `keep` tokens, e.g. at the token that completed a stop string (the
        usage counts the tokens up to it, not the rest of the step). A no-op once it has finished."""
        if row.finish_reason is not None:
            return
        req = row.req
        if keep is not None:
            self.counters["completion_tokens"] -= len(req.out) - keep
            del req.out[keep:]
            if req.logprobs is not None:
                del req.logprobs[keep:]
        row.finish_reason = reason
        if row in self.queue:
            self.queue.remove(row)
        if row.slot is not None:
            self.slots[row.slot] = None
            row.slot = None
        if row in self.prefilling:
            self.prefilling.remove(row)
        st = req.stats
        row.finished_at = time.perf_counter()
        st.wall_s = row.finished_at - row.submitted
        if reason in ("stop", "length"):
            self.histograms["e2e_request_latency_seconds"].observe(st.wall_s)
            if self.learner is not None:
                self.learner.observe(req)
        self.counters[f"requests_{reason}"] += 1
        self.counters["drafts_verified"] += st.drafts_verified
        self.counters["acceptance_sum"] += st.acceptance_sum
