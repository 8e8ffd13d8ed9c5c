// kf_emu_half.h: __half and __nv_bfloat16 for the CPU emulator (storage types
// with round-to-nearest-even conversions, arithmetic through float), included
// by the emulator's cuda_fp16.h / cuda_bf16.h shims.
#pragma once
#include <cstdint>
#include <cstring>

inline float kf_emu_bits_f32(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t kf_emu_f32_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

inline uint16_t kf_emu_f32_to_f16(float f) {
    uint32_t x = kf_emu_f32_bits(f);
    uint32_t sign = (x >> 16) & 0x8000u;
    uint32_t ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) return (uint16_t)(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0u));
    if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);  // rounds to >= 65520: inf
    if (ax < 0x38800000u) {  // subnormal half (or zero): exact in f32 arithmetic
        float m = kf_emu_bits_f32(ax) * 16777216.0f;  // * 2^24: units of the smallest subnormal
        uint32_t q = (uint32_t)m;
        float r = m - (float)q;
        if (r > 0.5f || (r == 0.5f && (q & 1u))) q++;
        return (uint16_t)(sign | q);
    }
    uint32_t e = (ax >> 23) - 112u;
    uint32_t mant = ax & 0x7fffffu;
    uint32_t h = (e << 10) | (mant >> 13);
    uint32_t rest = mant & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) h++;
    return (uint16_t)(sign | h);
}
inline float kf_emu_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0) {
        float v = (float)m * (1.0f / 16777216.0f);
        return sign ? -v : v;
    }
    if (e == 31) return kf_emu_bits_f32(sign | 0x7f800000u | (m << 13));
    return kf_emu_bits_f32(sign | ((e + 112u) << 23) | (m << 13));
}
inline uint16_t kf_emu_f32_to_bf16(float f) {
    uint32_t x = kf_emu_f32_bits(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40u);
    x += 0x7fffu + ((x >> 16) & 1u);
    return (uint16_t)(x >> 16);
}
inline float kf_emu_bf16_to_f32(uint16_t b) { return kf_emu_bits_f32((uint32_t)b << 16); }

#define KF_EMU_HALF_TYPE(T, TO, FROM)                                              \
    struct T {                                                                     \
        uint16_t __x;                                                              \
        T() = default;                                                             \
        T(float f) : __x(TO(f)) {}                                                 \
        T(double f) : __x(TO((float)f)) {}                                         \
        T(int f) : __x(TO((float)f)) {}                                            \
        operator float() const { return FROM(__x); }                               \
        T& operator+=(T o) { *this = T(float(*this) + float(o)); return *this; }   \
        T& operator-=(T o) { *this = T(float(*this) - float(o)); return *this; }   \
        T& operator*=(T o) { *this = T(float(*this) * float(o)); return *this; }   \
        T& operator/=(T o) { *this = T(float(*this) / float(o)); return *this; }   \
    };                                                                             \
    inline T operator+(T a, T b) { return T(float(a) + float(b)); }                \
    inline T operator-(T a, T b) { return T(float(a) - float(b)); }                \
    inline T operator*(T a, T b) { return T(float(a) * float(b)); }                \
    inline T operator/(T a, T b) { return T(float(a) / float(b)); }                \
    inline T operator-(T a) { T r; r.__x = (uint16_t)(a.__x ^ 0x8000u); return r; }
