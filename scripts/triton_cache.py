"""Carry a Triton kernel cache from one machine to another: pack it small, unpack it where it is found.

Triton looks a kernel up on disk by a hash of: its own version and the hashes of its Python sources
and of libtriton.so (which differs between Python versions: a cp311 build never matches a cp312
one), the kernel's source and line number and its specialisation (dtypes, divisibility by 16,
constexprs), the backend (ptxas version and target arch), the compile options (warps, stages, the
hash of libdevice's file) and the cache-invalidating TRITON_* variables that are set. A cache made
by the same Triton wheel on the same Python therefore hits wherever it lands, except that each
entry's group file (__grp__NAME.json) lists its files by absolute path: unpacking rewrites those
paths. Packing keeps the metadata json, the cubin and the launcher stubs, and drops the
intermediate IR (ttir, ttgir, llir, ptx), which a cache hit does not read.

    python3 scripts/triton_cache.py pack CACHE_DIR OUT.tar.gz     # a manifest holds local_key()
    python3 scripts/triton_cache.py unpack IN.tar.gz [CACHE_DIR]  # default $TRITON_CACHE_DIR
    python3 scripts/triton_cache.py key                            # local_key() as JSON
"""
import gzip
import hashlib
import io
import json
import os
import sys
import tarfile

MANIFEST = "manifest.json"
DROPPED = (".ttir", ".ttgir", ".llir", ".ptx", ".source")


def local_key():
    """What a carried cache must match here: Triton's version, the hash of triton_key() (its sources and
    libtriton), Python's version, the ptxas version, the cache-invalidating variables that are set."""
    import triton
    from triton.runtime.cache import triton_key

    key = {"triton": triton.__version__, "python": "%d.%d" % sys.version_info[:2],
           "triton_key_sha256": hashlib.sha256(triton_key().encode()).hexdigest()}
    try:
        from triton.backends.nvidia.compiler import get_ptxas_version
        try:
            version = get_ptxas_version(90)
        except TypeError:  # older Triton: no arch argument
            version = get_ptxas_version()
        lines = version.strip().splitlines() if isinstance(version, str) else [str(version)]
        key["ptxas"] = next((line for line in lines if "release" in line), lines[-1])
    except Exception as exc:  # no CUDA backend in this Triton
        key["ptxas"] = f"unknown ({type(exc).__name__})"
    try:
        from triton._C.libtriton import get_cache_invalidating_env_vars
        key["env"] = dict(sorted(get_cache_invalidating_env_vars().items()))
    except Exception:
        key["env"] = {k: v for k, v in sorted(os.environ.items()) if k.startswith("TRITON_")
                      and k not in ("TRITON_CACHE_DIR", "TRITON_INTERPRET")}
    return key


