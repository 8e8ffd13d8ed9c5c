// gemv.cu: f32 activations times half-precision weights, so f16 / bf16 models are served on
// the GPU from their stored weights (half the bytes of widened f32 weights, and a decode step
// is a read of the weights). gemv_wt_<T> (T = the weights' storage, f16 or bf16):
//   y[r, j] = sum_i x[r, i] * w[j, i]            (beta == 0: y is only written)
//   y[r, j] = beta * y[r, j] + sum_i x[r, i] * w[j, i]
// for r < M, j < N, i < K: x · Wᵀ with W stored [N, K] (a linear layer's [out, in]) through a
// leading dimension, x and y f32; every product and sum is f32 (the weights widen exactly), so
// the result is the f32 GEMM's with the widened weights up to the order of the sums. Shaped for
// few rows (KV-cached decode: 1 .. 2k rows per sequence): one warp per COLS output columns,
// ROWS rows per blockIdx.y, so W is read once per ROWS rows from memory; lanes stride over K,
// eight weights (16 bytes) of each column and two float4 of x per row at a time when the
// launcher says the rows are 16-byte aligned (`vec`), one element at a time otherwise; the
// lanes' partial sums meet in shared memory (one __syncwarp) and lane v adds output v's. The
// launcher (ops/src/matmul.rs) widens W with cast_<T>_f32 (copy.cu) and calls the f32 GEMM for
// more rows.
// Letters: M rows, N output columns, K inputs, ROWS rows per block row, COLS columns per warp.
#include "common.cuh"

// kf-hot: gemv_wt_f16 gemv_wt_bf16

// Rows per blockIdx.y, output columns per warp, warps per block (kf_kernels::gemv).
#define KF_GEMV_ROWS 8
#define KF_GEMV_COLS 4
#define KF_GEMV_WARPS 4

#ifdef KF_EMU
#define KF_GEMV_MAY_ALIAS __attribute__((__may_alias__))
#define KF_GEMV_UNROLL
#else
#define KF_GEMV_MAY_ALIAS
#define KF_GEMV_UNROLL _Pragma("unroll")
#endif

// Eight weights and four floats, one 16-byte load each.
template <class T>
struct __align__(16) KF_GEMV_MAY_ALIAS KfGemvW8 {
    T v[8];
};
struct __align__(16) KF_GEMV_MAY_ALIAS KfGemvF4 {
    float x, y, z, w;
};

