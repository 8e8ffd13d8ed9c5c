// attention.cu: flash-style attention (FlashAttention-2 structure, SIMT f32 FMAs, f32
// accumulation whatever the storage dtype) over the key-range patterns of ops/src/attention.rs:
// every query row sees at most three key intervals, computed on the fly from (pattern, row),
// minus the first key_skip[b] keys (left padding; rows that see nothing output zeros, lse -inf).
// Forward (output + logsumexp), the split-key decode path for KV-cached steps (a few query rows
// against a long cache; partial results merged by attn_decode_combine), and the backward
// (rowsum(dO * O), then dQ and dK/dV in two kernels: deterministic, no atomics).
// Launch shapes and shared-memory sizes: kernels/src/attention.rs (keep the two in step).
// Letters: B batch, Tq query rows, Tk keys, H heads, D head dim (a template parameter: 64, 128),
// BR query rows per tile, BC keys per block, NT threads per block, TX lanes per row group.
#include "common.cuh"

// kf-hot: attn_fwd_d64_f32 attn_fwd_d64_f16 attn_fwd_d64_bf16 attn_fwd_d128_f32 attn_fwd_d128_f16 attn_fwd_d128_bf16
// kf-hot: attn_decode_d64_f32 attn_decode_d64_f16 attn_decode_d64_bf16 attn_decode_d128_f32 attn_decode_d128_f16 attn_decode_d128_bf16
// kf-hot: attn_bwd_dq_d64_f32 attn_bwd_dq_d64_f16 attn_bwd_dq_d64_bf16 attn_bwd_dq_d128_f32 attn_bwd_dq_d128_f16 attn_bwd_dq_d128_bf16
// kf-hot: attn_bwd_dkdv_d64_f32 attn_bwd_dkdv_d64_f16 attn_bwd_dkdv_d64_bf16 attn_bwd_dkdv_d128_f32 attn_bwd_dkdv_d128_f16 attn_bwd_dkdv_d128_bf16

#ifdef KF_EMU
#define KF_UNROLL
#define KF_UNROLL4
#define KF_MAY_ALIAS __attribute__((__may_alias__))
#else
#define KF_UNROLL _Pragma("unroll")
#define KF_UNROLL4 _Pragma("unroll 4")
#define KF_MAY_ALIAS
#endif

#define KF_ATTN_CAUSAL 0
#define KF_ATTN_STAIRCASE 1
#define KF_ATTN_DOUBLE 2

__device__ __forceinline__ float kf_neg_inf() { return __int_as_float(0xff800000); }

// Four floats read from shared memory in one 16-byte load.
struct __align__(16) KF_MAY_ALIAS KfF4 {
    float x, y, z, w;
};

// The 16-byte shared-memory load of the micro-tiles (p 16-byte aligned). On the GPU it is one
// opaque ld.shared.v4: written as a struct load, NVRTC 12.4 split and re-merged such loads
// differently from run to run (its choices follow heap addresses, so ASLR made the PTX
// nondeterministic and the ptxgen freshness check failed). `volatile` keeps the load where it
// is, between the barriers that order it. The emulator runs the plain load.
__device__ __forceinline__ KfF4 kf_lds4(const float* p) {
#ifdef KF_EMU
    return *reinterpret_cast<const KfF4*>(p);
#else
    KfF4 v;
    const unsigned a = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];" : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w) : "r"(a));
    return v;
#endif
}

// The inputs every attention kernel reads: q [B, Tq, H, D], k and v [B, Tk, H, D] through their
// strides in elements (last dim unit-stride), the pattern and the per-batch key_skip (or null).
struct KfAttnIn {
    const void* q;
    const void* k;
    const void* v;
    const unsigned* skip;
    long long qb, qt, qh, kb, kt, kh, vb, vt, vh;
    unsigned tq, tk, q_start, pn, pk;
    int kind;
    float scale;
};

// The key intervals of absolute query row `row` (ops/src/attention.rs `key_ranges`), keys below
// `skip` removed, written to r[0..6] as a0 b0 a1 b1 a2 b2 (an empty interval is 0 0).
__device__ __forceinline__ void kf_attn_ranges(const KfAttnIn& a, unsigned row, unsigned skip, int* r) {
    unsigned a0 = 0, b0 = 0, a1 = 0, b1 = 0, a2 = 0, b2 = 0;
    const unsigned end = row + 1;
    if (a.kind == KF_ATTN_CAUSAL || row < a.pn) {
        b0 = end;
    } else if (a.pk != 0) {
        const unsigned hh = row - a.pn, w = hh / a.pk, i = hh % a.pk + 1;
        if (a.kind != KF_ATTN_DOUBLE || w < a.pn) {
            // staircase hint of window t = w mod N (in block w / N) or F1 token of window t = w
            b0 = (a.kind == KF_ATTN_DOUBLE ? w : w % a.pn) + 1;
            a1 = end - i;
            b1 = end;
        } else if (w - a.pn < a.pn) {  // F2 hint of window t
            const unsigned t = w - a.pn, f1 = a.pn + t * a.pk;
            b0 = t + 1;
            a1 = f1;
            b1 = f1 + a.pk;
            a2 = end - i;
            b2 = end;
        }
    }
    a0 = max(a0, skip);
    a1 = max(a1, skip);
    a2 = max(a2, skip);
    r[0] = a0 < b0 ? (int)a0 : 0;
    r[1] = a0 < b0 ? (int)b0 : 0;
    r[2] = a1 < b1 ? (int)a1 : 0;
    r[3] = a1 < b1 ? (int)b1 : 0;
    r[4] = a2 < b2 ? (int)a2 : 0;
    r[5] = a2 < b2 ? (int)b2 : 0;
}

