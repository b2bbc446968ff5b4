// Fused in-place EMA update of momentum parameters: input checks shared with the CUDA
// kernel, the CPU kernel, and the Python bindings of both.
#include "momentum.h"

#include <torch/extension.h>

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <sstream>
#include <string>

#include "registry.h"

// at::parallel_for is inline: with torch's OpenMP backend its `#pragma omp parallel` is
// compiled in this file, and is silently ignored without -fopenmp, which leaves the update
// on one thread (setup.py passes the flag; benchmarks/results/cpu_chunk_sweep.json holds
// the one-thread and all-thread times).
#if AT_PARALLEL_OPENMP && !defined(_OPENMP)
#pragma message("momentum.cpp: compiled without -fopenmp, at::parallel_for runs on one thread")
#endif

// x86-64 builds also carry AVX2 / F16C clones of the CPU loop, chosen at run time.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define COTS_EMA_X86_CLONES 1
#include <immintrin.h>
#endif

namespace cots::momentum {
namespace {

// Names as Python prints them, so the messages read like the Python-side checks'.
std::string dtype_name(at::ScalarType dtype) {
  switch (dtype) {
    case at::kDouble:
      return "torch.float64";
    case at::kFloat:
      return "torch.float32";
    case at::kHalf:
      return "torch.float16";
    case at::kBFloat16:
      return "torch.bfloat16";
    default:
      return std::string("torch.") + c10::toString(dtype);
  }
}

std::string shape_name(at::IntArrayRef sizes) {
  std::ostringstream out;
  out << "(";
  for (size_t d = 0; d < sizes.size(); ++d) {
    out << sizes[d] << (sizes.size() == 1 ? "," : "") << (d + 1 < sizes.size() ? ", " : "");
  }
  out << ")";
  return out.str();
}

bool is_supported(at::ScalarType dtype) {
  return dtype == at::kDouble || dtype == at::kFloat || dtype == at::kHalf ||
      dtype == at::kBFloat16;
}

// float16 and bfloat16 share a width but neither holds the other's values.
int width(at::ScalarType dtype) {
  return dtype == at::kDouble ? 3 : dtype == at::kFloat ? 2 : 1;
}

bool pair_allowed(at::ScalarType momentum_dtype, at::ScalarType online_dtype) {
  return momentum_dtype == online_dtype || width(momentum_dtype) > width(online_dtype);
}

void check_tensor(const at::Tensor& t, const char* name, size_t i) {
  TORCH_CHECK_TYPE(t.defined(), name, "[", i, "] is an undefined tensor");
  TORCH_CHECK_TYPE(
      t.layout() == at::kStrided, name, "[", i, "] must be a strided (dense) tensor, got layout ",
      t.layout());
  TORCH_CHECK_TYPE(
      is_supported(t.scalar_type()), name, "[", i,
      "] must be a floating tensor (float16, bfloat16, float32 or float64), got ",
      dtype_name(t.scalar_type()));
}

DenseGroup& group_for(Plan& plan, at::ScalarType momentum_dtype, at::ScalarType online_dtype) {
  for (auto& group : plan.groups) {
    if (group.momentum_dtype == momentum_dtype && group.online_dtype == online_dtype) {
      return group;
    }
  }
  plan.groups.push_back(DenseGroup{momentum_dtype, online_dtype, {}, {}});
  return plan.groups.back();
}

// Elements per parallel work item: 32768 (128 KiB per fp32 operand) cuts the 195M
// parameters of ViT-B/16 + BERT-base into about 6,000 items, so the static split of
// at::parallel_for stays even across threads, while per-item bookkeeping is negligible.
constexpr int64_t kChunk = 32768;

inline float float_from_bits(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

inline uint32_t bits_from_float(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

// Element conversions between a stored dtype and op-math. The 16-bit formats are handled
// as raw uint16_t with branch-free bit arithmetic (selects are masks, comparisons are on
// values below 2^31 so they are signed, which SSE2 has), so the update loop vectorises:
// c10's conversions do not in a build without F16C/AVX flags (fp16 measured at 2.4 ns
// per element, 5x the memory time it replaces). Each gives c10's bits for every input.
struct Fp32Format {
  using raw = float;
  static float load(float v) { return v; }
  static float store(float v) { return v; }
};

struct Fp64Format {
  using raw = double;
  static double load(double v) { return v; }
  static double store(double v) { return v; }
};

struct Bf16Format {
  using raw = uint16_t;
  static float load(uint16_t v) { return float_from_bits(static_cast<uint32_t>(v) << 16); }
  // Round to nearest even; NaN becomes the quiet NaN 0x7FC0.
  static uint16_t store(float v) {
    const uint32_t bits = bits_from_float(v);
    const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    const uint32_t nan_mask =
        0u - static_cast<uint32_t>(static_cast<int32_t>(bits & 0x7FFFFFFFu) > 0x7F800000);
    return static_cast<uint16_t>((nan_mask & 0x7FC0u) | (~nan_mask & rounded));
  }
};

struct Fp16Format {
  using raw = uint16_t;
  static constexpr float kTwoPow112 = 5.192296858534828e33f;
  static constexpr float kTwoPowMinus110 = 7.703719777548943e-34f;
  // Exponent and mantissa move to fp32 position and are rescaled by 2^112 (127 - 15, the
  // difference of the biases), which also normalises subnormals; inf/NaN keep an
  // all-ones exponent.
  static float load(uint16_t v) {
    const uint32_t h = v;
    const uint32_t sign = (h & 0x8000u) << 16;
    const uint32_t magnitude = (h & 0x7FFFu) << 13;
    const uint32_t finite = bits_from_float(float_from_bits(magnitude) * kTwoPow112);
    const uint32_t special =
        0u - static_cast<uint32_t>(static_cast<int32_t>(magnitude) >= (0x7C00 << 13));
    return float_from_bits(sign | (special & (magnitude | 0x7F800000u)) | (~special & finite));
  }
  // Round to nearest even by one fp32 addition that drops the bits below the fp16 ulp
  // (c10::detail::fp16_ieee_from_fp32_value with its branches as selects); NaN becomes
  // 0x7E00 with its sign.
  static uint16_t store(float v) {
    const uint32_t w = bits_from_float(v);
    const uint32_t sign = w & 0x80000000u;
    const int32_t magnitude = static_cast<int32_t>(w & 0x7FFFFFFFu);
    const uint32_t half_bias =
        static_cast<uint32_t>(std::max(magnitude & 0x7F800000, 0x38800000));
    const float scaled = float_from_bits(w & 0x7FFFFFFFu) * kTwoPow112 * kTwoPowMinus110;
    const uint32_t bits = bits_from_float(float_from_bits(half_bias + 0x07800000u) + scaled);
    const uint32_t nonsign = ((bits >> 13) & 0x7C00u) + (bits & 0x0FFFu);
    const uint32_t nan_mask = 0u - static_cast<uint32_t>(magnitude > 0x7F800000);
    return static_cast<uint16_t>((sign >> 16) | (nan_mask & 0x7E00u) | (~nan_mask & nonsign));
  }
};

template <typename T>
using FormatOf = std::conditional_t<
    std::is_same_v<T, double>, Fp64Format,
    std::conditional_t<
        std::is_same_v<T, float>, Fp32Format,
        std::conditional_t<std::is_same_v<T, at::BFloat16>, Bf16Format, Fp16Format>>>;

template <typename M, typename P>
struct Span {
  typename FormatOf<M>::raw* momentum;
  const typename FormatOf<P>::raw* online;
  int64_t numel;
};

// m <- m * a + p * b over one span, one pass over memory. The product and the sum are
// separate operations (x86-64's baseline has no FMA to contract them into), so fp32
// results equal the naive loop's `p_m * m + p * (1 - m)` bit for bit there.
#define COTS_EMA_SPAN_BODY                                                              \
  using Acc = at::opmath_type<M>;                                                      \
  using MF = FormatOf<M>;                                                              \
  using PF = FormatOf<P>;                                                              \
  auto* __restrict m = span.momentum;                                                  \
  const auto* __restrict p = span.online;                                              \
  for (int64_t i = 0; i < span.numel; ++i) {                                           \
    m[i] = MF::store(static_cast<Acc>(MF::load(m[i])) * a + static_cast<Acc>(PF::load(p[i])) * b); \
  }

template <typename M, typename P>
void ema_span(const Span<M, P>& span, at::opmath_type<M> a, at::opmath_type<M> b) {
  COTS_EMA_SPAN_BODY
}

#ifdef COTS_EMA_X86_CLONES
// The same loop compiled for AVX2 (without FMA, so the results are the same bits), picked
// at run time: 8 lanes instead of SSE2's 4 halve the 16-bit conversion cost (bf16 pairs
// 0.6 -> 0.28 ns per element), which SSE2 leaves above the memory time.
template <typename M, typename P>
__attribute__((target("avx2"))) void ema_span_avx2(
    const Span<M, P>& span, at::opmath_type<M> a, at::opmath_type<M> b) {
  COTS_EMA_SPAN_BODY
}

// fp16 copies: the bit-arithmetic fp16 store vectorises but still costs 0.9 ns per
// element even with AVX2 (3x torch's lerp on the same tensors); F16C converts 8 values
// per instruction with the same round-to-nearest-even (NaN payloads aside).
__attribute__((target("avx2,f16c"))) void ema_span_fp16_f16c(
    const Span<at::Half, at::Half>& span, float a, float b) {
  const __m256 va = _mm256_set1_ps(a);
  const __m256 vb = _mm256_set1_ps(b);
  uint16_t* m = span.momentum;
  const uint16_t* p = span.online;
  int64_t i = 0;
  for (; i + 8 <= span.numel; i += 8) {
    const __m256 mv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(m + i)));
    const __m256 pv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + i)));
    const __m256 r = _mm256_add_ps(_mm256_mul_ps(mv, va), _mm256_mul_ps(pv, vb));
    _mm_storeu_si128(
        reinterpret_cast<__m128i*>(m + i), _mm256_cvtps_ph(r, _MM_FROUND_TO_NEAREST_INT));
  }
  for (; i < span.numel; ++i) {
    m[i] = Fp16Format::store(Fp16Format::load(m[i]) * a + Fp16Format::load(p[i]) * b);
  }
}

