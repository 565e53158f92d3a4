"""Launch counts of a standard case's write step at tiny widths (engine.launches on models.tiny)."""
import torch

from ..engine.launches import count_write
from ..engine.ops import ops_for
from ..models import describe
from ..models.tiny import TINY, counting_dtype, tiny_model
from .cases import build_config


def tiny_case_model(case, seed=0):
    """The case's model configuration at width 64, head dim 16, vocab <= 97, in counting_dtype on the CPU."""
    return tiny_model(build_config(case, attn="eager"), TINY[case.config], case.torch_dtype, seed)


def count_case(case, backend="kernel", T=8, m=4, seed=0):
    """(plan counter, step counter) of the case's write (layer count, family, B, dtype; no options) at tiny
    widths, with the context T and memory rows m given here (launch counts do not depend on them). The
    plan runs with "auto" ops, as the model's rotary buffer is in the model dtype (the tables' twin runs)."""
    model = tiny_case_model(case, seed)
    spec = describe(model)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, spec.vocab_size, (case.B, T), generator=g)
    mask = torch.ones_like(ids)
    memory = (0.02 * torch.randn(case.B, m, spec.hidden_size, generator=g)).to(counting_dtype(case.torch_dtype))
    return count_write(spec, ops_for(backend), ids, mask, memory, plan_ops=ops_for("auto"))
