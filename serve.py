"""An OpenAI-compatible HTTP server over the stationary-batch scheduler (scheduler.py, run in a thread with
its tokens turned into text by Engine).

    python serve.py --out_dir=out --stride=4 --max_batch=16 --host=127.0.0.1 --port=8000 [--api_key=KEY]

Endpoints: POST /v1/completions and POST /v1/chat/completions ("stream": true gives server-sent
events), GET /v1/models, GET /v1/models/{id}, GET /health, GET /metrics (Prometheus text: counters,
gauges, latency histograms). Any OpenAI client works:

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
    client.completions.create(model="out", prompt="ROMEO:", max_tokens=50, temperature=0.8, seed=1)

The model's name is the checkpoint folder's name. Every OpenAI parameter a request sends takes effect
or gets a 400 naming it (docs/serving.md, "OpenAI parameters"): n choices, prompts as lists of texts
or token ids, logprobs, echo, logit_bias are served; penalties, tools, best_of, suffix and the like
are refused; an unknown field is refused. Besides OpenAI's parameters, requests take "top_k" and
"ignore_eos" (with the openai client: extra_body={"top_k": 20}). Sampling is exact ISD: at
temperature 0 the text is the model's greedy continuation, and a request with a seed gives the same
text whatever else runs (choice i of n uses seed + i) under --policy=fixed without --learn (otherwise a
sample of the same distribution: docs/serving.md).

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
import json
import math
import os
import re
import signal
import sys
import queue
import threading
import time
import traceback
import uuid
from contextlib import asynccontextmanager
from typing import Any, Literal

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException

import checkpoint
import isd
import learn
import lora
import sample
import tokenizer as tok
from decoding import Stats
from decoding import SamplingParams, SettingError
from scheduler import MODES, REASONS, Scheduler

CHAT_STOP = "\n\n"  # a speech ends at a blank line (see chat_prompt)
MAX_N = 16  # choices per prompt
MAX_CHOICES = 256  # choices per request (prompts x n)
MAX_LOGPROBS = 20  # alternatives per token: completions' logprobs, chat's top_logprobs


class Strict(BaseModel):
    """Wrongly typed values are rejected, not converted; unknown fields are rejected."""
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(Strict):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None  # vLLM's: the usage so far in every chunk (guidellm sends it)
    include_obfuscation: bool | None = None


class Sampling(Strict):
    """The request fields both endpoints share. Fields typed Any are refused unless left at a value
    that asks for nothing (REFUSED)."""
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # not OpenAI's
    ignore_eos: bool | None = None  # not OpenAI's (vLLM's)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # metadata: accepted, no effect
    frequency_penalty: Any = None
    presence_penalty: Any = None


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = None
    logprobs: int | None = None
    best_of: Any = None
    suffix: Any = None


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict] | None  # required, may be null for OpenAI (then refused: see message_text)
    name: Any = None
    tool_calls: Any = None
    tool_call_id: Any = None
    function_call: Any = None
    refusal: Any = None
    audio: Any = None


class ChatRequest(Sampling):
    messages: list[Message]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    metadata: dict[str, str] | None = None  # metadata: accepted, no effect
    safety_identifier: str | None = None  # metadata: accepted, no effect
    prompt_cache_key: str | None = None  # a caching hint: accepted, no effect (no prompt cache)
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    parallel_tool_calls: Any = None
    response_format: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    service_tier: Any = None
    store: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None
    moderation: Any = None
    prompt_cache_retention: Any = None
    prompt_cache_options: Any = None
    verbosity: Any = None


PENALTY = ("is not supported (only 0): a penalty makes each token's distribution depend on the tokens "
           "sampled before it, so the drafts' q would have to condition on drafts not yet verified")
TOOLS = "is not supported: this model does not call tools or functions"
REFUSED = [  # (parameter, the values that ask for nothing, why any other value gets a 400)
    ("frequency_penalty", lambda v: not v, PENALTY),
    ("presence_penalty", lambda v: not v, PENALTY),
    ("best_of", lambda v: v in (None, 1), "is not supported (only 1): ask for n choices and rank them by their "
                                          "logprobs"),
    ("suffix", lambda v: not v, "is not supported: ISD writes left to right, it does not fill in"),
    ("tools", lambda v: not v, TOOLS),
    ("functions", lambda v: not v, TOOLS),
    ("tool_choice", lambda v: v in (None, "none"), TOOLS),
    ("function_call", lambda v: v in (None, "none"), TOOLS),
    ("parallel_tool_calls", lambda v: v is None, TOOLS),
    ("response_format", lambda v: v in (None, {"type": "text"}), "is not supported (only {\"type\": \"text\"}): "
                                                                 "no constrained decoding"),
    ("audio", lambda v: v is None, "is not supported: text only"),
    ("modalities", lambda v: v in (None, ["text"]), "is not supported (only [\"text\"]): text only"),
    ("prediction", lambda v: v is None, "is not supported: no predicted outputs"),
    ("service_tier", lambda v: v in (None, "auto", "default"), "is not supported (only auto / default): one tier"),
    ("store", lambda v: not v, "is not supported (only false): this server stores nothing"),
    ("reasoning_effort", lambda v: v in (None, "none"), "is not supported (only none): not a reasoning model"),
    ("web_search_options", lambda v: v is None, "is not supported: no web search"),
    ("moderation", lambda v: v is None, "is not supported: no moderation model"),
    ("prompt_cache_retention", lambda v: v is None, "is not supported: this server keeps no prompt cache"),
    ("prompt_cache_options", lambda v: v is None, "is not supported: this server keeps no prompt cache"),
    ("verbosity", lambda v: v in (None, "medium"), "is not supported (only medium, the default): the model's "
                                                   "length is not steerable"),
]


def chat_prompt(messages):
    """Our models have read plays, so a chat is laid out as one: a speech per message headed by its
    speaker ("USER." / "ASSISTANT."), a system message as a stage direction in brackets, then
    "ASSISTANT." for the model to speak. The reply ends at the first blank line (CHAT_STOP).
    `messages`: [(role, text)], a developer message counting as a system message."""
    parts = [f"[{text}]\n\n" if role == "system" else f"{role.upper()}.\n{text}\n\n" for role, text in messages]
    return "".join(parts) + "ASSISTANT.\n"


class ApiError(Exception):
    def __init__(self, status, message, param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_response(status, message, param=None, code=None):
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


def validation_message(err):
    """One line for pydantic's first complaint, naming the field."""
    if err["type"] == "json_invalid":
        return f"the body is not valid JSON ({err.get('ctx', {}).get('error', 'parse error')})", None
    # drop "body", and the member names pydantic adds for a union type (prompt: str | list[str])
    loc = [str(x) for x in err["loc"][1:] if not re.fullmatch(r"str|int|float|bool|(list|dict)\[.*\]", str(x))]
    field = ".".join(loc) or "body"
    if err["type"] == "missing":
        return f"missing required field '{field}'", field
    if err["type"] == "extra_forbidden":
        return f"unknown parameter '{field}'", field
    return f"'{field}': {err['msg']} (got {json.dumps(err.get('input'), default=repr)[:80]})", field


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
            if not self.closed and not s.busy:
                job = self.inbox.get()  # idle: sleep until something arrives
                if job is not None:
                    self._add(job)
            self._take_inbox()
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

    def _add(self, job):
        self.jobs[job.row] = job
        self.sched.add(job.row)

    def _take_inbox(self):
        while True:
            try:
                job = self.inbox.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                self._add(job)

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
# the endpoints: module-level handlers; the app's state holds the engine, tokenizer and model name

