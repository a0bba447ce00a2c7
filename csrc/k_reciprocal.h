// k-reciprocal false-negative masks (paper eq. 12-13): what the CPU (k_reciprocal_cpu.cpp)
// and CUDA (k_reciprocal_cuda.cu) kernels of jsa_fast._C share.
//
// R = N^v & N^v^T & N^a & N^a^T with the diagonal cleared, where N^m[i, j] says that j
// is one of the k rows most cosine-similar to row i (self included, ties to the lower
// index). Both devices run the same steps (k_reciprocal.cpp), per modality:
//
//   1. rows <- z / max(||z||, 1e-12) in float32, through the ATen calls F.normalize
//      makes, so the rows are the reference's rows bit for bit on that device. Values
//      that are not finite raise ValueError (check_finite, one host read), or else make
//      their row a zero row.
//   2. Filter, one tile of T rows at a time (never the whole B x B): v[i, j] = the
//      float32 sum of the products of the bfloat16-rounded rows, rounded to bfloat16 (a
//      tensor-core GEMM on CUDA). With |acc - s| <= e for the sum acc before its rounding
//      and |acc - v| <= c |v| (FilterBound: e from the rows' measured rounding, c from
//      bfloat16's precision), s lies in [lo(v), hi(v)] = v -+ (c |v| + e), both
//      increasing in v. Let t_i be the k-th largest v[i, :]: at least k rows have
//      s >= lo(t_i), so every true neighbour has s >= lo(t_i), and no row with
//      hi(v[i, j]) < lo(t_i) is one. The candidates are the others: v[i, j] >=
//      candidate_floor(t_i). One pass per row (select_candidates) finds t_i and writes the
//      candidates to global memory, at most `limit` = max(B / kCandidateShare,
//      kMinCandidateLimit) of them.
//   3. Refine: s[i, j] for the candidates, exactly as documented below, and the k
//      largest keys (neighbour_key: s, then the lower index) are N(i).
//   4. General path, for rows with more than `limit` candidates (crowded similarities:
//      collapsed embeddings, many ties), and for every row when k > limit: s against all
//      B rows as a tiled float64 GEMM (symmetric blocks computed once, serving the rows of
//      both sides) with a running top-k per row (merge_largest). When most rows of the
//      first (small) filter tile take this path, the rest of the batch goes straight to
//      it, without the filter.
//   Direct path, instead of steps 2-4 when B is at most the device's crossover
//      (Kernels::default_direct_max_batch): s against all B rows as a float64 GEMM and
//      each row's k largest keys (neighbour_key): the same lists, without the filter's
//      fixed costs, and without reading anything back to the host. Steps 2-4 read, per
//      modality: the filter bound's two norms (per chunk of rows), the first tile's count
//      of crowded rows (when it is not the whole batch), and the number of rows for step 4
//      (twice when some but not all rows go there). The CPU has its own direct path (a
//      tile of rows at a time, then nth_element per row); on CUDA step 4 for every row
//      serves (symmetric blocks, running top-k).
//   5. Assemble R from the B x k neighbour lists (each sorted by index, so that
//      membership is a binary search): O(B k log k) work, O(B k) memory.
//
// The similarity s[i, j] is the float32 rounding of sum_d row_i[d] * row_j[d] summed in
// float64. Products of float32 values are exact in float64 and the float64 sum's error is
// far below float32's spacing, so s is the exact dot product of the normalised rows
// rounded to float32 (but for rare double roundings), whatever the summation order (a
// GEMM's or a loop's): exact whenever the sum is representable, which keeps exact ties
// tied on every device, thread count and tiling. Near-ties within a float32 ulp may
// resolve differently from a float32 matrix product (the reference's), as any two
// float32 summation orders may.

#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#ifdef __CUDACC__
#define JSA_FAST_HOST_DEVICE __host__ __device__
#else
#define JSA_FAST_HOST_DEVICE
#endif

