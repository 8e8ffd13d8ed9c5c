// elementwise.cu: the elementwise family on contiguous buffers of n elements
// (broadcasts other than a row bias are materialised by the launcher first):
// add, sub, mul, scale, bias_add (out[r, c] = x[r, c] + b[c]), gelu_tanh (as
// x * sigmoid(2u) like the CPU op, so no 1 + tanh cancels for negative x), and
// bias_gelu_tanh (gelu_tanh(x[r, c] + b[c]): the MLP's bias fused into its
// activation, one pass over the hidden rows instead of two).
// Entry points `<op>_<dtype>` for f32, f16 and bf16 storage (f32 compute).
// Letters: n elements, C columns of bias_add.
#include "common.cuh"

template <class T, class F>
__device__ __forceinline__ void kf_binary(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ out,
                                          size_t n, F f) {
    for (size_t i = kf_gid(); i < n; i += kf_gstride())
        out[i] = kf_from_f32<T>(f(kf_to_f32(a[i]), kf_to_f32(b[i])));
}

// gelu_tanh(v) = 0.5 v (1 + tanh u), u = sqrt(2/pi) (v + 0.044715 v^3), as v * sigmoid(2u)
__device__ __forceinline__ float kf_gelu_tanh(float v) {
    const float u = 0.7978845608028654f * (v + 0.044715f * v * v * v);
    return v / (1.0f + expf(-2.0f * u));
}

struct KfAdd { __device__ float operator()(float x, float y) const { return x + y; } };
struct KfSub { __device__ float operator()(float x, float y) const { return x - y; } };
struct KfMul { __device__ float operator()(float x, float y) const { return x * y; } };

#define KF_BINARY(OP, F, T, SUFFIX)                                                                         \
    extern "C" __global__ void OP##_##SUFFIX(const T* __restrict__ a, const T* __restrict__ b,             \
                                             T* __restrict__ out, size_t n) {                              \
        kf_binary<T>(a, b, out, n, F());                                                                    \
    }

#define KF_UNARY_FAMILY(T, SUFFIX)                                                                          \
    KF_BINARY(add, KfAdd, T, SUFFIX)                                                                        \
    KF_BINARY(sub, KfSub, T, SUFFIX)                                                                        \
    KF_BINARY(mul, KfMul, T, SUFFIX)                                                                        \
    extern "C" __global__ void scale_##SUFFIX(const T* __restrict__ x, T* __restrict__ out, float s,       \
                                              size_t n) {                                                   \
        for (size_t i = kf_gid(); i < n; i += kf_gstride()) out[i] = kf_from_f32<T>(kf_to_f32(x[i]) * s);  \
    }                                                                                                       \
    extern "C" __global__ void bias_add_##SUFFIX(const T* __restrict__ x, const T* __restrict__ b,         \
                                                 T* __restrict__ out, size_t n, size_t cols) {              \
        for (size_t i = kf_gid(); i < n; i += kf_gstride())                                                 \
            out[i] = kf_from_f32<T>(kf_to_f32(x[i]) + kf_to_f32(b[i % cols]));                             \
    }                                                                                                       \
    extern "C" __global__ void gelu_tanh_##SUFFIX(const T* __restrict__ x, T* __restrict__ out, size_t n) { \
        for (size_t i = kf_gid(); i < n; i += kf_gstride()) out[i] = kf_from_f32<T>(kf_gelu_tanh(kf_to_f32(x[i]))); \
    }                                                                                                       \
    extern "C" __global__ void bias_gelu_tanh_##SUFFIX(const T* __restrict__ x, const T* __restrict__ b,   \
                                                       T* __restrict__ out, size_t n, size_t cols) {        \
        for (size_t i = kf_gid(); i < n; i += kf_gstride())                                                 \
            out[i] = kf_from_f32<T>(kf_gelu_tanh(kf_to_f32(x[i]) + kf_to_f32(b[i % cols])));               \
    }

KF_UNARY_FAMILY(float, f32)
KF_UNARY_FAMILY(__half, f16)
KF_UNARY_FAMILY(__nv_bfloat16, bf16)
