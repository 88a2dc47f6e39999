// Train-mode BatchNorm's CUDA kernels, compiled to PTX by the trainer's build.rs (feature `cuda`)
// and launched by `cuda.rs` on Candle's stream. Data `[n, c, l]` contiguous, in f32, bf16 or f16
// (one instantiation each); arithmetic in f32, per-channel sums in f64.
//
// Per-channel sums are deterministic: each block of a channel writes its partial sums, and the
// block that finishes last adds them in a fixed order (no floating-point atomics).

#include "../cuda_common.cuh"

#define EPS 1e-5

// Block (channel blockIdx.x, split blockIdx.y) contributes (a, b) to channel ch's sums, which
// the channel's last block writes to sums[2 ch], sums[2 ch + 1] (returning true in its thread 0).
// `partial` holds 2 * c * gridDim.y doubles; `done` c zeroed counters.
__device__ bool channel_sum(double a, double b, double *partial, unsigned *done, double *sums) {
    const uint32_t ch = blockIdx.x, splits = gridDim.y;
    return group_sum(a, b, blockIdx.y, splits, partial + 2 * ch * splits, done + ch, sums + 2 * ch);
}

// mean and biased variance from the sums of x and x^2 over `count` values.
__device__ void finish_stats(const double *sums, uint32_t c, uint32_t ch, double count, float *stats) {
    const double mean = sums[2 * ch] / count;
    stats[ch] = (float)mean;
    stats[c + ch] = (float)fmax(sums[2 * ch + 1] / count - mean * mean, 0.0);
}

// Per channel: sums of x and x^2 into `sums` [2c], and mean, variance into `stats` [2c] f32
// (from this launch's sums: with SyncBN, bn_stats_finish recomputes them from all ranks' sums).
template <typename T>
__device__ void stats(const T *x, uint32_t n, uint32_t c, uint32_t l, double count,
                      double *partial, unsigned *done, double *sums, float *out) {
    const uint32_t ch = blockIdx.x, m = n * l;
    double s = 0.0, q = 0.0;
    for (uint32_t i = blockIdx.y * blockDim.x + threadIdx.x; i < m; i += blockDim.x * gridDim.y) {
        const uint32_t b = i / l;
        const double v = load(x, (b * c + ch) * l + (i - b * l));
        s += v;
        q += v * v;
    }
    if (channel_sum(s, q, partial, done, sums)) {
        finish_stats(sums, c, ch, count, out);
    }
}

// y = (x - mean) * weight / sqrt(var + eps) + bias (+ residual), through a ReLU when `relu`;
// params = [weight, bias, mean, var], each [c] f32.
template <typename T>
__device__ void forward(const T *x, const float *params, const T *residual, T *y, uint32_t n,
                        uint32_t c, uint32_t l, int has_residual, int relu) {
    const uint32_t len = n * c * l;
    for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < len; i += blockDim.x * gridDim.x) {
        const uint32_t ch = (i / l) % c;
        const float scale = params[ch] * rsqrtf(params[3 * c + ch] + (float)EPS);
        const float shift = params[c + ch] - params[2 * c + ch] * scale;
        float v = load(x, i) * scale + shift;
        if (has_residual) {
            v += load(residual, i);
        }
        store(y, i, relu ? fmaxf(v, 0.f) : v);
    }
}

// The gradient reaching the normalisation: dy, or 0 where the ReLU clipped y.
template <typename T>
__device__ __forceinline__ float masked(const T *dy, const T *y, uint32_t i, int relu) {
    return relu && load(y, i) <= 0.f ? 0.f : load(dy, i);
}

// Per channel: sum(g) and sum(g * x_hat) into `sums` [2c], g the masked dy.
template <typename T>
__device__ void grad_sums(const T *x, const T *dy, const T *y, const float *params, uint32_t n,
                          uint32_t c, uint32_t l, int relu, double *partial, unsigned *done,
                          double *sums) {
    const uint32_t ch = blockIdx.x, m = n * l;
    const double mean = params[2 * c + ch], inv = 1.0 / sqrt((double)params[3 * c + ch] + EPS);
    double s = 0.0, sx = 0.0;
    for (uint32_t i = blockIdx.y * blockDim.x + threadIdx.x; i < m; i += blockDim.x * gridDim.y) {
        const uint32_t b = i / l, at = (b * c + ch) * l + (i - b * l);
        const double g = masked(dy, y, at, relu);
        s += g;
        sx += g * ((load(x, at) - mean) * inv);
    }
    channel_sum(s, sx, partial, done, sums);
}

