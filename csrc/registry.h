// Registration hooks of the compiled ops. Every op source defines its `register_*`
// function; `register_all` (registry.cpp) calls each one.
#pragma once

#include <torch/extension.h>

namespace cots {

void register_all(pybind11::module& m);
void register_momentum(pybind11::module& m);

}  // namespace cots
