"""Build the CUDA extension gradmem_fast._C in place, or reuse one built earlier for the same torch.

A built extension is an x86-64 shared object tied to the torch it was compiled against (its C++ ABI
and version), the CUDA version of that torch, the Python ABI (the file's suffix) and the sources.
`pack` stores it with those four in a manifest; `install` reuses a packed one whose manifest matches
this machine, else runs `setup.py build_ext --inplace`, and touches --done when it ends either way.

    python3 scripts/csrc_prebuilt.py install [--prebuilt csrc-build.tar.gz] [--done FILE]
    python3 scripts/csrc_prebuilt.py pack OUT.tar.gz
"""
import argparse
import glob
import hashlib
import io
import json
import os
import subprocess
import sys
import sysconfig
import tarfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MANIFEST = "manifest.json"


def sources_sha256(root=ROOT):
    """Hash of csrc/ and setup.py (the flags), in a fixed order."""
    h = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(root, "csrc", "*"))) + [os.path.join(root, "setup.py")]:
        if os.path.isfile(path):
            h.update(os.path.relpath(path, root).encode())
            with open(path, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def local_key(root=ROOT):
    import torch

    return {"torch": torch.__version__, "cuda": torch.version.cuda,
            "ext_suffix": sysconfig.get_config_var("EXT_SUFFIX"), "sources_sha256": sources_sha256(root)}


def built_module(root=ROOT):
    """The in-place build's file, or None."""
    found = sorted(glob.glob(os.path.join(root, "gradmem_fast", "_C*.so")))
    return found[0] if found else None


def pack(root, tar_path, key=None):
    module = built_module(root)
    if module is None:
        return "no built gradmem_fast/_C*.so: nothing packed"
    with tarfile.open(tar_path, "w:gz") as tar:
        data = json.dumps(key or local_key(root), indent=1).encode()
        info = tarfile.TarInfo(MANIFEST)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        tar.add(module, arcname=os.path.basename(module))
    return f"packed {os.path.basename(module)} into {tar_path}, {os.path.getsize(tar_path)} bytes"


def reuse(root, tar_path, key=None):
    """(ok, description): the packed module copied into gradmem_fast/ when its manifest matches."""
    if not tar_path or not os.path.exists(tar_path):
        return False, f"no prebuilt extension at {tar_path}"
    key = key or local_key(root)
    with tarfile.open(tar_path) as tar:
        carried = json.load(tar.extractfile(MANIFEST))
        differ = [f"{k}: prebuilt {carried.get(k)!r}, here {key.get(k)!r}" for k in sorted(key)
                  if carried.get(k) != key.get(k)]
        if differ:
            return False, "prebuilt extension does not match: " + "; ".join(differ)
        members = [m for m in tar.getmembers() if m.name != MANIFEST]
        if len(members) != 1 or not members[0].isfile() or "/" in members[0].name \
                or not members[0].name.startswith("_C"):
            return False, f"unexpected members {[m.name for m in members]} in {tar_path}"
        member = members[0]
        tar.extract(member, os.path.join(root, "gradmem_fast"))
    return True, f"reused the prebuilt {member.name} (torch {key['torch']})"


def install(root, tar_path, done):
    try:
        ok, text = reuse(root, tar_path)
        print(text, flush=True)
        if ok:
            return 0
        return subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=root).returncode
    finally:
        if done:
            with open(done, "w") as f:
                f.write("done\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    i = sub.add_parser("install")
    i.add_argument("--prebuilt")
    i.add_argument("--done", help="file touched when the build (or reuse) has ended")
    k = sub.add_parser("pack")
    k.add_argument("tar")
    args = p.parse_args(argv)
    if args.command == "pack":
        print(pack(ROOT, args.tar))
        return 0
    return install(ROOT, args.prebuilt, args.done)


if __name__ == "__main__":
    sys.exit(main())
