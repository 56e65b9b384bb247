"""An OpenAI-compatible HTTP server over the stationary-batch scheduler (scheduler.py, run in a thread with
its tokens turned into text by Engine).

    python serve.py --out_dir=out --stride=4 --max_batch=16 --host=127.0.0.1 --port=8000 [--api_key=KEY]

Endpoints: POST /v1/completions and POST /v1/chat/completions ("stream": true gives server-sent
events), GET /v1/models, GET /v1/models/{id}, GET /health, GET /metrics (Prometheus text: counters,
gauges, latency histograms). Any OpenAI client works:

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
    client.completions.create(model="out", prompt="ROMEO:", max_tokens=50, temperature=0.8, seed=1)

The model's name is the checkpoint folder's name. openai_api.py reads the requests (every parameter
takes effect or gets a 400 naming it) and writes the responses. Sampling is exact ISD: at temperature 0
the text is the model's greedy continuation, and a request with a seed gives the same text whatever else
runs (choice i of n uses seed + i) under --policy=fixed without --learn (otherwise a sample of the same
distribution: docs/serving.md).

With --learn the server learns its speculator from the requests it serves (learn.py): outputs stay the
base model's, only the tokens per forward move.

With --api_key (or IDLM_API_KEY) every /v1 endpoint wants "Authorization: Bearer KEY"; /health and
/metrics stay open. Each request logs one line on stderr (--no_access_log: none).
"""
import argparse
import asyncio
import bisect
import codecs
import hmac
import math
import os
import signal
import sys
import queue
import threading
import time
import traceback
from contextlib import asynccontextmanager

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

import checkpoint
import cli
import isd
import learn
import lora
import openai_api as api
import sample
import tokenizer as tok
from decoding import SettingError, Stats
from scheduler import MODES, REASONS, Scheduler

# ----------------------------------------------------------------------------------------------
# the engine: the scheduler (tokens, synchronous) in a thread of its own, and its tokens as text

class Job:
    """One request of the Engine: the scheduler's Row that decodes it, its text and its stream."""

    def __init__(self, row, stop, listener):
        self.row, self.req = row, row.req
        self.stop = list(stop)
        self.listener = listener  # listener(text_delta, finish_reason or None), on the engine's thread
        self.text = ""  # the output so far, cut at the first stop string; EOS is not shown
        self.sent = 0  # characters of text already handed to the listener
        self.finished = threading.Event()
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")  # holds back split characters

    @property
    def finish_reason(self):  # one of scheduler.REASONS once finished
        return self.row.finish_reason

    @property
    def prompt_tokens(self):
        return self.row.prompt_tokens

    @property
    def completion_tokens(self):
        return self.row.completion_tokens

    def result(self, timeout=None):
        """Wait until the request has finished; its text."""
        if not self.finished.wait(timeout):
            raise TimeoutError(f"request not finished after {timeout} s")
        return self.text


def held_back(text, stops):
    """Length of the longest end of `text` that could still grow into a stop string."""
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


