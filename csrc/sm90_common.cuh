// Shared pieces of the sm_90a attention kernels (flash_attention_sm90.cu, fp8_attention_sm90.cu):
// PTX wrappers for mbarriers, TMA loads, wgmma descriptors and fences, the barriers of the K/V
// ring, quad reductions, and the driver's tensor-map encoder. Everything is internal to each
// including translation unit.
#pragma once
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace {

// ---------------------------------------------------------------- PTX wrappers
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void st_shared_u32(uint32_t addr, uint32_t value) {
  asm volatile("st.shared.u32 [%0], %1;" ::"r"(addr), "r"(value) : "memory");
}

// orders this thread's generic-proxy shared-memory writes before later async-proxy reads (wgmma)
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}

__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count));
}

__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes)
               : "memory");
}

__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}

__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n.reg .pred p;\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (!done);
}

// One TMA box (64 columns x rows) of a 4-D [B, L, H, D] tensor map into shared memory.
__device__ __forceinline__ void tma_load(uint32_t dst, const CUtensorMap* map, uint32_t bar, int d0,
                                         int h, int row, int b) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3, %4, %5}], [%6];" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(d0), "r"(h), "r"(row), "r"(b), "r"(bar)
      : "memory");
}

__device__ __forceinline__ void tma_load_3d(uint32_t dst, const CUtensorMap* map, uint32_t bar, int c0,
                                            int c1, int c2) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3, %4}], [%5];" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(bar)
      : "memory");
}

__device__ __forceinline__ void tma_load_2d(uint32_t dst, const CUtensorMap* map, uint32_t bar, int c0,
                                            int c1) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3}], [%4];" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(bar)
      : "memory");
}

// wgmma shared-memory matrix descriptor, 128-byte swizzle (PTX ISA "matrix descriptor format").
__device__ __forceinline__ uint64_t gmma_desc(uint32_t addr, uint32_t lead_bytes,
                                              uint32_t stride_bytes) {
  uint64_t d = (uint64_t)((addr & 0x3FFFF) >> 4);
  d |= (uint64_t)((lead_bytes >> 4) & 0x3FFF) << 16;
  d |= (uint64_t)((stride_bytes >> 4) & 0x3FFF) << 32;
  d |= (uint64_t)1 << 62;
  return d;
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}
// Ties the accumulator registers to the preceding wait so no read moves above it.
template <int N>
__device__ __forceinline__ void reg_fence(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

// The mbarriers of a Q tile and a kStages-deep K/V ring (8 bytes each, from `base`): one producer
// thread fills a stage (expect_tx + TMA), the 256 consumer threads release it.
template <int kStages>
struct KVBarriers {
  uint32_t base;
  __device__ __forceinline__ uint32_t q() const { return base; }
  __device__ __forceinline__ uint32_t k_full(int s) const { return base + 8 * (1 + s); }
  __device__ __forceinline__ uint32_t v_full(int s) const { return base + 8 * (1 + kStages + s); }
  __device__ __forceinline__ uint32_t k_empty(int s) const { return base + 8 * (1 + 2 * kStages + s); }
  __device__ __forceinline__ uint32_t v_empty(int s) const { return base + 8 * (1 + 3 * kStages + s); }
  __device__ __forceinline__ void init() const {  // by one thread, then __syncthreads()
    mbar_init(q(), 1);
    for (int s = 0; s < kStages; ++s) {
      mbar_init(k_full(s), 1);
      mbar_init(v_full(s), 1);
      mbar_init(k_empty(s), 256);
      mbar_init(v_empty(s), 256);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
};

// Max / sum over the 4 lanes of a quad (the threads holding one row of an accumulator fragment),
// for the thread's two rows at once.
__device__ __forceinline__ void quad_max2(float& a, float& b) {
  a = fmaxf(a, __shfl_xor_sync(0xffffffff, a, 1));
  b = fmaxf(b, __shfl_xor_sync(0xffffffff, b, 1));
  a = fmaxf(a, __shfl_xor_sync(0xffffffff, a, 2));
  b = fmaxf(b, __shfl_xor_sync(0xffffffff, b, 2));
}

__device__ __forceinline__ void quad_sum2(float& a, float& b) {
  a += __shfl_xor_sync(0xffffffff, a, 1);
  b += __shfl_xor_sync(0xffffffff, b, 1);
  a += __shfl_xor_sync(0xffffffff, a, 2);
  b += __shfl_xor_sync(0xffffffff, b, 2);
}

// ---------------------------------------------------------------- host side
typedef CUresult (*EncodeTiledFn)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*,
                                  const cuuint64_t*, const cuuint64_t*, const cuuint32_t*,
                                  const cuuint32_t*, CUtensorMapInterleave, CUtensorMapSwizzle,
                                  CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

EncodeTiledFn encode_fn() {
  static EncodeTiledFn fn = nullptr;
  if (fn == nullptr) {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult status;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault,
                                         &status) == cudaSuccess &&
        status == cudaDriverEntryPointSuccess)
      fn = reinterpret_cast<EncodeTiledFn>(ptr);
  }
  return fn;
}

// A tiled tensor map (no interleave, L2 promotion 256 B, out-of-bounds reads as zero).
// Returns 0, 2 (no cuTensorMapEncodeTiled in the driver) or 3 (encoding refused: alignment).
int encode_tiled(CUtensorMap* map, CUtensorMapDataType type, int rank, const void* ptr,
                 const cuuint64_t* dims, const cuuint64_t* strides, const cuuint32_t* box,
                 CUtensorMapSwizzle swizzle) {
  EncodeTiledFn fn = encode_fn();
  if (fn == nullptr) return 2;
  const cuuint32_t elem[5] = {1, 1, 1, 1, 1};
  CUresult r = fn(map, type, rank, const_cast<void*>(ptr), dims, strides, box, elem,
                  CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                  CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? 0 : 3;
}

// The output view every kernel takes (bf16 [B, Lq, H, 128], strides in elements) and the sizes;
// each kernel's Params derives from it.
struct OutParams {
  __nv_bfloat16* out;
  int64_t o_sb, o_sl, o_sh;
  int lq, lk, heads;
};

inline OutParams out_params(void* out, const long long* o_strides, int lq, int lk, int heads) {
  return OutParams{static_cast<__nv_bfloat16*>(out), o_strides[0], o_strides[1], o_strides[2],
                   lq, lk, heads};
}

// Lets kKernel use `bytes` of dynamic shared memory; set once per kernel (instantiation).
template <auto kKernel>
bool allow_smem(int bytes) {
  static bool done = false;
  if (!done)
    done = cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes) ==
           cudaSuccess;
  return done;
}

}  // namespace
