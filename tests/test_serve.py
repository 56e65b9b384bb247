"""serve.py as a live server on 127.0.0.1 (a subprocess), driven by the official openai client.

References: isd_generate on the same checkpoint, one request at a time, with the same seed (the
scheduler must not change what a request gives), and the chat layout written out by hand.
"""
import asyncio
import codecs
import concurrent.futures
import inspect
import json
import math
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import serve  # noqa: E402
import tokenizer as tok  # noqa: E402
from isd import Request, decode, isd_generate  # noqa: E402
from model import Model  # noqa: E402
from reference import SERVE_STRIDE, metrics, save_checkpoint, start_server, stop_server  # noqa: E402
from decoding import SamplingParams  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STRIDE, CONTEXT = SERVE_STRIDE, 512  # start_server's stride


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_checkpoint(str(tmp_path_factory.mktemp("serve") / "tiny"), max_seq_len=CONTEXT)


@pytest.fixture(scope="module")
def server(ckpt):
    proc, url = start_server(ckpt, "--max_batch=8", "--prefill_budget=16", "--policy=fixed")  # seeded text: fixed
    yield url
    rc, log = stop_server(proc, signal.SIGINT)
    assert rc == 0 and "server stopped" in log, log


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model_enc(ckpt):
    return Model.load(ckpt).eval(), tok.load(ckpt)


@pytest.fixture(scope="module")
def ref(model_enc):
    """text the model gives for a prompt alone (isd_generate), EOS dropped, cut at `stop`."""
    model, enc = model_enc

    def run(prompt, n, temperature=0.0, top_k=None, top_p=None, seed=None, stop=None):
        out = isd_generate(model, enc.encode_ordinary(prompt),
                           SamplingParams(n, temperature, top_k, top_p, seed, stop_ids=[enc.eot_token]),
                           stride=STRIDE)[0]
        text = enc.decode([t for t in out if t != enc.eot_token])
        return text[:text.find(stop)] if stop and stop in text else text
    return run


