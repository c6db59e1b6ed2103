import importlib.util
import os

from setuptools import find_packages, setup

# ``kernels/`` is installed as ``fasthist.kernels``: a top-level ``kernels`` package would
# clash with an existing PyPI name.
packages = find_packages(include=["fasthist", "fasthist.*"]) + ["fasthist.kernels"]


def cpu_kernel() -> tuple[list, dict]:
    """The compiled CPU histogram (fasthist/csrc), built here only where torch imports in the
    build environment (``pip install --no-build-isolation``); elsewhere fasthist compiles it
    on first use into a cache. Optional: without a compiler the install still succeeds."""
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        return [], {}
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fasthist", "csrc", "build.py")
    spec = importlib.util.spec_from_file_location("fasthist_csrc_build", path)
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    sources = [os.path.relpath(s) for s in build.SOURCES]
    omp = build.openmp_flags()
    ext = CppExtension(
        f"fasthist.{build.NAME}",
        sources,
        extra_compile_args=build.CXX_FLAGS + omp,
        extra_link_args=omp,
        optional=True,
    )

    class OptionalBuildExtension(BuildExtension.with_options(use_ninja=False)):
        def finalize_options(self) -> None:
            super().finalize_options()
            self.force = True  # a stamp describes this build: never keep an older library as up to date
            self.stamped: list = []

        def build_extension(self, ext) -> None:
            super().build_extension(ext)  # an optional one that fails raises here, caught by setuptools
            self.stamped.append(ext)

        def build_extensions(self) -> None:
            try:  # torch's checks of the compiler raise before setuptools' `optional` applies
                super().build_extensions()
            except Exception as e:
                print(f"fasthist: the CPU kernel was not built ({type(e).__name__}: {e}); it builds on first use")

        def run(self) -> None:
            super().run()
            # fasthist loads only a library stamped as the build of its sources (one an older
            # checkout left in the tree has no matching stamp): stamped here, after an in-place
            # (editable) build's copy into the tree, where it is loaded from
            for e in self.stamped:
                build.write_stamp(self.get_ext_fullpath(e.name))

    return [ext], {"build_ext": OptionalBuildExtension}


ext_modules, cmdclass = cpu_kernel()

setup(
    name="fasthist",
    version="0.1.0",
    description="Drop-in Adam/AdamW for PyTorch that histogram sqrt(v_hat) every step, for free",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"fasthist": "fasthist", "fasthist.kernels": "kernels"},
    package_data={"fasthist": ["py.typed"], "fasthist.csrc": ["*.cpp", "*.h"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=["torch>=2.6", "numpy"],
    extras_require={
        "triton": ["triton>=3.2"],
        # >= 3.9: older interpreters round tl.fma twice, and the CPU kernel tests are bit-exact
        "test": ["pytest", "pytest-benchmark", "hypothesis", "triton>=3.9", "adabelief-pytorch", "expecttest"],
        "dev": ["ruff"],
        "demo": ["matplotlib", "tqdm", "scikit-learn", "tensorboard"],
        # fasthist.integrations: each imported only when used; install torch first, or pin
        # it on the same command line, so that none of these replaces it
        "transformers": ["transformers>=4.40", "accelerate>=0.26"],
        "lightning": ["lightning>=2.0"],
        "wandb": ["wandb>=0.16"],
        "integrations": [
            "transformers>=4.40",
            "accelerate>=0.26",
            "lightning>=2.0",
            "wandb>=0.16",
            "tensorboard",
        ],
    },
    entry_points={"console_scripts": ["fasthist=fasthist.cli:main"]},
)
