// k-reciprocal false-negative masks: the steps both devices share (k_reciprocal.h), the
// op's schema, and the module that loads it.
//
// torch.ops.jsa_fast.k_reciprocal_mask(z_img: B x D, z_aud: B x D, k, packed=False,
//   check_finite=True) -> B x B bool, or B x ceil(B / 32) int32 bit words when packed.

#include "k_reciprocal.h"

#include <Python.h>

#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <tuple>

namespace jsa_fast {
namespace k_reciprocal {
namespace {

void check_inputs(const at::Tensor& z_img, const at::Tensor& z_aud, int64_t k) {
  for (const auto& [name, z] : {std::pair<const char*, const at::Tensor&>{"z_img", z_img}, {"z_aud", z_aud}}) {
    TORCH_CHECK_VALUE(z.dim() == 2, name, " must be B x D (2-D), got shape ", z.sizes());
    const auto dtype = z.scalar_type();
    TORCH_CHECK_VALUE(
        dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf,
        name, " must be float32, float64, bfloat16 or float16, got ", dtype);
    TORCH_CHECK_VALUE(z.size(0) >= 1 && z.size(1) >= 1, name, " must be non-empty, got shape ", z.sizes());
  }
  TORCH_CHECK_VALUE(
      z_img.sizes() == z_aud.sizes(), "z_img and z_aud must have one shape, got ", z_img.sizes(), " and ",
      z_aud.sizes());
  TORCH_CHECK_VALUE(
      z_img.device() == z_aud.device(), "z_img and z_aud must be on one device, got ", z_img.device(), " and ",
      z_aud.device());
  TORCH_CHECK_VALUE(1 <= k && k <= z_img.size(0), "k must be an integer in [1, B=", z_img.size(0), "], got ", k);
  // Neighbour lists and keys hold int32 row indices.
  TORCH_CHECK_VALUE(
      z_img.size(0) <= std::numeric_limits<int32_t>::max(), "z_img has more than 2^31 - 1 rows: ", z_img.size(0));
}

// Step 1: B x D any float -> B x D contiguous float32 rows of unit norm (or zero). With
// check_finite, a value that is not finite in float32 raises ValueError (one host read);
// without, its row counts as a zero row (similarity 0 to every row), without a read.
at::Tensor normalized_rows(const at::Tensor& z, const char* name, bool check_finite) {
  at::Tensor rows = z.to(at::kFloat);
  // After the cast: a finite float64 beyond float32's range becomes inf here.
  if (check_finite) {
    // A float64 sum of float32 values cannot overflow, so it is finite exactly when they
    // all are: one reduction instead of isfinite's four passes.
    TORCH_CHECK_VALUE(
        std::isfinite(rows.sum(at::kDouble).item<double>()), name, " holds values that are not finite in float32");
  } else {
    rows = rows.masked_fill(at::isfinite(rows).all(1, /*keepdim=*/true).logical_not(), 0.0f);
  }
  const at::Tensor norms = at::linalg_vector_norm(rows, 2, {1}, /*keepdim=*/true).clamp_min(1e-12);
  return (rows / norms).contiguous();
}

// The scratch bound per step: JSA_FAST_KRECIPROCAL_SCRATCH_MIB MiB when set (a small bound
// makes many small tiles and blocks, which is how the tests cross their boundaries at
// small B), else the device's default.
int64_t scratch_bytes(const Kernels& kernels) {
  const char* mib = std::getenv("JSA_FAST_KRECIPROCAL_SCRATCH_MIB");
  if (mib == nullptr || *mib == '\0') {
    return kernels.default_scratch_bytes();
  }
  char* end = nullptr;
  const double value = std::strtod(mib, &end);
  TORCH_CHECK_VALUE(
      end != mib && *end == '\0' && value > 0, "JSA_FAST_KRECIPROCAL_SCRATCH_MIB must be a positive number, got '",
      mib, "'");
  return std::max<int64_t>(1, static_cast<int64_t>(value * (1 << 20)));
}

// The largest batch that takes the direct path: JSA_FAST_KRECIPROCAL_DIRECT_MAX_BATCH when
// set (0 sends every batch through steps 2-4, which is how the tests reach them at small
// B), else the device's crossover.
int64_t direct_max_batch(const Kernels& kernels) {
  const char* rows = std::getenv("JSA_FAST_KRECIPROCAL_DIRECT_MAX_BATCH");
  if (rows == nullptr || *rows == '\0') {
    return kernels.default_direct_max_batch;
  }
  // Decimal digits only (strtoll alone would take signs and spaces), at most 18 of them
  // so that the value fits.
  const size_t digits = std::strlen(rows);
  TORCH_CHECK_VALUE(
      digits <= 18 && std::all_of(rows, rows + digits, [](char c) { return c >= '0' && c <= '9'; }),
      "JSA_FAST_KRECIPROCAL_DIRECT_MAX_BATCH must be a whole number >= 0, got '", rows, "'");
  return static_cast<int64_t>(std::strtoll(rows, nullptr, 10));
}

// Step 2's bound, from the rows (B x D float32, norms <= N) and their bfloat16 roundings
// (each within rho of its row, in norm), both measured:
// - rounding the rows: |<a~, b~> - <a, b>| <= |<a~ - a, b~>| + |<a, b~ - b>|
//   <= rho (N + rho) + N rho (Cauchy-Schwarz);
// - summing the D exact products in float32 in any order: at most D additions, each
//   within 2^-23 of its result (2^-24 rounds to nearest; 2^-23 also covers accumulators
//   that truncate), whose magnitudes are at most sum_d |a~_d b~_d| <= (N + rho)^2; doubled;
// - s's own rounding to float32: 2^-24 N^2;
// - a slack of 2^-30 for the float64 arithmetic of s and of these bounds, and for
//   subnormal results.
// The tile's rounding to bfloat16 moves a value by less than one unit in its last place,
// 2^-7 of itself or less: |acc - v| <= 2^-7 (|v| + |acc - v|).
FilterBound filter_bound(const at::Tensor& rows, const at::Tensor& filter_rows, int64_t scratch) {
  const int64_t batch = rows.size(0);
  const int64_t width = rows.size(1);
  // Float64 copies of both (16 bytes per entry), a chunk of rows at a time.
  const int64_t chunk_rows = std::max<int64_t>(1, scratch / (16 * width));
  double norm = 0.0;
  double residual = 0.0;
  for (int64_t start = 0; start < batch; start += chunk_rows) {
    const int64_t count = std::min(chunk_rows, batch - start);
    const at::Tensor exact = rows.narrow(0, start, count).to(at::kDouble);
    const at::Tensor rounded = filter_rows.narrow(0, start, count).to(at::kDouble);
    norm = std::max(norm, at::linalg_vector_norm(exact, 2, {1}).max().item<double>());
    residual = std::max(residual, at::linalg_vector_norm(rounded - exact, 2, {1}).max().item<double>());
  }
  const double reach = norm + residual;
  const double error = residual * (2.0 * norm + residual) +
      2.0 * static_cast<double>(width) * std::ldexp(1.0, -23) * reach * reach + std::ldexp(norm * norm, -24) +
      std::ldexp(1.0, -30);
  const double rounding = std::ldexp(1.0, -7) / (1.0 - std::ldexp(1.0, -7));
  return {error, rounding};
}

// The most candidates a row may have on the filter's path.
int64_t candidate_limit(int64_t batch) {
  return std::max(batch / kCandidateShare, kMinCandidateLimit);
}

// Steps 2-3 for every row; rows that need the general path get general[i] = 1.
void filter_rows_in_tiles(
    const at::Tensor& rows, int64_t k, const Kernels& kernels, const at::Tensor& neighbours,
    const at::Tensor& general) {
  const int64_t batch = rows.size(0);
  const int64_t limit = candidate_limit(batch);
  const int64_t scratch = scratch_bytes(kernels);
  const at::Tensor filter_rows = rows.to(at::kBFloat16);
  const FilterBound bound = filter_bound(rows, filter_rows, scratch);
  // Per tile row: its float32 sums (where the device has them) and bfloat16 values (6
  // bytes per column), and the candidates' indices and keys (12 bytes each).
  const int64_t tile_rows = std::clamp<int64_t>(scratch / (6 * batch + 12 * limit), 1, batch);
  const int64_t probe_rows = std::min(tile_rows, (batch + kProbeShare - 1) / kProbeShare);
  for (int64_t start = 0; start < batch;) {
    const int64_t count = start == 0 ? probe_rows : std::min(tile_rows, batch - start);
    const at::Tensor tile = kernels.filter_tile(filter_rows, start, count);
    kernels.refine(tile, bound, rows, start, k, limit, neighbours, general);
    if (start == 0 && count < batch) {
      const int64_t crowded = general.narrow(0, 0, count).sum().item<int64_t>();
      if (kSkipDenominator * crowded >= kSkipNumerator * count) {
        general.narrow(0, count, batch - count).fill_(1);
        return;
      }
    }
    start += count;
  }
}

// Step 4 for the rows listed in ids (int64): neighbours[ids[r]] <- N(ids[r]) from the
// exact similarities against all rows. The rows are gathered once in float64, listed
// ones first. Each block row of `side` listed rows takes one GEMM against the columns
// from its own first row on: that covers its own similarities to every row, and, through
// the transpose, those of the later listed rows to its rows, so the blocks below the
// diagonal are never computed.
void general_path(
    const at::Tensor& rows, const at::Tensor& ids, int64_t k, const Kernels& kernels, const at::Tensor& neighbours) {
  const int64_t batch = rows.size(0);
  const int64_t count = ids.numel();
  at::Tensor order = ids;
  if (count < batch) {
    at::Tensor listed = at::zeros({batch}, rows.options().dtype(at::kBool));
    listed.index_fill_(0, ids, true);
    order = at::cat({ids, listed.logical_not().nonzero().flatten()});
  }
  const at::Tensor order32 = order.to(at::kInt);
  const at::Tensor ordered_rows = rows.index_select(0, order).to(at::kDouble);
  const at::Tensor state = at::zeros({count, k}, rows.options().dtype(at::kLong));
  const at::Tensor floors = at::zeros({count}, rows.options().dtype(at::kLong));
  // Per block entry: its product and (on devices that copy it) its transpose, float64;
  // per block row: a merge's survivors (8 kMergeChunk) and next state (8 k).
  const int64_t scratch = scratch_bytes(kernels);
  const int64_t side = std::clamp<int64_t>(
      std::min(
          scratch / (16 * batch + 8 * kMergeChunk + 8 * k),
          std::max(kMinBlockSide, (count + kBlocksPerSide - 1) / kBlocksPerSide)),
      1, count);
  for (int64_t start = 0; start < count; start += side) {
    const int64_t length = std::min(side, count - start);
    const at::Tensor products = at::mm(
        ordered_rows.narrow(0, start, length), ordered_rows.narrow(0, start, batch - start).t());
    kernels.merge(
        products, order32.narrow(0, start, batch - start), state.narrow(0, start, length),
        floors.narrow(0, start, length));
    const int64_t later = count - start - length;
    if (later > 0) {
      kernels.merge(
          products.narrow(1, length, later).t(), order32.narrow(0, start, length),
          state.narrow(0, start + length, later), floors.narrow(0, start + length, later));
    }
  }
  // Every slot is full (k <= B): the keys' indices are the neighbours.
  neighbours.index_copy_(0, ids, state.bitwise_not().bitwise_and(0xFFFFFFFFLL).to(at::kInt));
}

// rows: B x D normalised float32 -> B x k int32, row i the k rows nearest to row i,
// sorted by index.
at::Tensor nearest_lists(const at::Tensor& rows, int64_t k, const Kernels& kernels) {
  const int64_t batch = rows.size(0);
  const at::Tensor neighbours = at::empty({batch, k}, rows.options().dtype(at::kInt));
  const bool direct = batch <= direct_max_batch(kernels);
  if (direct && kernels.direct != nullptr) {
    kernels.direct(rows, k, scratch_bytes(kernels), neighbours);
  } else if (direct || k > candidate_limit(batch)) {
    // Every row through step 4 (for a large k: no row can have k candidates and at most
    // limit). Nothing here depends on the values, so nothing is read back to the host.
    general_path(rows, at::arange(batch, rows.options().dtype(at::kLong)), k, kernels, neighbours);
  } else {
    const at::Tensor general = at::zeros({batch}, rows.options().dtype(at::kByte));
    filter_rows_in_tiles(rows, k, kernels, neighbours, general);
    const at::Tensor general_rows = general.nonzero().flatten();
    if (general_rows.numel() > 0) {
      general_path(rows, general_rows, k, kernels, neighbours);
    }
  }
  // Sorted by index for binary searches, a chunk of rows at a time: a sort's values,
  // int64 indices and buffers take ~16 bytes per entry.
  const int64_t chunk_rows = std::max<int64_t>(1, scratch_bytes(kernels) / (16 * k));
  for (int64_t start = 0; start < batch; start += chunk_rows) {
    at::Tensor chunk = neighbours.narrow(0, start, std::min(chunk_rows, batch - start));
    chunk.copy_(std::get<0>(at::sort(chunk, /*dim=*/1)));
  }
  return neighbours;
}

}  // namespace

at::Tensor k_reciprocal_mask(
    const at::Tensor& z_img, const at::Tensor& z_aud, int64_t k, bool packed, bool check_finite,
    const Kernels& kernels) {
  check_inputs(z_img, z_aud, k);
  // One modality's rows at a time: their float32 copy is the largest input-sized buffer.
  const at::Tensor img = nearest_lists(normalized_rows(z_img, "z_img", check_finite), k, kernels);
  const at::Tensor aud = nearest_lists(normalized_rows(z_aud, "z_aud", check_finite), k, kernels);
  const int64_t batch = z_img.size(0);
  const int64_t words = (batch + 31) / 32;
  at::Tensor mask = packed ? at::zeros({batch, words}, img.options())
                           : at::zeros({batch, batch}, img.options().dtype(at::kBool));
  const MaskView view{
      packed ? nullptr : mask.mutable_data_ptr<bool>(),
      packed ? reinterpret_cast<uint32_t*>(mask.mutable_data_ptr<int32_t>()) : nullptr, batch, words};
  kernels.assemble(img, aud, view);
  return mask;
}

TORCH_LIBRARY(jsa_fast, m) {
  // The fake (meta) implementation for torch.compile is registered in Python.
  m.set_python_module("jsa_fast.ops");
  m.def("k_reciprocal_mask(Tensor z_img, Tensor z_aud, int k, bool packed=False, bool check_finite=True) -> Tensor");
}

}  // namespace k_reciprocal
}  // namespace jsa_fast

// `import jsa_fast._C` loads this library, which registers the ops above with torch's
// dispatcher; the Python module itself is empty.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
