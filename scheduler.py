"""Stationary-batch scheduling (docs/method.md section 6): many requests decode together in one resident
batch, each exactly as it would alone.

    sched = Scheduler(model, enc, stride=4, max_batch=16).start()
    params = SamplingParams(50, temperature=0.8, seed=1, stop_ids=sched.stop_ids)  # decoding.SamplingParams
    job = sched.submit(enc.encode_ordinary("ROMEO:"), params)
    print(job.result())  # or give submit a listener to receive the text as it is committed
    sched.stop()

One KV cache of `max_batch` rows (slots) stays allocated. Each step of the background thread:
  1. moves new requests from a thread-safe inbox to a FIFO queue and drops cancelled requests;
  2. gives free slots to queued requests and prefills their prompts, at most `prefill_budget`
     prompt tokens per step in all (a long prompt takes several steps, running rows keep stepping);
  3. chooses how this step decodes (choose_mode): the wide ISD window (W = N*N tokens per row), the
     narrow one (2N-1) or a plain AR step (1 token), the mode with the most committed tokens per second
     for the batch, from the step times it measures and each request's running acceptance (--policy=fixed:
     always the wide, or --narrow, window);
  4. runs ONE forward for every row whose prompt is in: isd.isd_step in that mode, each row with its own
     cache length, rollback, settings and random stream;
  5. turns the committed tokens into text, cuts it at the first stop string, streams it out, and
     frees the slot of every finished request (EOS, a stop string, max_tokens, or cancel()).
Requests join and leave only between steps. Every mode is exact (each committed token follows the model's
own AR distribution), so greedy text is the model's greedy text whatever the mode; a seeded sampled
request gives the same text whatever else runs only under --policy=fixed and without a learner, since
the adaptive policy changes the window with the load, and a learner (learn.py) the drafts' q with time,
and with them which random numbers make the text.
"""
import codecs
import queue
import threading
import time
import traceback
from collections import deque

import torch

import isd
import tokenizer as tok
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


class Job:
    """One request in the scheduler: the isd.Request that decodes it, its text and its stream."""

    def __init__(self, req, stop, listener):
        self.req = req
        self.stop = list(stop)
        self.listener = listener  # listener(text_delta, finish_reason or None), on the scheduler thread
        self.text = ""  # the output so far, cut at the first stop string; EOS is not shown
        self.sent = 0  # characters of text already handed to the listener
        self.finish_reason = None  # one of REASONS once finished
        self.cancelled = False
        self.finished = threading.Event()
        self.slot = None
        self.ready = False  # prompt prefilled: the row decodes
        self.submitted = time.perf_counter()
        self.first_token_at = self.last_token_at = self.finished_at = None  # perf_counter() times
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")  # holds back split characters

    @property
    def prompt_tokens(self):
        return len(self.req.prompt)

    @property
    def completion_tokens(self):
        return len(self.req.out)

    def result(self, timeout=None):
        """Wait until the request has finished; its text."""
        if not self.finished.wait(timeout):
            raise TimeoutError(f"request not finished after {timeout} s")
        return self.text