template <class T>
__device__ __forceinline__ void kf_gemv_wt(const float* __restrict__ x, size_t x_off, unsigned lda,
                                           const T* __restrict__ w, size_t w_off, unsigned ldw,
                                           float* __restrict__ y, size_t y_off, unsigned ldy, unsigned m,
                                           unsigned n, unsigned k, float beta, unsigned vec) {
    // per warp: the partial sums of its ROWS x COLS outputs, one column per lane, row stride
    // 33 so that both the lanes' writes (one value each) and the final reads (one value per
    // lane) fall in 32 different banks
    __shared__ float red[KF_GEMV_WARPS][KF_GEMV_ROWS * KF_GEMV_COLS][33];
    const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const unsigned j0 = (blockIdx.x * KF_GEMV_WARPS + warp) * KF_GEMV_COLS;
    const unsigned r0 = blockIdx.y * KF_GEMV_ROWS;
    // whole warps leave (only warp-level synchronisation follows)
    if (j0 >= n || r0 >= m) return;
    const unsigned nr = min(m - r0, (unsigned)KF_GEMV_ROWS);
    const unsigned nc = min(n - j0, (unsigned)KF_GEMV_COLS);
    const float* __restrict__ xr = x + x_off + (size_t)r0 * lda;
    // columns past n read column j0 again (their sums are dropped): no branch in the loop
    const T* __restrict__ wc[KF_GEMV_COLS];
KF_GEMV_UNROLL
    for (int c = 0; c < KF_GEMV_COLS; ++c) wc[c] = w + w_off + (size_t)(j0 + ((unsigned)c < nc ? c : 0)) * ldw;
    float acc[KF_GEMV_ROWS][KF_GEMV_COLS];
KF_GEMV_UNROLL
    for (int r = 0; r < KF_GEMV_ROWS; ++r)
KF_GEMV_UNROLL
        for (int c = 0; c < KF_GEMV_COLS; ++c) acc[r][c] = 0.0f;
    if (vec) {
        // K % 8 == 0, rows of w and x 16-byte aligned (checked by the launcher)
        for (unsigned i = lane * 8; i < k; i += 256) {
            float wf[KF_GEMV_COLS][8];
KF_GEMV_UNROLL
            for (int c = 0; c < KF_GEMV_COLS; ++c) {
                const KfGemvW8<T> wv = *reinterpret_cast<const KfGemvW8<T>*>(wc[c] + i);
KF_GEMV_UNROLL
                for (int e = 0; e < 8; ++e) wf[c][e] = kf_to_f32(wv.v[e]);
            }
KF_GEMV_UNROLL
            for (int r = 0; r < KF_GEMV_ROWS; ++r) {
                if ((unsigned)r < nr) {
                    const float* xi = xr + (size_t)r * lda + i;
                    const KfGemvF4 a = *reinterpret_cast<const KfGemvF4*>(xi);
                    const KfGemvF4 b = *reinterpret_cast<const KfGemvF4*>(xi + 4);
                    const float xv[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
KF_GEMV_UNROLL
                    for (int c = 0; c < KF_GEMV_COLS; ++c) {
                        float s = acc[r][c];
KF_GEMV_UNROLL
                        for (int e = 0; e < 8; ++e) s = fmaf(xv[e], wf[c][e], s);
                        acc[r][c] = s;
                    }
                }
            }
        }
    } else {
        for (unsigned i = lane; i < k; i += 32) {
            float wf[KF_GEMV_COLS];
KF_GEMV_UNROLL
            for (int c = 0; c < KF_GEMV_COLS; ++c) wf[c] = kf_to_f32(wc[c][i]);
KF_GEMV_UNROLL
            for (int r = 0; r < KF_GEMV_ROWS; ++r)
                if ((unsigned)r < nr) {
                    const float xv = xr[(size_t)r * lda + i];
KF_GEMV_UNROLL
                    for (int c = 0; c < KF_GEMV_COLS; ++c) acc[r][c] = fmaf(xv, wf[c], acc[r][c]);
                }
        }
    }
    // the sums over the lanes: each lane stores its partials, then lane v adds output v's 32
    // partials in lane order (one warp barrier instead of a shuffle tree per output)
    float(*red_w)[33] = red[warp];
KF_GEMV_UNROLL
    for (int r = 0; r < KF_GEMV_ROWS; ++r)
KF_GEMV_UNROLL
        for (int c = 0; c < KF_GEMV_COLS; ++c) red_w[r * KF_GEMV_COLS + c][lane] = acc[r][c];
    __syncwarp();
    const unsigned r = lane / KF_GEMV_COLS, c = lane % KF_GEMV_COLS;
    if (r < nr && c < nc) {
        float s = 0.0f;
        for (int l = 0; l < 32; ++l) s += red_w[lane][l];
        float* o = y + y_off + (size_t)(r0 + r) * ldy + j0 + c;
        *o = beta != 0.0f ? fmaf(beta, *o, s) : s;
    }
}

#define KF_GEMV(T, SUFFIX)                                                                                      \
    extern "C" __global__ void gemv_wt_##SUFFIX(const float* __restrict__ x, size_t x_off, unsigned lda,       \
                                                const T* __restrict__ w, size_t w_off, unsigned ldw,           \
                                                float* __restrict__ y, size_t y_off, unsigned ldy, unsigned m, \
                                                unsigned n, unsigned k, float beta, unsigned vec) {            \
        kf_gemv_wt<T>(x, x_off, lda, w, w_off, ldw, y, y_off, ldy, m, n, k, beta, vec);                        \
    }

KF_GEMV(__half, f16)
KF_GEMV(__nv_bfloat16, bf16)
