// cuda_emu.h: the CUDA device dialect for the host C++ compiler, force-included
// (`-include cuda_emu.h`) in front of every unmodified kernels/*.cu when it is
// built for the CPU emulator (kernels/emu). The runtime (runtime.cpp) runs the
// blocks of a grid one after another and the threads of a block as fibers.
#pragma once
#ifndef KF_EMU
#define KF_EMU 1
#endif

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <cstdio>
#include <utility>
#include <type_traits>

// ---------------------------------------------------------------- qualifiers
#define __global__
#define __device__
#define __host__
#define __constant__
#define __managed__
// Block-scope thread_local is static: one copy per OS thread, shared by all
// fibers (threads) of the block being run; `extern __shared__ T x[]` declares
// the dynamic shared memory, defined by the generated launcher of the .cu.
#define __shared__ thread_local
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __restrict__ __restrict
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)
#define __grid_constant__

struct uint3 {
    unsigned int x, y, z;
};
struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
    constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};

// ---------------------------------------------------------------- the runtime's C ABI
extern "C" {
// Constant for the fiber that calls them (a fiber never changes block or thread).
uint3 kf_emu_thread_idx(void) __attribute__((const));
uint3 kf_emu_block_idx(void) __attribute__((const));
dim3 kf_emu_block_dim(void) __attribute__((const));
dim3 kf_emu_grid_dim(void) __attribute__((const));
void __syncthreads(void);
int kf_emu_syncthreads_op(int op, int pred);
void kf_emu_syncwarp(unsigned mask);
uint64_t kf_emu_warp_op(int op, unsigned mask, uint64_t bits, int arg, int width);
unsigned kf_emu_activemask(void);
uint64_t kf_emu_atomic(int op, int type, void* p, uint64_t a, uint64_t b);
void kf_emu_trap(const char* what) __attribute__((noreturn));
void kf_emu_cp_async(void* dst, const void* src, unsigned n);
void kf_emu_cp_async_commit(void);
void kf_emu_cp_async_wait(unsigned newer);
}

#define threadIdx (kf_emu_thread_idx())
#define blockIdx (kf_emu_block_idx())
#define blockDim (kf_emu_block_dim())
#define gridDim (kf_emu_grid_dim())
#define warpSize 32

// ---------------------------------------------------------------- barriers
enum { KF_SYNC_COUNT = 1, KF_SYNC_AND = 2, KF_SYNC_OR = 3 };
inline int __syncthreads_count(int p) { return kf_emu_syncthreads_op(KF_SYNC_COUNT, p); }
inline int __syncthreads_and(int p) { return kf_emu_syncthreads_op(KF_SYNC_AND, p); }
inline int __syncthreads_or(int p) { return kf_emu_syncthreads_op(KF_SYNC_OR, p); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { kf_emu_syncwarp(mask); }
inline void __threadfence(void) {}
inline void __threadfence_block(void) {}
inline void __trap(void) { kf_emu_trap("__trap()"); }
inline unsigned __activemask(void) { return kf_emu_activemask(); }

// ---------------------------------------------------------------- warp collectives
enum { KF_SHFL_IDX = 1, KF_SHFL_UP = 2, KF_SHFL_DOWN = 3, KF_SHFL_XOR = 4, KF_BALLOT = 5, KF_ANY = 6, KF_ALL = 7 };
template <class T>
__attribute__((always_inline)) inline T kf_emu_shfl(int op, unsigned mask, T v, int arg, int width) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a type wider than 8 bytes");
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    bits = kf_emu_warp_op(op, mask, bits, arg, width);
    T r;
    std::memcpy(&r, &bits, sizeof(T));
    return r;
}
template <class T>
__attribute__((always_inline)) inline T __shfl_sync(unsigned m, T v, int src, int w = 32) { return kf_emu_shfl(KF_SHFL_IDX, m, v, src, w); }
template <class T>
__attribute__((always_inline)) inline T __shfl_up_sync(unsigned m, T v, unsigned d, int w = 32) { return kf_emu_shfl(KF_SHFL_UP, m, v, (int)d, w); }
template <class T>
__attribute__((always_inline)) inline T __shfl_down_sync(unsigned m, T v, unsigned d, int w = 32) { return kf_emu_shfl(KF_SHFL_DOWN, m, v, (int)d, w); }
template <class T>
__attribute__((always_inline)) inline T __shfl_xor_sync(unsigned m, T v, int lm, int w = 32) { return kf_emu_shfl(KF_SHFL_XOR, m, v, lm, w); }
__attribute__((always_inline)) inline unsigned __ballot_sync(unsigned m, int p) { return (unsigned)kf_emu_warp_op(KF_BALLOT, m, p != 0, 0, 32); }
__attribute__((always_inline)) inline int __any_sync(unsigned m, int p) { return (int)kf_emu_warp_op(KF_ANY, m, p != 0, 0, 32); }
__attribute__((always_inline)) inline int __all_sync(unsigned m, int p) { return (int)kf_emu_warp_op(KF_ALL, m, p != 0, 0, 32); }

