// embedding.cu: the token embedding family (ops/src/embedding.rs).
// embedding_fwd: out[p, :] = table[ids[p], :], a row gather (ids u32), one
// warp per row.
// embedding_bwd: dtable[v, :] = sum of g[p, :] over positions p with
// ids[p] == v, summed in f32 into an f32 gradient, deterministically and
// without a sort: block b owns the table rows v with v % NB == b (NB =
// gridDim.x), zeroes them, then walks all ids in position order in chunks of
// T; a ballot marks its positions and each thread (one column of D, strided by
// T) adds them in increasing p. So every element's sum has the CPU op's order
// (position order) whatever the grid, the bits repeat from run to run, and no
// atomics are needed; the price is that every block reads all N ids (4 bytes
// each, from L2) once. Ids >= V (which the launcher rejects, like the CPU op)
// give a NaN row in the forward and are skipped by the backward, never an
// out-of-bounds access. Letters: N positions, V table rows, D features,
// T threads per block (a multiple of 32, at most 1024), NB blocks.
#include "common.cuh"

// kf-hot: embedding_fwd_f32 embedding_fwd_f16 embedding_fwd_bf16 embedding_bwd_f32 embedding_bwd_f16 embedding_bwd_bf16

template <class T>
__device__ __forceinline__ void kf_embedding_fwd(const unsigned* __restrict__ ids, const T* __restrict__ table,
                                                 T* __restrict__ out, size_t n, unsigned d, unsigned v) {
    // one warp per row (grid-stride over rows), lanes over the columns:
    // coalesced reads of the table row and writes, no per-element division
    const size_t warps = kf_gstride() >> 5;
    const unsigned lane = threadIdx.x & 31;
    for (size_t p = kf_gid() >> 5; p < n; p += warps) {
        const unsigned id = ids[p];
        T* __restrict__ o = out + p * d;
        if (id < v) {
            const T* __restrict__ src = table + (size_t)id * d;
            for (unsigned j = lane; j < d; j += 32) o[j] = src[j];
        } else {
            for (unsigned j = lane; j < d; j += 32) o[j] = kf_from_f32<T>(__int_as_float(0x7fc00000));
        }
    }
}

template <class T>
__device__ __forceinline__ void kf_embedding_bwd(const unsigned* __restrict__ ids, const T* __restrict__ g,
                                                 float* __restrict__ dtable, size_t n, unsigned d, unsigned v) {
    __shared__ unsigned chunk_ids[1024];
    __shared__ unsigned masks[32];
    const unsigned nb = gridDim.x, b = blockIdx.x, t = threadIdx.x, nt = blockDim.x;
    const unsigned lane = t & 31, warp = t >> 5, nw = nt >> 5;
    // the owned rows start at zero; each thread zeroes and later accumulates
    // only its own columns, so no barrier is needed between the two
    for (unsigned r = b; r < v; r += nb)
        for (unsigned j = t; j < d; j += nt) dtable[(size_t)r * d + j] = 0.0f;
    for (size_t base = 0; base < n; base += nt) {
        const size_t p = base + t;
        const unsigned id = p < n ? ids[p] : 0xffffffffu;
        const bool mine = id < v && id % nb == b;
        const unsigned m = __ballot_sync(KF_FULL_MASK, mine);
        __syncthreads();  // the previous chunk's readers are done with chunk_ids and masks
        chunk_ids[t] = id;
        if (lane == 0) masks[warp] = m;
        __syncthreads();
        for (unsigned w = 0; w < nw; ++w) {
            unsigned bits = masks[w];
            while (bits) {
                const unsigned k = w * 32 + (unsigned)(__ffs((int)bits) - 1);
                bits &= bits - 1;
                const size_t q = base + k;
                float* row = dtable + (size_t)chunk_ids[k] * d;
                const T* gq = g + q * d;
                for (unsigned j = t; j < d; j += nt) row[j] += kf_to_f32(gq[j]);
            }
        }
    }
}

#define KF_EMBEDDING(T, SUFFIX)                                                                            \
    extern "C" __global__ void embedding_fwd_##SUFFIX(const unsigned* __restrict__ ids,                   \
                                                      const T* __restrict__ table, T* __restrict__ out,    \
                                                      size_t n, unsigned d, unsigned v) {                  \
        kf_embedding_fwd<T>(ids, table, out, n, d, v);                                                     \
    }                                                                                                      \
    extern "C" __global__ void embedding_bwd_##SUFFIX(const unsigned* __restrict__ ids,                   \
                                                      const T* __restrict__ g, float* __restrict__ dtable, \
                                                      size_t n, unsigned d, unsigned v) {                  \
        kf_embedding_bwd<T>(ids, g, dtable, n, d, v);                                                      \
    }

KF_EMBEDDING(float, f32)
KF_EMBEDDING(__half, f16)
KF_EMBEDDING(__nv_bfloat16, bf16)
