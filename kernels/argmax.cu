// argmax.cu: reading tokens off the student's hint positions
// (ops/src/argmax.rs argmax_penalty): for each batch row b and each position
// i = 0..K in order, token = argmax_v (l[b,i,v] - penalty * counts[b,v]) (the
// first maximum on ties), then counts[b, token] += 1 (saturating) so later
// positions of the same row see it. Scores in f64 with the CPU's rounding
// (exact_f64.cuh: no FMA contraction; penalty * count clamped to +-DBL_MAX),
// so f32 and f16/bf16 logits rank exactly as the CPU op ranks the same values
// in f32. One block per batch row, the K positions one after another (thread
// 0 updates the count, a barrier publishes it). A position whose logits hold
// NaN or are all -inf (an error of the CPU op) gets KF_TOKEN_NAN /
// KF_TOKEN_ALL_NEG_INF, and so do the later positions of that row (their
// counts are not updated). Letters: B batch rows, K positions, V vocabulary.
#include "common.cuh"
#include "exact_f64.cuh"

#define KF_DBL_MAX 0x1.fffffffffffffp+1023

// (score, index) of the block's best: the larger score, the smaller index on
// ties; every thread gets it. Scratch: 32 doubles and 32 unsigneds.
__device__ __forceinline__ void kf_argmax_block(double& s, unsigned& idx, double* sscr, unsigned* iscr) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    for (int o = 16; o > 0; o >>= 1) {
        const double s2 = __shfl_xor_sync(KF_FULL_MASK, s, o);
        const unsigned i2 = __shfl_xor_sync(KF_FULL_MASK, idx, o);
        if (s2 > s || (s2 == s && i2 < idx)) {
            s = s2;
            idx = i2;
        }
    }
    __syncthreads();
    if (lane == 0) {
        sscr[warp] = s;
        iscr[warp] = idx;
    }
    __syncthreads();
    s = lane < nw ? sscr[lane] : -KF_INF;
    idx = lane < nw ? iscr[lane] : 0xffffffffu;
    for (int o = 16; o > 0; o >>= 1) {
        const double s2 = __shfl_xor_sync(KF_FULL_MASK, s, o);
        const unsigned i2 = __shfl_xor_sync(KF_FULL_MASK, idx, o);
        if (s2 > s || (s2 == s && i2 < idx)) {
            s = s2;
            idx = i2;
        }
    }
}

template <class T>
__device__ __forceinline__ void kf_argmax_penalty(const T* __restrict__ logits, unsigned* __restrict__ counts,
                                                  unsigned* __restrict__ tokens, unsigned batch, unsigned k,
                                                  unsigned v, double penalty) {
    __shared__ double sscr[32];
    __shared__ unsigned iscr[32];
    const unsigned b = blockIdx.x;
    if (b >= batch) return;  // uniform over the block
    unsigned* cnt = counts + (size_t)b * v;
    for (unsigned i = 0; i < k; ++i) {
        const T* x = logits + ((size_t)b * k + i) * v;
        double best = -KF_INF;
        unsigned bi = 0xffffffffu;
        int nan = 0;
        for (unsigned j = threadIdx.x; j < v; j += blockDim.x) {
            const float f = kf_to_f32(x[j]);
            nan |= f != f;
            double sc = (double)f;
            if (penalty != 0.0) {
                const double pc = kf_dmul(penalty, (double)cnt[j]);
                sc = kf_dsub(sc, pc < -KF_DBL_MAX ? -KF_DBL_MAX : pc > KF_DBL_MAX ? KF_DBL_MAX : pc);
            }
            if (sc > best) {  // j increases: the thread keeps its first maximum
                best = sc;
                bi = j;
            }
        }
        nan = __syncthreads_or(nan);
        if (!nan) kf_argmax_block(best, bi, sscr, iscr);
        if (nan || best == -KF_INF) {
            // block-uniform: every thread has the block's flag and best
            for (unsigned q = i + threadIdx.x; q < k; q += blockDim.x)
                tokens[(size_t)b * k + q] = nan ? KF_TOKEN_NAN : KF_TOKEN_ALL_NEG_INF;
            return;
        }
        if (threadIdx.x == 0) {
            tokens[(size_t)b * k + i] = bi;
            if (cnt[bi] != 0xffffffffu) cnt[bi] += 1;
        }
        __syncthreads();  // the count is visible to the next position
    }
}

#define KF_ARGMAX(T, SUFFIX)                                                                                  \
    extern "C" __global__ void argmax_penalty_##SUFFIX(const T* __restrict__ logits,                         \
                                                       unsigned* __restrict__ counts,                        \
                                                       unsigned* __restrict__ tokens, unsigned batch,        \
                                                       unsigned k, unsigned v, double penalty) {             \
        kf_argmax_penalty<T>(logits, counts, tokens, batch, k, v, penalty);                                  \
    }

KF_ARGMAX(float, f32)
KF_ARGMAX(__half, f16)
KF_ARGMAX(__nv_bfloat16, bf16)
