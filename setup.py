"""Build resnet_fused._C: always the C++ (CPU) kernels, plus the CUDA kernels when a CUDA toolkit is found.

RESNET_FUSED_BUILD_CUDA=1 forces the CUDA build (failing, with the reason, if the toolkit cannot build it), =0 forces
a CPU-only build; unset (auto), a toolkit that cannot build against this torch gives a CPU-only build and says why.
Building never needs a GPU.
"""

import glob
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def find_cuda_home() -> str | None:
    """CUDA_HOME if set, else the toolkit that owns nvcc (torch's own guess, /usr/local, is wrong here)."""
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return home
    nvcc = shutil.which("nvcc")
    for candidate in (nvcc and os.path.realpath(nvcc), "/usr/local/cuda/bin/nvcc"):
        if candidate and os.path.exists(candidate):
            home = os.path.dirname(os.path.dirname(candidate))
            if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
                return home
    return None


# RESNET_FUSED_BUILD_CUDA's values: True forces the CUDA build, False a CPU-only one, None (auto) builds CUDA when it can.
CUDA_FLAG_VALUES = {"auto": None, "1": True, "true": True, "yes": True, "on": True}
CUDA_FLAG_VALUES |= {"0": False, "false": False, "no": False, "off": False}


def cuda_build_flag() -> bool | None:
    raw = os.environ.get("RESNET_FUSED_BUILD_CUDA", "")
    value = raw.strip().lower() or "auto"
    if value not in CUDA_FLAG_VALUES:
        sys.exit(f"RESNET_FUSED_BUILD_CUDA: expected one of {', '.join(CUDA_FLAG_VALUES)}, got {raw!r}")
    return CUDA_FLAG_VALUES[value]


def cuda_archs() -> list[str]:
    """The GPU architectures to build SASS for (RESNET_FUSED_CUDA_ARCHS, e.g. "80;90")."""
    raw = os.environ.get("RESNET_FUSED_CUDA_ARCHS", "")
    archs = [a.strip() for a in (raw or "80;90").split(";") if a.strip()]
    if not archs:
        sys.exit(f"RESNET_FUSED_CUDA_ARCHS: expected architectures such as '80;90' (or unset), got {raw!r}")
    return archs


def nvcc_problem(cuda_home: str) -> str:
    """ "" when the toolkit at cuda_home can build the extension for this torch, else why not.

    torch's BuildExtension refuses an nvcc whose CUDA major version differs from torch's, and nvcc refuses a host
    compiler outside its supported range, C++20 (before CUDA 12) or an architecture it does not know: a trial compile
    of an empty kernel for the archs to build finds those in seconds, before the build spends minutes.
    """
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    try:
        version = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=120).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return f"`{nvcc} --version` failed ({e})"
    release = re.search(r"release (\d+)\.(\d+)", version)
    if release is None:
        return f"`{nvcc} --version` names no CUDA release"
    torch_major = torch.version.cuda.split(".")[0]
    if release[1] != torch_major:
        return (
            f"{nvcc} is CUDA {release[1]}.{release[2]}, this torch was built with CUDA {torch.version.cuda}: "
            f"expected a CUDA {torch_major}.x toolkit (set CUDA_HOME to one)"
        )
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "probe.cu")
        with open(source, "w") as f:
            f.write("__global__ void probe() {}\n")
        host = ["-ccbin", os.environ["CC"]] if os.environ.get("CC") else []  # as torch's BuildExtension passes it
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in cuda_archs()]
        command = [nvcc, *host, "-std=c++20", *gencode, "-c", source, "-o", os.path.join(tmp, "probe.o")]
        try:
            trial = subprocess.run(command, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.SubprocessError) as e:
            return f"`{' '.join(command)}` failed ({e})"
        if trial.returncode != 0:
            said = " ".join((trial.stderr + trial.stdout).split())[-400:]
            archs = ", ".join(f"sm_{a}" for a in cuda_archs())
            return f"{nvcc} cannot compile a C++20 kernel for {archs} with this host compiler: {said}"
    return ""


def want_cuda(cuda_home: str | None) -> bool:
    flag = cuda_build_flag()
    if flag is False:
        return False
    if torch.version.cuda is None:
        why = "this torch is a CPU-only build"
    elif cuda_home is None:
        why = "no CUDA toolkit (nvcc) was found; set CUDA_HOME"
    else:
        why = nvcc_problem(cuda_home)
    if not why:
        return True
    if flag:
        sys.exit(f"RESNET_FUSED_BUILD_CUDA=1 but {why}")
    print(f"resnet_fused: building without CUDA kernels: {why}", flush=True)
    return False


