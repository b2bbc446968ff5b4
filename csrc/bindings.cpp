// The one pybind11 module of the extension, `cots_kernels._C`.
// Each op's source file defines a `register_<op>(module)` function; this file only
// collects them, so adding an op touches its own file and one line here.
#include <torch/extension.h>

#include "registry.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "cots-kernels compiled ops (C++ CPU kernels, CUDA kernels when built with CUDA)";
  // Lets the Python loader report whether the CUDA half was compiled in.
#ifdef COTS_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  cots::register_all(m);
}
