"""The engine on CUDA: float32 against the float64 reference, the captured graph against the eager
path, graph reuse across lr / K / T in one bucket, a bounded cache, and one host sync per graph write
(the real-token count) whatever K."""
import warnings

import pytest
import torch

from engine_cases import WIDE, fast_kwargs, model_on, write_both
from gradmem_fast.engine import fast_write, graphs
from helpers import FAMILIES, random_batch, rel_err
from test_engine_graph_key import M as REUSE_M, NEW_ROWS, REUSED

pytestmark = pytest.mark.gpu
TOL_FP32 = 1e-4


@pytest.fixture(autouse=True)
def no_tf32():
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    graphs.CACHE.clear()
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


def _wide(family):
    return WIDE.get(family, WIDE["llama"])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("B, T, lengths, m, steps", [(1, 37, None, 8, 3), (3, 100, [100, 37, 1], 16, 2)])
@pytest.mark.parametrize("use_graphs", [True, False])
def test_fp32_matches_reference(family, B, T, lengths, m, steps, use_graphs):
    out, losses, ref, ref_losses, start = write_both(family, B=B, T=T, lengths=lengths, m=m, steps=steps,
                                                     op_backend="auto", device="cuda", use_graphs=use_graphs,
                                                     **_wide(family))
    assert rel_err(out, ref) < TOL_FP32 and rel_err(losses, ref_losses) < TOL_FP32
    assert rel_err(ref, start.expand_as(ref)) > 1e-3


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_fp32_options(family):
    out, losses, ref, ref_losses, _ = write_both(
        family, B=2, T=20, lengths=[20, 7], m=4, steps=3, op_backend="auto", device="cuda",
        option_names=("write_head", "memory_proj", "clip_value", "clip_norm"), **_wide(family))
    assert rel_err(out, ref) < TOL_FP32 and rel_err(losses, ref_losses) < TOL_FP32


def _call(model, memory, ids, mask, steps, lr, use_graphs, grad_mode="none"):
    return fast_write(model, memory, ids, mask, steps=steps, lr=lr, grad_mode=grad_mode, return_losses=True,
                      op_backend="auto", use_graphs=use_graphs, **fast_kwargs({}))


def _batch(model, B, T, lengths, m, seed):
    ids, mask, memory = random_batch(model, B, T, lengths=lengths, m=m, seed=seed, device="cuda")
    return ids, mask, memory[None]


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_graph_equals_eager_and_is_reused(family):
    model = model_on(family, "cuda", **_wide(family))
    (B, T, lengths), (B2, T2, lengths2) = REUSED
    ids, mask, memory = _batch(model, B, T, lengths, REUSE_M, seed=1)
    graph_out, graph_losses = _call(model, memory, ids, mask, 3, 0.3, True)
    eager_out, eager_losses = _call(model, memory, ids, mask, 3, 0.3, False)
    assert graphs.CACHE.captures == 1
    assert rel_err(graph_out, eager_out) < 1e-5 and rel_err(graph_losses, eager_losses) < 1e-5
    # another lr, K, T in the same bucket and another mask with as many head rows: the same graphs
    ids2, mask2, memory2 = _batch(model, B2, T2, lengths2, REUSE_M, seed=2)
    graph_out, graph_losses = _call(model, memory2, ids2, mask2, 5, 0.7, True)
    eager_out, eager_losses = _call(model, memory2, ids2, mask2, 5, 0.7, False)
    assert graphs.CACHE.captures == 1 and len(graphs.CACHE) == 1
    assert graph_losses.shape == (3, 5)
    assert rel_err(graph_out, eager_out) < 1e-5 and rel_err(graph_losses, eager_losses) < 1e-5
    # more real tokens in the same T bucket: the next head-row bucket is a second capture
    ids3, mask3, memory3 = _batch(model, *NEW_ROWS, REUSE_M, seed=3)
    graph_out, _ = _call(model, memory3, ids3, mask3, 2, 0.5, True)
    eager_out, _ = _call(model, memory3, ids3, mask3, 2, 0.5, False)
    assert graphs.CACHE.captures == 2 and rel_err(graph_out, eager_out) < 1e-5


