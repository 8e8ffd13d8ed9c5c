// cuda_bf16.h for the CPU emulator: __nv_bfloat16 and its conversions.
#pragma once
#include "kf_emu_half.h"
#ifndef KF_EMU_BF16_DEFINED
#define KF_EMU_BF16_DEFINED
KF_EMU_HALF_TYPE(__nv_bfloat16, kf_emu_f32_to_bf16, kf_emu_bf16_to_f32)
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
inline float __bfloat162float(__nv_bfloat16 h) { return float(h); }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { __nv_bfloat16 h; h.__x = u; return h; }
#endif
