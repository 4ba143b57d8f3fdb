"""Packaging for procfleet: the per-host exporter and the fleet query service."""

from setuptools import find_packages, setup

setup(
    name="procfleet",
    version="0.1.0",
    description="Per-host process exporter and fleet-wide process query service",
    python_requires=">=3.11",
    packages=find_packages(
        include=["procfleet", "procfleet.*", "exporter", "exporter.*", "query", "query.*"]
    ),
    include_package_data=True,
    # Every file a service reads at run time; tests/test_dist.py checks the wheel has them.
    package_data={pkg: ["*.html", "*.json"] for pkg in ("procfleet", "exporter", "query")},
    install_requires=[
        "falcon>=4.0,<5",
        "waitress>=3.0,<4",
        "prometheus-client>=0.20,<1",
        "psutil>=5.9,<8",
        "pyyaml>=6.0,<7",
        # cmdline_re searches: linear-time regular expressions (no pattern can stall).
        "google-re2>=1.1,<2",
        "bcrypt>=4.1,<6",  # basic_auth_users of --web.config.file (procfleet/basicauth.py)
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "ruff==0.17.6",  # pinned: `make test` lints, and new rules must not break CI
            # Pinned with the stubs for the same reason: `make lint` runs mypy --strict.
            "mypy==2.4.1",
            "types-PyYAML==6.0.12.20261122",
            "types-psutil==7.2.2.20261111",
            "types-waitress==3.0.1.20260724",
            "requests>=2.31",
            "aiohttp>=3.9,<4",  # the tests' fake exporters
            "h11>=0.14,<1",  # only for bench_query_fanout.py --h11, the parser comparison
            # `make dist` and its test build offline, with the venv's setuptools and wheel.
            "build>=1.0,<2",
            "wheel>=0.41",
            # Pinned so the fixed-seed contract fuzzing sends the same cases every run.
            "schemathesis==4.32.5",
            "hypothesis==6.170.17",
        ],
    },
    entry_points={
        "console_scripts": [
            "procfleet-exporter=exporter.__main__:main",
            "procfleet-query=query.__main__:main",
            "procfleet=procfleet.cli:main",
        ],
    },
)
