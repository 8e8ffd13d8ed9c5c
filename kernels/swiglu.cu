// swiglu.cu: SwiGLU, the Llama family's MLP activation (ops/src/swiglu.rs), on rows of
// gu [R, 2F] (gate then up, one GEMM's output): out[r, j] = silu(gate) * up with
// gate = gu[r, j], up = gu[r, F + j], silu(a) = a sigmoid(a), in f32. The backward, from
// g [R, F], writes both halves of dgu [R, 2F]: with s = sigmoid(a),
// d gate = g up s (1 + a (1 - s)), d up = g a s. Grid-stride over n = R F outputs.
// Letters: R rows, F features per half, n = R F.
#include "common.cuh"

// kf-hot: swiglu_fwd_f32 swiglu_bwd_f32

__device__ __forceinline__ float kf_sigmoid(float a) { return 1.0f / (1.0f + expf(-a)); }

#define KF_SWIGLU(T, SUFFIX)                                                                                    \
    extern "C" __global__ void swiglu_fwd_##SUFFIX(const T* __restrict__ gu, T* __restrict__ out, size_t n,     \
                                                   size_t f) {                                                  \
        for (size_t i = kf_gid(); i < n; i += kf_gstride()) {                                                   \
            const size_t r = i / f, j = i % f;                                                                  \
            const float a = kf_to_f32(gu[r * 2 * f + j]), u = kf_to_f32(gu[r * 2 * f + f + j]);                \
            out[i] = kf_from_f32<T>(a * kf_sigmoid(a) * u);                                                     \
        }                                                                                                       \
    }                                                                                                           \
    extern "C" __global__ void swiglu_bwd_##SUFFIX(const T* __restrict__ gu, const T* __restrict__ g,          \
                                                   T* __restrict__ dgu, size_t n, size_t f) {                   \
        for (size_t i = kf_gid(); i < n; i += kf_gstride()) {                                                   \
            const size_t r = i / f, j = i % f;                                                                  \
            const float a = kf_to_f32(gu[r * 2 * f + j]), u = kf_to_f32(gu[r * 2 * f + f + j]);                \
            const float gg = kf_to_f32(g[i]), s = kf_sigmoid(a);                                                \
            dgu[r * 2 * f + j] = kf_from_f32<T>(gg * u * s * (1.0f + a * (1.0f - s)));                          \
            dgu[r * 2 * f + f + j] = kf_from_f32<T>(gg * a * s);                                                \
        }                                                                                                       \
    }

KF_SWIGLU(float, f32)
KF_SWIGLU(__half, f16)
KF_SWIGLU(__nv_bfloat16, bf16)
