// TMA tensor copies (sm90a) of K and V tiles (the backward: Q and dO) into 128-byte swizzled shared
// memory, shared by the Hopper kernels: one thread issues cp.async.bulk.tensor for a whole 128-byte
// column block of a tile's rows, the swizzle applied on the way, completing on an mbarrier that
// counts its bytes.
//
// K and V are described to the copy engine as 4-d tensors (head_dim, rows, heads_kv, units): a unit
// is a page (paged KV) or a cache batch row; rows past a unit's end read zero.
#pragma once

#include <algorithm>
#include <type_traits>

#include <cuda_fp16.h>
#include <cuda.h>  // CUtensorMap and cuTensorMapEncodeTiled's types (the function comes from the runtime)
#include <cuda_runtime.h>

#include "flash_params.h"

namespace flash {
namespace cuda {
namespace detail {

// K and V maps; a box is 128 bytes of columns x box_rows key rows (a page's worth where pages are
// shorter than the tile, so that a box never crosses a page).
struct KvTmaMaps {
  CUtensorMap k, v;
  int box_rows;
};

__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
// The box of `map` at coordinates (c0, c1, c2, c3) into shared `dst` (1024-byte aligned for the
// 128-byte swizzle); its bytes count down the barrier's expected bytes. Out-of-bound elements read zero.
__device__ __forceinline__ void tma_load_4d(uint32_t dst, const CUtensorMap* map, int c0, int c1, int c2, int c3,
                                            uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], "
      "[%6];\n" ::"r"(dst),
      "l"(map), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar)
      : "memory");
}
// Makes mbarrier initializations visible to the copy engine (the async proxy).
__device__ __forceinline__ void fence_mbar_init() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }

// The driver's tensor-map encoder, looked up once through the runtime (no link to libcuda); null
// where the driver lacks it.
using TmaEncodeFn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                 const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                 CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);
inline TmaEncodeFn tma_encoder() {
  static const TmaEncodeFn encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found) !=
            cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      (void)cudaGetLastError();
      return static_cast<TmaEncodeFn>(nullptr);
    }
    return reinterpret_cast<TmaEncodeFn>(fn);
  }();
  return encode;
}

// A 4-d tensor of T (dims innermost first, strides of dims 1..3 in elements) read in boxes of
// 128 bytes x box_rows (x box_dim2) in the 128-byte swizzle, the box's rows of dims 1 and 2 landing
// as consecutive 128-byte rows; false where the encoder is missing or refuses it (addresses or
// strides not multiples of 16 bytes).
template <typename T>
bool encode_tma_4d(CUtensorMap& map, const void* base, const cuuint64_t (&dims)[4], const int64_t (&strides)[3],
                   int box_rows, int box_dim2 = 1) {
  const TmaEncodeFn encode = tma_encoder();
  if (encode == nullptr) return false;
  const cuuint64_t bytes[3] = {static_cast<cuuint64_t>(strides[0]) * sizeof(T), static_cast<cuuint64_t>(strides[1]) * sizeof(T),
                               static_cast<cuuint64_t>(strides[2]) * sizeof(T)};
  const cuuint32_t box[4] = {static_cast<cuuint32_t>(128 / sizeof(T)), static_cast<cuuint32_t>(box_rows),
                             static_cast<cuuint32_t>(box_dim2), 1};
  const cuuint32_t steps[4] = {1, 1, 1, 1};
  const CUtensorMapDataType type = sizeof(T) == 1                      ? CU_TENSOR_MAP_DATA_TYPE_UINT8
                                   : std::is_same<T, __half>::value ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16
                                                                     : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  return encode(&map, type, 4, const_cast<void*>(base), dims, bytes, box, steps, CU_TENSOR_MAP_INTERLEAVE_NONE,
                CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// The tensor maps of K and V for tiles of `tile_rows` keys (K alone where with_v is false), or false
// where they cannot be made (the caller then copies otherwise).
template <typename T>
bool encode_kv_tma_maps(const FlashFwdParams& p, int tile_rows, KvTmaMaps& maps, bool with_v = true) {
  const bool paged = p.block_table != nullptr;
  maps.box_rows = paged ? std::min(tile_rows, p.page_size) : tile_rows;
  // Rows of a unit: a page or a cache batch row; units: pages or cache rows (neither count is in
  // the params: the largest extent, never reached by a coordinate).
  constexpr cuuint64_t kMany = (1ull << 31) - 1;
  const cuuint64_t dims[4] = {static_cast<cuuint64_t>(p.head_dim), static_cast<cuuint64_t>(paged ? p.page_size : p.seqlen_k),
                              static_cast<cuuint64_t>(p.heads_kv), kMany};
  // (A unit stride of 0, a cache of one batch row, is never stepped: any multiple of 16 bytes will do.)
  auto make = [&](CUtensorMap& map, const void* base, int64_t batch_stride, int64_t row_stride, int64_t head_stride) {
    const int64_t strides[3] = {row_stride, head_stride, batch_stride > 0 ? batch_stride : row_stride};
    return encode_tma_4d<T>(map, base, dims, strides, maps.box_rows);
  };
  return make(maps.k, p.k, p.k_batch_stride, p.k_row_stride, p.k_head_stride) &&
         (!with_v || make(maps.v, p.v, p.v_batch_stride, p.v_row_stride, p.v_head_stride));
}

}  // namespace detail
}  // namespace cuda
}  // namespace flash