def _add_bytes(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _entries(cache_dir):
    """Cache entries (folder names), the library's kernels first and torch.compile's (named triton_*)
    after them, so that a size limit drops the latter first."""
    entries = [e for e in sorted(os.listdir(cache_dir)) if os.path.isdir(os.path.join(cache_dir, e))]

    def compiled_by_inductor(entry):
        return any(n.startswith("triton_") for n in os.listdir(os.path.join(cache_dir, entry)))

    return sorted(entries, key=compiled_by_inductor)


def pack(cache_dir, tar_path, max_bytes=None):
    """Write tar_path from cache_dir; returns a one-line description. Entries that would take the file
    past max_bytes (compressed) are left out, the library's kernels being packed first."""
    if not os.path.isdir(cache_dir):
        return f"no Triton cache at {cache_dir}: nothing packed"
    packed = kernels = left_out = 0
    with open(tar_path + ".tmp", "wb") as raw:
        with gzip.GzipFile(fileobj=raw, mode="wb") as gz, tarfile.open(fileobj=gz, mode="w") as tar:
            _add_bytes(tar, MANIFEST, json.dumps(local_key(), indent=1).encode())
            for entry in _entries(cache_dir):
                folder = os.path.join(cache_dir, entry)
                names = sorted(os.listdir(folder))
                files = [n for n in names if not n.endswith(DROPPED) and not n.startswith("__grp__")
                         and not n.endswith(".tmp") and ".tmp." not in n]
                size = sum(os.path.getsize(os.path.join(folder, n)) for n in files)
                gz.flush()  # so that raw.tell() counts every compressed byte so far
                if max_bytes is not None and raw.tell() + size // 2 > max_bytes:  # cubins compress about 2x
                    left_out += 1
                    continue
                for grp in (n for n in names if n.startswith("__grp__")):
                    with open(os.path.join(folder, grp)) as f:
                        children = json.load(f).get("child_paths", {})
                    kept = {c: os.path.basename(p) for c, p in children.items() if not c.endswith(DROPPED)}
                    _add_bytes(tar, f"{entry}/{grp}", json.dumps({"child_paths": kept}).encode())
                    kernels += 1
                for name in files:
                    tar.add(os.path.join(folder, name), arcname=f"{entry}/{name}")
                packed += 1
    if packed == 0:
        os.remove(tar_path + ".tmp")
        return f"the Triton cache at {cache_dir} is empty: nothing packed"
    os.replace(tar_path + ".tmp", tar_path)
    size = os.path.getsize(tar_path)
    note = f", {left_out} entries left out to stay under {max_bytes} bytes" if left_out else ""
    return f"packed {kernels} kernels ({packed} cache entries) into {tar_path}, {size} bytes{note}"


def mismatch(carried, here):
    """The fields of the carried manifest that differ from this machine's key ([] when it fits)."""
    return [f"{k}: carried {carried.get(k)!r}, here {here.get(k)!r}" for k in sorted(set(carried) | set(here))
            if carried.get(k) != here.get(k)]


def unpack(tar_path, cache_dir):
    """(ok, description). Refuses a cache whose manifest does not match local_key()."""
    if not os.path.exists(tar_path):
        return False, f"no carried Triton cache at {tar_path}"
    with tarfile.open(tar_path) as tar:
        carried = json.load(tar.extractfile(MANIFEST))
        differ = mismatch(carried, local_key())
        if differ:
            return False, "carried Triton cache does not match this machine: " + "; ".join(differ)
        os.makedirs(cache_dir, exist_ok=True)
        members = [m for m in tar.getmembers() if m.name != MANIFEST]
        for m in members:
            parts = m.name.split("/")
            if not m.isfile() or len(parts) != 2 or m.name.startswith("/") or ".." in parts:
                return False, f"unexpected member {m.name!r} in {tar_path}"
        tar.extractall(cache_dir, members=members)
    kernels = 0
    for m in members:
        entry, name = m.name.split("/")
        if name.startswith("__grp__"):
            path = os.path.join(cache_dir, entry, name)
            with open(path) as f:
                children = json.load(f)["child_paths"]
            absolute = {c: os.path.join(os.path.abspath(cache_dir), entry, base) for c, base in children.items()}
            with open(path, "w") as f:
                json.dump({"child_paths": absolute}, f)
            kernels += 1
    return True, f"unpacked {kernels} kernels into {cache_dir}"


def default_cache_dir():
    return os.environ.get("TRITON_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".triton", "cache")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["key"]:
        print(json.dumps(local_key(), indent=1))
        return 0
    if argv[:1] == ["pack"] and len(argv) == 3:
        print(pack(argv[1], argv[2]))
        return 0
    if argv[:1] == ["unpack"] and len(argv) in (2, 3):
        if not os.path.exists(argv[1]):
            print(f"no carried Triton cache at {argv[1]}: every kernel compiles here")
            return 0
        ok, text = unpack(argv[1], argv[2] if len(argv) == 3 else default_cache_dir())
        print(text)
        return 0 if ok else 3
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
