"""The extension's build, proven without a GPU: it links the shared C++ runtime, loads, registers the CUDA kernels when
the build has CUDA code, the .so carries SASS for every arch built plus PTX for the newest (so newer GPUs JIT it),
the kernel-image check is registered, and ptxas reports no register spills for our kernels on sm_80 and sm_90."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest
import torch

import resnet_fused
from resnet_fused import _C
from resnet_fused.backends import BACKENDS

ROOT = Path(__file__).resolve().parents[1]
CUDA_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
OPS = ("resnet_fused::conv_bias_add_relu", "resnet_fused::conv_bias_add_relu_backward")
# Every __global__ of csrc/cuda, as it appears in mangled names.
VECTOR_KERNELS = ("epilogue_planes_kernel", "epilogue_rows_kernel", "backward_planes_kernel", "backward_rows_kernel")
KERNELS = (*VECTOR_KERNELS, "reduce_partials_kernel")


def so_path() -> Path:
    return Path(_C.__file__)


def so_has_device_code() -> bool:
    """Whether the built extension embeds CUDA device code (a .nv_fatbin ELF section)."""
    return b".nv_fatbin" in so_path().read_bytes()


def find_cuobjdump() -> str | None:
    import importlib.util

    spec = importlib.util.find_spec("triton")
    candidates = [shutil.which("cuobjdump"), "/usr/local/cuda/bin/cuobjdump"]
    if spec is not None and spec.origin:
        candidates.append(str(Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump"))
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def find_nvcc() -> str | None:
    """The nvcc setup.py builds with (its find_cuda_home)."""
    home = setup_code("find_cuda_home")["find_cuda_home"]()
    nvcc = home and os.path.join(home, "bin", "nvcc")
    return nvcc if nvcc and os.access(nvcc, os.X_OK) else None


def test_extension_loads_and_registers_cpu_kernels():
    assert Path(_C.__file__).exists()
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU"), op
    assert "cpu" in resnet_fused.available_backends()


# Symbols only libstdc++ itself defines (no header emits them inline): std::locale::classic(), the
# ostream::_M_insert<long> that formats an integer, and ios_base::Init's constructor.
CXX_RUNTIME_SYMBOLS = ("_ZNSt6locale7classicEv", "_ZNSo9_M_insertIlEERSoT_", "_ZNSt8ios_base4InitC1Ev")


def linked_cxx_runtime(so: Path) -> tuple[bool, list[str]]:
    """(whether the .so needs libstdc++.so, the libstdc++ symbols it defines itself: a static copy)."""
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf not found")
    dynamic = subprocess.run([readelf, "-d", str(so)], capture_output=True, text=True, check=True).stdout
    syms = subprocess.run([readelf, "--dyn-syms", "-W", str(so)], capture_output=True, text=True, check=True).stdout
    # Rows: Num Value Size Type Bind Vis Ndx Name[@version]; Ndx UND marks a symbol the .so only uses.
    rows = [line.split() for line in syms.splitlines()]
    defined = {r[7].split("@")[0] for r in rows if len(r) >= 8 and r[0].endswith(":") and r[6] != "UND"}
    return bool(re.search(r"NEEDED.*\[libstdc\+\+\.so", dynamic)), [s for s in CXX_RUNTIME_SYMBOLS if s in defined]


def test_a_missing_extension_says_how_to_build_it():
    """Importing a source tree without a built extension (or one built against another torch) named a "circular
    import"; the error says what is wrong and how to build."""
    code = "import sys; sys.modules['resnet_fused._C'] = None; import resnet_fused"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    said = done.stderr.strip().splitlines()[-1]
    assert "ImportError: resnet_fused's C++ extension is missing, or was built against another torch" in said, said
    assert f"({torch.__version__})" in said and "pip install --no-build-isolation ." in said, said


def test_extension_links_the_shared_cxx_runtime():
    """The .so uses the process's libstdc++.so (torch's) and holds no copy of its own, even where the compiler
    wrapper links it statically: with a private copy beside the process's own, a C++ error message with a number
    in it comes out cut short or crashes the process (seen with GCC 13 on a CUDA image)."""
    needs_shared, own_copy = linked_cxx_runtime(so_path())
    assert needs_shared and not own_copy, f"needs libstdc++.so: {needs_shared}; defines {own_copy}"


