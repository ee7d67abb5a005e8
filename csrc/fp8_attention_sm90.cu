// FP8 (e4m3) attention forward for Hopper (sm_90a) in CUDA C++: head dim 128, non-causal, unmasked;
// the numerics of s2v_fast/kernels/fp8_attention.py (its torch emulation is the reference).
//
// Inputs come from fp8_attention.quantize_qkv(..., k_perm32=True):
//   q8 [BH, Lq, 128] e4m3, qs [BH, Lq] fp32 (per token; softmax scale * log2 e * k_pow folded in)
//   k8 [BH, Lkp, 128] e4m3 of k - mean_k, Lkp = Lk padded to 32, keys stored permuted inside each
//      group of 32 (see kPermNote below)
//   ks [BH, Lks] fp16 per key (relative to the head's power of two k_pow), Lks = Lk padded to 128,
//      in the order of fp8_attention.ks_cuda_index: thread t of a quad finds the 32 scales of its
//      score columns in 64 contiguous bytes, loaded (four 16-byte loads) while QK^T runs.
//      ks == nullptr (k_scale "channel": K per channel, the channel scales taken on by q): the
//      instantiation kKeyScale = false, which skips the scales' loads and multiplies; on the H100
//      that is 14-21% faster (897 / 890 against 785 / 737 TFLOP/s, bench/NOTES.md section 14)
//   vt [BH, 128, Lp] e4m3 (per channel, keys contiguous, Lp = Lk padded to 16), vs [BH, 128]
//
//   s = (q8 . k8) [* ks[key]];  m = running max of s * qs;  p = e4m3(exp2(s * qs - m + log2 448))
//   o = sum_tiles(alpha-rescaled p . v8) / sum_tiles(alpha-rescaled sum(p)) * vs
//
// The row sums come out of the P.V MMA: it runs with N = 136, the B operand's rows 128..135 being
// e4m3 ones kept in shared memory after each V stage, so accumulator columns 128..135 hold sum(p)
// (of the rounded p: the weights P.V used) and follow o's rescaling for free: the softmax has no
// adds and no quad reduction at the end (+5-6% without per-key scales, bench/NOTES.md section 14).
//
// Structure as flash_attention_sm90.cu: a TMA producer warpgroup, two consumer warpgroups of 64
// query rows, each issuing QK^T of tile j and P.V of tile j-1 as asynchronous wgmma groups and
// doing tile j's softmax while P.V runs. P.V of each tile goes into fresh registers that are added
// to the output in fp32 (the two-level accumulation of SageAttention2 / the Triton kernel's
// max_num_imprecise_acc): accumulated in the wgmma instead, the output was 18.6% / 29.4% off
// fp32 at 32,760 / 79,200 tokens against 2.2% / 1.7% (H100, bench/NOTES.md section 13, where the
// ping-pong and three-stage variants, both slower, are also measured; they are in git history).
//
// kPermNote: the e4m3 A operand of P.V (m64k32) wants thread t of a quad to hold keys 4t..4t+3 and
// 16+4t..16+4t+3 of each 32, while the QK^T accumulator gives it score columns 2t, 2t+1, 8+2t,
// 9+2t (and +16). Storing K's rows (and ks) permuted within each group of 32 -- storage row
// n = 16h + 8c + 2t + b holds key 16h + 4t + 2c + b -- makes the score fragment the P operand
// with no shuffles; V stays in key order.
#include <cuda_fp16.h>

#include <type_traits>

#include "sm90_common.cuh"