class Engine:
    """The server's decoding loop: a thread steps the Scheduler while it has work, sleeps on an inbox
    otherwise (submit() is called from any thread, the scheduler from this one only), and turns each step's
    tokens into text: incremental UTF-8, cut at the first stop string, streamed to each job's listener.

        engine = Engine(Scheduler(model, stride=4, max_batch=16), enc).start()
        job = engine.submit(enc.encode_ordinary("ROMEO:"), SamplingParams(50, stop_ids=engine.stop_ids))
        print(job.result())  # or give submit a listener to receive the text as it is committed
        engine.stop()
    """

    def __init__(self, sched, enc):
        self.sched, self.enc = sched, enc
        self.stop_ids = tuple(tok.stop_ids(enc))  # end of text, and <|im_end|> for a chat model
        self.inbox = queue.Queue()  # submit() -> the engine's thread
        self.jobs = {}  # row -> job, of the rows in the scheduler (the engine's thread only)
        self.closed = False
        self.thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)

    def start(self):
        if self.sched.learner is not None:
            self.sched.learner.start()
        self.thread.start()
        return self

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def submit(self, prompt, params, stop=(), listener=None, logit_bias=None, logprobs=None):
        """Queue a request (Scheduler.request says what prompt, params, logit_bias and logprobs are) and return
        its Job. A bad setting raises SettingError here, never in the engine's thread. stop: strings that
        end the text."""
        if self.closed:
            raise RuntimeError("the scheduler is shutting down")
        if any(not isinstance(s, str) or not s for s in stop):
            raise SettingError("stop", "stop strings must be non-empty strings")
        job = Job(self.sched.request(prompt, params, logit_bias, logprobs), stop, listener)
        self.inbox.put(job)
        return job

    def cancel(self, job):
        """Finish `job` at the next step boundary (a no-op once it has finished)."""
        self.sched.cancel(job.row)  # the loop is busy while the job is queued or running: no wake-up needed

    def stop(self):
        """Stop admitting, cancel whatever is queued or running, and end the thread."""
        self.closed = True
        self.inbox.put(None)
        if self.thread.is_alive():
            self.thread.join()
        if self.sched.learner is not None:
            self.sched.learner.stop()

    def metrics(self):
        """The scheduler's counters and gauges, the inbox counted in the queue (read from any thread)."""
        m = self.sched.metrics()
        m["queue_length"] += self.inbox.qsize()
        return m

    def _loop(self):
        s = self.sched
        if s.policy == "adaptive" and not s.step_time:  # before the first request, not during it
            s.calibrate()
        while True:
            self._take_inbox(wait=not self.closed and not s.busy)
            if self.closed:
                self._end(s.rows(), "cancelled")
                return
            try:
                for row, _ in s.step(self._commit):
                    job = self.jobs[row]
                    if row.finish_reason is None:
                        self._send(job, len(job.text) - held_back(job.text, job.stop))
                    else:
                        self._finished(job)
            except Exception:  # a bug must not take the server down: fail the running requests
                traceback.print_exc()
                self._end([r for r in list(self.jobs) if r.slot is not None or r.finish_reason], "error")

    def _take_inbox(self, wait):
        """The submitted jobs into the scheduler; wait (idle): sleep until something arrives."""
        while True:
            try:
                job = self.inbox.get(block=wait)
            except queue.Empty:
                return
            wait = False
            if job is not None:
                self.jobs[job.row] = job
                self.sched.add(job.row)

    def _commit(self, row, new):
        """The scheduler's on_commit: the committed tokens into the text; at the first stop string, cut it
        and end the row at the token that completed it."""
        job, req = self.jobs[row], row.req
        ids = [t for t in new if t not in self.stop_ids]  # never text, also when they do not stop (ignore_eos)
        job.text += job._utf8.decode(self.enc.decode_bytes(ids), final=req.done)
        hits = [i for i in (job.text.find(s) for s in job.stop) if i >= 0]
        if hits:
            job.text = job.text[:min(hits)]
            k = next((k for k in range(len(req.out) - len(new) + 1, len(req.out)) if any(
                s in self.enc.decode([t for t in req.out[:k] if t not in self.stop_ids], errors="replace")
                for s in job.stop)), len(req.out))
            self.sched.finish(row, "stop", keep=k)

    def _end(self, rows, reason):
        for row in rows:
            self.sched.finish(row, reason)
            self._finished(self.jobs[row])

    def _send(self, job, upto):
        delta = job.text[job.sent:upto]
        job.sent = max(job.sent, upto)
        if job.listener is not None and (delta or job.finish_reason):
            try:
                job.listener(delta, job.finish_reason)
            except Exception:  # e.g. the client's event loop is gone
                self.cancel(job)

    def _finished(self, job):
        """The rest of a finished job's text (none if it did not end well) to its listener; wake result()."""
        del self.jobs[job.row]
        self._send(job, len(job.text) if job.finish_reason in ("stop", "length") else job.sent)
        job.finished.set()


