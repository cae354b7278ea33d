// Collects the components' registration functions in one place, so solo_ext.cpp stays fixed.
#include "solo_ext.h"

namespace solo {
void register_index_writer(pybind11::module_& m);  // index_writer.cpp
void register_patchify(pybind11::module_& m);      // patchify.cpp

void register_all(pybind11::module_& m) {
  register_index_writer(m);
  register_patchify(m);
}
}  // namespace solo
