"""The Triton kernels of head_loss_op's backward against the float64 twin: fp32 and fp16 under the interpreter
at tiny shapes (awkward vocabulary sizes, rows of weight 0, poisoned outputs), bf16 and real head sizes on a
GPU; the op end to end with its kernels; the backend choice."""
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gradmem_fast.ops.head_loss_double_backward import (head_loss_double_backward,
                                                         head_loss_double_backward_reference, head_loss_op)
import gradmem_fast.kernels.head_loss_double_backward as kernels  # imported while the interpreter is on
import helpers
from helpers import poison_, rel_err
from test_head_loss_double_backward import make_inputs, vjp
from test_kernel_limits import MAX_GRID, launches, meta  # noqa: F401 (launches is a fixture)

pytestmark = pytest.mark.needs_triton  # every kernel test here launches Triton (interpreter or GPU)

# (N, V, d): V not a multiple of the interpreter's 32-wide tiles, d not of its 16; one row; several row blocks
SHAPES = [(37, 97, 48), (1, 97, 48), (21, 131, 40)]


def launch(x, lse, hidden_bar=None, weight_bar=None):
    """The host launcher on poisoned outputs (fresh unless given)."""
    from gradmem_fast.kernels.head_loss_double_backward import head_loss_double_backward as run

    hb = poison_(torch.empty_like(x["hidden"])) if hidden_bar is None else hidden_bar
    wb = poison_(torch.empty_like(x["weight"])) if weight_bar is None else weight_bar
    run(x["hidden"], x["weight"], x["targets"], x["row_weights"], lse.float(), x["loss_bar"].float(),
        x["grad_bar"], hb, wb)
    return hb, wb


def float64_twin(x, lse=None):
    lse = torch.logsumexp(x["h64"] @ x["w64"].t(), dim=1) if lse is None else lse
    return head_loss_double_backward_reference(x["h64"], x["w64"], x["targets"], x["row_weights"].double(), lse,
                                               x["loss_bar"], x["gb64"])


def plain_torch(x):
    """The unfused computation in the inputs' dtype: logits GEMM, fp32 cross-entropy, autograd twice."""
    h, w = x["hidden"].detach().requires_grad_(True), x["weight"].detach().requires_grad_(True)
    active = x["row_weights"] != 0
    loss = F.cross_entropy((h @ w.t()).float(), torch.where(active, x["targets"], 0), reduction="none")
    loss = torch.where(active, loss, 0.0)
    (grad,) = torch.autograd.grad((loss * x["row_weights"]).sum(), h, create_graph=True)
    scalar = (x["loss_bar"].float() * loss).sum() + (x["grad_bar"].float() * grad.float()).sum()
    return torch.autograd.grad(scalar, (h, w))


def assert_accuracy(got, want, x, rtol, ratio):
    helpers.assert_accuracy(got, want, x["hidden"].dtype, rtol, ratio, lambda: plain_torch(x))


ACCURACY = [(torch.float32, 1e-5, None), (torch.float16, None, 2.0)]


@pytest.mark.parametrize("dtype, rtol, ratio", ACCURACY)
@pytest.mark.parametrize("N, V, d", SHAPES)
def test_kernels_match_float64(N, V, d, dtype, rtol, ratio):
    x = make_inputs(N, V, d, dtype, seed=N + V + d)
    lse = torch.logsumexp(x["h64"] @ x["w64"].t(), dim=1)
    assert_accuracy(launch(x, lse), float64_twin(x, lse), x, rtol, ratio)


@pytest.mark.parametrize("dtype, rtol, ratio", ACCURACY)
def test_op_end_to_end_with_its_kernels(dtype, rtol, ratio):
    # forward by the fused first-order kernel (its loss gives the saved lse), backward by these kernels
    x = make_inputs(37, 97, 48, dtype, seed=3)
    got = vjp(lambda *a: head_loss_op(*a, backend="kernel"), x["hidden"], x["weight"], x["targets"],
              x["row_weights"], x["loss_bar"], x["grad_bar"])
    assert_accuracy(got, float64_twin(x), x, rtol, ratio)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy sees the NaN rows
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_zero_weight_rows_ignore_hidden_targets_and_cotangents(dtype):
    # rows 16..31 fill a whole row block of the interpreter's kernels: NaN hidden rows, out-of-range targets,
    # NaN lse and cotangents there must not leak anywhere
    N, V, d = 37, 97, 48
    zero = list(range(16, 32)) + [2, 33]
    x = make_inputs(N, V, d, dtype, seed=7, zero_rows=zero)
    want = float64_twin(x)
    lse = torch.logsumexp(x["h64"] @ x["w64"].t(), dim=1)
    for name, row, value in (("hidden", 2, math.nan), ("hidden", 20, math.nan), ("targets", 2, -100),
                             ("targets", 17, V), ("loss_bar", 33, math.nan), ("grad_bar", 18, math.nan)):
        x[name][row] = value
    lse[[2, 20]] = math.nan
    hidden_bar, weight_bar = launch(x, lse)
    assert (hidden_bar[zero] == 0).all()
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert rel_err(hidden_bar, want[0]) < tol and rel_err(weight_bar, want[1]) < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_all_rows_zero_weight(dtype):
    x = make_inputs(21, 97, 48, dtype, seed=11)
    x["row_weights"].zero_()
    hidden_bar, weight_bar = launch(x, torch.zeros(21))
    assert (hidden_bar == 0).all() and (weight_bar == 0).all()