async def health():
    return {"status": "ok"}


def model_card(s):
    return {"id": s.model_name, "object": "model", "created": s.created, "owned_by": "idlm"}


async def models(request: Request):
    return {"object": "list", "data": [model_card(request.app.state)]}


async def model(model_id: str, request: Request):
    s = request.app.state
    if model_id != s.model_name:
        raise ApiError(404, f"model '{model_id}' does not exist; this server has '{s.model_name}'", "model",
                       "model_not_found")
    return model_card(s)


async def metrics(request: Request):
    engine = request.app.state.engine
    learner = engine.sched.learner
    learned = learner.metrics() if learner is not None else None
    return PlainTextResponse(metrics_text(engine.metrics(), engine.sched.histograms, learned),
                             media_type="text/plain; version=0.0.4")


async def completions(body: CompletionRequest, request: Request):
    s = request.app.state
    refuse_unsupported(s, body)
    if body.logprobs is not None and not 0 <= body.logprobs <= MAX_LOGPROBS:
        raise ApiError(400, f"'logprobs' must be in [0, {MAX_LOGPROBS}], got {body.logprobs}", "logprobs")
    prompts = [(ids, text if body.echo else "") for ids, text in completion_prompts(s, body.prompt)]
    return await generate(request, body, prompts, body.max_tokens, [], False, body.logprobs)


