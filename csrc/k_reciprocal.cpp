// k-reciprocal false-negative masks: the algorithm both devices share (see
// k_reciprocal.h), the CPU kernels, and the op's registration with torch's dispatcher.
//
// torch.ops.jsa_fast.k_reciprocal_mask(z_img: B x D, z_aud: B x D, k, packed=False)
//   -> B x B bool, or B x ceil(B / 32) int32 bit words when packed.

#include "k_reciprocal.h"

#include <Python.h>

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <numeric>
#include <tuple>
#include <vector>

// AVX2 and AVX-512 clones of the similarity loop, picked when the library loads.
#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#define JSA_FAST_TARGET_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define JSA_FAST_TARGET_CLONES
#endif

namespace jsa_fast {
namespace k_reciprocal {

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
  // Neighbour lists hold int32 row indices.
  TORCH_CHECK_VALUE(
      z_img.size(0) <= std::numeric_limits<int32_t>::max(), "z_img has more than 2^31 - 1 rows: ", z_img.size(0));
}

at::Tensor normalized_rows(const at::Tensor& z, const char* name) {
  const at::Tensor rows = z.to(at::kFloat);
  // Checked after the cast: a finite float64 beyond float32's range becomes inf here.
  TORCH_CHECK_VALUE(at::isfinite(rows).all().item<bool>(), name, " holds values that are not finite in float32");
  const at::Tensor norms = at::linalg_vector_norm(rows, 2, {1}, /*keepdim=*/true).clamp_min(1e-12);
  return (rows / norms).contiguous();
}

int64_t scratch_bytes() {
  const char* mib = std::getenv("JSA_FAST_KRECIPROCAL_SCRATCH_MIB");
  if (mib == nullptr || *mib == '\0') {
    return kScratchBytes;
  }
  char* end = nullptr;
  const double value = std::strtod(mib, &end);
  TORCH_CHECK_VALUE(
      end != mib && *end == '\0' && value > 0, "JSA_FAST_KRECIPROCAL_SCRATCH_MIB must be a positive number, got '",
      mib, "'");
  return std::max<int64_t>(1, static_cast<int64_t>(value * (1 << 20)));
}

namespace {

// eps of the filter (k_reciprocal.h): twice the worst |s~ - s|. Rows have norm <= 1 (to
// float32 rounding). Rounding to bfloat16 (8 significant bits, to nearest) moves an entry
// by less than 2^-8 of itself, so a product by less than (1 + 2^-8)^2 - 1 = 2^-7 + 2^-16
// of itself, and the products' sum by less than (2^-7 + 2^-16) sum_d |a_d b_d| <= ~2^-7.
// A float32 sum of D terms in any order adds at most ~D 2^-24 (2^-23 per addition covers
// accumulators that truncate), and s's own rounding 2^-24.
double filter_margin(int64_t width) {
  return 2.0 * (std::ldexp(1.0, -7) + static_cast<double>(width + 1) * std::ldexp(1.0, -23));
}

// The filter similarities of rows [start, start + count) against all rows: T x B
// float32, float32 accumulation of bfloat16 values. CUDA multiplies the bfloat16 rows
// on tensor cores; ATen has no such product on CPU, which multiplies float32 copies of
// the bfloat16-rounded rows (the same error bound).
at::Tensor filter_similarities(const at::Tensor& filter_rows, int64_t start, int64_t count) {
  const at::Tensor tile = filter_rows.narrow(0, start, count);
  if (filter_rows.is_cuda()) {
    return at::mm(tile, filter_rows.t(), at::kFloat);
  }
  return at::mm(tile, filter_rows.t());
}

// rows: B x D normalised float32 -> B x k int32, row i the k rows nearest to row i,
// sorted by index.
at::Tensor nearest_lists(const at::Tensor& rows, int64_t k, const Kernels& kernels) {
  const int64_t batch = rows.size(0);
  at::Tensor neighbours = at::empty({batch, k}, rows.options().dtype(at::kInt));
  at::Tensor overflow = at::zeros({batch}, rows.options().dtype(at::kByte));
  if (k <= kFastPathMaxK) {
    at::Tensor filter_rows = rows.to(at::kBFloat16);
    if (!rows.is_cuda()) {
      filter_rows = filter_rows.to(at::kFloat);
    }
    const double margin = filter_margin(rows.size(1));
    const int64_t tile_rows = std::clamp<int64_t>(scratch_bytes() / (4 * batch), 1, batch);
    for (int64_t start = 0; start < batch; start += tile_rows) {
      const int64_t count = std::min(tile_rows, batch - start);
      const at::Tensor approx = filter_similarities(filter_rows, start, count);
      // The k-th largest filter similarity of each row (topk's order is not needed).
      const at::Tensor kth = std::get<0>(at::topk(approx, k, /*dim=*/1, /*largest=*/true, /*sorted=*/false)).amin(1);
      kernels.refine(approx, kth - 2.0 * margin, rows, start, k, neighbours, overflow);
    }
  } else {
    overflow.fill_(1);
  }
  const at::Tensor general_rows = overflow.nonzero().flatten();
  if (general_rows.numel() > 0) {
    kernels.exact_top_k(rows, general_rows, k, neighbours);
  }
  // Sorted by index for binary searches, a chunk of rows at a time: a sort's values,
  // int64 indices and buffers take ~16 bytes per entry.
  const int64_t chunk_rows = std::max<int64_t>(1, scratch_bytes() / (16 * k));
  for (int64_t start = 0; start < batch; start += chunk_rows) {
    at::Tensor chunk = neighbours.narrow(0, start, std::min(chunk_rows, batch - start));
    chunk.copy_(std::get<0>(at::sort(chunk, /*dim=*/1)));
  }
  return neighbours;
}

// ---------------------------------------------------------------------------------------
// CPU kernels
// ---------------------------------------------------------------------------------------

// Work units (multiply-adds or list entries) each thread gets at least: below this,
// waking threads costs more than it saves.
constexpr int64_t kMinWorkPerThread = int64_t{1} << 15;

// s = float32(sum_d a[d] * b[d] in float64), k_reciprocal.h. Fixed lanes fix the order of
// additions (without -ffast-math the compiler may not reorder them) and still vectorise;
// as the products are exact, fused and separate multiply-adds agree, so every
// instruction set gives the same bits.
JSA_FAST_TARGET_CLONES
float exact_similarity(const float* a, const float* b, int64_t width) {
  constexpr int64_t kLanes = 8;
  double lane_sums[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= width; d += kLanes) {
    for (int64_t lane = 0; lane < kLanes; ++lane) {
      lane_sums[lane] += static_cast<double>(a[d + lane]) * static_cast<double>(b[d + lane]);
    }
  }
  for (; d < width; ++d) {
    lane_sums[d % kLanes] += static_cast<double>(a[d]) * static_cast<double>(b[d]);
  }
  double sum = 0.0;
  for (const double lane_sum : lane_sums) {
    sum += lane_sum;
  }
  return static_cast<float>(sum);
}

// The k nearest of n rows given their similarities and indices, by `nearer`, into out.
void select_nearest(const float* values, const int32_t* ids, int64_t n, int64_t k, int32_t* out) {
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), int64_t{0});
  std::nth_element(order.begin(), order.begin() + (k - 1), order.end(), [&](int64_t a, int64_t b) {
    return nearer(values[a], ids[a], values[b], ids[b]);
  });
  for (int64_t rank = 0; rank < k; ++rank) {
    out[rank] = ids[order[rank]];
  }
}

