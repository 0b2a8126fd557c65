"""Build mosx's CUDA sources for the SIMT emulator (emu.h) and load them as the torch library
``mosx_emu``: the same ops as ``torch.ops.mosx``, whose CUDA host code and kernels run on CPU
tensors. A test tool (tests/test_cuda_emulated.py); nothing here is part of the package.

    python tools/cuda_emu/build.py [--asan]   # build (cached by content) and print the library

The sources are copied, not edited in place, with these mechanical rewrites: kernel launches
``k<<<grid, block, smem, stream>>>(args)`` become ``mosx_emu::launch(k, grid, block, smem,
stream)(args)``; ``extern __shared__`` arrays become views of the block's emulated shared memory
and static ``__shared__`` arrays become statics; the CUDA guard and stream become stand-ins;
``is_cuda()`` checks accept CPU tensors; and the registrations move from the ``mosx`` library's
CUDA key to ``mosx_emu``'s CPU key (its schemas are copied from csrc/mosx.cpp).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HERE = os.path.dirname(os.path.abspath(__file__))
LIB = "mosx_emu"

_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;(){}]*>)?)<<<(.+?)>>>\(", re.S)
_EXTERN_SHARED = re.compile(r"extern __shared__ (?:__align__\(\d+\) )?([\w: ]+?) (\w+)\[\];")
_STATIC_SHARED = re.compile(r"^(\s*)__shared__ ", re.M)


def rewrite(text: str) -> str:
    """The CUDA source text as C++ for the emulator."""
    text = _LAUNCH.sub(lambda m: f"::mosx_emu::launch({m.group(1)}, {m.group(2)})(", text)
    text = _EXTERN_SHARED.sub(
        lambda m: f"{m.group(1)}* {m.group(2)} = reinterpret_cast<{m.group(1)}*>(::mosx_emu::dynamic_smem());",
        text,
    )
    text = _STATIC_SHARED.sub(r"\1static ", text)
    text = text.replace("c10::cuda::CUDAGuard", "::mosx_emu::Guard")
    text = text.replace("c10::cuda::getCurrentCUDAStream()", "::mosx_emu::stream()")
    text = text.replace(".is_cuda()", ".is_cpu()")
    text = re.sub(r"TORCH_LIBRARY_IMPL\(mosx, CUDA, (\w+)\)", rf"TORCH_LIBRARY_IMPL({LIB}, CPU, \1)", text)
    text = re.sub(r"TORCH_LIBRARY_IMPL\(mosx, (\w+), (\w+)\)", rf"TORCH_LIBRARY_IMPL({LIB}, \1, \2)", text)
    text = re.sub(r"TORCH_LIBRARY_FRAGMENT\(mosx, (\w+)\)", rf"TORCH_LIBRARY_FRAGMENT({LIB}, \1)", text)
    return text


def schemas() -> str:
    """A TORCH_LIBRARY(mosx_emu) block with the schemas of csrc/mosx.cpp."""
    src = open(os.path.join(ROOT, "csrc", "mosx.cpp")).read()
    start = src.index("TORCH_LIBRARY(mosx, m) {")
    body = src[start : src.index("\n}\n", start) + 3]
    return "#include <torch/library.h>\n\n" + body.replace("TORCH_LIBRARY(mosx, m)", f"TORCH_LIBRARY({LIB}, m)")


class NoCudaHeaders(FileNotFoundError):
    """No CUDA toolkit headers (cuda_runtime.h) on this machine."""


def cuda_include() -> str:
    """The CUDA toolkit's include directory (cuda_runtime.h; no device library is linked)."""
    from torch.utils import cpp_extension

    cands = [os.path.join(p, "include") for p in (os.environ.get("CUDA_HOME"), cpp_extension.CUDA_HOME) if p]
    cands += ["/usr/local/cuda/include"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        here = subprocess.run(
            [nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull], capture_output=True, text=True
        ).stderr
        m = re.search(r"^#\$ _HERE_=(.*)$", here, re.M)
        if m:
            cands.append(os.path.join(os.path.dirname(m.group(1).strip()), "include"))
        cands.append(os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "include"))
    for c in cands:
        if os.path.isfile(os.path.join(c, "cuda_runtime.h")):
            return c
    raise NoCudaHeaders(f"cuda_runtime.h not found (looked in {cands}); set CUDA_HOME")


