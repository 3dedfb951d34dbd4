"""Build script of resfuse: the Python packages plus ONE C++/CUDA extension, ``resfuse._C``.

Environment switches:
  RESFUSE_SKIP_CSRC=1   build no extension (pure-Python install; the Triton/PyTorch paths still work).
  RESFUSE_FORCE_CUDA=1  compile the CUDA kernels even when no GPU is visible (build boxes, CI).
  RESFUSE_NO_CUDA=1     compile the CPU kernels only, even when a CUDA toolkit is available.
  RESFUSE_NO_CUTLASS=1  leave out the Hopper convolution built on CUTLASS even when its headers are installed.
  TORCH_CUDA_ARCH_LIST  CUDA architectures to compile for (torch's variable), e.g. "8.0;9.0".

The CPU kernels (csrc/resfuse.cpp, csrc/cpu/*.cpp) are always compiled. The CUDA kernels (csrc/cuda/*.cu) are
compiled when torch is a CUDA build and nvcc is found (CUDA_HOME), or when RESFUSE_FORCE_CUDA=1. The Hopper
convolution (csrc/cuda/conv_sm90.cu) needs CUTLASS's headers, from the nvidia-cutlass wheel
(``pip install --no-deps nvidia-cutlass``), and an sm_90a target in the architecture list ("9.0a").
"""
import glob
import importlib.util
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _packages():
    """``resfuse`` and its subpackages, plus ``triton_kernels/`` installed as ``resfuse.triton_kernels``."""
    packages = find_packages(where=ROOT, include=["resfuse", "resfuse.*"])
    package_dir = {}
    triton_dir = os.path.join(ROOT, "triton_kernels")
    if os.path.isfile(os.path.join(triton_dir, "__init__.py")):
        package_dir["resfuse.triton_kernels"] = "triton_kernels"
        packages.append("resfuse.triton_kernels")
        packages += ["resfuse.triton_kernels." + p for p in find_packages(where=triton_dir)]
    return packages, package_dir


def _nvidia_wheel_dirs(sub_paths):
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    return [os.path.join(base, *sub) for base in spec.submodule_search_locations for sub in sub_paths]


def _nvidia_wheel_include_dirs(cuda_major):
    """Header folders of the pip ``nvidia-*`` wheels that torch depends on.

    A toolkit reached through a bare nvcc may ship only the runtime headers, while ATen/cuda/CUDAContext.h also
    needs cuBLAS/cuSPARSE/cuSOLVER (and cuDNN) headers: those come with torch's pip dependencies.
    Only folders matching the CUDA major version are used, so mismatched headers cannot shadow the toolkit's.
    """
    subs = [("cu" + cuda_major, "include")]  # CUDA 13 wheels: one folder for all libraries
    if cuda_major == "12":  # CUDA 12 wheels: one folder per library
        subs += [(lib, "include") for lib in ("cuda_runtime", "cublas", "cusparse", "cusolver", "curand", "cufft",
                                              "cuda_nvrtc")]
    subs.append(("cudnn", "include"))
    dirs = []
    for d in _nvidia_wheel_dirs(subs):
        if os.path.isdir(d) and d not in dirs:
            dirs.append(d)
    return dirs


def _link_cuda_runtime(ext, cuda_home, cuda_major):
    """Make torch's ``-lcudart`` resolvable.

    When nvcc is reached through a wrapper script (CUDA_HOME then resolves to the wrapper's prefix) or the toolkit
    has no runtime library, link the CUDA runtime of torch's pip wheel instead, by soname: the library torch loads.
    """
    for sub in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib")):
        if os.path.exists(os.path.join(cuda_home, sub, "libcudart.so")):
            return
    runtime_dirs = [("cu" + cuda_major, "lib"), ("cuda_runtime", "lib")]
    for d in _nvidia_wheel_dirs(runtime_dirs):
        soname = f"libcudart.so.{cuda_major}"
        if os.path.exists(os.path.join(d, soname)):
            ext.library_dirs.append(d)
            ext.libraries = [":" + soname if lib == "cudart" else lib for lib in ext.libraries]
            return


def _cutlass_include_dirs():
    """The C++ header folders the nvidia-cutlass wheel ships (CUTLASS and CuTe, and CUTLASS's util headers, which
    its convolution mainloop includes), or [] when the wheel is not installed."""
    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or not spec.submodule_search_locations:
        return []
    for base in spec.submodule_search_locations:
        include = os.path.join(base, "source", "include")
        if os.path.isfile(os.path.join(include, "cutlass", "cutlass.h")):
            return [include, os.path.join(base, "source", "tools", "util", "include")]
    return []


