// philox.cu: fills buffers from the engine's Philox4x32-10 streams
// (kernels/philox.cuh, mirroring engine/src/rng.rs bit for bit):
// - philox_u32: the raw words of blocks counter .. counter + nb - 1, out[4 i + j] = word j of block counter + i;
// - philox_uniform_f32: out[i] = Philox::uniform_f32(start + i) (word e % 4 of block e / 4);
// - philox_uniform_f64: out[i] = Philox::uniform_f64(start + i) (words 2 (e % 2) lo, +1 hi of block e / 2).
// One thread per Philox block, grid-stride; no storage-dtype variants (the
// outputs are the raw words and the uniforms of rng.rs). Letters: n outputs,
// nb blocks; element indices must not wrap past 2^64.
#include "philox.cuh"

extern "C" __global__ void philox_u32(unsigned* __restrict__ out, unsigned long long nb, unsigned long long seed,
                                      unsigned long long stream, unsigned long long counter) {
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < nb;
         i += (unsigned long long)blockDim.x * gridDim.x) {
        const kf_philox4 b = kf_philox_block(seed, stream, counter + i);
        out[4 * i + 0] = b.w0;
        out[4 * i + 1] = b.w1;
        out[4 * i + 2] = b.w2;
        out[4 * i + 3] = b.w3;
    }
}

extern "C" __global__ void philox_uniform_f32(float* __restrict__ out, unsigned long long n, unsigned long long seed,
                                              unsigned long long stream, unsigned long long start) {
    if (n == 0) return;
    const unsigned long long first = start / 4, blocks = (start + n - 1) / 4 - first + 1;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < blocks;
         i += (unsigned long long)blockDim.x * gridDim.x) {
        const kf_philox4 b = kf_philox_block(seed, stream, first + i);
        for (int j = 0; j < 4; ++j) {
            const unsigned long long e = 4 * (first + i) + j;
            if (e >= start && e - start < n) out[e - start] = kf_u32_to_unit_f32(kf_philox_word(b, j));
        }
    }
}

extern "C" __global__ void philox_uniform_f64(double* __restrict__ out, unsigned long long n, unsigned long long seed,
                                              unsigned long long stream, unsigned long long start) {
    if (n == 0) return;
    const unsigned long long first = start / 2, blocks = (start + n - 1) / 2 - first + 1;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < blocks;
         i += (unsigned long long)blockDim.x * gridDim.x) {
        const kf_philox4 b = kf_philox_block(seed, stream, first + i);
        const unsigned long long e0 = 2 * (first + i);
        if (e0 >= start && e0 - start < n)
            out[e0 - start] = kf_u64_to_unit_f64(((unsigned long long)b.w1 << 32) | b.w0);
        if (e0 + 1 >= start && e0 + 1 - start < n)
            out[e0 + 1 - start] = kf_u64_to_unit_f64(((unsigned long long)b.w3 << 32) | b.w2);
    }
}