# ----------------------------------------------------------------------------------------------
# the endpoints: module-level handlers; the app's state holds the engine and the served model (api.Served)

async def health():
    return {"status": "ok"}


async def models(request: Request):
    return {"object": "list", "data": [await model(request.app.state.served.name, request)]}


async def model(model_id: str, request: Request):
    s = request.app.state
    if model_id != s.served.name:
        raise api.no_such_model(model_id, s.served.name)
    return {"id": model_id, "object": "model", "created": s.created, "owned_by": "idlm"}


async def metrics(request: Request):
    engine = request.app.state.engine
    learner = engine.sched.learner
    learned = learner.metrics() if learner is not None else None
    return PlainTextResponse(metrics_text(engine.metrics(), engine.sched.histograms, learned),
                             media_type="text/plain; version=0.0.4")


async def completions(body: api.CompletionRequest, request: Request):
    return await generate(request, body)


async def chat(body: api.ChatRequest, request: Request):
    return await generate(request, body)


async def error(request, e):
    """Every error in OpenAI's shape: ours (ApiError), a body the request models refuse, an HTTP error
    (404, 405), a bug (500)."""
    if isinstance(e, RequestValidationError):
        e = api.ApiError(400, *api.validation_message(e.errors()[0]))
    elif isinstance(e, HTTPException):
        e = api.ApiError(e.status_code, f"{e.detail}: {request.method} {request.url.path}")
    elif not isinstance(e, api.ApiError):
        e = api.ApiError(500, f"internal error: {type(e).__name__}: {e}")
    return JSONResponse(e.json(), e.status)


class Choice:
    """One choice of a response: its Engine job (None when it only echoes its prompt), the prompt text
    it echoes ("" without echo), and where each committed token's text starts, for logprobs."""

    def __init__(self, index, ids, echo, served):
        self.index, self.ids, self.echo, self.job = index, ids, echo, None
        self.submitted = threading.Event()  # set once self.job is assigned (its listener may run before)
        self.prompt_items = None  # with echo and logprobs: the logprob items of the prompt's tokens
        self.offsets = api.TextOffsets(served)  # of the completion's tokens
        self.logprobs_sent = 0  # committed tokens whose logprobs have been reported

    def new_items(self, upto_char=None):
        """Logprob items of the committed tokens not reported yet whose text starts before `upto_char` of
        the completion (None: all of them); offsets are counted from the echoed prompt's start."""
        out, lps = self.job.req.out, self.job.req.logprobs
        offsets = self.offsets.of(out)
        upto = len(out) if upto_char is None else bisect.bisect_left(offsets, upto_char, hi=len(out))
        items = [(out[t], *lps[t], len(self.echo) + offsets[t]) for t in range(self.logprobs_sent, upto)]
        self.logprobs_sent = upto
        return items


def usage(choices):
    """Prompt tokens once per prompt (its n choices share it), completion tokens summed over choices."""
    prompts = {id(c.ids): len(c.ids) for c in choices}
    completion = sum(c.job.completion_tokens for c in choices if c.job)
    return {"prompt_tokens": sum(prompts.values()), "completion_tokens": completion,
            "total_tokens": sum(prompts.values()) + completion}


