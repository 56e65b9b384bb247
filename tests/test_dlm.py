"""dlm.py: the diffusion-LM baseline's masks, loss and decoder against references built from the rules
(not from dlm.py), and the introspective acceptance rate of every family (tiny float64 models)."""
import json
import os
import subprocess
import sys

import pytest
import torch

import bench.__main__
import data
import dlm
import sample
import train
from decoding import SamplingParams
from isd import Request
from reference import V23, rand_tokens, tiny_model, train_tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V = V23["vocab"]  # tiny_model(**V23)'s vocabulary; MASK = V - 1 = 22


def brute_bdlm_mask(L, b):
    """The block-diffusion mask over [xt | x0], entry by entry from the rules."""
    m = torch.zeros(2 * L, 2 * L, dtype=torch.bool)
    for q in range(2 * L):
        for k in range(2 * L):
            qi, ki = q % L, k % L
            if q < L and k < L:
                m[q, k] = qi // b == ki // b
            elif q < L:
                m[q, k] = ki // b < qi // b
            elif k >= L:
                m[q, k] = ki <= qi
    return m


@pytest.mark.parametrize("L,b", [(1, 1), (7, 1), (8, 4), (10, 3), (9, 16)])
def test_bdlm_mask_matches_bruteforce(L, b):
    assert torch.equal(dlm.bdlm_mask(L, b), brute_bdlm_mask(L, b))


def ref_block_logits(model, clean, noisy):
    """Logits of the noisy block `noisy` after the clean tokens `clean` (1-D), from one forward whose
    mask is built by loops: clean tokens causal, block tokens see every clean token and the whole block."""
    s, e = len(clean), len(clean) + len(noisy)
    mask = torch.tensor([[k <= q if q < s else True for k in range(e)] for q in range(e)])
    return model(torch.cat([clean, noisy])[None], mask=mask)[0, s:]


def masked_ce(logits, target):
    """-log p(target) with MASK (the last id) left out of the softmax."""
    logits = logits[:-1]
    return torch.logsumexp(logits, -1) - logits[target]


@pytest.mark.parametrize("block", [None, 1, 3, 4])
def test_dlm_loss_matches_slow_reference(block):
    model = tiny_model(seed=1, **V23)
    g = torch.Generator().manual_seed(0)
    x0 = rand_tokens(g, (3, 10), V)
    got = dlm.dlm_loss(model, x0, block, torch.Generator().manual_seed(5))
    # the same draws in the same order: t per row, then one uniform per token
    g = torch.Generator().manual_seed(5)
    t = dlm.EPS + (1 - dlm.EPS) * torch.rand(3, 1, generator=g)
    masked = torch.rand(3, 10, generator=g) < t
    total = torch.zeros((), dtype=torch.float64)
    for r in range(3):
        xt = torch.where(masked[r], torch.full_like(x0[r], V - 1), x0[r])
        if block is None:
            rows = [(0, 10, model(xt[None], mask=torch.ones(10, 10, dtype=torch.bool))[0])]
        else:
            rows = [(s, min(s + block, 10), ref_block_logits(model, x0[r, :s], xt[s:s + block]))
                    for s in range(0, 10, block)]
        for s, e, logits in rows:
            for i in range(s, e):
                if masked[r, i]:
                    total = total + masked_ce(logits[i - s], x0[r, i]) / t[r, 0]
    assert masked.any() and not masked.all()
    assert torch.allclose(got, total / 30, atol=1e-10, rtol=0)


def test_dlm_loss_trains_every_parameter_and_only_reads_left_for_blocks():
    model = tiny_model(seed=2, **V23)
    g = torch.Generator().manual_seed(1)
    x0 = rand_tokens(g, (2, 8), V)
    dlm.dlm_loss(model, x0, 4, torch.Generator().manual_seed(3)).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    # the first block's loss is the same whatever the later blocks hold (causal across blocks)
    x1 = x0.clone()
    x1[:, 4:] = rand_tokens(g, (2, 4), V)
    first = lambda x: dlm.denoise_logits(model, "bdlm", x, 0, 4, 4)  # noqa: E731
    assert torch.allclose(first(x0), first(x1), atol=1e-12)


