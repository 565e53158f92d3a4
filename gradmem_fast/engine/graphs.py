"""CUDA-graph path: per (model, B, bucketed T, head-row bucket R, m, dtypes, options) one captured
prologue (the per-write constants) and one captured step, replayed K times; bounded LRU cache.

Host syncs: a graph write reads one value on the host, the mask's real-token count (fast_write,
before the prologue, to pick R); the replays of the K steps read nothing back."""
import os
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from .plan import build_plan
from .step import write_step

ENV_CACHE_SIZE = "GRADMEM_FAST_GRAPH_CACHE"


def cache_size():
    try:
        return max(0, int(os.environ.get(ENV_CACHE_SIZE, "8")))
    except ValueError:
        return 8


def bucket_length(T, m, limit=None):
    """T padded up: powers of two (>= 16) up to 64, then multiples of 64; capped by a position limit."""
    if T <= 64:
        bucket = 16
        while bucket < T:
            bucket *= 2
    else:
        bucket = -(-T // 64) * 64
    if limit is not None:
        bucket = min(bucket, limit - m)
    return max(bucket, T)


def head_rows_bucket(real_rows, total_rows):
    """Head rows R of a captured plan: the real-token count rounded up to an eighth of B*Tb (at least
    64 rows), so ragged batches skip most padding at the cost of at most 8 graphs per T bucket."""
    grain = max(64, -(-total_rows // 8))
    return min(total_rows, -(-real_rows // grain) * grain)


def graph_shape(B, T, m, real_rows, limit=None):
    """(Tb, R) of the graphs a batch of B rows of T tokens with real_rows real tokens replays: two
    batches share a capture only if these agree (and the rest of `graph_key`)."""
    Tb = bucket_length(T, m, limit)
    return Tb, head_rows_bucket(real_rows, B * Tb)


@dataclass
class GraphEntry:
    model_ref: Any  # weakref to the model
    ids: torch.Tensor  # (B, Tb) static context ids
    mask: torch.Tensor  # (B, Tb) static mask, 0 beyond T
    memory: torch.Tensor  # (B, m, d) static memory, updated in place by each replay
    lr: torch.Tensor  # () fp32
    step_loss: torch.Tensor  # (B,) fp32
    prologue: Any  # torch.cuda.CUDAGraph
    step: Any  # torch.cuda.CUDAGraph
    plan: Any  # tensors the step graph reads, produced by the prologue graph
    replays: int = 0


class GraphCache:
    def __init__(self):
        self._entries = OrderedDict()
        self.captures = 0

    def __len__(self):
        return len(self._entries)

    def clear(self):
        self._entries.clear()

    def get(self, key, model, build):
        entry = self._entries.get(key)
        if entry is not None and entry.model_ref() is model:
            self._entries.move_to_end(key)
            return entry
        entry = build()
        self.captures += 1
        limit = cache_size()
        if limit > 0:
            self._entries[key] = entry
            while len(self._entries) > limit:
                self._entries.popitem(last=False)
        return entry


CACHE = GraphCache()
_POOLS = {}


def shared_pool(device):
    """One memory pool per device shared by every captured *step* graph: a step graph keeps nothing
    in the pool after it ends (memory and losses live in static buffers outside it), and replays are
    serialised on one stream, so step temporaries may overlap and the cache costs the largest entry's
    activations, not their sum. Prologue graphs get private pools: their outputs (the plan) outlive
    the capture, and memory freed by an earlier step capture could otherwise be handed to a later
    plan, which that earlier step's replay would then overwrite."""
    if device not in _POOLS:
        _POOLS[device] = torch.cuda.graph_pool_handle()
    return _POOLS[device]


def matmul_settings():
    """The matmul settings a capture bakes in (cuBLAS math mode, the Triton kernels' fp32 dot precision):
    (TF32 allowed for float32, fp16 and bf16 reduced-precision reductions allowed)."""
    from ..kernels.precision import tf32_allowed

    matmul = torch.backends.cuda.matmul
    return (tf32_allowed(), bool(matmul.allow_fp16_reduced_precision_reduction),
            bool(matmul.allow_bf16_reduced_precision_reduction))


_LAST_WRITE = {}


def after_last_write(device):
    """Make the current stream wait (on the device, no host sync) for the previous graph write's work.

    Every call reuses its entry's static buffers, and all step graphs share one pool: a call issued on
    another stream than the previous one must not fill them while that call's replays may still run."""
    event = _LAST_WRITE.get(device)
    if event is not None:
        torch.cuda.current_stream(device).wait_event(event)


def mark_write(device):
    """Record, on the current stream, the end of this call's work on the shared buffers."""
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    _LAST_WRITE[device] = event


def graph_key(model, spec, signature, ops, B, Tb, R, m, memory_dtype, write_head, memory_proj, clip_value,
              clip_norm):
    def ptr(t):
        return None if t is None else (t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()))

    proj = None if memory_proj is None else (ptr(memory_proj.weight), ptr(memory_proj.bias))
    return (id(model), signature, spec.embedding.device, spec.embedding.dtype, B, Tb, R, m, memory_dtype,
            ptr(write_head), proj, clip_value, clip_norm, ops.backend, matmul_settings())


def capture(model, spec, ops, ids, mask, memory, lr, write_head, memory_proj, clip_value, clip_norm, head_rows):
    """Warm up eagerly on a side stream (Triton compiles and autotunes there), then capture.

    ids, mask, memory: static buffers already filled with real values (warm-up reads them).
    """
    B, m = memory.shape[0], memory.shape[1]
    step_loss = torch.empty(B, dtype=torch.float32, device=memory.device)
    saved_memory = memory.clone()

    def prologue():
        return build_plan(spec, ops, ids, mask, m, memory.dtype, write_head, memory_proj, head_rows_count=head_rows)

    side = torch.cuda.Stream(device=memory.device)
    side.wait_stream(torch.cuda.current_stream(memory.device))
    with torch.cuda.stream(side):
        warm = prologue()
        write_step(warm, memory, lr, step_loss, clip_value, clip_norm)
        del warm
    torch.cuda.current_stream(memory.device).wait_stream(side)
    pro_graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(pro_graph, capture_error_mode="thread_local"):
        plan = prologue()
    step_graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(step_graph, pool=shared_pool(memory.device), capture_error_mode="thread_local"):
        write_step(plan, memory, lr, step_loss, clip_value, clip_norm)
    memory.copy_(saved_memory)
    return GraphEntry(model_ref=weakref.ref(model), ids=ids, mask=mask, memory=memory, lr=lr,
                      step_loss=step_loss, prologue=pro_graph, step=step_graph, plan=plan)


def graph_write(model, spec, signature, ops, start, input_ids, attention_mask, *, steps, lr, write_head,
                memory_proj, clip_value, clip_norm, losses, real_rows, memories=None):
    """start (B, m, d) memory-dtype; real_rows: the mask's sum. Returns M_K (a fresh tensor); fills losses
    (B, K) when given; appends a copy of the memory before each step (M_0 .. M_{K-1}) to `memories` when
    given (the second-order write's forward)."""
    B, T = input_ids.shape
    m = start.shape[1]
    Tb, R = graph_shape(B, T, m, real_rows, spec.max_positions)
    key = graph_key(model, spec, signature, ops, B, Tb, R, m, start.dtype, write_head, memory_proj, clip_value,
                    clip_norm)

    def fill(ids, mask, memory, lr_t):
        ids[:, :T].copy_(input_ids)
        ids[:, T:].zero_()
        mask[:, :T].copy_(attention_mask)
        mask[:, T:].zero_()
        memory.copy_(start)
        lr_t.fill_(lr)

    def build():
        ids = torch.empty(B, Tb, dtype=torch.int64, device=start.device)
        mask = torch.empty(B, Tb, dtype=torch.int64, device=start.device)
        memory = torch.empty_like(start, memory_format=torch.contiguous_format)
        lr_t = torch.empty((), dtype=torch.float32, device=start.device)
        fill(ids, mask, memory, lr_t)
        return capture(model, spec, ops, ids, mask, memory, lr_t, write_head, memory_proj, clip_value,
                       clip_norm, R)

    # capture and replay use the current device's streams: make it the tensors' device
    with torch.cuda.device(start.device):
        after_last_write(start.device)
        entry = CACHE.get(key, model, build)
        fill(entry.ids, entry.mask, entry.memory, entry.lr)
        entry.prologue.replay()
        for k in range(steps):
            if memories is not None:
                memories.append(entry.memory.clone())
            entry.step.replay()
            entry.replays += 1
            if losses is not None:
                losses[:, k].copy_(entry.step_loss)
        result = entry.memory.clone()
        mark_write(start.device)
    return result
