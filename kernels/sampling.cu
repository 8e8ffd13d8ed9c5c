// sampling.cu: the inverse-CDF sampler of ops/src/sampling.rs (KFORCING.md
// section 3) and its inverse, one block per row (the R rows of AR sampling or
// the k positions of a window), bit for bit the CPU op's arithmetic:
// - m = max of the row (NaN / all -inf rows give a sentinel, below);
// - weights e_v = exp_nonpos((l_v - m) * (1 / tau)) in f64 with the CPU's own
//   exp (kf_exp_nonpos: the same Cody-Waite reduction and Estrin polynomial,
//   every operation rounded on its own, exact_f64.cuh), or [l_v == +inf] when m = +inf;
// - the vocabulary cut into blocks of 64; one thread per block sums its weights
//   left to right from 0 (B_j); thread 0 turns B into the prefix sums
//   P_0 = 0, P_{j+1} = P_j + B_j in dynamic shared memory (f64, nb + 1 of them);
// - sample_inverse_cdf: the token is the first v with P_j + L_{j,i} >= u * S
//   (S = P_nb): a binary search over P for the block, then a rescan of that
//   one block (its 64 weights in parallel, the running sum L by thread 0);
//   tau = 0 is greedy (the first maximum, u unused);
// - inverse_cdf_noise: the u in (0, 1) the sampler maps to the given token, at
//   fraction r of its interval, clamped into the exact set of such u (the
//   CPU's bisection over the bits of u); NaN where the CPU op errors (token
//   out of range, probability zero, interval too small, NaN / -inf rows).
// The logits are read twice (max, weights; the second read mostly from L2)
// plus one 64-block; no scratch of size V. Tokens for rows the CPU op rejects:
// KF_TOKEN_NAN (a NaN logit) and KF_TOKEN_ALL_NEG_INF. The caller checks tau
// (finite, >= 0, 1/tau finite) and u in (0, 1), r in [0, 1], as the CPU op does.
// Letters: R rows, V vocabulary, nb = ceil(V / 64) blocks, T threads per block.
#include "common.cuh"
#include "exact_f64.cuh"

// kf-hot: sample_inverse_cdf_f32 sample_inverse_cdf_f16 sample_inverse_cdf_bf16
// kf-hot: inverse_cdf_noise_f32 inverse_cdf_noise_f16 inverse_cdf_noise_bf16

#define KF_CDF_BLOCK 64
// bits of the largest f64 below 1 (u lies in the open interval (0, 1))
#define KF_BELOW_ONE_BITS 0x3FEFFFFFFFFFFFFFull

// exp(x) for x <= 0 (or -inf): ops/src/sampling.rs exp_nonpos, operation by operation.
__device__ __forceinline__ double kf_exp_nonpos(double x) {
    const double LOG2E = 0x1.71547652b82fep+0;
    const double LN2_HI = 0x1.62e42fee00000p-1;
    const double LN2_LO = 0x1.a39ef35793c76p-33;
    const double MAGIC = 6755399441055744.0;  // 1.5 * 2^52: round to integer
    const bool flush = x < -708.0;
    const double xc = flush ? -708.0 : x;
    const double t = kf_dadd(kf_dmul(xc, LOG2E), MAGIC);
    const double k = kf_dsub(t, MAGIC);
    const double r = kf_dsub(kf_dsub(xc, kf_dmul(k, LN2_HI)), kf_dmul(k, LN2_LO));
    const double r2 = kf_dmul(r, r), r4 = kf_dmul(r2, r2), r8 = kf_dmul(r4, r4);
    // q(i) = C[i] + C[i + 1] r with C[i] = 1 / i!
    const double q0 = kf_dadd(1.0, kf_dmul(1.0, r));
    const double q2 = kf_dadd(1.0 / 2.0, kf_dmul(1.0 / 6.0, r));
    const double q4 = kf_dadd(1.0 / 24.0, kf_dmul(1.0 / 120.0, r));
    const double q6 = kf_dadd(1.0 / 720.0, kf_dmul(1.0 / 5040.0, r));
    const double q8 = kf_dadd(1.0 / 40320.0, kf_dmul(1.0 / 362880.0, r));
    const double q10 = kf_dadd(1.0 / 3628800.0, kf_dmul(1.0 / 39916800.0, r));
    const double q12 = kf_dadd(1.0 / 479001600.0, kf_dmul(1.0 / 6227020800.0, r));
    const double s0 = kf_dadd(q0, kf_dmul(q2, r2));
    const double s1 = kf_dadd(q4, kf_dmul(q6, r2));
    const double s2 = kf_dadd(q8, kf_dmul(q10, r2));
    const double p = kf_dadd(kf_dadd(s0, kf_dmul(s1, r4)), kf_dmul(kf_dadd(s2, kf_dmul(q12, r4)), r8));
    // the low bits of t hold k (two's complement): 2^k = (k + 1023) << 52
    const double scale = kf_bitsd((kf_dbits(t) + 1023ull) << 52);
    return flush ? 0.0 : kf_dmul(p, scale);
}

