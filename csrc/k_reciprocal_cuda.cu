// k-reciprocal false-negative masks: the CUDA kernels of jsa_fast._C (the algorithm, its
// similarity and its memory bound are described in k_reciprocal.h; k_reciprocal.cpp
// holds the steps both devices share, k_reciprocal_rows.h the per-row steps that a CUDA
// block here and a CPU thread in k_reciprocal_cpu.cpp both run).
//
// Per modality and tile of T rows: the filter tile is one bf16 tensor-core GEMM written
// as bf16 (cuBLAS); refine_kernel (one block per row) finds the row's k-th filter value
// and writes its candidates in one pass over the row, computes their exact similarities
// (one warp per candidate, float64 sums) and selects the k nearest. The general path's
// float64 GEMM is cuBLAS's (through ATen); merge_kernel (one block per row) keeps each
// row's running top-k. assemble_kernel (one thread per row) writes R.

#include "k_reciprocal.h"
#include "k_reciprocal_rows.h"

#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

namespace jsa_fast {
namespace k_reciprocal {
namespace {

constexpr int kWarpSize = 32;
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarpSize;

// A group of all the threads of a block (k_reciprocal_rows.h).
struct BlockGroup {
  template <class F>
  __device__ void for_each(int64_t n, const F& f) const {
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      f(i);
    }
  }
  __device__ void sync() const {
    __syncthreads();
  }
  __device__ bool leader() const {
    return threadIdx.x == 0;
  }
  __device__ static uint32_t fetch_add(uint32_t* counter, uint32_t value) {
    return atomicAdd(counter, value);
  }
};

// s = float32(sum_d a[d] * b[d] in float64) (k_reciprocal.h), computed by one warp: lane l
// sums d = l, l + 32, ... and a fixed tree adds the lanes. The result is lane 0's.
__device__ float warp_exact_similarity(const float* a, const float* b, int64_t width, int lane) {
  double sum = 0.0;
  for (int64_t d = lane; d < width; d += kWarpSize) {
    sum += static_cast<double>(a[d]) * static_cast<double>(b[d]);
  }
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    sum += __shfl_down_sync(0xffffffffu, sum, offset);
  }
  return static_cast<float>(sum);
}

// One block per tile row (refine_row): candidates[r] and keys[r] are the row's `limit`
// slots of global scratch.
__global__ void refine_kernel(
    const uint16_t* __restrict__ tile, const FilterBound bound, const float* __restrict__ rows, int64_t tile_start,
    int64_t batch, int64_t width, int64_t k, int64_t limit, int32_t* __restrict__ candidates,
    uint64_t* __restrict__ keys, int32_t* __restrict__ neighbours, uint8_t* __restrict__ general) {
  __shared__ RowScratch scratch;
  const int64_t local = blockIdx.x;
  const int64_t row = tile_start + local;
  int32_t* row_candidates = candidates + local * limit;
  uint64_t* row_keys = keys + local * limit;
  const float* self = rows + row * width;
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const auto fill_keys = [&](uint32_t count) {
    for (uint32_t c = warp; c < count; c += kWarps) {
      const int32_t j = row_candidates[c];
      const float value = warp_exact_similarity(self, rows + j * width, width, lane);
      if (lane == 0) {
        row_keys[c] = neighbour_key(value, j);
      }
    }
  };
  const bool refined = refine_row(
      BlockGroup{}, scratch, tile + local * batch, batch, k, bound, limit, row_candidates, row_keys, fill_keys,
      neighbours + row * k);
  if (!refined && threadIdx.x == 0) {
    general[row] = 1;
  }
}

// One block per row r of products (merge_largest); survivors[r] (kMergeChunk) and
// next[r] (k) are the row's global scratch.
__global__ void merge_kernel(
    const double* __restrict__ products, const int32_t* __restrict__ column_ids, int64_t columns, int64_t k,
    uint64_t* __restrict__ state, uint64_t* __restrict__ floors, uint64_t* __restrict__ survivors,
    uint64_t* __restrict__ next) {
  __shared__ RowScratch scratch;
  const int64_t r = blockIdx.x;
  const double* row_sums = products + r * columns;
  merge_largest(
      BlockGroup{}, scratch, state + r * k, floors + r, k, columns,
      [&](int64_t c) { return neighbour_key(static_cast<float>(row_sums[c]), column_ids[c]); },
      survivors + r * kMergeChunk, next + r * k);
}

// One thread per row i writes R[i, :] (assemble_row).
__global__ void assemble_kernel(
    const int32_t* __restrict__ img, const int32_t* __restrict__ aud, int64_t k, const MaskView mask) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < mask.batch) {
    assemble_row(i, img, aud, k, mask);
  }
}

// A 256th of the device's memory, within [64 MiB, 512 MiB]: large tiles on large devices,
// and B = 65,536 within 2 GiB of extra memory (k_reciprocal.h).
int64_t default_scratch_bytes_cuda() {
  const auto total = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->totalGlobalMem);
  return std::clamp<int64_t>(total / 256, int64_t{64} << 20, int64_t{512} << 20);
}

// cuBLAS may sum split products in the output's type (bfloat16) unless told not to; the
// filter's bound assumes float32 sums, so the handle's math mode forbids it for the call.
class FloatReductions {
 public:
  explicit FloatReductions(cublasHandle_t handle) : handle_(handle) {
    TORCH_CUDABLAS_CHECK(cublasGetMathMode(handle_, &saved_));
    TORCH_CUDABLAS_CHECK(cublasSetMathMode(
        handle_, static_cast<cublasMath_t>(saved_ | CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION)));
  }
  ~FloatReductions() {
    cublasSetMathMode(handle_, saved_);
  }
  FloatReductions(const FloatReductions&) = delete;
  FloatReductions& operator=(const FloatReductions&) = delete;

