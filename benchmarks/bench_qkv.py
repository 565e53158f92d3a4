"""q/k/v projection and its input gradient vs the plain torch path (autograd), bf16, one layer.

    pytest benchmarks/bench_qkv.py --benchmark-columns=median,min,max

Shapes: N = 16384 tokens (gpt2-batch: 16 x 1024, llama1b-batch: 8 x 2048) with GPT-2 small
("concat" c_attn), Llama-3.2-1B ("separate", GQA 32/8) and Pythia-160M ("per_head") projections.
extra_info: achieved TFLOP/s (2 N d (Hq + 2 Hkv) hd per projection or per input gradient).
"""
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from gradmem_fast.models.qkv import qkv_project, qkv_project_backward  # noqa: E402
from gradmem_fast.models.spec import Layer, Linear, ModelSpec, Norm  # noqa: E402

N = 16384
SHAPES = {  # name: (layout, d, Hq, Hkv, hd, bias)
    "gpt2": ("concat", 768, 12, 12, 64, True),
    "llama1b": ("separate", 2048, 32, 8, 64, False),
    "pythia160m": ("per_head", 768, 12, 12, 64, True),
}
ROUNDS = dict(rounds=20, warmup_rounds=3, iterations=1)


def _lin(out, d, bias, g):
    w = (0.02 * torch.randn(out, d, device="cuda", generator=g)).to(torch.bfloat16)
    b = (0.02 * torch.randn(out, device="cuda", generator=g)).to(torch.bfloat16) if bias else None
    return Linear(w, b)


def _spec(name):
    layout, d, H, Hkv, hd, bias = SHAPES[name]
    g = torch.Generator(device="cuda").manual_seed(0)
    if layout == "separate":
        q, k, v, qkv = _lin(H * hd, d, bias, g), _lin(Hkv * hd, d, bias, g), _lin(Hkv * hd, d, bias, g), None
    else:
        q = k = v = None
        qkv = _lin((H + 2 * Hkv) * hd, d, bias, g)
    ones = torch.ones(d, device="cuda", dtype=torch.bfloat16)
    layer = Layer(attn_norm=Norm(ones, None, 1e-5), q=q, k=k, v=v, qkv=qkv, o=_lin(d, H * hd, False, g),
                  mlp_norm=Norm(ones, None, 1e-5), gate=None, up=_lin(4 * d, d, False, g),
                  down=_lin(d, 4 * d, False, g))
    emb = torch.zeros(8, d, device="cuda", dtype=torch.bfloat16)
    return ModelSpec(family="bench", hidden_size=d, num_layers=1, num_heads=H, num_kv_heads=Hkv, head_dim=hd,
                     vocab_size=8, norm_kind="layer", activation="gelu", qkv_layout=layout,
                     parallel_residual=False, attn_scale=hd ** -0.5, rotary=None, position_embedding=None,
                     max_positions=None, embedding=emb, final_norm=Norm(ones, None, 1e-5),
                     lm_head=Linear(emb), tied_head=True, layers=(layer,))


def _flops(name):
    _, d, H, Hkv, hd, _ = SHAPES[name]
    return 2 * N * d * (H + 2 * Hkv) * hd


@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("impl", ["torch_autograd", "qkv_project_backward"])
def test_qkv_backward(benchmark, name, impl):
    spec = _spec(name)
    x = torch.randn(N, spec.hidden_size, device="cuda", dtype=torch.bfloat16)
    if impl == "torch_autograd":
        xr = x.requires_grad_(True)
        q, k, v = qkv_project(spec, 0, xr)
    else:
        with torch.no_grad():
            q, k, v = qkv_project(spec, 0, x)
    dq, dk, dv = (torch.randn_like(t) for t in (q, k, v))

    def run():
        if impl == "torch_autograd":
            (dx,) = torch.autograd.grad((q, k, v), xr, (dq, dk, dv), retain_graph=True)
        else:
            dx = qkv_project_backward(spec, 0, dq, dk, dv, validate=False)
        torch.cuda.synchronize()
        return dx

    benchmark.pedantic(run, **ROUNDS)
    benchmark.extra_info["tflops"] = _flops(name) / benchmark.stats.stats.median / 1e12


@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("impl", ["torch_linear", "qkv_project"])
def test_qkv_forward(benchmark, name, impl):
    spec = _spec(name)
    layer = spec.layers[0]
    x = torch.randn(N, spec.hidden_size, device="cuda", dtype=torch.bfloat16)

    def run():
        with torch.no_grad():
            if impl == "torch_linear":
                ws = [layer.q, layer.k, layer.v] if layer.qkv is None else [layer.qkv]
                out = [torch.nn.functional.linear(x, w.weight, w.bias) for w in ws]
            else:
                out = qkv_project(spec, 0, x, validate=False)
        torch.cuda.synchronize()
        return out

    benchmark.pedantic(run, **ROUNDS)
    benchmark.extra_info["tflops"] = _flops(name) / benchmark.stats.stats.median / 1e12