// What the weights of a row are computed from (sampling.rs `Weights`).
struct kf_cdf_weights {
    double m, inv_tau;
    bool inf;
    __device__ __forceinline__ double at(float x) const {
        if (inf) return x == KF_INF ? 1.0 : 0.0;
        return kf_exp_nonpos(kf_dmul(kf_dsub((double)x, m), inv_tau));
    }
};

// Max over the block (NaN-free inputs); every thread gets it. scratch: 32 floats.
__device__ __forceinline__ float kf_cdf_block_max(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    for (int o = 16; o > 0; o >>= 1) {
        const float w = __shfl_xor_sync(KF_FULL_MASK, v, o);
        v = w > v ? w : v;
    }
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nw ? scratch[lane] : -KF_INF;
    for (int o = 16; o > 0; o >>= 1) {
        const float w = __shfl_xor_sync(KF_FULL_MASK, v, o);
        v = w > v ? w : v;
    }
    return v;
}

// Min over the block; every thread gets it. scratch: 32 unsigneds.
__device__ __forceinline__ unsigned kf_cdf_block_min(unsigned v, unsigned* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    for (int o = 16; o > 0; o >>= 1) v = min(v, __shfl_xor_sync(KF_FULL_MASK, v, o));
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nw ? scratch[lane] : 0xffffffffu;
    for (int o = 16; o > 0; o >>= 1) v = min(v, __shfl_xor_sync(KF_FULL_MASK, v, o));
    return v;
}

// Row statistics: max (as f32, exact for every storage dtype) or the sentinel
// of a NaN / all -inf row (0 when the row is fine). Block-uniform.
template <class T>
__device__ __forceinline__ unsigned kf_cdf_row_max(const T* __restrict__ x, unsigned v, float* m_out) {
    __shared__ float fscr[32];
    float m = -KF_INF;
    int nan = 0;
    for (unsigned j = threadIdx.x; j < v; j += blockDim.x) {
        const float f = kf_to_f32(x[j]);
        nan |= f != f;
        m = f > m ? f : m;
    }
    if (__syncthreads_or(nan)) return KF_TOKEN_NAN;
    m = kf_cdf_block_max(m, fscr);
    *m_out = m;
    return m == -KF_INF ? KF_TOKEN_ALL_NEG_INF : 0u;
}

// Greedy: the first index holding the max m. Block-uniform.
template <class T>
__device__ __forceinline__ unsigned kf_cdf_first_max(const T* __restrict__ x, unsigned v, float m) {
    __shared__ unsigned uscr[32];
    unsigned first = 0xffffffffu;
    for (unsigned j = threadIdx.x; j < v; j += blockDim.x)
        if (kf_to_f32(x[j]) == m) {
            first = j;
            break;
        }
    return kf_cdf_block_min(first, uscr);
}

// Block totals, then prefix sums P[0..=nb] into `prefix` (shared); returns S.
template <class T>
__device__ __forceinline__ double kf_cdf_prefix(const T* __restrict__ x, unsigned v, kf_cdf_weights w,
                                                double* prefix) {
    const unsigned nb = (v + KF_CDF_BLOCK - 1) / KF_CDF_BLOCK;
    for (unsigned j = threadIdx.x; j < nb; j += blockDim.x) {
        const unsigned lo = j * KF_CDF_BLOCK, hi = min(lo + KF_CDF_BLOCK, v);
        double s = 0.0;
        for (unsigned i = lo; i < hi; ++i) s = kf_dadd(s, w.at(kf_to_f32(x[i])));
        prefix[j + 1] = s;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        double acc = 0.0;
        prefix[0] = 0.0;
        for (unsigned j = 0; j < nb; ++j) {
            acc = kf_dadd(acc, prefix[j + 1]);
            prefix[j + 1] = acc;
        }
    }
    __syncthreads();
    return prefix[nb];
}

