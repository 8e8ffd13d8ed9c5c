// reduce.cu: deterministic sums a training step needs beyond the per-op
// backwards: column sums (bias gradients, [R, C] -> [C]) and the global sum of
// squares of a list of buffers (grad-norm clip). Both are fixed-order two-pass
// reductions with f32 accumulation and no float atomics: the first pass writes
// partial sums whose number and order depend on the shape only (launch shapes
// in kernels/src/reduce.rs), the second adds them in index order, so a result
// has the same bits on every run and every GPU. CPU counterparts: kf_ops
// reduce.rs (`sum_dim`, `sum`). Letters: R rows, C columns, K row chunks,
// n elements, P partials.
#include "common.cuh"

// kf-hot: colsum_f32 colsum_f16 colsum_bf16 sumsq_f32 sumsq_f16 sumsq_bf16
// kf-hot: colsum_finish_f32 sumsq_finish_f32

// Pass 1 of the column sums: block (32, 8) covers 32 columns of the row chunk
// blockIdx.y (rows [y * chunk, min(R, (y + 1) * chunk))); thread row ty adds
// rows ty, ty + 8, ... of the chunk in order, then thread row 0 adds the 8
// sums in order and writes part[y, j]. With K = 1 `part` is the output itself.
template <class T>
__device__ __forceinline__ void kf_colsum(const T* __restrict__ x, float* __restrict__ part, unsigned rows,
                                          unsigned cols, unsigned chunk) {
    __shared__ float s[8][33];
    if (cols == 0) return;  // uniform over the grid
    const unsigned tx = threadIdx.x, ty = threadIdx.y;
    const unsigned j = blockIdx.x * 32 + tx, y = blockIdx.y;
    // columns past C (the last tile) sum column C - 1 and drop it at the end:
    // every thread reaches the barrier
    const unsigned jc = min(j, cols - 1);
    const unsigned r0 = y * chunk;
    const unsigned r1 = min(rows, r0 + chunk);
    float a = 0.0f;
    for (unsigned r = r0 + ty; r < r1; r += 8) a += kf_to_f32(x[(size_t)r * cols + jc]);
    s[ty][tx] = a;
    __syncthreads();
    if (ty == 0 && j < cols) {
        float t = 0.0f;
        for (int k = 0; k < 8; ++k) t += s[k][tx];
        part[(size_t)y * cols + j] = t;
    }
}

// Pass 1 of the sum of squares of one buffer of n elements: block b adds the
// squares of the elements b * T + t, (b + G) * T + t, ... (a grid-stride
// loop over a grid G fixed by n), sums over the block in a fixed tree, and
// writes part[slot + b]. One launch per buffer, each with its own slot range.
template <class T>
__device__ __forceinline__ void kf_sumsq(const T* __restrict__ x, size_t n, float* __restrict__ part,
                                         unsigned slot) {
    __shared__ float scratch[32];
    float a = 0.0f;
    for (size_t i = kf_gid(); i < n; i += kf_gstride()) {
        const float v = kf_to_f32(x[i]);
        a += v * v;
    }
    a = kf_block_sum(a, scratch);
    if (threadIdx.x == 0) part[(size_t)slot + blockIdx.x] = a;
}

#define KF_REDUCE(T, SUFFIX)                                                                                 \
    extern "C" __global__ void colsum_##SUFFIX(const T* __restrict__ x, float* __restrict__ part,          \
                                               unsigned rows, unsigned cols, unsigned chunk) {               \
        kf_colsum<T>(x, part, rows, cols, chunk);                                                            \
    }                                                                                                        \
    extern "C" __global__ void sumsq_##SUFFIX(const T* __restrict__ x, size_t n, float* __restrict__ part, \
                                              unsigned slot) {                                               \
        kf_sumsq<T>(x, n, part, slot);                                                                       \
    }

KF_REDUCE(float, f32)
KF_REDUCE(__half, f16)
KF_REDUCE(__nv_bfloat16, bf16)

// Pass 2 of the column sums: out[j] = sum over k < K of part[k, j], in order
// of k (grid-stride over the columns).
extern "C" __global__ void colsum_finish_f32(const float* __restrict__ part, float* __restrict__ out,
                                             unsigned cols, unsigned nchunks) {
    for (size_t j = kf_gid(); j < cols; j += kf_gstride()) {
        float t = 0.0f;
        for (unsigned k = 0; k < nchunks; ++k) t += part[(size_t)k * cols + j];
        out[j] = t;
    }
}

// Pass 2 of the sum of squares: one block; thread t adds part[t], part[t + T],
// ... in order, then the block sums in a fixed tree; out[0] = the total.
extern "C" __global__ void sumsq_finish_f32(const float* __restrict__ part, unsigned nparts,
                                            float* __restrict__ out) {
    __shared__ float scratch[32];
    float a = 0.0f;
    for (unsigned p = threadIdx.x; p < nparts; p += blockDim.x) a += part[p];
    a = kf_block_sum(a, scratch);
    if (threadIdx.x == 0) out[0] = a;
}
