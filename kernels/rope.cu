// rope.cu: rotary position embedding, rotate-half (NeoX) layout, with the CPU
// op's convention (ops/src/rope.rs): for j < D/2,
//   out[j]       = x[j] cos - x[j + D/2] sin,
//   out[j + D/2] = x[j + D/2] cos + x[j] sin,
// angle[r, j] = pos[r] * base^(-2j/D). The cos / sin tables [P, D/2] are f32:
// made on the host by kf_ops::rope::rope_tables (f64, then cast, as the CPU op
// does) or on the device by rope_tables_f32 (in double, then cast). P = T
// (positions per time step) or B * T (per batch row, `batched_pos` != 0).
// rope_fwd reads x [B, T, H, D] from element x_off through element strides
// (sb, st, sh) with a unit last stride (q or k of a fused qkv is read in place) and
// writes a contiguous out; rope_bwd is the inverse rotation (the transpose:
// sin negated), dx from g. Products and differences are rounded one by one
// (__fmul_rn / __fsub_rn, no FMA contraction), as the CPU op computes them,
// so the f32 results are the CPU op's bits. One block per (b, t) row
// (grid-stride over rows), threads over the H * D/2 pairs.
// Letters: B batch, T time, H heads, D head dim (even), P table rows.
#include "common.cuh"

// kf-hot: rope_fwd_f32 rope_fwd_f16 rope_fwd_bf16 rope_bwd_f32 rope_bwd_f16 rope_bwd_bf16

template <class T>
__device__ __forceinline__ void kf_rope(const T* __restrict__ x, size_t x_off, const float* __restrict__ cos_t,
                                        const float* __restrict__ sin_t, T* __restrict__ out, unsigned nb,
                                        unsigned nt, unsigned nh, unsigned d, size_t sb, size_t st, size_t sh,
                                        int batched_pos, float sign) {
    const unsigned half = d >> 1, pairs = nh * half;
    const size_t rows = (size_t)nb * nt;
    for (size_t r = blockIdx.x; r < rows; r += gridDim.x) {
        const size_t bi = r / nt, ti = r - bi * nt;
        const size_t prow = batched_pos ? r : ti;
        const float* __restrict__ c = cos_t + prow * half;
        const float* __restrict__ s = sin_t + prow * half;
        const T* __restrict__ xr = x + x_off + bi * sb + ti * st;
        T* __restrict__ outr = out + r * (size_t)nh * d;
        for (unsigned k = threadIdx.x; k < pairs; k += blockDim.x) {
            const unsigned h = k / half, j = k - h * half;
            const T* __restrict__ xh = xr + h * sh;
            const float x1 = kf_to_f32(xh[j]), x2 = kf_to_f32(xh[j + half]);
            const float cj = c[j], sj = sign * s[j];
            outr[h * d + j] = kf_from_f32<T>(__fsub_rn(__fmul_rn(x1, cj), __fmul_rn(x2, sj)));
            outr[h * d + j + half] = kf_from_f32<T>(__fadd_rn(__fmul_rn(x2, cj), __fmul_rn(x1, sj)));
        }
    }
}

#define KF_ROPE(T, SUFFIX)                                                                                  \
    extern "C" __global__ void rope_fwd_##SUFFIX(const T* __restrict__ x, size_t x_off,                 \
                                                 const float* __restrict__ cos_t,                           \
                                                 const float* __restrict__ sin_t, T* __restrict__ out,      \
                                                 unsigned nb, unsigned nt, unsigned nh, unsigned d,         \
                                                 size_t sb, size_t st, size_t sh, int batched_pos) {        \
        kf_rope<T>(x, x_off, cos_t, sin_t, out, nb, nt, nh, d, sb, st, sh, batched_pos, 1.0f);             \
    }                                                                                                       \
    extern "C" __global__ void rope_bwd_##SUFFIX(const T* __restrict__ g, size_t g_off,                 \
                                                 const float* __restrict__ cos_t,                           \
                                                 const float* __restrict__ sin_t, T* __restrict__ dx,       \
                                                 unsigned nb, unsigned nt, unsigned nh, unsigned d,         \
                                                 size_t sb, size_t st, size_t sh, int batched_pos) {        \
        kf_rope<T>(g, g_off, cos_t, sin_t, dx, nb, nt, nh, d, sb, st, sh, batched_pos, -1.0f);             \
    }

KF_ROPE(float, f32)
KF_ROPE(__half, f16)
KF_ROPE(__nv_bfloat16, bf16)

// The tables of `np` positions: cos_t[r, j] = cos(pos[r] * f[j]), sin_t
// likewise, j < D/2, with f[j] = base^(-2j/D), divided by div[j] when SCALED
// (a model's RoPE scaling: kf_ops::rope::RopeFreqs), computed in double (as
// kf_ops::rope::rope_tables) and rounded to f32 once. Grid-stride over the
// np * D/2 entries.
template <bool SCALED>
__device__ __forceinline__ void kf_rope_tables(const unsigned* __restrict__ pos, float* __restrict__ cos_t,
                                               float* __restrict__ sin_t, size_t np, unsigned d, double base,
                                               const double* __restrict__ div) {
    const unsigned half = d >> 1;
    const size_t total = np * half;
    for (size_t i = kf_gid(); i < total; i += kf_gstride()) {
        const size_t r = i / half;
        const unsigned j = (unsigned)(i - r * half);
        double f = pow(base, -(double)(2 * j) / (double)d);
        if (SCALED) f = f / div[j];
        const double angle = (double)pos[r] * f;
        double s, c;
        sincos(angle, &s, &c);
        cos_t[i] = (float)c;
        sin_t[i] = (float)s;
    }
}

extern "C" __global__ void rope_tables_f32(const unsigned* __restrict__ pos, float* __restrict__ cos_t,
                                           float* __restrict__ sin_t, size_t np, unsigned d, double base) {
    kf_rope_tables<false>(pos, cos_t, sin_t, np, d, base, nullptr);
}

extern "C" __global__ void rope_tables_scaled_f32(const unsigned* __restrict__ pos, float* __restrict__ cos_t,
                                                  float* __restrict__ sin_t, size_t np, unsigned d, double base,
                                                  const double* __restrict__ div) {
    kf_rope_tables<true>(pos, cos_t, sin_t, np, d, base, div);
}
