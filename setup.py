"""predictord: serve Python predictors over HTTP on one machine."""

from setuptools import setup

setup(
    name="predictord",
    version="0.1.0",
    description="A single-host multiprocess serving daemon: a predictor is just a Python class.",
    python_requires=">=3.11",
    # The code lives in daemon/; it installs as `predictord` (a top-level `daemon` would clash with python-daemon).
    package_dir={"": "daemon"},
    packages=["predictord", "predictord.master", "predictord.http", "predictord.model", "predictord.cluster"],
    install_requires=[
        "gunicorn>=27,<28",
        "uvicorn[standard]>=0.54",
        "uvicorn-worker>=0.4",
        "starlette>=1.10",
        "python-multipart>=0.0.20",
        "torch==2.13.0",
        "numpy>=2",
        "psutil>=7",
        "nvidia-ml-py>=13",
        "watchdog>=7",
        "prometheus-client>=0.20",
        "orjson==3.13.0",  # JSON bodies parsed 3-10x faster than the standard library (BENCHMARKS.md)
    ],
    extras_require={"test": ["pytest>=8", "httpx>=0.28", "ruff>=0.8", "mypy>=1.13", "types-psutil",
                             "hypothesis>=6.100", "schemathesis>=4"],
                    # [predictors] installer = "uv": the uv binary, pinned to the version BENCHMARKS.md measured
                    "uv": ["uv==0.13.9"],
                    # `predictord ray`: the same predictors on a Ray Serve cluster (never imported by the daemon)
                    "ray": ["ray[serve]==2.60.0"]},
    entry_points={"console_scripts": ["predictord=predictord.cli:main"]},
)
