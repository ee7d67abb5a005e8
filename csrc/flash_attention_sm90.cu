// Flash-attention forward for Hopper (sm_90a) in CUDA C++: bf16, head dim 128, non-causal, unmasked.
//
//   o[b, s, h] = softmax_j(q[b, s, h] . k[b, j, h] * scale) @ v[b, :, h]       layout [B, L, H, D]
//
// Same numerics as FlashAttention-2/3 and our Triton kernel: QK^T in fp32, online softmax in fp32
// with exp2 and the scale folded into one FMA, P rounded to bf16 before P.V (fp32 accumulate).
//
// Why C++: Triton 3.6 runs QK^T -> wait -> softmax -> PV in lockstep inside a CTA, so the tensor
// cores idle during each softmax (bench/NOTES.md section 10). Here one CTA holds a producer
// warpgroup (TMA loads of K/V tiles into a 2-stage shared-memory ring, mbarrier hand-off) and two
// consumer warpgroups of 64 query rows each. Each consumer issues QK^T of tile j and P.V of tile
// j-1 as asynchronous wgmma groups, then does tile j's softmax while P.V runs (FA3's intra-warpgroup
// overlap); the two consumers also overlap each other.
//
// Shared memory: every tile is stored as two 64-column halves, 128-byte rows, 128B swizzle (what
// the TMA box writes and the wgmma descriptors read). Q 32 KB + 2 stages x (K + V), 44 KB each at
// 176 keys per tile: 208 KB.
//
// Host entry: s2v_flash_attention_sm90(...) (extern "C", loaded with ctypes by
// s2v_fast/kernels/cuda_attention.py, which also builds this file with nvcc on first use).
#include "sm90_common.cuh"

namespace {

constexpr int kHeadDim = 128;
constexpr int kBlockM = 128;  // query rows per CTA (two consumer warpgroups x 64)
// Keys per tile: 176 measured 649-659 TFLOP/s at 79,200 tokens against 626-639 for 128 and
// 647 vs 644 for 192; FA3's ping-pong between the consumers gave 640 vs 649 (bench/NOTES.md
// section 12; the variants are in git history).
constexpr int kBlockN = 176;
constexpr int kStages = 2;
constexpr int kQHalfBytes = kBlockM * 128;           // one 64-column half of Q: rows x 128 B
constexpr int kKVHalfBytes = kBlockN * 128;          // one 64-column half of a K or V tile
constexpr int kQBytes = 2 * kQHalfBytes;
constexpr int kKVBytes = 2 * kKVHalfBytes;
constexpr int kThreads = 384;                        // producer + 2 consumer warpgroups
constexpr int kSmemBytes = kQBytes + 2 * kStages * kKVBytes + 1024 /*align*/ + 256 /*barriers*/;
constexpr int kS = kBlockN / 2;                      // score registers per thread
static_assert(kKVHalfBytes % 1024 == 0, "swizzle atoms need 1024-byte aligned tiles");
// Lazy rescaling (as FlashAttention-4 does): a row keeps its running max until a tile's max exceeds
// it by more than kLazyRescale (log2 units), so P <= 2^kLazyRescale and the 64-register rescale
// of the output is skipped whenever no row of a warp moved, i.e. on nearly every tile after the
// first. The result is the same softmax (numerator and row sum share the stale max). Measured +1-2%
// over rescaling every tile (bench/NOTES.md section 15). -DS2V_LAZY_RESCALE=0 turns it off.
#ifndef S2V_LAZY_RESCALE
#define S2V_LAZY_RESCALE 8
#endif
constexpr float kLazyRescale = S2V_LAZY_RESCALE;

// D[64x176] (+)= A[64x16] * B[16x176]; A and B from shared memory (descriptors), both K-major.
__device__ __forceinline__ void wgmma_m64n176k16_ss(float (&d)[88], uint64_t desc_a, uint64_t desc_b,
                                                    int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %90, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n176k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87}, %88, %89, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87])
      : "l"(desc_a), "l"(desc_b), "r"(accumulate));
}