// Whether key `c` lies in one of the intervals r[0..6].
__device__ __forceinline__ bool kf_rng_has(const int* r, int c) {
    return (c >= r[0] && c < r[1]) || (c >= r[2] && c < r[3]) || (c >= r[4] && c < r[5]);
}

// Whether the intervals r[0..6] meet the keys [c0, c1).
__device__ __forceinline__ bool kf_rng_meets(const int* r, int c0, int c1) {
    return (r[0] < c1 && r[1] > c0) || (r[2] < c1 && r[3] > c0) || (r[4] < c1 && r[5] > c0);
}

// Thread mapping of a tile with R "rows" (query rows, or keys in the dK/dV kernel) and C
// "columns": row group g = tid / TX owns rows 4g..4g+3; lane x = tid % TX owns columns
// x + TX j. The TX lanes of a row group are consecutive lanes of one warp (row reductions are
// shuffles). LDR: row stride of k-major operands [K][R] (read as float4 along R); LDD: row
// stride of [.][D] operands (D + 4: rows 16-byte aligned for float4 reads along D, and 8
// consecutive lanes reading 8 rows hit 8 distinct 16-byte bank groups).
template <int D, int R, int C, int NT>
struct KfTile {
    static constexpr int RG = R / 4;
    static constexpr int TX = NT / RG;
    static constexpr int CTC = C / TX;
    static constexpr int CTD = D / TX;
    static constexpr int LDR = R + 4;
    static constexpr int LDD = D + 4;
    static_assert(R % 4 == 0 && NT % RG == 0 && 32 % TX == 0, "row groups must tile a warp");
    static_assert(C % TX == 0 && D % TX == 0 && CTC >= 1 && CTD >= 1, "columns must tile the lanes");
};

// The register micro-tiles of one thread: acc[i][j] += sum_{k < K} A[k * LDA + a0 + i] * B(k, b0 +
// TX j), A k-major with 16-byte aligned rows (one float4 per k, kf_lds4). Reads of adjacent
// floats are written as the vectors they are (see kf_lds4).
// kf_mm4_cols: B(k, c) = B[k * LDB + c] (consecutive lanes read consecutive columns).
template <int K, int LDA, int LDB, int TX, int CT>
__device__ __forceinline__ void kf_mm4_cols(float (&acc)[4][CT], const float* A, int a0, const float* B, int b0) {
    KF_UNROLL4
    for (int kk = 0; kk < K; ++kk) {
        const KfF4 av = kf_lds4(A + kk * LDA + a0);
        float bv[CT];
        KF_UNROLL
        for (int j = 0; j < CT; ++j) bv[j] = B[kk * LDB + b0 + TX * j];
        KF_UNROLL
        for (int j = 0; j < CT; ++j) {
            acc[0][j] = fmaf(av.x, bv[j], acc[0][j]);
            acc[1][j] = fmaf(av.y, bv[j], acc[1][j]);
            acc[2][j] = fmaf(av.z, bv[j], acc[2][j]);
            acc[3][j] = fmaf(av.w, bv[j], acc[3][j]);
        }
    }
}

// kf_mm4_rows: B(k, c) = B[c * LDB + k] (row c of B is contiguous along k: read as float4, four
// k steps at a time).
template <int K, int LDA, int LDB, int TX, int CT>
__device__ __forceinline__ void kf_mm4_rows(float (&acc)[4][CT], const float* A, int a0, const float* B, int b0) {
    static_assert(K % 4 == 0 && LDB % 4 == 0, "rows of B are read as float4");
    for (int k = 0; k < K; k += 4) {
        KfF4 av[4];
        KF_UNROLL
        for (int t = 0; t < 4; ++t) av[t] = kf_lds4(A + (k + t) * LDA + a0);
        KF_UNROLL
        for (int j = 0; j < CT; ++j) {
            const KfF4 bv = kf_lds4(B + (b0 + TX * j) * LDB + k);
            const float b4[4] = {bv.x, bv.y, bv.z, bv.w};
            KF_UNROLL
            for (int t = 0; t < 4; ++t) {
                acc[0][j] = fmaf(av[t].x, b4[t], acc[0][j]);
                acc[1][j] = fmaf(av[t].y, b4[t], acc[1][j]);
                acc[2][j] = fmaf(av[t].z, b4[t], acc[2][j]);
                acc[3][j] = fmaf(av[t].w, b4[t], acc[3][j]);
            }
        }
    }
}