// out = [dx | dresidual (when has_residual) | dweight | dbias | 2c zeros], f32:
// dx = weight * inv * (g - mean(g) - x_hat * mean(g * x_hat)) with the means over `count` values
// from `global` (all ranks' sums under SyncBN), the parameter gradients from `local`.
template <typename T>
__device__ void input_grad(const T *x, const T *dy, const T *y, const float *params,
                           const double *local, const double *global, uint32_t n, uint32_t c,
                           uint32_t l, double count, int relu, int has_residual, float *out) {
    const uint32_t len = n * c * l, planes = has_residual ? 2 * len : len;
    const uint32_t first = blockIdx.x * blockDim.x + threadIdx.x, stride = blockDim.x * gridDim.x;
    const float per = (float)(1.0 / count);
    for (uint32_t i = first; i < len; i += stride) {
        const uint32_t ch = (i / l) % c;
        const float inv = rsqrtf(params[3 * c + ch] + (float)EPS);
        const float mean_g = (float)global[2 * ch] * per, mean_gx = (float)global[2 * ch + 1] * per;
        const float g = masked(dy, y, i, relu);
        const float xh = (load(x, i) - params[2 * c + ch]) * inv;
        out[i] = params[ch] * inv * (g - mean_g - xh * mean_gx);
        if (has_residual) {
            out[len + i] = g;
        }
    }
    for (uint32_t j = first; j < 4 * c; j += stride) {
        out[planes + j] = j < c ? (float)local[2 * j + 1] : j < 2 * c ? (float)local[2 * (j - c)] : 0.f;
    }
}

// SyncBN: mean and variance from all ranks' sums.
extern "C" __global__ void bn_stats_finish(const double *sums, uint32_t c, double count,
                                           float *stats) {
    for (uint32_t ch = blockIdx.x * blockDim.x + threadIdx.x; ch < c; ch += blockDim.x * gridDim.x) {
        finish_stats(sums, c, ch, count, stats);
    }
}

#define INSTANTIATE(T, NAME)                                                                    \
    extern "C" __global__ void bn_stats_##NAME(const T *x, uint32_t n, uint32_t c, uint32_t l,  \
                                               double count, double *partial, unsigned *done,   \
                                               double *sums, float *out) {                      \
        stats(x, n, c, l, count, partial, done, sums, out);                                     \
    }                                                                                           \
    extern "C" __global__ void bn_forward_##NAME(const T *x, const float *params,               \
                                                 const T *residual, T *y, uint32_t n,           \
                                                 uint32_t c, uint32_t l, int has_residual,      \
                                                 int relu) {                                    \
        forward(x, params, residual, y, n, c, l, has_residual, relu);                           \
    }                                                                                           \
    extern "C" __global__ void bn_grad_sums_##NAME(                                             \
        const T *x, const T *dy, const T *y, const float *params, uint32_t n, uint32_t c,       \
        uint32_t l, int relu, double *partial, unsigned *done, double *sums) {                  \
        grad_sums(x, dy, y, params, n, c, l, relu, partial, done, sums);                        \
    }                                                                                           \
    extern "C" __global__ void bn_input_grad_##NAME(                                            \
        const T *x, const T *dy, const T *y, const float *params, const double *local,          \
        const double *global, uint32_t n, uint32_t c, uint32_t l, double count, int relu,       \
        int has_residual, float *out) {                                                         \
        input_grad(x, dy, y, params, local, global, n, c, l, count, relu, has_residual, out);   \
    }

INSTANTIATE(float, f32)
INSTANTIATE(__nv_bfloat16, bf16)
INSTANTIATE(__half, f16)