def completion_prompts(s, prompt):
    """[(token ids, text)] of a completion request's prompt(s): a text, texts, token ids, lists of ids.
    An empty text starts a new document (the end-of-text token)."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise ApiError(400, "'prompt' is an empty list", "prompt")
    out = []
    for p in prompt:
        if isinstance(p, str):
            out.append((s.enc.encode_ordinary(p) or [s.enc.eot_token], p))
            continue
        if not p:
            raise ApiError(400, "'prompt' holds an empty list of token ids", "prompt")
        out.append((p, tokens_text(s, p, "prompt")))
    return out


def tokens_text(s, ids, param):
    """The text of token ids sent by a client, each a token of the tokenizer (MASK is not); else ApiError."""
    mask = s.engine.sched.model.cfg.mask_token_id
    bad = [t for t in ids if not 0 <= t < s.enc.n_vocab or t == mask or not token_bytes(s.enc, t)]
    if bad:
        raise ApiError(400, f"'{param}': {bad[0]} is not a token id of the model", param)
    return s.enc.decode_bytes([t for t in ids if t not in s.engine.stop_ids]).decode("utf-8", "replace")


async def chat(body: ChatRequest, request: Request):
    s = request.app.state
    refuse_unsupported(s, body)
    if not body.messages:
        raise ApiError(400, "'messages' must hold at least one message", "messages")
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
    if body.top_logprobs is not None and not 0 <= body.top_logprobs <= MAX_LOGPROBS:
        raise ApiError(400, f"'top_logprobs' must be in [0, {MAX_LOGPROBS}], got {body.top_logprobs}", "top_logprobs")
    max_tokens = body.max_tokens if body.max_completion_tokens is None else body.max_completion_tokens
    messages = [message_text(m, i) for i, m in enumerate(body.messages)]
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    if tok.has_chat_template(s.enc):  # e.g. smollm2
        ids = tok.chat_ids(s.enc, [{"role": role, "content": text} for role, text in messages])
        return await generate(request, body, [(ids, "")], max_tokens, [], True, logprobs)
    ids = s.enc.encode_ordinary(chat_prompt(messages))
    stops = [] if body.ignore_eos else [CHAT_STOP]  # the blank line ends a reply as EOS does: ignored alike
    return await generate(request, body, [(ids, "")], max_tokens, stops, True, logprobs)


def message_text(m, i):
    """(role, text) of message i: its content, or its text parts concatenated; ApiError for what a
    text-only model without tools cannot take."""
    for field in ("name", "tool_calls", "tool_call_id", "function_call", "refusal", "audio"):
        if getattr(m, field) is not None:
            raise ApiError(400, f"'messages.{i}.{field}' is not supported: messages are text from system, "
                                f"developer, user or assistant", f"messages.{i}.{field}")
    if m.role in ("tool", "function"):
        raise ApiError(400, f"role '{m.role}' is not supported: this model does not call tools", f"messages.{i}.role")
    if m.content is None:
        raise ApiError(400, f"'messages.{i}.content' is null: give the message's text", f"messages.{i}.content")
    role = "system" if m.role == "developer" else m.role
    if isinstance(m.content, str):
        return role, m.content
    texts = []
    for k, part in enumerate(m.content):
        at = f"messages.{i}.content.{k}"
        if part.get("type") != "text":
            raise ApiError(400, f"content part type {json.dumps(part.get('type'))} is not supported: this model "
                                f"reads text only", f"{at}.type")
        for key in set(part) - {"type", "text"}:
            raise ApiError(400, f"unknown parameter '{at}.{key}'", f"{at}.{key}")
        if not isinstance(part.get("text"), str):
            raise ApiError(400, f"'{at}.text' must be a string", f"{at}.text")
        texts.append(part["text"])
    return role, "".join(texts)


def refuse_unsupported(s, body):
    """ApiError for the model name, n, and every parameter set to something this server cannot do."""
    if body.model != s.model_name:
        raise ApiError(404, f"model '{body.model}' does not exist; this server has '{s.model_name}'", "model",
                       "model_not_found")
    if body.n is not None and not 1 <= body.n <= MAX_N:
        raise ApiError(400, f"'n' must be in [1, {MAX_N}], got {body.n}", "n")
    for name, fine, why in REFUSED:
        value = getattr(body, name, None)
        if not fine(value):
            raise ApiError(400, f"'{name}' {why} (got {json.dumps(value)[:80]})", name)
    if body.stream_options is not None and not body.stream:
        raise ApiError(400, "'stream_options' is only allowed with 'stream': true", "stream_options")
    if body.stream_options is not None and body.stream_options.include_obfuscation:
        raise ApiError(400, "'stream_options.include_obfuscation' is not supported: chunks are not padded",
                       "stream_options.include_obfuscation")


def logit_bias(s, bias):
    """{token id: value} of OpenAI's logit_bias ({"id": value in [-100, 100]}); ApiError if bad."""
    out = {}
    for key, value in (bias or {}).items():
        if not re.fullmatch(r"\d+", key):
            raise ApiError(400, f"'logit_bias': the key {json.dumps(key)} is not a token id", "logit_bias")
        tokens_text(s, [int(key)], "logit_bias")
        if not -100 <= value <= 100:
            raise ApiError(400, f"'logit_bias': the bias of token {key} must be in [-100, 100], got {value}",
                           "logit_bias")
        out[int(key)] = value
    return out or None