// The weights of 64-block j into wblk[0..64) (0 past V), in parallel; ends with a barrier.
template <class T>
__device__ __forceinline__ void kf_cdf_block_weights(const T* __restrict__ x, unsigned v, kf_cdf_weights w,
                                                     unsigned j, double* wblk) {
    for (unsigned i = threadIdx.x; i < KF_CDF_BLOCK; i += blockDim.x) {
        const unsigned e = j * KF_CDF_BLOCK + i;
        wblk[i] = e < v ? w.at(kf_to_f32(x[e])) : 0.0;
    }
    __syncthreads();
}

template <class T>
__device__ __forceinline__ void kf_sample_inverse_cdf(const T* __restrict__ logits, const double* __restrict__ u,
                                                      unsigned* __restrict__ tokens, unsigned rows, unsigned v,
                                                      double tau) {
    extern __shared__ double kf_cdf_prefix_smem[];
    __shared__ double wblk[KF_CDF_BLOCK];
    __shared__ unsigned sh_j;
    const unsigned row = blockIdx.x;
    if (row >= rows) return;  // uniform over the block
    const T* x = logits + (size_t)row * v;
    float m;
    const unsigned bad = kf_cdf_row_max(x, v, &m);
    if (bad) {
        if (threadIdx.x == 0) tokens[row] = bad;
        return;
    }
    if (tau == 0.0) {
        const unsigned t = kf_cdf_first_max(x, v, m);
        if (threadIdx.x == 0) tokens[row] = t;
        return;
    }
    const kf_cdf_weights w{(double)m, kf_ddiv(1.0, tau), m == KF_INF};
    const unsigned nb = (v + KF_CDF_BLOCK - 1) / KF_CDF_BLOCK;
    const double s = kf_cdf_prefix(x, v, w, kf_cdf_prefix_smem);
    const double target = kf_dmul(u[row], s);
    if (threadIdx.x == 0) {
        // the first block whose end reaches the target (partition point over P[1..])
        unsigned lo = 0, hi = nb;
        while (lo < hi) {
            const unsigned mid = lo + (hi - lo) / 2;
            if (kf_cdf_prefix_smem[mid + 1] < target)
                lo = mid + 1;
            else
                hi = mid;
        }
        sh_j = lo;
    }
    __syncthreads();
    const unsigned j = sh_j;
    if (j < nb) kf_cdf_block_weights(x, v, w, j, wblk);  // j is block-uniform
    if (threadIdx.x == 0) {
        unsigned t = 0xffffffffu;
        if (j < nb) {
            const unsigned n = min(v - j * KF_CDF_BLOCK, (unsigned)KF_CDF_BLOCK);
            double l = 0.0;
            for (unsigned i = 0; i < n; ++i) {
                l = kf_dadd(l, wblk[i]);
                if (kf_dadd(kf_cdf_prefix_smem[j], l) >= target) {
                    t = j * KF_CDF_BLOCK + i;
                    break;
                }
            }
        }
        if (t == 0xffffffffu) {
            // unreachable while S == c_{V-1} and u < 1 (as on the CPU): the
            // last token of nonzero weight
            t = v - 1;
            for (unsigned e = v; e-- > 0;)
                if (w.at(kf_to_f32(x[e])) > 0.0) {
                    t = e;
                    break;
                }
        }
        tokens[row] = t;
    }
}

// Smallest u in (0, 1) (as bits) with u * s > c, or 0 (none; u = 0 is excluded):
// sampling.rs first_true for the monotone predicate of the sampler's multiply.
__device__ __forceinline__ unsigned long long kf_cdf_first_above(double s, double c) {
    if (!(kf_dmul(kf_bitsd(KF_BELOW_ONE_BITS), s) > c)) return 0;
    unsigned long long lo = 0, hi = KF_BELOW_ONE_BITS;
    while (hi - lo > 1) {
        const unsigned long long mid = lo + (hi - lo) / 2;
        if (kf_dmul(kf_bitsd(mid), s) > c)
            hi = mid;
        else
            lo = mid;
    }
    return hi;
}

