"""Compile every Triton kernel of gradmem_fast for a GPU target, without a GPU and without launching.

The host launchers in gradmem_fast.kernels are called on CPU tensors with the dtypes, head dims and
shapes the library uses; each kernel launch is intercepted and compiled with `triton.compile` for
the target (default sm_90), once per autotuning config, with the argument specialisation Triton's
JIT would give it (pointer dtypes, divisibility by 16, integers equal to 1). Prints registers,
spilled bytes (stack + local) and shared memory of each compiled kernel, marking "big" those over
the card's shared memory (the autotuner skips such a config at launch) and "SPILL" those that spill
registers, then lists the spilling ones; exits 1 if any compile fails. `--autotune 0` compiles only
what GRADMEM_FAST_AUTOTUNE=0 launches (one config per kernel, dtype and head dim).

    python scripts/compile_kernels.py [--arch 90] [--dtypes bf16,fp16,fp32] [--head-dims 64,128,256] [-j 2]
                                      [--autotune 0]
                                      [--ops attention,attention_double_backward,head_loss,head_loss_double_backward,
                                             qk_norm,geglu,norm_double_backward,activation_double_backward]
"""
import argparse
import concurrent.futures as cf
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

# the launchers pick GPU block sizes and every autotuning config only with the interpreter off
os.environ.pop("TRITON_INTERPRET", None)
os.environ.pop("GRADMEM_FAST_AUTOTUNE", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton._C.libtriton import native_specialize_impl  # noqa: E402
from triton.backends.compiler import BaseBackend, GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_launches = []  # (JITFunction, args, kwargs) per launch and config, filled by the patched run()
_jobs = []  # (JITFunction, signature, constexprs, attrs, options, arch), read by index in the workers


def _record_jit(self, *args, grid, warmup, **kwargs):
    _launches.append((self, args, kwargs))


def _record_autotuned(self, *args, **kwargs):
    kwargs.pop("grid", None)
    kwargs.pop("warmup", None)
    self.nargs = dict(zip(self.arg_names, args))
    for config in self.prune_configs(kwargs):  # the configs the autotuner would time
        _launches.append((self.fn, args, {**kwargs, **config.all_kwargs()}))


def _rand(shape, dtype):
    # values never matter: nothing is launched
    return torch.empty(shape, dtype=dtype)


def attention_launches(dtype, D, Hq, Hkv, B=2, m=16, T=512):
    """The calls the write engine makes: full attention forward/backward over S = m + T rows and the
    layer-0 path (context state, memory-only forward and backward)."""
    from gradmem_fast.kernels import attention as A, attention_layer0 as L0

    S = m + T
    scale = D ** -0.5
    q, do = _rand((B, S, Hq, D), dtype), _rand((B, S, Hq, D), dtype)
    k, v = _rand((B, S, Hkv, D), dtype), _rand((B, S, Hkv, D), dtype)
    lengths = torch.full((B,), S, dtype=torch.int32)
    o, lse = A.attention_forward(q, k, v, lengths, scale)
    A.attention_backward(do, q, k, v, o, lse, lengths, scale)
    ctx_lengths = torch.full((B,), T, dtype=torch.int32)
    q_ctx = q[:, m:]
    state = A.context_attention_state(q_ctx, k[:, m:], v[:, m:], ctx_lengths, scale)
    q_mem, k_mem, v_mem = q[:, :m], k[:, :m], v[:, :m]
    o, lse = L0.memory_attention_forward(q_mem, k_mem, v_mem, q_ctx, state, ctx_lengths, scale)
    L0.memory_attention_backward(do, q_mem, k_mem, v_mem, q_ctx, o, lse, ctx_lengths, scale)


def attention_double_backward_launches(dtype, D, Hq, Hkv, B=2, S=528):
    """The recomputed step's attention double backward over S = m + T rows (both kernels)."""
    from gradmem_fast.kernels.attention_double_backward import attention_double_backward

    q, do, gq, o = (_rand((B, S, Hq, D), dtype) for _ in range(4))
    k, v, gk, gv = (_rand((B, S, Hkv, D), dtype) for _ in range(4))
    lengths = torch.full((B,), S, dtype=torch.int32)
    attention_double_backward(q, k, v, do, o, torch.empty(B, Hq, S), lengths, D ** -0.5, gq, gk, gv)


def head_loss_launches(dtype, d, V, N=16):
    from gradmem_fast.kernels.head_loss import METHODS, head_loss

    hidden, weight = _rand((N, d), dtype), _rand((V, d), dtype)
    targets = torch.randint(0, V, (N,))
    row_weights = torch.ones(N)
    for method in METHODS:
        head_loss(hidden, weight, targets, row_weights, torch.empty(N), torch.empty_like(hidden), method=method)


def head_loss_double_backward_launches(dtype, d, V, N=16):
    """The backward of head_loss_op: both gradients, and the hidden one alone (NEED_HIDDEN off)."""
    from gradmem_fast.kernels.head_loss_double_backward import head_loss_double_backward

    hidden, weight, grad_bar = _rand((N, d), dtype), _rand((V, d), dtype), _rand((N, d), dtype)
    rows = (torch.randint(0, V, (N,)), torch.ones(N), torch.zeros(N), torch.zeros(N))
    head_loss_double_backward(hidden, weight, *rows, grad_bar, torch.empty_like(hidden), torch.empty_like(weight))
    head_loss_double_backward(hidden, weight, *rows, grad_bar, None, torch.empty_like(weight))


def qk_norm_launches(dtype, D, G=24, N=64):
    """The per-head q/k RMS norm over G = H + Hkv heads of width D (or one row of the whole projection)."""
    from gradmem_fast.kernels.qk_norm import qk_norm_bwd, qk_norm_fwd

    x, w = _rand((N, G, D), dtype), _rand((G, D), dtype)
    rstd = torch.empty(N * G, dtype=torch.float32)
    qk_norm_fwd(x, w, 1e-6, torch.empty_like(x), rstd)
    qk_norm_bwd(_rand((N, G, D), dtype), x, w, rstd, torch.empty_like(x))


def geglu_launches(dtype, n=1 << 20):
    from gradmem_fast.kernels.geglu import geglu_bwd, geglu_fwd

    gate, up = _rand((n,), dtype), _rand((n,), dtype)
    geglu_fwd(gate, up, torch.empty_like(gate))
    geglu_bwd(_rand((n,), dtype), gate, up, torch.empty_like(gate), torch.empty_like(up))


def norm_double_backward_launches(dtype, d, N=64):
    """The norms' double backward: RMS and LayerNorm rows of width d, and the q/k norm (N, 24, 128) when
    d is a head dim."""
    from gradmem_fast.kernels.norm_double_backward import norm_double_backward

    if d <= 256:
        x, w = _rand((N, 24, d), dtype), _rand((24, d), dtype)
        norm_double_backward(_rand(x.shape, dtype), x, w, _rand(x.shape, dtype), 1e-6, False)
        return
    x, w = _rand((N, d), dtype), _rand((d,), dtype)
    for is_layer in (False, True):
        norm_double_backward(_rand(x.shape, dtype), x, w, _rand(x.shape, dtype), 1e-5, is_layer)


def activation_double_backward_launches(dtype, n=1 << 20):
    """Every activation's double backward, all output cotangents given and (gated) one missing."""
    from gradmem_fast.kernels.activation_double_backward import activation_double_backward

    dy, a, b = (_rand((n,), dtype) for _ in range(3))
    for kind in ("swiglu", "geglu_tanh"):
        activation_double_backward(kind, dy, (a, b), (_rand((n,), dtype), _rand((n,), dtype)))
        activation_double_backward(kind, dy, (a, b), (_rand((n,), dtype), None))
    for kind in ("gelu_tanh", "gelu"):
        activation_double_backward(kind, dy, (a,), (_rand((n,), dtype),))


OPS = ("attention", "attention_double_backward", "head_loss", "head_loss_double_backward", "qk_norm", "geglu",
       "norm_double_backward", "activation_double_backward")


def collect(dtypes, head_dims, ops=OPS):
    JITFunction.run, Autotuner.run = _record_jit, _record_autotuned
    for name in dtypes:
        dtype = DTYPES[name]
        if "attention" in ops:
            for D in head_dims:
                for Hq, Hkv in ((4, 4), (8, 2)):  # GROUP 1 (GPT-2) and 4 (Llama GQA)
                    attention_launches(dtype, D, Hq, Hkv)
        if "attention_double_backward" in ops:
            for D in head_dims:
                for Hq, Hkv in ((4, 4), (8, 2)):
                    attention_double_backward_launches(dtype, D, Hq, Hkv)
        if "head_loss" in ops:
            # GPT-2, Llama-3.2-1B and the small KV-retrieval model's head
            for d, V in ((768, 50257), (2048, 128256), (128, 70)):
                head_loss_launches(dtype, d, V)
        if "head_loss_double_backward" in ops:
            for d, V in ((768, 50257), (2048, 128256), (128, 70)):
                head_loss_double_backward_launches(dtype, d, V)
        if "qk_norm" in ops:  # per head (Qwen3, Gemma 3) and over the whole projection (OLMo 2)
            for D in (*head_dims, 2048, 4096):
                qk_norm_launches(dtype, D, G=24 if D <= 256 else 1)
        if "geglu" in ops:
            geglu_launches(dtype)
        if "norm_double_backward" in ops:
            for d in (*head_dims, 768, 2048, 4096, 8192):
                norm_double_backward_launches(dtype, d)
        if "activation_double_backward" in ops:
            activation_double_backward_launches(dtype)


def specialise(fn, args, kwargs):
    """(signature, constexprs, attrs, options) as the JIT builds them for this launch."""
    names = fn.arg_names
    bound = fn.signature.bind(*args, **{k: v for k, v in kwargs.items() if k in names})
    bound.apply_defaults()
    options = {k: v for k, v in kwargs.items() if k not in names}
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        value = bound.arguments[p.name]
        if p.is_constexpr:
            signature[p.name], constexprs[p.name] = "constexpr", value
            continue
        ty, spec = native_specialize_impl(BaseBackend, value, p.is_const, not p.do_not_specialize,
                                          not p.do_not_specialize_on_alignment)
        signature[p.name] = ty
        if ty == "constexpr":
            constexprs[p.name] = spec
        elif isinstance(spec, str):
            attrs[(i,)] = BaseBackend.parse_attr(spec)
    return signature, constexprs, attrs, options


def _tool(name):
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return bundled if os.path.exists(bundled) else shutil.which(name)


def resources(cubin):
    """Registers, stack (spill) and local bytes, shared bytes from cuobjdump, or {} without it."""
    tool = _tool("cuobjdump")
    if tool is None:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    return {k.lower(): int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text)}