// Max / sum over the TX lanes of a row group (every lane gets the result; all lanes call).
template <int TX>
__device__ __forceinline__ float kf_group_max(float v) {
    KF_UNROLL
    for (int o = TX / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(KF_FULL_MASK, v, o));
    return v;
}
template <int TX>
__device__ __forceinline__ float kf_group_sum(float v) {
    KF_UNROLL
    for (int o = TX / 2; o > 0; o >>= 1) v += __shfl_xor_sync(KF_FULL_MASK, v, o);
    return v;
}

extern __shared__ __align__(16) float kf_attn_smem[];

// Rows [r0, r0 + R) of a [., D] tensor (row stride `st`) into k-major smem dst[d * LDR + r],
// times `mul`; rows at or past `nrows` are zeros.
template <class T, int D, int R, int LDR, int NT>
__device__ __forceinline__ void kf_load_kmajor(float* dst, const T* src, long long st, unsigned r0, unsigned nrows,
                                               float mul) {
    for (int e = threadIdx.x; e < R * D; e += NT) {
        const int r = e / D, d = e % D;
        float v = 0.0f;
        if (r0 + r < nrows) v = kf_to_f32(src[(long long)(r0 + r) * st + d]) * mul;
        dst[d * LDR + r] = v;
    }
}

// Rows [r0, r0 + R) of a [., D] tensor into row-major smem dst[r * (D + 4) + d], times `mul`;
// rows at or past `nrows` are zeros.
template <class T, int D, int R, int NT>
__device__ __forceinline__ void kf_load_rows(float* dst, const T* src, long long st, unsigned r0, unsigned nrows,
                                             float mul) {
    for (int e = threadIdx.x; e < R * D; e += NT) {
        const int r = e / D, d = e % D;
        float v = 0.0f;
        if (r0 + r < nrows) v = kf_to_f32(src[(long long)(r0 + r) * st + d]) * mul;
        dst[r * (D + 4) + d] = v;
    }
}

// ------------------------------------------------------------------------------------ forward