template <typename M, typename P>
auto pick_span_kernel() {
  static const bool has_avx2 = __builtin_cpu_supports("avx2");
  if constexpr (std::is_same_v<M, at::Half> && std::is_same_v<P, at::Half>) {
    static const bool has_f16c = has_avx2 && __builtin_cpu_supports("f16c");
    if (has_f16c) {
      return &ema_span_fp16_f16c;
    }
  }
  return has_avx2 ? &ema_span_avx2<M, P> : &ema_span<M, P>;
}
#else
template <typename M, typename P>
auto pick_span_kernel() {
  return &ema_span<M, P>;
}
#endif

#undef COTS_EMA_SPAN_BODY

template <typename M, typename P>
void ema_group_cpu(const DenseGroup& group, double momentum) {
  using Acc = at::opmath_type<M>;
  using MRaw = typename FormatOf<M>::raw;
  using PRaw = typename FormatOf<P>::raw;
  std::vector<Span<M, P>> spans;
  for (size_t k = 0; k < group.momentum.size(); ++k) {
    // c10::Half and c10::BFloat16 are one uint16_t each, read here as their bits.
    MRaw* m = reinterpret_cast<MRaw*>(group.momentum[k].data_ptr<M>());
    const PRaw* p = reinterpret_cast<const PRaw*>(group.online[k].const_data_ptr<P>());
    const int64_t numel = group.momentum[k].numel();
    for (int64_t start = 0; start < numel; start += kChunk) {
      spans.push_back(Span<M, P>{m + start, p + start, std::min(kChunk, numel - start)});
    }
  }
  const Acc a = static_cast<Acc>(momentum);
  const Acc b = static_cast<Acc>(1.0 - momentum);
  const auto kernel = pick_span_kernel<M, P>();
  at::parallel_for(0, static_cast<int64_t>(spans.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      kernel(spans[s], a, b);
    }
  });
}

