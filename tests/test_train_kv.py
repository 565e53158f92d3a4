"""`train-kv`: a few steps end to end, the files it writes, resuming, the command line and bad arguments."""
import argparse
import importlib.util
import json
import sys

import pytest
import torch

from gradmem_fast import __main__ as cli
from gradmem_fast import train_kv

TINY = ["--pairs", "1", "--memory", "2", "--steps", "1", "--batch", "4", "--eval-samples", "4",
        "--eval-every", "2", "--checkpoint-every", "2", "--log-every", "1", "--warmup", "1", "--threads", "1",
        "--backend", "reference"]  # the fast engine would run under the Triton interpreter here


def test_trains_evaluates_checkpoints_and_resumes(tmp_path):
    out = tmp_path / "run"
    assert train_kv.main(TINY + ["--train-steps", "2", "--out", str(out)]) == 0
    first = json.loads((out / "metrics.json").read_text())
    assert [h["step"] for h in first["history"]] == [1, 2]
    assert [e["step"] for e in first["evals"]] == [2]
    assert [s["steps"] for s in first["step_scaling"]] == [0, 1, 2, 3, 4]
    assert all(0.0 <= s["exact_match"] <= 1.0 for s in first["step_scaling"])
    assert first["chance"]["uniform"] == pytest.approx(62.0 ** -2)
    assert (out / "checkpoint" / "gradmem.safetensors").is_file()
    saved = torch.load(out / "checkpoint" / "train_state.pt", weights_only=False)
    assert saved["step"] == 2
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "kv_retrieval.png").stat().st_size > 1000
    else:
        assert not (out / "kv_retrieval.png").exists()

    # the command line entry resumes from the checkpoint and continues to step 3
    assert cli.main(["train-kv"] + TINY + ["--train-steps", "3", "--out", str(out)]) == 0
    resumed = json.loads((out / "metrics.json").read_text())
    assert [h["step"] for h in resumed["history"]] == [1, 2, 3]
    assert resumed["history"][:2] == first["history"]
    assert torch.load(out / "checkpoint" / "train_state.pt", weights_only=False)["step"] == 3


def test_add_parser_registers_the_subcommand():
    parser = argparse.ArgumentParser()
    train_kv.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train-kv", "--pairs", "3", "--grad-mode", "first", "--out", "x"])
    assert args.func is train_kv.run and args.pairs == 3 and args.grad_mode == "first" and args.memory == 8


@pytest.mark.parametrize("flag, value", [("--pairs", "0"), ("--batch", "0"), ("--steps", "0")])
def test_bad_arguments_exit_two_on_the_command_line_and_raise_in_run(tmp_path, capsys, flag, value):
    argv = TINY + ["--train-steps", "1", "--out", str(tmp_path)]
    argv[argv.index(flag) + 1] = value
    assert train_kv.main(argv) == 2
    assert f"error: {flag} must be >= 1, got {value}" in capsys.readouterr().err
    parser = train_kv.add_arguments(argparse.ArgumentParser())
    with pytest.raises(ValueError, match=flag):
        train_kv.run(parser.parse_args(argv))
    assert not (tmp_path / "metrics.json").exists()


def test_plot_without_matplotlib_says_so(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert train_kv.plot({}, str(tmp_path / "plot.png")) is None
    assert "matplotlib is not installed" in capsys.readouterr().err
    assert not (tmp_path / "plot.png").exists()