def setup_code(*names: str) -> dict:
    """setup.py's functions and assignments ``names``, run by its own code in this process (torch loaded), without
    running setup()."""
    tree = ast.parse((ROOT / "setup.py").read_text())

    def defines(n: ast.stmt) -> set[str]:
        if isinstance(n, ast.FunctionDef):
            return {n.name}
        targets = n.targets if isinstance(n, ast.Assign) else [n.target] if isinstance(n, ast.AugAssign) else []
        return {getattr(t, "id", None) for t in targets}

    keep = [n for n in tree.body if defines(n) & set(names)]
    namespace: dict = {"os": os, "re": re, "shutil": shutil, "subprocess": subprocess, "sys": sys,
                       "tempfile": tempfile, "torch": torch}  # fmt: skip
    exec(compile(ast.Module(body=keep, type_ignores=[]), "setup.py", "exec"), namespace)
    return namespace


# The archs setup.py builds for (RESNET_FUSED_CUDA_ARCHS, default "80;90"), read by setup.py's own code.
ARCHS = tuple(f"sm_{a}" for a in setup_code("cuda_archs")["cuda_archs"]())
# setup.py embeds PTX for the newest of them.
NEWEST = max((a[3:] for a in ARCHS), key=lambda a: int("".join(c for c in a if c.isdigit())))
# setup.py's nvcc flags for the device math.
NVCC_MATH = setup_code("NVCC_MATH")["NVCC_MATH"]


def setup_link_args() -> list[str]:
    """setup.py's LINK_ARGS, as setup() would pass them."""
    return setup_code("shared_cxx_runtime", "LINK_ARGS")["LINK_ARGS"]


SETUP_CUDA_CHOICE = ("CUDA_FLAG_VALUES", "cuda_build_flag", "cuda_archs", "nvcc_problem", "want_cuda")


