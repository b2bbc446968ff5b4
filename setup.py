"""Build script for cots-kernels.

Two ways to install, both working on a machine that already has torch:

- ``pip install .`` / ``pip install git+<repo>`` (pip's default build isolation): the
  build environment holds setuptools and wheel only (pyproject.toml lists no torch, so
  pip never downloads one, let alone a CUDA build, into it). The wheel is pure Python
  and carries the C++/CUDA sources in ``cots_kernels/_csrc``; the compiled extension is
  built against the installed torch on first use and cached (``cots_kernels/_extension.py``).
- ``pip install --no-build-isolation .`` (or ``-e .``): setup.py imports the installed
  torch and compiles the extension now; nothing is downloaded.

The compiled extension ``cots_kernels._C`` always gets the C++ (CPU) sources in
``csrc/*.cpp``; the CUDA sources in ``csrc/cuda/*.cu`` join it when both a CUDA toolkit
and a CUDA build of torch are present. Environment switches (read at build time and, for
the first-use build, at run time):

    COTS_KERNELS_BUILD_EXT=auto|1|0  auto (default): build where torch can be imported;
                                     1: fail without torch; 0: no extension at all
    COTS_KERNELS_CUDA=auto|1|0       CUDA part by detection (default), forced on, off
    TORCH_CUDA_ARCH_LIST, MAX_JOBS   torch's own: target GPUs ("8.0;9.0") and parallel
                                     compile jobs (ninja)
"""

import importlib.util
import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"


def _build_settings():
    """cots_kernels/_extension.py, read by path: the package itself imports torch."""
    spec = importlib.util.spec_from_file_location("_cots_kernels_build", ROOT / "cots_kernels" / "_extension.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithSources(build_py):
    """Also copy ``csrc/`` into the package as ``cots_kernels/_csrc``, for the first-use build."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "cots_kernels" / "_csrc"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(CSRC, target, ignore=shutil.ignore_patterns("*.o", "*.so", "__pycache__"))


def _extensions(settings):
    mode = settings.build_mode()
    if mode == "0":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:
        if mode == "1":
            raise RuntimeError(
                f"{settings.BUILD_EXT_VARIABLE}=1 but torch cannot be imported in the build environment: "
                "install torch first, then `pip install --no-build-isolation .`"
            ) from exc
        print("cots-kernels: no torch in the build environment; the compiled extension is built on first use")
        return [], {}

    cpu_sources, cuda_sources = settings.sources(Path("csrc"))
    cuda = settings.use_cuda(torch.version.cuda, cpp_extension.CUDA_HOME, bool(cuda_sources))
    openmp = list(settings.openmp_flags())
    cxx_flags = [*settings.CXX_FLAGS, *openmp]
    if cuda:
        ext = cpp_extension.CUDAExtension(
            "cots_kernels._C",
            cpu_sources + cuda_sources,
            define_macros=[(settings.CUDA_MACRO, "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": list(settings.NVCC_FLAGS)},
            extra_link_args=openmp,
        )
    else:
        ext = cpp_extension.CppExtension(
            "cots_kernels._C", cpu_sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=openmp
        )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions(_build_settings())

setup(
    name="cots-kernels",
    version="0.1.0",
    description="Fused GPU kernels for two-stream vision-language retrieval training (COTS)",
    packages=find_packages(include=["cots_kernels", "cots_kernels.*", "cots", "cots.*"]),
    python_requires=">=3.10",
    # ninja: torch.utils.cpp_extension.load needs it for the first-use build.
    install_requires=["torch>=2.4", "numpy", "ninja"],
    extras_require={
        "triton": ["triton>=3.6"],
        "test": ["pytest>=8", "pytest-benchmark>=5"],
        # The cots model layer: faiss for exact retrieval search (torch is the fallback),
        # matplotlib for the demo's plot, pillow for caption-json image folders, tqdm for
        # progress bars, tokenizers for Hugging Face text tokenizers (data.hf_tokenizer).
        "cots": ["faiss-cpu", "matplotlib", "pillow", "tqdm", "tokenizers"],
    },
    ext_modules=ext_modules,
    cmdclass={**cmdclass, "build_py": BuildPyWithSources},
)
