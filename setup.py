"""Build script: the C++ (and, with a CUDA torch, CUDA) extension ``infertrix._C``.

The extension is built ahead of time, only when torch is importable in the build environment
(``pip install --no-build-isolation -e .``). Without torch the package installs pure-Python and
every op runs its PyTorch reference; ``infertrix.ops.status()`` says which backend each op uses.
Set ``INFERTRIX_NO_EXT=1`` to skip the build on purpose.
"""

import glob
import os

from setuptools import setup


def _extensions():
    if os.environ.get("INFERTRIX_NO_EXT") == "1":
        return [], {}
    try:
        import torch  # noqa: F401
        from torch.utils import cpp_extension
    except ImportError:
        print("infertrix: torch not importable at build time; installing without the C++ extension")
        return [], {}
    sources = sorted(glob.glob("csrc/cpu/*.cpp"))
    # -fopenmp: at::parallel_for is a header template that only runs in parallel when the
    # extension itself is compiled with OpenMP; it then uses torch's own libgomp (same soname,
    # already loaded), so torch.set_num_threads governs our kernels too.
    cxx = ["-O3", "-std=c++17", "-fvisibility=hidden", "-fopenmp"]
    define_macros = [("INFERTRIX_TORCH_VERSION", f'"{torch.__version__}"')]
    use_cuda = (
        torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
        and os.environ.get("INFERTRIX_NO_CUDA") != "1"
    )
    if use_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        define_macros.append(("INFERTRIX_WITH_CUDA", "1"))
        ext = cpp_extension.CUDAExtension(
            "infertrix._C",
            sources,
            include_dirs=[os.path.abspath("csrc")],
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = cpp_extension.CppExtension(
            "infertrix._C",
            sources,
            include_dirs=[os.path.abspath("csrc")],
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