def fake_toolkit(tmp_path: Path, release: str, compile_error: str = "") -> str:
    """A CUDA_HOME whose nvcc reports ``release`` and fails every compile with ``compile_error`` (if given)."""
    nvcc = tmp_path / "cuda" / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True)
    on_compile = f"echo {compile_error!r} >&2; exit 1" if compile_error else 'touch "$last"; exit 0'
    nvcc.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = --version ]; then echo "Cuda compilation tools, release {release}, V{release}.99"; exit 0; fi\n'
        "for last; do :; done\n"
        f"{on_compile}\n"
    )
    nvcc.chmod(0o755)
    return str(tmp_path / "cuda")


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, None), ("", None), ("auto", None), ("1", True), ("ON", True), ("0", False), ("off", False)],
)
def test_build_cuda_flag_values(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv("RESNET_FUSED_BUILD_CUDA", raising=False)
    else:
        monkeypatch.setenv("RESNET_FUSED_BUILD_CUDA", value)
    assert setup_code(*SETUP_CUDA_CHOICE)["cuda_build_flag"]() is expected


@pytest.mark.parametrize("value", ["cpu", "2", "none"])
def test_build_cuda_flag_refuses_other_values(monkeypatch, value):
    """An unknown value used to mean auto: "cpu" or "none" then built the CUDA kernels."""
    monkeypatch.setenv("RESNET_FUSED_BUILD_CUDA", value)
    with pytest.raises(SystemExit, match=rf"RESNET_FUSED_BUILD_CUDA: expected one of auto, 1, .*, got {value!r}"):
        setup_code(*SETUP_CUDA_CHOICE)["cuda_build_flag"]()


def other_cuda_major() -> str:
    if torch.version.cuda is None:
        pytest.skip("this torch is CPU-only: setup.py never looks for nvcc")
    return str(int(torch.version.cuda.split(".")[0]) - 1)


def test_auto_build_leaves_out_cuda_when_nvcc_differs_from_torchs_cuda(monkeypatch, tmp_path, capsys):
    """torch's BuildExtension fails the whole build on a CUDA major mismatch (a CUDA 12 toolkit under a cu13 torch):
    unless CUDA is required, the build goes on CPU-only and says why."""
    home = fake_toolkit(tmp_path, f"{other_cuda_major()}.4")
    code = setup_code(*SETUP_CUDA_CHOICE)
    monkeypatch.delenv("RESNET_FUSED_BUILD_CUDA", raising=False)
    assert code["want_cuda"](home) is False
    said = capsys.readouterr().out
    assert f"is CUDA {other_cuda_major()}.4, this torch was built with CUDA {torch.version.cuda}" in said, said
    monkeypatch.setenv("RESNET_FUSED_BUILD_CUDA", "1")
    with pytest.raises(SystemExit, match=rf"RESNET_FUSED_BUILD_CUDA=1 but .*nvcc is CUDA {other_cuda_major()}\.4"):
        code["want_cuda"](home)


def test_auto_build_leaves_out_cuda_when_nvcc_cannot_compile(monkeypatch, tmp_path, capsys):
    """A host compiler outside nvcc's range fails every .cu file minutes into the build; a trial compile finds it."""
    other_cuda_major()  # skips on a CPU-only torch
    refusal = "error -- unsupported GNU version! gcc versions later than 99 are not supported!"
    home = fake_toolkit(tmp_path, torch.version.cuda, compile_error=refusal)
    code = setup_code(*SETUP_CUDA_CHOICE)
    monkeypatch.delenv("RESNET_FUSED_BUILD_CUDA", raising=False)
    monkeypatch.setenv("RESNET_FUSED_CUDA_ARCHS", "80;90")
    assert code["want_cuda"](home) is False
    assert (
        "cannot compile a C++20 kernel for sm_80, sm_90 with this host compiler: " + refusal in capsys.readouterr().out
    )
    monkeypatch.setenv("RESNET_FUSED_BUILD_CUDA", "yes")
    with pytest.raises(SystemExit, match="unsupported GNU version"):
        code["want_cuda"](home)


def test_matching_toolkit_builds_cuda(monkeypatch, tmp_path):
    other_cuda_major()
    home = fake_toolkit(tmp_path, torch.version.cuda)
    monkeypatch.delenv("RESNET_FUSED_BUILD_CUDA", raising=False)
    assert setup_code(*SETUP_CUDA_CHOICE)["want_cuda"](home) is True
    monkeypatch.setenv("RESNET_FUSED_BUILD_CUDA", "0")
    assert setup_code(*SETUP_CUDA_CHOICE)["want_cuda"](home) is False


def test_this_machines_nvcc_passes_the_trial_compile():
    """The real toolkit, if there is one of torch's CUDA major: the trial compile must not refuse a working one."""
    other_cuda_major()
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("no nvcc on this machine")
    assert setup_code(*SETUP_CUDA_CHOICE)["nvcc_problem"](str(Path(nvcc).resolve().parents[1])) == ""


FORMAT_A_NUMBER = """
#include <cstring>
#include <sstream>
extern "C" int format_number(long v, char* out, int n) {
  std::ostringstream s;
  s << "got " << v;
  std::strncpy(out, s.str().c_str(), n);
  return 0;
}
"""


def test_link_args_keep_the_shared_cxx_runtime_under_a_static_toolchain(tmp_path):
    """setup.py's link arguments against a toolchain that behaves as the CUDA image's did: a g++ that adds
    -static-libstdc++ and searches a folder holding only libstdc++.a first. Plain -lstdc++ picks up the archive
    there (the control); setup.py's arguments must leave the library dynamic, with no copy of its own, and a number
    must format."""
    import ctypes

    gxx = shutil.which("g++")
    if gxx is None or not sys.platform.startswith("linux"):
        pytest.skip("needs g++ on Linux")
    archive = subprocess.run([gxx, "-print-file-name=libstdc++.a"], capture_output=True, text=True).stdout.strip()
    if not os.path.isabs(archive) or not os.path.exists(archive):
        pytest.skip("this g++ has no libstdc++.a")
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "libstdc++.a").symlink_to(archive)
    wrapper = tmp_path / "g++"
    wrapper.write_text(f'#!/bin/sh\nexec {gxx} -L{tmp_path / "lib"} "$@" -static-libstdc++\n')
    wrapper.chmod(0o755)
    source = tmp_path / "format_number.cpp"
    source.write_text(FORMAT_A_NUMBER)

    def link(name: str, args: list[str]) -> Path:
        so = tmp_path / name
        subprocess.run([str(wrapper), "-shared", "-fPIC", "-O1", str(source), "-o", str(so), *args], check=True)
        return so

    control = link("control.so", ["-fopenmp", "-lstdc++"])
    assert linked_cxx_runtime(control)[1], "the wrapper did not reproduce a static libstdc++ (the test proves nothing)"
    fixed = link("fixed.so", setup_link_args())
    needs_shared, own_copy = linked_cxx_runtime(fixed)
    assert needs_shared and not own_copy, f"needs libstdc++.so: {needs_shared}; defines {own_copy}"
    buf = ctypes.create_string_buffer(64)
    assert ctypes.CDLL(str(fixed)).format_number(ctypes.c_long(-1234567890123), buf, 64) == 0
    assert buf.value == b"got -1234567890123"


