// k-reciprocal false-negative masks: the CPU kernels (k_reciprocal.h), each row run by the
// per-row steps of k_reciprocal_rows.h on one thread, rows in parallel.

#include "k_reciprocal.h"
#include "k_reciprocal_rows.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <functional>
#include <vector>

// AVX2 and AVX-512 clones of the similarity loop, picked when the library loads.
#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#define JSA_FAST_TARGET_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define JSA_FAST_TARGET_CLONES
#endif

namespace jsa_fast {
namespace k_reciprocal {
namespace {

// Work units (multiply-adds or row entries) each thread gets at least: below this,
// waking threads costs more than it saves.
constexpr int64_t kMinWorkPerThread = int64_t{1} << 15;

// The largest batch that takes the direct path. Measured (bench/kreciprocal.py --paths, D =
// 512, k = 20, 2-core Xeon; bench/results/kreciprocal-cpu-20261205T062821Z-paths.json): at
// B = 512 and 576 the two paths take the same time on random rows (6.6 / 6.6 and 8.2 / 8.0
// ms) and the direct one 21-26% less on collapsed rows; from 640 on, the direct path takes
// longer on random rows (8% at 640, 29% at 1,024).
constexpr int64_t kDirectMaxBatch = 576;

int64_t default_scratch_bytes_cpu() {
  return int64_t{256} << 20;
}

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

// ATen has no fast bfloat16 product on the CPU: float32 copies of the bfloat16 rows give
// the same exact products and float32 sums, rounded to bfloat16 as on CUDA.
at::Tensor filter_tile_cpu(const at::Tensor& filter_rows, int64_t start, int64_t count) {
  const at::Tensor all = filter_rows.to(at::kFloat);
  return at::mm(all.narrow(0, start, count), all.t()).to(at::kBFloat16);
}

void refine_cpu(
    const at::Tensor& tile, const FilterBound& bound, const at::Tensor& rows, int64_t tile_start, int64_t k,
    int64_t limit, const at::Tensor& neighbours, const at::Tensor& general) {
  const int64_t batch = tile.size(1);
  const int64_t width = rows.size(1);
  const auto* tile_data = reinterpret_cast<const uint16_t*>(tile.const_data_ptr<at::BFloat16>());
  const float* row_data = rows.const_data_ptr<float>();
  int32_t* lists = neighbours.mutable_data_ptr<int32_t>();
  uint8_t* flags = general.mutable_data_ptr<uint8_t>();
  at::parallel_for(0, tile.size(0), std::max<int64_t>(1, kMinWorkPerThread / batch), [&](int64_t begin, int64_t end) {
    RowScratch scratch;
    std::vector<int32_t> candidates(limit);
    std::vector<uint64_t> keys(limit);
    for (int64_t local = begin; local < end; ++local) {
      const int64_t row = tile_start + local;
      const float* self = row_data + row * width;
      const auto fill_keys = [&](uint32_t count) {
        for (uint32_t c = 0; c < count; ++c) {
          keys[c] = neighbour_key(exact_similarity(self, row_data + candidates[c] * width, width), candidates[c]);
        }
      };
      if (!refine_row(
              SerialGroup{}, scratch, tile_data + local * batch, batch, k, bound, limit, candidates.data(),
              keys.data(), fill_keys, lists + row * k)) {
        flags[row] = 1;
      }
    }
  });
}

// Reads the products through their strides: a transposed block's rows are its columns,
// and rows taken in order share cache lines.
void merge_cpu(
    const at::Tensor& products, const at::Tensor& column_ids, const at::Tensor& state, const at::Tensor& floors) {
  const int64_t columns = products.size(1);
  const int64_t row_stride = products.stride(0);
  const int64_t column_stride = products.stride(1);
  const int64_t k = state.size(1);
  const double* sums = products.const_data_ptr<double>();
  const int32_t* ids = column_ids.const_data_ptr<int32_t>();
  auto* keys = reinterpret_cast<uint64_t*>(state.mutable_data_ptr<int64_t>());
  auto* floor_keys = reinterpret_cast<uint64_t*>(floors.mutable_data_ptr<int64_t>());
  const int64_t grain = std::max<int64_t>(1, kMinWorkPerThread / columns);
  at::parallel_for(0, products.size(0), grain, [&](int64_t begin, int64_t end) {
    RowScratch scratch;
    std::vector<uint64_t> survivors(kMergeChunk);
    std::vector<uint64_t> next(k);
    for (int64_t r = begin; r < end; ++r) {
      const double* row_sums = sums + r * row_stride;
      merge_largest(
          SerialGroup{}, scratch, keys + r * k, floor_keys + r, k, columns,
          [&](int64_t c) { return neighbour_key(static_cast<float>(row_sums[c * column_stride]), ids[c]); },
          survivors.data(), next.data());
    }
  });
}

// The direct path (k_reciprocal.h): a tile of rows' float64 products against all rows,
// one GEMM, then each row's k largest keys. Up to kDirectMaxBatch rows this costs no more
// than the filter: on the CPU the filter's bfloat16 GEMM runs in float32 (filter_tile_cpu),
// which saves at most half of a float64 GEMM, and its fixed costs (the bound, the tiles'
// conversions, radix selections, the refinement) outweigh that at small B.
void direct_cpu(const at::Tensor& rows, int64_t k, int64_t scratch, const at::Tensor& neighbours) {
  const int64_t batch = rows.size(0);
  const at::Tensor exact = rows.to(at::kDouble);
  int32_t* lists = neighbours.mutable_data_ptr<int32_t>();
  // Per tile row: its products (8 bytes per column).
  const int64_t tile_rows = std::clamp<int64_t>(scratch / (8 * batch), 1, batch);
  for (int64_t start = 0; start < batch; start += tile_rows) {
    const int64_t count = std::min(tile_rows, batch - start);
    const at::Tensor products = at::mm(exact.narrow(0, start, count), exact.t()).contiguous();
    const double* sums = products.const_data_ptr<double>();
    at::parallel_for(0, count, std::max<int64_t>(1, kMinWorkPerThread / batch), [&](int64_t begin, int64_t end) {
      std::vector<uint64_t> keys(batch);
      for (int64_t r = begin; r < end; ++r) {
        const double* row_sums = sums + r * batch;
        for (int64_t j = 0; j < batch; ++j) {
          keys[j] = neighbour_key(static_cast<float>(row_sums[j]), static_cast<int32_t>(j));
        }
        std::nth_element(keys.begin(), keys.begin() + (k - 1), keys.end(), std::greater<uint64_t>());
        int32_t* list = lists + (start + r) * k;
        for (int64_t slot = 0; slot < k; ++slot) {
          list[slot] = key_index(keys[slot]);
        }
      }
    });
  }
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

constexpr Kernels kCpuKernels{
    &default_scratch_bytes_cpu, kDirectMaxBatch, &direct_cpu, &filter_tile_cpu, &refine_cpu, &merge_cpu,
    &assemble_cpu};

at::Tensor k_reciprocal_mask_cpu(
    const at::Tensor& z_img, const at::Tensor& z_aud, int64_t k, bool packed, bool check_finite) {
  return k_reciprocal_mask(z_img, z_aud, k, packed, check_finite, kCpuKernels);
}

}  // namespace

TORCH_LIBRARY_IMPL(jsa_fast, CPU, m) {
  m.impl("k_reciprocal_mask", &k_reciprocal_mask_cpu);
}

}  // namespace k_reciprocal
}  // namespace jsa_fast
