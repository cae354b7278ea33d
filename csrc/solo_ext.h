// Registration hooks: every csrc/*.cpp component adds its functions to the module through one of these.
#pragma once
#include <pybind11/pybind11.h>

namespace solo {
void register_all(pybind11::module_& m);
}  // namespace solo