def test_forced_cuda_build_has_device_code():
    """A build made with RESNET_FUSED_BUILD_CUDA=1 (as the GPU check's build and its link check are) must not have
    silently fallen back to CPU-only."""
    if setup_code("CUDA_FLAG_VALUES", "cuda_build_flag")["cuda_build_flag"]() is not True:
        pytest.skip("RESNET_FUSED_BUILD_CUDA=1 is not set for this run, so a CPU-only build is allowed")
    assert so_has_device_code(), f"{so_path()} has no CUDA device code although RESNET_FUSED_BUILD_CUDA=1"


def test_cuda_kernels_registered_iff_built_with_cuda():
    has_code = so_has_device_code()
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA") == has_code, (op, has_code)
    why = BACKENDS["cuda"].unavailable()
    ok = not why
    if not has_code:
        assert not ok
        assert "built without CUDA kernels" in why
    elif not torch.cuda.is_available():
        assert not ok
        assert "torch.cuda.is_available() is False" in why
    else:
        assert ok, why
    assert ("cuda" in resnet_fused.available_backends()) == ok


def test_cpu_only_build_reports_reason():
    if so_has_device_code():
        pytest.skip(
            "this build has CUDA code; the CPU-only reason is checked on CPU-only builds "
            "(e.g. RESNET_FUSED_BUILD_CUDA=0)"
        )
    why = BACKENDS["cuda"].unavailable()
    assert why and "RESNET_FUSED_BUILD_CUDA=0" in why


def cuobjdump_or_skip() -> str:
    if not so_has_device_code():
        pytest.skip("the extension was built without CUDA (CPU-only build)")
    cuobjdump = find_cuobjdump()
    if cuobjdump is None:
        pytest.skip("no cuobjdump (CUDA toolkit or triton's copy) found")
    return cuobjdump


def test_so_has_sass_for_each_arch_and_ptx_for_the_newest():
    """Without PTX, a GPU newer than every arch built (B200, RTX 50xx) gets "no kernel image" at the first launch."""
    cuobjdump = cuobjdump_or_skip()
    ptx = subprocess.run([cuobjdump, "--list-ptx", str(so_path())], capture_output=True, text=True, check=True).stdout
    elf = subprocess.run([cuobjdump, "--list-elf", str(so_path())], capture_output=True, text=True, check=True).stdout
    ptx_archs = set(re.findall(r"\.(sm_\d+a?)\.ptx", ptx))
    elf_archs = set(re.findall(r"\.(sm_\d+a?)\.cubin", elf))
    assert ptx_archs == {f"sm_{NEWEST}"}, ptx
    assert elf_archs == set(ARCHS), elf


def test_kernel_status_op_registered_iff_built_with_cuda():
    """resnet_fused::cuda_kernel_status(int device) -> str exists only in CUDA builds; without a device it says so."""
    has_op = hasattr(torch.ops.resnet_fused, "cuda_kernel_status")
    assert has_op == so_has_device_code()
    if not has_op:
        pytest.skip("CPU-only build: no kernel-image check to call")
    status = torch.ops.resnet_fused.cuda_kernel_status
    if torch.cuda.device_count() == 0:
        assert status(0) == "no CUDA device is visible"
    else:
        with pytest.raises(ValueError, match=r"device: expected an index in \[0, "):
            status(torch.cuda.device_count())


def parse_resource_usage(text: str) -> dict[tuple[str, str], dict[str, int]]:
    """cuobjdump --dump-resource-usage -> {(arch, function): {"REG": .., "STACK": .., "LOCAL": ..}}."""
    usage: dict[tuple[str, str], dict[str, int]] = {}
    arch = "?"
    func = None
    for line in text.splitlines():
        m = re.search(r"arch = (sm_\d+)", line)
        if m:
            arch = m.group(1)
        m = re.search(r"Function (\S+):", line)
        if m:
            func = m.group(1)
            continue
        if func is not None and "REG:" in line:
            fields = dict(re.findall(r"(\w+):(\d+)", line))
            usage[(arch, func)] = {k: int(v) for k, v in fields.items()}
            func = None
    return usage


