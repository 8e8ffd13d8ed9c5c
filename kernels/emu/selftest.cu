// selftest.cu: kernels that test the emulator itself (not shipped as PTX; NVRTC compiles
// them in tools/ptxgen/tests/fresh.rs): a shuffle-based block reduction, a tiled
// shared-memory transpose, warp votes, atomics, dynamic shared memory, cp.async groups,
// mma.sync m16n8k16 bf16 with fragments from global memory and from ldmatrix,
// and planted faults that the emulator must report (a shared-memory race, an
// out-of-bounds write, a divergent barrier, a read before cp.async.wait_group, ...).
// Letters: n elements, R x C matrices, T threads per block.
#include "common.cuh"  // kernels/, on the include path of NVRTC and of the emulator

// out[block] = sum of x over the block's grid-stride share (any T that is a multiple of 32).
extern "C" __global__ void selftest_block_sum(const float* __restrict__ x, float* __restrict__ out, unsigned n) {
    __shared__ float scratch[32];
    float s = 0.0f;
    for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) s += x[i];
    s = kf_block_sum(s, scratch);
    if (threadIdx.x == 0) out[blockIdx.x] = s;
}

// out [C, R] = in [R, C]ᵀ through a 32 x 33 tile (padded: no bank conflicts), blocks of 32 x 8.
extern "C" __global__ void selftest_transpose(const float* __restrict__ in, float* __restrict__ out, int rows,
                                              int cols) {
    __shared__ float tile[32][33];
    const int bx = blockIdx.x * 32, by = blockIdx.y * 32;
    for (int k = threadIdx.y; k < 32; k += blockDim.y) {
        const int r = by + k, c = bx + threadIdx.x;
        if (r < rows && c < cols) tile[k][threadIdx.x] = in[(size_t)r * cols + c];
    }
    __syncthreads();
    for (int k = threadIdx.y; k < 32; k += blockDim.y) {
        const int r = bx + k, c = by + threadIdx.x;  // out row r = in column r
        if (r < cols && c < rows) out[(size_t)r * rows + c] = tile[threadIdx.x][k];
    }
}

// Per thread t of one block: out[4t..4t+4] = ballot, any, all of pred, then the
// inclusive warp prefix sum of pred by __shfl_up_sync; out2[t] = lane 0's value
// (__shfl_sync) and __syncthreads_count(pred) (T a multiple of 32).
extern "C" __global__ void selftest_warp_votes(const int* __restrict__ pred, unsigned* __restrict__ out,
                                               unsigned* __restrict__ out2) {
    const unsigned t = threadIdx.x, lane = t & 31;
    const int p = pred[t];
    unsigned scan = p;
    for (int o = 1; o < 32; o <<= 1) {
        const unsigned v = __shfl_up_sync(KF_FULL_MASK, scan, o);
        if ((int)lane >= o) scan += v;
    }
    out[4 * t + 0] = __ballot_sync(KF_FULL_MASK, p);
    out[4 * t + 1] = __any_sync(KF_FULL_MASK, p);
    out[4 * t + 2] = __all_sync(KF_FULL_MASK, p);
    out[4 * t + 3] = scan;
    const unsigned first = __shfl_sync(KF_FULL_MASK, (unsigned)(p * 1000 + t), 0);
    const int cnt = __syncthreads_count(p);
    out2[2 * t] = first;
    out2[2 * t + 1] = (unsigned)cnt;
}

// sum += x[i], max = max(bits), count = number of elements; a CAS loop adds 1 to cas_sum per element.
extern "C" __global__ void selftest_atomics(const float* __restrict__ x, float* sum, int* maxv, unsigned* count,
                                            unsigned* cas_sum, unsigned n) {
    for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {
        atomicAdd(sum, x[i]);
        atomicMax(maxv, (int)(x[i] * 1000.0f));
        atomicAdd(count, 1u);
        unsigned old = *cas_sum, seen;
        do {
            seen = old;
            old = atomicCAS(cas_sum, seen, seen + 1u);
        } while (old != seen);
    }
}

// Reverses each block's chunk of T elements through dynamic shared memory (T floats).
extern "C" __global__ void selftest_dyn_reverse(const float* __restrict__ x, float* __restrict__ out, unsigned n) {
    extern __shared__ float dyn[];
    const unsigned t = threadIdx.x, i = blockIdx.x * blockDim.x + t;
    dyn[t] = i < n ? x[i] : 0.0f;
    __syncthreads();
    const unsigned j = blockIdx.x * blockDim.x + (blockDim.x - 1 - t);
    if (j < n) out[j] = dyn[t];
}

// ---------------------------------------------------------------- planted faults

// Race: each thread writes its slot and reads its neighbour's with no barrier between.
extern "C" __global__ void fault_race(float* out) {
    __shared__ float s[256];
    s[threadIdx.x] = (float)threadIdx.x;
    out[threadIdx.x] = s[(threadIdx.x + 1) % blockDim.x];
}

// Out of bounds: `<=` writes one element past the end of out [n].
extern "C" __global__ void fault_oob_write(float* out, unsigned n) {
    const unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i <= n) out[i] = 1.0f;
}

// Divergent barrier: only the first half of the block reaches __syncthreads().
extern "C" __global__ void fault_divergent_barrier(float* out) {
    if (threadIdx.x < blockDim.x / 2) {
        __syncthreads();
    }
    out[threadIdx.x] = 1.0f;
}