def _resolve_cuda_arch_list(torch):
    """The TORCH_CUDA_ARCH_LIST the build will use, setting a default where torch could not find one."""
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if arch_list and arch_list != "native":
        return arch_list
    if torch.cuda.is_available():
        # What torch's cpp_extension derives itself from the visible GPUs (PTX of the newest for later ones),
        # except that Hopper gets sm_90a, whose wgmma and TMA instructions the CUTLASS convolution needs (its
        # PTX runs on sm_90 alone, so it gets none).
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        arch_list = ";".join(f"{major}.{minor}" + ("a" if (major, minor) == (9, 0) else "") for major, minor in caps)
        if not arch_list.endswith("a"):
            arch_list += "+PTX"
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
        return arch_list
    # Build box without a GPU: torch cannot detect an architecture (and fails with an empty list), so default to
    # Hopper (sm_90a), the GPUs this library targets. Users override by setting TORCH_CUDA_ARCH_LIST.
    os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0a"
    return "9.0a"


def _extensions():
    if _env_flag("RESFUSE_SKIP_CSRC"):
        return [], {}

    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    csrc = os.path.join(ROOT, "csrc")
    sources = sorted(glob.glob(os.path.join(csrc, "*.cpp"))) + sorted(glob.glob(os.path.join(csrc, "cpu", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join(csrc, "cuda", "*.cu")))

    if _env_flag("RESFUSE_NO_CUDA"):
        with_cuda = False
    elif _env_flag("RESFUSE_FORCE_CUDA"):
        if CUDA_HOME is None:
            raise RuntimeError("RESFUSE_FORCE_CUDA=1 but no CUDA toolkit (nvcc) was found: set CUDA_HOME")
        with_cuda = True
    else:
        with_cuda = torch.version.cuda is not None and CUDA_HOME is not None

    cxx_flags = ["-O3"]
    link_flags = []
    libraries = []
    if sys.platform.startswith("linux"):
        # at::parallel_for only runs in parallel when the including file is compiled with OpenMP. libgomp.so.1 is
        # the soname torch itself loads, so the extension shares torch's OpenMP runtime.
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
        # libstdc++ ahead of torch's libraries. torch's wheels export copies of parts of libstdc++ (the
        # std::ostringstream constructor every TORCH_CHECK message is built with, std::ios_base_library_init,
        # exception_ptr's reference counting, ...) without a symbol version. Linked after them, as the compiler
        # driver does by default, the extension binds those symbols to torch's copies, unversioned: at run time
        # one stream is then built by torch's copy and written and freed by the system's libstdc++, and the
        # version a g++ 13 build demands of the runtime (GLIBCXX_3.4.32) is never checked. First on the line,
        # every C++ runtime symbol binds to libstdc++.so.6 with its version, and libstdc++ leads the extension's
        # own search order at load time (tests/test_cxx_runtime.py checks both).
        libraries.append("stdc++")
    define_macros = []
    include_dirs = [csrc]

    if with_cuda:
        arch_list = _resolve_cuda_arch_list(torch)
        cuda_major = (torch.version.cuda or "13").split(".")[0]
        include_dirs += _nvidia_wheel_include_dirs(cuda_major)
        define_macros += [("RESFUSE_WITH_CUDA", None), ("RESFUSE_CUDA_ARCH_LIST", f'"{arch_list}"')]
        cutlass_dirs = [] if _env_flag("RESFUSE_NO_CUTLASS") else _cutlass_include_dirs()
        if cutlass_dirs:
            include_dirs += cutlass_dirs
            define_macros.append(("RESFUSE_WITH_CUTLASS", None))
        ext = CUDAExtension(
            name="resfuse._C",
            sources=sources + cuda_sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            libraries=libraries,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
            extra_link_args=link_flags,
        )
        _link_cuda_runtime(ext, CUDA_HOME, cuda_major)
    else:
        ext = CppExtension(
            name="resfuse._C",
            sources=sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            libraries=libraries,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


packages, package_dir = _packages()
ext_modules, cmdclass = _extensions()

setup(
    packages=packages,
    package_dir=package_dir,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    # The extension sources are absolute paths (robust to the working directory of the build), which
    # setuptools' package-data scan of the manifest rejects; the packages ship no data files anyway.
    include_package_data=False,
)
