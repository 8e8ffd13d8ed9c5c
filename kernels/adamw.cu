// adamw.cu: one AdamW step (ops/src/adamw.rs; PyTorch's AdamW order, the
// decoupled weight decay first), in place on f32 parameters p and moments
// m, v with the f32 gradient g, n contiguous elements:
//   p *= decay; m = b1 m + c1 g; v = b2 v + c2 g g;
//   p -= step_size m / (sqrt(v) / bc2_sqrt + eps)
// The scalars are computed on the host in f64 and cast to f32, as the CPU op
// does (kf_kernels::adamw::Scalars); every product and sum is rounded on its
// own (__fmul_rn / __fadd_rn: no FMA contraction) and sqrtf and the division
// are IEEE-rounded (NVRTC without fast math), so the result has the CPU op's
// bits. Grid-stride loop. Letters: n elements.
#include "common.cuh"

// kf-hot: adamw_f32

extern "C" __global__ void adamw_f32(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m,
                                     float* __restrict__ v, size_t n, float decay, float b1, float b2, float c1,
                                     float c2, float step_size, float bc2_sqrt, float eps) {
    for (size_t i = kf_gid(); i < n; i += kf_gstride()) {
        const float gi = g[i];
        const float pi = __fmul_rn(p[i], decay);
        const float mi = __fadd_rn(__fmul_rn(b1, m[i]), __fmul_rn(c1, gi));
        const float vi = __fadd_rn(__fmul_rn(b2, v[i]), __fmul_rn(__fmul_rn(c2, gi), gi));
        const float den = __fadd_rn(sqrtf(vi) / bc2_sqrt, eps);
        p[i] = __fsub_rn(pi, __fmul_rn(step_size, mi) / den);
        m[i] = mi;
        v[i] = vi;
    }
}
