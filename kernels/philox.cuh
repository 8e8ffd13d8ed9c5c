// philox.cuh: Philox4x32-10 (Random123, Salmon et al. SC'11) and the engine's
// mapping (seed, stream, counter) -> block and u32 -> uniform, a verbatim copy
// of engine/src/rng.rs (change both or neither; kernels/emu/tests/parity_k2.rs
// compares the words and the uniforms bit for bit). Plain integer arithmetic
// (the 32x32 -> 64-bit product is mul.wide / mul.hi on the GPU), so the same
// source runs under the emulator.
#pragma once

#define KF_PHILOX_M0 0xD2511F53u
#define KF_PHILOX_M1 0xCD9E8D57u
#define KF_PHILOX_W0 0x9E3779B9u
#define KF_PHILOX_W1 0xBB67AE85u

// One 128-bit Philox block: words w0..w3 (w0 first, as rng.rs's [u32; 4]).
struct kf_philox4 {
    unsigned w0, w1, w2, w3;
};

// Philox4x32 with 10 rounds: round with the key, then (bump key, round) nine times.
__device__ __forceinline__ kf_philox4 kf_philox4x32_10(kf_philox4 c, unsigned k0, unsigned k1) {
    for (int r = 0; r < 10; ++r) {
        if (r > 0) {
            k0 += KF_PHILOX_W0;
            k1 += KF_PHILOX_W1;
        }
        const unsigned long long p0 = (unsigned long long)KF_PHILOX_M0 * c.w0;
        const unsigned long long p1 = (unsigned long long)KF_PHILOX_M1 * c.w2;
        const unsigned hi0 = (unsigned)(p0 >> 32), lo0 = (unsigned)p0;
        const unsigned hi1 = (unsigned)(p1 >> 32), lo1 = (unsigned)p1;
        c = kf_philox4{hi1 ^ c.w1 ^ k0, lo1, hi0 ^ c.w3 ^ k1, lo0};
    }
    return c;
}

// Block `counter` of stream `stream` under key `seed` (rng.rs Philox::block):
// key = [seed lo, seed hi], ctr = [counter lo, counter hi, stream lo, stream hi].
__device__ __forceinline__ kf_philox4 kf_philox_block(unsigned long long seed, unsigned long long stream,
                                                      unsigned long long counter) {
    const kf_philox4 ctr{(unsigned)counter, (unsigned)(counter >> 32), (unsigned)stream, (unsigned)(stream >> 32)};
    return kf_philox4x32_10(ctr, (unsigned)seed, (unsigned)(seed >> 32));
}

// Word j (0..3) of a block, j known at compile time after unrolling.
__device__ __forceinline__ unsigned kf_philox_word(const kf_philox4& b, int j) {
    return j == 0 ? b.w0 : j == 1 ? b.w1 : j == 2 ? b.w2 : b.w3;
}

// ((w >> 9) + 0.5) * 2^-23: exact in f32, in [2^-24, 1 - 2^-24].
__device__ __forceinline__ float kf_u32_to_unit_f32(unsigned w) { return ((float)(w >> 9) + 0.5f) * 0x1p-23f; }

// ((x >> 12) + 0.5) * 2^-52: exact in f64, in [2^-53, 1 - 2^-53].
__device__ __forceinline__ double kf_u64_to_unit_f64(unsigned long long x) {
    return ((double)(x >> 12) + 0.5) * 0x1p-52;
}