// ---------------------------------------------------------------- tensor cores
// mma.sync m16n8k16 (bf16 in, f32 accumulate) and ldmatrix as warp collectives: each lane
// hands the runtime a pointer to its fragment (runtime.cpp: warp_mma_bf16, warp_ldmatrix).
enum { KF_MMA_BF16 = 9, KF_LDMATRIX = 10, KF_LDMATRIX_T = 11 };
struct kf_emu_mma_frag {
    uint32_t a[4], b[2];
    float c[4], d[4];
};
struct kf_emu_ldm_frag {
    uint64_t addr;
    uint32_t r[4];
};

// ---------------------------------------------------------------- atomics
// Done by the (uninstrumented) runtime: bounds-checked, exempt from race checks.
enum { KF_AT_ADD = 1, KF_AT_MAX = 2, KF_AT_MIN = 3, KF_AT_CAS = 4, KF_AT_EXCH = 5 };
enum { KF_T_I32 = 1, KF_T_U32 = 2, KF_T_U64 = 3, KF_T_F32 = 4, KF_T_F64 = 5 };
template <class T> struct kf_emu_tcode;
template <> struct kf_emu_tcode<int> { static constexpr int v = KF_T_I32; };
template <> struct kf_emu_tcode<unsigned int> { static constexpr int v = KF_T_U32; };
template <> struct kf_emu_tcode<unsigned long long> { static constexpr int v = KF_T_U64; };
template <> struct kf_emu_tcode<float> { static constexpr int v = KF_T_F32; };
template <> struct kf_emu_tcode<double> { static constexpr int v = KF_T_F64; };
template <class T>
inline T kf_emu_atomic_t(int op, T* p, T a, T b) {
    uint64_t ua = 0, ub = 0;
    std::memcpy(&ua, &a, sizeof(T));
    std::memcpy(&ub, &b, sizeof(T));
    uint64_t r = kf_emu_atomic(op, kf_emu_tcode<T>::v, p, ua, ub);
    T out;
    std::memcpy(&out, &r, sizeof(T));
    return out;
}
template <class T> inline T atomicAdd(T* p, T v) { return kf_emu_atomic_t<T>(KF_AT_ADD, p, v, T(0)); }
template <class T> inline T atomicMax(T* p, T v) { return kf_emu_atomic_t<T>(KF_AT_MAX, p, v, T(0)); }
template <class T> inline T atomicMin(T* p, T v) { return kf_emu_atomic_t<T>(KF_AT_MIN, p, v, T(0)); }
template <class T> inline T atomicExch(T* p, T v) { return kf_emu_atomic_t<T>(KF_AT_EXCH, p, v, T(0)); }
template <class T> inline T atomicCAS(T* p, T cmp, T v) { return kf_emu_atomic_t<T>(KF_AT_CAS, p, cmp, v); }

// ---------------------------------------------------------------- math and intrinsics
// The fast-math intrinsics compute the exact host function here; kernels that
// rely on their approximation error are not emulated bit for bit.
inline float __expf(float x) { return ::expf(x); }
inline float __logf(float x) { return ::logf(x); }
inline float __sinf(float x) { return ::sinf(x); }
inline float __cosf(float x) { return ::cosf(x); }
inline float __tanf(float x) { return ::tanf(x); }
inline float __powf(float x, float y) { return ::powf(x, y); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float rsqrtf(float x) { return 1.0f / ::sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / ::sqrt(x); }
inline float __frsqrt_rn(float x) { return 1.0f / ::sqrtf(x); }
inline float __fsqrt_rn(float x) { return ::sqrtf(x); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fmaf_rn(float a, float b, float c) { return ::fmaf(a, b, c); }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }
inline int __float_as_int(float x) { int r; std::memcpy(&r, &x, 4); return r; }
inline unsigned __float_as_uint(float x) { unsigned r; std::memcpy(&r, &x, 4); return r; }
inline float __int_as_float(int x) { float r; std::memcpy(&r, &x, 4); return r; }
inline float __uint_as_float(unsigned x) { float r; std::memcpy(&r, &x, 4); return r; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline unsigned __brev(unsigned x) {
    x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
    x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
    x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
    x = ((x >> 8) & 0x00ff00ffu) | ((x & 0x00ff00ffu) << 8);
    return (x >> 16) | (x << 16);
}
template <class T> inline T __ldg(const T* p) { return *p; }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return ::fminf(a, b); }
inline float max(float a, float b) { return ::fmaxf(a, b); }
inline double min(double a, double b) { return ::fmin(a, b); }
inline double max(double a, double b) { return ::fmax(a, b); }

// The build script preprocesses each .cu once with KF_EMU_SCAN to find its
// `extern "C" __global__` entry points and `extern __shared__` arrays.
#ifdef KF_EMU_SCAN
#undef __global__
#define __global__ __kf_global__
#undef __shared__
#define __shared__ __kf_shared__
#endif