def test_completion_chat_and_streaming_equal_solo_greedy(client, ref, ckpt):
    name = os.path.basename(ckpt)
    assert [m.id for m in client.models.list()] == [name]
    want = ref("ROMEO.\n", 24)
    r = client.completions.create(model=name, prompt="ROMEO.\n", max_tokens=24, temperature=0)
    assert r.object == "text_completion" and r.model == name and r.choices[0].text == want
    assert r.usage.prompt_tokens == len(tok.load(ckpt).encode_ordinary("ROMEO.\n"))
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens >= 1
    chunks = list(client.completions.create(model=name, prompt="ROMEO.\n", max_tokens=24, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason

    messages = [{"role": "system", "content": "A street."}, {"role": "user", "content": "Who goes there?"}]
    layout = "[A street.]\n\nUSER.\nWho goes there?\n\nASSISTANT.\n"
    want = ref(layout, 30, stop="\n\n")
    r = client.chat.completions.create(model=name, messages=messages, max_tokens=30, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want
    chunks = list(client.chat.completions.create(model=name, messages=messages, max_tokens=30, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_32_concurrent_streams_equal_solo_runs(client, ref, server, ckpt):
    name = os.path.basename(ckpt)
    prompts = ["ROMEO.\n", "But soft", "JULIET.\nCafé", "What light"]
    jobs = []
    for i in range(32):
        kw = dict(prompt=prompts[i % 4], max_tokens=5 + 3 * i % 40)
        if i % 4 == 0:
            kw.update(temperature=0)
        else:
            kw.update(temperature=[0.7, 1.0, 1.3][i % 3], seed=100 + i, top_p=[None, 0.9][i % 2],
                      top_k=[None, 20, 50][i % 3])
        jobs.append(kw)

    def stream(kw):
        extra = {"top_k": kw["top_k"]} if kw.get("top_k") else None
        args = {k: v for k, v in kw.items() if k != "top_k" and v is not None}
        chunks = client.completions.create(model=name, stream=True, extra_body=extra, **args)
        return "".join(c.choices[0].text for c in chunks)

    with ThreadPoolExecutor(32) as pool:
        texts = list(pool.map(stream, jobs))
    for kw, text in zip(jobs, texts):
        assert text == ref(kw["prompt"], kw["max_tokens"], kw["temperature"], kw.get("top_k"), kw.get("top_p"),
                           kw.get("seed")), kw
    m = metrics(server)
    assert m["idlm_busy_slots"] == 0 and m["idlm_queue_length"] == 0 and m["idlm_slots"] == 8


def test_disconnected_clients_free_their_slots(server, ref, ckpt):
    name = os.path.basename(ckpt)
    long = {"model": name, "prompt": "But soft", "max_tokens": 480, "temperature": 0, "stream": True}
    assert len(ref("But soft", 480)) > 400  # would run for hundreds of steps if not cancelled
    before = metrics(server)['idlm_requests_total{finish_reason="cancelled"}']
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0, timeout=60)

    def others(i):
        return "".join(c.choices[0].text for c in client.completions.create(
            model=name, prompt="ROMEO.\n", max_tokens=40, temperature=1.0, seed=i, stream=True))

    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(others, i) for i in range(3)]
        for _ in range(4):  # read one chunk, then hang up
            with httpx.Client(timeout=30) as c, c.stream("POST", f"{server}/v1/completions", json=long) as r:
                assert r.status_code == 200
                assert next(r.iter_lines()).startswith("data: {")
        texts = [f.result() for f in futures]
    assert texts == [ref("ROMEO.\n", 40, 1.0, seed=i) for i in range(3)]
    for _ in range(300):
        m = metrics(server)
        if m["idlm_busy_slots"] == 0:
            break
        time.sleep(0.1)
    assert m["idlm_busy_slots"] == 0 and m["idlm_queue_length"] == 0
    assert m['idlm_requests_total{finish_reason="cancelled"}'] - before == 4


BAD = [  # path, body (a dict is sent as JSON), status, words of the message, param
    ("/v1/completions", '{"model": "x", ', 400, "not valid JSON", None),
    ("/v1/completions", "[1, 2]", 400, "valid dictionary", "body"),
    ("/v1/completions", {"model": "{name}"}, 400, "missing required field 'prompt'", "prompt"),
    ("/v1/completions", {"prompt": "a"}, 400, "missing required field 'model'", "model"),
    ("/v1/completions", {"model": "{name}", "prompt": 5}, 400, "'prompt'", "prompt"),
    ("/v1/completions", {"model": "{name}", "prompt": "a", "max_tokens": "ten"}, 400, "valid integer", "max_tokens"),
    ("/v1/completions", {"model": "{name}", "prompt": "a", "max_tokens": 2.5}, 400, "valid integer", "max_tokens"),
    ("/v1/completions", {"model": "{name}", "prompt": "a", "temperature": "hot"}, 400, "valid number", "temperature"),
    ("/v1/completions", {"model": "{name}", "prompt": "a", "stream": "yes"}, 400, "valid boolean", "stream"),
    ("/v1/completions", {"model": "{name}", "prompt": "a", "max_tokens": 0}, 400, "must be >= 1", "max_tokens"),
    ("/v1/completions", {"model": "{name}", "prompt": "a", "max_tokens": -3}, 400, "must be >= 1", "max_tokens"),
    ("/v1/completions", {"model": "{name}", "prompt": "a", "max_tokens": CONTEXT}, 400, "exceeds the context",
     "max_tokens"),
    ("/v1/completions", {"model": "{name}", "prompt": "a" * 2 * CONTEXT, "max_tokens": 1}, 400,
     "model's context is", "prompt"),
    ("/v1/completions", {"model": "{name}", "prompt": "a", "temperature": -0.5}, 400, "temperature must be >= 0",
     "temperature"),
    ("/v1/completions", '{"model": "{name}", "prompt": "a", "temperature": 1e999}', 400, "finite", "temperature"),
    ("/v1/completions", '{"model": "{name}", "prompt": "a", "temperature": NaN}', 400, "finite", "temperature"),
    ("/v1/completions", {"model": "{name}", "prompt": "a", "temperature": 1e-300}, 400, "finite", "temperature"),
    ("/v1/completions", {"model": "{name}", "prompt": "a", "top_p": 0}, 400, "top_p", "top_p"),
    ("/v1/completions", {"model": "{name}", "prompt": "a", "top_k": 0}, 400, "top_k", "top_k"),
    ("/v1/completions", {"model": "{name}", "prompt": "a", "n": 0}, 400, "'n' must be in [1, 16]", "n"),
    ("/v1/completions", {"model": "{name}", "prompt": "a", "n": 17}, 400, "'n' must be in [1, 16]", "n"),
    ("/v1/completions", {"model": "{name}", "prompt": ["a"] * 20, "n": 16}, 400, "more than 256 choices", "prompt"),
    ("/v1/completions", {"model": "{name}", "prompt": "a", "seed": 2 ** 63 - 2, "n": 3}, 400, "seed must be in",
     "seed"),
    ("/v1/completions", {"model": "{name}", "prompt": "a", "stop": [""]}, 400, "stop strings", "stop"),
    ("/v1/completions", {"model": "{name}", "prompt": []}, 400, "empty list", "prompt"),
    ("/v1/completions", {"model": "{name}", "prompt": [[1, 2], []]}, 400, "empty list of token ids", "prompt"),
    ("/v1/completions", {"model": "{name}", "prompt": [1, 2, 10 ** 6]}, 400, "1000000 is not a token id", "prompt"),
    ("/v1/completions", {"model": "{name}", "prompt": [[1], [2, "MASK_ID"]]}, 400, "is not a token id", "prompt"),
    ("/v1/completions", {"model": "{name}", "prompt": [-1]}, 400, "-1 is not a token id", "prompt"),
    ("/v1/completions", {"model": "{name}", "prompt": [1, "a"]}, 400, "'prompt'", "prompt"),
    ("/v1/completions", {"model": "{name}", "prompt": "a", "logit_bias": {"x": 1}}, 400, "not a token id",
     "logit_bias"),
    ("/v1/completions", {"model": "{name}", "prompt": "a", "logit_bias": {"{mask}": 1}}, 400, "not a token id",
     "logit_bias"),
    ("/v1/completions", {"model": "{name}", "prompt": "a", "logit_bias": {"3": 101}}, 400, "[-100, 100]",
     "logit_bias"),
    ("/v1/completions", {"model": "{name}", "prompt": "a", "logit_bias": {"3": "up"}}, 400, "valid number",
     "logit_bias.3"),
    ("/v1/completions", {"model": "{name}", "prompt": "a", "logprobs": 21}, 400, "[0, 20]", "logprobs"),
    ("/v1/completions", {"model": "{name}", "prompt": "a", "logprobs": True}, 400, "valid integer", "logprobs"),
    ("/v1/completions", {"model": "{name}", "prompt": "a", "echo": True, "max_tokens": -1}, 400, "must be >= 0",
     "max_tokens"),
    ("/v1/completions", {"model": "{name}", "prompt": "a", "min_p": 0.1}, 400, "unknown parameter 'min_p'", "min_p"),
    ("/v1/completions", {"model": "{name}", "prompt": "a", "stream_options": {"include_usage": True}}, 400,
     "only allowed with 'stream': true", "stream_options"),
    ("/v1/completions", {"model": "{name}", "prompt": "a", "stream": True, "stream_options": {"x": 1}}, 400,
     "unknown parameter 'stream_options.x'", "stream_options.x"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "a"}, 404, "model 'gpt-4' does not exist", "model"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "a", "stream": True}, 404, "does not exist", "model"),
    ("/v1/chat/completions", {"model": "{name}", "messages": []}, 400, "at least one message", "messages"),
    ("/v1/chat/completions", {"model": "{name}", "messages": "hi"}, 400, "valid list", "messages"),
    ("/v1/chat/completions", {"model": "{name}", "messages": [{"role": "king", "content": "x"}]}, 400, "'user'",
     "messages.0.role"),
    ("/v1/chat/completions", {"model": "{name}", "messages": [{"role": "user"}]}, 400, "missing", "messages.0.content"),
    ("/v1/chat/completions", {"model": "{name}", "messages": [{"role": "user", "content": "x"}],
                              "max_completion_tokens": 0}, 400, "must be >= 1", "max_tokens"),
    ("/v1/chat/completions", {"model": "{name}", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "x"}, {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, 400,
     'content part type "image_url" is not supported', "messages.0.content.1.type"),
    ("/v1/chat/completions", {"model": "{name}", "messages": [{"role": "user", "content": [{"type": "text"}]}]},
     400, "must be a string", "messages.0.content.0.text"),
    ("/v1/chat/completions", {"model": "{name}", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "x", "cache": 1}]}]}, 400, "unknown parameter", "messages.0.content.0.cache"),
    ("/v1/chat/completions", {"model": "{name}", "messages": [{"role": "tool", "content": "4",
                                                               "tool_call_id": "c1"}]}, 400, "not supported",
     "messages.0.tool_call_id"),
    ("/v1/chat/completions", {"model": "{name}", "messages": [{"role": "function", "content": "4"}]}, 400,
     "role 'function' is not supported", "messages.0.role"),
    ("/v1/chat/completions", {"model": "{name}", "messages": [{"role": "user", "content": "x", "name": "Bob"}]},
     400, "not supported", "messages.0.name"),
    ("/v1/chat/completions", {"model": "{name}", "messages": [{"role": "assistant", "content": None}]}, 400,
     "is null", "messages.0.content"),
    ("/v1/chat/completions", {"model": "{name}", "messages": [{"role": "user", "content": "x"}],
                              "top_logprobs": 2}, 400, "needs 'logprobs': true", "top_logprobs"),
    ("/v1/chat/completions", {"model": "{name}", "messages": [{"role": "user", "content": "x"}], "logprobs": True,
                              "top_logprobs": 21}, 400, "[0, 20]", "top_logprobs"),
    ("/v1/chat/completions", {"model": "{name}", "messages": [{"role": "user", "content": "x"}], "echo": True}, 400,
     "unknown parameter 'echo'", "echo"),
    ("/v1/nothing", {}, 404, "Not Found", None),
]


