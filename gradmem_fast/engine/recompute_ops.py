"""The ops a recomputed step runs (recompute.py): the engine's Ops on the twins, with add + norm and the
activations as ops whose backward is a written second-order rule, on the write's op backend.

layers.py and sublayers.py call `plan.ops.add_norm_forward / add_norm_backward / activation_forward /
activation_backward` for every block structure. Here the forward calls are `add_norm_op` / `activation_op`
(ops/norm_double_backward.py, ops/activation_double_backward.py), differentiable with the written backward,
and the hand-written backward's calls are `add_norm_backward_op` / `activation_backward_op`, whose own
backward is the written double backward. They run on `backend` (the write's op backend: their first-order
values on the engine's kernels, their double backward on Triton kernels where those can run, else the
twins). Each autograd node saves the op's inputs only, not the twin's elementwise intermediates. The norm's
backward takes the `stats` its forward returned as values only (not differentiated: the double backward
recomputes them from its input), so its derivatives are total. Rotary stays on the twin (the Ops methods not overridden
here run on "reference"): it is linear in its input with tables that depend on no weight, so autograd
saves only the tables. The q/k norm is called by recompute_attention.py directly (qk_norm_op /
qk_norm_backward_op), which has its eps.
"""
import functools

from ..ops.activation_double_backward import GATED, activation_backward_op, activation_op
from ..ops.norm_double_backward import add_norm_backward_op, add_norm_op
from .ops import Ops


class RecomputeOps(Ops):
    """Ops("reference") with the differentiable add + norm and activation ops on `backend`."""

    def __init__(self, backend="auto"):
        super().__init__("reference")
        self.op_backend = backend  # the write's, for the ops below and recompute_attention.py's

    def _kw2(self):
        return dict(backend=self.op_backend, validate=False)

    def add_norm_forward(self, x, residual, norm, kind):
        return add_norm_op(x, residual, norm.weight, norm.bias, norm.eps, kind, **self._kw2())

    def add_norm_backward(self, dy, d_residual_out, residual_out, norm, stats, kind):
        return add_norm_backward_op(dy, residual_out, norm.weight, norm.eps, kind, d_residual_out, stats=stats,
                                    **self._kw2())

    def activation_forward(self, activation, pre):
        pre = pre if activation in GATED else (pre,)
        return activation_op(activation, *pre, **self._kw2())

    def activation_backward(self, activation, dy, pre):
        pre = pre if activation in GATED else (pre,)
        return activation_backward_op(activation, dy, *pre, **self._kw2())


@functools.lru_cache(maxsize=None)
def recompute_ops_for(backend):
    return RecomputeOps(backend)