async def generate(request, body):
    """Both endpoints: one choice per prompt and per n (each its own request in the scheduler, choice i of n
    with seed + i), then stream chunks or wait for the final body."""
    s = request.app.state
    prompts, stops, bias, logprobs = api.inputs(body, s.served)
    loop, events = asyncio.get_running_loop(), asyncio.Queue()  # (choice index, delta, reason, logprob items)
    choices = []
    request.state.choices = choices  # for the access log
    try:
        for ids, echo, length in prompts:
            for i in range(body.n or 1):
                c = Choice(len(choices), ids, echo, s.served)
                if length:  # 0: echo only
                    c.job = s.engine.submit(ids, api.sampling(body, length, i, s.engine.stop_ids), stops,
                                            listener(c, loop, events, body.stream, logprobs), bias, logprobs)
                    c.submitted.set()
                choices.append(c)
    except (SettingError, RuntimeError) as e:  # a bad setting; shutting down
        cancel(s.engine, choices)
        raise api.ApiError(400, str(e), e.param) if isinstance(e, SettingError) else api.ApiError(503, str(e))
    if getattr(body, "echo", False) and logprobs is not None:  # one plain forward of each prompt, off the event loop
        scored = {}
        for c in choices:
            if id(c.ids) not in scored:
                lps = await asyncio.to_thread(isd.prompt_logprobs, s.engine.sched.model, c.ids, logprobs)
                scored[id(c.ids)] = api.prompt_items(s.served, c.ids, lps)
            c.prompt_items = scored[id(c.ids)]
    r = api.Response(body, s.served)
    if body.stream:
        return StreamingResponse(stream_chunks(s.engine, choices, events, r), media_type="text/event-stream")
    await wait(request, s.engine, choices, events)
    return final_body(choices, r, logprobs)


def listener(c, loop, events, stream, logprobs):
    """The engine's listener of choice c (called on the engine's thread, while the request's tokens
    hold still): a streamed choice gets its text deltas with the logprobs of the tokens they start."""
    def listen(delta, reason):
        items = None
        if stream and logprobs is not None:
            c.submitted.wait()  # the engine may commit tokens before submit() has returned the job
            items = c.new_items(None if reason else c.job.sent)
        if stream or reason:  # a non-streamed request only needs the end
            loop.call_soon_threadsafe(events.put_nowait, (c.index, delta, reason, items))
    return listen


def cancel(engine, choices):
    for c in choices:
        if c.job is not None and c.job.finish_reason is None:
            engine.cancel(c.job)


async def stream_chunks(engine, choices, events, r):
    """The events of a streamed request (api.Response r): per choice (each chunk names its index) the echoed
    prompt, its text as it is committed with the logprobs asked for, its finish reason; then the usage if
    asked (r.stream_usage "every": the usage so far in each text chunk too), [DONE]. The requests are
    cancelled if the client goes away."""
    try:
        for c in choices:  # chat: the role first, as OpenAI does; completions: the echoed prompt
            if r.chat:
                yield r.role(c.index)
            elif c.echo or c.prompt_items is not None:
                yield r.chunk(r.choice(c.index, c.echo, None, c.prompt_items))
            if c.job is None:
                yield r.chunk(r.choice(c.index, "", "length"))
        left = sum(c.job is not None for c in choices)
        while left:
            index, delta, reason, items = await events.get()
            if reason in ("cancelled", "error"):
                yield api.sse(api.request_failed(reason, code=reason).json())
                break
            if delta or items:
                more = {"usage": usage(choices)} if r.stream_usage == "every" else {}
                yield r.chunk(r.choice(index, delta, None, items), **more)
            if reason:
                yield r.chunk(r.choice(index, "", reason))
                left -= 1
        else:
            if r.stream_usage:
                yield r.chunk(usage=usage(choices))
        yield "data: [DONE]\n\n"
    finally:  # also when the client went away mid-stream
        cancel(engine, choices)


async def wait(request, engine, choices, events):
    """Until every choice has finished; cancel them all if the client goes away."""
    jobs = [c.job for c in choices if c.job is not None]
    try:
        left = len(jobs)
        while left:
            try:
                if (await asyncio.wait_for(events.get(), 1.0))[2]:
                    left -= 1
            except asyncio.TimeoutError:
                if all(j.finished.is_set() for j in jobs):
                    return
                if await request.is_disconnected():
                    cancel(engine, choices)
    finally:
        cancel(engine, choices)