// D[64x128] += A[64x16] * B[16x128]; A from registers (bf16 pairs), B from shared memory, MN-major.
__device__ __forceinline__ void wgmma_m64n128k16_rs_tb(float (&d)[64], const uint32_t (&a)[4],
                                                       uint64_t desc_b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// ---------------------------------------------------------------- the kernel
struct Params : OutParams {
  float scale_log2;  // softmax scale * log2(e)
};

// Online-softmax step on one 64x128 score tile held as the wgmma accumulator fragment: thread
// (warp w, lane t) holds rows 16w + t/4 (s[4i], s[4i+1]) and 16w + t/4 + 8 (s[4i+2], s[4i+3]) at
// columns 8i + 2(t%4) + {0,1}. Overwrites s with exp2(s*scale - m) and returns the rescale factor
// of the running output in alpha.
template <bool kMaskTail>
__device__ __forceinline__ void softmax_step(float (&s)[kS], float (&m)[2], float (&l)[2],
                                             float (&alpha)[2], int valid_cols, float scale_log2) {
  const int lane = threadIdx.x & 31;
  if (kMaskTail) {
#pragma unroll
    for (int i = 0; i < kBlockN / 8; ++i) {
      const int col = 8 * i + 2 * (lane & 3);
      if (col >= valid_cols) { s[4 * i] = -INFINITY; s[4 * i + 2] = -INFINITY; }
      if (col + 1 >= valid_cols) { s[4 * i + 1] = -INFINITY; s[4 * i + 3] = -INFINITY; }
    }
  }
  float mx0 = m[0], mx1 = m[1];
#pragma unroll
  for (int i = 0; i < kBlockN / 8; ++i) {
    mx0 = fmaxf(mx0, fmaxf(s[4 * i], s[4 * i + 1]));
    mx1 = fmaxf(mx1, fmaxf(s[4 * i + 2], s[4 * i + 3]));
  }
  quad_max2(mx0, mx1);
  if (kLazyRescale > 0.f) {  // keep the old max unless exceeded by more than kLazyRescale
    if ((mx0 - m[0]) * scale_log2 <= kLazyRescale) mx0 = m[0];  // -> alpha = exp2(0) = 1
    if ((mx1 - m[1]) * scale_log2 <= kLazyRescale) mx1 = m[1];
  }
  alpha[0] = exp2f((m[0] - mx0) * scale_log2);
  alpha[1] = exp2f((m[1] - mx1) * scale_log2);
  m[0] = mx0;
  m[1] = mx1;
  const float ms0 = mx0 * scale_log2, ms1 = mx1 * scale_log2;
  float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
  for (int i = 0; i < kBlockN / 8; ++i) {
    s[4 * i] = exp2f(fmaf(s[4 * i], scale_log2, -ms0));
    s[4 * i + 1] = exp2f(fmaf(s[4 * i + 1], scale_log2, -ms0));
    s[4 * i + 2] = exp2f(fmaf(s[4 * i + 2], scale_log2, -ms1));
    s[4 * i + 3] = exp2f(fmaf(s[4 * i + 3], scale_log2, -ms1));
    sum0 += s[4 * i] + s[4 * i + 1];
    sum1 += s[4 * i + 2] + s[4 * i + 3];
  }
  l[0] = l[0] * alpha[0] + sum0;  // per-thread partial row sums; reduced over the quad at the end
  l[1] = l[1] * alpha[1] + sum1;
}

// The accumulator fragment of S is, two columns at a time, the A-operand fragment of P.V
// (k-step kk covers keys 16kk..16kk+15): no shuffles.
__device__ __forceinline__ void scores_to_p(const float (&s)[kS], uint32_t (&p)[kBlockN / 16][4]) {
#pragma unroll
  for (int kk = 0; kk < kBlockN / 16; ++kk) {
    p[kk][0] = pack_bf16(s[8 * kk + 0], s[8 * kk + 1]);
    p[kk][1] = pack_bf16(s[8 * kk + 2], s[8 * kk + 3]);
    p[kk][2] = pack_bf16(s[8 * kk + 4], s[8 * kk + 5]);
    p[kk][3] = pack_bf16(s[8 * kk + 6], s[8 * kk + 7]);
  }
}

__global__ void __launch_bounds__(kThreads, 1)
    flash_fwd_sm90(const __grid_constant__ CUtensorMap q_map,
                   const __grid_constant__ CUtensorMap k_map,
                   const __grid_constant__ CUtensorMap v_map, const Params prm) {
  extern __shared__ uint8_t smem_raw[];
  const uint32_t base = (smem_addr(smem_raw) + 1023) & ~1023u;
  const uint32_t q_smem = base;
  const uint32_t k_smem = base + kQBytes;                    // + stage * kKVBytes
  const uint32_t v_smem = k_smem + kStages * kKVBytes;
  const KVBarriers<kStages> bar{v_smem + kStages * kKVBytes};

  const int m_block = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int n_tiles = (prm.lk + kBlockN - 1) / kBlockN;
  const int warpgroup = threadIdx.x / 128;

  if (threadIdx.x == 0) bar.init();
  __syncthreads();

  if (warpgroup == 0) {  // ------------------------------------------------ producer
    asm volatile("setmaxnreg.dec.sync.aligned.u32 24;");
    if (threadIdx.x == 0) {
      mbar_expect_tx(bar.q(), kQBytes);
      tma_load(q_smem, &q_map, bar.q(), 0, h, m_block * kBlockM, b);
      tma_load(q_smem + kQHalfBytes, &q_map, bar.q(), 64, h, m_block * kBlockM, b);
      for (int j = 0; j < n_tiles; ++j) {
        const int s = j % kStages;
        const uint32_t phase = (j / kStages) & 1;
        mbar_wait(bar.k_empty(s), phase ^ 1);
        mbar_expect_tx(bar.k_full(s), kKVBytes);
        tma_load(k_smem + s * kKVBytes, &k_map, bar.k_full(s), 0, h, j * kBlockN, b);
        tma_load(k_smem + s * kKVBytes + kKVHalfBytes, &k_map, bar.k_full(s), 64, h, j * kBlockN, b);
        mbar_wait(bar.v_empty(s), phase ^ 1);
        mbar_expect_tx(bar.v_full(s), kKVBytes);
        tma_load(v_smem + s * kKVBytes, &v_map, bar.v_full(s), 0, h, j * kBlockN, b);
        tma_load(v_smem + s * kKVBytes + kKVHalfBytes, &v_map, bar.v_full(s), 64, h, j * kBlockN, b);
      }
    }
    return;
  }
  // ------------------------------------------------------------------------ consumers
  asm volatile("setmaxnreg.inc.sync.aligned.u32 240;");
  const int row0 = (warpgroup - 1) * 64;  // this warpgroup's first row inside the CTA tile
  const float scale_log2 = prm.scale_log2;
  const int tail_cols = prm.lk - (n_tiles - 1) * kBlockN;  // valid keys in the last tile

  float o[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) o[i] = 0.f;
  float s[kS];
  uint32_t p[kBlockN / 16][4];
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f}, alpha[2];

  auto issue_qk = [&](int stage) {
    const uint32_t kb = k_smem + stage * kKVBytes;
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 8; ++kk) {  // head dim in steps of 16: 4 per 64-column half
      const uint32_t off = (kk % 4) * 32;
      wgmma_m64n176k16_ss(s, gmma_desc(q_smem + (kk / 4) * kQHalfBytes + row0 * 128 + off, 16, 1024),
                          gmma_desc(kb + (kk / 4) * kKVHalfBytes + off, 16, 1024), kk > 0);
    }
    wgmma_commit();
  };
  auto issue_pv = [&](int stage) {
    const uint32_t vb = v_smem + stage * kKVBytes;
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk)  // keys in steps of 16
      wgmma_m64n128k16_rs_tb(o, p[kk], gmma_desc(vb + kk * 16 * 128, kKVHalfBytes, 1024));
    wgmma_commit();
  };

  mbar_wait(bar.q(), 0);
  mbar_wait(bar.k_full(0), 0);
  issue_qk(0);
  wgmma_wait<0>();
  reg_fence(s);
  mbar_arrive(bar.k_empty(0));
  if (n_tiles == 1 && tail_cols < kBlockN)
    softmax_step<true>(s, m, l, alpha, tail_cols, scale_log2);
  else
    softmax_step<false>(s, m, l, alpha, kBlockN, scale_log2);
  scores_to_p(s, p);

  for (int j = 1; j < n_tiles; ++j) {
    const int sk = j % kStages, sv = (j - 1) % kStages;
    mbar_wait(bar.k_full(sk), (j / kStages) & 1);
    mbar_wait(bar.v_full(sv), ((j - 1) / kStages) & 1);
    issue_qk(sk);
    issue_pv(sv);
    wgmma_wait<1>();  // S_j is ready; P_{j-1}.V_{j-1} may still run
    reg_fence(s);
    mbar_arrive(bar.k_empty(sk));
    if (j == n_tiles - 1 && tail_cols < kBlockN)
      softmax_step<true>(s, m, l, alpha, tail_cols, scale_log2);
    else
      softmax_step<false>(s, m, l, alpha, kBlockN, scale_log2);
    wgmma_wait<0>();
    reg_fence(o);
    mbar_arrive(bar.v_empty(sv));
    if (kLazyRescale == 0.f || __any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) {
#pragma unroll
      for (int i = 0; i < 16; ++i) {
        o[4 * i] *= alpha[0];
        o[4 * i + 1] *= alpha[0];
        o[4 * i + 2] *= alpha[1];
        o[4 * i + 3] *= alpha[1];
      }
    }
    scores_to_p(s, p);
  }
  {
    const int sv = (n_tiles - 1) % kStages;
    mbar_wait(bar.v_full(sv), ((n_tiles - 1) / kStages) & 1);
    issue_pv(sv);
    wgmma_wait<0>();
    reg_fence(o);
    mbar_arrive(bar.v_empty(sv));
  }

  // ---- epilogue: normalise and store (rows past Lq are not written)
  quad_sum2(l[0], l[1]);
  const float inv0 = 1.f / l[0], inv1 = 1.f / l[1];
  const int lane = threadIdx.x & 31, warp = (threadIdx.x / 32) & 3;
  const int r = m_block * kBlockM + row0 + warp * 16 + lane / 4;
  __nv_bfloat16* out = prm.out + (int64_t)b * prm.o_sb + (int64_t)h * prm.o_sh + 2 * (lane & 3);
  if (r < prm.lq) {
    __nv_bfloat16* row = out + (int64_t)r * prm.o_sl;
#pragma unroll
    for (int i = 0; i < 16; ++i)
      *reinterpret_cast<uint32_t*>(row + 8 * i) = pack_bf16(o[4 * i] * inv0, o[4 * i + 1] * inv0);
  }
  if (r + 8 < prm.lq) {
    __nv_bfloat16* row = out + (int64_t)(r + 8) * prm.o_sl;
#pragma unroll
    for (int i = 0; i < 16; ++i)
      *reinterpret_cast<uint32_t*>(row + 8 * i) =
          pack_bf16(o[4 * i + 2] * inv1, o[4 * i + 3] * inv1);
  }
}

