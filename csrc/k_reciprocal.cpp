// k-reciprocal false-negative masks (paper eq. 12-13), the CPU kernel of jsa_fast._C.
//
// torch.ops.jsa_fast.k_reciprocal_mask(z_img: B x D, z_aud: B x D, k) -> B x B bool
// R = N^v & N^v^T & N^a & N^a^T with the diagonal cleared, N^m[i, j] = (j is one of the
// k rows most cosine-similar to row i, self included, ties to the lower index); the
// same result as jsa_fast.reference.k_reciprocal_mask.
//
// Memory: the two B x B bool neighbour relations, a float64 copy of the B x D rows and
// B floats per thread; the B x B similarity matrix is never formed.

#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

// AVX2 and AVX-512 clones of the similarity loop, picked when the library loads.
#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#define JSA_FAST_TARGET_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define JSA_FAST_TARGET_CLONES
#endif

namespace jsa_fast {
namespace {

// Work units (multiply-adds or mask entries) each thread gets at least: below this,
// waking threads costs more than it saves.
constexpr int64_t kMinWorkPerThread = int64_t{1} << 15;

// Raises ValueError (TORCH_CHECK_VALUE), naming the argument, for inputs the op cannot
// take. The data-dependent finiteness check lives in the kernel.
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
}

// F.normalize(z.float(), dim=1) through the very ATen calls it makes, so the rows are
// the reference's rows bit for bit. Returns a contiguous B x D float32 tensor.
at::Tensor normalized_rows(const at::Tensor& z, const char* name) {
  const at::Tensor rows = z.to(at::kFloat);
  // Checked after the cast: a finite float64 beyond float32's range becomes inf here.
  TORCH_CHECK_VALUE(at::isfinite(rows).all().item<bool>(), name, " holds values that are not finite in float32");
  const at::Tensor norms = at::linalg_vector_norm(rows, 2, {1}, /*keepdim=*/true).clamp_min(1e-12);
  return (rows / norms).contiguous();
}

// The similarities of one row to all B rows. Rows arrive as float64 copies of the
// normalised float32 rows (an exact conversion): products of float32 values are exact
// in float64 and the float64 sum's rounding is far below float32's, so each result is
// the exact dot product rounded to float32 (but for rare double roundings) on any
// machine and thread count, and exact whenever the partial sums are representable,
// which keeps ties ties. Fixed lanes fix the order of additions (without -ffast-math
// the compiler may not reorder them) and still vectorise; as the products are exact,
// fused and separate multiply-adds agree, so every instruction set gives the same bits.
JSA_FAST_TARGET_CLONES
void similarities_to_row(const double* row, const double* rows, int64_t batch, int64_t width, float* out) {
  constexpr int64_t kLanes = 8;
  for (int64_t j = 0; j < batch; ++j) {
    const double* other = rows + j * width;
    double lane_sums[kLanes] = {};
    int64_t d = 0;
    for (; d + kLanes <= width; d += kLanes) {
      for (int64_t lane = 0; lane < kLanes; ++lane) {
        lane_sums[lane] += row[d + lane] * other[d + lane];
      }
    }
    for (; d < width; ++d) {
      lane_sums[d % kLanes] += row[d] * other[d];
    }
    double sum = 0.0;
    for (const double lane_sum : lane_sums) {
      sum += lane_sum;
    }
    out[j] = static_cast<float>(sum);
  }
}

// rows: B x D normalised float32 (contiguous) -> B x B bool, row i marking the k rows
// most similar to row i (by value descending, then index ascending).
at::Tensor k_nearest(const at::Tensor& rows, int64_t k) {
  const int64_t batch = rows.size(0);
  const int64_t width = rows.size(1);
  const at::Tensor wide_rows = rows.to(at::kDouble);
  const double* data = wide_rows.const_data_ptr<double>();
  at::Tensor neighbours = at::zeros({batch, batch}, at::kBool);
  bool* relation = neighbours.mutable_data_ptr<bool>();
  // One row costs B * D multiply-adds.
  const int64_t grain = std::max<int64_t>(1, kMinWorkPerThread / (batch * width));
  at::parallel_for(0, batch, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> similarity(batch);
    std::vector<int64_t> order(batch);
    for (int64_t i = begin; i < end; ++i) {
      similarities_to_row(data + i * width, data, batch, width, similarity.data());
      std::iota(order.begin(), order.end(), int64_t{0});
      // A strict total order (indices are distinct), so the k first are well defined.
      const auto closer = [&similarity](int64_t a, int64_t b) {
        return similarity[a] > similarity[b] || (similarity[a] == similarity[b] && a < b);
      };
      std::nth_element(order.begin(), order.begin() + (k - 1), order.end(), closer);
      bool* relation_row = relation + i * batch;
      for (int64_t rank = 0; rank < k; ++rank) {
        relation_row[order[rank]] = true;
      }
    }
  });
  return neighbours;
}

at::Tensor k_reciprocal_mask_cpu(const at::Tensor& z_img, const at::Tensor& z_aud, int64_t k) {
  check_inputs(z_img, z_aud, k);
  const at::Tensor near_img = k_nearest(normalized_rows(z_img, "z_img"), k);
  const at::Tensor near_aud = k_nearest(normalized_rows(z_aud, "z_aud"), k);
  const int64_t batch = z_img.size(0);
  const bool* img = near_img.const_data_ptr<bool>();
  const bool* aud = near_aud.const_data_ptr<bool>();
  at::Tensor mask = at::empty({batch, batch}, z_img.options().dtype(at::kBool));
  bool* out = mask.mutable_data_ptr<bool>();
  at::parallel_for(0, batch, std::max<int64_t>(1, kMinWorkPerThread / batch), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      for (int64_t j = 0; j < batch; ++j) {
        const int64_t ij = i * batch + j;
        const int64_t ji = j * batch + i;
        out[ij] = i != j && img[ij] && img[ji] && aud[ij] && aud[ji];
      }
    }
  });
  return mask;
}

}  // namespace

TORCH_LIBRARY(jsa_fast, m) {
  // The fake (meta) implementation for torch.compile is registered in Python.
  m.set_python_module("jsa_fast.ops");
  m.def("k_reciprocal_mask(Tensor z_img, Tensor z_aud, int k) -> Tensor");
}

TORCH_LIBRARY_IMPL(jsa_fast, CPU, m) {
  m.impl("k_reciprocal_mask", &k_reciprocal_mask_cpu);
}

}  // namespace jsa_fast

// `import jsa_fast._C` loads this library, which registers the ops above with torch's
// dispatcher; the Python module itself is empty.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