namespace {

constexpr int kD = 128;
constexpr int kBM = 128;                 // query rows per CTA
constexpr int kBN = 128;                 // keys per tile
constexpr int kStages8 = 2;
constexpr int kQ8Bytes = kBM * kD;       // 16 KB
constexpr int kK8Bytes = kBN * kD;       // 16 KB
constexpr int kV8Bytes = kD * kBN;       // 16 KB (vt tile: 128 channels x 128 keys)
constexpr int kKsBytes = kBN * 2;        // fp16 key scales of one tile
constexpr int kOnesBytes = 8 * kBN;      // 8 rows of e4m3 ones after each V tile (row sums)
constexpr int kVStage = kV8Bytes + kOnesBytes;
constexpr int kNPV = kD + 8;             // P.V MMA width: 128 channels + 8 ones columns
constexpr int kThreads8 = 384;
constexpr int kSmem8 = kQ8Bytes + kStages8 * (kK8Bytes + kVStage + kKsBytes) + 1024 + 256;
constexpr float kLog2Fp8Max = 8.807354922057604f;  // log2(448)

// D[64x128] (+)= A[64x32] * B[32x128], e4m3 inputs, fp32 accumulate; A and B from shared memory
// (K-major descriptors).
__device__ __forceinline__ void wgmma_e4m3_ss(float (&d)[64], uint64_t desc_a, uint64_t desc_b,
                                              int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "l"(desc_a), "l"(desc_b), "r"(accumulate));
}

// D[64x136] (+)= A[64x32] * B[32x136], e4m3; A from registers (4 x 4 bytes), B from shared memory.
__device__ __forceinline__ void wgmma_e4m3_rs136(float (&d)[68], const uint32_t (&a)[4], uint64_t desc_b,
                                                 int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %73, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n136k32.f32.e4m3.e4m3 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67}, {%68, %69, %70, %71}, %72, p, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate));
}

// four floats -> four e4m3 bytes (round to nearest even, saturating), first in the lowest byte
__device__ __forceinline__ uint32_t pack_e4m3(float x0, float x1, float x2, float x3) {
  uint32_t r;
  asm("{\n.reg .b16 lo, hi;\n"
      "cvt.rn.satfinite.e4m3x2.f32 lo, %2, %1;\n"
      "cvt.rn.satfinite.e4m3x2.f32 hi, %4, %3;\n"
      "mov.b32 %0, {lo, hi};\n}\n"
      : "=r"(r)
      : "f"(x0), "f"(x1), "f"(x2), "f"(x3));
  return r;
}

// storage row n (0..31) of a permuted K group -> key index inside the group
__device__ __forceinline__ int perm32_key(int n) {
  return (n & 0x11) | ((n & 0x6) << 1) | ((n & 0x8) >> 2);
}

struct Params8 : OutParams {
  const float* qs;
  const float* vs;
};

