"""An OpenAI-compatible HTTP server over the stationary-batch scheduler (scheduler.py).

    python serve.py --out_dir=out --stride=4 --max_batch=16 --host=127.0.0.1 --port=8000

Endpoints: POST /v1/completions and POST /v1/chat/completions ("stream": true gives server-sent
events), GET /v1/models, GET /health, GET /metrics (Prometheus text). Any OpenAI client works:

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
    client.completions.create(model="out", prompt="ROMEO:", max_tokens=50, temperature=0.8, seed=1)

The model's name is the checkpoint folder's name. Besides OpenAI's parameters, requests take "top_k"
(with the openai client: extra_body={"top_k": 20}). Sampling is exact ISD: at temperature 0 the text
is the model's greedy continuation, and a request with a seed gives the same text whatever else runs.
"""
import argparse
import asyncio
import json
import os
import re
import signal
import sys
import time
import uuid
from contextlib import asynccontextmanager
from typing import Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException

import checkpoint
import lora
import tokenizer as tok
from isd import SettingError
from scheduler import MODES, REASONS, Scheduler

CHAT_STOP = "\n\n"  # a speech ends at a blank line (see chat_prompt)


class Sampling(BaseModel):
    """The request fields both endpoints share (wrongly typed values are rejected, not converted)."""
    model_config = ConfigDict(strict=True)
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: dict | None = None


class CompletionRequest(Sampling):
    prompt: str | list[str]


class Message(BaseModel):
    model_config = ConfigDict(strict=True)
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(Sampling):
    messages: list[Message]
    max_completion_tokens: int | None = None


def chat_prompt(messages):
    """Our models have read plays, so a chat is laid out as one: a speech per message headed by its
    speaker ("USER." / "ASSISTANT."), a system message as a stage direction in brackets, then
    "ASSISTANT." for the model to speak. The reply ends at the first blank line (CHAT_STOP)."""
    parts = [f"[{m.content}]\n\n" if m.role == "system" else f"{m.role.upper()}.\n{m.content}\n\n" for m in messages]
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
    return f"'{field}': {err['msg']} (got {json.dumps(err.get('input'), default=repr)[:80]})", field


# ----------------------------------------------------------------------------------------------
# the endpoints: module-level handlers; the app's state holds the scheduler, tokenizer and model name

async def health():
    return {"status": "ok"}


async def models(request: Request):
    s = request.app.state
    model = {"id": s.model_name, "object": "model", "created": s.created, "owned_by": "idlm"}
    return {"object": "list", "data": [model]}


async def metrics(request: Request):
    return PlainTextResponse(metrics_text(request.app.state.sched.metrics()), media_type="text/plain; version=0.0.4")


async def completions(body: CompletionRequest, request: Request):
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise ApiError(400, f"give one prompt, not a list of {len(prompt)}", "prompt")
        prompt = prompt[0]
    return await generate(request, body, prompt, body.max_tokens, [], chat=False)


async def chat(body: ChatRequest, request: Request):
    if not body.messages:
        raise ApiError(400, "'messages' must hold at least one message", "messages")
    max_tokens = body.max_tokens if body.max_completion_tokens is None else body.max_completion_tokens
    enc = request.app.state.enc
    if tok.has_chat_template(enc):  # e.g. smollm2
        ids = tok.chat_ids(enc, [m.model_dump() for m in body.messages])
        return await generate(request, body, ids, max_tokens, [], chat=True)
    return await generate(request, body, chat_prompt(body.messages), max_tokens, [CHAT_STOP], chat=True)