def held_back(text, stops):
    """Length of the longest end of `text` that could still grow into a stop string."""
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


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
    def __init__(self, model, enc, stride=4, max_batch=16, prefill_budget=256, narrow=False, policy="adaptive",
                 learner=None):
        for name, v in (("stride", stride), ("max_batch", max_batch), ("prefill_budget", prefill_budget)):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if policy not in ("adaptive", "fixed"):
            raise ValueError(f"policy must be adaptive or fixed, got {policy!r}")
        self.model, self.enc, self.stride, self.narrow = model.eval(), enc, stride, narrow
        self.policy = "fixed" if stride == 1 else policy  # stride 1 is AR: nothing to choose
        self.step_time = {}  # (mode, rows) -> seconds of an isd_step, measured (calibrate, then a running mean)
        self.alpha = 0.5  # running acceptance of all drafts: the prior of a request with few of its own
        self.last_step = {}  # mode -> the step it last ran (a mode left unused for EXPLORE steps runs again)
        self.probe = None  # an explored ISD mode, for the step that verifies its drafts
        self.stop_ids = tuple(tok.stop_ids(enc))  # end of text, and <|im_end|> for a chat model
        self.prefill_budget = prefill_budget
        self.learner = learner  # learn.Learner: finished requests go to it, its new adapters come in between steps
        # a row holds the context plus one window; older tokens leave the cache (KVCache.make_room)
        self.cache = model.new_cache(max_batch, model.cfg.max_seq_len + isd.window_size(stride) + prefill_budget)
        self.slots = [None] * max_batch
        self.queue = deque()  # FIFO of jobs waiting for a slot
        self.prefilling = []  # jobs in a slot whose prompt is not all in the cache, oldest first
        self.inbox = queue.Queue()  # submit() -> scheduler thread
        self.closed = False
        self.counters = dict.fromkeys(["prompt_tokens", "prefill_tokens", "completion_tokens", "steps",
                                       "row_forwards", "drafts_verified", "acceptance_sum", "step_seconds"]
                                      + [f"requests_{r}" for r in REASONS] + [f"steps_{m}" for m in MODES], 0)
        self.histograms = {name: Histogram(bounds) for name, bounds in LATENCIES.items()}
        self.thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)

    def start(self):
        if self.learner is not None:
            self.learner.start()
        self.thread.start()
        return self

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def submit(self, prompt, params, stop=(), listener=None, logit_bias=None, logprobs=None):
        """Queue a request (prompt: token ids, sampled as `params` says: decoding.SamplingParams; with
        stop_ids=self.stop_ids it ends at the end of text) and return its Job. A bad setting raises SettingError
        here, never in the scheduler thread. stop: strings that end the text; logit_bias: {token id: value}
        added to the logits; logprobs: None, or k to record each committed token's log p and top k
        (isd.Request.logprobs)."""
        if self.closed:
            raise RuntimeError("the scheduler is shutting down")
        if any(not isinstance(s, str) or not s for s in stop):
            raise SettingError("stop", "stop strings must be non-empty strings")
        for param, ids in (("prompt", prompt), ("logit_bias", logit_bias or ())):
            bad = [t for t in ids if not 0 <= t < self.model.cfg.vocab_size or t == self.model.cfg.mask_token_id]
            if bad:
                raise SettingError(param, f"{param}: {bad[0]} is not a token id of the model")
        req = isd.Request(list(prompt), params, logit_bias=dict(logit_bias or {}) or None,
                          logprobs=None if logprobs is None else [], top_logprobs=logprobs or 0,
                          trace=None if self.learner is None else [])
        job = Job(req, stop, listener)
        self.inbox.put(job)
        return job

    def cancel(self, job):
        """Finish `job` at the next step boundary and free its slot (a no-op once it has finished)."""
        job.cancelled = True  # the loop is busy while the job is queued or running: no wake-up needed

    def stop(self):
        """Stop admitting, cancel whatever is queued or running, and end the thread."""
        self.closed = True
        self.inbox.put(None)
        if self.thread.is_alive():
            self.thread.join()
        if self.learner is not None:
            self.learner.stop()

    def metrics(self):
        """Counters and gauges for /metrics (read from any thread)."""
        c = dict(self.counters)
        c["queue_length"] = len(self.queue) + self.inbox.qsize()
        c["busy_slots"] = sum(j is not None for j in self.slots)
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
    # the scheduler thread

    def _loop(self):
        if self.policy == "adaptive" and not self.step_time:  # before the first request, not during it
            self.calibrate()
        while True:
            if not self.closed and not self.queue and not any(self.slots):
                job = self.inbox.get()  # idle: sleep until something arrives
                if job is not None:
                    self.queue.append(job)
            if self.closed:
                self._take_inbox()
                for job in list(self.queue) + [j for j in self.slots if j is not None]:
                    self._finish(job, "cancelled")
                self.queue.clear()
                return
            try:
                self.step()
            except Exception:  # a bug must not take the server down: fail the running requests
                traceback.print_exc()
                for job in self.slots:
                    if job is not None:
                        self._finish(job, "error")

    def _take_inbox(self):
        while True:
            try:
                job = self.inbox.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                self.queue.append(job)

    @torch.no_grad()
    def step(self):
        """One step: admit, prefill under the budget, one ISD forward for the ready rows, output."""
        if self.policy == "adaptive" and not self.step_time:  # the first step, before any row is in use
            self.calibrate()
        t0 = time.perf_counter()
        if self.learner is not None:
            self.learner.swap(self.model)  # between steps: drafts of the old adapter stay exact (see learn.py)
        self._admit()
        self._prefill()
        ready = [j for j in self.slots if j is not None and j.ready]
        if ready:
            for job, new in zip(ready, self._forward(ready)):
                self._output(job, new)
        self.counters["step_seconds"] += time.perf_counter() - t0

    def _admit(self):
        """New requests join the queue, cancelled ones leave, free slots go to the queue's oldest."""
        self._take_inbox()
        for job in [j for j in self.queue if j.cancelled]:
            self.queue.remove(job)
            self._finish(job, "cancelled")
        for job in self.slots:
            if job is not None and job.cancelled:
                self._finish(job, "cancelled")
        for i, job in enumerate(self.slots):
            if job is None and self.queue:
                job = self.slots[i] = self.queue.popleft()
                job.slot = i
                self.cache.reset([i])  # forget the slot's previous request
                self.prefilling.append(job)
                self.counters["prompt_tokens"] += job.prompt_tokens

    def _prefill(self):
        """Prompts into the cache, oldest admission first, at most prefill_budget tokens in all; a job
        whose prompt is in (all but its last token, which the first forward reads) is ready."""
        budget = self.prefill_budget
        for job in list(self.prefilling):
            left = job.prompt_tokens - 1 - job.req.prefilled
            n = min(left, budget)
            if n > 0:
                isd.prefill(self.model, self.cache, [job.slot], [job.req], chunk=n)
                budget -= n
                self.counters["prefill_tokens"] += n
            if n == left:
                job.ready = True
                self.prefilling.remove(job)

    def _forward(self, ready):
        """ONE forward for all ready rows (isd.isd_step) in the mode choose_mode picks; the tokens each row
        committed. The step's time and acceptance update what the policy knows."""
        reqs = [j.req for j in ready]
        mode = self.choose_mode(reqs)
        stride, narrow = (1, False) if mode == "ar" else (self.stride, mode == "narrow")
        before = [(r.stats.drafts_verified, r.stats.acceptance_sum) for r in reqs]
        t0 = time.perf_counter()
        committed = isd.isd_step(self.model, self.cache, [j.slot for j in ready], reqs, stride, narrow)
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

    def _output(self, job, new):
        """Append the committed tokens to the text; finish at EOS, a stop string or max_tokens."""
        req = job.req
        self.counters["completion_tokens"] += len(new)
        self._timestamps(job, len(new))
        ids = [t for t in new if t not in self.stop_ids]  # never text, also when they do not stop (ignore_eos)
        job.text += job._utf8.decode(self.enc.decode_bytes(ids), final=req.done)
        hits = [i for i in (job.text.find(s) for s in job.stop) if i >= 0]
        if hits:
            job.text = job.text[:min(hits)]
            # usage counts the tokens up to the one that completed the stop string, not the rest of the step
            k = next((k for k in range(len(req.out) - len(new) + 1, len(req.out)) if any(
                s in self.enc.decode([t for t in req.out[:k] if t not in self.stop_ids], errors="replace")
                for s in job.stop)), len(req.out))
            self.counters["completion_tokens"] -= len(req.out) - k
            del req.out[k:]
            if req.logprobs is not None:
                del req.logprobs[k:]
            self._finish(job, "stop")
        elif req.done:
            self._finish(job, "stop" if req.out[-1] in req.params.stop_ids else "length")
        else:
            self._send(job, len(job.text) - held_back(job.text, job.stop))

    def _timestamps(self, job, n):
        """The latencies of a step that committed n tokens: the time to the first token (the first step),
        or the time since the previous commit, shared by the n tokens (observed n times)."""
        now = time.perf_counter()
        if job.first_token_at is None:
            job.first_token_at = now
            self.histograms["time_to_first_token_seconds"].observe(now - job.submitted)
        else:
            self.histograms["inter_token_latency_seconds"].observe((now - job.last_token_at) / n, n)
        job.last_token_at = now

    def _send(self, job, upto):
        delta = job.text[job.sent:upto]
        job.sent = max(job.sent, upto)
        if job.listener is not None and (delta or job.finish_reason):
            try:
                job.listener(delta, job.finish_reason)
            except Exception:  # e.g. the client's event loop is gone
                job.cancelled = True

    def _finish(self, job, reason):
        job.finish_reason = reason
        if job.slot is not None:
            self.slots[job.slot] = None
            job.slot = None
        if job in self.prefilling:
            self.prefilling.remove(job)
        st = job.req.stats
        job.finished_at = time.perf_counter()
        st.wall_s = job.finished_at - job.submitted
        if reason in ("stop", "length"):
            self.histograms["e2e_request_latency_seconds"].observe(st.wall_s)
            if self.learner is not None:
                self.learner.observe(job.req)
        self.counters[f"requests_{reason}"] += 1
        self.counters["drafts_verified"] += st.drafts_verified
        self.counters["acceptance_sum"] += st.acceptance_sum
        self._send(job, len(job.text) if reason in ("stop", "length") else job.sent)
        job.finished.set()