template <bool kKeyScale>
__global__ void __launch_bounds__(kThreads8, 1)
    fp8_fwd_sm90(const __grid_constant__ CUtensorMap q_map, const __grid_constant__ CUtensorMap k_map,
                 const __grid_constant__ CUtensorMap ks_map, const __grid_constant__ CUtensorMap v_map,
                 const Params8 prm) {
  extern __shared__ uint8_t smem_raw[];
  const uint32_t base = (smem_addr(smem_raw) + 1023) & ~1023u;
  const uint32_t q_smem = base;
  const uint32_t k_smem = q_smem + kQ8Bytes;                // + stage * kK8Bytes
  const uint32_t v_smem = k_smem + kStages8 * kK8Bytes;     // + stage * kV8Bytes
  const uint32_t ks_smem = v_smem + kStages8 * kVStage;    // + stage * kKsBytes
  const KVBarriers<kStages8> bar{ks_smem + kStages8 * kKsBytes};
  const uint8_t* ks_generic = smem_raw + (ks_smem - smem_addr(smem_raw));

  const int m_block = blockIdx.x, bh = blockIdx.y;
  const int n_tiles = (prm.lk + kBN - 1) / kBN;
  const int warpgroup = threadIdx.x / 128;

  if (threadIdx.x == 0) bar.init();
  // the ones rows behind each V tile (0x38 = 1.0 in e4m3), made visible to wgmma's async proxy
  for (int i = threadIdx.x; i < kStages8 * kOnesBytes / 4; i += kThreads8) {
    const int stage = i / (kOnesBytes / 4), word = i % (kOnesBytes / 4);
    st_shared_u32(v_smem + stage * kVStage + kV8Bytes + 4 * word, 0x38383838u);
  }
  fence_proxy_async();
  __syncthreads();

  if (warpgroup == 0) {  // ------------------------------------------------ producer
    asm volatile("setmaxnreg.dec.sync.aligned.u32 24;");
    if (threadIdx.x == 0) {
      mbar_expect_tx(bar.q(), kQ8Bytes);
      tma_load_3d(q_smem, &q_map, bar.q(), 0, m_block * kBM, bh);
      for (int j = 0; j < n_tiles; ++j) {
        const int s = j % kStages8;
        const uint32_t phase = (j / kStages8) & 1;
        mbar_wait(bar.k_empty(s), phase ^ 1);
        mbar_expect_tx(bar.k_full(s), kK8Bytes + (kKeyScale ? kKsBytes : 0));
        tma_load_3d(k_smem + s * kK8Bytes, &k_map, bar.k_full(s), 0, j * kBN, bh);
        if constexpr (kKeyScale) tma_load_2d(ks_smem + s * kKsBytes, &ks_map, bar.k_full(s), j * kBN, bh);
        mbar_wait(bar.v_empty(s), phase ^ 1);
        mbar_expect_tx(bar.v_full(s), kV8Bytes);
        tma_load_3d(v_smem + s * kVStage, &v_map, bar.v_full(s), j * kBN, 0, bh);
      }
    }
    return;
  }
  // ------------------------------------------------------------------------ consumers
  asm volatile("setmaxnreg.inc.sync.aligned.u32 240;");
  const int row0 = (warpgroup - 1) * 64;
  const int lane = threadIdx.x & 31, warp = (threadIdx.x / 32) & 3, quad = lane & 3;
  const int r = m_block * kBM + row0 + warp * 16 + lane / 4;  // this thread's rows: r, r + 8
  const float qs0 = r < prm.lq ? prm.qs[(int64_t)bh * prm.lq + r] : 1.f;
  const float qs1 = r + 8 < prm.lq ? prm.qs[(int64_t)bh * prm.lq + r + 8] : 1.f;
  const int tail_keys = prm.lk - (n_tiles - 1) * kBN;

  // o, pv: 128 output channels + the row sums (o[64], o[65]: row r; o[66], o[67]: row r + 8)
  float o[kNPV / 2], pv[kNPV / 2], s[64];
#pragma unroll
  for (int i = 0; i < kNPV / 2; ++i) o[i] = 0.f;
  uint32_t p[4][4];  // P in e4m3: k-step kk (32 keys) x the A fragment's 4 registers
  uint32_t kw[16];   // the tile's key scales of this thread's columns 8i + 2 quad (+1): fp16 x 2
  float m0 = -INFINITY, m1 = -INFINITY, alpha0, alpha1;

  auto issue_qk = [&](int stage) {
    const uint32_t kb = k_smem + stage * kK8Bytes;
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
      wgmma_e4m3_ss(s, gmma_desc(q_smem + row0 * 128 + kk * 32, 16, 1024),
                    gmma_desc(kb + kk * 32, 16, 1024), kk > 0);
    wgmma_commit();
  };
  auto issue_pv = [&](int stage) {
    const uint32_t vb = v_smem + stage * kVStage;
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
      wgmma_e4m3_rs136(pv, p[kk], gmma_desc(vb + kk * 32, 16, 1024), kk > 0);
    wgmma_commit();
  };
  // this thread's key scales of the tile in stage `stage`, issued before the wait for QK^T
  auto load_ks = [&](int stage) {
    if constexpr (kKeyScale) {
      const uint4* src = reinterpret_cast<const uint4*>(ks_generic + stage * kKsBytes + quad * 64);
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const uint4 w = src[c];
        kw[4 * c] = w.x;
        kw[4 * c + 1] = w.y;
        kw[4 * c + 2] = w.z;
        kw[4 * c + 3] = w.w;
      }
    }
  };
  // scores of tile j (in s) -> p = exp2(s [* ks] * qs - m + log2 448) in place; updates m, alpha
  // kMask (a std::bool_constant): mask keys >= valid. Called as if/else on the two instances,
  // like the bf16 kernel, so that each is its own basic block ahead of the P.V wait: in one block
  // with it, ptxas sinks the exponentials below the wait and the overlap is lost (sm_90 SASS).
  auto softmax = [&](auto kMask, int valid) {
    if constexpr (kKeyScale) {
#pragma unroll
      for (int i = 0; i < 16; ++i) {
        const float2 k2 = __half22float2(*reinterpret_cast<const __half2*>(&kw[i]));
        s[4 * i] *= k2.x;
        s[4 * i + 1] *= k2.y;
        s[4 * i + 2] *= k2.x;
        s[4 * i + 3] *= k2.y;
      }
    }
    if constexpr (decltype(kMask)::value) {
#pragma unroll
      for (int i = 0; i < 16; ++i) {
        const int n = 8 * i + 2 * quad;
        const int key0 = (n & ~31) + perm32_key(n & 31), key1 = (n & ~31) + perm32_key((n + 1) & 31);
        if (key0 >= valid) { s[4 * i] = -INFINITY; s[4 * i + 2] = -INFINITY; }
        if (key1 >= valid) { s[4 * i + 1] = -INFINITY; s[4 * i + 3] = -INFINITY; }
      }
    }
    // The max as four independent chains per row: one serial chain of 32 dependent FMNMX per row
    // was the latency that bounded this warp's issue rate.
    float mxa[4], mxb[4];
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      mxa[c] = fmaxf(s[4 * c], s[4 * c + 1]);
      mxb[c] = fmaxf(s[4 * c + 2], s[4 * c + 3]);
    }