def max_tokens_for(s, ids, max_tokens, chat, echo):
    """The max_tokens to run a prompt with (0: echo only), or ApiError if this server cannot run it."""
    context = s.engine.sched.model.cfg.max_seq_len
    if len(ids) >= context:
        raise ApiError(400, f"the prompt is {len(ids)} tokens but the model's context is {context}",
                       "messages" if chat else "prompt", "context_length_exceeded")
    if max_tokens is None:  # OpenAI's defaults: 16 for completions, the rest of the context for chat
        max_tokens = context - len(ids) if chat else min(16, context - len(ids))
    if max_tokens < (0 if echo else 1):  # max_tokens 0 with echo: score the prompt (its logprobs) only
        raise ApiError(400, f"'max_tokens' must be >= {0 if echo else 1}, got {max_tokens}", "max_tokens")
    if len(ids) + max_tokens > context:
        raise ApiError(400, f"the prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the "
                            f"context of {context} tokens", "max_tokens", "context_length_exceeded")
    return max_tokens


class Choice:
    """One choice of a response: its Engine job (None when it only echoes its prompt), the prompt text
    it echoes ("" without echo), and the text offset of each committed token, for logprobs."""

    def __init__(self, index, ids, echo, job):
        self.index, self.ids, self.echo, self.job = index, ids, echo, job
        self.submitted = threading.Event()  # set once self.job is assigned (its listener may run before)
        self.prompt_logprobs = None  # with echo and logprobs: the prompt's (isd.prompt_logprobs)
        self.offsets = []  # offset in the completion's text where each committed token starts
        self._chars, self._utf8 = 0, codecs.getincrementaldecoder("utf-8")("replace")
        self.logprobs_sent = 0  # committed tokens whose logprobs have been streamed

    @property
    def out(self):
        return self.job.req.out if self.job else []

    def track(self, enc, hidden):
        """The offsets of the tokens committed since the last call (hidden: the stop ids, not text)."""
        for t in self.out[len(self.offsets):]:
            self.offsets.append(self._chars)
            if t not in hidden:
                self._chars += len(self._utf8.decode(enc.decode_bytes([t])))


