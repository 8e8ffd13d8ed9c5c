// layernorm.cu: LayerNorm forward (and, below, backward) over the last dimension D of x [R, D], one
// block per row, statistics in f32 by the same shifted two-pass method as the
// CPU op (ops/src/layernorm.rs): mean = x0 + sum(x - x0) / D, then
// var = (sum d^2 - (sum d)^2 / D) / D with d = x - mean. Optional bias (null),
// optional saved mean / rstd [R] for the backward (null). With `cached` != 0
// the row is kept in dynamic shared memory (D floats), read from global once.
// With `rms` != 0 it is RMSNorm (the Llama family's, ops/src/rmsnorm.rs): no
// centring (mean 0, saved as such) and 1/rstd^2 - eps = sum(x^2) / D, no bias.
// Letters: R rows, D features, T threads per block (a multiple of 32).
// The backward kernels follow the forward (see "backward" below).
#include "common.cuh"

// kf-hot: layernorm_fwd_f32 layernorm_fwd_f16 layernorm_fwd_bf16

template <class T>
__device__ __forceinline__ void kf_layernorm_fwd(const T* __restrict__ x, const T* __restrict__ w,
                                                 const T* __restrict__ b, T* __restrict__ out,
                                                 float* __restrict__ mean_out, float* __restrict__ rstd_out,
                                                 unsigned rows, unsigned d, float eps, int cached, int rms) {
    __shared__ float scratch[32];
    extern __shared__ float kf_row[];
    const unsigned r = blockIdx.x;
    if (r >= rows || d == 0) return;  // uniform over the block: no barrier is skipped by part of it
    const T* xr = x + (size_t)r * d;
    T* outr = out + (size_t)r * d;
    const float x0 = kf_to_f32(xr[0]);
    float s = 0.0f;
    for (unsigned j = threadIdx.x; j < d; j += blockDim.x) {
        const float v = kf_to_f32(xr[j]);
        if (cached) kf_row[j] = v;
        s += v - x0;
    }
    const float fd = (float)d;
    const float shift = kf_block_sum(s, scratch) / fd;  // every thread reaches the barrier
    const float mean = rms ? 0.0f : x0 + shift;
    float sd = 0.0f, sdd = 0.0f;
    for (unsigned j = threadIdx.x; j < d; j += blockDim.x) {
        const float v = (cached ? kf_row[j] : kf_to_f32(xr[j])) - mean;
        sd += v;
        sdd += v * v;
    }
    sd = kf_block_sum(sd, scratch);
    sdd = kf_block_sum(sdd, scratch);
    const float var = rms ? sdd / fd : fmaxf((sdd - sd * sd / fd) / fd, 0.0f);
    const float rstd = 1.0f / sqrtf(var + eps);
    for (unsigned j = threadIdx.x; j < d; j += blockDim.x) {
        const float v = cached ? kf_row[j] : kf_to_f32(xr[j]);
        float y = (v - mean) * rstd * kf_to_f32(w[j]);
        if (b) y += kf_to_f32(b[j]);
        outr[j] = kf_from_f32<T>(y);
    }
    if (threadIdx.x == 0) {
        if (mean_out) mean_out[r] = mean;
        if (rstd_out) rstd_out[r] = rstd;
    }
}

#define KF_LAYERNORM(T, SUFFIX)                                                                            \
    extern "C" __global__ void layernorm_fwd_##SUFFIX(const T* __restrict__ x, const T* __restrict__ w,   \
                                                      const T* __restrict__ b, T* __restrict__ out,        \
                                                      float* __restrict__ mean_out,                        \
                                                      float* __restrict__ rstd_out, unsigned rows,         \
                                                      unsigned d, float eps, int cached, int rms) {        \
        kf_layernorm_fwd<T>(x, w, b, out, mean_out, rstd_out, rows, d, eps, cached, rms);                  \
    }

KF_LAYERNORM(float, f32)
KF_LAYERNORM(__half, f16)
KF_LAYERNORM(__nv_bfloat16, bf16)

// ---------------------------------------------------------------- backward
// With xh = (x - mean) rstd and dxh = g w (mean, rstd [R] saved by the
// forward): dx = rstd (dxh - mean(dxh) - xh mean(dxh xh)) (layernorm_bwd_dx,
// one block per row, f32 sums), dw = sum over rows of g xh, db = sum of g.
// dw/db are reduced in two deterministic steps (no atomics, the same bits
// from run to run): layernorm_bwd_dwdb sums chunks of rows into partials
// [C, D] (a block (32, 8) per 32 columns and chunk: thread (tx, ty) sums the
// chunk's rows ty, ty + 8, ... of column tx, then ty = 0 adds the 8 sums in
// order), layernorm_bwd_reduce_f32 adds the C partials of each column in
// order. With C = 1 the partials are dw / db themselves and the reduce is
// skipped. db and its partials may be null (no bias). dw / db are f32 for
// every storage dtype. A null `mean` is RMSNorm's backward: xh = x rstd and
// dx = rstd (dxh - xh mean(dxh xh)) (no mean(dxh) term). Letters: C chunks of
// `chunk` rows.

// kf-hot: layernorm_bwd_dx_f32 layernorm_bwd_dx_f16 layernorm_bwd_dx_bf16
// kf-hot: layernorm_bwd_dwdb_f32 layernorm_bwd_dwdb_f16 layernorm_bwd_dwdb_bf16 layernorm_bwd_reduce_f32

