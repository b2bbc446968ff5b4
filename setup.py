"""Build script for cots-kernels.

The compiled extension ``cots_kernels._C`` always gets the C++ (CPU) sources in
``csrc/*.cpp``; the CUDA sources in ``csrc/cuda/*.cu`` join it only when both a CUDA
toolkit and a CUDA build of torch are present. Environment switches:

    COTS_KERNELS_BUILD_EXT=0     build no extension (the package falls back to PyTorch)
    COTS_KERNELS_CUDA=0|1|auto   CUDA part off, forced on, or by detection (default auto)

Nothing is downloaded at build time; torch must already be installed, so install with
``pip install --no-build-isolation -e .``.
"""

import glob
import os
import sys

from setuptools import find_packages, setup


def _extensions():
    if os.environ.get("COTS_KERNELS_BUILD_EXT", "1") == "0":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:
        raise RuntimeError(
            "cots-kernels builds against an installed torch: install torch first, then "
            "`pip install --no-build-isolation -e .` (or set COTS_KERNELS_BUILD_EXT=0)"
        ) from exc

    cpu_sources = sorted(glob.glob("csrc/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    mode = os.environ.get("COTS_KERNELS_CUDA", "auto").lower()
    if mode not in ("0", "1", "auto"):
        raise ValueError(f"COTS_KERNELS_CUDA must be 0, 1 or auto, got {mode!r}")
    have_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if mode == "1" and not have_cuda:
        raise RuntimeError(
            "COTS_KERNELS_CUDA=1 but no CUDA build is possible: "
            f"torch.version.cuda={torch.version.cuda}, CUDA_HOME={cpp_extension.CUDA_HOME}"
        )
    use_cuda = bool(cuda_sources) and (mode == "1" or (mode == "auto" and have_cuda))

    # No contraction of a product and a sum into an FMA (GCC's default where the ISA has
    # one, e.g. aarch64): the EMA kernel must round both products as PyTorch does.
    cxx_flags = ["-O3", "-std=c++17", "-ffp-contract=off"]
    link_flags = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is inline in ATen's headers: without OpenMP at our compile it
        # runs on one thread.
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    if use_cuda:
        ext = cpp_extension.CUDAExtension(
            "cots_kernels._C",
            cpu_sources + cuda_sources,
            define_macros=[("COTS_WITH_CUDA", "1")],
            extra_compile_args={
                "cxx": cxx_flags,
                "nvcc": ["-O3", "-std=c++17", "-lineinfo"],
            },
            extra_link_args=link_flags,
        )
    else:
        ext = cpp_extension.CppExtension(
            "cots_kernels._C",
            cpu_sources,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    build = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return [ext], {"build_ext": build}


ext_modules, cmdclass = _extensions()

setup(
    name="cots-kernels",
    version="0.1.0",
    description="Fused GPU kernels for two-stream vision-language retrieval training (COTS)",
    packages=find_packages(include=["cots_kernels", "cots_kernels.*", "cots", "cots.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "triton": ["triton>=3.6"],
        "test": ["pytest>=8", "pytest-benchmark>=5", "ninja"],
        # The cots model layer: faiss for exact retrieval search (torch is the fallback),
        # matplotlib for the demo's plot, pillow for caption-json image folders, tqdm for
        # progress bars, tokenizers for Hugging Face text tokenizers (data.hf_tokenizer).
        "cots": ["faiss-cpu", "matplotlib", "pillow", "tqdm", "tokenizers"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
