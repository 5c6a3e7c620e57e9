"""dist_nmt: distributed neural machine translation on MXNet Gluon + Horovod."""
from setuptools import find_packages, setup

setup(
    name="dist_nmt",
    version="0.1.0",
    description="Distributed NMT training (Transformer, GNMT) on MXNet Gluon with Horovod",
    packages=find_packages(include=["dist_nmt", "dist_nmt.*"]),
    python_requires=">=3.11",
    install_requires=[
        "mxnet==1.9.1",
        "numpy<1.24",
        "gluonnlp==0.10.0",
        "sacrebleu>=2.3,<3",
        "sentencepiece",
        "pyyaml",
        "tqdm",
        "tensorboardX",
        "matplotlib",
    ],
    extras_require={"dist": ["horovod==0.28.1", "mpi4py"]},
    entry_points={"console_scripts": ["dist-nmt=dist_nmt.cli:main"]},
)
