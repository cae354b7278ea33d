// megatron_solo._C: C++ hot paths of preprocessing. Each component registers itself from its own file.
#include <pybind11/pybind11.h>

#include "solo_ext.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "megatron_solo C++ extension: preprocessing hot paths";
  m.def("abi_version", []() { return 1; }, "Version of the extension's Python-facing ABI.");
  solo::register_all(m);
}