def test_built_kernels_have_no_spills():
    """Resource usage of the kernels in the built .so: no stack frame and no local memory on sm_80 and sm_90."""
    if not so_has_device_code():
        pytest.skip("the extension was built without CUDA (CPU-only build); test_ptxas_reports_no_spills covers it")
    cuobjdump = find_cuobjdump()
    if cuobjdump is None:
        pytest.skip("no cuobjdump (CUDA toolkit or triton's copy) found")
    out = subprocess.run(
        [cuobjdump, "--dump-resource-usage", str(so_path())], capture_output=True, text=True, check=True
    ).stdout
    usage = {k: v for k, v in parse_resource_usage(out).items() if "resnet_fused" in k[1]}
    for arch in ARCHS:
        for kernel in KERNELS:
            found = [f for (a, f) in usage if a == arch and kernel in f]
            assert found, f"{kernel} not in the {arch} cubin of {so_path()}"
    bad = {k: v for k, v in usage.items() if v.get("STACK", 0) or v.get("LOCAL", 0)}
    assert not bad, f"kernels with a stack frame or local memory (spills): {bad}"


def sass_by_function(text: str) -> dict[tuple[str, str], str]:
    """cuobjdump -sass -> {(arch, function): its SASS text}."""
    funcs: dict[tuple[str, str], str] = {}
    for chunk in re.split(r"\n(?=\s*arch = sm_)", text):
        m = re.search(r"arch = (sm_\d+)", chunk)
        if not m:
            continue
        for body in re.split(r"\n\s*Function : ", chunk)[1:]:
            name, _, sass = body.partition("\n")
            funcs[(m.group(1), name.strip())] = sass
    return funcs


def test_vectorized_kernels_use_16_byte_loads_and_stores():
    """Every VEC > 1 instantiation moves its tensors with 16-byte LDG.E.128 / STG.E.128 on each arch."""
    if not so_has_device_code():
        pytest.skip("the extension was built without CUDA (CPU-only build)")
    cuobjdump = find_cuobjdump()
    if cuobjdump is None:
        pytest.skip("no cuobjdump (CUDA toolkit or triton's copy) found")
    out = subprocess.run([cuobjdump, "-sass", str(so_path())], capture_output=True, text=True, check=True).stdout
    checked = 0
    for (arch, name), sass in sass_by_function(out).items():
        m = re.search(rf"({'|'.join(VECTOR_KERNELS)})I.*?Li(\d+)E", name)
        if not m or int(m.group(2)) == 1:
            continue
        checked += 1
        assert re.search(r"\bLDG\.E\.128\b", sass), f"{arch} {name}: no 16-byte load"
        assert re.search(r"\bSTG\.E\.128\b", sass), f"{arch} {name}: no 16-byte store"
    # each vector kernel in 4 dtypes, per arch
    assert checked == len(VECTOR_KERNELS) * 4 * len(ARCHS), checked


def assert_no_fma(sass: str) -> None:
    """Every kernel on every arch is in ``sass`` and has no FFMA/DFMA: built with setup.py's NVCC_MATH, the epilogue
    rounds conv * scale before adding the bias, as the unfused ops do (nvcc's default --fmad=true contracts it)."""
    funcs = {key: text for key, text in sass_by_function(sass).items() if "resnet_fused" in key[1]}
    for arch in ARCHS:
        for kernel in KERNELS:
            assert any(a == arch and kernel in name for a, name in funcs), f"{kernel} not in the {arch} SASS"
    fused = {
        f"{arch} {name}": n for (arch, name), text in funcs.items() if (n := len(re.findall(r"\b[FD]FMA2?\b", text)))
    }
    assert not fused, f"kernels with FFMA/DFMA (FMA contraction): {fused}"


def test_built_kernels_round_as_the_unfused_ops():
    """The built .so's kernels, on every arch, have no contracted multiply-add."""
    cuobjdump = cuobjdump_or_skip()
    assert_no_fma(
        subprocess.run([cuobjdump, "-sass", str(so_path())], capture_output=True, text=True, check=True).stdout
    )