def test_one_output_at_a_time_and_strided_inputs():
    N, V, d = 21, 97, 40
    x = make_inputs(N, V, d, torch.float16, seed=13)
    want = float64_twin(x)
    lse = torch.logsumexp(x["h64"] @ x["w64"].t(), dim=1)
    # hidden and grad_bar as column slices of wider buffers (row stride != d), as the engine's views are
    for name in ("hidden", "grad_bar"):
        wide = poison_(torch.empty(N, d + 24, dtype=torch.float16))
        wide[:, 8:8 + d] = x[name]
        x[name] = wide[:, 8:8 + d]
    from gradmem_fast.kernels.head_loss_double_backward import head_loss_double_backward as run

    args = (x["hidden"], x["weight"], x["targets"], x["row_weights"], lse.float(), x["loss_bar"].float(),
            x["grad_bar"])
    hidden_bar = poison_(torch.empty(N, d, dtype=torch.float16))
    run(*args, hidden_bar, None)
    weight_bar = poison_(torch.empty(V, d, dtype=torch.float16))
    run(*args, None, weight_bar)
    both = launch(x, lse)
    assert torch.equal(hidden_bar, both[0]) and torch.equal(weight_bar, both[1])
    assert rel_err(hidden_bar, want[0]) < 2e-3 and rel_err(weight_bar, want[1]) < 2e-3


def test_expanded_cotangents():
    # autograd hands the cotangent of a summed output as an expanded (stride 0) view
    x = make_inputs(13, 97, 48, torch.float32, seed=17)
    h, w = x["hidden"].clone().requires_grad_(True), x["weight"].clone().requires_grad_(True)
    loss, grad = head_loss_op(h, w, x["targets"], x["row_weights"], backend="kernel")
    got = torch.autograd.grad(loss.sum() + grad.sum(), (h, w))
    x["loss_bar"], x["grad_bar"] = torch.ones(13, dtype=torch.float64), torch.ones_like(x["hidden"])
    x["gb64"] = x["grad_bar"].double()
    for a, b in zip(got, float64_twin(x)):
        assert rel_err(a, b) < 1e-5


def test_public_function_chooses_the_kernels():
    x = make_inputs(13, 97, 48, torch.float32, seed=19)
    lse = torch.logsumexp(x["h64"] @ x["w64"].t(), dim=1).float()
    args = (x["hidden"], x["weight"], x["targets"], x["row_weights"], lse, x["loss_bar"].float(), x["grad_bar"])
    by_kernel = head_loss_double_backward(*args, backend="kernel")
    assert all(torch.equal(a, b) for a, b in zip(by_kernel, launch(x, lse)))
    assert all(torch.equal(a, b) for a, b in zip(head_loss_double_backward(*args), by_kernel))  # auto
    by_twin = head_loss_double_backward(*args, backend="reference")
    assert all(torch.equal(a, b) for a, b in zip(by_twin, head_loss_double_backward_reference(*args)))


def test_dispatch_without_interpreter(monkeypatch):
    x = make_inputs(13, 97, 48, torch.float32, seed=23)
    args = (x["hidden"], x["weight"], x["targets"], x["row_weights"], torch.zeros(13), x["loss_bar"].float(),
            x["grad_bar"])
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        head_loss_double_backward(*args, backend="kernel")
    got = head_loss_double_backward(*args)  # auto: the twin, by design on the CPU
    want = head_loss_double_backward_reference(*args)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_bfloat16_on_cpu_takes_the_twin():
    x = make_inputs(13, 97, 48, torch.bfloat16, seed=29)
    args = (x["hidden"], x["weight"], x["targets"], x["row_weights"], torch.zeros(13), x["loss_bar"].float(),
            x["grad_bar"])
    got = head_loss_double_backward(*args)
    want = head_loss_double_backward_reference(*args)
    assert got[0].dtype == torch.bfloat16 and torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="bfloat16"):
            head_loss_double_backward(*args, backend="kernel")


