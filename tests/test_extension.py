"""The compiled extension builds and loads (the package also works without it)."""

import torch

from cots_kernels import _extension

from .helpers import requires_extension


@requires_extension
def test_extension_loads_and_reports_its_cuda_part():
    module = _extension.load()
    assert module is not None, _extension.unavailable_reason()
    assert _extension.unavailable_reason() == ""
    # A CPU build of torch can only produce the CPU half.
    if torch.version.cuda is None:
        assert not _extension.cuda_available()