async def generate(request, body, prompts, max_tokens, stops, chat, logprobs):
    """Both endpoints: one choice per prompt and per n (each its own request in the scheduler, choice
    i of n with seed + i), then stream chunks or wait for the final body. prompts: [(token ids, text to
    echo or "")]; logprobs: None, or how many alternatives per token."""
    s = request.app.state
    n, echo = body.n or 1, bool(getattr(body, "echo", False))
    if len(prompts) * n > MAX_CHOICES:
        raise ApiError(400, f"{len(prompts)} prompts x n = {n} is more than {MAX_CHOICES} choices", "prompt")
    bias = logit_bias(s, body.logit_bias)
    lengths = [max_tokens_for(s, ids, max_tokens, chat, echo) for ids, _ in prompts]
    stops = stops + ([body.stop] if isinstance(body.stop, str) else body.stop or [])
    loop, events = asyncio.get_running_loop(), asyncio.Queue()  # (choice index, delta, reason, logprob items)
    choices = []
    request.state.choices = choices  # for the access log
    try:
        for (ids, echo_text), length in zip(prompts, lengths):
            for i in range(n):
                c = Choice(len(choices), ids, echo_text, None)
                if length:  # 0: echo only
                    params = SamplingParams(length, 1.0 if body.temperature is None else body.temperature, body.top_k,
                                            body.top_p, None if body.seed is None else body.seed + i,
                                            () if body.ignore_eos else s.engine.stop_ids)
                    c.job = s.engine.submit(ids, params, stops, listener(s, c, loop, events, body.stream, logprobs),
                                           bias, logprobs)
                    c.submitted.set()
                choices.append(c)
    except SettingError as e:
        cancel(s.engine, choices)
        raise ApiError(400, str(e), e.param)
    except RuntimeError as e:  # shutting down
        cancel(s.engine, choices)
        raise ApiError(503, str(e))
    if echo and logprobs is not None:  # one plain forward of each prompt, off the event loop
        scored = {}
        for c in choices:
            if id(c.ids) not in scored:
                scored[id(c.ids)] = await asyncio.to_thread(isd.prompt_logprobs, s.engine.sched.model, c.ids, logprobs)
            c.prompt_logprobs = scored[id(c.ids)]
    head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
            "model": s.model_name}
    if body.stream:
        options = body.stream_options or StreamOptions()
        include_usage = "every" if options.continuous_usage_stats else bool(options.include_usage)
        return StreamingResponse(stream_chunks(s, choices, events, head, chat, include_usage, logprobs),
                                 media_type="text/event-stream")
    await wait(request, s.engine, choices, events)
    return final_body(s, choices, head, chat, logprobs)


def listener(s, c, loop, events, stream, logprobs):
    """The engine's listener of choice c (called on the engine's thread, while the request's tokens
    hold still): a streamed choice gets its text deltas with the logprobs of the tokens they start."""
    def listen(delta, reason):
        if not stream:  # a non-streamed request only needs the end
            if reason:
                loop.call_soon_threadsafe(events.put_nowait, (c.index, delta, reason, None))
            return
        items = None
        if logprobs is not None:
            c.submitted.wait()  # the engine may commit tokens before submit() has returned the job
            c.track(s.enc, s.engine.stop_ids)
            upto = len(c.out) if reason else bisect.bisect_left(c.offsets, c.job.sent, hi=len(c.out))
            items = token_items(c, range(c.logprobs_sent, upto))
            c.logprobs_sent = upto
        loop.call_soon_threadsafe(events.put_nowait, (c.index, delta, reason, items))
    return listen


def cancel(engine, choices):
    for c in choices:
        if c.job is not None and c.job.finish_reason is None:
            engine.cancel(c.job)


