import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "ppl_models" / "_version.py").read_text()).group(1)

setup(
    name="ppl-models",
    version=VERSION,
    license="MIT",
    description=(
        "Deep generative models as Pyro model/guide pairs, trained with "
        "stochastic variational inference"
    ),
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["ppl_models*", "inference*", "benchmarks*"]),
    package_data={"ppl_models": ["py.typed"], "inference": ["py.typed"]},
    install_requires=[
        "torch>=2.1",
        "torchvision",
        "pyro-ppl>=1.9",
        "numpy",
        "scipy",
        "arviz",
        "scikit-learn",
        "tqdm",
        "matplotlib",
    ],
    # arviz-stats (ArviZ 1.x's PSIS) is tested beside ArviZ 0.x where both install
    extras_require={
        "tensorboard": ["tensorboard"],
        "docs": ["mkdocs>=1.6", "mkdocs-material", "mkdocstrings[python]"],
        "test": ["pytest", "arviz-stats", "tensorboard", "ruff>=0.5", "mypy>=1.10", "mkdocs>=1.6", "mkdocs-material", "mkdocstrings[python]"],
    },
    entry_points={"console_scripts": ["pplm=ppl_models.cli:main"]},
)
