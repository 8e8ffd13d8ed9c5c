// cross_entropy.cu: fused cross-entropy of logits [N, V] against u32 targets
// [N] (ops/src/cross_entropy.rs), f32 accumulation for every storage dtype:
// - cross_entropy_fwd_<dt>: one block per row, ONE pass over the vocabulary:
//   each thread keeps an online (max, sum exp(x - max)) pair, merged over the
//   block; lse = max + ln(sum), loss = lse - x[target] (both f32, [N]). A row
//   whose target is the ignore index gets loss 0 and lse 0 (the CPU op's
//   values); a target >= V that is not ignored (an error of the CPU op,
//   checked on the host) and a row with every logit -inf (likewise) get NaN.
// - cross_entropy_mean_f32: one block: count = the rows not ignored, mean =
//   sum(loss) / count in f64 (0 when count = 0), the CPU op's mean loss.
// - cross_entropy_bwd_<dt>: dlogits[i, v] = (exp(x[i, v] - lse[i]) - [v == t_i]) * g / count,
//   zero rows for ignored targets and everywhere when count = 0; g (the
//   gradient of the mean loss) and count are device scalars (the mean kernel
//   writes count), so no host round trip. Grid (N, column chunks).
// Ignore convention: has_ignore != 0 means targets equal to `ignore` are ignored.
// Letters: N rows, V vocabulary, T threads per block (a multiple of 32).
#include "common.cuh"
#include "exact_f64.cuh"  // KF_INF

// kf-hot: cross_entropy_fwd_f32 cross_entropy_fwd_f16 cross_entropy_fwd_bf16
// kf-hot: cross_entropy_bwd_f32 cross_entropy_bwd_f16 cross_entropy_bwd_bf16

// Merge the online pair (m2, s2) into (m, s). -inf maxima contribute nothing;
// NaN sums propagate (a NaN logit gives a NaN loss, as on the CPU).
__device__ __forceinline__ void kf_ce_merge(float& m, float& s, float m2, float s2) {
    const float mm = m2 > m ? m2 : m;
    if (mm == -KF_INF) {
        s += s2;
        return;
    }
    s = s * expf(m - mm) + s2 * expf(m2 - mm);
    m = mm;
}

