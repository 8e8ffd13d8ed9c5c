// common.cuh: helpers shared by the kernel families (kernels/*.cu): warp and
// block sums over shuffles, grid-stride indexing, f32 <-> storage conversions.
// Compiled by NVRTC for the GPU and by the host compiler for the emulator
// (kernels/emu), unchanged. Letters: T threads per block, W = T / 32 warps.
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#define KF_FULL_MASK 0xffffffffu

// Sum over the 32 lanes of a warp; every lane gets the result.
__device__ __forceinline__ float kf_warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(KF_FULL_MASK, v, o);
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread
// gets the result. `scratch` is 32 floats of shared memory, reusable right
// after the call: the first barrier orders this call's writes after the
// previous call's reads.
__device__ __forceinline__ float kf_block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = kf_warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nw ? scratch[lane] : 0.0f;
    return kf_warp_sum(v);
}

// First index and stride of a 1-D grid-stride loop (64-bit: n may exceed 2^32).
__device__ __forceinline__ size_t kf_gid() { return (size_t)blockIdx.x * blockDim.x + threadIdx.x; }
__device__ __forceinline__ size_t kf_gstride() { return (size_t)blockDim.x * gridDim.x; }

// Storage <-> compute (f32) conversions, so one template serves every dtype.
__device__ __forceinline__ float kf_to_f32(float v) { return v; }
__device__ __forceinline__ float kf_to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float kf_to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
template <class T> __device__ __forceinline__ T kf_from_f32(float v);
template <> __device__ __forceinline__ float kf_from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half kf_from_f32<__half>(float v) { return __float2half(v); }
template <> __device__ __forceinline__ __nv_bfloat16 kf_from_f32<__nv_bfloat16>(float v) { return __float2bfloat16(v); }

// Asynchronous global -> shared copies (sm_80 cp.async), `n` = 4, 8 or 16 bytes, both
// addresses aligned to n: issue, commit the issued copies as a group, wait until at most
// `newer` of this thread's committed groups are in flight. The shared bytes may be read
// only after the wait (and a barrier, for other threads); the emulator fails an access
// before the wait (a missing wait_group), so double buffering is checked, not assumed.
#ifdef KF_EMU
__device__ __forceinline__ void kf_cp_async(void* smem, const void* gmem, unsigned n) { kf_emu_cp_async(smem, gmem, n); }
__device__ __forceinline__ void kf_cp_async_commit() { kf_emu_cp_async_commit(); }
template <int N> __device__ __forceinline__ void kf_cp_async_wait() { kf_emu_cp_async_wait(N); }
#else
__device__ __forceinline__ void kf_cp_async(void* smem, const void* gmem, unsigned n) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    if (n == 16) asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
    else if (n == 8) asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(s), "l"(gmem));
    else asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(s), "l"(gmem));
}
__device__ __forceinline__ void kf_cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void kf_cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }
#endif

// Tensor cores (sm_80): D [16 x 8] f32 = A [16 x 16] bf16 (row) x B [16 x 8] bf16 (col) + C,
// one warp, fragments in the PTX ISA layout of mma.m16n8k16 (lane l, g = l / 4, t = l % 4:
// a[0..3] hold A (g, 2t..), (g + 8, 2t..), (g, 2t + 8..), (g + 8, 2t + 8..); b[0..1] hold
// B (2t.., g), (2t + 8.., g); c/d[0..3] hold (g, 2t), (g, 2t + 1), (g + 8, 2t), (g + 8, 2t + 1)).
// ldmatrix: lane 8 j + r passes the address of row r (16 bytes) of 8 x 8 matrix j in shared
// memory; r[j] receives row l / 4, columns 2 (l % 4) and + 1 of matrix j (.trans: of its
// transpose) — so x4 of A's four 8 x 8 quarters gives a[], x2 .trans of B's two gives b[].
#ifdef KF_EMU
__device__ __forceinline__ void kf_mma_bf16_16816(float d[4], const unsigned a[4], const unsigned b[2], const float c[4]) {
    kf_emu_mma_frag fr;
    for (int i = 0; i < 4; i++) fr.a[i] = a[i], fr.c[i] = c[i];
    fr.b[0] = b[0], fr.b[1] = b[1];
    kf_emu_warp_op(KF_MMA_BF16, KF_FULL_MASK, (uint64_t)(uintptr_t)&fr, 0, 32);
    for (int i = 0; i < 4; i++) d[i] = fr.d[i];
}
__device__ __forceinline__ void kf_emu_ldmatrix(unsigned* r, int count, int op, const void* row) {
    kf_emu_ldm_frag fr;
    fr.addr = (uint64_t)(uintptr_t)row;
    kf_emu_warp_op(op, KF_FULL_MASK, (uint64_t)(uintptr_t)&fr, count, 32);
    for (int j = 0; j < count; j++) r[j] = fr.r[j];
}
__device__ __forceinline__ void kf_ldmatrix_x4(unsigned r[4], const void* row) { kf_emu_ldmatrix(r, 4, KF_LDMATRIX, row); }
__device__ __forceinline__ void kf_ldmatrix_x2(unsigned r[2], const void* row) { kf_emu_ldmatrix(r, 2, KF_LDMATRIX, row); }
__device__ __forceinline__ void kf_ldmatrix_x2_trans(unsigned r[2], const void* row) { kf_emu_ldmatrix(r, 2, KF_LDMATRIX_T, row); }
#else
__device__ __forceinline__ void kf_mma_bf16_16816(float d[4], const unsigned a[4], const unsigned b[2], const float c[4]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
}
__device__ __forceinline__ void kf_ldmatrix_x4(unsigned r[4], const void* row) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s));
}
__device__ __forceinline__ void kf_ldmatrix_x2(unsigned r[2], const void* row) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(s));
}
__device__ __forceinline__ void kf_ldmatrix_x2_trans(unsigned r[2], const void* row) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(s));
}
#endif