void refine_cpu(
    const at::Tensor& approx, const at::Tensor& lower, const at::Tensor& rows, int64_t tile_start, int64_t k,
    at::Tensor& neighbours, at::Tensor& overflow) {
  const int64_t tile = approx.size(0);
  const int64_t batch = approx.size(1);
  const int64_t width = rows.size(1);
  const float* approx_data = approx.const_data_ptr<float>();
  const at::Tensor lower_contiguous = lower.contiguous();
  const float* lower_data = lower_contiguous.const_data_ptr<float>();
  const float* row_data = rows.const_data_ptr<float>();
  int32_t* lists = neighbours.mutable_data_ptr<int32_t>();
  uint8_t* flags = overflow.mutable_data_ptr<uint8_t>();
  at::parallel_for(0, tile, std::max<int64_t>(1, kMinWorkPerThread / batch), [&](int64_t begin, int64_t end) {
    std::vector<int32_t> candidates;
    std::vector<float> values;
    for (int64_t local = begin; local < end; ++local) {
      const int64_t row = tile_start + local;
      const float* approx_row = approx_data + local * batch;
      candidates.clear();
      for (int64_t j = 0; j < batch; ++j) {
        if (approx_row[j] >= lower_data[local]) {
          candidates.push_back(static_cast<int32_t>(j));
        }
      }
      const auto n = static_cast<int64_t>(candidates.size());
      if (n > kMaxCandidates) {
        flags[row] = 1;
        continue;
      }
      values.resize(n);
      for (int64_t c = 0; c < n; ++c) {
        values[c] = exact_similarity(row_data + row * width, row_data + candidates[c] * width, width);
      }
      select_nearest(values.data(), candidates.data(), n, k, lists + row * k);
    }
  });
}