// ---------------------------------------------------------------- host side
// [B, L, H, 128] bf16 with strides in elements (last dim contiguous); box = 64 columns x rows.
int make_map(CUtensorMap* map, const void* ptr, int64_t batch, int64_t len, int64_t heads,
             int64_t sb, int64_t sl, int64_t sh, uint32_t rows) {
  const cuuint64_t dims[4] = {(cuuint64_t)kHeadDim, (cuuint64_t)heads, (cuuint64_t)len,
                              (cuuint64_t)batch};
  const cuuint64_t strides[3] = {(cuuint64_t)sh * 2, (cuuint64_t)sl * 2, (cuuint64_t)sb * 2};
  const cuuint32_t box[4] = {64, 1, rows, 1};
  return encode_tiled(map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 4, ptr, dims, strides, box,
                      CU_TENSOR_MAP_SWIZZLE_128B);
}

}  // namespace

// Returns 0 on success; 1 bad arguments, 2 no cuTensorMapEncodeTiled, 3 tensor-map encoding
// failed (alignment), 4 launch error. Strides are in elements; q/k/v/out last dim contiguous.
extern "C" int s2v_flash_attention_sm90(const void* q, const void* k, const void* v, void* out,
                                        int batch, int lq, int lk, int heads,
                                        const long long* strides /* q,k,v,o x (b,l,h) */,
                                        float scale, void* stream) {
  if (batch <= 0 || lq <= 0 || lk <= 0 || heads <= 0) return 1;
  for (int i = 0; i < 9; ++i)
    if ((strides[i] * 2) % 16 != 0) return 1;
  CUtensorMap qm, km, vm;
  int err = make_map(&qm, q, batch, lq, heads, strides[0], strides[1], strides[2], kBlockM);
  if (!err) err = make_map(&km, k, batch, lk, heads, strides[3], strides[4], strides[5], kBlockN);
  if (!err) err = make_map(&vm, v, batch, lk, heads, strides[6], strides[7], strides[8], kBlockN);
  if (err) return err;
  Params prm;
  static_cast<OutParams&>(prm) = out_params(out, strides + 9, lq, lk, heads);
  prm.scale_log2 = scale * 1.4426950408889634f;
  if (!allow_smem<flash_fwd_sm90>(kSmemBytes)) return 4;
  dim3 grid((lq + kBlockM - 1) / kBlockM, heads, batch);
  flash_fwd_sm90<<<grid, kThreads, kSmemBytes, static_cast<cudaStream_t>(stream)>>>(qm, km, vm, prm);
  return cudaGetLastError() == cudaSuccess ? 0 : 4;
}