def shared_cxx_runtime() -> str:
    """The C++ runtime to link: the very libstdc++.so this process (torch) has loaded, by path, else -lstdc++.

    Some toolchains link libstdc++ statically (a CUDA image's /opt/gcc/bin/g++ does, and there even an explicit
    -lstdc++ ended up with a private copy: the linker takes libstdc++.a from the first folder that has one). A
    private copy inside the extension beside the process's own breaks number formatting: an error message comes
    out cut short (GCC 12) or crashes the process (GCC 13). A .so named by path links dynamically whatever the
    driver adds, and every C++ symbol resolves from it, so the archive adds nothing.
    """
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                if os.path.basename(path).startswith("libstdc++.so") and os.path.exists(path):
                    return path
    except OSError:
        pass
    return "-lstdc++"


LINK_ARGS = ["-fopenmp", shared_cxx_runtime()]
# Device math rounds as the host's (-ffp-contract=off below) and as the unfused ops: no FMA contraction, so the
# epilogue rounds conv * scale before adding the bias. The CUDA kernels are memory-bound: FMAs would save nothing.
NVCC_MATH = ["--fmad=false"]


def make_extension():
    cuda_home = find_cuda_home()
    use_cuda = want_cuda(cuda_home)
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx = [
        "-O3",
        "-std=c++20",
        "-fopenmp",
        "-Wno-unknown-pragmas",
        # The epilogue rounds conv * scale before adding the bias, as the unfused ops do: no FMA contraction (which
        # the AVX2 kernels' -mfma would allow), so a product that overflows does so in both, on every CPU.
        "-ffp-contract=off",
    ]
    extra = {"cxx": cxx}
    include_dirs = [os.path.join(ROOT, "csrc")]
    if not use_cuda:
        print("resnet_fused: building the CPU extension (CppExtension); no CUDA toolkit used", flush=True)
        return CppExtension(
            "resnet_fused._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args=extra,
            extra_link_args=LINK_ARGS,
        )
    os.environ["CUDA_HOME"] = cuda_home
    import torch.utils.cpp_extension as ext

    ext.CUDA_HOME = cuda_home  # torch caches its guess at import time
    sources += sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    # The toolkit here lacks cublas/cusparse headers that ATen/cuda includes; the pip nvidia wheels carry them.
    for site in sys.path:
        wheel_inc = os.path.join(site, "nvidia", "cu13", "include")
        if os.path.isdir(wheel_inc):
            include_dirs.append(wheel_inc)
            break
    archs = cuda_archs()
    # SASS for each arch, plus PTX for the newest, which the driver JIT-compiles on GPUs newer than every arch built.
    newest = max(archs, key=lambda a: int("".join(c for c in a if c.isdigit())))
    nvcc = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-Xptxas=-v,-warn-spills", "-lineinfo", *NVCC_MATH]
    nvcc += [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    nvcc += [f"-gencode=arch=compute_{newest},code=compute_{newest}"]
    # Named in the error when a GPU has no image (cuda_kernel_status).
    nvcc += [f"-DRESNET_FUSED_CUDA_ARCHS={'/'.join('sm_' + a for a in archs)}"]  # nvcc splits -D values at commas
    extra["nvcc"] = nvcc
    print(
        f"resnet_fused: building the CPU+CUDA extension (CUDAExtension) with {cuda_home}, sm_{archs} + PTX {newest}",
        flush=True,
    )
    return CUDAExtension(
        "resnet_fused._C", sources, include_dirs=include_dirs, extra_compile_args=extra, extra_link_args=LINK_ARGS
    )


# Sources compiled with their own ISA flags, as ATen compiles its per-capability kernels; they run only after a
# run-time CPU check. x86-64 only: elsewhere these files build their portable stubs.
ISA_SOURCES = {"csrc/cpu/kernels_vec_avx2.cpp": ["-mavx2", "-mfma", "-mf16c", "-Wno-psabi"]}


class Build(BuildExtension):
    """torch's BuildExtension (ninja), plus a first compile of ISA_SOURCES with their own flags."""

    def build_extension(self, ext) -> None:
        if platform.machine().lower() in ("x86_64", "amd64"):
            for source, flags in ISA_SOURCES.items():
                if source not in ext.sources:
                    continue
                ext.sources = [s for s in ext.sources if s != source]
                args = ext.extra_compile_args
                post = {**args, "cxx": [*args["cxx"], *flags]} if isinstance(args, dict) else [*args, *flags]
                ext.extra_objects = [
                    *ext.extra_objects,
                    *self.compiler.compile(
                        [source], output_dir=self.build_temp, include_dirs=ext.include_dirs, extra_postargs=post,
                        depends=ext.depends,
                    ),
                ]  # fmt: skip
        super().build_extension(ext)


# Name, version and dependencies live in pyproject.toml; here, what is built.
setup(
    packages=find_packages(include=["resnet_fused", "resnet_fused.*"]),
    ext_modules=[make_extension()],
    cmdclass={"build_ext": Build.with_options(use_ninja=True)},
)
