"""Build quantkit and its native extension ``quantkit._C``.

    pip install --no-build-isolation -e .

``--no-build-isolation`` is required: the extension compiles against the torch already
installed in the environment (its headers and ABI), so there is deliberately no
pyproject.toml asking pip to install a second torch into an isolated build env.

Flags are portable (-O3, no -march=native): the kernels carry AVX-512 / AVX2 variants
selected at runtime, so one build runs on any x86-64. QUANTKIT_NO_CUDA=1 skips CUDA
sources even when a CUDA toolkit and a CUDA torch are present.
"""

import glob
import os

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def _extension():
    import torch

    # csrc/module.cpp: the Python module init; csrc/ops/*.cpp: per-format checks + CPU op
    # registration (TORCH_LIBRARY_IMPL); csrc/cpu/*.cpp: the torch-free CPU kernels.
    sources = ["csrc/module.cpp"] + _rel(
        glob.glob(os.path.join(ROOT, "csrc", "ops", "*.cpp")) + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp"))
    )
    # -ffp-contract=off: the double-quant scale decode (q * s + offset) must round like the
    # reference's separate mul and add, never be fused into an FMA.
    cxx = ["-O3", "-fopenmp", "-ffp-contract=off"]
    link = ["-fopenmp"]
    # csrc/cuda: torch-free kernels (*.cu) plus thin torch bindings (*_binding.cpp); both only
    # in a CUDA build, so a CPU torch never sees a CUDA include.
    cuda_sources = _rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    cuda_bindings = _rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))
    want_cuda = (
        os.environ.get("QUANTKIT_NO_CUDA", "0") != "1"
        and torch.version.cuda is not None
        and bool(os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"))
        and bool(cuda_sources)
    )
    if want_cuda:
        from torch.utils.cpp_extension import CUDAExtension

        # Without a visible GPU torch cannot pick target architectures (it fails with an
        # IndexError); default to Ampere..Hopper. nvcc 13 has no sm_70.
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;8.6;8.9;9.0")
        return CUDAExtension(
            "quantkit._C",
            sources + cuda_sources + cuda_bindings,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=[("QUANTKIT_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17", "-lineinfo"]},
            extra_link_args=link,
        )
    return CppExtension(
        "quantkit._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cxx},
        extra_link_args=link,
    )


setup(
    name="quantkit",
    version="0.1.0",
    description="Compress PyTorch language models and run them on packed-weight kernels",
    packages=find_packages(include=["quantkit*"]),
    package_data={"quantkit": ["data/*.txt"]},
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "safetensors", "pyyaml", "tqdm", "transformers", "gguf", "numpy"],
    entry_points={"console_scripts": ["quantkit=quantkit.cli:main"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