// Divergent warp collective: a shuffle inside a branch that half of the warp skips.
extern "C" __global__ void fault_divergent_shuffle(float* out) {
    float v = (float)threadIdx.x;
    if (threadIdx.x % 32 < 16) v = __shfl_xor_sync(KF_FULL_MASK, v, 1);
    out[threadIdx.x] = v;
}

// Dynamic shared memory read beyond the bytes given at launch (T floats given, 2T read).
extern "C" __global__ void fault_dyn_smem_overrun(float* out) {
    extern __shared__ float dyn[];
    dyn[threadIdx.x] = 1.0f;
    __syncthreads();
    out[threadIdx.x] = dyn[threadIdx.x + blockDim.x];
}

// ---------------------------------------------------------------- cp.async
// out[t] = 2 in[T - 1 - t] through shared memory: the first T / 4 threads copy 16 bytes each
// with cp.async (T <= 256, a multiple of 4); `wait` = 0 plants the fault: the barrier and the
// reads come without a cp.async.wait_group.
extern "C" __global__ void selftest_cp_async(const float* __restrict__ in, float* __restrict__ out, int wait) {
    __shared__ __align__(16) float tile[256];
    const unsigned t = threadIdx.x, T = blockDim.x;
    if (t < T / 4) kf_cp_async(&tile[4 * t], &in[4 * t], 16);
    kf_cp_async_commit();
    if (wait) kf_cp_async_wait<0>();
    __syncthreads();
    out[t] = 2.0f * tile[T - 1 - t];
}

// Double buffering: two groups (halves of a 2T tile, 4-byte copies), wait_group 1 lands only
// the first; out[t] = the first half, then out[T + t] = the second half after wait_group 0
// (`second_wait` = 0 plants the fault: the second half is read while still in flight).
extern "C" __global__ void selftest_cp_async_groups(const float* __restrict__ in, float* __restrict__ out,
                                                    int second_wait) {
    __shared__ float tile[512];
    const unsigned t = threadIdx.x, T = blockDim.x;
    kf_cp_async(&tile[t], &in[t], 4);
    kf_cp_async_commit();
    kf_cp_async(&tile[T + t], &in[T + t], 4);
    kf_cp_async_commit();
    kf_cp_async_wait<1>();
    out[t] = tile[t];  // its own copy, landed: no barrier needed
    if (second_wait) kf_cp_async_wait<0>();
    out[T + t] = tile[T + t];
}

// ---------------------------------------------------------------- tensor cores
// D [16 x 8] = A [16 x 16] (bf16, row-major) x B [16 x 8] (bf16, row-major: B[k][n]) + C
// (f32), one warp: the mma.m16n8k16 fragments read straight from global memory by the
// layout formulas of common.cuh.
extern "C" __global__ void selftest_mma_bf16(const __nv_bfloat16* __restrict__ A, const __nv_bfloat16* __restrict__ B,
                                             const float* __restrict__ C, float* __restrict__ D) {
    const unsigned l = threadIdx.x, g = l / 4, t = l % 4;
    const unsigned short* a16 = (const unsigned short*)A;
    const unsigned short* b16 = (const unsigned short*)B;
    unsigned a[4], b[2];
    for (int r = 0; r < 4; r++) {
        const unsigned row = g + (r & 1) * 8, col = 2 * t + (r >> 1) * 8;
        a[r] = a16[row * 16 + col] | ((unsigned)a16[row * 16 + col + 1] << 16);
    }
    for (int r = 0; r < 2; r++) {
        const unsigned k = 2 * t + r * 8;
        b[r] = b16[k * 8 + g] | ((unsigned)b16[(k + 1) * 8 + g] << 16);
    }
    float c[4], d[4];
    for (int i = 0; i < 4; i++) c[i] = C[(g + (i >> 1) * 8) * 8 + 2 * t + (i & 1)];
    kf_mma_bf16_16816(d, a, b, c);
    for (int i = 0; i < 4; i++) D[(g + (i >> 1) * 8) * 8 + 2 * t + (i & 1)] = d[i];
}

// The same product with the fragments loaded by ldmatrix from shared memory: x4 of A's four
// 8 x 8 quarters, x2 .trans of B's two 8 x 8 halves (B row-major [k][n] is B's column-major
// view transposed).
extern "C" __global__ void selftest_mma_ldmatrix(const __nv_bfloat16* __restrict__ A,
                                                 const __nv_bfloat16* __restrict__ B, const float* __restrict__ C,
                                                 float* __restrict__ D) {
    __shared__ __align__(16) unsigned short As[16 * 16];
    __shared__ __align__(16) unsigned short Bs[16 * 8];
    const unsigned l = threadIdx.x, g = l / 4, t = l % 4;
    for (unsigned i = l; i < 256; i += 32) As[i] = ((const unsigned short*)A)[i];
    for (unsigned i = l; i < 128; i += 32) Bs[i] = ((const unsigned short*)B)[i];
    __syncthreads();
    unsigned a[4], b[2];
    const unsigned j = l / 8, r = l % 8;  // this lane's matrix and row
    kf_ldmatrix_x4(a, &As[((j & 1) * 8 + r) * 16 + (j >> 1) * 8]);
    kf_ldmatrix_x2_trans(b, &Bs[((j & 1) * 8 + r) * 8]);
    float c[4], d[4];
    for (int i = 0; i < 4; i++) c[i] = C[(g + (i >> 1) * 8) * 8 + 2 * t + (i & 1)];
    kf_mma_bf16_16816(d, a, b, c);
    for (int i = 0; i < 4; i++) D[(g + (i >> 1) * 8) * 8 + 2 * t + (i & 1)] = d[i];
}
