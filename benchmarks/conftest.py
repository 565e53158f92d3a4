"""Fixtures shared by the micro-benchmarks. Nothing here touches a GPU at import, so bench files
that skip without CUDA still collect cleanly on a CPU machine."""
import pytest
import torch


def pytest_collect_file(file_path, parent):
    """Collect bench_*.py when the folder is given (`pytest benchmarks/`); a file named on the
    command line is already collected by pytest itself."""
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def _sync():
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


@pytest.fixture
def cuda_sync():
    """A callable that waits for the current CUDA device (a no-op without one): call it at the end
    of the timed function so pytest-benchmark measures device time, not launch time."""
    return _sync


@pytest.fixture(scope="session")
def matmul_tflops():
    """The bf16 8192^3 matmul rate of this card, measured once per session (for floor ratios)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from gradmem_fast.benchmark.floor import measure_matmul_tflops

    return measure_matmul_tflops("cuda")
