// softmax.cu: softmax and log-softmax over the last dimension of x [R, V]
// (ops/src/softmax.rs), one block per row, and their backwards.
// Forward: one pass keeps an online (max, sum of exp(x - max)) per thread,
// rescaling the sum when the max grows; the pairs are merged over the warp
// (shuffles) and the block (shared memory); a second pass writes
// exp(x - max) / sum, or x - (max + log sum) with `log` != 0. So x is read
// twice, never cached: V = 50257 does not fit a block's shared memory.
// -inf entries get probability 0 (log-softmax: stay -inf). A row with no
// entry above -inf is written as zeros and its index is folded into
// *bad_row with atomicMin (the launcher sets it to 0xffffffff first and
// turns anything else into the CPU op's error), unless bad_row is null.
// Backward from the saved output y: softmax dx = y (g - sum(g y)),
// log-softmax dx = g - exp(y) sum(g). f32 compute, storage T.
// Letters: R rows, V the softmax dimension, T threads per block (a multiple
// of 32, at most 1024).
#include "common.cuh"

// kf-hot: softmax_fwd_f32 softmax_fwd_f16 softmax_fwd_bf16 softmax_bwd_f32 softmax_bwd_f16 softmax_bwd_bf16

// -inf as a bit pattern (NVRTC has no <cmath> INFINITY without host headers)
#define KF_NEG_INF __uint_as_float(0xff800000u)

// (m, s) <- the merge of (m, s) and (m2, s2): max, and the sums rescaled to it.
__device__ __forceinline__ void kf_lse_merge(float& m, float& s, float m2, float s2) {
    const float mn = fmaxf(m, m2);
    if (mn == KF_NEG_INF) return;  // both empty
    s = (m == KF_NEG_INF ? 0.0f : s * expf(m - mn)) + (m2 == KF_NEG_INF ? 0.0f : s2 * expf(m2 - mn));
    m = mn;
}

template <class T>
__device__ __forceinline__ void kf_softmax_fwd(const T* __restrict__ x, T* __restrict__ out, unsigned rows,
                                               unsigned v, int log, unsigned* __restrict__ bad_row) {
    __shared__ float sm[32], ss[32];
    const unsigned r = blockIdx.x;
    if (r >= rows || v == 0) return;  // uniform over the block
    const T* __restrict__ xr = x + (size_t)r * v;
    T* __restrict__ outr = out + (size_t)r * v;
    float m = KF_NEG_INF, s = 0.0f;
    for (unsigned j = threadIdx.x; j < v; j += blockDim.x) {
        const float a = kf_to_f32(xr[j]);
        if (a == KF_NEG_INF) continue;
        if (a > m) {
            s = s * expf(m - a) + 1.0f;  // m = -inf: s = 0 * 0 + 1
            m = a;
        } else {
            s += expf(a - m);
        }
    }
    for (int o = 16; o > 0; o >>= 1) {
        const float m2 = __shfl_xor_sync(KF_FULL_MASK, m, o), s2 = __shfl_xor_sync(KF_FULL_MASK, s, o);
        kf_lse_merge(m, s, m2, s2);
    }
    const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    if (lane == 0) {
        sm[warp] = m;
        ss[warp] = s;
    }
    __syncthreads();
    m = KF_NEG_INF;
    s = 0.0f;
    for (unsigned w = 0; w < nw; ++w) kf_lse_merge(m, s, sm[w], ss[w]);  // same order in every thread
    if (m == KF_NEG_INF) {
        for (unsigned j = threadIdx.x; j < v; j += blockDim.x) outr[j] = kf_from_f32<T>(0.0f);
        if (threadIdx.x == 0 && bad_row) atomicMin(bad_row, r);
        return;
    }
    if (log) {
        const float lse = m + logf(s);
        for (unsigned j = threadIdx.x; j < v; j += blockDim.x) outr[j] = kf_from_f32<T>(kf_to_f32(xr[j]) - lse);
    } else {
        const float inv = 1.0f / s;
        for (unsigned j = threadIdx.x; j < v; j += blockDim.x)
            outr[j] = kf_from_f32<T>(expf(kf_to_f32(xr[j]) - m) * inv);
    }
}

template <class T>
__device__ __forceinline__ void kf_softmax_bwd(const T* __restrict__ y, const T* __restrict__ g, T* __restrict__ dx,
                                               unsigned rows, unsigned v, int log) {
    __shared__ float scratch[32];
    const unsigned r = blockIdx.x;
    if (r >= rows || v == 0) return;  // uniform over the block
    const size_t off = (size_t)r * v;
    const T* __restrict__ yr = y + off;
    const T* __restrict__ gr = g + off;
    T* __restrict__ dr = dx + off;
    float acc = 0.0f;
    for (unsigned j = threadIdx.x; j < v; j += blockDim.x)
        acc += log ? kf_to_f32(gr[j]) : kf_to_f32(gr[j]) * kf_to_f32(yr[j]);
    acc = kf_block_sum(acc, scratch);
    for (unsigned j = threadIdx.x; j < v; j += blockDim.x) {
        const float yy = kf_to_f32(yr[j]), gg = kf_to_f32(gr[j]);
        dr[j] = kf_from_f32<T>(log ? gg - expf(yy) * acc : yy * (gg - acc));
    }
}

#define KF_SOFTMAX(T, SUFFIX)                                                                              \
    extern "C" __global__ void softmax_fwd_##SUFFIX(const T* __restrict__ x, T* __restrict__ out,         \
                                                    unsigned rows, unsigned v, int log,                    \
                                                    unsigned* __restrict__ bad_row) {                      \
        kf_softmax_fwd<T>(x, out, rows, v, log, bad_row);                                                  \
    }                                                                                                      \
    extern "C" __global__ void softmax_bwd_##SUFFIX(const T* __restrict__ y, const T* __restrict__ g,     \
                                                    T* __restrict__ dx, unsigned rows, unsigned v,         \
                                                    int log) {                                             \
        kf_softmax_bwd<T>(y, g, dx, rows, v, log);                                                         \
    }

KF_SOFTMAX(float, f32)
KF_SOFTMAX(__half, f16)
KF_SOFTMAX(__nv_bfloat16, bf16)
