// Buffered writer for megatron-core indexed datasets (.bin/.idx, "MMIDIDX" version 1).
// Produces the same bytes as megatron.core.datasets.indexed_dataset.IndexedDatasetBuilder
// (add_item / end_document / finalize, no sequence modes). Data are buffered and written with the
// GIL released.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "solo_ext.h"

namespace py = pybind11;

namespace solo {
namespace {

// megatron.core.datasets.indexed_dataset.DType codes
int dtype_code(const std::string& s, size_t* itemsize) {
  struct Entry { const char* name; int code; size_t size; };
  static const Entry table[] = {
      {"|u1", 1, 1}, {"u1", 1, 1}, {"|i1", 2, 1}, {"i1", 2, 1}, {"<i2", 3, 2}, {"<i4", 4, 4},
      {"<i8", 5, 8}, {"<f8", 6, 8}, {"<f4", 7, 4}, {"<u2", 8, 2}};
  for (const auto& e : table) {
    if (s == e.name) { *itemsize = e.size; return e.code; }
  }
  throw std::invalid_argument("IndexWriter: unsupported dtype " + s +
                              " (megatron-core knows uint8 int8 int16 int32 int64 float64 float32 uint16)");
}

class IndexWriter {
 public:
  static constexpr size_t kDirectWriteBytes = size_t(256) << 10;

  IndexWriter(const std::string& bin_path, const std::string& dtype, size_t buffer_bytes)
      : bin_path_(bin_path), dtype_(dtype), cap_(buffer_bytes ? buffer_bytes : 1) {
    code_ = dtype_code(dtype, &itemsize_);
    np_dtype_ = py::dtype(dtype);
    f_ = std::fopen(bin_path.c_str(), "wb");
    if (!f_) throw std::runtime_error("IndexWriter: cannot open " + bin_path);
    buf_.reserve(cap_);
    doc_indices_.push_back(0);
  }
  ~IndexWriter() {
    if (f_) std::fclose(f_);
  }

  void add_item(py::array arr) {
    if (closed_) throw std::runtime_error("IndexWriter: already finalized");
    if (!arr.dtype().equal(np_dtype_) || !(arr.flags() & py::array::c_style)) {
      // same cast as the Python builder's numpy.array(x, dtype=self.dtype)
      arr = py::array::ensure(arr.attr("astype")(np_dtype_), py::array::c_style);
    }
    const size_t n = static_cast<size_t>(arr.size());
    const size_t bytes = n * itemsize_;
    append(static_cast<const char*>(arr.data()), bytes);
    lengths_.push_back(static_cast<int32_t>(n));
  }

  void end_document() { doc_indices_.push_back(static_cast<int64_t>(lengths_.size())); }

  void finalize(const std::string& idx_path) {
    if (closed_) throw std::runtime_error("IndexWriter: already finalized");
    {
      py::gil_scoped_release release;
      flush_locked();
      std::fclose(f_);
      f_ = nullptr;
      closed_ = true;
      FILE* g = std::fopen(idx_path.c_str(), "wb");
      if (!g) throw std::runtime_error("IndexWriter: cannot open " + idx_path);
      const char header[9] = {'M', 'M', 'I', 'D', 'I', 'D', 'X', 0, 0};
      std::fwrite(header, 1, 9, g);
      put_u64(g, 1);
      const uint8_t code = static_cast<uint8_t>(code_);
      std::fwrite(&code, 1, 1, g);
      put_u64(g, lengths_.size());
      put_u64(g, doc_indices_.size());
      std::fwrite(lengths_.data(), sizeof(int32_t), lengths_.size(), g);
      std::vector<int64_t> pointers(lengths_.size());
      int64_t ptr = 0;
      for (size_t i = 0; i < lengths_.size(); ++i) {
        pointers[i] = ptr;
        ptr += static_cast<int64_t>(lengths_[i]) * static_cast<int64_t>(itemsize_);
      }
      std::fwrite(pointers.data(), sizeof(int64_t), pointers.size(), g);
      std::fwrite(doc_indices_.data(), sizeof(int64_t), doc_indices_.size(), g);
      const bool ok = std::ferror(g) == 0;
      if (std::fclose(g) != 0 || !ok) throw std::runtime_error("IndexWriter: write failed: " + idx_path);
    }
  }

  size_t num_items() const { return lengths_.size(); }
  size_t num_documents() const { return doc_indices_.size() - 1; }

 private:
  static void put_u64(FILE* g, uint64_t v) { std::fwrite(&v, 8, 1, g); }  // little-endian hosts only

  void append(const char* data, size_t bytes) {
    // Large items (an image's patches, ~1.5 MB) go straight to the file: copying them through the
    // buffer first would double the memory traffic of patches storage.
    if (bytes >= kDirectWriteBytes || buf_.size() + bytes > cap_) {
      py::gil_scoped_release release;
      flush_locked();
      if (bytes >= kDirectWriteBytes || bytes >= cap_) {
        write_raw(data, bytes);
        return;
      }
    }
    buf_.insert(buf_.end(), data, data + bytes);
  }

  void write_raw(const char* data, size_t bytes) {
    if (bytes && std::fwrite(data, 1, bytes, f_) != bytes) throw std::runtime_error("IndexWriter: write failed: " + bin_path_);
  }

  void flush_locked() {
    write_raw(buf_.data(), buf_.size());
    buf_.clear();
  }

  std::string bin_path_, dtype_;
  py::dtype np_dtype_;
  size_t itemsize_ = 0, cap_;
  int code_ = 0;
  FILE* f_ = nullptr;
  bool closed_ = false;
  std::vector<char> buf_;
  std::vector<int32_t> lengths_;
  std::vector<int64_t> doc_indices_;
};

}  // namespace

void register_index_writer(py::module_& m) {
  py::class_<IndexWriter>(m, "IndexWriter",
                          "Buffered megatron-core indexed-dataset writer; same bytes as IndexedDatasetBuilder.")
      .def(py::init<const std::string&, const std::string&, size_t>(), py::arg("bin_path"), py::arg("dtype"),
           py::arg("buffer_bytes") = size_t(8) << 20)
      .def("add_item", &IndexWriter::add_item, py::arg("array"))
      .def("end_document", &IndexWriter::end_document)
      .def("finalize", &IndexWriter::finalize, py::arg("idx_path"))
      .def_property_readonly("num_items", &IndexWriter::num_items)
      .def_property_readonly("num_documents", &IndexWriter::num_documents);
}

}  // namespace solo
