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