// One tile of BR query rows of head (b, h) against the keys [s chunk, (s + 1) chunk) of split s
// (grid: x query tiles, y heads, z = b * nsplit + s). nsplit == 1: writes o [B, Tq, H, D] and
// lse [B, H, Tq] (or null). nsplit > 1: writes the split's normalised output and logsumexp to
// opart [B, H, nsplit, Tq, D] and lsepart [B, H, nsplit, Tq] for attn_decode_combine.
// Shared memory (floats): qt [D][BR+4] (q * scale), ks and vs [BC][D+4], pt [BC][BR+4]
// (probabilities, k-major), rng [BR][8] (ints).
template <class T, int D, int BR, int BC, int NT>
__device__ __forceinline__ void kf_attn_fwd(const KfAttnIn& a, T* __restrict__ o, float* __restrict__ lse,
                                            float* __restrict__ opart, float* __restrict__ lsepart, unsigned nsplit,
                                            unsigned chunk) {
    using G = KfTile<D, BR, BC, NT>;
    constexpr int TX = G::TX, LDR = G::LDR, LDD = G::LDD, CTC = G::CTC, CTD = G::CTD;
    float* qt = kf_attn_smem;
    float* ks = qt + D * LDR;
    float* vs = ks + BC * LDD;
    float* pt = vs + BC * LDD;
    int* rng = reinterpret_cast<int*>(pt + BC * LDR);
    const int tid = threadIdx.x, g = tid / TX, x = tid % TX;
    const unsigned h = blockIdx.y, nh = gridDim.y, b = blockIdx.z / nsplit, s = blockIdx.z % nsplit;
    const unsigned r0 = blockIdx.x * BR;
    if (r0 >= a.tq) return;  // uniform over the block
    const unsigned skip = a.skip ? a.skip[b] : 0u;
    const T* q = static_cast<const T*>(a.q) + b * a.qb + h * a.qh;
    const T* k = static_cast<const T*>(a.k) + b * a.kb + h * a.kh;
    const T* v = static_cast<const T*>(a.v) + b * a.vb + h * a.vh;
    kf_load_kmajor<T, D, BR, LDR, NT>(qt, q, a.qt, r0, a.tq, a.scale);
    for (int r = tid; r < BR; r += NT) {
        if (r0 + r < a.tq) {
            kf_attn_ranges(a, a.q_start + r0 + r, skip, rng + r * 8);
        } else {
            for (int i = 0; i < 6; ++i) rng[r * 8 + i] = 0;
        }
    }
    // keys of this split; no row sees a key past itself (every interval ends at row + 1 at most)
    const unsigned rows_end = min(r0 + BR, a.tq);
    const unsigned c_lo = max(skip, s * chunk);
    const unsigned c_hi = min(min(a.tk, a.q_start + rows_end), nsplit == 1 ? a.tk : min(a.tk, (s + 1) * chunk));
    float acc[4][CTD], m[4], l[4];
    KF_UNROLL
    for (int i = 0; i < 4; ++i) {
        m[i] = kf_neg_inf();
        l[i] = 0.0f;
        KF_UNROLL
        for (int j = 0; j < CTD; ++j) acc[i][j] = 0.0f;
    }
    for (unsigned c0 = c_lo; c0 < c_hi; c0 += BC) {
        const unsigned c1 = min(c0 + BC, c_hi);
        int mine = 0;
        for (int r = tid; r < BR; r += NT) mine |= kf_rng_meets(rng + r * 8, (int)c0, (int)c1);
        // skip blocks no row of the tile sees (the gaps of the staircase patterns); this barrier
        // also ends the previous block's reads of ks, vs and pt
        if (!__syncthreads_or(mine)) continue;
        kf_load_rows<T, D, BC, NT>(ks, k, a.kt, c0, c1, 1.0f);
        kf_load_rows<T, D, BC, NT>(vs, v, a.vt, c0, c1, 1.0f);
        __syncthreads();
        float sc[4][CTC];
        KF_UNROLL
        for (int i = 0; i < 4; ++i) {
            KF_UNROLL
            for (int j = 0; j < CTC; ++j) sc[i][j] = 0.0f;
        }
        kf_mm4_rows<D, LDR, LDD, TX, CTC>(sc, qt, 4 * g, ks, x);
        KF_UNROLL
        for (int i = 0; i < 4; ++i) {
            const int* rr = rng + (4 * g + i) * 8;
            float mx = kf_neg_inf();
            KF_UNROLL
            for (int j = 0; j < CTC; ++j) {
                const int c = (int)c0 + x + TX * j;
                const bool vis = c < (int)c1 && kf_rng_has(rr, c);
                sc[i][j] = vis ? sc[i][j] : kf_neg_inf();
                mx = fmaxf(mx, sc[i][j]);
            }
            mx = kf_group_max<TX>(mx);
            const float mn = fmaxf(m[i], mx);
            const bool none = mn == kf_neg_inf();  // the row has seen no key yet
            const float alpha = none ? 1.0f : expf(m[i] - mn);
            float sum = 0.0f;
            KF_UNROLL
            for (int j = 0; j < CTC; ++j) {
                const float p = none ? 0.0f : expf(sc[i][j] - mn);
                sum += p;
                pt[(x + TX * j) * LDR + 4 * g + i] = p;
            }
            l[i] = l[i] * alpha + sum;  // this lane's columns only; summed over the group at the end
            m[i] = mn;
            KF_UNROLL
            for (int j = 0; j < CTD; ++j) acc[i][j] *= alpha;
        }
        __syncthreads();
        kf_mm4_cols<BC, LDR, LDD, TX, CTD>(acc, pt, 4 * g, vs, x);
    }
    const unsigned bh = b * nh + h;
    KF_UNROLL
    for (int i = 0; i < 4; ++i) {
        const float lt = kf_group_sum<TX>(l[i]);
        const unsigned row = r0 + 4 * g + i;
        if (row >= a.tq) continue;
        // a row that saw no key (inside key_skip, or nothing in this split): zeros, lse -inf
        const float inv = lt > 0.0f ? 1.0f / lt : 0.0f;
        const float lv = lt > 0.0f ? m[i] + logf(lt) : kf_neg_inf();
        if (nsplit == 1) {
            T* orow = o + ((size_t)(b * a.tq + row) * nh + h) * D;
            KF_UNROLL
            for (int j = 0; j < CTD; ++j) orow[x + TX * j] = kf_from_f32<T>(acc[i][j] * inv);
            if (lse && x == 0) lse[(size_t)bh * a.tq + row] = lv;
        } else {
            const size_t pr = ((size_t)bh * nsplit + s) * a.tq + row;
            KF_UNROLL
            for (int j = 0; j < CTD; ++j) opart[pr * D + x + TX * j] = acc[i][j] * inv;
            if (x == 0) lsepart[pr] = lv;
        }
    }
}

