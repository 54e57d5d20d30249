"""flowkern: fused normalizing-flow layers; builds the compiled extension flowkern._C from csrc/ when it can.

The extension (the "cpp" backend on CPU tensors, "cuda" on CUDA tensors) is built by default:
  - CUDA kernels too when torch has CUDA and nvcc is found (CUDA_HOME honoured; TORCH_CUDA_ARCH_LIST, default
    "8.0;9.0"), else the C++ CPU path only;
  - FLOWKERN_BUILD_EXTENSION=0 skips it: the package installs as pure Python and the "torch" / "triton" backends
    serve every op;
  - FLOWKERN_CPU_ARCH (default "native") is passed as -march= to the C++ CPU kernels; set it empty for a binary
    that must run on other CPUs than the build machine's.
Build in place for development: pip install --no-build-isolation -e .   (ninja builds the sources in parallel)
"""
import glob
import os
import runpy

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _nvidia_wheel_includes() -> list[str]:
    """Include dirs of the nvidia-* wheels torch installs (cuda runtime, cublas, ...): a pip-installed CUDA torch
    takes its headers from there, which a bare toolkit does not always match."""
    try:
        import nvidia
    except ImportError:
        return []
    return sorted(d for base in nvidia.__path__ for d in glob.glob(os.path.join(base, "*", "include")))


def extension_modules():
    if os.environ.get("FLOWKERN_BUILD_EXTENSION", "1") == "0":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    binding = os.path.join("csrc", "bindings.cpp")
    cpu_sources = sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    include_dirs = [os.path.join(ROOT, "csrc")]
    arch = os.environ.get("FLOWKERN_CPU_ARCH", "native")
    # -fopenmp: at::parallel_for (the kernels' ParallelFor) is an inline OpenMP loop in torch's CPU builds, serial
    # unless the extension itself is compiled with OpenMP. The C++ standard is torch's.
    # -fno-wrapv: Python's CFLAGS add -fwrapv, under which the compiler cannot prove that index arithmetic does not
    # wrap and leaves some kernel loops scalar (the channelwise row sums ran 2.8x slower with it).
    cxx_flags = ["-O3", "-fno-wrapv", "-fopenmp"] + ([f"-march={arch}"] if arch else [])
    if torch.version.cuda and CUDA_HOME and cuda_sources:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        ext = CUDAExtension(
            "flowkern._C", [binding, *cpu_sources, *cuda_sources], include_dirs=include_dirs + _nvidia_wheel_includes(),
            define_macros=[("FLOWKERN_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]}, extra_link_args=["-fopenmp"])
    else:
        ext = CppExtension("flowkern._C", [binding, *cpu_sources], include_dirs=include_dirs,
                           extra_compile_args=cxx_flags, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = extension_modules()
# The application's extras are declared beside the code that names them in its errors (read without importing
# flowkern, whose import needs torch).
APPLICATION_EXTRAS = runpy.run_path(os.path.join(ROOT, "flowkern", "_extras.py"))["EXTRAS"]

setup(
    name="flowkern",
    version="0.1.0",
    description="Fused normalizing-flow layers (Glow, BERT-flow) with eager, Triton and compiled backends",
    packages=find_packages(include=["flowkern", "flowkern.*"]),
    python_requires=">=3.10",
    # The fused flow layers and ops (flowkern.nn, flowkern.ops). Triton ships Linux wheels only; elsewhere the
    # "torch" backend (and "cpp" when built) serve every op.
    install_requires=["torch>=2.4", "triton>=3.2; platform_system == 'Linux'"],
    # bertflow: flowkern.models and the `flowkern` command; embed: + parquet for `flowkern embed`; ray, st: the
    # integrations (see flowkern/_extras.py).
    extras_require={**APPLICATION_EXTRAS, "dev": ["pytest", "pytest-benchmark", "ninja"]},
    entry_points={"console_scripts": ["flowkern = flowkern.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