 private:
  cublasHandle_t handle_;
  cublasMath_t saved_;
};

// count x B bfloat16 = rows [start, start + count) times all rows, transposed. Row-major
// matrices are column-major transposes, so cuBLAS computes the column-major B x count
// product all^T(op T) x tile^T(op N), which is the row-major tile.
at::Tensor filter_tile_cuda(const at::Tensor& filter_rows, int64_t start, int64_t count) {
  const int64_t batch = filter_rows.size(0);
  const int64_t width = filter_rows.size(1);
  at::Tensor tile = at::empty({count, batch}, filter_rows.options());
  const cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();
  const FloatReductions float_reductions(handle);
  const float one = 1.0f;
  const float zero = 0.0f;
  const auto* all = filter_rows.const_data_ptr<at::BFloat16>();
  TORCH_CUDABLAS_CHECK(cublasGemmEx(
      handle, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(batch), static_cast<int>(count), static_cast<int>(width),
      &one, all, CUDA_R_16BF, static_cast<int>(width), all + start * width, CUDA_R_16BF, static_cast<int>(width),
      &zero, tile.mutable_data_ptr<at::BFloat16>(), CUDA_R_16BF, static_cast<int>(batch), CUBLAS_COMPUTE_32F,
      CUBLAS_GEMM_DEFAULT));
  return tile;
}

void refine_cuda(
    const at::Tensor& tile, const FilterBound& bound, const at::Tensor& rows, int64_t tile_start, int64_t k,
    int64_t limit, const at::Tensor& neighbours, const at::Tensor& general) {
  const int64_t tile_rows = tile.size(0);
  const at::Tensor candidates = at::empty({tile_rows, limit}, rows.options().dtype(at::kInt));
  const at::Tensor keys = at::empty({tile_rows, limit}, rows.options().dtype(at::kLong));
  const auto stream = at::cuda::getCurrentCUDAStream();
  refine_kernel<<<static_cast<unsigned>(tile_rows), kThreads, 0, stream>>>(
      reinterpret_cast<const uint16_t*>(tile.const_data_ptr<at::BFloat16>()), bound, rows.const_data_ptr<float>(),
      tile_start, tile.size(1), rows.size(1), k, limit, candidates.mutable_data_ptr<int32_t>(),
      reinterpret_cast<uint64_t*>(keys.mutable_data_ptr<int64_t>()), neighbours.mutable_data_ptr<int32_t>(),
      general.mutable_data_ptr<uint8_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// A transposed block is copied first, so that a block's threads read consecutive sums.
void merge_cuda(
    const at::Tensor& products, const at::Tensor& column_ids, const at::Tensor& state, const at::Tensor& floors) {
  const at::Tensor sums = products.contiguous();
  const int64_t block_rows = sums.size(0);
  const int64_t k = state.size(1);
  const at::Tensor survivors = at::empty({block_rows, kMergeChunk}, state.options());
  const at::Tensor next = at::empty({block_rows, k}, state.options());
  const auto stream = at::cuda::getCurrentCUDAStream();
  merge_kernel<<<static_cast<unsigned>(block_rows), kThreads, 0, stream>>>(
      sums.const_data_ptr<double>(), column_ids.const_data_ptr<int32_t>(), sums.size(1), k,
      reinterpret_cast<uint64_t*>(state.mutable_data_ptr<int64_t>()),
      reinterpret_cast<uint64_t*>(floors.mutable_data_ptr<int64_t>()),
      reinterpret_cast<uint64_t*>(survivors.mutable_data_ptr<int64_t>()),
      reinterpret_cast<uint64_t*>(next.mutable_data_ptr<int64_t>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void assemble_cuda(const at::Tensor& img, const at::Tensor& aud, const MaskView& mask) {
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto blocks = static_cast<unsigned>((mask.batch + kThreads - 1) / kThreads);
  assemble_kernel<<<blocks, kThreads, 0, stream>>>(
      img.const_data_ptr<int32_t>(), aud.const_data_ptr<int32_t>(), img.size(1), mask);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The largest batch that takes the direct path (step 4 for every row), which reads nothing
// back to the host where the filter's steps 2-4 read several values per modality
// (k_reciprocal.h), each a sync that drains the launch queue. Not measured (no GPU has run
// this code yet), an estimate: up to 1,024 rows that path is a float64 GEMM of about
// B^2 D / 2 multiply-adds (symmetry; 0.3 G at D = 512) and running top-k merges of B keys
// per row, well under a millisecond on an H100. `make bench-gpu` times
// both paths (bench/kreciprocal.py --paths --unchecked) to place it.
constexpr int64_t kDirectMaxBatch = 1024;

constexpr Kernels kCudaKernels{
    &default_scratch_bytes_cuda, kDirectMaxBatch, nullptr, &filter_tile_cuda, &refine_cuda, &merge_cuda,
    &assemble_cuda};

at::Tensor k_reciprocal_mask_cuda(
    const at::Tensor& z_img, const at::Tensor& z_aud, int64_t k, bool packed, bool check_finite) {
  const c10::cuda::CUDAGuard device_guard(z_img.device());
  return k_reciprocal_mask(z_img, z_aud, k, packed, check_finite, kCudaKernels);
}

}  // namespace

TORCH_LIBRARY_IMPL(jsa_fast, CUDA, m) {
  m.impl("k_reciprocal_mask", &k_reciprocal_mask_cuda);
}

}  // namespace k_reciprocal
}  // namespace jsa_fast