def test_bad_input_gets_4xx_with_an_openai_error(server, ckpt, model_enc):
    name, mask = os.path.basename(ckpt), model_enc[0].cfg.mask_token_id
    for path, body, status, words, param in BAD:
        body = (json.dumps(body) if isinstance(body, dict) else body).replace("{name}", name)
        body = body.replace('"MASK_ID"', str(mask)).replace("{mask}", str(mask))
        r = httpx.post(f"{server}{path}", content=body, headers={"content-type": "application/json"}, timeout=30)
        assert r.status_code == status, (path, body, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and words in err["message"], (body, err)
        assert err["param"] == param and err["type"] == "invalid_request_error", (body, err)
    assert httpx.get(f"{server}/v1/completions").status_code == 405
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}
    # the official client raises its own typed errors from these bodies
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt="a")
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=name, prompt="a", temperature=-1)
    assert httpx.get(f"{server}/health").status_code == 200


def test_sigterm_finishes_what_runs_and_exits_zero(ckpt, ref):
    proc, url = start_server(ckpt, "--max_batch=2", "--shutdown_timeout=20")
    body = {"model": os.path.basename(ckpt), "prompt": "But soft", "max_tokens": 200, "temperature": 0,
            "stream": True}
    with httpx.Client(timeout=30) as c, c.stream("POST", f"{url}/v1/completions", json=body) as r:
        lines = r.iter_lines()
        first = next(lines)
        rc, log = stop_server(proc, signal.SIGTERM)
        data = [json.loads(x[6:]) for x in [first, *lines] if x.startswith("data: {")]
    assert rc == 0 and "server stopped" in log, log
    assert "".join(d["choices"][0]["text"] for d in data) == ref("But soft", 200)  # it ran to its end