#pragma unroll
    for (int i = 4; i < 16; ++i) {
      mxa[i % 4] = fmaxf(mxa[i % 4], fmaxf(s[4 * i], s[4 * i + 1]));
      mxb[i % 4] = fmaxf(mxb[i % 4], fmaxf(s[4 * i + 2], s[4 * i + 3]));
    }
    float mx0 = fmaxf(fmaxf(mxa[0], mxa[1]), fmaxf(mxa[2], mxa[3]));
    float mx1 = fmaxf(fmaxf(mxb[0], mxb[1]), fmaxf(mxb[2], mxb[3]));
    quad_max2(mx0, mx1);
    const float mn0 = fmaxf(m0, mx0 * qs0), mn1 = fmaxf(m1, mx1 * qs1);
    alpha0 = exp2f(m0 - mn0);
    alpha1 = exp2f(m1 - mn1);
    m0 = mn0;
    m1 = mn1;
    const float sh0 = mn0 - kLog2Fp8Max, sh1 = mn1 - kLog2Fp8Max;
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      s[4 * i] = exp2f(fmaf(s[4 * i], qs0, -sh0));
      s[4 * i + 1] = exp2f(fmaf(s[4 * i + 1], qs0, -sh0));
      s[4 * i + 2] = exp2f(fmaf(s[4 * i + 2], qs1, -sh1));
      s[4 * i + 3] = exp2f(fmaf(s[4 * i + 3], qs1, -sh1));
    }
  };
  // the score fragment is the P.V A operand (K rows permuted, see kPermNote)
  auto pack_p = [&]() {
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      const int c = 16 * kk;  // chunks 4kk..4kk+3 -> s[16kk .. 16kk+15]
      p[kk][0] = pack_e4m3(s[c + 0], s[c + 1], s[c + 4], s[c + 5]);
      p[kk][1] = pack_e4m3(s[c + 2], s[c + 3], s[c + 6], s[c + 7]);
      p[kk][2] = pack_e4m3(s[c + 8], s[c + 9], s[c + 12], s[c + 13]);
      p[kk][3] = pack_e4m3(s[c + 10], s[c + 11], s[c + 14], s[c + 15]);
    }
  };
  // After P_{j-1}.V_{j-1} completed: o (on the max of tile j-2) moves to tile j-1's max and takes
  // the tile's partial sum in one FMA, o = o * alpha_{j-1} + pv (pa holds alpha_{j-1}); the row
  // sums in o[64..67] alike.
  float pa0 = 0.f, pa1 = 0.f;
  auto rescale = [&]() {
#pragma unroll
    for (int i = 0; i < kNPV / 8; ++i) {
      o[4 * i] = fmaf(o[4 * i], pa0, pv[4 * i]);
      o[4 * i + 1] = fmaf(o[4 * i + 1], pa0, pv[4 * i + 1]);
      o[4 * i + 2] = fmaf(o[4 * i + 2], pa1, pv[4 * i + 2]);
      o[4 * i + 3] = fmaf(o[4 * i + 3], pa1, pv[4 * i + 3]);
    }
  };

  mbar_wait(bar.q(), 0);
  mbar_wait(bar.k_full(0), 0);
  issue_qk(0);
  load_ks(0);
  wgmma_wait<0>();
  reg_fence(s);
  if (n_tiles == 1 && tail_keys < kBN)
    softmax(std::true_type{}, tail_keys);
  else
    softmax(std::false_type{}, kBN);
  mbar_arrive(bar.k_empty(0));
  pack_p();

  for (int j = 1; j < n_tiles; ++j) {
    const int sk = j % kStages8, sv = (j - 1) % kStages8;
    mbar_wait(bar.k_full(sk), (j / kStages8) & 1);
    mbar_wait(bar.v_full(sv), ((j - 1) / kStages8) & 1);
    issue_qk(sk);
    issue_pv(sv);
    load_ks(sk);
    wgmma_wait<1>();
    reg_fence(s);
    pa0 = alpha0;  // alpha of tile j-1, whose P.V is in flight
    pa1 = alpha1;
    if (j == n_tiles - 1 && tail_keys < kBN)
      softmax(std::true_type{}, tail_keys);
    else
      softmax(std::false_type{}, kBN);
    mbar_arrive(bar.k_empty(sk));
    wgmma_wait<0>();
    reg_fence(pv);
    mbar_arrive(bar.v_empty(sv));
    rescale();
    pack_p();
  }
  {
    const int sv = (n_tiles - 1) % kStages8;
    mbar_wait(bar.v_full(sv), ((n_tiles - 1) / kStages8) & 1);
    issue_pv(sv);
    wgmma_wait<0>();
    reg_fence(pv);
    pa0 = alpha0;  // alpha of the last tile
    pa1 = alpha1;
    rescale();
    mbar_arrive(bar.v_empty(sv));
  }

  // ---- epilogue: o / l * vs[channel] -> bf16 (rows past Lq are not written)
  const float inv0 = 1.f / o[64], inv1 = 1.f / o[66];
  const int b = bh / prm.heads, h = bh % prm.heads;
  const float* vs = prm.vs + (int64_t)bh * kD + 2 * quad;
  __nv_bfloat16* out = prm.out + (int64_t)b * prm.o_sb + (int64_t)h * prm.o_sh + 2 * quad;