template <class T>
__device__ __forceinline__ void kf_layernorm_bwd_dx(const T* __restrict__ x, const T* __restrict__ w,
                                                    const T* __restrict__ g, const float* __restrict__ mean,
                                                    const float* __restrict__ rstd, T* __restrict__ dx,
                                                    unsigned rows, unsigned d) {
    __shared__ float scratch[32];
    const unsigned r = blockIdx.x;
    if (r >= rows || d == 0) return;  // uniform over the block
    const size_t off = (size_t)r * d;
    const float m = mean ? mean[r] : 0.0f, rs = rstd[r];
    float s1 = 0.0f, s2 = 0.0f;
    for (unsigned j = threadIdx.x; j < d; j += blockDim.x) {
        const float xh = (kf_to_f32(x[off + j]) - m) * rs;
        const float dxh = kf_to_f32(g[off + j]) * kf_to_f32(w[j]);
        s1 += dxh;
        s2 += dxh * xh;
    }
    const float fd = (float)d;
    const float t1 = kf_block_sum(s1, scratch);  // every thread reaches the barrier
    const float c1 = mean ? t1 / fd : 0.0f;
    const float c2 = kf_block_sum(s2, scratch) / fd;
    for (unsigned j = threadIdx.x; j < d; j += blockDim.x) {
        const float xh = (kf_to_f32(x[off + j]) - m) * rs;
        const float dxh = kf_to_f32(g[off + j]) * kf_to_f32(w[j]);
        dx[off + j] = kf_from_f32<T>(rs * (dxh - c1 - xh * c2));
    }
}

template <class T>
__device__ __forceinline__ void kf_layernorm_bwd_dwdb(const T* __restrict__ x, const T* __restrict__ g,
                                                      const float* __restrict__ mean,
                                                      const float* __restrict__ rstd, float* __restrict__ part_dw,
                                                      float* __restrict__ part_db, unsigned rows, unsigned d,
                                                      unsigned chunk) {
    __shared__ float sdw[8][33], sdb[8][33];
    if (d == 0) return;  // uniform over the grid
    const unsigned tx = threadIdx.x, ty = threadIdx.y;
    const unsigned j = blockIdx.x * 32 + tx, c = blockIdx.y;
    // columns past D (the last tile) sum column D - 1 and drop it at the end:
    // no branch on j before the barrier (the emulator tells barriers apart by
    // call site, and the host compiler may duplicate one into both arms)
    const unsigned jc = min(j, d - 1);
    const unsigned r0 = c * chunk;
    const unsigned r1 = min(rows, r0 + chunk);
    float adw = 0.0f, adb = 0.0f;
    for (unsigned r = r0 + ty; r < r1; r += 8) {
        const size_t i = (size_t)r * d + jc;
        const float gg = kf_to_f32(g[i]);
        adw += gg * ((kf_to_f32(x[i]) - (mean ? mean[r] : 0.0f)) * rstd[r]);
        adb += gg;
    }
    sdw[ty][tx] = adw;
    sdb[ty][tx] = adb;
    __syncthreads();
    if (ty == 0 && j < d) {
        float sw = 0.0f, sb = 0.0f;
        for (int k = 0; k < 8; ++k) {
            sw += sdw[k][tx];
            sb += sdb[k][tx];
        }
        part_dw[(size_t)c * d + j] = sw;
        if (part_db) part_db[(size_t)c * d + j] = sb;
    }
}

#define KF_LAYERNORM_BWD(T, SUFFIX)                                                                        \
    extern "C" __global__ void layernorm_bwd_dx_##SUFFIX(const T* __restrict__ x, const T* __restrict__ w, \
                                                         const T* __restrict__ g,                          \
                                                         const float* __restrict__ mean,                   \
                                                         const float* __restrict__ rstd,                   \
                                                         T* __restrict__ dx, unsigned rows, unsigned d) {  \
        kf_layernorm_bwd_dx<T>(x, w, g, mean, rstd, dx, rows, d);                                          \
    }                                                                                                      \
    extern "C" __global__ void layernorm_bwd_dwdb_##SUFFIX(                                                \
        const T* __restrict__ x, const T* __restrict__ g, const float* __restrict__ mean,                 \
        const float* __restrict__ rstd, float* __restrict__ part_dw, float* __restrict__ part_db,         \
        unsigned rows, unsigned d, unsigned chunk) {                                                       \
        kf_layernorm_bwd_dwdb<T>(x, g, mean, rstd, part_dw, part_db, rows, d, chunk);                      \
    }

KF_LAYERNORM_BWD(float, f32)
KF_LAYERNORM_BWD(__half, f16)
KF_LAYERNORM_BWD(__nv_bfloat16, bf16)

// dw[j] = sum over c < C of part_dw[c, j] (db likewise, unless null), in order of c.
extern "C" __global__ void layernorm_bwd_reduce_f32(const float* __restrict__ part_dw,
                                                    const float* __restrict__ part_db, float* __restrict__ dw,
                                                    float* __restrict__ db, unsigned d, unsigned nchunks) {
    for (size_t j = kf_gid(); j < d; j += kf_gstride()) {
        float sw = 0.0f, sb = 0.0f;
        for (unsigned c = 0; c < nchunks; ++c) {
            sw += part_dw[(size_t)c * d + j];
            if (part_db) sb += part_db[(size_t)c * d + j];
        }
        dw[j] = sw;
        if (db) db[j] = sb;
    }
}
