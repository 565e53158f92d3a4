"""qkv_project against the q/k/v the HF model's attention receives; its backward against autograd."""
import pytest
import torch

from gradmem_fast.models import describe
from gradmem_fast.models.forward import apply_rotary, rotary_cos_sin
from gradmem_fast.models.qkv import qkv_project, qkv_project_backward
from helpers import rel_err, tiny_model
from models.hf64 import hf_float64

CASES = [
    ("llama", {}),
    ("llama", {"attention_bias": True, "num_key_value_heads": 1}),
    ("mistral", {}),
    ("qwen2", {}),
    ("gpt2", {}),
    ("gpt_neox", {}),
    ("gpt_neox", {"rotary_pct": 1.0}),
    ("phi3", {}),
]
IDS = [f + "".join(f"-{k}" for k in o) for f, o in CASES]


@pytest.mark.parametrize("case,tol", [(c, 1e-12) for c in CASES], ids=IDS)
def test_qkv_matches_hf_attention_inputs(case, tol):
    family, over = case
    model = tiny_model(family, **over)
    spec = describe(model)
    B, S = 2, 7
    x = torch.randn(B, S, spec.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    record = {}
    with hf_float64(model, record):
        model(inputs_embeds=x, attention_mask=torch.tensor([[1] * 7, [1] * 4 + [0] * 3]))
    for i in range(spec.num_layers):
        q, k, v = qkv_project(spec, i, record["x"][i])
        assert q.shape == (B, S, spec.num_heads, spec.head_dim)
        assert k.shape == v.shape == (B, S, spec.num_kv_heads, spec.head_dim)
        if spec.rotary is not None:
            cos, sin = rotary_cos_sin(spec.rotary, S, q.dtype, q.device)
            q, k = apply_rotary(spec.rotary, q, cos, sin), apply_rotary(spec.rotary, k, cos, sin)
        for mine, theirs in zip((q, k, v), record["qkv"][i]):
            assert rel_err(mine, theirs.transpose(1, 2)) < tol, (family, over, i)


@pytest.mark.parametrize("case,tol", [(c, 1e-12) for c in CASES], ids=IDS)
@pytest.mark.parametrize("shape", [(1, 1), (3, 37)])
def test_backward_matches_autograd(case, tol, shape):
    family, over = case
    spec = describe(tiny_model(family, **over))
    g = torch.Generator().manual_seed(6)
    x = torch.randn(*shape, spec.hidden_size, dtype=torch.float64, generator=g, requires_grad=True)
    q, k, v = qkv_project(spec, 1, x)
    dq, dk, dv = (torch.randn(t.shape, dtype=torch.float64, generator=g) for t in (q, k, v))
    (ref,) = torch.autograd.grad((q * dq).sum() + (k * dk).sum() + (v * dv).sum(), x)
    dx = qkv_project_backward(spec, 1, dq, dk, dv)
    assert dx.shape == x.shape
    assert rel_err(dx, ref) < tol
    dx_layer = qkv_project_backward(spec, spec.layers[1], dq, dk, dv)  # a Layer works as well as an index
    assert torch.equal(dx, dx_layer)


def test_backward_accepts_strided_gradients():
    spec = describe(tiny_model("gpt_neox"))
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 5, spec.hidden_size, dtype=torch.float64, generator=g, requires_grad=True)
    q, k, v = qkv_project(spec, 0, x)
    big = torch.randn(2, 5, spec.num_heads, 3 * spec.head_dim, dtype=torch.float64, generator=g)
    dq, dk, dv = big.split(spec.head_dim, dim=-1)
    (ref,) = torch.autograd.grad((q * dq).sum() + (k * dk).sum() + (v * dv).sum(), x)
    assert rel_err(qkv_project_backward(spec, 0, dq, dk, dv), ref) < 1e-12


@pytest.mark.parametrize("call,match", [
    (lambda s, x: qkv_project(s, 0, x[..., :-1]), "x must have shape"),
    (lambda s, x: qkv_project(s, 0, x.float()), "float32"),
    (lambda s, x: qkv_project(s, 2, x), "layer"),
    (lambda s, x: qkv_project(s, "0", x), "layer"),
    (lambda s, x: qkv_project_backward(s, 0, *(t[..., :-1] if i == 1 else t for i, t in
                                             enumerate(qkv_project(s, 0, x)))), "dk must have shape"),
    (lambda s, x: qkv_project_backward(s, 0, *(t[:1] if i == 2 else t for i, t in
                                             enumerate(qkv_project(s, 0, x)))), "leading shapes"),
])
def test_bad_inputs(call, match):
    spec = describe(tiny_model("llama"))
    x = torch.randn(2, 3, spec.hidden_size, dtype=torch.float64)
    with pytest.raises(ValueError, match=match):
        call(spec, x)
