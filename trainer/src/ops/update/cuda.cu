// The optimiser and EMA updates' CUDA kernels, in place on contiguous f32 buffers, compiled to
// PTX by the trainer's build.rs (feature `cuda`): one pass per group of tensors (LARS adds one for
// its norms, whose trust ratios stay on the device), against about ten tensor ops per tensor.

#include "../cuda_common.cuh"

// Multi-tensor updates: one launch covers up to CHUNK tensors, whose addresses travel in the
// kernel's arguments (no upload). Grid: (blocks per tensor, tensors); block (x, k) strides over
// tensor k. `Chunk` must match `cuda.rs`'s #[repr(C)] struct.
#define CHUNK 32

struct Chunk {
    uint64_t a[CHUNK], b[CHUNK], c[CHUNK], d[CHUNK];
    uint32_t len[CHUNK];
    float decay[CHUNK];
    uint32_t trust_on[CHUNK];
    uint32_t count;
};

#define FOR_TENSOR_ELEMENTS(i, n)                                                              \
    for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += blockDim.x * gridDim.x)

// LARS's ratios, ratio[k] for tensor k (w = a, g = c): trust * |w| / |g + decay w| where the
// tensor takes trust and both norms are positive, else 1. `partial`: 2 * count * gridDim.x
// doubles; `done`: count zeroed counters; `sums`: 2 * count doubles.
extern "C" __global__ void multi_trust_ratio(const Chunk t, double trust, double *partial,
                                             unsigned *done, double *sums, float *ratio) {
    const uint32_t k = blockIdx.y;
    const float *w = (const float *)t.a[k], *g = (const float *)t.c[k];
    const float decay = t.decay[k];
    double ww = 0.0, dd = 0.0;
    FOR_TENSOR_ELEMENTS(i, t.len[k]) {
        const double d = g[i] + decay * w[i];
        ww += (double)w[i] * w[i];
        dd += d * d;
    }
    if (group_sum(ww, dd, blockIdx.x, gridDim.x, partial + 2 * k * gridDim.x, done + k,
                  sums + 2 * k)) {
        const double w_norm = sqrt(sums[2 * k]), d_norm = sqrt(sums[2 * k + 1]);
        const bool scaled = t.trust_on[k] && w_norm > 0.0 && d_norm > 0.0;
        ratio[k] = scaled ? (float)(trust * w_norm / d_norm) : 1.f;
    }
}

// Momentum SGD (LARS with ratios): m = momentum m + r (g + decay w), then w = w - lr m;
// w = a, m = b, g = c; r = ratio[k] when has_ratio, else 1.
extern "C" __global__ void multi_momentum_step(const Chunk t, float momentum, float lr,
                                               const float *ratio, int has_ratio) {
    const uint32_t k = blockIdx.y;
    float *w = (float *)t.a[k], *m = (float *)t.b[k];
    const float *g = (const float *)t.c[k];
    const float decay = t.decay[k], r = has_ratio ? ratio[k] : 1.f;
    FOR_TENSOR_ELEMENTS(i, t.len[k]) {
        const float mi = momentum * m[i] + r * (g[i] + decay * w[i]);
        m[i] = mi;
        w[i] -= lr * mi;
    }
}

// dst = keep dst + take src (the EMA target update): dst = a, src = b.
extern "C" __global__ void multi_blend(const Chunk t, float keep, float take) {
    const uint32_t k = blockIdx.y;
    float *dst = (float *)t.a[k];
    const float *src = (const float *)t.b[k];
    FOR_TENSOR_ELEMENTS(i, t.len[k]) { dst[i] = keep * dst[i] + take * src[i]; }
}

// AdamW: m = b1 m + (1 - b1) g, v = b2 v + (1 - b2) g^2, then
// w -= lr ((m / c1) / (sqrt(v / c2) + eps) + decay w); w = a, m = b, g = c, v = d.
extern "C" __global__ void multi_adam(const Chunk t, float b1, float take1, float b2, float take2,
                                      float lr, float c1, float c2, float eps) {
    const uint32_t k = blockIdx.y;
    float *w = (float *)t.a[k], *m = (float *)t.b[k], *v = (float *)t.d[k];
    const float *g = (const float *)t.c[k];
    const float decay = t.decay[k];
    FOR_TENSOR_ELEMENTS(i, t.len[k]) {
        const float mi = b1 * m[i] + take1 * g[i];
        const float vi = b2 * v[i] + take2 * (g[i] * g[i]);
        m[i] = mi;
        v[i] = vi;
        w[i] -= lr * ((mi / c1) / (sqrtf(vi / c2) + eps) + decay * w[i]);
    }
}