def test_offsets_are_64_bit():
    """Every row or column index multiplied by a stride or by D is an int64 value."""
    text = (Path(__file__).resolve().parents[2] / "kernels" / "head_loss_double_backward.py").read_text()
    source = "\n".join(re.findall(r"@triton\.jit\n.*?(?=\n\n\n|\Z)", text, flags=re.S))
    products = re.findall(r"([\w.]+(?:\[[^\]]*\])?) \* (stride_\w+|D\b)", source)
    assert len(products) >= 10
    for left, right in products:
        assert "64" in left, f"{left} * {right}"


@pytest.mark.parametrize("dtype, fp32_precision, expected", [(torch.bfloat16, "ieee", "tf32"),
                                                             (torch.float32, "ieee", "ieee"),
                                                             (torch.float32, "tf32", "tf32")])
def test_gpu_launches_at_the_documented_limits(launches, dtype, fp32_precision, expected):
    """The GPU launch (recorded on meta tensors, nothing runs) at N 16k, d 4096, V 256k: one program per
    row block and per vocabulary block, the GPU tiles, fp32 dots true fp32 unless torch allows TF32."""
    N, d, V = 16 * 1024, 4096, 256 * 1024
    matmul = torch.backends.cuda.matmul
    previous = matmul.fp32_precision
    try:
        matmul.fp32_precision = fp32_precision
        kernels.head_loss_double_backward(meta(N, d, dtype=dtype), meta(V, d, dtype=dtype),
                                          meta(N, dtype=torch.int64), *(meta(N, dtype=torch.float32),) * 3,
                                          meta(N, d, dtype=dtype), meta(N, d, dtype=dtype), meta(V, d, dtype=dtype))
        shapes = kernels.block_shapes(dtype)
    finally:
        matmul.fp32_precision = previous
    assert [launch.name for launch in launches] == ["_dhidden_kernel", "_dweight_kernel"]
    for launch, (key, rows) in zip(launches, (("dhidden", N), ("dweight", V))):
        block_n, block_v = shapes[key][:2]
        assert (launch.kwargs["BLOCK_N"], launch.kwargs["BLOCK_V"], launch.kwargs["BLOCK_D"]) == shapes[key][:3]
        assert launch.grid == (-(-rows // (block_n if key == "dhidden" else block_v)), 1, 1) and rows < MAX_GRID[0]
        assert launch.kwargs["PRECISION"] == expected
        assert launch.kwargs["ACC_IS_OUT"] == (dtype == torch.float32)


# ---------------------------------------------------------------- GPU (H100 / H200)

@pytest.mark.gpu
@pytest.mark.parametrize("dtype, rtol, ratio", [(torch.bfloat16, None, 2.0), (torch.float16, None, 2.0),
                                                (torch.float32, 1e-5, None)])
@pytest.mark.parametrize("d, V", [pytest.param(768, 50257, id="gpt2"), pytest.param(128, 70, id="kv")])
def test_gpu_op_matches_float64(d, V, dtype, rtol, ratio):
    torch.backends.cuda.matmul.allow_tf32 = False  # the default; true fp32 products
    x = make_inputs(333, V, d, dtype, seed=d, device="cuda", zero_rows=(5, 6), hidden_scale=2.0, weight_scale=0.05)
    got = vjp(lambda *a: head_loss_op(*a, backend="kernel"), x["hidden"], x["weight"], x["targets"],
              x["row_weights"], x["loss_bar"], x["grad_bar"])
    assert_accuracy(got, float64_twin(x), x, rtol, ratio)


@pytest.mark.gpu
def test_gpu_backward_memory_has_no_logits():
    N, V, d = 2048, 50257, 768
    x = make_inputs(N, V, d, torch.bfloat16, seed=31, device="cuda")
    h, w = x["hidden"].clone().requires_grad_(True), x["weight"].clone().requires_grad_(True)
    loss, grad = head_loss_op(h, w, x["targets"], x["row_weights"], backend="kernel")
    scalar = (x["loss_bar"].float() * loss).sum() + (x["grad_bar"].float() * grad.float()).sum()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    torch.autograd.grad(scalar, (h, w))
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    # the two results, fp32 accumulators of both, the row stats and the cotangents; no logits
    bound = (N * d + V * d) * (2 + 4) + N * d * 2 + (8 << 20)
    assert extra <= bound, (extra, bound)
    assert extra < N * V * 2  # one bf16 copy of the logits would be N * V * 2 bytes
