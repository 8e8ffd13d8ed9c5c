// copy.cu: layout and dtype changes of device tensors, so a view or a cast never goes through
// the host (one launch instead of one memcpy per contiguous run, or a download and upload).
// strided_copy_<b16|b32|b64> (any dtype of that element size; the bits are moved, not read):
//   for each i < n, written as the row-major index (i0 .. i5) over the shape d0 .. d5,
//   dst[dst_off + sum_k ik * dk_dst] = src[src_off + sum_k ik * dk_src]
// with rank <= 6 (the engine drops unit dims, merges dims contiguous in both layouts and pads
// leading dims with size 1). Strides may be 0 on the source (a broadcast).
// cast_<from>_<to>: out[i] = to(in[in_off + i]) for i < n, f32 <-> f16 / bf16 and f64 <-> f32,
// rounding to nearest even as the CPU's `half` and `as f32` do (one rounding, from the source).
// Letters: n elements, d0 .. d5 the (collapsed) shape, ik the index along dim k.
#include "common.cuh"

// kf-hot: strided_copy_b16 strided_copy_b32 strided_copy_b64

template <class T>
__device__ __forceinline__ void kf_strided_copy(const T* __restrict__ src, size_t src_off, T* __restrict__ dst,
                                                size_t dst_off, size_t n, const size_t* shape,
                                                const size_t* ss, const size_t* ds) {
    for (size_t i = kf_gid(); i < n; i += kf_gstride()) {
        size_t rest = i, so = src_off, dof = dst_off;
        for (int k = 5; k >= 0; --k) {
            const size_t ik = rest % shape[k];
            rest /= shape[k];
            so += ik * ss[k];
            dof += ik * ds[k];
        }
        dst[dof] = src[so];
    }
}

#define KF_STRIDED_COPY(T, SUFFIX)                                                                              \
    extern "C" __global__ void strided_copy_##SUFFIX(                                                           \
        const T* __restrict__ src, size_t src_off, T* __restrict__ dst, size_t dst_off, size_t n, size_t d0,   \
        size_t d1, size_t d2, size_t d3, size_t d4, size_t d5, size_t s0, size_t s1, size_t s2, size_t s3,     \
        size_t s4, size_t s5, size_t t0, size_t t1, size_t t2, size_t t3, size_t t4, size_t t5) {              \
        const size_t shape[6] = {d0, d1, d2, d3, d4, d5};                                                       \
        const size_t ss[6] = {s0, s1, s2, s3, s4, s5};                                                          \
        const size_t ds[6] = {t0, t1, t2, t3, t4, t5};                                                          \
        kf_strided_copy<T>(src, src_off, dst, dst_off, n, shape, ss, ds);                                       \
    }

KF_STRIDED_COPY(unsigned short, b16)
KF_STRIDED_COPY(unsigned int, b32)
KF_STRIDED_COPY(unsigned long long, b64)

template <class From, class To>
__device__ __forceinline__ To kf_cast(From v);
template <> __device__ __forceinline__ __half kf_cast<float, __half>(float v) { return __float2half(v); }
template <> __device__ __forceinline__ __nv_bfloat16 kf_cast<float, __nv_bfloat16>(float v) {
    return __float2bfloat16(v);
}
template <> __device__ __forceinline__ float kf_cast<__half, float>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float kf_cast<__nv_bfloat16, float>(__nv_bfloat16 v) {
    return __bfloat162float(v);
}
template <> __device__ __forceinline__ float kf_cast<double, float>(double v) { return (float)v; }
template <> __device__ __forceinline__ double kf_cast<float, double>(float v) { return (double)v; }

#define KF_CAST(FROM, TO, NAME)                                                                                \
    extern "C" __global__ void NAME(const FROM* __restrict__ in, size_t in_off, TO* __restrict__ out,         \
                                    size_t n) {                                                                 \
        for (size_t i = kf_gid(); i < n; i += kf_gstride()) out[i] = kf_cast<FROM, TO>(in[in_off + i]);        \
    }

KF_CAST(float, __half, cast_f32_f16)
KF_CAST(float, __nv_bfloat16, cast_f32_bf16)
KF_CAST(__half, float, cast_f16_f32)
KF_CAST(__nv_bfloat16, float, cast_bf16_f32)
KF_CAST(double, float, cast_f64_f32)
KF_CAST(float, double, cast_f32_f64)
