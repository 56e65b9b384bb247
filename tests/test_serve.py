"""serve.py as a live server on 127.0.0.1 (a subprocess), driven by the official openai client.

References: isd_generate on the same checkpoint, one request at a time, with the same seed (the
scheduler must not change what a request gives), and the chat layout written out by hand.
"""
import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tokenizer as tok  # noqa: E402
from isd import isd_generate  # noqa: E402
from model import Model  # noqa: E402
from test_scheduler import save_checkpoint  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STRIDE, CONTEXT = 3, 512


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(ckpt, *args):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "serve.py", f"--out_dir={ckpt}", f"--port={port}", f"--stride={STRIDE}",
                             *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(proc.stdout.read())
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not start in 60 s")


def stop_server(proc, sig):
    proc.send_signal(sig)
    try:
        rc = proc.wait(timeout=30)
    finally:
        proc.kill()
    return rc, proc.stdout.read()


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
def ref(ckpt):
    """text the model gives for a prompt alone (isd_generate), EOS dropped, cut at `stop`."""
    model, enc = Model.load(ckpt).eval(), tok.load(ckpt)

    def run(prompt, n, temperature=0.0, top_k=None, top_p=None, seed=None, stop=None):
        out = isd_generate(model, enc.encode_ordinary(prompt), n, STRIDE, temperature, top_k, top_p, seed,
                           stop_ids=[enc.eot_token])[0]
        text = enc.decode([t for t in out if t != enc.eot_token])
        return text[:text.find(stop)] if stop and stop in text else text
    return run


def metrics(url):
    lines = httpx.get(f"{url}/metrics").text.splitlines()
    return {k: float(v) for k, v in (line.rsplit(" ", 1) for line in lines if not line.startswith("#"))}


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
    ("/v1/completions", {"model": "{name}", "prompt": "a", "n": 2}, 400, "'n' must be 1", "n"),
    ("/v1/completions", {"model": "{name}", "prompt": "a", "stop": [""]}, 400, "stop strings", "stop"),
    ("/v1/completions", {"model": "{name}", "prompt": ["a", "b"]}, 400, "one prompt", "prompt"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "a"}, 404, "model 'gpt-4' does not exist", "model"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "a", "stream": True}, 404, "does not exist", "model"),
    ("/v1/chat/completions", {"model": "{name}", "messages": []}, 400, "at least one message", "messages"),
    ("/v1/chat/completions", {"model": "{name}", "messages": "hi"}, 400, "valid list", "messages"),
    ("/v1/chat/completions", {"model": "{name}", "messages": [{"role": "king", "content": "x"}]}, 400, "'user'",
     "messages.0.role"),
    ("/v1/chat/completions", {"model": "{name}", "messages": [{"role": "user"}]}, 400, "missing", "messages.0.content"),
    ("/v1/chat/completions", {"model": "{name}", "messages": [{"role": "user", "content": "x"}],
                              "max_completion_tokens": 0}, 400, "must be >= 1", "max_tokens"),
    ("/v1/nothing", {}, 404, "Not Found", None),
]


def test_bad_input_gets_4xx_with_an_openai_error(server, ckpt):
    name = os.path.basename(ckpt)
    for path, body, status, words, param in BAD:
        body = (json.dumps(body) if isinstance(body, dict) else body).replace("{name}", name)
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
