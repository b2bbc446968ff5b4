// CUDA kernel of the fused in-place EMA update (see ../momentum.h): one launch per
// dtype pair covers every tensor, through a chunk table in device memory; 16-byte
// vector loads and stores; the current stream of the tensors' device.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <limits>

#include "../momentum.h"
#include "multi_tensor.cuh"

namespace cots::momentum {
namespace {

// Launch shape, provisional until measured on an H100 (benchmarks/gpu/momentum.py).
// The update is pure streaming: 12 B per fp32 parameter, no reuse. Each thread keeps
// kUnroll 16-byte loads of each operand in flight (fp32: 4 x 2 x 16 B = 128 B); at ~80
// registers per thread an SM holds 768 threads, ~96 KiB outstanding, over twice the
// ~40 KiB per SM that Little's law asks for at 3.35 TB/s, ~1.5 us latency and 132 SMs.
constexpr int kThreads = 256;
constexpr int kUnroll = 4;
// 16384 elements per block: the 195M parameters of ViT-B/16 + BERT-base make ~12,000
// blocks, ~30 waves of ~400 resident blocks, so the last partial wave costs a few
// percent; apex's 64K-element chunks would make ~8 waves and up to ~12%.
constexpr int64_t kChunk = 16384;

// m * a + p * b with both products rounded before the sum, as the naive loop's
// `p_m * m + p * (1 - m)` rounds them in PyTorch: the _rn intrinsics keep nvcc from
// contracting a product and the sum into one FMA, so the result is the same bits.
template <typename Acc>
__device__ __forceinline__ Acc ema(Acc m, Acc a, Acc p, Acc b);

template <>
__device__ __forceinline__ float ema<float>(float m, float a, float p, float b) {
  return __fadd_rn(__fmul_rn(m, a), __fmul_rn(p, b));
}

template <>
__device__ __forceinline__ double ema<double>(double m, double a, double p, double b) {
  return __dadd_rn(__dmul_rn(m, a), __dmul_rn(p, b));
}

// m <- m * a + p * b over one chunk.
template <typename M, typename P>
__global__ void __launch_bounds__(kThreads) ema_kernel(
    const int64_t* __restrict__ table,
    int64_t num_tensors,
    at::opmath_type<M> a,
    at::opmath_type<M> b) {
  using Acc = at::opmath_type<M>;
  // Elements per vector step: one 16-byte load of the online tensor (the narrower one;
  // a wider momentum copy takes sizeof(M) / sizeof(P) loads for the same elements).
  constexpr int kVec = 16 / sizeof(P);
  const auto chunk = multi_tensor::chunk_of_block<M, const P>(table, num_tensors, kChunk);
  M* __restrict__ m = chunk.first;
  const P* __restrict__ p = chunk.second;
  const int64_t n = chunk.numel;

  int64_t done = 0;
  // Chunk starts are multiples of kChunk elements, so a chunk is aligned when its
  // tensors are; views at odd offsets take the scalar loop below.
  if (multi_tensor::is_aligned16(m) && multi_tensor::is_aligned16(p)) {
    const int64_t packs = n / kVec;
    for (int64_t base = threadIdx.x; base < packs; base += kThreads * kUnroll) {
      Acc mv[kUnroll][kVec];
      Acc pv[kUnroll][kVec];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t pack = base + u * kThreads;
        if (pack < packs) {
          multi_tensor::load_vec(m + pack * kVec, mv[u]);
          multi_tensor::load_vec(p + pack * kVec, pv[u]);
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t pack = base + u * kThreads;
        if (pack < packs) {
#pragma unroll
          for (int j = 0; j < kVec; ++j) {
            mv[u][j] = ema(mv[u][j], a, pv[u][j], b);
          }
          multi_tensor::store_vec(m + pack * kVec, mv[u]);
        }
      }
    }
    done = packs * kVec;
  }
  for (int64_t i = done + threadIdx.x; i < n; i += kThreads) {
    m[i] = static_cast<M>(ema(static_cast<Acc>(m[i]), a, static_cast<Acc>(p[i]), b));
  }
}

template <typename M, typename P>
void launch_group(const DenseGroup& group, double momentum, const c10::Device& device) {
  using Acc = at::opmath_type<M>;
  const auto chunks = multi_tensor::make_chunk_table(group.momentum, group.online, kChunk, device);
  if (chunks.num_chunks == 0) {
    return;
  }
  TORCH_CHECK(
      chunks.num_chunks <= std::numeric_limits<int32_t>::max(),
      "momentum_update_cuda: ", chunks.num_chunks, " chunks exceed the grid limit");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index());
  ema_kernel<M, P><<<static_cast<unsigned int>(chunks.num_chunks), kThreads, 0, stream>>>(
      chunks.table.data_ptr<int64_t>(), chunks.num_tensors, static_cast<Acc>(momentum),
      static_cast<Acc>(1.0 - momentum));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void momentum_update_cuda(
    const std::vector<at::Tensor>& momentum_params,
    const std::vector<at::Tensor>& online_params,
    double momentum) {
  const Plan plan =
      plan_update(momentum_params, online_params, momentum, c10::DeviceType::CUDA);
  if (plan.groups.empty() && plan.strided.empty()) {
    return;
  }
  const c10::cuda::CUDAGuard device_guard(plan.device);
  mark_written(plan);
  for (const auto& group : plan.groups) {
    dispatch_pair(group.momentum_dtype, group.online_dtype, [&](auto momentum_tag, auto online_tag) {
      using M = typename decltype(momentum_tag)::type;
      using P = typename decltype(online_tag)::type;
      launch_group<M, P>(group, momentum, plan.device);
    });
  }
  update_strided(plan, momentum);
}

}  // namespace cots::momentum