async def generate(request, body, prompt, max_tokens, stops, chat):
    """Both endpoints: check the limits, submit to the scheduler, then stream chunks or wait for the
    final body. `prompt` is token ids (a chat template's) or text."""
    s = request.app.state
    # token ids (a chat template's) or text; an empty text starts a new document
    ids = prompt if isinstance(prompt, list) else s.enc.encode_ordinary(prompt) or [s.enc.eot_token]
    max_tokens = check_limits(s, body, ids, max_tokens, chat)
    stops = stops + ([body.stop] if isinstance(body.stop, str) else body.stop or [])
    loop, events = asyncio.get_running_loop(), asyncio.Queue()  # (text delta, finish reason or None)

    def listener(delta, reason):  # on the scheduler thread; a non-streaming request only needs the end
        if body.stream or reason:
            loop.call_soon_threadsafe(events.put_nowait, (delta, reason))

    try:
        job = s.sched.submit(ids, max_tokens, 1.0 if body.temperature is None else body.temperature, body.top_k,
                             body.top_p, body.seed, stops, listener)
    except SettingError as e:
        raise ApiError(400, str(e), e.param)
    except RuntimeError as e:  # shutting down
        raise ApiError(503, str(e))
    head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
            "model": s.model_name}
    if body.stream:
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        return StreamingResponse(stream_chunks(s.sched, job, events, head, chat, include_usage),
                                 media_type="text/event-stream")
    await wait(request, s.sched, job, events)
    return final_body(job, head, chat)


def check_limits(s, body, ids, max_tokens, chat):
    """Refuse a request this server cannot run (ApiError); the max_tokens to run it with."""
    context = s.sched.model.cfg.max_seq_len
    if body.model != s.model_name:
        raise ApiError(404, f"model '{body.model}' does not exist; this server has '{s.model_name}'", "model",
                       "model_not_found")
    if body.n not in (None, 1):
        raise ApiError(400, f"'n' must be 1, got {body.n}", "n")
    if len(ids) >= context:
        raise ApiError(400, f"the prompt is {len(ids)} tokens but the model's context is {context}",
                       "messages" if chat else "prompt", "context_length_exceeded")
    if max_tokens is None:  # OpenAI's defaults: 16 for completions, the rest of the context for chat
        max_tokens = context - len(ids) if chat else min(16, context - len(ids))
    if max_tokens < 1:
        raise ApiError(400, f"'max_tokens' must be >= 1, got {max_tokens}", "max_tokens")
    if len(ids) + max_tokens > context:
        raise ApiError(400, f"the prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the "
                            f"context of {context} tokens", "max_tokens", "context_length_exceeded")
    return max_tokens


def usage(job):
    return {"prompt_tokens": job.prompt_tokens, "completion_tokens": job.completion_tokens,
            "total_tokens": job.prompt_tokens + job.completion_tokens}


def choice(chat, text, reason):
    """A stream's choice: a text delta, or the finish reason (empty text)."""
    if chat:
        return {"index": 0, "delta": {"content": text} if text else {}, "finish_reason": reason, "logprobs": None}
    return {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}


def event(head, chat, choices, **more):
    """One server-sent event of a stream."""
    obj = "chat.completion.chunk" if chat else "text_completion"
    return f"data: {json.dumps({**head, 'object': obj, 'choices': choices, **more})}\n\n"


async def stream_chunks(sched, job, events, head, chat, include_usage):
    """The events of a streamed request: its text as it is committed, the finish reason, the usage
    if asked, [DONE]. The request is cancelled if the client goes away."""
    try:
        if chat:  # the role first, as OpenAI does
            yield event(head, chat, [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                                      "logprobs": None}])
        while True:
            delta, reason = await events.get()
            if reason in ("cancelled", "error"):
                error = {"message": f"request {reason}", "type": "server_error", "param": None, "code": reason}
                yield f"data: {json.dumps({'error': error})}\n\n"
                break
            if delta:
                yield event(head, chat, [choice(chat, delta, None)])
            if reason:
                yield event(head, chat, [choice(chat, "", reason)])
                if include_usage:
                    yield event(head, chat, [], usage=usage(job))
                break
        yield "data: [DONE]\n\n"
    finally:  # also when the client went away mid-stream
        if job.finish_reason is None:
            sched.cancel(job)


