// The optimiser and EMA updates' CUDA kernels, in place on contiguous f32 buffers, compiled to
// PTX by the trainer's build.rs (feature `cuda`): one pass per update (LARS adds one for its
// norms, whose trust ratio stays on the device), against about ten tensor ops each.

#include "../cuda_common.cuh"

// dst = keep * dst + take * src (or src^2).
extern "C" __global__ void update_blend(float *dst, const float *src, uint32_t n, float keep,
                                        float take, int square) {
    for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {
        const float s = square ? src[i] * src[i] : src[i];
        dst[i] = keep * dst[i] + take * s;
    }
}

// LARS's ratio trust * |w| / |g + decay w| (1 where a norm is 0) into ratio[0], from f64 sums
// over one grid of blocks (`partial`: 2 * gridDim.x doubles; `done`: one zeroed counter).
extern "C" __global__ void update_trust_ratio(const float *w, const float *g, uint32_t n,
                                              float decay, double trust, double *partial,
                                              unsigned *done, double *sums, float *ratio) {
    double ww = 0.0, dd = 0.0;
    for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {
        const double d = g[i] + decay * w[i];
        ww += (double)w[i] * w[i];
        dd += d * d;
    }
    if (group_sum(ww, dd, blockIdx.x, gridDim.x, partial, done, sums)) {
        const double w_norm = sqrt(sums[0]), d_norm = sqrt(sums[1]);
        ratio[0] = w_norm > 0.0 && d_norm > 0.0 ? (float)(trust * w_norm / d_norm) : 1.f;
    }
}

// m = momentum * m + ratio * (g + decay * w), ratio = ratio[0] when has_ratio, else 1.
extern "C" __global__ void update_momentum(float *m, const float *w, const float *g, uint32_t n,
                                           float momentum, float decay, const float *ratio,
                                           int has_ratio) {
    const float r = has_ratio ? ratio[0] : 1.f;
    for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {
        m[i] = momentum * m[i] + r * (g[i] + decay * w[i]);
    }
}

// AdamW: w -= lr * ((m / c1) / (sqrt(v / c2) + eps) + decay * w).
extern "C" __global__ void update_adam(float *w, const float *m, const float *v, uint32_t n,
                                       float lr, float decay, float c1, float c2, float eps) {
    for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {
        w[i] -= lr * ((m[i] / c1) / (sqrtf(v[i] / c2) + eps) + decay * w[i]);
    }
}
