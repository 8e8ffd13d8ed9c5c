// gelu.cu: the GELU kernels not in elementwise.cu (whose gelu_tanh is the
// forward of the tanh form), elementwise over n contiguous elements, with the
// formulas of the CPU op (ops/src/gelu.rs), in f32:
//   gelu_erf(x)      = 0.5 x erfc(-x / sqrt 2)            (exact GELU; erfc keeps the negative tail)
//   gelu_erf_bwd     = g * (Phi(x) + x phi(x))            (phi(x) = exp(-x^2/2) / sqrt(2 pi); x phi := 0 where phi underflows)
//   gelu_tanh_bwd    = g * (s + x s (1 - s) 2 u'),  s = sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3),
//                      from e = exp(-2|u|) so that no inf/inf occurs for large |u|
// The CPU op evaluates the erf form in f64; here erfcf / expf in f32 (CUDA's
// erfcf: at most 4 ulp), within the parity harness's f32 tolerance.
// Entry points `<op>_<dtype>` for f32, f16 and bf16 storage (f32 compute).
// Letters: n elements.
#include "common.cuh"

// kf-hot: gelu_erf_f32 gelu_erf_f16 gelu_erf_bf16 gelu_erf_bwd_f32 gelu_erf_bwd_f16 gelu_erf_bwd_bf16
// kf-hot: gelu_tanh_bwd_f32 gelu_tanh_bwd_f16 gelu_tanh_bwd_bf16

#define KF_SQRT1_2 0.70710678118654752f
#define KF_INV_SQRT_2PI 0.39894228040143268f
#define KF_K_TANH 0.7978845608028654f
#define KF_A_TANH 0.044715f

__device__ __forceinline__ float kf_gelu_erf(float x) { return 0.5f * x * erfcf(-x * KF_SQRT1_2); }

__device__ __forceinline__ float kf_gelu_erf_grad(float x) {
    const float cdf = 0.5f * erfcf(-x * KF_SQRT1_2);
    const float pdf = KF_INV_SQRT_2PI * expf(-0.5f * x * x);
    return cdf + (pdf == 0.0f ? 0.0f : x * pdf);
}

__device__ __forceinline__ float kf_gelu_tanh_grad(float x) {
    const float x2 = x * x;
    const float u = KF_K_TANH * (x + KF_A_TANH * x2 * x);
    const float two_u = u + u;
    const float e = expf(-fabsf(two_u));  // in (0, 1]
    const float inv = 1.0f / (1.0f + e);
    const float s = two_u >= 0.0f ? inv : e * inv;  // sigmoid(2u)
    const float s1s = e * inv * inv;                // s (1 - s)
    const float du = KF_K_TANH * (1.0f + 3.0f * KF_A_TANH * x2);
    // e == 0: |x| is huge, the derivative is s (0 or 1); this keeps inf * 0 out
    return e == 0.0f ? s : s + x * s1s * (du + du);
}

#define KF_GELU(T, SUFFIX)                                                                                  \
    extern "C" __global__ void gelu_erf_##SUFFIX(const T* __restrict__ x, T* __restrict__ out, size_t n) {  \
        for (size_t i = kf_gid(); i < n; i += kf_gstride()) out[i] = kf_from_f32<T>(kf_gelu_erf(kf_to_f32(x[i]))); \
    }                                                                                                       \
    extern "C" __global__ void gelu_erf_bwd_##SUFFIX(const T* __restrict__ x, const T* __restrict__ g,      \
                                                     T* __restrict__ dx, size_t n) {                        \
        for (size_t i = kf_gid(); i < n; i += kf_gstride())                                                 \
            dx[i] = kf_from_f32<T>(kf_gelu_erf_grad(kf_to_f32(x[i])) * kf_to_f32(g[i]));                   \
    }                                                                                                       \
    extern "C" __global__ void gelu_tanh_bwd_##SUFFIX(const T* __restrict__ x, const T* __restrict__ g,     \
                                                      T* __restrict__ dx, size_t n) {                       \
        for (size_t i = kf_gid(); i < n; i += kf_gstride())                                                 \
            dx[i] = kf_from_f32<T>(kf_gelu_tanh_grad(kf_to_f32(x[i])) * kf_to_f32(g[i]));                  \
    }

KF_GELU(float, f32)
KF_GELU(__half, f16)
KF_GELU(__nv_bfloat16, bf16)