def compile_one(index):
    fn, signature, constexprs, attrs, options, arch = _jobs[index]
    start = time.time()
    try:
        k = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                           target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as exc:
        return None, f"{type(exc).__name__}: {str(exc).strip()[-2000:]}", time.time() - start
    info = resources(k.asm["cubin"])
    info["shared"] = max(info.get("shared", 0), k.metadata.shared)
    return info, None, time.time() - start


def describe(signature, constexprs, options):
    ptrs = sorted({t for t in signature.values() if t.startswith("*") and t not in ("*fp32", "*i32", "*i64")})
    keys = ("GROUP", "HEAD_DIM", "HAS_LENGTHS", "STATE_OUT", "DELTA_FROM_O", "NEED_HIDDEN", "ACC_IS_OUT", "BLOCK_M",
            "BLOCK_N", "BLOCK_V", "BLOCK_D")
    const = " ".join(f"{k}={constexprs[k]}" for k in keys if k in constexprs)
    return f"{','.join(ptrs) or 'fp32'} {const} w{options.get('num_warps', 4)} s{options.get('num_stages', 3)}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--dtypes", default="bf16,fp16,fp32")
    ap.add_argument("--head-dims", default="64,128,256")  # 256: Gemma 3
    ap.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1)
    # sm_90's shared memory per block; an autotuning config above it is skipped at launch
    ap.add_argument("--smem-limit", type=int, default=232448)
    ap.add_argument("--ops", default=",".join(OPS), help=f"which kernels: {', '.join(OPS)}")
    ap.add_argument("--autotune", type=int, choices=(0, 1), default=1,
                    help="0: only the configs launched with GRADMEM_FAST_AUTOTUNE=0")
    args = ap.parse_args(argv)
    # read when the kernel modules are imported (their config lists) and at each launch
    os.environ["GRADMEM_FAST_AUTOTUNE"] = str(args.autotune)
    os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="triton-cache-"))
    collect(args.dtypes.split(","), [int(d) for d in args.head_dims.split(",")], args.ops.split(","))
    jobs, seen = _jobs, set()
    for fn, a, kw in _launches:
        sig, const, attrs, opts = specialise(fn, a, kw)
        key = (fn.__name__, str(sig), str(const), str(attrs), str(opts))
        if key not in seen:
            seen.add(key)
            jobs.append((fn, sig, const, attrs, opts, args.arch))
    print(f"triton {triton.__version__}, torch {torch.__version__}, target sm_{args.arch}: "
          f"{len(_launches)} launches, {len(jobs)} distinct compiles", flush=True)
    failed = over = 0
    spilling = []
    with cf.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        for job, (info, err, secs) in zip(jobs, pool.map(compile_one, range(len(jobs)))):
            fn, sig, const, _, opts, _ = job
            head = f"{fn.__name__:24s} {describe(sig, const, opts):58s}"
            if err is not None:
                failed += 1
                print(f"FAIL {head}\n     {err}", flush=True)
                continue
            spill = info.get("stack", 0) + info.get("local", 0)
            big = info["shared"] > args.smem_limit
            over += big
            line = (f"{head} regs {info.get('reg', '?'):>3} spill {spill:>5} smem {info['shared']:>6}")
            if spill and not big:
                spilling.append(line)
            print(f"{'big  ' if big else 'SPILL' if spill else 'ok   '} {line} {secs:5.1f}s", flush=True)
    print(f"{len(spilling)} launchable configs spill registers:")
    for line in spilling:
        print(f"  {line}")
    print(f"{len(jobs) - failed} compiled ({over} over {args.smem_limit} bytes of shared memory: "
          f"cannot launch), {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