// Merges the nsplit partial results of attn_decode_*: lse = log sum_s exp(lse_s), o = sum_s
// exp(lse_s - lse) o_s. Grid: x query rows, y heads, z batch; any block size (a multiple of 32).
// At most KF_ATTN_MAX_SPLITS splits.
#define KF_ATTN_MAX_SPLITS 128
template <class T>
__device__ __forceinline__ void kf_attn_combine(const float* __restrict__ opart, const float* __restrict__ lsepart,
                                                T* __restrict__ o, float* __restrict__ lse, unsigned tq, unsigned d,
                                                unsigned nsplit) {
    __shared__ float w[KF_ATTN_MAX_SPLITS];
    const unsigned row = blockIdx.x, h = blockIdx.y, nh = gridDim.y, b = blockIdx.z;
    if (nsplit == 0 || nsplit > KF_ATTN_MAX_SPLITS) return;
    const size_t base = (size_t)(b * nh + h) * nsplit * tq + row;  // split s at base + s tq
    float mx = kf_neg_inf();
    for (unsigned s = 0; s < nsplit; ++s) mx = fmaxf(mx, lsepart[base + (size_t)s * tq]);
    float tot = 0.0f;
    if (mx != kf_neg_inf())
        for (unsigned s = 0; s < nsplit; ++s) tot += expf(lsepart[base + (size_t)s * tq] - mx);
    const float lv = mx == kf_neg_inf() ? kf_neg_inf() : mx + logf(tot);
    for (unsigned s = threadIdx.x; s < nsplit; s += blockDim.x)
        w[s] = mx == kf_neg_inf() ? 0.0f : expf(lsepart[base + (size_t)s * tq] - lv);
    __syncthreads();
    T* orow = o + ((size_t)(b * tq + row) * nh + h) * d;
    for (unsigned j = threadIdx.x; j < d; j += blockDim.x) {
        float acc = 0.0f;
        for (unsigned s = 0; s < nsplit; ++s) acc += w[s] * opart[(base + (size_t)s * tq) * d + j];
        orow[j] = kf_from_f32<T>(acc);
    }
    if (lse && threadIdx.x == 0) lse[(size_t)(b * nh + h) * tq + row] = lv;
}

// ----------------------------------------------------------------------------------- backward

// dvec [B, H, Tq] = rowsum(dO * O) over D, f32; o and g contiguous [B, Tq, H, D]. One warp per
// (b, t, h); any block size that is a multiple of 32.
template <class T>
__device__ __forceinline__ void kf_attn_bwd_dot(const T* __restrict__ o, const T* __restrict__ g,
                                                float* __restrict__ dvec, unsigned nb, unsigned tq, unsigned nh,
                                                unsigned d) {
    const size_t rows = (size_t)nb * tq * nh;
    const size_t wid = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    const unsigned lane = threadIdx.x & 31;
    if (wid >= rows) return;  // uniform over the warp
    const T* orow = o + wid * d;
    const T* grow = g + wid * d;
    float s = 0.0f;
    for (unsigned j = lane; j < d; j += 32) s += kf_to_f32(orow[j]) * kf_to_f32(grow[j]);
    s = kf_warp_sum(s);
    const size_t h = wid % nh, t = (wid / nh) % tq, b = wid / ((size_t)nh * tq);
    if (lane == 0) dvec[(b * nh + h) * tq + t] = s;
}