void momentum_update_cpu(
    const std::vector<at::Tensor>& momentum_params,
    const std::vector<at::Tensor>& online_params,
    double momentum) {
  const Plan plan = plan_update(momentum_params, online_params, momentum, c10::DeviceType::CPU);
  mark_written(plan);
  for (const auto& group : plan.groups) {
    dispatch_pair(group.momentum_dtype, group.online_dtype, [&](auto momentum_tag, auto online_tag) {
      using M = typename decltype(momentum_tag)::type;
      using P = typename decltype(online_tag)::type;
      ema_group_cpu<M, P>(group, momentum);
    });
  }
  update_strided(plan, momentum);
}

}  // namespace

Plan plan_update(
    const std::vector<at::Tensor>& momentum_params,
    const std::vector<at::Tensor>& online_params,
    double momentum,
    c10::DeviceType device_type) {
  TORCH_CHECK_VALUE(
      momentum_params.size() == online_params.size(),
      "momentum_params and online_params must have the same length, got ",
      momentum_params.size(), " and ", online_params.size());
  TORCH_CHECK_VALUE(
      std::isfinite(momentum) && momentum >= 0.0 && momentum <= 1.0,
      "momentum must be in [0, 1], got ", momentum);
  Plan plan;
  if (momentum_params.empty()) {
    return plan;
  }
  check_tensor(momentum_params[0], "momentum_params", 0);
  plan.device = momentum_params[0].device();
  TORCH_CHECK_VALUE(
      plan.device.type() == device_type, "momentum_params[0] is on ", plan.device,
      " but this kernel runs on ", c10::DeviceTypeName(device_type, /*lower_case=*/true),
      " tensors");
  for (size_t i = 0; i < momentum_params.size(); ++i) {
    const at::Tensor& m = momentum_params[i];
    const at::Tensor& p = online_params[i];
    check_tensor(m, "momentum_params", i);
    check_tensor(p, "online_params", i);
    TORCH_CHECK_VALUE(
        m.device() == plan.device, "momentum_params[", i, "] is on ", m.device(),
        " but momentum_params[0] is on ", plan.device);
    TORCH_CHECK_VALUE(
        p.device() == plan.device, "online_params[", i, "] is on ", p.device(),
        " but momentum_params[0] is on ", plan.device);
    TORCH_CHECK_VALUE(
        m.sizes() == p.sizes(), "momentum_params[", i, "] has shape ", shape_name(m.sizes()),
        " but online_params[", i, "] has shape ", shape_name(p.sizes()));
    TORCH_CHECK_TYPE(
        pair_allowed(m.scalar_type(), p.scalar_type()), "momentum_params[", i, "] is ",
        dtype_name(m.scalar_type()), " but online_params[", i, "] is ",
        dtype_name(p.scalar_type()),
        ": the momentum copy must have the online dtype or a wider one");
    if (m.numel() == 0) {
      continue;
    }
    if (m.is_non_overlapping_and_dense() && p.is_non_overlapping_and_dense() &&
        m.strides() == p.strides()) {
      DenseGroup& group = group_for(plan, m.scalar_type(), p.scalar_type());
      group.momentum.push_back(m);
      group.online.push_back(p);
    } else {
      plan.strided.emplace_back(m, p);
    }
  }
  return plan;
}

