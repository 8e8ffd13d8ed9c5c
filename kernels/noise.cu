// noise.cu: the sinusoidal noise features of ops/src/noise.rs: for values
// s [N] (f64, as the noise encoder holds u and tau) and j < d/2,
// f_j = 10000^(-j / (d/2)), out[n, j] = cos(2 pi s_n f_j) and
// out[n, d/2 + j] = sin(2 pi s_n f_j) (all cosines, then all sines).
// Computed in double on the device, as the CPU op computes in f64, and
// rounded once to the storage dtype; the op is small (N rows of d), so the
// double-precision sincos costs little. Rows are `ld` elements apart (ld >= d),
// so the features of u and tau can be written side by side into one
// [N, 2d] buffer. Grid-stride over the N * d/2 (cos, sin) pairs.
// Letters: N values, d features (even), ld the output row stride.
#include "common.cuh"

template <class T>
__device__ __forceinline__ void kf_noise_features(const double* __restrict__ s, T* __restrict__ out, size_t n,
                                                  unsigned d, size_t ld) {
    const unsigned half = d >> 1;
    const size_t total = n * half;
    for (size_t i = kf_gid(); i < total; i += kf_gstride()) {
        const size_t r = i / half;
        const unsigned j = (unsigned)(i - r * half);
        const double f = pow(10000.0, -(double)j / (double)half);
        double sv, cv;
        sincos(6.283185307179586 * s[r] * f, &sv, &cv);
        out[r * ld + j] = kf_from_f32<T>((float)cv);
        out[r * ld + half + j] = kf_from_f32<T>((float)sv);
    }
}

#define KF_NOISE(T, SUFFIX)                                                                                \
    extern "C" __global__ void noise_features_##SUFFIX(const double* __restrict__ s, T* __restrict__ out, \
                                                       size_t n, unsigned d, size_t ld) {                 \
        kf_noise_features<T>(s, out, n, d, ld);                                                            \
    }

KF_NOISE(float, f32)
KF_NOISE(__half, f16)
KF_NOISE(__nv_bfloat16, bf16)
