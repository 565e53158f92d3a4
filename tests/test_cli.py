"""`python -m gradmem_fast`: help and version on stdout with exit 0, usage errors exit 2, the demo's device check."""
import subprocess
import sys

import pytest
import torch

import gradmem_fast
from gradmem_fast.__main__ import COMMANDS, main


def test_help_goes_to_stdout_and_exits_zero(capsys):
    assert main(["--help"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and "usage: python -m gradmem_fast" in out
    for name in COMMANDS:
        assert name in out


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"gradmem_fast {gradmem_fast.__version__}"


@pytest.mark.parametrize("argv,message", [([], "a COMMAND is required"), (["nope"], "invalid choice: 'nope'")])
def test_usage_errors_exit_two(capsys, argv, message):
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and message in err


def test_module_entry_point():
    done = subprocess.run([sys.executable, "-m", "gradmem_fast", "--help"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and "demo" in done.stdout and done.stderr == ""


def test_subcommand_help_is_its_own(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--help"])
    assert exc.value.code == 0
    assert "--device" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_demo_on_cuda_without_gpu_is_one_line(capsys):
    assert main(["demo", "--device", "cuda"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "needs a CUDA GPU" in err


def test_demo_rejects_an_unknown_device(capsys):
    assert main(["demo", "--device", "tpu9"]) == 2
    assert "is not a device" in capsys.readouterr().err


def test_demo_runs_small_and_says_where(capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the fast writer's ops use the PyTorch twins
    assert main(["demo", "--batch", "2", "--tokens", "6", "--memory", "2", "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "step 1: reconstruction loss" in out
    assert "PyTorch twins of its kernels" in out and "runs the reference backend" in out
    error = float(out.split("relative error vs reference: memory ")[1].split(",")[0])
    assert error < 1e-5  # fp32 engine against the fp32 reference
