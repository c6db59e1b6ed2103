from setuptools import find_packages, setup

# ``kernels/`` is installed as ``fasthist.kernels``: a top-level ``kernels`` package would
# clash with an existing PyPI name.
packages = find_packages(include=["fasthist", "fasthist.*"]) + ["fasthist.kernels"]

setup(
    name="fasthist",
    version="0.1.0",
    description="Drop-in Adam/AdamW for PyTorch that histogram sqrt(v_hat) every step, for free",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"fasthist": "fasthist", "fasthist.kernels": "kernels"},
    package_data={"fasthist": ["py.typed"]},
    install_requires=["torch>=2.6", "numpy"],
    extras_require={
        "triton": ["triton>=3.2"],
        # >= 3.9: older interpreters round tl.fma twice, and the CPU kernel tests are bit-exact
        "test": ["pytest", "pytest-benchmark", "hypothesis", "triton>=3.9", "adabelief-pytorch"],
        "dev": ["ruff"],
        "demo": ["matplotlib", "tqdm", "scikit-learn", "tensorboard"],
    },
    entry_points={"console_scripts": ["fasthist=fasthist.cli:main"]},
)
