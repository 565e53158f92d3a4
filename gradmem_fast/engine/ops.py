"""The ops the engine calls, bound to one op backend, with argument checks off (hot path)."""
import functools


class Ops:
    """Thin forwarding layer: every call passes `backend` and `validate=False`."""

    def __init__(self, backend="auto"):
        self.backend = backend

    def _kw(self):
        return dict(backend=self.backend, validate=False)

    def add_norm_forward(self, x, residual, norm, kind):
        from ..ops.add_norm import add_norm_forward
        return add_norm_forward(x, residual, norm.weight, norm.bias, norm.eps, kind, **self._kw())

    def add_norm_backward(self, dy, d_residual_out, residual_out, norm, stats, kind):
        from ..ops.add_norm import add_norm_backward
        return add_norm_backward(dy, d_residual_out, residual_out, norm.weight, stats, kind, **self._kw())

    def attention_forward(self, q, k, v, lengths, scale):
        from ..ops.attention import attention_forward
        return attention_forward(q, k, v, lengths, scale, **self._kw())

    def attention_backward(self, do, q, k, v, o, lse, lengths, scale, out=None):
        from ..ops.attention import attention_backward
        return attention_backward(do, q, k, v, o, lse, lengths, scale, out=out, **self._kw())

    def context_attention_state(self, q, k, v, lengths, scale):
        from ..ops.attention import context_attention_state
        return context_attention_state(q, k, v, lengths, scale, **self._kw())

    def memory_attention_forward(self, q_mem, k_mem, v_mem, q_ctx, state, lengths, scale):
        from ..ops.attention import memory_attention_forward
        return memory_attention_forward(q_mem, k_mem, v_mem, q_ctx, state, lengths, scale, **self._kw())

    def memory_attention_backward(self, do, q_mem, k_mem, v_mem, q_ctx, o, lse, lengths, scale, out=None):
        from ..ops.attention import memory_attention_backward
        return memory_attention_backward(do, q_mem, k_mem, v_mem, q_ctx, o, lse, lengths, scale, out=out,
                                         **self._kw())

    def qk_norm_forward(self, x, weight, eps, out=None):
        from ..ops.qk_norm import qk_norm_forward
        return qk_norm_forward(x, weight, eps, out=out, **self._kw())

    def qk_norm_backward(self, dy, x, weight, rstd, out=None):
        from ..ops.qk_norm import qk_norm_backward
        return qk_norm_backward(dy, x, weight, rstd, out=out, **self._kw())

    def rotary_tables(self, rotary, positions):
        from ..ops.rotary import rotary_tables
        return rotary_tables(rotary.inv_freq, positions, rotary.attention_scaling, **self._kw())

    def apply_rotary_(self, x, cos, sin, rotary, inverse=False):
        from ..ops.rotary import apply_rotary_
        return apply_rotary_(x, cos, sin, rotary_dim=rotary.rotary_dim, interleaved=rotary.interleaved,
                             inverse=inverse, **self._kw())

    def activation_forward(self, activation, pre):
        from ..ops import activation as act
        if activation == "swiglu":
            gate, up = pre
            return act.swiglu_forward(gate, up, **self._kw())
        if activation == "geglu_tanh":
            from ..ops.geglu import geglu_forward
            return geglu_forward(*pre, **self._kw())
        return act.gelu_forward(pre, _APPROXIMATE[activation], **self._kw())

    def activation_backward(self, activation, dy, pre):
        """Gradient w.r.t. the pre-activation(s): (d_gate, d_up) for the gated ones, else one tensor."""
        from ..ops import activation as act
        if activation == "swiglu":
            gate, up = pre
            return act.swiglu_backward(dy, gate, up, **self._kw())
        if activation == "geglu_tanh":
            from ..ops.geglu import geglu_backward
            return geglu_backward(dy, *pre, **self._kw())
        return act.gelu_backward(dy, pre, _APPROXIMATE[activation], **self._kw())

    def head_loss(self, hidden, weight, targets, row_weights, loss_out, grad_out):
        from ..ops.head_loss import fused_head_loss
        return fused_head_loss(hidden, weight, targets, row_weights, loss_out=loss_out, grad_out=grad_out,
                               **self._kw())

    def memory_update_(self, memory, grad, lr, clip_value, clip_norm):
        from ..ops.memory_update import memory_update_
        return memory_update_(memory, grad, lr, clip_value=clip_value, clip_norm=clip_norm, **self._kw())


_APPROXIMATE = {"gelu_tanh": "tanh", "gelu": "none"}


@functools.lru_cache(maxsize=None)
def ops_for(backend):
    return Ops(backend)
