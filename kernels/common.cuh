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