void mark_written(const Plan& plan) {
  for (const auto& group : plan.groups) {
    for (const auto& m : group.momentum) {
      m.unsafeGetTensorImpl()->bump_version();
    }
  }
}

void update_strided(const Plan& plan, double momentum) {
  const at::NoGradGuard no_grad;
  for (const auto& [m, p] : plan.strided) {
    // In the op-math type, one rounding to the copy's dtype at the end, as the kernels.
    const auto acc = m.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    m.copy_(m.to(acc) * momentum + p.to(acc) * (1.0 - momentum));
  }
}

}  // namespace cots::momentum

namespace cots {

void register_momentum(pybind11::module& m) {
  namespace py = pybind11;
  m.def(
      "momentum_update_cpu", &momentum::momentum_update_cpu,
      "In place on CPU tensors: momentum_params[i] = momentum * momentum_params[i] + "
      "(1 - momentum) * online_params[i]",
      py::arg("momentum_params"), py::arg("online_params"), py::arg("momentum"),
      py::call_guard<py::gil_scoped_release>());
#ifdef COTS_WITH_CUDA
  m.def(
      "momentum_update_cuda", &momentum::momentum_update_cuda,
      "In place on CUDA tensors, one launch per dtype pair on the current stream: "
      "momentum_params[i] = momentum * momentum_params[i] + (1 - momentum) * online_params[i]",
      py::arg("momentum_params"), py::arg("online_params"), py::arg("momentum"),
      py::call_guard<py::gil_scoped_release>());
#endif
}

}  // namespace cots
