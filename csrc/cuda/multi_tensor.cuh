// Multi-tensor launches over lists of same-shaped tensor pairs, in the apex style: the
// tensors are cut into fixed-size chunks and each thread block handles one chunk, found
// through a table. Unlike apex, which passes the table as a kernel argument (4 KiB, about
// 110 tensors and 320 blocks per launch, so ~10 launches for ViT-B/16 + BERT-base), the
// table lives in device memory, filled by one pinned host-to-device copy on the current
// stream, so one launch covers any number of tensors.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace cots::multi_tensor {

// Layout of the int64 table for T tensor pairs cut into C chunks:
//   [0, T)         address of the first tensor of pair t
//   [T, 2T)        address of the second tensor of pair t
//   [2T, 3T)       numel of pair t
//   [3T, 3T + C)   chunk c: (t << 32) | (index of the chunk within pair t)
struct ChunkTable {
  at::Tensor table;      // on the device, int64
  int64_t num_tensors;   // T
  int64_t num_chunks;    // C
};

// Builds and uploads the table for pairs (first[t], second[t]) of equal numel, cut into
// chunks of `chunk` elements. Empty when no pair has elements.
inline ChunkTable make_chunk_table(
    const std::vector<at::Tensor>& first,
    const std::vector<at::Tensor>& second,
    int64_t chunk,
    const c10::Device& device) {
  const int64_t num_tensors = static_cast<int64_t>(first.size());
  int64_t num_chunks = 0;
  for (const auto& t : first) {
    num_chunks += (t.numel() + chunk - 1) / chunk;
  }
  TORCH_CHECK(num_tensors < (int64_t{1} << 31), "multi-tensor launch: too many tensors");
  // Pinned so the upload is an asynchronous copy on the current stream; the caching host
  // allocator keeps the block alive until that copy has completed.
  at::Tensor host = at::empty(
      {3 * num_tensors + num_chunks}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* h = host.data_ptr<int64_t>();
  int64_t* chunk_entry = h + 3 * num_tensors;
  for (int64_t t = 0; t < num_tensors; ++t) {
    const int64_t numel = first[t].numel();
    h[t] = reinterpret_cast<int64_t>(first[t].data_ptr());
    h[num_tensors + t] = reinterpret_cast<int64_t>(second[t].data_ptr());
    h[2 * num_tensors + t] = numel;
    const int64_t chunks = (numel + chunk - 1) / chunk;
    TORCH_CHECK(chunks < (int64_t{1} << 32), "multi-tensor launch: tensor too large");
    for (int64_t k = 0; k < chunks; ++k) {
      *chunk_entry++ = (t << 32) | k;
    }
  }
  at::Tensor table = host.to(at::TensorOptions().device(device), /*non_blocking=*/true);
  return ChunkTable{table, num_tensors, num_chunks};
}

#ifdef __CUDACC__

// The chunk a block handles: its two base pointers (already offset to the chunk) and
// its length.
template <typename A, typename B>
struct ChunkView {
  A* first;
  B* second;
  int64_t numel;
};

template <typename A, typename B>
__device__ __forceinline__ ChunkView<A, B> chunk_of_block(
    const int64_t* __restrict__ table, int64_t num_tensors, int64_t chunk) {
  const int64_t entry = table[3 * num_tensors + blockIdx.x];
  const int64_t t = entry >> 32;
  const int64_t start = (entry & 0xFFFFFFFF) * chunk;
  const int64_t numel = table[2 * num_tensors + t];
  return ChunkView<A, B>{
      reinterpret_cast<A*>(table[t]) + start,
      reinterpret_cast<B*>(table[num_tensors + t]) + start,
      numel - start < chunk ? numel - start : chunk};
}

// 16 bytes of T: one LDG.128 / STG.128.
template <typename T>
struct alignas(16) Vec16 {
  static constexpr int kSize = 16 / sizeof(T);
  T val[kSize];
};

// Loads N consecutive values (N * sizeof(T) a multiple of 16, ptr 16-byte aligned) as
// 16-byte vectors and converts them to Acc.
template <int N, typename T, typename Acc>
__device__ __forceinline__ void load_vec(const T* ptr, Acc (&out)[N]) {
  constexpr int kPer = Vec16<T>::kSize;
  static_assert(N % kPer == 0, "a pack must be whole 16-byte vectors");
#pragma unroll
  for (int v = 0; v < N / kPer; ++v) {
    const Vec16<T> raw = reinterpret_cast<const Vec16<T>*>(ptr)[v];
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      out[v * kPer + j] = static_cast<Acc>(raw.val[j]);
    }
  }
}

template <int N, typename T, typename Acc>
__device__ __forceinline__ void store_vec(T* ptr, const Acc (&in)[N]) {
  constexpr int kPer = Vec16<T>::kSize;
  static_assert(N % kPer == 0, "a pack must be whole 16-byte vectors");
#pragma unroll
  for (int v = 0; v < N / kPer; ++v) {
    Vec16<T> raw;
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      raw.val[j] = static_cast<T>(in[v * kPer + j]);
    }
    reinterpret_cast<Vec16<T>*>(ptr)[v] = raw;
  }
}

__device__ __forceinline__ bool is_aligned16(const void* ptr) {
  return (reinterpret_cast<uintptr_t>(ptr) & 15) == 0;
}

#endif  // __CUDACC__

}  // namespace cots::multi_tensor
