// Calls the registration function of every compiled op (see registry.h).
#include "registry.h"

namespace cots {

void register_all(pybind11::module& m) {
  register_momentum(m);
}

}  // namespace cots