def final_body(choices, r, logprobs):
    """The response of finished, non-streamed requests (an ApiError if one was cancelled or failed)."""
    out = []
    for c in choices:
        reason = c.job.finish_reason if c.job else "length"
        if reason in ("cancelled", "error"):
            raise api.request_failed(reason)
        items = None if logprobs is None else (c.prompt_items or []) + (c.new_items() if c.job else [])
        out.append(r.choice(c.index, c.echo + (c.job.text if c.job else ""), reason, items, streamed=False))
    stats = sum((c.job.req.stats for c in choices if c.job), Stats())
    return r.body(out, usage(choices), stats)


class Gate:
    """ASGI middleware around the app: the API key on /v1 (401 without it), and one access-log line
    per request on stderr (method, path, status, latency, prompt and completion tokens), written when
    the response has been sent in full (a stream: at its end)."""

    def __init__(self, app, api_key=None, access_log=True):
        self.app, self.api_key, self.access_log = app, api_key, access_log

    def authorized(self, scope):
        headers = dict(scope["headers"])
        given = headers.get(b"authorization", b"").decode("latin-1")
        return hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status, state = time.perf_counter(), [500], scope.setdefault("state", {})

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
        try:
            if self.api_key and scope["path"].split("/")[1] == "v1" and not self.authorized(scope):
                e = api.ApiError(401, "invalid or missing API key: send the header 'Authorization: Bearer <key>' "
                                      "with the server's --api_key", None, "invalid_api_key")
                await JSONResponse(e.json(), e.status)(scope, receive, sending)
            else:
                await self.app(scope, receive, sending)
        finally:
            if self.access_log:
                u = usage(state["choices"]) if state.get("choices") else None
                tokens = f" prompt_tokens={u['prompt_tokens']} completion_tokens={u['completion_tokens']}" if u else ""
                print(f"access: {scope['method']} {scope['path']} {status[0]} "
                      f"{1000 * (time.perf_counter() - t0):.1f}ms{tokens}", file=sys.stderr, flush=True)


def make_app(engine, enc, model_name, api_key=None, access_log=True):
    """The FastAPI app serving `engine` (started; stopped when the app shuts down), behind Gate."""
    @asynccontextmanager
    async def lifespan(app):
        yield
        engine.stop()  # after uvicorn's graceful shutdown: cancel what is still running

    app = FastAPI(title="idlm", lifespan=lifespan)
    cfg = engine.sched.model.cfg
    app.state.engine, app.state.created = engine, int(time.time())
    app.state.served = api.Served(model_name, enc, cfg.max_seq_len, cfg.mask_token_id, engine.stop_ids)
    for kind in (api.ApiError, RequestValidationError, HTTPException, Exception):
        app.add_exception_handler(kind, error)
    app.get("/health")(health)
    app.get("/v1/models")(models)
    app.get("/v1/models/{model_id:path}")(model)
    app.get("/metrics")(metrics)
    app.post("/v1/completions")(completions)
    app.post("/v1/chat/completions")(chat)
    app.add_middleware(Gate, api_key=api_key, access_log=access_log)
    return app


