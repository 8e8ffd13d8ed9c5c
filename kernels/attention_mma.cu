// attention_mma.cu: attention forward on tensor cores (issue 23), FlashAttention-2 shaped: bf16
// Q, K, V [B, T, H, D] in, f32 O [B, T, H, D] and logsumexp [B, H, T] out, causal or full.
// A block of 4 warps owns 64 query rows (16 per warp); key tiles of 64 rows stream through
// shared memory by cp.async, double-buffered (the next tile lands while this one is used); S = Q·Kᵀ and O += P·V are mma.sync m16n8k16 (bf16 in, f32
// accumulate) with the operands loaded by ldmatrix (Q and K as stored, V transposed by
// ldmatrix.trans); the online softmax runs on the S accumulators in registers, and P goes back
// into the A fragments of the P·V product without touching shared memory (the C layout of two
// adjacent 16 x 8 tiles is the A layout of one 16 x 16). Masking is applied only on the key
// tiles that cross the causal diagonal or the end of the sequence.
// Shared memory: Q plus two stages of K and V, 5 x 64 x D bf16 (40 KB at D 64, 80 KB at D 128:
// above 48 KB the launch needs the dynamic shared-memory opt-in). Not yet: a swizzled shared
// layout (ldmatrix bank conflicts), the staircase patterns and key_skip of attention.cu, the
// backward.
// Letters: B batch, T positions, H heads, D head dim (64, 128), BR = 64 query rows per block,
// BC = 64 keys per tile; in a warp, lane l, g = l / 4, t = l % 4 (common.cuh's layouts).
#include "common.cuh"

// kf-hot: attn_fwd_mma_d64_bf16 attn_fwd_mma_d128_bf16

#ifdef KF_EMU
#define KF_UNROLL
#else
#define KF_UNROLL _Pragma("unroll")
#endif

__device__ __forceinline__ float kf_neg_inf_mma() { return __int_as_float(0xff800000); }

#define KF_MMA_BR 64
#define KF_MMA_BC 64

// bf16 bits of x, round to nearest even (x finite), and two of them in one register.
__device__ __forceinline__ unsigned kf_bf16_rn_bits(float x) {
    const unsigned u = __float_as_uint(x);
    return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}
__device__ __forceinline__ unsigned kf_pack_bf16x2(float lo, float hi) {
    return kf_bf16_rn_bits(lo) | (kf_bf16_rn_bits(hi) << 16);
}

// rows [row0, row0 + 64) of one head of X [B, T, H, D] into S [64][D] (bf16): 16-byte cp.async
// chunks (the caller commits them as a group); rows past T are zeros (plain stores).
template <int D>
__device__ __forceinline__ void kf_mma_load_tile(unsigned short* S, const __nv_bfloat16* X, int b, int h, int row0,
                                                 int T, int H) {
    constexpr int CH = D / 8;  // 16-byte chunks per row
    for (int c = threadIdx.x; c < KF_MMA_BR * CH; c += blockDim.x) {
        const int r = c / CH, k = (c % CH) * 8;
        unsigned short* dst = S + r * D + k;
        const int row = row0 + r;
        if (row < T) {
            kf_cp_async(dst, X + (((size_t)b * T + row) * H + h) * D + k, 16);
        } else {
            for (int i = 0; i < 8; i++) dst[i] = 0;
        }
    }
}

