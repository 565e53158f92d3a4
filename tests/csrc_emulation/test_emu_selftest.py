"""The CUDA emulator itself (cuda_emu.h): block reductions, warp shuffles, barrier misuse, launch checks,
the random schedule, and the emulated build's registration (selftest.cu holds the test kernels)."""
import pytest
import torch

import emu_build
from helpers import poison_

OPS = ("add_norm_fwd", "add_norm_bwd", "rotary_tables", "apply_rotary_", "swiglu_fwd", "swiglu_bwd", "gelu_fwd",
       "gelu_bwd", "memory_update_")


@pytest.fixture(scope="module")
def emu_test(emu_ops):
    return torch.ops.gradmem_fast_emu_test


def _values(n, seed=0):
    # small integers: float sums are exact in any order
    return torch.randint(-50, 50, (n,), generator=torch.Generator().manual_seed(seed)).float()


def test_emulated_ops_are_cpu_ops_in_their_own_namespace(emu_ops):
    for name in OPS:
        assert str(getattr(emu_ops, name).default._schema).startswith(f"gradmem_fast_emu::{name}(")
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"gradmem_fast_emu::{name}", "CPU")
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(f"gradmem_fast_emu::{name}", "CUDA")


def test_real_extension_is_unaffected(emu_ops):
    from gradmem_fast import _ext

    if _ext.reason() is not None:
        pytest.skip(f"real extension unavailable: {_ext.reason()}")
    for name in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"gradmem_fast::{name}", "CUDA")
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(f"gradmem_fast::{name}", "CPU")
    g = torch.Generator().manual_seed(3)
    memory, grad, lr = torch.randn(2, 3, 48, generator=g), torch.randn(2, 3, 48, generator=g), torch.tensor([0.1])
    with pytest.raises(NotImplementedError, match="CPU"):  # the real op has no CPU kernel
        _ext.load().memory_update_(memory, grad, lr, -1.0, -1.0)
    expect = memory - 0.1 * grad
    emu_ops.memory_update_(memory, grad, lr, -1.0, -1.0)
    assert torch.allclose(memory, expect, rtol=1e-6, atol=1e-6)


def test_every_launch_is_rewritten():
    for path in emu_build.sources():
        with open(path) as f:
            text = f.read()
        rewritten, n = emu_build.rewrite_launches(text)
        assert text.count("<<<") == n > 0 and "<<<" not in rewritten and ">>>" not in rewritten


def test_rewrite_keeps_template_arguments():
    src = "  k<T, kVec, 2><<<rows, threads_for(d / kVec), 0, stream>>>(a, b);"
    assert emu_build.rewrite_launches(src) == (
        "  ::gm_emu::launch(rows, threads_for(d / kVec), 0, stream)(k<T, kVec, 2>, a, b);", 1)


@pytest.mark.parametrize("threads", [32, 96, 512, 1024])
def test_block_sum_gives_every_thread_the_block_total(emu_test, threads):
    v = _values(3 * threads)
    out = poison_(torch.empty_like(v))
    emu_test.block_sum(v, out, threads, False)
    expect = (3 * v.view(3, threads).sum(1, keepdim=True)).expand(3, threads).reshape(-1)
    assert torch.equal(out, expect)


def test_random_schedule_exposes_a_missing_barrier(emu_test):
    # without the barrier that guards smem from the previous block_sum's readers, a warp that runs
    # ahead overwrites a partial sum another warp has not read yet: wrong totals on some schedules
    threads = 256
    v = _values(4 * threads, seed=1)
    expect = (3 * v.view(4, threads).sum(1, keepdim=True)).expand(4, threads).reshape(-1)
    wrong = 0
    for seed in range(8):
        emu_test.reseed(seed)
        out = poison_(torch.empty_like(v))
        emu_test.block_sum(v, out, threads, True)
        wrong += not torch.equal(out, expect)
        emu_test.reseed(seed)
        emu_test.block_sum(v, out, threads, False)
        assert torch.equal(out, expect)
    assert wrong > 0


@pytest.mark.parametrize("xor_mask,src_lane,delta", [(1, 0, 1), (16, 31, 16), (5, 37, 3)])
def test_shuffles_match_their_definition(emu_test, xor_mask, src_lane, delta):
    threads = 64
    v = _values(2 * threads, seed=2)
    out = poison_(torch.empty(3, v.numel()))
    emu_test.shuffle(v, out, threads, xor_mask, src_lane, delta)
    lanes = torch.arange(v.numel()) % 32
    warp_start = torch.arange(v.numel()) - lanes
    down = torch.where(lanes + delta < 32, lanes + delta, lanes)
    assert torch.equal(out[0], v[warp_start + (lanes ^ xor_mask)])
    assert torch.equal(out[1], v[warp_start + src_lane % 32])
    assert torch.equal(out[2], v[warp_start + down])


def test_shuffle_in_a_partial_warp_is_an_error(emu_test):
    v = _values(48)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        emu_test.shuffle(v, torch.empty(3, 48), 48, 1, 0, 1)


def test_divergent_barrier_is_reported_not_hung(emu_test):
    out = torch.zeros(64)
    with pytest.raises(RuntimeError, match="deadlock"):
        emu_test.divergent_barrier(out, 16)
    emu_test.divergent_barrier(out, 64)
    assert out.eq(1).all()


def test_invalid_launch_is_an_error(emu_test):
    with pytest.raises(RuntimeError, match="invalid block"):
        emu_test.divergent_barrier(torch.zeros(2048), 0)
