"""The one compiled part: the data plane's per-datagram work in C (src/halollm/runtime/_wire.c,
OpenSSL's libcrypto). Optional: where it does not build (no C compiler, no OpenSSL headers),
HALO installs without it and uses the Python path, which speaks the same wire format."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("halollm.runtime._wire", ["src/halollm/runtime/_wire.c"],
                             libraries=["crypto"], optional=True,
                             extra_compile_args=["-O2"])])
