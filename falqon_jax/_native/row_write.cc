// In-place row write for XLA CPU: out[rows[i], :] = new_rows[i, :].
//
// XLA CPU has no in-place fp8 scatter: it upcasts the whole array to f32 around it, and
// a uint8 view costs two full-size copies (bitcast_convert is materialized). This custom
// call is bound with input_output_aliases={0: 0}, so with a donated target it touches
// only the k written rows. Rows are plain bytes here: any dtype works.
//
// Shapes: target (..., R, C), rows (..., k) int32, new_rows (..., k, C); the leading
// (batch) dims agree. Out-of-range rows are skipped, as jnp's .at[].set drops them.

#include <cstdint>
#include <cstring>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

static ffi::Error WriteRows(ffi::AnyBuffer target, ffi::Buffer<ffi::S32> rows,
                            ffi::AnyBuffer new_rows,
                            ffi::Result<ffi::AnyBuffer> out) {
  auto dims = target.dimensions();
  auto row_dims = rows.dimensions();
  if (dims.size() < 2 || row_dims.size() != dims.size() - 1) {
    return ffi::Error::InvalidArgument("falqon row write: rank mismatch");
  }
  const int64_t n_rows = dims[dims.size() - 2];
  const int64_t k = row_dims[row_dims.size() - 1];
  const size_t width = target.size_bytes() / (target.element_count() ? target.element_count() : 1);
  const size_t row_bytes = width * static_cast<size_t>(dims[dims.size() - 1]);
  int64_t batch = 1;
  for (size_t i = 0; i + 2 < dims.size(); ++i) batch *= dims[i];
  if (new_rows.size_bytes() != static_cast<size_t>(batch * k) * row_bytes) {
    return ffi::Error::InvalidArgument("falqon row write: new_rows size mismatch");
  }

  auto* dst = static_cast<uint8_t*>(out->untyped_data());
  const auto* src_all = static_cast<const uint8_t*>(target.untyped_data());
  if (dst != src_all) {  // not aliased (XLA copies undonated inputs before the call)
    std::memcpy(dst, src_all, target.size_bytes());
  }
  const auto* src = static_cast<const uint8_t*>(new_rows.untyped_data());
  const int32_t* idx = rows.typed_data();
  for (int64_t b = 0; b < batch; ++b) {
    uint8_t* base = dst + static_cast<size_t>(b * n_rows) * row_bytes;
    for (int64_t i = 0; i < k; ++i) {
      const int64_t r = idx[b * k + i];
      if (r < 0 || r >= n_rows) continue;
      std::memcpy(base + static_cast<size_t>(r) * row_bytes,
                  src + static_cast<size_t>(b * k + i) * row_bytes, row_bytes);
    }
  }
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(FalqonWriteRows, WriteRows,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());
