// The fused in-place EMA update of momentum parameters, shared by the CPU kernel
// (momentum.cpp) and the CUDA kernel (cuda/momentum.cu):
//
//     momentum_params[i] = momentum * momentum_params[i] + (1 - momentum) * online_params[i]
//
// computed in the momentum tensor's op-math type (fp32, or fp64 for fp64 copies) with the
// two coefficients rounded to that type first and both products rounded before their sum,
// so an fp32 copy gets the bits of `p_m * m + p * (1 - m)` in PyTorch (docs/momentum.md);
// a 16-bit copy rounds that fp32 result once.
#pragma once

// ATen only, not torch/extension.h: the CUDA source includes this header too, and the
// whole C++ frontend plus pybind11 would double its compile time.
#include <ATen/ATen.h>

#include <type_traits>
#include <utility>
#include <vector>

namespace cots::momentum {

// Tensor pairs of one (momentum dtype, online dtype) combination whose memory the fused
// kernels walk as flat arrays: both non-overlapping and dense with identical strides, so
// element k of one is element k of the other in storage order.
struct DenseGroup {
  at::ScalarType momentum_dtype;
  at::ScalarType online_dtype;
  std::vector<at::Tensor> momentum;
  std::vector<at::Tensor> online;
};

// A validated call: the dense groups, plus the pairs with any other layout (overlapping
// or differently strided views), which go through two ATen ops each.
struct Plan {
  std::vector<DenseGroup> groups;
  std::vector<std::pair<at::Tensor, at::Tensor>> strided;
  // The device all tensors live on (meaningful only when there is at least one pair).
  c10::Device device{c10::kCPU};
};

// Checks every input and groups the pairs; raises ValueError / TypeError (through
// TORCH_CHECK_VALUE / TORCH_CHECK_TYPE) naming the argument and index. `device_type` is
// the device the calling entry point runs on.
Plan plan_update(
    const std::vector<at::Tensor>& momentum_params,
    const std::vector<at::Tensor>& online_params,
    double momentum,
    c10::DeviceType device_type);

// Bumps the version counter of every momentum tensor the fused kernels are about to
// write through a raw pointer (before the write, so a refused bump leaves data intact),
// so autograd still detects a later use of a saved momentum tensor.
void mark_written(const Plan& plan);

// The strided pairs' update through ATen ops, in the op-math type with one rounding to
// the momentum dtype at the end, as the fused kernels compute it (through temporaries;
// such layouts are rare).
void update_strided(const Plan& plan, double momentum);

// Whether the kernels are instantiated for a pair: the momentum copy has the online
// dtype or a wider one (plan_update lets only these through).
template <typename M, typename P>
constexpr bool kPairSupported =
    std::is_same_v<M, P> || std::is_same_v<M, double> ||
    (std::is_same_v<M, float> && !std::is_same_v<P, double>);

template <typename T>
struct Tag {
  using type = T;
};

// Calls f(Tag<momentum_t>{}, Tag<online_t>{}) with the C++ types of a supported pair.
template <typename F>
void dispatch_pair(at::ScalarType momentum_dtype, at::ScalarType online_dtype, F&& f) {
  const auto call = [&](auto momentum_tag, auto online_tag) {
    using M = typename decltype(momentum_tag)::type;
    using P = typename decltype(online_tag)::type;
    if constexpr (kPairSupported<M, P>) {
      f(momentum_tag, online_tag);
    } else {
      TORCH_CHECK(false, "momentum_update_: no kernel for ", momentum_dtype, " <- ", online_dtype);
    }
  };
  const auto with_online = [&](auto momentum_tag) {
    switch (online_dtype) {
      case at::kDouble:
        return call(momentum_tag, Tag<double>{});
      case at::kFloat:
        return call(momentum_tag, Tag<float>{});
      case at::kHalf:
        return call(momentum_tag, Tag<at::Half>{});
      case at::kBFloat16:
        return call(momentum_tag, Tag<at::BFloat16>{});
      default:
        TORCH_CHECK(false, "momentum_update_: unsupported online dtype ", online_dtype);
    }
  };
  switch (momentum_dtype) {
    case at::kDouble:
      return with_online(Tag<double>{});
    case at::kFloat:
      return with_online(Tag<float>{});
    case at::kHalf:
      return with_online(Tag<at::Half>{});
    case at::kBFloat16:
      return with_online(Tag<at::BFloat16>{});
    default:
      TORCH_CHECK(false, "momentum_update_: unsupported momentum dtype ", momentum_dtype);
  }
}

#ifdef COTS_WITH_CUDA
// CUDA entry point (cuda/momentum.cu): one launch per dtype pair on the current stream.
void momentum_update_cuda(
    const std::vector<at::Tensor>& momentum_params,
    const std::vector<at::Tensor>& online_params,
    double momentum);
#endif

}  // namespace cots::momentum