template <int D>
__device__ void kf_attn_fwd_mma(const __nv_bfloat16* __restrict__ Q, const __nv_bfloat16* __restrict__ K,
                                const __nv_bfloat16* __restrict__ V, float* __restrict__ O, float* __restrict__ lse,
                                int T, int H, int causal, float scale) {
    extern __shared__ __align__(16) unsigned short kf_mma_smem[];
    // Q, then two stages of (K, V): the next tile lands while this one is used
    unsigned short* Qs = kf_mma_smem;
    const int b = blockIdx.z, h = blockIdx.y, q_blk = blockIdx.x * KF_MMA_BR;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int j = lane >> 3, r8 = lane & 7;  // this lane's ldmatrix matrix and row
    const int q_warp = q_blk + warp * 16;
    const int k_end = causal ? min(T, q_blk + KF_MMA_BR) : T;

    kf_mma_load_tile<D>(Qs, Q, b, h, q_blk, T, H);
    kf_cp_async_commit();
    kf_mma_load_tile<D>(Qs + KF_MMA_BR * D, K, b, h, 0, T, H);
    kf_mma_load_tile<D>(Qs + (KF_MMA_BR + KF_MMA_BC) * D, V, b, h, 0, T, H);
    kf_cp_async_commit();
    kf_cp_async_wait<1>();  // Q (the first tile of K and V may still be in flight)
    __syncthreads();
    unsigned qa[D / 16][4];
    KF_UNROLL
    for (int kc = 0; kc < D / 16; kc++)
        kf_ldmatrix_x4(qa[kc], &Qs[(warp * 16 + (j & 1) * 8 + r8) * D + kc * 16 + (j >> 1) * 8]);

    float o[D / 8][4];
    KF_UNROLL
    for (int dc = 0; dc < D / 8; dc++) o[dc][0] = o[dc][1] = o[dc][2] = o[dc][3] = 0.0f;
    // rows g and g + 8 of the warp: running max (scaled logits) and this lane's partial sum
    float m[2] = {kf_neg_inf_mma(), kf_neg_inf_mma()}, l[2] = {0.0f, 0.0f};

    for (int k0 = 0, stage = 0; k0 < k_end; k0 += KF_MMA_BC, stage ^= 1) {
        unsigned short* Ks = Qs + (KF_MMA_BR + 2 * stage * KF_MMA_BC) * D;
        unsigned short* Vs = Ks + KF_MMA_BC * D;
        if (k0 + KF_MMA_BC < k_end) {
            // prefetch the next tile into the other stage (free: the barrier at the end of
            // the previous iteration), then wait for this one only
            unsigned short* Kn = Qs + (KF_MMA_BR + 2 * (stage ^ 1) * KF_MMA_BC) * D;
            kf_mma_load_tile<D>(Kn, K, b, h, k0 + KF_MMA_BC, T, H);
            kf_mma_load_tile<D>(Kn + KF_MMA_BC * D, V, b, h, k0 + KF_MMA_BC, T, H);
            kf_cp_async_commit();
            kf_cp_async_wait<1>();
        } else {
            kf_cp_async_wait<0>();
        }
        __syncthreads();

        // S [16 x 64] = Q Kᵀ: 8 column tiles of 8 keys
        float s[KF_MMA_BC / 8][4];
        KF_UNROLL
        for (int nc = 0; nc < KF_MMA_BC / 8; nc++) {
            s[nc][0] = s[nc][1] = s[nc][2] = s[nc][3] = 0.0f;
            KF_UNROLL
            for (int kc = 0; kc < D / 16; kc++) {
                unsigned kb[2];
                kf_ldmatrix_x2(kb, &Ks[(nc * 8 + r8) * D + kc * 16 + (j & 1) * 8]);
                kf_mma_bf16_16816(s[nc], qa[kc], kb, s[nc]);
            }
        }
        // scale; mask only where the tile crosses the diagonal or the end of the keys
        const bool edge = k0 + KF_MMA_BC > T || (causal && k0 + KF_MMA_BC - 1 > q_warp);
        KF_UNROLL
        for (int nc = 0; nc < KF_MMA_BC / 8; nc++) {
            KF_UNROLL
            for (int i = 0; i < 4; i++) {
                float v = s[nc][i] * scale;
                if (edge) {
                    const int key = k0 + nc * 8 + 2 * t + (i & 1), q = q_warp + g + (i >> 1) * 8;
                    if (key >= T || (causal && key > q)) v = kf_neg_inf_mma();
                }
                s[nc][i] = v;
            }
        }
        // online softmax per row (the 4 lanes of a group hold a row's 64 values)
        KF_UNROLL
        for (int rr = 0; rr < 2; rr++) {
            float mx = m[rr];
            KF_UNROLL
            for (int nc = 0; nc < KF_MMA_BC / 8; nc++) mx = fmaxf(mx, fmaxf(s[nc][2 * rr], s[nc][2 * rr + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(KF_FULL_MASK, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(KF_FULL_MASK, mx, 2));
            // a row that has seen only masked keys keeps max -inf: its factors are 0
            const float base = mx == kf_neg_inf_mma() ? 0.0f : mx;
            const float corr = m[rr] == kf_neg_inf_mma() ? 0.0f : __expf(m[rr] - base);
            float sum = 0.0f;
            KF_UNROLL
            for (int nc = 0; nc < KF_MMA_BC / 8; nc++) {
                const float p0 = __expf(s[nc][2 * rr] - base), p1 = __expf(s[nc][2 * rr + 1] - base);
                s[nc][2 * rr] = p0;
                s[nc][2 * rr + 1] = p1;
                sum += p0 + p1;
            }
            l[rr] = l[rr] * corr + sum;
            m[rr] = mx;
            KF_UNROLL
            for (int dc = 0; dc < D / 8; dc++) {
                o[dc][2 * rr] *= corr;
                o[dc][2 * rr + 1] *= corr;
            }
        }
        // O += P V: P from the S registers (bf16), V [64 keys x D] transposed by ldmatrix
        KF_UNROLL
        for (int kc = 0; kc < KF_MMA_BC / 16; kc++) {
            const unsigned pa[4] = {kf_pack_bf16x2(s[2 * kc][0], s[2 * kc][1]),
                                    kf_pack_bf16x2(s[2 * kc][2], s[2 * kc][3]),
                                    kf_pack_bf16x2(s[2 * kc + 1][0], s[2 * kc + 1][1]),
                                    kf_pack_bf16x2(s[2 * kc + 1][2], s[2 * kc + 1][3])};
            KF_UNROLL
            for (int dc = 0; dc < D / 8; dc++) {
                unsigned vb[2];
                kf_ldmatrix_x2_trans(vb, &Vs[(kc * 16 + (j & 1) * 8 + r8) * D + dc * 8]);
                kf_mma_bf16_16816(o[dc], pa, vb, o[dc]);
            }
        }
        __syncthreads();  // every warp is done with this stage before it is refilled
    }
    // the row sums over the group's 4 lanes, then O / l and the logsumexp
    KF_UNROLL
    for (int rr = 0; rr < 2; rr++) {
        float lt = l[rr];
        lt += __shfl_xor_sync(KF_FULL_MASK, lt, 1);
        lt += __shfl_xor_sync(KF_FULL_MASK, lt, 2);
        const int q = q_warp + g + rr * 8;
        const float inv = lt > 0.0f ? 1.0f / lt : 0.0f;
        if (q < T) {
            float* orow = O + (((size_t)b * T + q) * H + h) * D;
            KF_UNROLL
            for (int dc = 0; dc < D / 8; dc++) {
                orow[dc * 8 + 2 * t] = o[dc][2 * rr] * inv;
                orow[dc * 8 + 2 * t + 1] = o[dc][2 * rr + 1] * inv;
            }
            if (t == 0) lse[((size_t)b * H + h) * T + q] = lt > 0.0f ? m[rr] + __logf(lt) : kf_neg_inf_mma();
        }
    }
}

extern "C" __global__ void __launch_bounds__(128) attn_fwd_mma_d64_bf16(
    const __nv_bfloat16* __restrict__ Q, const __nv_bfloat16* __restrict__ K, const __nv_bfloat16* __restrict__ V,
    float* __restrict__ O, float* __restrict__ lse, int T, int H, int causal, float scale) {
    kf_attn_fwd_mma<64>(Q, K, V, O, lse, T, H, causal, scale);
}

extern "C" __global__ void __launch_bounds__(128) attn_fwd_mma_d128_bf16(
    const __nv_bfloat16* __restrict__ Q, const __nv_bfloat16* __restrict__ K, const __nv_bfloat16* __restrict__ V,
    float* __restrict__ O, float* __restrict__ lse, int T, int H, int causal, float scale) {
    kf_attn_fwd_mma<128>(Q, K, V, O, lse, T, H, causal, scale);
}