// dQ of a tile of BR query rows (grid: x query tiles, y heads, z batch): for every key block the
// rows see, P = exp(S - lse), dS = P (dO V^T - dvec), dQ += dS K; dq = scale dQ, [B, Tq, H, D].
// g (dO) contiguous [B, Tq, H, D]; lse and dvec [B, H, Tq]. Shared memory (floats): qt and gt
// [D][BR+4], ks and vs [BC][D+4], dst [BC][BR+4], rng [BR][8] (ints), lse and dvec [BR].
template <class T, int D, int BR, int BC, int NT>
__device__ __forceinline__ void kf_attn_bwd_dq(const KfAttnIn& a, const T* __restrict__ go,
                                               const float* __restrict__ lse, const float* __restrict__ dvec,
                                               T* __restrict__ dq) {
    using G = KfTile<D, BR, BC, NT>;
    constexpr int TX = G::TX, LDR = G::LDR, LDD = G::LDD, CTC = G::CTC, CTD = G::CTD;
    float* qt = kf_attn_smem;
    float* gt = qt + D * LDR;
    float* ks = gt + D * LDR;
    float* vs = ks + BC * LDD;
    float* dst = vs + BC * LDD;
    int* rng = reinterpret_cast<int*>(dst + BC * LDR);
    float* ls = reinterpret_cast<float*>(rng + BR * 8);
    float* dv = ls + BR;
    const int tid = threadIdx.x, g = tid / TX, x = tid % TX;
    const unsigned h = blockIdx.y, nh = gridDim.y, b = blockIdx.z;
    const unsigned r0 = blockIdx.x * BR;
    if (r0 >= a.tq) return;  // uniform over the block
    const unsigned skip = a.skip ? a.skip[b] : 0u;
    const T* q = static_cast<const T*>(a.q) + b * a.qb + h * a.qh;
    const T* k = static_cast<const T*>(a.k) + b * a.kb + h * a.kh;
    const T* v = static_cast<const T*>(a.v) + b * a.vb + h * a.vh;
    const T* gh = go + ((size_t)b * a.tq * nh + h) * D;
    const size_t bh = (size_t)b * nh + h;
    kf_load_kmajor<T, D, BR, LDR, NT>(qt, q, a.qt, r0, a.tq, a.scale);
    kf_load_kmajor<T, D, BR, LDR, NT>(gt, gh, (long long)nh * D, r0, a.tq, 1.0f);
    for (int r = tid; r < BR; r += NT) {
        const bool in = r0 + r < a.tq;
        if (in) {
            kf_attn_ranges(a, a.q_start + r0 + r, skip, rng + r * 8);
        } else {
            for (int i = 0; i < 6; ++i) rng[r * 8 + i] = 0;
        }
        ls[r] = in ? lse[bh * a.tq + r0 + r] : 0.0f;
        dv[r] = in ? dvec[bh * a.tq + r0 + r] : 0.0f;
    }
    const unsigned c_hi = min(a.tk, a.q_start + min(r0 + BR, a.tq));
    float acc[4][CTD];
    KF_UNROLL
    for (int i = 0; i < 4; ++i) {
        KF_UNROLL
        for (int j = 0; j < CTD; ++j) acc[i][j] = 0.0f;
    }
    for (unsigned c0 = skip; c0 < c_hi; c0 += BC) {
        const unsigned c1 = min(c0 + BC, c_hi);
        int mine = 0;
        for (int r = tid; r < BR; r += NT) mine |= kf_rng_meets(rng + r * 8, (int)c0, (int)c1);
        if (!__syncthreads_or(mine)) continue;
        kf_load_rows<T, D, BC, NT>(ks, k, a.kt, c0, c1, 1.0f);
        kf_load_rows<T, D, BC, NT>(vs, v, a.vt, c0, c1, 1.0f);
        __syncthreads();
        float sc[4][CTC], dp[4][CTC];
        KF_UNROLL
        for (int i = 0; i < 4; ++i) {
            KF_UNROLL
            for (int j = 0; j < CTC; ++j) sc[i][j] = dp[i][j] = 0.0f;
        }
        kf_mm4_rows<D, LDR, LDD, TX, CTC>(sc, qt, 4 * g, ks, x);
        kf_mm4_rows<D, LDR, LDD, TX, CTC>(dp, gt, 4 * g, vs, x);
        KF_UNROLL
        for (int i = 0; i < 4; ++i) {
            const int rl = 4 * g + i;
            const int* rr = rng + rl * 8;
            const float lv = ls[rl], dd = dv[rl];
            KF_UNROLL
            for (int j = 0; j < CTC; ++j) {
                const int c = (int)c0 + x + TX * j;
                const bool vis = c < (int)c1 && kf_rng_has(rr, c);
                const float p = vis ? expf(sc[i][j] - lv) : 0.0f;
                dst[(x + TX * j) * LDR + rl] = p * (dp[i][j] - dd);
            }
        }
        __syncthreads();
        kf_mm4_cols<BC, LDR, LDD, TX, CTD>(acc, dst, 4 * g, ks, x);
    }
    KF_UNROLL
    for (int i = 0; i < 4; ++i) {
        const unsigned row = r0 + 4 * g + i;
        if (row >= a.tq) continue;
        T* out = dq + ((size_t)(b * a.tq + row) * nh + h) * D;
        KF_UNROLL
        for (int j = 0; j < CTD; ++j) out[x + TX * j] = kf_from_f32<T>(acc[i][j] * a.scale);
    }
}