async def wait(request, sched, job, events):
    """Until the request has finished; cancel it if the client goes away."""
    try:
        while True:
            try:
                if (await asyncio.wait_for(events.get(), 1.0))[1]:
                    return
            except asyncio.TimeoutError:
                if job.finished.is_set():
                    return
                if await request.is_disconnected():
                    sched.cancel(job)
    finally:
        if job.finish_reason is None:
            sched.cancel(job)


def final_body(job, head, chat):
    """The response of a finished, non-streamed request (an ApiError if it was cancelled or failed)."""
    if job.finish_reason in ("cancelled", "error"):
        raise ApiError(503 if job.finish_reason == "cancelled" else 500, f"request {job.finish_reason}")
    st = job.req.stats
    out = {"index": 0, "message": {"role": "assistant", "content": job.text}} if chat else \
        {"index": 0, "text": job.text, "logprobs": None}
    return {**head, "object": "chat.completion" if chat else "text_completion",
            "choices": [{**out, "finish_reason": job.finish_reason}], "usage": usage(job),
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


def make_app(sched, enc, model_name):
    """The FastAPI app serving `sched` (started; stopped when the app shuts down)."""
    @asynccontextmanager
    async def lifespan(app):
        yield
        sched.stop()  # after uvicorn's graceful shutdown: cancel what is still running

    app = FastAPI(title="idlm", lifespan=lifespan)
    app.state.sched, app.state.enc, app.state.model_name, app.state.created = sched, enc, model_name, int(time.time())
    for kind, handler in ((ApiError, api_error), (RequestValidationError, invalid_body), (HTTPException, http_error),
                          (Exception, internal_error)):
        app.add_exception_handler(kind, handler)
    app.get("/health")(health)
    app.get("/v1/models")(models)
    app.get("/metrics")(metrics)
    app.post("/v1/completions")(completions)
    app.post("/v1/chat/completions")(chat)
    return app


METRICS = [  # name, type, help, key in Scheduler.metrics()
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


def metrics_text(m):
    """Prometheus text exposition format."""
    lines = ["# HELP idlm_requests_total Finished requests by finish reason.", "# TYPE idlm_requests_total counter"]
    lines += [f'idlm_requests_total{{finish_reason="{r}"}} {m[f"requests_{r}"]}' for r in REASONS]
    lines += ["# HELP idlm_steps_total Decoding steps by the mode the policy chose (wide, narrow window; ar: stride 1).",
              "# TYPE idlm_steps_total counter"]
    lines += [f'idlm_steps_total{{mode="{mode}"}} {m[f"steps_{mode}"]}' for mode in MODES]
    for name, kind, text, key in METRICS:
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {m[key]}"]
    return "\n".join(lines) + "\n"


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
    p.add_argument("--shutdown_timeout", type=float, default=10.0,
                   help="on SIGINT/SIGTERM, seconds to let running requests finish before cancelling them (default 10)")
    a = p.parse_args(argv)
    try:
        source = a.init_from or (a.out_dir if a.base else checkpoint.distilled_or_base(a.out_dir))
        model, enc = lora.load_model(source, device=a.device)
        sched = Scheduler(model, enc, a.stride, a.max_batch, a.prefill_budget, a.narrow, a.policy)
    except (FileNotFoundError, ValueError) as e:  # one line, e.g. no checkpoint: run python train.py first
        print(f"serve.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    name = a.init_from or os.path.basename(os.path.normpath(os.path.abspath(a.out_dir)))
    app = make_app(sched.start(), enc, name)
    server = uvicorn.Server(uvicorn.Config(app, host=a.host, port=a.port, log_level="warning",
                                           timeout_graceful_shutdown=a.shutdown_timeout))
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then raises the signal again: ignore it then
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    print(f"serving model '{name}' from {source} (stride {a.stride}, {sched.policy} policy"
          f"{', narrow window' if a.narrow and sched.policy == 'fixed' else ''}, {a.max_batch} slots) on http://{a.host}:{a.port}/v1",
          file=sys.stderr, flush=True)
    server.run()
    sched.stop()
    print("server stopped", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