@pytest.mark.parametrize("n,steps", [(4, 4), (5, 2), (3, 7), (7, 1)])
def test_block_schedule(n, steps):
    plan = dlm.block_schedule(n, steps)
    assert sum(plan) == n and len(plan) == min(n, steps) and max(plan) - min(plan) <= 1 and min(plan) >= 1


@pytest.mark.parametrize("family", dlm.FAMILIES)
@pytest.mark.parametrize("prompt_len,steps,threshold,temperature",
                         [(4, 4, None, 1.0), (5, 2, None, 0.8), (3, 1, None, 1.0), (6, 4, 0.3, 1.0), (2, 4, None, 0.0)])
def test_decoder_fills_every_position_never_mask(family, prompt_len, steps, threshold, temperature):
    model = tiny_model(seed=3, **V23)
    prompt = rand_tokens(torch.Generator().manual_seed(prompt_len), (prompt_len,), V).tolist()
    n, block = 11, 4
    out, q, _, st = dlm.dlm_generate(model, family, prompt,
                                     SamplingParams(n, temperature=temperature, seed=7),
                                     block=block, steps=steps, threshold=threshold)
    assert len(out) == n and model.cfg.mask_token_id not in out and all(0 <= t < V for t in out)
    assert st.tokens == n and torch.isfinite(q.gather(1, torch.tensor(out)[:, None])).all()
    # blocks are aligned to position 0; the first one may be cut by the prompt
    ends = sorted({min((p // block + 1) * block, prompt_len + n) for p in range(prompt_len, prompt_len + n)})
    sizes = [e - s for s, e in zip([prompt_len] + ends[:-1], ends)]
    if threshold is None:
        assert st.forwards == sum(min(steps, k) for k in sizes)
    else:
        assert len(sizes) <= st.forwards <= n
    if temperature == 0:  # greedy: every token is the argmax of the distribution it was committed from
        assert q.argmax(-1).tolist() == out


def test_decoder_seeded_and_bad_settings():
    model = tiny_model(seed=4, **V23)
    a = dlm.dlm_generate(model, "dlm", [1, 2, 3], SamplingParams(9, seed=11), block=4, steps=2)[0]
    assert a == dlm.dlm_generate(model, "dlm", [1, 2, 3], SamplingParams(9, seed=11), block=4, steps=2)[0]
    for kw, needle in [(dict(family="ar"), "family"), (dict(steps=0), "steps"), (dict(threshold=1.5), "threshold"),
                       (dict(params=SamplingParams(100)), "exceeds the context")]:
        args = {**dict(family="bdlm", prompt_ids=[1, 2], params=SamplingParams(5), steps=2), **kw}
        with pytest.raises(ValueError, match=needle):
            dlm.dlm_generate(model, **args)


def canvases_of(model, family, prompt, n, block, steps, threshold, temperature, seed):
    """dlm_generate's (out, q, parallel, stats), and the canvas after each of its forwards, read from the
    token ids the model was given (each forward's input is the canvas before it) and the final text."""
    inputs, forward = [], model.forward
    model.forward = lambda idx, *args, **kw: forward(inputs.append(idx[0].clone()) or idx, *args, **kw)
    try:
        res = dlm.dlm_generate(model, family, prompt,
                               SamplingParams(n, temperature=temperature, seed=seed),
                               block=block, steps=steps, threshold=threshold)
    finally:
        del model.forward
    return res, inputs[1:] + [torch.tensor(prompt + res[0])]


@pytest.mark.parametrize("family", dlm.FAMILIES)
@pytest.mark.parametrize("steps,threshold,temperature", [(1, None, 1.0), (2, None, 0.0), (2, None, 1.0),
                                                         (4, None, 0.0), (4, None, 1.0), (4, 0.3, 1.0)])
def test_parallel_flags_follow_the_order_of_unmasking(family, steps, threshold, temperature):
    """A token is committed in parallel iff another token of its block was unmasked in the same forward, or
    one to its left in the block (after the prompt) was unmasked in a later forward."""
    model, block, flags = tiny_model(seed=8, **V23), 4, []
    for P, n in [(1, 9), (4, 7), (6, 10)]:
        prompt = rand_tokens(torch.Generator().manual_seed(P), (P,), V).tolist()
        (out, _, parallel, st), canvases = canvases_of(model, family, prompt, n, block, steps, threshold,
                                                       temperature, seed=P)
        assert len(canvases) == st.forwards
        when = {i: next(s for s, c in enumerate(canvases) if len(c) > i and c[i] != V - 1) for i in range(P, P + n)}
        ref = [any(j != i and j // block == i // block and (when[j] == when[i] or j < i and when[j] > when[i])
                   for j in when) for i in when]
        assert parallel.tolist() == ref
        flags += ref
    assert (steps == 1) == all(flags) and any(flags)  # one step per block commits (almost) every token in parallel


def bdlm_requests(temperature, seed=0, stop_ids=()):
    """Requests of different prompt lengths (the first block cut at offsets 0..3) and lengths, and at
    temperature > 0 different top-k / top-p."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(1, 9), (2, 10), (3, 11), (4, 12), (5, 5), (7, 8), (9, 13), (12, 1)]
    filters = [(None, None), (5, None), (None, 0.9), (8, 0.8)] if temperature else [(None, None)]
    return [Request(rand_tokens(g, (P,), V).tolist(),
                    SamplingParams(n, temperature, *filters[i % len(filters)], seed=seed + i, stop_ids=stop_ids))
            for i, (P, n) in enumerate(shapes)]


@pytest.mark.parametrize("steps,threshold", [(1, None), (2, None), (3, None), (4, None), (4, 0.3)])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_cached_batched_bdlm_equals_uncached_decoder(steps, threshold, temperature):
    """bdlm_decode (KV cache, one batch) gives each request the tokens, q, parallel flags and forwards of
    the uncached dlm_generate alone with the same seed (float64)."""
    model = tiny_model(seed=9, **V23)
    reqs = bdlm_requests(temperature, seed=3)
    got = dlm.bdlm_decode(model, "bdlm", reqs, 4, steps, threshold)
    for r, (q, parallel) in zip(reqs, got):
        out, q_ref, par_ref, st = dlm.dlm_generate(model, "bdlm", r.prompt, r.params, block=4, steps=steps, threshold=threshold)
        assert r.out == out and torch.equal(parallel, par_ref) and torch.allclose(q, q_ref, atol=1e-10, rtol=0)
        assert (r.stats.forwards, r.stats.tokens) == (st.forwards, st.tokens) and r.done
    assert len({len(r.prompt) % 4 for r in reqs}) == 4  # every cut of the first block


def test_bdlm_batch_gives_each_row_what_it_gives_alone_and_stops():
    model = tiny_model(seed=10, **V23)
    batch = bdlm_requests(1.0, seed=4)
    dlm.bdlm_decode(model, "bdlm", batch, 4, 2)
    for r in batch:
        alone = bdlm_requests(1.0, seed=4)[batch.index(r)]
        dlm.bdlm_decode(model, "bdlm", [alone], 4, 2)
        assert alone.out == r.out and alone.stats.forwards == r.stats.forwards
    # a stop id ends a request once every token up to it is unmasked: the uncached text, cut after it
    stop = batch[2].out[5]
    stopped = bdlm_requests(1.0, seed=4, stop_ids=(stop,))
    dlm.bdlm_decode(model, "bdlm", stopped, 4, 2)
    for r, full in zip(stopped, batch):
        cut = full.out[:full.out.index(stop) + 1] if stop in full.out else full.out
        assert r.out == cut and r.stats.forwards <= full.stats.forwards
    assert any(len(r.out) < len(f.out) for r, f in zip(stopped, batch))


def test_bdlm_decode_refuses_what_has_no_cache():
    model = tiny_model(seed=11, **V23)
    for family, kw, needle in [("dlm", {}, "nothing|no key or value"), ("bdlm", dict(steps=0), "steps"),
                               ("bdlm", dict(threshold=1.0), "threshold")]:
        with pytest.raises(ValueError, match=needle):
            dlm.bdlm_decode(model, family, [Request([1, 2], SamplingParams(5))], **kw)
    with pytest.raises(ValueError, match="exceeds the context"):
        dlm.bdlm_decode(model, "bdlm", [Request([1, 2], SamplingParams(5)), Request([1] * 60, SamplingParams(5))])


def test_block_window_matches_rules():
    for n_clean, n_block, T in [(0, 4, 4), (3, 4, 9), (5, 2, 7), (8, 3, 11), (1, 1, 2)]:
        m = dlm.block_window(n_clean, n_block, 4, T)
        e = n_clean + n_block
        ref = torch.tensor([[k == q or (k <= q if q < n_clean else q < e and k < e) for k in range(T)]
                            for q in range(T)])
        assert torch.equal(m, ref), (n_clean, n_block)


# ----------------------------------------------------------------------------------------------
# the metric

@pytest.mark.parametrize("family", dlm.FAMILIES)
def test_left_to_right_logits_match_reference(family):
    model = tiny_model(seed=7, **V23)
    ids = rand_tokens(torch.Generator().manual_seed(1), (2, 10), V)
    got = dlm.left_to_right_logits(model, family, ids, 3, block=4)
    for r in range(2):
        for i in range(3, 10):
            hidden = torch.cat([ids[r, :i], torch.full((10 - i,), V - 1)])
            if family == "dlm":  # the whole canvas, bidirectional
                ref = model(hidden[None], mask=torch.ones(10, 10, dtype=torch.bool))[0, i]
            else:  # clean blocks before i's block, then i's block with i.. hidden
                s = i // 4 * 4
                ref = ref_block_logits(model, ids[r, :s], hidden[s:s + 4])[i - s]
            assert torch.allclose(got[r, i - 3], ref, atol=1e-10)


# ----------------------------------------------------------------------------------------------
# train.py --objective=dlm / bdlm and the command lines

@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("dlm")
    train_tiny(d, [["--max_iters=30", "--eval_interval=10", "--eval_iters=2", f"--out_dir={d}/{obj}",
                    f"--objective={obj}"] for obj in ("dlm", "bdlm", "idlm", "ar")])
    return d


@pytest.mark.parametrize("obj", dlm.FAMILIES)
def test_train_lowers_the_bound(ckpts, obj):
    evals = json.load(open(ckpts / obj / "train_state.json"))["evals"]
    assert evals[-1][1] < evals[0][1] - 0.3  # the validation bound falls
    assert dlm.load(str(ckpts / obj))[2:] == (obj, 4)


def cli(script, *args):
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_sample_cli_json(ckpts):
    r = cli("sample.py", f"--out_dir={ckpts}/bdlm", "--prompt=ROMEO:", "--max_new_tokens=9", "--steps=2", "--json",
            "--seed=1")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert len(got["tokens"]) == 9 and 300 not in got["tokens"] and got["stats"]["tpf"] > 1


@pytest.mark.parametrize("obj", dlm.FAMILIES)
def test_sample_decodes_a_diffusion_lm_with_dlm_generate(ckpts, obj, capsys, monkeypatch):
    """sample.py hands a diffusion LM's checkpoint to dlm.dlm_generate: its tokens, seed for seed (at dlm.py's
    default temperature 1), and its figures in the statistics line."""
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))  # decode_threads: leave the process's be
    model, enc, family, block = dlm.load(str(ckpts / obj))
    ids = enc.encode_ordinary("ROMEO:")
    for opts, steps, threshold in (([], block, None), (["--steps=2"], 2, None), (["--threshold=0.3"], block, 0.3)):
        sample.main([f"--out_dir={ckpts}/{obj}", "--prompt=ROMEO:", "--max_new_tokens=9", "--seed=1", *opts, "--json"])
        got = json.loads(capsys.readouterr().out)
        want, _, _, st = dlm.dlm_generate(model, family, ids, SamplingParams(9, 1.0, seed=1), block, steps, threshold)
        assert got["tokens"] == want and got["text"] == enc.decode(want) and got["stats"]["forwards"] == st.forwards
    sample.main([f"--out_dir={ckpts}/{obj}", "--prompt=ROMEO:", "--max_new_tokens=8", "--steps=1", "--temperature=0"])
    text, stats = capsys.readouterr().out.splitlines()[-2:]
    st = dlm.dlm_generate(model, family, ids, SamplingParams(8, 0), block, 1)[3]
    assert st.tpf > 1 and stats.startswith(f"model {ckpts}/{obj} | {obj} | block 4 | 8 tokens in {st.forwards} "
                                           f"forwards | TPF {st.tpf:.2f} | ")
    assert stats.endswith(" tok/s") and "acceptance" not in stats and text.startswith("ROMEO:")


def test_an_option_of_the_other_family_is_an_error(ckpts, capsys):
    """ISD's options with a diffusion LM, a diffusion LM's with an I-DLM or AR checkpoint: a one-line error
    naming the option, before anything loads; MLX (no diffusion decoder) refuses a diffusion LM."""
    for obj, opt in (("idlm", "--steps=2"), ("ar", "--block=4"), ("idlm", "--threshold=0.5"), ("dlm", "--stride=4"),
                     ("bdlm", "--narrow"), ("dlm", "--compare"), ("bdlm", "--visualize"), ("dlm", "--chat")):
        with pytest.raises(SystemExit) as e:
            sample.main([f"--out_dir={ckpts}/{obj}", opt])
        err = capsys.readouterr().err.splitlines()[-1]
        assert e.value.code == 2 and f"error: {opt.split('=')[0]} is for " in err, err
    with pytest.raises(SystemExit) as e:
        sample.cli.main([f"--out_dir={ckpts}/dlm"], None, None, None)  # as python -m mlx_port.sample runs it
    assert e.value.code == 2 and "only PyTorch decodes" in capsys.readouterr().err.splitlines()[-1]


@pytest.mark.slow  # end to end (a subprocess, a whole command): CI runs it, -m 'not slow' skips it
def test_wrong_family_is_a_one_line_error(ckpts):
    r = cli("sample.py", f"--out_dir={ckpts}/idlm", "--steps=2")  # the error is the last line, after argparse's usage
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "--steps is for a diffusion LM" in r.stderr.splitlines()[-1] and "decoded by ISD" in r.stderr.splitlines()[-1]
    r = cli("sample.py", f"--out_dir={ckpts}/bdlm", "--block=3")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "--block must be 4" in r.stderr.splitlines()[-1], r.stderr
    r = cli("sample.py", f"--out_dir={ckpts}/dlm", "--stride=2")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "--stride is for I-DLM and AR checkpoints" in r.stderr.splitlines()[-1]
    assert "holds a diffusion LM (objective=dlm)" in r.stderr.splitlines()[-1]
    with pytest.raises(train.UsageError, match="--lora adapters act only at MASK"):
        train.check_options(train.parse_args(["--objective=dlm", "--lora=4", "--init_from=x"])[0], set())


@pytest.mark.slow  # end to end (a subprocess, a whole command): CI runs it, -m 'not slow' skips it
def test_bench_introspect_rows(ckpts, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data, "CACHE_DIR", str(ckpts / "cache"))
    plot, md = tmp_path / "gap.png", tmp_path / "gap.md"
    argv = ["introspect", "--models=" + ",".join(str(ckpts / m) for m in ("ar", "idlm", "dlm", "bdlm")),
            "--n=2", "--prompt_len=8", "--max_new_tokens=6", "--dlm_steps=4,1", "--json", "--no_progress",
            f"--plot={plot}", f"--markdown={md}"]
    bench.__main__.main(argv)
    rows = json.loads(capsys.readouterr().out)
    keys = {"model", "val_loss", "judge_ppl", "introspective_acceptance", "draft_acceptance", "parallel_acceptance",
            "tokens_per_forward", "tokens_per_s"}
    assert all(keys <= set(r) for r in rows) and plot.stat().st_size > 0
    # --markdown: what was printed, under the command; the rows as JSON beside it
    shown = " ".join(a for a in argv if not a.startswith("--markdown"))
    threads = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    assert md.read_text().startswith(f"Command: `{threads}python -m bench {shown}`")
    assert json.loads((tmp_path / "gap.json").read_text())["rows"] == rows
    ref, ar, idlm_row, *diffusion = rows
    assert ref["family"] == "data" and len(diffusion) == 4
    assert abs(ar["introspective_acceptance"] - 1) < 1e-5 and ar["tokens_per_forward"] == 1  # the AR identity
    assert ar["draft_acceptance"] is None and ar["parallel_acceptance"] is None
    assert 1 <= idlm_row["tokens_per_forward"] <= 4 and 0 <= idlm_row["draft_acceptance"] <= 1
    state = json.load(open(ckpts / "idlm" / "train_state.json"))
    assert idlm_row["val_loss"] == state["evals"][-1][2]  # the clean stream's NLL
    for r, steps in zip(diffusion, (4, 1, 4, 1)):
        # 6 tokens after 8: blocks [8, 12) and [12, 14); one step per token, or one step per block
        assert r["tokens_per_forward"] == (1.0 if steps == 4 else 3.0)
        assert 0 <= r["introspective_acceptance"] <= 1 and "bound" in r["val_loss_kind"]
        # a whole block in one step is committed in parallel; one token per step only when a position to its
        # left is still masked
        assert r["parallel_share"] == 1.0 if steps == 1 else 0 <= r["parallel_share"] < 1
        assert (r["parallel_acceptance"] is None) == (r["parallel_share"] == 0) and r["draft_acceptance"] is None
    assert all(r["judge_ppl"] > 1 and r["judge_ppl"] < 1e6 for r in rows)


@pytest.mark.slow  # end to end (a subprocess, a whole command): CI runs it, -m 'not slow' skips it
def test_bench_concurrency_rows(ckpts, monkeypatch, capsys):
    monkeypatch.setattr(data, "CACHE_DIR", str(ckpts / "cache"))
    rows = bench.__main__.main(["concurrency", f"--idlm={ckpts}/idlm", f"--bdlm={ckpts}/bdlm", "--concurrency=1,3",
                       "--prompt_len=8", "--max_new_tokens=8", "--ar"])
    table = capsys.readouterr().out
    assert len(rows) == 8 and table.count("\n| ") == 9  # the header, 2 x 4 settings
    for r in rows:
        assert r["tokens"] == 8 * r["concurrency"] and r["tokens_per_s"] > 0
        assert (r["judge_ppl"] is None) == (r["concurrency"] == 1) and (r["judge_ppl"] or 2) > 1
    tpf = [r["tokens_per_forward"] for r in rows[:4]]
    assert 1 <= tpf[0] <= 4 and tpf[1:] == [2.0, 4.0, 1.0]  # ISD; bdlm at 2 and 1 steps per block of 4; AR
    assert rows[0]["idlm_ratio"] == 1 and rows[1]["idlm_ratio"] == rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"]


def test_bench_recipes_rows(ckpts, tmp_path, monkeypatch, capsys):
    """python -m bench recipes reads how each checkpoint was made from its train_state.json, and measures greedy
    TPF with ISD (an AR model's untrained masks: still between 1 and N tokens per forward)."""
    monkeypatch.setattr(data, "CACHE_DIR", str(ckpts / "cache"))
    conv = tmp_path / "conv"
    train.main(["--preset=tiny", "--vocab_size=300", "--seq_len=32", "--max_iters=4", "--eval_interval=4",
                "--eval_iters=2", f"--init_from={ckpts / 'ar'}", f"--out_dir={conv}", "--alpha=3"])
    rows = bench.__main__.main(["recipes", f"--models={ckpts / 'ar'},{ckpts / 'idlm'},{conv}", "--prompts=2",
                       "--max_new_tokens=6"])
    ar, idlm, converted = rows
    assert (ar["ar_steps"], ar["idlm_steps"], idlm["ar_steps"], idlm["idlm_steps"]) == (30, 0, 0, 30)
    assert (converted["ar_steps"], converted["idlm_steps"], converted["alpha"]) == (30, 4, 3.0)
    for r, out in zip(rows, ("ar", "idlm", conv)):
        state = json.load(open(os.path.join(ckpts, out, "train_state.json")))
        assert r["val_clean_loss"] == state["evals"][-1][2] and 1 <= r["tpf"] <= 4 and r["tpf_distilled"] is None
    assert f"{idlm['val_clean_loss'] / ar['val_clean_loss'] - 1:+.1%}" in capsys.readouterr().out