# ----------------------------------------------------------------------------------------------
# logprobs: items (token id, log p or None, [(id, log p)] or None, text offset), in OpenAI's two shapes

def token_items(c, positions):
    """Items of the choice's committed tokens at `positions`, offsets counted from the echoed prompt's start."""
    lps = c.job.req.logprobs
    return [(c.out[t], *lps[t], len(c.echo) + c.offsets[t]) for t in positions]


def prompt_items(s, c):
    """Items of the echoed prompt's tokens: the first has no logprob (nothing predicts it)."""
    offsets, chars, utf8 = [], 0, codecs.getincrementaldecoder("utf-8")("replace")
    for t in c.ids:
        offsets.append(chars)
        if t not in s.engine.stop_ids:
            chars += len(utf8.decode(s.enc.decode_bytes([t])))
    return [(c.ids[0], None, None, 0)] + [(t, lp, top, o) for t, (lp, top), o in
                                           zip(c.ids[1:], c.prompt_logprobs, offsets[1:])]


def token_bytes(enc, t):
    try:
        return enc.decode_bytes([t])
    except KeyError:  # an id of the model the tokenizer lacks (a padded vocabulary)
        return b""


def token_str(enc, t):
    return token_bytes(enc, t).decode("utf-8", errors="replace")


def finite(lp):
    """A log-probability JSON can carry: -9999 for an impossible token (as OpenAI reports it)."""
    return lp if lp is None or math.isfinite(lp) else -9999.0


def completion_logprobs(enc, items):
    """The completions shape; each top_logprobs dict holds the k likeliest tokens and the chosen one."""
    return {"tokens": [token_str(enc, t) for t, *_ in items],
            "token_logprobs": [finite(lp) for _, lp, _, _ in items],
            "top_logprobs": [None if top is None else {**{token_str(enc, i): finite(v) for i, v in top},
                                                       token_str(enc, t): finite(lp)} for t, lp, top, _ in items],
            "text_offset": [offset for *_, offset in items]}


def chat_logprobs(enc, items):
    """The chat shape: {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}."""
    def entry(t, lp):
        return {"token": token_str(enc, t), "logprob": finite(lp), "bytes": list(token_bytes(enc, t))}
    return {"content": [{**entry(t, lp), "top_logprobs": [entry(i, v) for i, v in top]} for t, lp, top, _ in items],
            "refusal": None}


def logprobs_of(s, chat, items):
    return chat_logprobs(s.enc, items) if chat else completion_logprobs(s.enc, items)


# ----------------------------------------------------------------------------------------------
# responses

def usage(choices):
    """Prompt tokens once per prompt (its n choices share it), completion tokens summed over choices."""
    prompts = {id(c.ids): len(c.ids) for c in choices}
    completion = sum(c.job.completion_tokens for c in choices if c.job)
    return {"prompt_tokens": sum(prompts.values()), "completion_tokens": completion,
            "total_tokens": sum(prompts.values()) + completion}


def stream_choice(chat, index, text, reason, logprobs=None):
    """A stream's choice: a text delta, or the finish reason (empty text)."""
    if chat:
        return {"index": index, "delta": {"content": text} if text else {}, "finish_reason": reason,
                "logprobs": logprobs}
    return {"index": index, "text": text, "finish_reason": reason, "logprobs": logprobs}


def event(head, chat, choices, **more):
    """One server-sent event of a stream."""
    obj = "chat.completion.chunk" if chat else "text_completion"
    return f"data: {json.dumps({**head, 'object': obj, 'choices': choices, **more})}\n\n"


