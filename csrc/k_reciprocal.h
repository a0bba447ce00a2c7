// k-reciprocal false-negative masks (paper eq. 12-13): what the CPU (k_reciprocal.cpp)
// and CUDA (k_reciprocal_cuda.cu) kernels of jsa_fast._C share.
//
// R = N^v & N^v^T & N^a & N^a^T with the diagonal cleared, where N^m[i, j] says that j
// is one of the k rows most cosine-similar to row i (self included, ties to the lower
// index). Both devices run the same algorithm, per modality:
//
//   1. rows <- z / max(||z||, 1e-12) in float32, through the ATen calls F.normalize
//      makes, so the rows are the reference's rows bit for bit on that device.
//   2. Filter, one tile of T rows at a time (T x B float32, never the whole B x B):
//      s~[i, j] = <bf16(row_i), bf16(row_j)> accumulated in float32 (a tensor-core GEMM
//      on CUDA), t_i = the k-th largest s~[i, :], candidates C_i = {j : s~[i, j] >=
//      t_i - 2 eps}. With |s~ - s| <= eps for the exact similarity s below, C_i holds
//      every true neighbour: at least k rows have s > t_i - eps >= s of any row outside.
//      (eps is twice the worst-case error: filter_margin in k_reciprocal.cpp.)
//   3. Refine: s[i, j] for j in C_i, exactly as documented below, and the k first of
//      C_i by (s descending, index ascending) are N(i). Rows with more than
//      kMaxCandidates candidates (many near-ties) and every row when k > kFastPathMaxK
//      take the general path: s against all B rows and the same selection (a stable sort
//      on CUDA, nth_element by that order on the CPU).
//   4. Assemble R from the B x k neighbour lists (each sorted by index, so that
//      membership is a binary search): O(B k log k) work, O(B k) memory.
//
// The similarity s[i, j] is the float32 rounding of sum_d row_i[d] * row_j[d] summed in
// float64. Products of float32 values are exact in float64 and the float64 sum's error is
// far below float32's spacing, so s is the exact dot product of the normalised rows
// rounded to float32 (but for rare double roundings): exact whenever the sum is
// representable, which keeps exact ties tied on every device, thread count and summation
// order. Near-ties within a float32 ulp may resolve differently from a float32 matrix
// product (the reference's), as any two float32 summation orders may.

#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#ifdef __CUDACC__
#define JSA_FAST_HOST_DEVICE __host__ __device__
#else
#define JSA_FAST_HOST_DEVICE
#endif

namespace jsa_fast {
namespace k_reciprocal {

// Candidates a row may have on the fast path (the CUDA kernel keeps them in shared memory).
constexpr int64_t kMaxCandidates = 2048;
// Largest k the filter serves; above it every row takes the general path.
constexpr int64_t kFastPathMaxK = 256;
// Scratch memory per step: the float32 tile of filter similarities, the general path's
// similarities, values and indices.
constexpr int64_t kScratchBytes = int64_t{256} << 20;
// kScratchBytes, or JSA_FAST_KRECIPROCAL_SCRATCH_MIB MiB when that is set: a smaller bound
// means more, smaller tiles (the tests use it to run many tiles at small B).
int64_t scratch_bytes();

// Raises ValueError (TORCH_CHECK_VALUE), naming the argument, for inputs the op cannot
// take. The data-dependent finiteness check lives in normalized_rows.
void check_inputs(const at::Tensor& z_img, const at::Tensor& z_aud, int64_t k);

// Step 1: B x D any float -> B x D contiguous float32 rows of unit norm (or zero).
at::Tensor normalized_rows(const at::Tensor& z, const char* name);

// The output R: B x B bool entries, or (packed) B x words int32 words, bit b of word w of
// row i being R[i, 32 w + b]; exactly one of the two pointers is set.
struct MaskView {
  bool* entries;
  uint32_t* bits;
  int64_t batch;
  int64_t words;
};

// The device-specific steps 2-4; each function handles one device's tensors.
struct Kernels {
  // Step 3 for tile rows [tile_start, tile_start + T): filter similarities approx (T x B
  // float32), candidate bounds lower (T float32) -> neighbours[i] (B x k int32, any
  // order) for rows with at most kMaxCandidates candidates, overflow[i] = 1 (B uint8)
  // for the others.
  void (*refine)(
      const at::Tensor& approx, const at::Tensor& lower, const at::Tensor& rows, int64_t tile_start, int64_t k,
      at::Tensor& neighbours, at::Tensor& overflow);
  // The general path for the listed rows (int64): neighbours[row] <- its k first rows.
  void (*exact_top_k)(const at::Tensor& rows, const at::Tensor& row_ids, int64_t k, at::Tensor& neighbours);
  // Step 4: two B x k int32 lists sorted by index -> R, written into a zeroed mask.
  void (*assemble)(const at::Tensor& img, const at::Tensor& aud, const MaskView& mask);
};

// Steps 1-4 for both modalities on the device whose kernels are given.
at::Tensor k_reciprocal_mask(
    const at::Tensor& z_img, const at::Tensor& z_aud, int64_t k, bool packed, const Kernels& kernels);

// a is nearer than b: a larger similarity, or an equal one and a lower index. A strict
// total order over distinct indices, so "the k first" is well defined.
JSA_FAST_HOST_DEVICE inline bool nearer(float a_value, int64_t a_index, float b_value, int64_t b_index) {
  return a_value > b_value || (a_value == b_value && a_index < b_index);
}

// Whether x is in list[0, k), sorted ascending.
JSA_FAST_HOST_DEVICE inline bool sorted_contains(const int32_t* list, int64_t k, int32_t x) {
  int64_t low = 0;
  int64_t high = k;
  while (low < high) {
    const int64_t mid = low + (high - low) / 2;
    if (list[mid] < x) {
      low = mid + 1;
    } else {
      high = mid;
    }
  }
  return low < k && list[low] == x;
}

// R[i, j] for j taken from row i's image list: i != j, and i in j's image list, j in
// i's audio list, i in j's audio list. img and aud are B x k, rows sorted ascending.
JSA_FAST_HOST_DEVICE inline bool reciprocal_pair(
    int64_t i, int32_t j, const int32_t* img, const int32_t* aud, int64_t k) {
  const auto self = static_cast<int32_t>(i);
  return j != self && sorted_contains(img + j * k, k, self) && sorted_contains(aud + i * k, k, j) &&
      sorted_contains(aud + j * k, k, self);
}

// Writes row i of R: R[i, j] for each j in row i's image list. Only row i is written, so
// rows can be written in parallel without atomics.
JSA_FAST_HOST_DEVICE inline void assemble_row(
    int64_t i, const int32_t* img, const int32_t* aud, int64_t k, const MaskView& mask) {
  for (int64_t rank = 0; rank < k; ++rank) {
    const int32_t j = img[i * k + rank];
    if (!reciprocal_pair(i, j, img, aud, k)) {
      continue;
    }
    if (mask.bits != nullptr) {
      mask.bits[i * mask.words + j / 32] |= uint32_t{1} << (j % 32);
    } else {
      mask.entries[i * mask.batch + j] = true;
    }
  }
}

}  // namespace k_reciprocal
}  // namespace jsa_fast
