"""The OpenAI API as serve.py speaks it, without the server: the request bodies (strict pydantic models),
inputs() (a request checked and laid out for the engine), and the JSON that goes back (Response: responses
and stream chunks with their logprobs; ApiError: errors).

Every parameter a request sends takes effect or gets a 400 naming it (docs/serving.md, "OpenAI
parameters"): n choices, prompts as lists of texts or token ids, logprobs, echo, logit_bias are served;
penalties, tools, best_of, suffix and the like are refused (REFUSED), and so is an unknown field. Not
OpenAI's: "top_k" and "ignore_eos" (with the openai client: extra_body={"top_k": 20}).
"""
import codecs
import json
import math
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

import tokenizer as tok
from decoding import SamplingParams

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


# ----------------------------------------------------------------------------------------------
# errors in OpenAI's shape

class ApiError(Exception):
    """A request the server answers with an error: its HTTP status and OpenAI's error body."""

    def __init__(self, status, message, param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def json(self):
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def invalid(param, why):
    """The 400 "'param' why", naming the parameter."""
    return ApiError(400, f"'{param}' {why}", param)


def no_such_model(model, name):
    return ApiError(404, f"model '{model}' does not exist; this server has '{name}'", "model", "model_not_found")


def request_failed(reason, code=None):
    """The error of a request the engine cancelled (shutting down: 503) or that failed (500)."""
    return ApiError(503 if reason == "cancelled" else 500, f"request {reason}", code=code)


def validation_message(err):
    """(message, param) for pydantic's first complaint about a body, naming the field."""
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
# requests: each parameter checked, then laid out for the engine

@dataclass
class Served:
    """The served model as the API sees it: its name, tokenizer, context length, MASK id (never a token of a
    request) and stop ids (never text)."""
    name: str
    enc: Any
    context: int
    mask: int
    stop_ids: tuple


def inputs(body, served):
    """What the engine runs for a request, or an ApiError for its first parameter this server cannot do:
    (prompts [(token ids, the text it echoes or "", max_tokens: 0 = echo only)], stop strings, logit_bias
    {id: value} or None, logprobs: None or how many alternatives per token)."""
    refuse_unsupported(body, served.name)
    chat = isinstance(body, ChatRequest)
    prompts, max_tokens, stops, logprobs = (chat_inputs if chat else completion_inputs)(body, served)
    n, echo = body.n or 1, bool(getattr(body, "echo", False))
    if len(prompts) * n > MAX_CHOICES:
        raise ApiError(400, f"{len(prompts)} prompts x n = {n} is more than {MAX_CHOICES} choices", "prompt")
    bias = logit_bias(served, body.logit_bias)
    prompts = [(ids, text, max_tokens_for(served, ids, max_tokens, chat, echo)) for ids, text in prompts]
    stops += [body.stop] if isinstance(body.stop, str) else body.stop or []
    return prompts, stops, bias, logprobs


def refuse_unsupported(body, name):
    """ApiError for the model name, n, and every parameter set to something this server cannot do."""
    if body.model != name:
        raise no_such_model(body.model, name)
    in_range("n", body.n, 1, MAX_N)
    for param, fine, why in REFUSED:
        value = getattr(body, param, None)
        if not fine(value):
            raise invalid(param, f"{why} (got {json.dumps(value)[:80]})")
    if body.stream_options is not None and not body.stream:
        raise invalid("stream_options", "is only allowed with 'stream': true")
    if body.stream_options is not None and body.stream_options.include_obfuscation:
        raise invalid("stream_options.include_obfuscation", "is not supported: chunks are not padded")


def in_range(param, value, lo, hi):
    """ApiError unless `value` is None or in [lo, hi]."""
    if value is not None and not lo <= value <= hi:
        raise invalid(param, f"must be in [{lo}, {hi}], got {value}")


def completion_inputs(body, served):
    """(prompts [(token ids, text echoed or "")], max_tokens, stop strings, logprobs) of a completion request.
    Its prompt: a text, texts, token ids, lists of ids; an empty text starts a new document (end of text)."""
    in_range("logprobs", body.logprobs, 0, MAX_LOGPROBS)
    prompt = body.prompt
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise invalid("prompt", "is an empty list")
    prompts = []
    for p in prompt:
        if isinstance(p, str):
            ids, text = served.enc.encode_ordinary(p) or [served.enc.eot_token], p
        elif not p:
            raise invalid("prompt", "holds an empty list of token ids")
        else:
            ids, text = p, tokens_text(served, p, "prompt")
        prompts.append((ids, text if body.echo else ""))
    return prompts, body.max_tokens, [], body.logprobs


def chat_inputs(body, served):
    """(prompts, max_tokens, stop strings, logprobs) of a chat request: one prompt, the conversation in the
    model's chat template (ChatML, e.g. smollm2), else laid out as a play (chat_prompt)."""
    if not body.messages:
        raise invalid("messages", "must hold at least one message")
    if body.top_logprobs is not None and not body.logprobs:
        raise invalid("top_logprobs", "needs 'logprobs': true")
    in_range("top_logprobs", body.top_logprobs, 0, MAX_LOGPROBS)
    max_tokens = body.max_tokens if body.max_completion_tokens is None else body.max_completion_tokens
    messages = [message_text(m, i) for i, m in enumerate(body.messages)]
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    if tok.has_chat_template(served.enc):
        ids, stops = tok.chat_ids(served.enc, [{"role": role, "content": text} for role, text in messages]), []
    else:  # the blank line ends a reply as EOS does: ignored alike
        ids, stops = served.enc.encode_ordinary(chat_prompt(messages)), [] if body.ignore_eos else [CHAT_STOP]
    return [(ids, "")], max_tokens, stops, logprobs


def tokens_text(served, ids, param):
    """The text of token ids sent by a client, each a token of the tokenizer (MASK is not); else ApiError."""
    enc = served.enc
    bad = [t for t in ids if not 0 <= t < enc.n_vocab or t == served.mask or not token_bytes(enc, t)]
    if bad:
        raise ApiError(400, f"'{param}': {bad[0]} is not a token id of the model", param)
    return enc.decode_bytes([t for t in ids if t not in served.stop_ids]).decode("utf-8", "replace")


def chat_prompt(messages):
    """Our models have read plays, so a chat is laid out as one: a speech per message headed by its
    speaker ("USER." / "ASSISTANT."), a system message as a stage direction in brackets, then
    "ASSISTANT." for the model to speak. The reply ends at the first blank line (CHAT_STOP).
    `messages`: [(role, text)], a developer message counting as a system message."""
    parts = [f"[{text}]\n\n" if role == "system" else f"{role.upper()}.\n{text}\n\n" for role, text in messages]
    return "".join(parts) + "ASSISTANT.\n"


def message_text(m, i):
    """(role, text) of message i: its content, or its text parts concatenated; ApiError for what a
    text-only model without tools cannot take."""
    for field in ("name", "tool_calls", "tool_call_id", "function_call", "refusal", "audio"):
        if getattr(m, field) is not None:
            raise invalid(f"messages.{i}.{field}", "is not supported: messages are text from system, developer, "
                                                   "user or assistant")
    if m.role in ("tool", "function"):
        raise ApiError(400, f"role '{m.role}' is not supported: this model does not call tools", f"messages.{i}.role")
    if m.content is None:
        raise invalid(f"messages.{i}.content", "is null: give the message's text")
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
            raise invalid(f"{at}.text", "must be a string")
        texts.append(part["text"])
    return role, "".join(texts)


def logit_bias(served, bias):
    """{token id: value} of OpenAI's logit_bias ({"id": value in [-100, 100]}); ApiError if bad."""
    out = {}
    for key, value in (bias or {}).items():
        if not re.fullmatch(r"\d+", key):
            raise ApiError(400, f"'logit_bias': the key {json.dumps(key)} is not a token id", "logit_bias")
        tokens_text(served, [int(key)], "logit_bias")
        if not -100 <= value <= 100:
            raise ApiError(400, f"'logit_bias': the bias of token {key} must be in [-100, 100], got {value}",
                           "logit_bias")
        out[int(key)] = value
    return out or None


def max_tokens_for(served, ids, max_tokens, chat, echo):
    """The max_tokens to run a prompt with (0: echo only), or ApiError if this server cannot run it."""
    context = served.context
    if len(ids) >= context:
        raise ApiError(400, f"the prompt is {len(ids)} tokens but the model's context is {context}",
                       "messages" if chat else "prompt", "context_length_exceeded")
    if max_tokens is None:  # OpenAI's defaults: 16 for completions, the rest of the context for chat
        max_tokens = context - len(ids) if chat else min(16, context - len(ids))
    if max_tokens < (0 if echo else 1):  # max_tokens 0 with echo: score the prompt (its logprobs) only
        raise invalid("max_tokens", f"must be >= {0 if echo else 1}, got {max_tokens}")
    if len(ids) + max_tokens > context:
        raise ApiError(400, f"the prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the "
                            f"context of {context} tokens", "max_tokens", "context_length_exceeded")
    return max_tokens


def sampling(body, max_tokens, i, stop_ids):
    """The SamplingParams of choice i (seed + i); OpenAI's default temperature is 1. SettingError if bad."""
    return SamplingParams(max_tokens, 1.0 if body.temperature is None else body.temperature, body.top_k, body.top_p,
                          None if body.seed is None else body.seed + i, () if body.ignore_eos else stop_ids)


# ----------------------------------------------------------------------------------------------
# logprobs: items (token id, log p or None, [(id, log p)] or None, text offset), in OpenAI's two shapes

class TextOffsets:
    """Where each token of a growing list starts in the list's text, in characters: a character split across
    tokens counts once whole; the stop ids are no text."""

    def __init__(self, served):
        self.enc, self.hidden, self.at, self.chars = served.enc, served.stop_ids, [], 0
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def of(self, ids):
        """The offsets of `ids`, the list seen last time with tokens appended."""
        for t in ids[len(self.at):]:
            self.at.append(self.chars)
            if t not in self.hidden:
                self.chars += len(self._utf8.decode(self.enc.decode_bytes([t])))
        return self.at


def prompt_items(served, ids, logprobs):
    """Items of a prompt's tokens (`logprobs`: isd.prompt_logprobs'); the first has none (nothing predicts it)."""
    offsets = TextOffsets(served).of(ids)
    return [(ids[0], None, None, 0)] + [(t, lp, top, o) for t, (lp, top), o in zip(ids[1:], logprobs, offsets[1:])]


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


def logprobs_json(enc, chat, items):
    """Completions: {tokens, token_logprobs, top_logprobs, text_offset}, each top_logprobs dict the k likeliest
    tokens and the chosen one. Chat: {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob,
    bytes}]}]}."""
    if not chat:
        return {"tokens": [token_str(enc, t) for t, *_ in items],
                "token_logprobs": [finite(lp) for _, lp, _, _ in items],
                "top_logprobs": [None if top is None else {**{token_str(enc, i): finite(v) for i, v in top},
                                                           token_str(enc, t): finite(lp)} for t, lp, top, _ in items],
                "text_offset": [offset for *_, offset in items]}

    def entry(t, lp):
        return {"token": token_str(enc, t), "logprob": finite(lp), "bytes": list(token_bytes(enc, t))}
    return {"content": [{**entry(t, lp), "top_logprobs": [entry(i, v) for i, v in top]} for t, lp, top, _ in items],
            "refusal": None}


# ----------------------------------------------------------------------------------------------
# responses and stream chunks

def sse(obj):
    """One server-sent event."""
    return f"data: {json.dumps(obj)}\n\n"


class Response:
    """The JSON of one request's response, or its stream's chunks, in its endpoint's shape (chat or
    completions), each under the id, time and model of the request. stream_usage: where a stream carries the
    usage: False (nowhere), True (at its end), "every" (in each text chunk too)."""

    def __init__(self, body, served):
        self.chat, self.enc = isinstance(body, ChatRequest), served.enc
        self.head = {"id": f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                     "model": served.name}
        options = body.stream_options or StreamOptions()
        self.stream_usage = "every" if options.continuous_usage_stats else bool(options.include_usage)

    def choice(self, index, text, reason, items=None, streamed=True):
        """A choice of a chunk (a text delta, or the finish reason with empty text) or, not streamed, of the
        response; items: its tokens' logprob items (None: not asked for)."""
        lp = None if items is None else logprobs_json(self.enc, self.chat, items)
        if not self.chat:
            return {"index": index, "text": text, "logprobs": lp, "finish_reason": reason}
        if streamed:
            return {"index": index, "delta": {"content": text} if text else {}, "logprobs": lp, "finish_reason": reason}
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                "finish_reason": reason}

    def role(self, index):
        """Chat's first chunk of a choice: the role, as OpenAI sends it."""
        return self.chunk({"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                           "finish_reason": None})

    def chunk(self, choice=None, **more):
        """A chunk of the stream, as a server-sent event: one choice, or none (the usage at the end)."""
        return sse({**self.head, "object": "chat.completion.chunk" if self.chat else "text_completion",
                    "choices": [choice] if choice else [], **more})

    def body(self, choices, usage, stats):
        """The response, not streamed; "isd" adds what decoding did (stats: decoding.Stats of all choices)."""
        return {**self.head, "object": "chat.completion" if self.chat else "text_completion", "choices": choices,
                "usage": usage, "isd": {"forwards": stats.forwards, "tokens_per_forward": stats.tpf,
                                        "acceptance_rate": stats.acceptance_rate}}