void exact_top_k_cpu(const at::Tensor& rows, const at::Tensor& row_ids, int64_t k, at::Tensor& neighbours) {
  const int64_t batch = rows.size(0);
  const int64_t width = rows.size(1);
  const float* row_data = rows.const_data_ptr<float>();
  const at::Tensor ids = row_ids.contiguous();
  const int64_t* id_data = ids.const_data_ptr<int64_t>();
  int32_t* lists = neighbours.mutable_data_ptr<int32_t>();
  const int64_t grain = std::max<int64_t>(1, kMinWorkPerThread / (batch * width));
  at::parallel_for(0, ids.numel(), grain, [&](int64_t begin, int64_t end) {
    std::vector<float> values(batch);
    std::vector<int32_t> all_rows(batch);
    std::iota(all_rows.begin(), all_rows.end(), int32_t{0});
    for (int64_t n = begin; n < end; ++n) {
      const int64_t row = id_data[n];
      for (int64_t j = 0; j < batch; ++j) {
        values[j] = exact_similarity(row_data + row * width, row_data + j * width, width);
      }
      select_nearest(values.data(), all_rows.data(), batch, k, lists + row * k);
    }
  });
}

void assemble_cpu(const at::Tensor& img, const at::Tensor& aud, const MaskView& mask) {
  const int64_t k = img.size(1);
  const int32_t* img_lists = img.const_data_ptr<int32_t>();
  const int32_t* aud_lists = aud.const_data_ptr<int32_t>();
  at::parallel_for(0, mask.batch, std::max<int64_t>(1, kMinWorkPerThread / (k * 8)), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      assemble_row(i, img_lists, aud_lists, k, mask);
    }
  });
}

constexpr Kernels kCpuKernels{&refine_cpu, &exact_top_k_cpu, &assemble_cpu};

at::Tensor k_reciprocal_mask_cpu(const at::Tensor& z_img, const at::Tensor& z_aud, int64_t k, bool packed) {
  return k_reciprocal_mask(z_img, z_aud, k, packed, kCpuKernels);
}

}  // namespace

at::Tensor k_reciprocal_mask(
    const at::Tensor& z_img, const at::Tensor& z_aud, int64_t k, bool packed, const Kernels& kernels) {
  check_inputs(z_img, z_aud, k);
  const at::Tensor rows_img = normalized_rows(z_img, "z_img");
  const at::Tensor rows_aud = normalized_rows(z_aud, "z_aud");
  const at::Tensor img = nearest_lists(rows_img, k, kernels);
  const at::Tensor aud = nearest_lists(rows_aud, k, kernels);
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
  m.def("k_reciprocal_mask(Tensor z_img, Tensor z_aud, int k, bool packed=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(jsa_fast, CPU, m) {
  m.impl("k_reciprocal_mask", &k_reciprocal_mask_cpu);
}

}  // namespace k_reciprocal
}  // namespace jsa_fast

// `import jsa_fast._C` loads this library, which registers the ops above with torch's
// dispatcher; the Python module itself is empty.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
