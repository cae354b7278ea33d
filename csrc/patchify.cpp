// Resized image [H, W, 3] uint8 -> SOLO patches [rows*cols, 3072] uint8: row-major grid of 32x32
// patches, each flattened channel-major (3, 32, 32). Runs with the GIL released.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <cstring>
#include <stdexcept>

#include "solo_ext.h"

namespace py = pybind11;

namespace solo {
namespace {
constexpr int P = 32;

py::array_t<uint8_t> patchify(py::array_t<uint8_t, py::array::c_style | py::array::forcecast> img) {
  if (img.ndim() != 3 || img.shape(2) != 3) throw std::invalid_argument("patchify: expected [H, W, 3] uint8");
  const py::ssize_t h = img.shape(0), w = img.shape(1);
  if (h % P || w % P || h == 0 || w == 0) throw std::invalid_argument("patchify: H and W must be positive multiples of 32");
  const py::ssize_t rows = h / P, cols = w / P;
  py::array_t<uint8_t> out({rows * cols, static_cast<py::ssize_t>(3 * P * P)});
  const uint8_t* src = img.data();
  uint8_t* dst = out.mutable_data();
  {
    py::gil_scoped_release release;
    for (py::ssize_t r = 0; r < rows; ++r) {
      for (py::ssize_t q = 0; q < cols; ++q) {
        uint8_t* patch = dst + (r * cols + q) * 3 * P * P;
        for (int y = 0; y < P; ++y) {
          const uint8_t* line = src + ((r * P + y) * w + q * P) * 3;
          uint8_t* c0 = patch + y * P;
          uint8_t* c1 = c0 + P * P;
          uint8_t* c2 = c1 + P * P;
          for (int x = 0; x < P; ++x) {
            c0[x] = line[3 * x];
            c1[x] = line[3 * x + 1];
            c2[x] = line[3 * x + 2];
          }
        }
      }
    }
  }
  return out;
}
}  // namespace

void register_patchify(py::module_& m) {
  m.def("patchify", &patchify, py::arg("pixels"),
        "[H, W, 3] uint8 -> [rows*cols, 3072] uint8 SOLO patches (row-major grid, channel-major patches)");
}
}  // namespace solo