async def stream_chunks(s, choices, events, head, chat, include_usage, logprobs):
    """The events of a streamed request: per choice (each chunk names its index) the echoed prompt, its
    text as it is committed with the logprobs asked for, its finish reason; then the usage if asked
    (include_usage "every": the usage so far in each text chunk too), [DONE]. The requests are cancelled
    if the client goes away."""
    try:
        for c in choices:  # chat: the role first, as OpenAI does; completions: the echoed prompt
            if chat:
                yield event(head, chat, [{"index": c.index, "delta": {"role": "assistant", "content": ""},
                                          "finish_reason": None, "logprobs": None}])
            elif c.echo or c.prompt_logprobs is not None:
                lp = logprobs_of(s, chat, prompt_items(s, c)) if c.prompt_logprobs is not None else None
                yield event(head, chat, [stream_choice(chat, c.index, c.echo, None, lp)])
            if c.job is None:
                yield event(head, chat, [stream_choice(chat, c.index, "", "length")])
        left = sum(c.job is not None for c in choices)
        while left:
            index, delta, reason, items = await events.get()
            if reason in ("cancelled", "error"):
                error = {"message": f"request {reason}", "type": "server_error", "param": None, "code": reason}
                yield f"data: {json.dumps({'error': error})}\n\n"
                break
            if delta or items:
                lp = logprobs_of(s, chat, items) if items is not None else None
                more = {"usage": usage(choices)} if include_usage == "every" else {}
                yield event(head, chat, [stream_choice(chat, index, delta, None, lp)], **more)
            if reason:
                yield event(head, chat, [stream_choice(chat, index, "", reason)])
                left -= 1
        else:
            if include_usage:
                yield event(head, chat, [], usage=usage(choices))
        yield "data: [DONE]\n\n"
    finally:  # also when the client went away mid-stream
        cancel(s.engine, choices)


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


def final_body(s, choices, head, chat, logprobs):
    """The response of finished, non-streamed requests (an ApiError if one was cancelled or failed)."""
    out = []
    for c in choices:
        reason = c.job.finish_reason if c.job else "length"
        if reason in ("cancelled", "error"):
            raise ApiError(503 if reason == "cancelled" else 500, f"request {reason}")
        text = c.job.text if c.job else ""
        lp = None
        if logprobs is not None:
            c.track(s.enc, s.engine.stop_ids)
            items = (prompt_items(s, c) if c.prompt_logprobs is not None else []) + \
                (token_items(c, range(len(c.out))) if c.job else [])
            lp = logprobs_of(s, chat, items)
        if chat:
            out.append({"index": c.index, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                        "finish_reason": reason})
        else:
            out.append({"index": c.index, "text": c.echo + text, "logprobs": lp, "finish_reason": reason})
    st = sum((c.job.req.stats for c in choices if c.job), Stats())
    return {**head, "object": "chat.completion" if chat else "text_completion", "choices": out,
            "usage": usage(choices),
            "isd": {"forwards": st.forwards, "tokens_per_forward": st.tpf, "acceptance_rate": st.acceptance_rate}}


# ----------------------------------------------------------------------------------------------
# errors in OpenAI's shape

async def api_error(request, e):
    return error_response(e.status, e.message, e.param, e.code)


async def invalid_body(request, e):
    message, param = validation_message(e.errors()[0])
    return error_response(400, message, param)


async def http_error(request, e):
    return error_response(e.status_code, f"{e.detail}: {request.method} {request.url.path}")


async def internal_error(request, e):
    return error_response(500, f"internal error: {type(e).__name__}: {e}")


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
                await error_response(401, "invalid or missing API key: send the header 'Authorization: Bearer "
                                          "<key>' with the server's --api_key", None,
                                     "invalid_api_key")(scope, receive, sending)
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
    app.state.engine, app.state.enc, app.state.model_name, app.state.created = engine, enc, model_name, int(time.time())
    for kind, handler in ((ApiError, api_error), (RequestValidationError, invalid_body), (HTTPException, http_error),
                          (Exception, internal_error)):
        app.add_exception_handler(kind, handler)
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
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default="out", help="checkpoint folder written by train.py, or one with a LoRA "
                                                    "adapter (its base model + the adapter) (default out)")
    p.add_argument("--init_from", default=None, help="a pretrained model by name instead of --out_dir: smollm2")
    p.add_argument("--base", action="store_true", help="serve the base checkpoint without its self-distilled adapter "
                   "(out_dir/distilled, loaded by default: the same outputs, more tokens per forward)")
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
    try:
        source = a.init_from or (a.out_dir if a.base else checkpoint.distilled_or_base(a.out_dir))
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
