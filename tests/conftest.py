"""Test session setup.

Triton reads TRITON_INTERPRET when a kernel is defined, i.e. when cots_kernels is
imported, so it is set here, before any test module imports the package: on a machine
without a GPU the Triton kernels then run on CPU tensors through the interpreter.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