#pragma unroll
  for (int i = 0; i < 16; ++i) {
    const float2 v2 = *reinterpret_cast<const float2*>(vs + 8 * i);
    if (r < prm.lq)
      *reinterpret_cast<__nv_bfloat162*>(out + (int64_t)r * prm.o_sl + 8 * i) =
          __floats2bfloat162_rn(o[4 * i] * inv0 * v2.x, o[4 * i + 1] * inv0 * v2.y);
    if (r + 8 < prm.lq)
      *reinterpret_cast<__nv_bfloat162*>(out + (int64_t)(r + 8) * prm.o_sl + 8 * i) =
          __floats2bfloat162_rn(o[4 * i + 2] * inv1 * v2.x, o[4 * i + 3] * inv1 * v2.y);
  }
}

}  // namespace

// Returns 0 on success; 1 bad arguments, 2 no cuTensorMapEncodeTiled, 3 tensor-map encoding
// failed, 4 launch error. All inputs contiguous as described at the top; out strides in elements.
extern "C" int s2v_fp8_attention_sm90(const void* q8, const float* qs, const void* k8,
                                      const void* ks, const void* vt, const float* vs, void* out,
                                      int batch, int heads, int lq, int lk, int lkp, int lp,
                                      const long long* o_strides, void* stream) {
  const int bh = batch * heads;
  if (bh <= 0 || lq <= 0 || lk <= 0 || lkp % 32 || lkp < lk || lp % 16 || lp < lk) return 1;
  CUtensorMap qm, km, ksm{}, vm;  // ksm: unused without per-key scales
  const cuuint64_t q_dims[3] = {kD, (cuuint64_t)lq, (cuuint64_t)bh};
  const cuuint64_t q_str[2] = {kD, (cuuint64_t)lq * kD};
  const cuuint32_t q_box[3] = {kD, kBM, 1};
  const cuuint64_t k_dims[3] = {kD, (cuuint64_t)lkp, (cuuint64_t)bh};
  const cuuint64_t k_str[2] = {kD, (cuuint64_t)lkp * kD};
  const cuuint32_t k_box[3] = {kD, kBN, 1};
  const int lks = (lk + kBN - 1) / kBN * kBN;
  const cuuint64_t ks_dims[2] = {(cuuint64_t)lks, (cuuint64_t)bh};
  const cuuint64_t ks_str[1] = {(cuuint64_t)lks * 2};
  const cuuint32_t ks_box[2] = {kBN, 1};
  const cuuint64_t v_dims[3] = {(cuuint64_t)lp, kD, (cuuint64_t)bh};
  const cuuint64_t v_str[2] = {(cuuint64_t)lp, (cuuint64_t)lp * kD};
  const cuuint32_t v_box[3] = {kBN, kD, 1};
  int err = encode_tiled(&qm, CU_TENSOR_MAP_DATA_TYPE_UINT8, 3, q8, q_dims, q_str, q_box,
                   CU_TENSOR_MAP_SWIZZLE_128B);
  if (!err) err = encode_tiled(&km, CU_TENSOR_MAP_DATA_TYPE_UINT8, 3, k8, k_dims, k_str, k_box,
                         CU_TENSOR_MAP_SWIZZLE_128B);
  if (!err && ks != nullptr) err = encode_tiled(&ksm, CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 2, ks, ks_dims, ks_str, ks_box,
                         CU_TENSOR_MAP_SWIZZLE_NONE);
  if (!err) err = encode_tiled(&vm, CU_TENSOR_MAP_DATA_TYPE_UINT8, 3, vt, v_dims, v_str, v_box,
                         CU_TENSOR_MAP_SWIZZLE_128B);
  if (err) return err;
  Params8 prm;
  static_cast<OutParams&>(prm) = out_params(out, o_strides, lq, lk, heads);
  prm.qs = qs;
  prm.vs = vs;
  dim3 grid((lq + kBM - 1) / kBM, bh);
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (ks != nullptr) {
    if (!allow_smem<fp8_fwd_sm90<true>>(kSmem8)) return 4;
    fp8_fwd_sm90<true><<<grid, kThreads8, kSmem8, st>>>(qm, km, ksm, vm, prm);
  } else {
    if (!allow_smem<fp8_fwd_sm90<false>>(kSmem8)) return 4;
    fp8_fwd_sm90<false><<<grid, kThreads8, kSmem8, st>>>(qm, km, ksm, vm, prm);
  }
  return cudaGetLastError() == cudaSuccess ? 0 : 4;
}