template <class T>
__device__ __forceinline__ void kf_inverse_cdf_noise(const T* __restrict__ logits,
                                                     const unsigned* __restrict__ tokens,
                                                     const double* __restrict__ r, double* __restrict__ u_out,
                                                     unsigned rows, unsigned v, double tau) {
    extern __shared__ double kf_cdf_prefix_smem[];
    __shared__ double wblk[KF_CDF_BLOCK];
    const unsigned row = blockIdx.x;
    if (row >= rows) return;  // uniform over the block
    const T* x = logits + (size_t)row * v;
    const unsigned token = tokens[row];
    const double none = kf_bitsd(0x7ff8000000000000ull);  // NaN: no u maps to the token
    float m;
    if (token >= v || kf_cdf_row_max(x, v, &m)) {
        if (threadIdx.x == 0) u_out[row] = none;
        return;
    }
    const double rr = r[row];
    if (tau == 0.0) {
        // greedy: every u maps to the first maximum and nothing else
        const unsigned t = kf_cdf_first_max(x, v, m);
        if (threadIdx.x == 0) {
            const double below_one = kf_bitsd(KF_BELOW_ONE_BITS), tiny = 0x1p-1022;
            u_out[row] = t != token ? none : rr < tiny ? tiny : rr > below_one ? below_one : rr;
        }
        return;
    }
    const kf_cdf_weights w{(double)m, kf_ddiv(1.0, tau), m == KF_INF};
    const double s = kf_cdf_prefix(x, v, w, kf_cdf_prefix_smem);
    const unsigned j = token / KF_CDF_BLOCK, i = token % KF_CDF_BLOCK;
    kf_cdf_block_weights(x, v, w, j, wblk);
    if (threadIdx.x == 0) {
        // c_{x-1} (the previous entry of the block, or P_j) and c_x
        const double pj = kf_cdf_prefix_smem[j];
        double l = 0.0, lo = pj, hi = pj;
        for (unsigned q = 0; q <= i; ++q) {
            l = kf_dadd(l, wblk[q]);
            lo = hi;
            hi = kf_dadd(pj, l);
        }
        double out = none;
        if (hi > lo) {
            // the sampler returns the token iff lo < u*S <= hi (its own multiply)
            const unsigned long long u_min = kf_cdf_first_above(s, lo), above = kf_cdf_first_above(s, hi);
            const unsigned long long u_max = above ? above - 1 : KF_BELOW_ONE_BITS;
            if (u_min != 0 && u_min <= u_max) {
                const double a = kf_bitsd(u_min), b = kf_bitsd(u_max);
                const double ideal = kf_ddiv(kf_dadd(lo, kf_dmul(kf_dsub(hi, lo), rr)), s);
                out = ideal < a ? a : ideal > b ? b : ideal;
            }
        }
        u_out[row] = out;
    }
}

#define KF_SAMPLING(T, SUFFIX)                                                                                 \
    extern "C" __global__ void sample_inverse_cdf_##SUFFIX(const T* __restrict__ logits,                      \
                                                           const double* __restrict__ u,                      \
                                                           unsigned* __restrict__ tokens, unsigned rows,      \
                                                           unsigned v, double tau) {                          \
        kf_sample_inverse_cdf<T>(logits, u, tokens, rows, v, tau);                                            \
    }                                                                                                         \
    extern "C" __global__ void inverse_cdf_noise_##SUFFIX(const T* __restrict__ logits,                       \
                                                          const unsigned* __restrict__ tokens,                \
                                                          const double* __restrict__ r,                       \
                                                          double* __restrict__ u_out, unsigned rows,          \
                                                          unsigned v, double tau) {                           \
        kf_inverse_cdf_noise<T>(logits, tokens, r, u_out, rows, v, tau);                                      \
    }

KF_SAMPLING(float, f32)
KF_SAMPLING(__half, f16)
KF_SAMPLING(__nv_bfloat16, bf16)
