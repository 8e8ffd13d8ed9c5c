// cuda_fp16.h for the CPU emulator: __half and the conversions the kernels use.
#pragma once
#include "kf_emu_half.h"
#ifndef KF_EMU_HALF_DEFINED
#define KF_EMU_HALF_DEFINED
KF_EMU_HALF_TYPE(__half, kf_emu_f32_to_f16, kf_emu_f16_to_f32)
inline __half __float2half(float f) { return __half(f); }
inline __half __float2half_rn(float f) { return __half(f); }
inline float __half2float(__half h) { return float(h); }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __ushort_as_half(unsigned short u) { __half h; h.__x = u; return h; }
inline __half __hadd(__half a, __half b) { return a + b; }
inline __half __hsub(__half a, __half b) { return a - b; }
inline __half __hmul(__half a, __half b) { return a * b; }
inline __half __hdiv(__half a, __half b) { return a / b; }
inline __half __hfma(__half a, __half b, __half c) { return __half(::fmaf(float(a), float(b), float(c))); }
#endif