// dK and dV of a block of BK keys (grid: x key blocks, y heads, z batch): for every tile of BQ
// query rows that sees one of them, P^T = exp(K Q^T - lse), dV += P^T dO, dS^T = P^T (V dO^T -
// dvec), dK += dS^T (Q scale); dk and dv [B, Tk, H, D]. Shared memory (floats): kt and vt
// [D][BK+4], qs and gs [BQ][D+4], ps and dss [BQ][BK+4], rng [BQ][8] (ints), lse and dvec [BQ].
template <class T, int D, int BK, int BQ, int NT>
__device__ __forceinline__ void kf_attn_bwd_dkdv(const KfAttnIn& a, const T* __restrict__ go,
                                                 const float* __restrict__ lse, const float* __restrict__ dvec,
                                                 T* __restrict__ dk, T* __restrict__ dvo) {
    using G = KfTile<D, BK, BQ, NT>;
    constexpr int TX = G::TX, LDR = G::LDR, LDD = G::LDD, CTC = G::CTC, CTD = G::CTD;
    float* kt = kf_attn_smem;
    float* vt = kt + D * LDR;
    float* qs = vt + D * LDR;
    float* gs = qs + BQ * LDD;
    float* ps = gs + BQ * LDD;
    float* dss = ps + BQ * LDR;
    int* rng = reinterpret_cast<int*>(dss + BQ * LDR);
    float* ls = reinterpret_cast<float*>(rng + BQ * 8);
    float* dvs = ls + BQ;
    const int tid = threadIdx.x, g = tid / TX, x = tid % TX;
    const unsigned h = blockIdx.y, nh = gridDim.y, b = blockIdx.z;
    const unsigned k0 = blockIdx.x * BK;
    if (k0 >= a.tk) return;  // uniform over the block
    const unsigned k1 = min(k0 + BK, a.tk);
    const unsigned skip = a.skip ? a.skip[b] : 0u;
    const T* q = static_cast<const T*>(a.q) + b * a.qb + h * a.qh;
    const T* k = static_cast<const T*>(a.k) + b * a.kb + h * a.kh;
    const T* v = static_cast<const T*>(a.v) + b * a.vb + h * a.vh;
    const T* gh = go + ((size_t)b * a.tq * nh + h) * D;
    const size_t bh = (size_t)b * nh + h;
    kf_load_kmajor<T, D, BK, LDR, NT>(kt, k, a.kt, k0, a.tk, 1.0f);
    kf_load_kmajor<T, D, BK, LDR, NT>(vt, v, a.vt, k0, a.tk, 1.0f);
    float ak[4][CTD], av[4][CTD];
    KF_UNROLL
    for (int i = 0; i < 4; ++i) {
        KF_UNROLL
        for (int j = 0; j < CTD; ++j) ak[i][j] = av[i][j] = 0.0f;
    }
    // a row sees no key past itself: rows before k0 - q_start see none of these keys
    const unsigned first = k1 <= skip ? a.tq : (k0 > a.q_start ? min(k0 - a.q_start, a.tq) : 0u);
    for (unsigned r0 = first; r0 < a.tq; r0 += BQ) {
        __syncthreads();  // the previous tile's reads of rng, ls, dvs, qs, gs, ps, dss are done
        int mine = 0;
        for (int r = tid; r < BQ; r += NT) {
            const bool in = r0 + r < a.tq;
            if (in) {
                kf_attn_ranges(a, a.q_start + r0 + r, skip, rng + r * 8);
                mine |= kf_rng_meets(rng + r * 8, (int)k0, (int)k1);
            } else {
                for (int i = 0; i < 6; ++i) rng[r * 8 + i] = 0;
            }
            ls[r] = in ? lse[bh * a.tq + r0 + r] : 0.0f;
            dvs[r] = in ? dvec[bh * a.tq + r0 + r] : 0.0f;
        }
        if (!__syncthreads_or(mine)) continue;
        kf_load_rows<T, D, BQ, NT>(qs, q, a.qt, r0, a.tq, a.scale);
        kf_load_rows<T, D, BQ, NT>(gs, gh, (long long)nh * D, r0, a.tq, 1.0f);
        __syncthreads();
        float st[4][CTC], dpt[4][CTC];
        KF_UNROLL
        for (int i = 0; i < 4; ++i) {
            KF_UNROLL
            for (int j = 0; j < CTC; ++j) st[i][j] = dpt[i][j] = 0.0f;
        }
        kf_mm4_rows<D, LDR, LDD, TX, CTC>(st, kt, 4 * g, qs, x);
        kf_mm4_rows<D, LDR, LDD, TX, CTC>(dpt, vt, 4 * g, gs, x);
        KF_UNROLL
        for (int j = 0; j < CTC; ++j) {
            const int rl = x + TX * j;
            const int* rr = rng + rl * 8;
            const float lv = ls[rl], dd = dvs[rl];
            KF_UNROLL
            for (int i = 0; i < 4; ++i) {
                const int c = (int)k0 + 4 * g + i;
                const bool vis = c < (int)k1 && kf_rng_has(rr, c);
                const float p = vis ? expf(st[i][j] - lv) : 0.0f;
                ps[rl * LDR + 4 * g + i] = p;
                dss[rl * LDR + 4 * g + i] = p * (dpt[i][j] - dd);
            }
        }
        __syncthreads();
        kf_mm4_cols<BQ, LDR, LDD, TX, CTD>(av, ps, 4 * g, gs, x);
        kf_mm4_cols<BQ, LDR, LDD, TX, CTD>(ak, dss, 4 * g, qs, x);
    }
    KF_UNROLL
    for (int i = 0; i < 4; ++i) {
        const unsigned key = k0 + 4 * g + i;
        if (key >= a.tk) continue;
        const size_t o = ((size_t)(b * a.tk + key) * nh + h) * D;
        KF_UNROLL
        for (int j = 0; j < CTD; ++j) {
            dk[o + x + TX * j] = kf_from_f32<T>(ak[i][j]);
            dvo[o + x + TX * j] = kf_from_f32<T>(av[i][j]);
        }
    }
}

