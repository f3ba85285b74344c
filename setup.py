import os

from setuptools import Extension, find_packages, setup

with open("README.rst", encoding="utf-8") as f:
    long_description = f.read()

setup(
    name="zaichik",
    version="0.1.0",
    description="A small, fast pub/sub message broker on Twisted",
    long_description=long_description,
    long_description_content_type="text/x-rst",
    license="MIT",
    python_requires=">=3.10",
    # zaichik and every subpackage (zaichik.storage, zaichik.client, ...);
    # twisted.plugins is a namespace shared with Twisted: it has no
    # __init__.py here and must be listed by hand.
    packages=find_packages(include=["zaichik", "zaichik.*"]) + ["twisted.plugins"],
    # Said explicitly so that `pip install -e .` puts the checkout itself on
    # sys.path (a .pth line) rather than an import hook for the listed
    # packages: twistd finds plugins by scanning sys.path for
    # twisted/plugins/ directories, and would miss this one behind a hook.
    package_dir={"": "."},
    # zaichik/web: zaichik.js, its types and the console, served by the
    # broker's HTTP side (zaichik/edge/http.py).
    package_data={"twisted.plugins": ["zaichik_plugin.py"], "zaichik": ["py.typed", "_speedups.pyi", "web/*"]},
    # The optional accelerator (zaichik/_speedups.c: PUBLISH parsing, MESSAGE
    # frame and segment batch encoding).  optional=True: where there is no C
    # compiler (or no Python headers) the build says so and goes on, and
    # the pure-Python twins in codec.py and segment.py are used.
    # ZAICHIK_PURE=1 at install time skips the build altogether.
    ext_modules=[] if os.environ.get("ZAICHIK_PURE") else [
        Extension("zaichik._speedups", ["zaichik/_speedups.c"], optional=True)],
    entry_points={"console_scripts": ["zaichik = zaichik.cli:main"]},
    # prometheus_client: the metrics endpoint's exposition format and its
    # Twisted resource, rather than writing the text format by hand.
    # Twisted[tls]: pyOpenSSL and service_identity for ssl: listeners and
    # the client's certificate checks.
    # zlib-ng: the storage's CRC-32 at ~9x zlib's speed (zaichik/speedups.py).
    install_requires=["Twisted[tls]>=23.8", "zope.interface>=5", "prometheus_client>=0.17", "zlib-ng>=0.4"],
    extras_require={
        # The checks .ci/run makes: ruff (lint, ruff.toml) and mypy with the
        # mypy-zope plugin, which checks @implementer classes against their
        # interfaces (setup.cfg [mypy]).  Pinned: a new release of either
        # may add checks, which should be a change of its own.
        # hiredis: the Redis engine's RESP parser (C), under our own small
        # Twisted client (zaichik/storage/resp.py says why).
        "redis": ["hiredis>=2"],
        "lint": ["ruff==0.17.6", "mypy==2.4.1", "mypy-zope==1.0.17"],
        # benchmarks/bench.py --plot: the scale curves as a PNG.
        "plot": ["matplotlib>=3.5"],
        # fastapi + httpx: examples/fastapi_app.py, run by the tests over
        # httpx's ASGI transport; uvloop: the asyncio client's suite also
        # runs on uvloop (not on Windows).
        "test": ["hiredis>=2", "pytest>=7", "pytest-twisted>=1.14", "hypothesis>=6", "fastapi>=0.100", "httpx>=0.24",
                 "uvloop>=0.17; sys_platform != 'win32'"],
    },
    classifiers=[
        "Framework :: Twisted",
        "Programming Language :: Python :: 3",
        "Topic :: System :: Networking",
    ],
)
