// layernorm.cu: LayerNorm forward over the last dimension D of x [R, D], one
// block per row, statistics in f32 by the same shifted two-pass method as the
// CPU op (ops/src/layernorm.rs): mean = x0 + sum(x - x0) / D, then
// var = (sum d^2 - (sum d)^2 / D) / D with d = x - mean. Optional bias (null),
// optional saved mean / rstd [R] for the backward (null). With `cached` != 0
// the row is kept in dynamic shared memory (D floats), read from global once.
// Letters: R rows, D features, T threads per block (a multiple of 32).
#include "common.cuh"

// kf-hot: layernorm_fwd_f32 layernorm_fwd_f16 layernorm_fwd_bf16

template <class T>
__device__ __forceinline__ void kf_layernorm_fwd(const T* __restrict__ x, const T* __restrict__ w,
                                                 const T* __restrict__ b, T* __restrict__ out,
                                                 float* __restrict__ mean_out, float* __restrict__ rstd_out,
                                                 unsigned rows, unsigned d, float eps, int cached) {
    __shared__ float scratch[32];
    extern __shared__ float kf_row[];
    const unsigned r = blockIdx.x;
    if (r >= rows || d == 0) return;  // uniform over the block: no barrier is skipped by part of it
    const T* xr = x + (size_t)r * d;
    T* outr = out + (size_t)r * d;
    const float x0 = kf_to_f32(xr[0]);
    float s = 0.0f;
    for (unsigned j = threadIdx.x; j < d; j += blockDim.x) {
        const float v = kf_to_f32(xr[j]);
        if (cached) kf_row[j] = v;
        s += v - x0;
    }
    const float fd = (float)d;
    const float mean = x0 + kf_block_sum(s, scratch) / fd;
    float sd = 0.0f, sdd = 0.0f;
    for (unsigned j = threadIdx.x; j < d; j += blockDim.x) {
        const float v = (cached ? kf_row[j] : kf_to_f32(xr[j])) - mean;
        sd += v;
        sdd += v * v;
    }
    sd = kf_block_sum(sd, scratch);
    sdd = kf_block_sum(sdd, scratch);
    const float var = fmaxf((sdd - sd * sd / fd) / fd, 0.0f);
    const float rstd = 1.0f / sqrtf(var + eps);
    for (unsigned j = threadIdx.x; j < d; j += blockDim.x) {
        const float v = cached ? kf_row[j] : kf_to_f32(xr[j]);
        float y = (v - mean) * rstd * kf_to_f32(w[j]);
        if (b) y += kf_to_f32(b[j]);
        outr[j] = kf_from_f32<T>(y);
    }
    if (threadIdx.x == 0) {
        if (mean_out) mean_out[r] = mean;
        if (rstd_out) rstd_out[r] = rstd;
    }
}

#define KF_LAYERNORM(T, SUFFIX)                                                                            \
    extern "C" __global__ void layernorm_fwd_##SUFFIX(const T* __restrict__ x, const T* __restrict__ w,   \
                                                      const T* __restrict__ b, T* __restrict__ out,        \
                                                      float* __restrict__ mean_out,                        \
                                                      float* __restrict__ rstd_out, unsigned rows,         \
                                                      unsigned d, float eps, int cached) {                 \
        kf_layernorm_fwd<T>(x, w, b, out, mean_out, rstd_out, rows, d, eps, cached);                       \
    }

KF_LAYERNORM(float, f32)
KF_LAYERNORM(__half, f16)
KF_LAYERNORM(__nv_bfloat16, bf16)