// --------------------------------------------------------------------------------- entry points

// Tile shapes (keep in step with kernels/src/attention.rs): <D, BR, BC, NT> for forward, decode
// and dQ; <D, BK, BQ, NT> for dK/dV.
#define KF_ATTN_IN_PARAMS(T)                                                                                    \
    const T *__restrict__ q, const T *__restrict__ k, const T *__restrict__ v, const unsigned *__restrict__ skip, \
        long long qb, long long qt, long long qh, long long kb, long long kt, long long kh, long long vb,        \
        long long vt, long long vh, unsigned tq, unsigned tk, unsigned q_start, int kind, unsigned pn,          \
        unsigned pk, float scale
#define KF_ATTN_IN \
    KfAttnIn { q, k, v, skip, qb, qt, qh, kb, kt, kh, vb, vt, vh, tq, tk, q_start, pn, pk, kind, scale }

#define KF_ATTN_FWD(NAME, T, D, BR, BC, NT)                                                                   \
    extern "C" __global__ void __launch_bounds__(NT)                                                          \
        NAME(KF_ATTN_IN_PARAMS(T), T* __restrict__ o, float* __restrict__ lse, float* __restrict__ opart,       \
             float* __restrict__ lsepart, unsigned nsplit, unsigned chunk) {                                  \
        kf_attn_fwd<T, D, BR, BC, NT>(KF_ATTN_IN, o, lse, opart, lsepart, nsplit, chunk);                    \
    }
#define KF_ATTN_DQ(NAME, T, D, BR, BC, NT)                                                                    \
    extern "C" __global__ void __launch_bounds__(NT)                                                          \
        NAME(KF_ATTN_IN_PARAMS(T), const T* __restrict__ go, const float* __restrict__ lse,                     \
             const float* __restrict__ dvec, T* __restrict__ dq) {                                            \
        kf_attn_bwd_dq<T, D, BR, BC, NT>(KF_ATTN_IN, go, lse, dvec, dq);                                     \
    }
#define KF_ATTN_DKDV(NAME, T, D, BK, BQ, NT)                                                                  \
    extern "C" __global__ void __launch_bounds__(NT)                                                          \
        NAME(KF_ATTN_IN_PARAMS(T), const T* __restrict__ go, const float* __restrict__ lse,                     \
             const float* __restrict__ dvec, T* __restrict__ dk, T* __restrict__ dv) {                        \
        kf_attn_bwd_dkdv<T, D, BK, BQ, NT>(KF_ATTN_IN, go, lse, dvec, dk, dv);                               \
    }

#define KF_ATTN_DTYPE(T, SFX)                                                                                  \
    KF_ATTN_FWD(attn_fwd_d64_##SFX, T, 64, 64, 32, 128)                                                        \
    KF_ATTN_FWD(attn_fwd_d128_##SFX, T, 128, 64, 32, 128)                                                      \
    KF_ATTN_FWD(attn_decode_d64_##SFX, T, 64, 16, 64, 64)                                                       \
    KF_ATTN_FWD(attn_decode_d128_##SFX, T, 128, 16, 32, 64)                                                     \
    KF_ATTN_DQ(attn_bwd_dq_d64_##SFX, T, 64, 32, 32, 64)                                                       \
    KF_ATTN_DQ(attn_bwd_dq_d128_##SFX, T, 128, 32, 32, 64)                                                     \
    KF_ATTN_DKDV(attn_bwd_dkdv_d64_##SFX, T, 64, 32, 32, 64)                                                   \
    KF_ATTN_DKDV(attn_bwd_dkdv_d128_##SFX, T, 128, 32, 32, 128)                                                \
    extern "C" __global__ void attn_decode_combine_##SFX(const float* __restrict__ opart,                     \
                                                         const float* __restrict__ lsepart, T* __restrict__ o, \
                                                         float* __restrict__ lse, unsigned tq, unsigned d,     \
                                                         unsigned nsplit) {                                    \
        kf_attn_combine<T>(opart, lsepart, o, lse, tq, d, nsplit);                                             \
    }                                                                                                          \
    extern "C" __global__ void attn_bwd_dot_##SFX(const T* __restrict__ o, const T* __restrict__ g,           \
                                                  float* __restrict__ dvec, unsigned nb, unsigned tq,          \
                                                  unsigned nh, unsigned d) {                                   \
        kf_attn_bwd_dot<T>(o, g, dvec, nb, tq, nh, d);                                                         \
    }

KF_ATTN_DTYPE(float, f32)
KF_ATTN_DTYPE(__half, f16)
KF_ATTN_DTYPE(__nv_bfloat16, bf16)
