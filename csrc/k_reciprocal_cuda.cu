// k-reciprocal false-negative masks: the CUDA kernels of jsa_fast._C (the algorithm, its
// similarity and its memory bound are described in k_reciprocal.h; k_reciprocal.cpp
// holds the CPU twin and the steps both devices share).
//
// Per modality and tile of T rows: the filter similarities are one bf16 tensor-core GEMM
// (T x B float32, ATen/cuBLAS) and topk gives each row's bound; refine_kernel (one block
// per row) gathers the row's candidates into shared memory, computes their exact
// similarities (one warp per candidate, float64 sums) and ranks them. Rows with too many
// candidates go to exact_similarities_kernel (one warp per pair, all B columns, a chunk of
// rows at a time) and a stable sort. assemble_kernel (one thread per row) writes R from
// the neighbour lists.

#include "k_reciprocal.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

namespace jsa_fast {
namespace k_reciprocal {
namespace {

constexpr int kWarpSize = 32;
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kColumnsPerBlock = 64;

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

// One block per tile row i: C_i = {j : approx[i, j] >= lower[i]} (any order), then each
// candidate's rank among C_i by `nearer` on exact similarities; ranks below k give N(i).
// More than kMaxCandidates candidates: overflow[i] = 1 and the general path takes the row.
__global__ void refine_kernel(
    const float* __restrict__ approx, const float* __restrict__ lower, const float* __restrict__ rows,
    int64_t tile_start, int64_t batch, int64_t width, int64_t k, int32_t* __restrict__ neighbours,
    uint8_t* __restrict__ overflow) {
  __shared__ int32_t candidate_index[kMaxCandidates];
  __shared__ float candidate_value[kMaxCandidates];
  __shared__ int candidate_count;
  const int64_t local = blockIdx.x;
  const int64_t row = tile_start + local;
  const float* approx_row = approx + local * batch;
  const float bound = lower[local];
  if (threadIdx.x == 0) {
    candidate_count = 0;
  }
  __syncthreads();
  for (int64_t j = threadIdx.x; j < batch; j += blockDim.x) {
    if (approx_row[j] >= bound) {
      const int slot = atomicAdd(&candidate_count, 1);
      if (slot < kMaxCandidates) {
        candidate_index[slot] = static_cast<int32_t>(j);
      }
    }
  }
  __syncthreads();
  const int n = candidate_count;
  if (n > kMaxCandidates) {
    if (threadIdx.x == 0) {
      overflow[row] = 1;
    }
    return;
  }
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const float* self = rows + row * width;
  for (int c = warp; c < n; c += kWarps) {
    const float value = warp_exact_similarity(self, rows + candidate_index[c] * width, width, lane);
    if (lane == 0) {
      candidate_value[c] = value;
    }
  }
  __syncthreads();
  // `nearer` is a strict total order, so the ranks are 0 .. n - 1, each once.
  for (int c = threadIdx.x; c < n; c += blockDim.x) {
    const float value = candidate_value[c];
    const int32_t index = candidate_index[c];
    int rank = 0;
    for (int other = 0; other < n; ++other) {
      rank += nearer(candidate_value[other], candidate_index[other], value, index);
    }
    if (rank < k) {
      neighbours[row * k + rank] = index;
    }
  }
}

// out[r, j] = s[row_ids[r], j] for a chunk of rows; grid (ceil(B / kColumnsPerBlock), rows):
// columns on x, whose limit is 2^31 - 1 blocks; a chunk holds at most 2^24 / B rows.
__global__ void exact_similarities_kernel(
    const float* __restrict__ rows, const int64_t* __restrict__ row_ids, int64_t batch, int64_t width,
    float* __restrict__ out) {
  const int64_t r = blockIdx.y;
  const float* self = rows + row_ids[r] * width;
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t first_column = static_cast<int64_t>(blockIdx.x) * kColumnsPerBlock;
  for (int c = warp; c < kColumnsPerBlock; c += kWarps) {
    const int64_t j = first_column + c;
    if (j >= batch) {
      break;  // j is the same in all lanes of the warp, so the whole warp leaves
    }
    const float value = warp_exact_similarity(self, rows + j * width, width, lane);
    if (lane == 0) {
      out[r * batch + j] = value;
    }
  }
}

// One thread per row i writes R[i, :] (assemble_row).
__global__ void assemble_kernel(
    const int32_t* __restrict__ img, const int32_t* __restrict__ aud, int64_t k, const MaskView mask) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < mask.batch) {
    assemble_row(i, img, aud, k, mask);
  }
}

void refine_cuda(
    const at::Tensor& approx, const at::Tensor& lower, const at::Tensor& rows, int64_t tile_start, int64_t k,
    at::Tensor& neighbours, at::Tensor& overflow) {
  const at::Tensor lower_contiguous = lower.contiguous();
  const auto stream = at::cuda::getCurrentCUDAStream();
  refine_kernel<<<approx.size(0), kThreads, 0, stream>>>(
      approx.const_data_ptr<float>(), lower_contiguous.const_data_ptr<float>(), rows.const_data_ptr<float>(),
      tile_start, approx.size(1), rows.size(1), k, neighbours.mutable_data_ptr<int32_t>(),
      overflow.mutable_data_ptr<uint8_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void exact_top_k_cuda(const at::Tensor& rows, const at::Tensor& row_ids, int64_t k, at::Tensor& neighbours) {
  const int64_t batch = rows.size(0);
  // Similarities (4 bytes), sorted values (4) and indices (8) per entry.
  const int64_t chunk_rows = std::max<int64_t>(1, scratch_bytes() / (16 * batch));
  const auto stream = at::cuda::getCurrentCUDAStream();
  for (int64_t start = 0; start < row_ids.numel(); start += chunk_rows) {
    const at::Tensor ids = row_ids.narrow(0, start, std::min(chunk_rows, row_ids.numel() - start)).contiguous();
    at::Tensor values = at::empty({ids.numel(), batch}, rows.options());
    const dim3 grid((batch + kColumnsPerBlock - 1) / kColumnsPerBlock, ids.numel());
    exact_similarities_kernel<<<grid, kThreads, 0, stream>>>(
        rows.const_data_ptr<float>(), ids.const_data_ptr<int64_t>(), batch, rows.size(1),
        values.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // A stable sort keeps equal similarities in index order: ties go to the lower index.
    const at::Tensor order = std::get<1>(at::sort(values, /*stable=*/true, /*dim=*/1, /*descending=*/true));
    neighbours.index_copy_(0, ids, order.narrow(1, 0, k).to(at::kInt));
  }
}

void assemble_cuda(const at::Tensor& img, const at::Tensor& aud, const MaskView& mask) {
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto blocks = static_cast<unsigned>((mask.batch + kThreads - 1) / kThreads);
  assemble_kernel<<<blocks, kThreads, 0, stream>>>(img.const_data_ptr<int32_t>(), aud.const_data_ptr<int32_t>(), img.size(1), mask);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

constexpr Kernels kCudaKernels{&refine_cuda, &exact_top_k_cuda, &assemble_cuda};

at::Tensor k_reciprocal_mask_cuda(const at::Tensor& z_img, const at::Tensor& z_aud, int64_t k, bool packed) {
  const c10::cuda::CUDAGuard device_guard(z_img.device());
  return k_reciprocal_mask(z_img, z_aud, k, packed, kCudaKernels);
}

}  // namespace

TORCH_LIBRARY_IMPL(jsa_fast, CUDA, m) {
  m.impl("k_reciprocal_mask", &k_reciprocal_mask_cuda);
}

}  // namespace k_reciprocal
}  // namespace jsa_fast
