"""The public API: write a context into memory, and read from memory."""
from . import dispatch, validation
from .generate import generate
from .reference import memory_cache, read
from .reference.write import write_unchecked


def write(model, memory, input_ids, attention_mask=None, *, steps, lr, write_head=None, memory_proj=None,
          clip_value=None, clip_norm=None, grad_mode="none", second_order_steps=None, backend="auto",
          return_losses=False):
    """Write the context `input_ids` into memory by `steps` steps of gradient descent.

    model: a Hugging Face causal LM (weights are not changed). memory: the initial memory M0,
    (m, d), (1, m, d) or (B, m, d). input_ids: (B, T) integer context; attention_mask: (B, T) of 1/0,
    right padded (None: all real). Per step and sample b, the loss is the mean next-token cross-entropy
    over b's real tokens given [M_b; context] (the last memory row predicts the first token);
    M <- M - lr * grad, where grad is sample b's own gradient.

    write_head: None (the LM head), a (V, d) tensor or a bias-free nn.Linear used for the write loss.
    memory_proj: None or nn.Linear(d, d) applied to M before it enters the model (the gradient is
    taken with respect to the pre-projection memory). clip_value: element-wise clamp of each step's
    gradient; clip_norm: per-sample L2-norm clip, scale min(1, c / (||g_b|| + 1e-6)), after the clamp.
    grad_mode: "none" (detached result), "first" (d M_K / d M0 = I), "second" (full second order through
    all steps: the fast engine recomputes each step in its backward; the reference switches the model
    to its own twice-differentiable attention for the write and restores the setting afterwards).
    second_order_steps (grad_mode "second" only): None, every step second order; j in 0..steps, only the
    last j steps second order, the earlier ones first order (M_{k+1} = M_k - lr * stopgrad(g_k)).
    backend: "auto" (the fast engine on CUDA when it can run; the reference with a warning naming why when
    it cannot; the reference, silently, off CUDA, where the engine runs its kernels' PyTorch twins and is
    slower: see `explain`), "fast" (raise with every reason when it cannot run), "reference". The
    environment variable GRADMEM_FAST_BACKEND overrides it.

    Returns the written memory (B, m, d) in the memory's dtype; with return_losses=True also a (B, K)
    float32 tensor of sample b's inner loss at M_0 ... M_{K-1}; under "first" and "second" they are
    differentiable as an autograd loop's losses are (see reference.write.write_unchecked).
    """
    memory, mask, head = validation.check_write(
        model, memory, input_ids, attention_mask, steps=steps, lr=lr, write_head=write_head,
        memory_proj=memory_proj, clip_value=clip_value, clip_norm=clip_norm, grad_mode=grad_mode,
        backend=backend, second_order_steps=second_order_steps)
    options = dict(steps=steps, lr=float(lr), write_head=head, memory_proj=memory_proj, clip_value=clip_value,
                   clip_norm=clip_norm, grad_mode=grad_mode, second_order_steps=second_order_steps,
                   return_losses=return_losses)
    chosen = dispatch.choose_write_backend(backend, model, memory, write_head=head, memory_proj=memory_proj,
                                           grad_mode=grad_mode, seq_len=memory.shape[1] + input_ids.shape[1],
                                           return_losses=return_losses)
    if chosen == "fast":
        from .engine import fast_write

        return fast_write(model, memory, input_ids, mask, **options)
    return write_unchecked(model, memory, input_ids, mask, **options)


def explain(model, memory, input_ids, attention_mask=None, *, write_head=None, memory_proj=None, grad_mode="none",
            backend="auto"):
    """Which backend `write` would run for these arguments, and why: a dispatch.BackendChoice.

    str(choice) reads as one line; choice.backend is "fast" or "reference"; choice.blockers lists why
    the fast engine cannot reproduce the reference on this call (auto warns and falls back, fast raises);
    choice.preference says why auto takes the reference although the engine could run (off CUDA).
    The arguments are checked as `write` checks them; nothing is computed.
    """
    memory, _, head = validation.check_write(
        model, memory, input_ids, attention_mask, steps=1, lr=0.0, write_head=write_head, memory_proj=memory_proj,
        clip_value=None, clip_norm=None, grad_mode=grad_mode, backend=backend)
    return dispatch.decide(backend, model, memory, write_head=head, memory_proj=memory_proj, grad_mode=grad_mode,
                           seq_len=memory.shape[1] + input_ids.shape[1])


__all__ = ["explain", "write", "read", "generate", "memory_cache"]