METRICS = [  # name, type, help, key in Engine.metrics()
    ("idlm_prompt_tokens_total", "counter", "Prompt tokens of admitted requests.", "prompt_tokens"),
    ("idlm_prefill_tokens_total", "counter", "Prompt tokens put into the KV cache (budgeted per step).", "prefill_tokens"),
    ("idlm_completion_tokens_total", "counter", "Tokens committed by decoding.", "completion_tokens"),
    ("idlm_forwards_total", "counter", "Decoding forwards of the batch (steps).", "steps"),
    ("idlm_row_forwards_total", "counter", "Request rows summed over decoding forwards.", "row_forwards"),
    ("idlm_tokens_per_forward", "gauge", "TPF: committed tokens per request row per forward.", "tokens_per_forward"),
    ("idlm_acceptance_rate", "gauge", "Mean min(1, p(d)/q(d)) over verified drafts of finished requests.",
     "acceptance_rate"),
    ("idlm_queue_length", "gauge", "Requests waiting for a slot.", "queue_length"),
    ("idlm_busy_slots", "gauge", "Slots holding a request.", "busy_slots"),
    ("idlm_slots", "gauge", "Slots of the resident batch (max_batch).", "slots"),
    ("idlm_step_seconds_total", "counter", "Time spent in scheduler steps.", "step_seconds"),
]
LEARN_METRICS = [  # with --learn: name, type, help, key in learn.Learner.metrics()
    ("idlm_learn_steps_total", "counter", "Training steps of the learner.", "steps"),
    ("idlm_learn_examples_total", "counter", "Finished requests the learner took as examples.", "examples"),
    ("idlm_learn_examples_buffered", "gauge", "Examples in the learner's buffer.", "buffered"),
    ("idlm_learn_trained_tokens_total", "counter", "Target tokens trained on (with repeats).", "trained_tokens"),
    ("idlm_learn_swaps_total", "counter", "New adapters swapped into the serving model between steps.", "swaps"),
    ("idlm_learn_saves_total", "counter", "Adapters written to --learn_save.", "saves"),
    ("idlm_learn_seconds_total", "counter", "Time the learner spent training.", "seconds"),
    ("idlm_learn_loss", "gauge", "The learner's last training loss.", "loss"),
    ("idlm_learn_failed", "gauge", "1 if the learner stopped on an error (its traceback is in the log).", "failed"),
    ("idlm_recent_tokens_per_forward", "gauge", "TPF over the last 64 finished requests.", "recent_tokens_per_forward"),
    ("idlm_recent_acceptance_rate", "gauge", "Acceptance rate over the last 64 finished requests.",
     "recent_acceptance_rate"),
]
HISTOGRAMS = {  # Scheduler.histograms' names: help
    "time_to_first_token_seconds": "From submission to the request's first committed token.",
    "inter_token_latency_seconds": "Between a request's commits, per token (a forward's n tokens share its time).",
    "e2e_request_latency_seconds": "From submission to the end of requests that finished (stop or length).",
}


def metrics_text(m, histograms, learned=None):
    """Prometheus text exposition format (`learned`: the learner's metrics, with --learn)."""
    lines = ["# HELP idlm_requests_total Finished requests by finish reason.", "# TYPE idlm_requests_total counter"]
    lines += [f'idlm_requests_total{{finish_reason="{r}"}} {m[f"requests_{r}"]}' for r in REASONS]
    lines += ["# HELP idlm_steps_total Decoding steps by the mode the policy chose (wide, narrow window; ar: stride 1).",
              "# TYPE idlm_steps_total counter"]
    lines += [f'idlm_steps_total{{mode="{mode}"}} {m[f"steps_{mode}"]}' for mode in MODES]
    for values, table in ((m, METRICS), (learned, LEARN_METRICS if learned else [])):
        for name, kind, text, key in table:
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {values[key]}"]
    for key, text in HISTOGRAMS.items():
        h, name = histograms[key], f"idlm_{key}"
        lines += [f"# HELP {name} {text}", f"# TYPE {name} histogram"]
        lines += [f'{name}_bucket{{le="{"+Inf" if b == math.inf else f"{b:g}"}"}} {n}' for b, n in
                  zip(h.bounds, list(h.counts))]
        lines += [f"{name}_sum {h.sum}", f"{name}_count {h.count}"]
    return "\n".join(lines) + "\n"


def base_model(a, source):
    """The base model being served: a pretrained name, or the folder of the checkpoint under the adapter."""
    return a.init_from or (checkpoint.adapter_base(source) if checkpoint.has_adapter(source) else source)


