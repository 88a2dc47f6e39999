// What the op families' CUDA kernels share: f32 loads and stores of every element type, and a
// deterministic two-value sum over the blocks of a group (no floating-point atomics).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

__device__ __forceinline__ float load(const float *p, uint32_t i) { return p[i]; }
__device__ __forceinline__ float load(const __nv_bfloat16 *p, uint32_t i) {
    return __bfloat162float(p[i]);
}
__device__ __forceinline__ float load(const __half *p, uint32_t i) { return __half2float(p[i]); }

__device__ __forceinline__ void store(float *p, uint32_t i, float v) { p[i] = v; }
__device__ __forceinline__ void store(__nv_bfloat16 *p, uint32_t i, float v) {
    p[i] = __float2bfloat16(v);
}
__device__ __forceinline__ void store(__half *p, uint32_t i, float v) { p[i] = __float2half(v); }

// Sums (a, b) over the block (blockDim.x a multiple of 32); the result is valid in thread 0.
__device__ void block_sum(double &a, double &b) {
    __shared__ double sa[32], sb[32];
    for (int o = 16; o > 0; o >>= 1) {
        a += __shfl_down_sync(0xffffffffu, a, o);
        b += __shfl_down_sync(0xffffffffu, b, o);
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) {
        sa[warp] = a;
        sb[warp] = b;
    }
    __syncthreads();
    if (warp == 0) {
        const int warps = blockDim.x >> 5;
        a = lane < warps ? sa[lane] : 0.0;
        b = lane < warps ? sb[lane] : 0.0;
        for (int o = 16; o > 0; o >>= 1) {
            a += __shfl_down_sync(0xffffffffu, a, o);
            b += __shfl_down_sync(0xffffffffu, b, o);
        }
    }
}

// Block `split` of `splits` blocks that share one sum contributes (a, b). The group's last
// block to finish writes the sums over all its blocks, in block order, to out[0] and out[1], and
// returns true in its thread 0. `partial` holds the group's 2 * splits doubles; `done` is the
// group's counter, zero before the launch.
__device__ bool group_sum(double a, double b, uint32_t split, uint32_t splits, double *partial,
                          unsigned *done, double *out) {
    __shared__ bool last;
    block_sum(a, b);
    if (threadIdx.x == 0) {
        partial[2 * split] = a;
        partial[2 * split + 1] = b;
        __threadfence();
        last = atomicAdd(done, 1u) == splits - 1;
    }
    __syncthreads();
    if (!last || threadIdx.x != 0) {
        return false;
    }
    __threadfence();
    const volatile double *p = partial;
    double sa = 0.0, sb = 0.0;
    for (uint32_t s = 0; s < splits; ++s) {
        sa += p[2 * s];
        sb += p[2 * s + 1];
    }
    out[0] = sa;
    out[1] = sb;
    return true;
}
