"""options.py: a run of another length than its preset's keeps the recipe's proportions (the values below
are worked out by hand from the cpu preset: 800 steps, 400 of them AR, 1000 distillation steps), and a
short self-distillation makes no more rollouts than its steps read."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import options  # noqa: E402
from options import DistillConfig, PRESETS, UsageError, check_options, distill_config, parse_args  # noqa: E402


def test_the_cpu_preset_is_what_the_scaling_assumes():
    p = PRESETS["cpu"]
    assert (p["max_iters"], p["ar_iters"], p["distill_iters"]) == (800, 400, 1000)


@pytest.mark.parametrize("argv,ar,distill,said", [
    ([], 400, 1000, False),  # the preset as it is
    (["--max_iters=800"], 400, 1000, False),
    (["--max_iters=30"], 15, 38, True),  # 400 * 30/800 = 15, 1000 * 30/800 = 37.5 -> 38
    (["--max_iters=1600"], 800, 2000, True),
    (["--max_iters=1"], 0, 1, True),  # AR needs fewer steps than the run (from scratch then), distillation >= 1
    (["--max_iters=30", "--distill_iters=5"], 15, 5, True),  # given: kept
    (["--max_iters=30", "--ar_iters=20", "--distill_iters=0"], 20, 0, False),
    (["--max_iters=30", "--init_from=out"], 0, 38, True),  # not from scratch: no AR part, as before
])
def test_max_iters_scales_the_recipe(argv, ar, distill, said, capsys):
    cfg, given = parse_args(argv)
    assert (cfg["ar_iters"], cfg["distill_iters"]) == (ar, distill)
    out = capsys.readouterr().out
    assert ("the recipe scaled with it" in out) == said, out
    if not cfg.get("init_from"):
        check_options(cfg, given)  # a valid run, whatever the length (--max_iters=30 failed on ar_iters=400)


def test_other_presets_and_resume_are_not_scaled(capsys):
    cfg, _ = parse_args(["--preset=tiny", "--max_iters=5"])  # no recipe in the tiny preset
    assert (cfg["ar_iters"], cfg["distill_iters"]) == (0, 0)
    cfg, _ = parse_args(["--resume", "--max_iters=1600"])  # a resumed run's recipe is its checkpoint's
    assert (cfg["ar_iters"], cfg["distill_iters"]) == (400, 1000)
    assert capsys.readouterr().out == ""
    with pytest.raises(UsageError, match="ar_iters"):
        cfg, given = parse_args(["--max_iters=30", "--ar_iters=30"])
        check_options(cfg, given)


def test_distill_config_of_a_run():
    d = DistillConfig()
    cfg, _ = parse_args([])
    full = distill_config(cfg)
    assert (full.iters, full.n_rollouts, full.seq_len, full.seed) == (1000, d.n_rollouts, cfg["seq_len"], cfg["seed"])
    short = distill_config({**cfg, "distill_iters": 38})
    assert (short.iters, short.n_rollouts) == (38, 38 * d.batch_size)  # 608 rows read, 608 rollouts made
    assert options.distill_config({**cfg, "distill_iters": 1}).n_rollouts == d.batch_size