def _write(path: str, text: str) -> None:
    """Write text to path unless it already holds it (an unchanged mtime lets ninja skip it)."""
    if os.path.isfile(path) and open(path).read() == text:
        return
    with open(path, "w") as fh:
        fh.write(text)


def stage(out: str) -> list[str]:
    """Write the rewritten sources under out/src; return the .cpp files to compile."""
    src = os.path.join(out, "src")
    os.makedirs(os.path.join(src, "cuda"), exist_ok=True)
    for h in glob.glob(os.path.join(ROOT, "csrc", "*.h")):
        _write(os.path.join(src, os.path.basename(h)), open(h).read())
    files = []
    for f in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*"))):
        name = os.path.basename(f)
        text = rewrite(open(f).read())
        if name.endswith(".cu"):
            name = name[:-3] + ".cpp"
            files.append(os.path.join(src, "cuda", name))
        _write(os.path.join(src, "cuda", name), text)
    # host code the CUDA files call (no registrations in it)
    _write(
        os.path.join(src, "masked_weight_select.cpp"),
        open(os.path.join(ROOT, "csrc", "masked_weight_select.cpp")).read(),
    )
    files.append(os.path.join(src, "masked_weight_select.cpp"))
    files.append(os.path.join(src, "schemas.cpp"))
    _write(files[-1], schemas())
    return files


def build(asan: bool = False, verbose: bool = False) -> str:
    """Build (or reuse) the emulated library, load it into this process; return its path."""
    import torch
    from torch.utils import cpp_extension

    parts = [open(f, "rb").read() for f in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*")))]
    parts += [open(f, "rb").read() for f in sorted(glob.glob(os.path.join(ROOT, "csrc", "*.h")))]
    parts += [open(os.path.join(ROOT, "csrc", f), "rb").read() for f in ("mosx.cpp", "masked_weight_select.cpp")]
    parts += [open(__file__, "rb").read()]
    parts += [open(os.path.join(HERE, "emu.h"), "rb").read(), torch.__version__.encode(), bytes([asan])]
    digest = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    base = os.environ.get("MOSX_EMU_BUILD", os.path.join(ROOT, "build", "cuda_emu"))
    out = os.path.join(base, digest)
    os.makedirs(out, exist_ok=True)
    sources = stage(out)
    flags = [
        "-std=c++20",
        "-O2",
        "-g",
        "-fno-strict-aliasing",
        "-Wno-attributes",
        "-Wno-unknown-pragmas",
        "-DMOSX_WITH_CUDA=1",
        "-DMOSX_CUDA_EMULATION=1",
        "-include",
        os.path.join(HERE, "emu.h"),
    ]
    ldflags = []
    if asan and "libasan" not in open("/proc/self/maps").read():
        raise RuntimeError(
            "an AddressSanitizer build must be loaded into a process that starts with libasan: "
            "LD_PRELOAD=$(gcc -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0 ..."
        )
    if asan:
        flags += ["-fsanitize=address", "-fno-omit-frame-pointer"]
        ldflags += ["-fsanitize=address"]
    cpp_extension.load(
        name=f"mosx_cuda_emu_{digest}",
        sources=sources,
        extra_cflags=flags,
        extra_ldflags=ldflags,
        extra_include_paths=[cuda_include()],
        build_directory=out,
        is_python_module=False,
        verbose=verbose,
    )
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--asan", action="store_true", help="build with AddressSanitizer")
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args(argv)
    print(build(asan=a.asan, verbose=a.verbose))
    return 0


if __name__ == "__main__":
    sys.exit(main())