def _host_syncs(fn):
    """fn()'s result and the synchronizing CUDA operations it ran (torch's sync debug mode, warn)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            result = fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return result, [str(w.message) for w in caught if "synchroniz" in str(w.message)]


@pytest.mark.parametrize("steps", [1, 6])
def test_graph_write_syncs_once_whatever_k(steps):
    """The one host read of a graph write is the real-token count before the prologue; replays add none."""
    model = model_on("llama", "cuda", **WIDE["llama"])
    ids, mask, memory = _batch(model, 2, 30, [30, 9], 8, seed=3)
    _call(model, memory, ids, mask, 2, 0.3, True)  # capture
    (out, losses), syncs = _host_syncs(lambda: _call(model, memory, ids, mask, steps, 0.5, True))
    assert len(syncs) == 1, syncs
    assert graphs.CACHE.captures == 1 and torch.isfinite(out).all() and torch.isfinite(losses).all()


def test_eager_steps_have_no_host_sync():
    from gradmem_fast.engine.plan import build_plan
    from gradmem_fast.engine.ops import ops_for
    from gradmem_fast.engine.step import write_step
    from gradmem_fast.models import describe

    model = model_on("gpt2", "cuda", **WIDE["gpt2"])
    ids, mask, memory = _batch(model, 2, 30, [30, 9], 8, seed=4)
    state = memory.expand(2, -1, -1).contiguous()
    lr = torch.full((), 0.3, device="cuda")
    step_loss = torch.empty(2, device="cuda")
    plan = build_plan(describe(model), ops_for("auto"), ids, mask, 8, state.dtype)
    write_step(plan, state, lr, step_loss)  # first call compiles the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        plan = build_plan(describe(model), ops_for("auto"), ids, mask, 8, state.dtype)
        write_step(plan, state, lr, step_loss)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_cache_is_bounded(monkeypatch):
    monkeypatch.setenv(graphs.ENV_CACHE_SIZE, "2")
    model = model_on("llama", "cuda", **WIDE["llama"])
    for T in (10, 40, 100):  # three buckets
        ids, mask, memory = _batch(model, 1, T, None, 4, seed=T)
        _call(model, memory, ids, mask, 1, 0.3, True)
    assert graphs.CACHE.captures == 3 and len(graphs.CACHE) == 2


def test_first_order_on_graph_path():
    model = model_on("gpt_neox", "cuda", **WIDE["gpt_neox"])
    ids, mask, memory = _batch(model, 2, 20, [20, 5], 4, seed=5)
    start = memory.clone().requires_grad_(True)
    out, _ = _call(model, start, ids, mask, 2, 0.3, True, grad_mode="first")
    plain, _ = _call(model, memory, ids, mask, 2, 0.3, True)
    assert rel_err(out.detach(), plain) < 1e-6
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    assert torch.allclose(start.grad, weights.sum(0, keepdim=True), rtol=0, atol=1e-6)


def test_interleaved_entries_share_the_pool_safely():
    model = model_on("llama", "cuda", **WIDE["llama"])
    small = _batch(model, 2, 12, [12, 5], 4, seed=6)
    large = _batch(model, 2, 200, [200, 77], 4, seed=7)
    expected = {name: _call(model, b[2], b[0], b[1], 3, 0.4, False) for name, b in (("s", small), ("l", large))}
    for name in ("s", "l", "s", "l"):
        ids, mask, memory = small if name == "s" else large
        out, losses = _call(model, memory, ids, mask, 3, 0.4, True)
        assert rel_err(out, expected[name][0]) < 1e-5 and rel_err(losses, expected[name][1]) < 1e-5
    assert graphs.CACHE.captures == 2