namespace jsa_fast {
namespace k_reciprocal {

// A row whose filter admits more than max(B / kCandidateShare, kMinCandidateLimit)
// candidates takes the general path: there half a row of GEMM similarities (symmetry)
// costs less than refining them one gathered dot product at a time. The floor keeps
// small batches on the filter: there the general path's fixed costs dominate.
constexpr int64_t kCandidateShare = 8;
constexpr int64_t kMinCandidateLimit = 128;
// The first filter tile holds B / kProbeShare rows; when at least kSkipNumerator /
// kSkipDenominator of them take the general path, the batch's similarities crowd
// together and the other rows skip the filter.
constexpr int64_t kProbeShare = 16;
constexpr int64_t kSkipNumerator = 3;
constexpr int64_t kSkipDenominator = 4;
// The general path's square blocks have at least this side (GEMM efficiency), unless the
// scratch bound says otherwise, and at most a kBlocksPerSide-th of its rows, so that
// symmetry skips most blocks below the diagonal.
constexpr int64_t kMinBlockSide = 512;
constexpr int64_t kBlocksPerSide = 8;
// A row's running top-k meets new keys this many at a time (merge_largest): small enough
// that filling an empty state takes few radix passes, large enough to amortise a chunk's
// barriers on CUDA.
constexpr int64_t kMergeChunk = 256;

// A key that orders neighbours: larger is nearer (a larger similarity, or an equal one
// and a lower index). Distinct rows never share a key; kEmptyKey is below every key.
constexpr uint64_t kEmptyKey = 0;

// What the filter's error bound needs (step 2): s in [v - c |v| - e, v + c |v| + e].
struct FilterBound {
  double error;     // e, absolute
  double rounding;  // c, relative to the tile's value v
};

// The output R: B x B bool entries, or (packed) B x words int32 words, bit b of word w of
// row i being R[i, 32 w + b]; exactly one of the two pointers is set.
struct MaskView {
  bool* entries;
  uint32_t* bits;
  int64_t batch;
  int64_t words;
};

// The device-specific parts of steps 2-5; each function handles one device's tensors.
// Tensors passed as const references may still have their data written, as stated.
struct Kernels {
  // The scratch bound the device gets when JSA_FAST_KRECIPROCAL_SCRATCH_MIB is not set.
  int64_t (*default_scratch_bytes)();
  // Batches of up to this many rows take the direct path instead of steps 2-4 (unless
  // JSA_FAST_KRECIPROCAL_DIRECT_MAX_BATCH says otherwise): every row's exact similarities
  // to all rows and a selection of its k largest keys, the same lists as steps 2-4.
  int64_t default_direct_max_batch;
  // The direct path: rows (B x D normalised float32) -> neighbours (B x k int32, any
  // order), with at most `scratch` bytes of products at a time. Null: step 4 for every
  // row serves instead.
  void (*direct)(const at::Tensor& rows, int64_t k, int64_t scratch, const at::Tensor& neighbours);
  // Step 2's GEMM: filter_rows (B x D bfloat16) rows [start, start + count) against all
  // rows -> count x B bfloat16, float32 sums of the (exact) products rounded once.
  at::Tensor (*filter_tile)(const at::Tensor& filter_rows, int64_t start, int64_t count);
  // Steps 2-3 for the tile's rows i = tile_start + r (tile: T x B bfloat16): writes N(i)
  // to neighbours[i] (B x k int32, any order), or general[i] = 1 (B uint8) for rows with
  // more than `limit` candidates.
  void (*refine)(
      const at::Tensor& tile, const FilterBound& bound, const at::Tensor& rows, int64_t tile_start, int64_t k,
      int64_t limit, const at::Tensor& neighbours, const at::Tensor& general);
  // Step 4's running top-k: for each row r of products (R x C float64 sums, any strides,
  // whose float32 roundings are the similarities s), state[r] (R x k int64 holding uint64
  // keys, kEmptyKey for empty slots) becomes the k largest of itself and the keys of
  // (s[r, c], column_ids[c]) (C int32); floors[r] (R int64) is the smallest key of a full
  // state[r], else kEmptyKey.
  void (*merge)(
      const at::Tensor& products, const at::Tensor& column_ids, const at::Tensor& state, const at::Tensor& floors);
  // Step 5: two B x k int32 lists sorted by index -> R, written into a zeroed mask.
  void (*assemble)(const at::Tensor& img, const at::Tensor& aud, const MaskView& mask);
};

// Steps 1-5 for both modalities on the device whose kernels are given; raises ValueError
// (TORCH_CHECK_VALUE), naming the argument, for inputs the op cannot take (values that are
// not finite only with check_finite: without, their rows count as zero rows).
at::Tensor k_reciprocal_mask(
    const at::Tensor& z_img, const at::Tensor& z_aud, int64_t k, bool packed, bool check_finite,
    const Kernels& kernels);

// ---------------------------------------------------------------------------------------
// Keys and bounds, the same on both devices
// ---------------------------------------------------------------------------------------

// The bits of `value` as a To of the same size (std::bit_cast is C++20).
template <class To, class From>
JSA_FAST_HOST_DEVICE inline To bit_cast(From value) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast needs types of one size");
  To result;
  memcpy(&result, &value, sizeof(To));
  return result;
}

// The bits of a bfloat16 as the float it is.
JSA_FAST_HOST_DEVICE inline float bfloat16_value(uint16_t bits) {
  return bit_cast<float>(static_cast<uint32_t>(bits) << 16);
}

// Unsigned integers in the order of the floats whose bits they map (NaN aside): flip
// every bit of a negative value, only the sign bit of a positive one.
JSA_FAST_HOST_DEVICE inline uint16_t bfloat16_order(uint16_t bits) {
  return (bits & 0x8000u) ? static_cast<uint16_t>(~bits) : static_cast<uint16_t>(bits | 0x8000u);
}

JSA_FAST_HOST_DEVICE inline uint16_t bfloat16_from_order(uint16_t order) {
  return (order & 0x8000u) ? static_cast<uint16_t>(order & 0x7FFFu) : static_cast<uint16_t>(~order);
}

// Exact similarities rank by (value descending, index ascending): the value's order in
// the high half, the index's complement in the low half. -0 counts as +0, so that the two
// tie as values do. Every finite value's key is above kEmptyKey.
JSA_FAST_HOST_DEVICE inline uint64_t neighbour_key(float value, int32_t index) {
  const auto bits = bit_cast<uint32_t>(value == 0.0f ? 0.0f : value);
  const uint32_t order = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  return (static_cast<uint64_t>(order) << 32) | static_cast<uint32_t>(~static_cast<uint32_t>(index));
}

JSA_FAST_HOST_DEVICE inline int32_t key_index(uint64_t key) {
  return static_cast<int32_t>(~static_cast<uint32_t>(key));
}

// The smallest filter value a candidate may have when the row's k-th largest is kth
// (step 2): hi(v) >= lo(kth) with lo(t) = t - c |t| - e and hi(v) = v + c |v| + e,
// solved for v and rounded down to a float. The few float64 roundings here are far
// below the slack in bound.error.
JSA_FAST_HOST_DEVICE inline float candidate_floor(float kth, const FilterBound& bound) {
  const double t = kth;
  const double reach = t - bound.rounding * fabs(t) - 2.0 * bound.error;  // v + c |v| >= reach
  const double floor = reach >= 0.0 ? reach / (1.0 + bound.rounding) : reach / (1.0 - bound.rounding);
  float rounded = static_cast<float>(floor);
  if (static_cast<double>(rounded) > floor) {
    rounded = nextafterf(rounded, -HUGE_VALF);
  }
  return rounded;
}

// ---------------------------------------------------------------------------------------
// Step 5
// ---------------------------------------------------------------------------------------

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