def main(argv=None):
    # the options
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_model_options(p)
    p.add_argument("--stride", type=int, default=4, help="N: up to N tokens per forward; 1 = plain AR (default 4)")
    p.add_argument("--narrow", action="store_true", help="with --policy=fixed, the narrow window: 2N-1 tokens per row per "
                   "forward instead of N*N, a cold start after each rejection (cheaper forwards: see docs/serving.md)")
    p.add_argument("--policy", choices=["adaptive", "fixed"], default="adaptive",
                   help="adaptive: each step decodes with the wide window, the narrow one or a plain AR step, whichever "
                        "commits the most tokens per second (measured step times, each request's acceptance); fixed: "
                        "always the wide window (--narrow: the narrow one), so a seeded request gives the same text "
                        "whatever else runs (default adaptive)")
    p.add_argument("--max_batch", type=int, default=16, help="slots of the resident batch (default 16)")
    p.add_argument("--prefill_budget", type=int, default=256,
                   help="prompt tokens prefilled per step at most, so running requests keep going (default 256)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, mps (default cpu)")
    p.add_argument("--api_key", default=os.environ.get("IDLM_API_KEY") or None,
                   help="answer /v1 only to 'Authorization: Bearer KEY' (default: $IDLM_API_KEY, else open)")
    p.add_argument("--no_access_log", action="store_true", help="no access-log line per request on stderr")
    p.add_argument("--learn", action="store_true", help="learn the speculator from the traffic (learn.py): finished "
                   "requests train the gated adapter in a thread beside the scheduler (from a cold one if the model has "
                   "none); outputs stay the base model's, only speed moves. Halves torch's threads: the learner takes the rest")
    p.add_argument("--learn_share", type=float, default=None,
                   help=f"with --learn: the fraction of wall time the learner may train (default {learn.LearnConfig.share})")
    p.add_argument("--learn_save", metavar="DIR", help="with --learn: write the adapter to DIR now and then and at "
                   "shutdown (atomically); a server started with the same DIR continues from the adapter there")
    p.add_argument("--shutdown_timeout", type=float, default=10.0,
                   help="on SIGINT/SIGTERM, seconds to let running requests finish before cancelling them (default 10)")
    a = p.parse_args(argv)
    if (a.learn_save or a.learn_share is not None) and not a.learn:
        p.error("--learn_save and --learn_share go with --learn")

    # the model (with a learner if asked) and its scheduler
    try:
        source = cli.model_source(a)
        base, share = base_model(a, source), learn.LearnConfig.share if a.learn_share is None else a.learn_share
        learner_cfg = learn.LearnConfig(share=share) if a.learn else None
        if a.learn_save and checkpoint.has_adapter(a.learn_save):  # a restart continues from the learned adapter
            source = learn.resume_source(a.learn_save, base)
        model, enc = lora.load_model(source, device=a.device)
        learner, threads = None, sample.decode_threads(model)
        if a.learn:
            torch.set_num_threads(max(1, threads // 2))
            learner = learn.Learner(model, a.stride, learner_cfg, a.learn_save, base)
        sched = Scheduler(model, a.stride, a.max_batch, a.prefill_budget, a.narrow, a.policy, learner)
    except (FileNotFoundError, ValueError) as e:  # one line, e.g. no checkpoint: run python train.py first
        print(f"serve.py: error: {e}", file=sys.stderr)
        sys.exit(2)

    # the engine's thread and the HTTP server
    name = a.init_from or os.path.basename(os.path.normpath(os.path.abspath(a.out_dir)))
    engine = Engine(sched, enc).start()
    app = make_app(engine, enc, name, a.api_key, not a.no_access_log)
    server = uvicorn.Server(uvicorn.Config(app, host=a.host, port=a.port, log_level="warning",
                                           timeout_graceful_shutdown=a.shutdown_timeout))
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then raises the signal again: ignore it then
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    print(f"serving model '{name}' from {source} (stride {a.stride}, {sched.policy} policy"
          f"{', narrow window' if a.narrow and sched.policy == 'fixed' else ''}, {a.max_batch} slots"
          f"{', API key required' if a.api_key else ''}{', learning its speculator' if a.learn else ''}) on http://{a.host}:{a.port}/v1",
          file=sys.stderr, flush=True)
    server.run()
    engine.stop()
    print("server stopped", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