def test_ptxas_reports_no_spills(tmp_path):
    """Compile csrc/cuda/*.cu for sm_80 and sm_90 with ptxas -v and setup.py's NVCC_MATH; every kernel reports 0
    bytes of spills, and none has a contracted multiply-add.

    Only needed when the built .so has no device code (CPU-only build on a machine with nvcc): otherwise the
    built cubins are checked directly by test_built_kernels_have_no_spills and
    test_built_kernels_round_as_the_unfused_ops (this compile takes ~70 s on 2 cores).
    """
    if so_has_device_code():
        pytest.skip("the built .so has CUDA code, checked faster by test_built_kernels_have_no_spills")
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("no nvcc found (set CUDA_HOME)")
    site = Path(torch.__file__).resolve().parents[1]
    includes = [
        ROOT / "csrc",
        Path(torch.__file__).parent / "include",
        Path(torch.__file__).parent / "include" / "torch" / "csrc" / "api" / "include",
        Path(sysconfig.get_paths()["include"]),
    ]
    wheel_inc = site / "nvidia" / "cu13" / "include"
    if wheel_inc.is_dir():
        includes.append(wheel_inc)
    for src in CUDA_SOURCES:
        cmd = [
            nvcc, "-c", str(src), "-o", str(tmp_path / (src.stem + ".o")),
            "-std=c++20", "-O3", "--expt-relaxed-constexpr", "-Xptxas=-v,-warn-spills", *NVCC_MATH,
            "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
            "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
            "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H",
            "--compiler-options", "-fPIC",
            *[f"-I{p}" for p in includes],
            *[f"-gencode=arch=compute_{a[3:]},code={a}" for a in ARCHS],
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True)
        log = proc.stdout + proc.stderr
        assert proc.returncode == 0, log[-4000:]
        sys.stdout.write(log)
        entries = re.findall(r"Compiling entry function '(\S+)' for '(sm_\d+)'", log)
        for arch in ARCHS:
            for kernel in KERNELS:
                assert any(kernel in f and a == arch for f, a in entries), f"{kernel} not compiled for {arch}"
        spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
        assert len(spills) == len(entries)
        assert all(s == ("0", "0") for s in spills), [
            e for e, s in zip(entries, spills, strict=True) if s != ("0", "0")
        ]
        assert "warning" not in log.lower(), log[-4000:]
        cuobjdump = find_cuobjdump()
        if cuobjdump is not None:
            obj = str(tmp_path / (src.stem + ".o"))
            assert_no_fma(subprocess.run([cuobjdump, "-sass", obj], capture_output=True, text=True, check=True).stdout)


def test_cuda_probe_checks_the_current_device_only(monkeypatch):
    """The kernel-image check makes a CUDA context on the device it asks about: the probe asked every visible GPU,
    so each DDP rank paid a context on all of them."""
    from resnet_fused import backends

    asked = []

    class Ops:
        @staticmethod
        def cuda_kernel_status(device):
            asked.append(device)
            return ""

    monkeypatch.setattr(torch._C, "_dispatch_has_kernel_for_dispatch_key", lambda op, key: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    monkeypatch.setattr(torch.ops, "resnet_fused", Ops)
    assert backends._cuda_probe() == "" and asked == [2]


def test_an_arch_the_toolkit_does_not_know_leaves_out_cuda(monkeypatch):
    """RESNET_FUSED_CUDA_ARCHS naming an arch this nvcc cannot build failed every .cu file minutes into the build."""
    other_cuda_major()
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("no nvcc on this machine")
    monkeypatch.setenv("RESNET_FUSED_CUDA_ARCHS", "90;12")
    why = setup_code(*SETUP_CUDA_CHOICE)["nvcc_problem"](str(Path(nvcc).resolve().parents[1]))
    assert "cannot compile a C++20 kernel for sm_90, sm_12 with this host compiler: " in why and "12" in why, why


def test_cuda_archs_default_when_empty_and_refuse_an_empty_list(monkeypatch):
    """RESNET_FUSED_CUDA_ARCHS set but empty (``make build RESNET_FUSED_CUDA_ARCHS=``) means the default; one that
    names no arch is refused naming the variable (``max()`` of an empty list raised, after a trial compile)."""
    cuda_archs = setup_code("cuda_archs")["cuda_archs"]
    monkeypatch.setenv("RESNET_FUSED_CUDA_ARCHS", "")
    assert cuda_archs() == ["80", "90"]
    monkeypatch.setenv("RESNET_FUSED_CUDA_ARCHS", " 90 ; 80 ")
    assert cuda_archs() == ["90", "80"]
    monkeypatch.setenv("RESNET_FUSED_CUDA_ARCHS", "; ;")
    with pytest.raises(
        SystemExit, match=r"RESNET_FUSED_CUDA_ARCHS: expected architectures such as '80;90' .*got '; ;'"
    ):
        cuda_archs()
