"""The one thing pyproject.toml cannot say with this setuptools: the relay
thread's C part, built where a C compiler and Python's headers are at hand.
It is optional: without it the gateway relays with its Python thread."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("shim._relay", ["shim/_relay.c"], optional=True,
                             extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=gnu11"])])
