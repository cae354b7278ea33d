// Collects the components' registration functions in one place, so solo_ext.cpp stays fixed.
#include "solo_ext.h"

namespace solo {
void register_all(pybind11::module_& m) { (void)m; }
}  // namespace solo