template <class T>
__device__ __forceinline__ void kf_ce_fwd(const T* __restrict__ logits, const unsigned* __restrict__ targets,
                                          float* __restrict__ loss, float* __restrict__ lse, unsigned n,
                                          unsigned v, unsigned ignore, int has_ignore) {
    __shared__ float mscr[32], sscr[32];
    const unsigned row = blockIdx.x;
    if (row >= n) return;  // uniform over the block
    const unsigned t = targets[row];
    if (has_ignore && t == ignore) {
        if (threadIdx.x == 0) loss[row] = lse[row] = 0.0f;
        return;
    }
    const T* x = logits + (size_t)row * v;
    float m = -KF_INF, s = 0.0f;
    for (unsigned j = threadIdx.x; j < v; j += blockDim.x) {
        const float f = kf_to_f32(x[j]);
        if (f > m) {
            s = s * expf(m - f) + 1.0f;  // m = -inf: s * 0 + 1
            m = f;
        } else if (f != -KF_INF) {
            s += expf(f - m);  // NaN stays NaN
        }
    }
    for (int o = 16; o > 0; o >>= 1) {
        const float m2 = __shfl_xor_sync(KF_FULL_MASK, m, o), s2 = __shfl_xor_sync(KF_FULL_MASK, s, o);
        kf_ce_merge(m, s, m2, s2);
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    if (lane == 0) {
        mscr[warp] = m;
        sscr[warp] = s;
    }
    __syncthreads();
    if (warp == 0) {
        m = lane < nw ? mscr[lane] : -KF_INF;
        s = lane < nw ? sscr[lane] : 0.0f;
        for (int o = 16; o > 0; o >>= 1) {
            const float m2 = __shfl_xor_sync(KF_FULL_MASK, m, o), s2 = __shfl_xor_sync(KF_FULL_MASK, s, o);
            kf_ce_merge(m, s, m2, s2);
        }
        if (lane == 0) {
            const float nan = __int_as_float(0x7fc00000);
            const bool bad = t >= v || m == -KF_INF;
            const float l = m + logf(s);
            lse[row] = bad ? nan : l;
            loss[row] = bad ? nan : l - kf_to_f32(x[t]);
        }
    }
}

extern "C" __global__ void cross_entropy_mean_f32(const float* __restrict__ loss,
                                                  const unsigned* __restrict__ targets, float* __restrict__ mean,
                                                  unsigned* __restrict__ count, unsigned n, unsigned ignore,
                                                  int has_ignore) {
    __shared__ double dscr[32];
    __shared__ unsigned cscr[32];
    double s = 0.0;
    unsigned c = 0;
    for (unsigned j = threadIdx.x; j < n; j += blockDim.x) {
        if (has_ignore && targets[j] == ignore) continue;
        s += (double)loss[j];
        c += 1;
    }
    for (int o = 16; o > 0; o >>= 1) {
        s += __shfl_xor_sync(KF_FULL_MASK, s, o);
        c += __shfl_xor_sync(KF_FULL_MASK, c, o);
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    if (lane == 0) {
        dscr[warp] = s;
        cscr[warp] = c;
    }
    __syncthreads();
    if (warp == 0) {
        s = lane < nw ? dscr[lane] : 0.0;
        c = lane < nw ? cscr[lane] : 0u;
        for (int o = 16; o > 0; o >>= 1) {
            s += __shfl_xor_sync(KF_FULL_MASK, s, o);
            c += __shfl_xor_sync(KF_FULL_MASK, c, o);
        }
        if (lane == 0) {
            *count = c;
            *mean = c == 0 ? 0.0f : (float)(s / (double)c);
        }
    }
}

template <class T>
__device__ __forceinline__ void kf_ce_bwd(const T* __restrict__ logits, const unsigned* __restrict__ targets,
                                          const float* __restrict__ lse, const float* __restrict__ g,
                                          const unsigned* __restrict__ count, T* __restrict__ dlogits, unsigned n,
                                          unsigned v, unsigned ignore, int has_ignore) {
    const unsigned row = blockIdx.x;
    if (row >= n) return;
    const unsigned t = targets[row], c = *count;
    const bool zero = (has_ignore && t == ignore) || c == 0;
    const float scale = zero ? 0.0f : *g / (float)c;
    const float l = zero ? 0.0f : lse[row];
    const T* x = logits + (size_t)row * v;
    T* d = dlogits + (size_t)row * v;
    for (unsigned j = blockIdx.y * blockDim.x + threadIdx.x; j < v; j += blockDim.x * gridDim.y) {
        float y = 0.0f;
        if (!zero) {
            y = expf(kf_to_f32(x[j]) - l) * scale;
            if (j == t) y -= scale;
        }
        d[j] = kf_from_f32<T>(y);
    }
}

#define KF_CROSS_ENTROPY(T, SUFFIX)                                                                           \
    extern "C" __global__ void cross_entropy_fwd_##SUFFIX(                                                   \
        const T* __restrict__ logits, const unsigned* __restrict__ targets, float* __restrict__ loss,        \
        float* __restrict__ lse, unsigned n, unsigned v, unsigned ignore, int has_ignore) {                  \
        kf_ce_fwd<T>(logits, targets, loss, lse, n, v, ignore, has_ignore);                                  \
    }                                                                                                        \
    extern "C" __global__ void cross_entropy_bwd_##SUFFIX(                                                   \
        const T* __restrict__ logits, const unsigned* __restrict__ targets, const float* __restrict__ lse,   \
        const float* __restrict__ g, const unsigned* __restrict__ count, T* __restrict__ dlogits, unsigned n, \
        unsigned v, unsigned ignore, int has_ignore) {                                                       \
        kf_ce_bwd<T>(logits, targets, lse, g, count, dlogits, n, v, ignore, has_ignore);                     \
    }

KF_CROSS_ENTROPY(float, f32)
KF_CROSS_ENTROPY(__half, f16)
KF_CROSS_ENTROPY(__nv_bfloat16, bf16)
