// exact_f64.cuh: f64 arithmetic that must give the same bits as the CPU ops
// (sampling.cu, argmax.cu): every add, multiply and divide rounded on its own
// (the __d*_rn intrinsics are never contracted into an FMA, which NVRTC does
// by default with plain operators), and bit casts between f64 and u64. Under
// the emulator (KF_EMU, cuda_emu.h) these are the host's IEEE operations: the
// x86-64 baseline has no FMA to contract into, and the parity tests compare
// the results bit for bit. Also +inf and the sentinel tokens of the sampling
// and argmax kernels.
#pragma once

#ifdef KF_EMU
__device__ __forceinline__ double kf_dadd(double a, double b) { return a + b; }
__device__ __forceinline__ double kf_dsub(double a, double b) { return a - b; }
__device__ __forceinline__ double kf_dmul(double a, double b) { return a * b; }
__device__ __forceinline__ double kf_ddiv(double a, double b) { return a / b; }
__device__ __forceinline__ unsigned long long kf_dbits(double x) {
    unsigned long long r;
    std::memcpy(&r, &x, 8);
    return r;
}
__device__ __forceinline__ double kf_bitsd(unsigned long long b) {
    double r;
    std::memcpy(&r, &b, 8);
    return r;
}
#else
__device__ __forceinline__ double kf_dadd(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ double kf_dsub(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ double kf_dmul(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ double kf_ddiv(double a, double b) { return __ddiv_rn(a, b); }
__device__ __forceinline__ unsigned long long kf_dbits(double x) { return (unsigned long long)__double_as_longlong(x); }
__device__ __forceinline__ double kf_bitsd(unsigned long long b) { return __longlong_as_double((long long)b); }
#endif

// +inf as f32 (NVRTC has no INFINITY macro without the host's <cmath>).
#define KF_INF (__int_as_float(0x7f800000))

// Token values a sampling / argmax kernel writes instead of a token when the
// CPU op would return an error for that row (always >= any vocabulary size).
#define KF_TOKEN_NAN 0xffffffffu         // the row's logits contain NaN
#define KF_TOKEN_ALL_NEG_INF 0xfffffffeu // every logit of the row is -inf