def test_no_checkpoint_one_line_error(tmp_path):
    r = subprocess.run([sys.executable, "serve.py", f"--out_dir={tmp_path}/none"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "run python train.py first" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_the_adaptive_policy_serves_greedy_text_and_reports_its_modes(ckpt, ref):
    """The default policy may pick another window at every step: greedy text stays the model's greedy text,
    under concurrent load, and /metrics counts the steps of each mode."""
    proc, url = start_server(ckpt, "--max_batch=8")
    try:
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
        name = os.path.basename(ckpt)
        prompts = ["ROMEO.\n", "But soft", "JULIET", "What light"] * 3
        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
            texts = list(pool.map(lambda p: c.completions.create(model=name, prompt=p, max_tokens=30,
                                                                 temperature=0).choices[0].text, prompts))
        assert texts == [ref(p, 30) for p in prompts]
        m = metrics(url)
        steps = {mode: m[f'idlm_steps_total{{mode="{mode}"}}'] for mode in ("wide", "narrow", "ar")}
        assert sum(steps.values()) == m["idlm_forwards_total"] > 0, steps
    finally:
        stop_server(proc, signal.SIGINT)
# ----------------------------------------------------------------------------------------------
# request forms, n, logprobs, echo, logit_bias, ignore_eos, every OpenAI parameter

def solo_ids(model_enc, ids, n, temperature=0.0, seed=None):
    model, enc = model_enc
    return isd_generate(model, ids,
                        SamplingParams(n, temperature=temperature, seed=seed, stop_ids=[enc.eot_token]),
                        stride=STRIDE)[0]


def full_logprobs(model, seq, start, k):
    """(log p(seq[i] | seq[:i]), [(id, log p)] of the k likeliest) for i >= start: one plain forward of
    the whole sequence (an independent reference), MASK excluded."""
    import torch
    with torch.no_grad():
        logits = model(torch.tensor([seq]))[0].clone()
    logits[:, model.cfg.mask_token_id] = -math.inf
    lp = logits.log_softmax(-1)
    tops = [lp[i - 1].topk(k) for i in range(start, len(seq))]
    return [(float(lp[i - 1, seq[i]]), list(zip(top.indices.tolist(), top.values.tolist())))
            for i, top in zip(range(start, len(seq)), tops)]


def token_str(enc, t):
    return enc.decode_bytes([t]).decode("utf-8", errors="replace")


def check_completion_logprobs(lp, enc, ids, want, text):
    """A completions logprobs object against the reference `want` for tokens `ids` of text `text`."""
    assert lp.tokens == [token_str(enc, t) for t in ids]
    assert lp.token_logprobs == pytest.approx([w for w, _ in want], abs=1e-9)
    for got, t, (w, top) in zip(lp.top_logprobs, ids, want):
        expected = {**{token_str(enc, i): v for i, v in top}, token_str(enc, t): w}
        assert got == pytest.approx(expected, abs=1e-9)
    # each token's offset is where its text starts: the characters its predecessors complete (a split
    # UTF-8 character counts once it is whole; the end-of-text token is not text)
    shown = [t for t in ids if t != enc.eot_token]
    assert [o for o, t in zip(lp.text_offset, ids) if t != enc.eot_token] == [len(codecs.getincrementaldecoder(
        "utf-8")("replace").decode(enc.decode_bytes(shown[:k]))) for k in range(len(shown))]
    assert text.startswith(enc.decode(shown))


def test_prompt_forms_n_choices_and_model_lookup(client, ref, ckpt, server, model_enc):
    name, enc = os.path.basename(ckpt), model_enc[1]
    prompts = ["ROMEO.\n", "But soft", "JULIET.\nCafé"]
    r = client.completions.create(model=name, prompt=prompts, max_tokens=12, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2] and [c.text for c in r.choices] == [ref(p, 12) for p in prompts]
    ids = [enc.encode_ordinary(p) for p in prompts]
    assert r.usage.prompt_tokens == sum(map(len, ids))
    assert r.usage.completion_tokens == sum(len(solo_ids(model_enc, i, 12)) for i in ids)
    # token ids, one list or several, give what their text gives
    r = client.completions.create(model=name, prompt=ids[1], max_tokens=12, temperature=0)
    assert [c.text for c in r.choices] == [ref(prompts[1], 12)]
    r = client.completions.create(model=name, prompt=ids[:2], max_tokens=12, temperature=0, echo=True)
    assert [c.text for c in r.choices] == [p + ref(p, 12) for p in prompts[:2]]
    # n sampled choices per prompt: choice i uses seed + i; index = prompt * n + i; streamed alike
    r = client.completions.create(model=name, prompt=prompts[:2], max_tokens=15, temperature=1.0, seed=5, n=3)
    want = [ref(p, 15, 1.0, seed=5 + i) for p in prompts[:2] for i in range(3)]
    assert [c.index for c in r.choices] == list(range(6)) and [c.text for c in r.choices] == want
    assert len(set(want[:3])) > 1
    assert r.usage.prompt_tokens == len(ids[0]) + len(ids[1])  # a prompt counts once, whatever n
    assert r.usage.completion_tokens == sum(len(solo_ids(model_enc, i, 15, 1.0, 5 + k)) for i in ids[:2]
                                            for k in range(3))
    chunks = list(client.completions.create(model=name, prompt=prompts[:2], max_tokens=15, temperature=1.0, seed=5,
                                            n=3, stream=True, stream_options={"include_usage": True}))
    texts = [""] * 6
    for c in chunks[:-1]:
        assert len(c.choices) == 1
        texts[c.choices[0].index] += c.choices[0].text
    assert texts == want and chunks[-1].usage == r.usage
    assert sorted(c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason) == list(range(6))
    messages = [{"role": "user", "content": "Who goes there?"}]
    r = client.chat.completions.create(model=name, messages=messages, max_tokens=20, temperature=0.9, seed=1, n=2)
    layout = "USER.\nWho goes there?\n\nASSISTANT.\n"
    assert [c.message.content for c in r.choices] == [ref(layout, 20, 0.9, seed=1 + i, stop="\n\n") for i in (0, 1)]
    # one model, and a 404 for any other
    assert client.models.retrieve(name).id == name
    missing = httpx.get(f"{server}/v1/models/gpt-4")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_chat_content_parts_and_developer_messages(client, ref, ckpt):
    name = os.path.basename(ckpt)
    parts = [{"type": "text", "text": "Who goes "}, {"type": "text", "text": "there?"}]
    r = client.chat.completions.create(model=name, messages=[{"role": "developer", "content": [
        {"type": "text", "text": "A street."}]}, {"role": "user", "content": parts}], max_tokens=30, temperature=0)
    assert r.choices[0].message.content == ref("[A street.]\n\nUSER.\nWho goes there?\n\nASSISTANT.\n", 30,
                                               stop="\n\n")


def test_logprobs_are_the_models_own_distribution(client, ckpt, model_enc):
    """Greedy requests' logprobs equal those of plain full forwards of the model (not ISD's drafts),
    streamed or not, for both endpoints; a sampled request's too (they do not depend on temperature)."""
    name, (model, enc) = os.path.basename(ckpt), model_enc
    for prompt, temperature, seed in (("ROMEO.\n", 0, None), ("JULIET.\nCafé", 1.2, 3)):
        ids = enc.encode_ordinary(prompt)
        out = solo_ids(model_enc, ids, 24, float(temperature), seed)
        want = full_logprobs(model, ids + out, len(ids), 3)
        kw = dict(model=name, prompt=prompt, max_tokens=24, temperature=temperature, seed=seed, logprobs=3)
        r = client.completions.create(**kw)
        check_completion_logprobs(r.choices[0].logprobs, enc, out, want, r.choices[0].text)
        if temperature == 0:  # greedy: the chosen token is the likeliest
            assert all(max(top, key=top.get) == t for top, t in zip(r.choices[0].logprobs.top_logprobs,
                                                                    r.choices[0].logprobs.tokens))
        chunks = list(client.completions.create(stream=True, **kw))
        streamed = {k: sum((getattr(c.choices[0].logprobs, k) for c in chunks if c.choices[0].logprobs), [])
                    for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
        assert streamed == r.choices[0].logprobs.model_dump()
    # chat: a stop string ends the reply inside a forward; logprobs cover the tokens usage counts
    messages = [{"role": "system", "content": "A street."}, {"role": "user", "content": "Who goes there?"}]
    ids = enc.encode_ordinary("[A street.]\n\nUSER.\nWho goes there?\n\nASSISTANT.\n")
    r = client.chat.completions.create(model=name, messages=messages, max_tokens=40, temperature=0, logprobs=True,
                                       top_logprobs=2)
    n = r.usage.completion_tokens
    out = solo_ids(model_enc, ids, 40)[:n]
    want = full_logprobs(model, ids + out, len(ids), 2)
    content = r.choices[0].logprobs.content
    assert [e.token for e in content] == [token_str(enc, t) for t in out]
    assert [e.logprob for e in content] == pytest.approx([w for w, _ in want], abs=1e-9)
    assert [bytes(e.bytes) for e in content] == [enc.decode_bytes([t]) for t in out]
    assert [[(x.token, x.logprob) for x in e.top_logprobs] for e in content] == \
        [[(token_str(enc, i), pytest.approx(v, abs=1e-9)) for i, v in top] for _, top in want]
    assert b"".join(bytes(e.bytes) for e in content).decode("utf-8", "replace").startswith(r.choices[0].message.content)
    chunks = list(client.chat.completions.create(model=name, messages=messages, max_tokens=40, temperature=0,
                                                 logprobs=True, top_logprobs=2, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert streamed == content
    r = client.chat.completions.create(model=name, messages=messages, max_tokens=5, temperature=0, logprobs=True)
    assert [e.top_logprobs for e in r.choices[0].logprobs.content] == [[]] * r.usage.completion_tokens


def test_echo_scores_a_prompt(client, ref, ckpt, model_enc):
    """max_tokens=0 with echo and logprobs: the prompt's own logprobs, as a harness scores a text."""
    name, (model, enc) = os.path.basename(ckpt), model_enc
    prompt = "But soft, what light through yonder window"
    ids = enc.encode_ordinary(prompt)
    want = [(None, None)] + full_logprobs(model, ids, 1, 2)
    r = client.completions.create(model=name, prompt=prompt, max_tokens=0, echo=True, logprobs=2)
    c = r.choices[0]
    assert (c.text, c.finish_reason, r.usage.completion_tokens, r.usage.prompt_tokens) == (prompt, "length", 0, len(ids))
    assert c.logprobs.token_logprobs[0] is None and c.logprobs.top_logprobs[0] is None
    assert c.logprobs.tokens == [token_str(enc, t) for t in ids]
    assert c.logprobs.token_logprobs[1:] == pytest.approx([w for w, _ in want[1:]], abs=1e-9)
    assert c.logprobs.text_offset == [len(enc.decode(ids[:k])) for k in range(len(ids))]
    # echo and a continuation: the prompt's logprobs, then the completion's, offsets over the whole text
    r = client.completions.create(model=name, prompt=prompt, max_tokens=6, temperature=0, echo=True, logprobs=1)
    out = solo_ids(model_enc, ids, 6)
    c = r.choices[0]
    assert c.text == prompt + ref(prompt, 6)
    assert c.logprobs.token_logprobs[1:] == pytest.approx([w for w, _ in full_logprobs(model, ids + out, 1, 1)],
                                                          abs=1e-9)
    assert c.logprobs.text_offset[len(ids)] == len(prompt)
    chunks = list(client.completions.create(model=name, prompt=prompt, max_tokens=6, temperature=0, echo=True,
                                            logprobs=1, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == c.text
    assert sum((ch.choices[0].logprobs.text_offset for ch in chunks if ch.choices[0].logprobs), []) == \
        c.logprobs.text_offset
    assert client.completions.create(model=name, prompt=prompt, max_tokens=0, echo=True).choices[0].text == prompt


def test_continuous_usage_stats_as_guidellm_sends_it(server, ckpt):
    """guidellm's default request, verbatim in form: chat content as parts, max_completion_tokens, ignore_eos,
    stream_options with vLLM's continuous_usage_stats: every text chunk carries the usage so far."""
    body = {"model": os.path.basename(ckpt), "stream": True, "max_completion_tokens": 12, "ignore_eos": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
            "messages": [{"role": "user", "content": [{"type": "text", "text": "But soft, what light"}]}]}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    texts = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]
    counts = [c["usage"]["completion_tokens"] for c in texts]
    assert texts and all(c.get("usage") for c in texts) and counts == sorted(counts)
    assert chunks[-1]["usage"]["completion_tokens"] == 12 and not chunks[-1]["choices"]


def test_logit_bias_and_ignore_eos(client, ckpt, model_enc):
    name, enc = os.path.basename(ckpt), model_enc[1]
    ids = enc.encode_ordinary("But soft")
    forced = enc.encode_ordinary("ROMEO")[0]
    r = client.completions.create(model=name, prompt="But soft", max_tokens=6, temperature=0,
                                  logit_bias={str(forced): 100})
    assert r.choices[0].text == enc.decode([forced] * 6)
    free = solo_ids(model_enc, ids, 20)
    r = client.completions.create(model=name, prompt="But soft", max_tokens=20, temperature=0,
                                  logit_bias={str(free[0]): -100})
    banned = Request(ids, SamplingParams(20, temperature=0.0, stop_ids=(enc.eot_token,)), logit_bias={free[0]: -100.0})
    decode(model_enc[0], [banned], STRIDE)  # isd.py's bias is checked against brute force in test_isd.py
    assert free[0] not in banned.out and r.choices[0].text == enc.decode([t for t in banned.out if t != enc.eot_token])
    # EOS made certain: the request ends at once; with ignore_eos it runs to max_tokens (EOS is not text)
    eot = {str(enc.eot_token): 100}
    r = client.completions.create(model=name, prompt="But soft", max_tokens=10, temperature=0, logit_bias=eot)
    assert (r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens) == ("", "stop", 1)
    r = client.completions.create(model=name, prompt="But soft", max_tokens=10, temperature=0, logit_bias=eot,
                                  extra_body={"ignore_eos": True})
    assert (r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens) == ("", "length", 10)
    # chat: the blank line that ends a speech stops a reply as EOS does, and ignore_eos ignores it alike
    nl = {str(enc.encode_ordinary("\n")[0]): 100}
    chat = dict(model=name, messages=[{"role": "user", "content": "Speak."}], max_tokens=8, temperature=0, logit_bias=nl)
    r = client.chat.completions.create(**chat)
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens < 8
    r = client.chat.completions.create(**chat, extra_body={"ignore_eos": True})
    assert (r.choices[0].finish_reason, r.usage.completion_tokens) == ("length", 8) and "\n\n" in r.choices[0].message.content


def test_every_openai_parameter_has_its_effect_or_a_400(client, ref, ckpt, model_enc):
    """Every parameter the openai client's create() takes, for both endpoints, sent through the client:
    each gets its effect (checked on the response) or a 400 naming it."""
    name, enc = os.path.basename(ckpt), model_enc[1]
    prompt, layout = "ROMEO.\n", "USER.\nWho goes there?\n\nASSISTANT.\n"
    base = {"completions": dict(model=name, prompt=prompt, max_tokens=8, temperature=0),
            "chat": dict(model=name, messages=[{"role": "user", "content": "Who goes there?"}], max_tokens=8,
                         temperature=0)}
    greedy = {"completions": ref(prompt, 8), "chat": ref(layout, 8, stop="\n\n")}
    forced = enc.encode_ordinary("ROMEO")[0]

    def text(r):
        return [c.text if hasattr(c, "text") else c.message.content for c in r.choices]

    def same(endpoint):  # accepted, without effect on the output
        return lambda r: text(r) == [greedy[endpoint]]

    def refused(*values):
        return [(v, None) for v in values]

    def sampled(endpoint, **kw):
        return lambda r: text(r) == [ref(prompt if endpoint == "completions" else layout, 8, 1.0, seed=4,
                                         stop=None if endpoint == "completions" else "\n\n", **kw)]
    common = {  # parameter: [(value, check of the response, or None: a 400 naming the parameter)]
        "model": [(name, lambda r: r.model == name)],
        "logit_bias": [({str(forced): 100}, lambda r: r.usage.completion_tokens == 8 and
                        text(r)[0].startswith(enc.decode([forced])))],
        "max_tokens": [(3, lambda r: r.usage.completion_tokens <= 3)],
        "n": [(2, lambda r: len(r.choices) == 2 and text(r)[0] == text(r)[1]), (0, None), (17, None)],
        "frequency_penalty": [(0, "same"), (0.5, None)],
        "presence_penalty": [(0, "same"), (-1.0, None)],
        "seed": [(4, "seeded")],
        "temperature": [(0, "same"), (1.0, "seeded")],
        "top_p": [(0.5, "top_p")],
        "stop": [("xyz-never", "same"), (["\n"], lambda r: "\n" not in text(r)[0])],
        "stream": [(True, "stream")],
        "stream_options": [({"include_usage": True}, "usage")],
        "user": [("u-1", "same")],
    }
    table = {
        "completions": {**common,
                        "prompt": [(prompt, "same"), ([prompt, prompt], lambda r: text(r) == [greedy["completions"]] * 2)],
                        "best_of": [(1, "same"), (2, None)],
                        "echo": [(True, lambda r: text(r) == [prompt + greedy["completions"]])],
                        "logprobs": [(2, lambda r: len(r.choices[0].logprobs.tokens) == r.usage.completion_tokens)],
                        "suffix": [("", "same"), ("the end", None)]},
        "chat": {**common,
                 "messages": [(base["chat"]["messages"], "same")],
                 "max_completion_tokens": [(2, lambda r: r.usage.completion_tokens <= 2)],
                 "logprobs": [(True, lambda r: len(r.choices[0].logprobs.content) == r.usage.completion_tokens)],
                 "top_logprobs": [(3, None)],  # without logprobs: a 400 (with it: test_logprobs_...)
                 "metadata": [({"k": "v"}, "same")],
                 "safety_identifier": [("s-1", "same")],
                 "prompt_cache_key": [("c-1", "same")],
                 "audio": refused({"voice": "alloy", "format": "wav"}),
                 "function_call": [("none", "same"), ("auto", None)],
                 "functions": refused([{"name": "f", "parameters": {"type": "object"}}]),
                 "tools": refused([{"type": "function", "function": {"name": "f"}}]),
                 "tool_choice": [("none", "same"), ("required", None)],
                 "parallel_tool_calls": refused(True),
                 "modalities": [(["text"], "same"), (["text", "audio"], None)],
                 "moderation": refused({"model": "omni-moderation-latest"}),
                 "prediction": refused({"type": "content", "content": "ROMEO"}),
                 "prompt_cache_options": refused({"ttl": "12h"}),
                 "prompt_cache_retention": refused("24h"),
                 "reasoning_effort": [("none", "same"), ("high", None)],
                 "response_format": [({"type": "text"}, "same"), ({"type": "json_object"}, None)],
                 "service_tier": [("auto", "same"), ("flex", None)],
                 "store": [(False, "same"), (True, None)],
                 "verbosity": [("medium", "same"), ("low", None)],
                 "web_search_options": refused({})},
    }
    for endpoint, create in (("completions", client.completions.create), ("chat", client.chat.completions.create)):
        params = set(inspect.signature(create).parameters) - {"extra_headers", "extra_query", "extra_body", "timeout"}
        assert set(table[endpoint]) == params, params ^ set(table[endpoint])
        for param, cases in table[endpoint].items():
            for value, check in cases:
                kw = {**base[endpoint], param: value}
                if param in ("seed", "top_p") or check == "seeded":
                    kw.update(temperature=1.0, seed=4)
                if param in ("stream_options",):
                    kw["stream"] = True
                if param == "max_completion_tokens":
                    del kw["max_tokens"]
                if check is None:
                    with pytest.raises(openai.BadRequestError) as e:
                        create(**kw)
                    assert e.value.param == param, (endpoint, param, value, e.value)
                    continue
                r = create(**kw)
                if check in ("stream", "usage"):
                    chunks = list(r)
                    got = "".join((c.choices[0].text if endpoint == "completions" else c.choices[0].delta.content or "")
                                  for c in chunks if c.choices)
                    assert got == greedy[endpoint] or check == "usage" and chunks[-1].usage.completion_tokens >= 1, \
                        (endpoint, param)
                    continue
                check = {"same": same(endpoint), "seeded": sampled(endpoint),
                         "top_p": sampled(endpoint, top_p=0.5)}.get(check, check)
                assert check(r), (endpoint, param, value, r)
    # the extensions, through extra_body; an unknown field is refused
    r = client.completions.create(**base["completions"], extra_body={"top_k": 1, "ignore_eos": False})
    assert text(r) == [greedy["completions"]]
    with pytest.raises(openai.BadRequestError, match="unknown parameter 'guided_json'"):
        client.chat.completions.create(**base["chat"], extra_body={"guided_json": {}})


# ----------------------------------------------------------------------------------------------
# operators: the API key, the access log, latency histograms

def test_api_key_access_log_and_latency_histograms(ckpt, ref):
    name = os.path.basename(ckpt)
    proc, url = start_server(ckpt, "--max_batch=2", env={"IDLM_API_KEY": "sekrit"})
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekrit"}):
            for method, path in (("GET", "/v1/models"), ("GET", f"/v1/models/{name}"), ("POST", "/v1/completions"),
                                 ("POST", "/v1/chat/completions")):
                r = httpx.request(method, url + path, headers=headers, json={"model": name, "prompt": "a"})
                assert r.status_code == 401, (path, headers)
                err = r.json()["error"]
                assert err["type"] == "invalid_request_error" and err["code"] == "invalid_api_key" and err["message"]
        assert httpx.get(f"{url}/health").status_code == 200 and httpx.get(f"{url}/metrics").status_code == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="sekrit", max_retries=0, timeout=60)
        r = client.completions.create(model=name, prompt="ROMEO.\n", max_tokens=10, temperature=0)
        assert r.choices[0].text == ref("ROMEO.\n", 10)
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model=name, prompt="But soft", max_tokens=12, temperature=0, stream=True))
        assert streamed == ref("But soft", 12)
        hist = {}
        for line in httpx.get(f"{url}/metrics").text.splitlines():
            if line.startswith("idlm_") and ("_bucket{" in line or line.split(" ")[0].endswith(("_sum", "_count"))):
                key, value = line.rsplit(" ", 1)
                hist[key] = float(value)
        for h in ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds"):
            buckets = [v for k, v in hist.items() if k.startswith(f"idlm_{h}_bucket{{le=")]
            assert buckets == sorted(buckets) and buckets[-1] == hist[f"idlm_{h}_count"] and len(buckets) > 5
            assert f'idlm_{h}_bucket{{le="+Inf"}}' in hist and hist[f"idlm_{h}_sum"] > 0
        assert hist["idlm_time_to_first_token_seconds_count"] == hist["idlm_e2e_request_latency_seconds_count"] == 2
    finally:
        rc, log = stop_server(proc, signal.SIGINT)
    assert rc == 0, log
    access = [line for line in log.splitlines() if line.startswith("access: ")]
    assert sum(" 401 " in line for line in access) == 13
    done = [line.split() for line in access if line.startswith("access: POST /v1/completions 200")]
    assert len(done) == 2 and all(w[4].endswith("ms") for w in done)
    assert [w[5:] for w in done] == [[f"prompt_tokens={len(tok.load(ckpt).encode_ordinary(p))}",
                                      f"completion_tokens={n}"] for p, n in (("ROMEO.\n", r.usage.completion_tokens),
                                                                             ("But soft", len(solo_tokens(ckpt))))]


def solo_tokens(ckpt):
    model, enc = Model.load(ckpt).eval(), tok.load(ckpt)
    return isd_generate(model, enc.encode_ordinary("But soft"),
                        SamplingParams(12, temperature=0.0, stop_ids=[enc.eot_token]), stride=STRIDE)[0]


def test_access_log_can_be_turned_off(capsys):
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def get(gate, path, **kw):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gate), base_url="http://t") as c:
            return (await c.get(path, **kw)).status_code

    assert asyncio.run(get(serve.Gate(app), "/v1/models")) == 200
    assert capsys.readouterr().err.startswith("access: GET /v1/models 200 ")
    assert asyncio.run(get(serve.Gate(app, "k", access_log=False), "/v1/models")) == 401
    assert asyncio.run(get(serve.Gate(app, "k", access_log=False), "/v1/models",
                           headers={"Authorization": "Bearer k"})) == 200
    assert asyncio.run(get(serve.Gate(app, "k", access_log=False), "/health")) == 200
    assert capsys.readouterr().err == ""
