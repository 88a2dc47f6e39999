// The stem max-pool's CUDA kernels (kernel 3, stride 2, padding 1 over h x w planes), compiled to
// PTX by the trainer's build.rs (feature `cuda`). f32, bf16 and f16 data; comparisons and
// gradient sums in f32. The backward gathers instead of scattering: each input element sums, in
// output order, the gradients of the (at most four) windows whose first maximum it is, as the
// CPU kernel does, so the result is deterministic and needs no atomics.

#include "../cuda_common.cuh"

// Output size of a dimension of n.
__device__ __forceinline__ uint32_t out(uint32_t n) { return (n - 1) / 2 + 1; }

// The flat index in `plane` (h x w) of the first maximum of output (i, j)'s window, row-major.
template <typename T>
__device__ uint32_t argmax(const T *plane, uint32_t h, uint32_t w, uint32_t i, uint32_t j) {
    const uint32_t r0 = i > 0 ? 2 * i - 1 : 0, r1 = min(2 * i + 2, h);
    const uint32_t c0 = j > 0 ? 2 * j - 1 : 0, c1 = min(2 * j + 2, w);
    uint32_t best = r0 * w + c0;
    float top = load(plane, best);
    for (uint32_t r = r0; r < r1; ++r) {
        for (uint32_t c = c0; c < c1; ++c) {
            const float v = load(plane, r * w + c);
            if (v > top) {
                top = v;
                best = r * w + c;
            }
        }
    }
    return best;
}

template <typename T>
__device__ void forward(const T *x, T *y, uint32_t planes, uint32_t h, uint32_t w) {
    const uint32_t ho = out(h), wo = out(w), len = planes * ho * wo;
    for (uint32_t k = blockIdx.x * blockDim.x + threadIdx.x; k < len; k += blockDim.x * gridDim.x) {
        const uint32_t p = k / (ho * wo), i = (k / wo) % ho, j = k % wo;
        const T *plane = x + (size_t)p * h * w;
        y[k] = plane[argmax(plane, h, w, i, j)];
    }
}

template <typename T>
__device__ void backward(const T *x, const T *dy, T *dx, uint32_t planes, uint32_t h, uint32_t w) {
    const uint32_t ho = out(h), wo = out(w), len = planes * h * w;
    for (uint32_t e = blockIdx.x * blockDim.x + threadIdx.x; e < len; e += blockDim.x * gridDim.x) {
        const uint32_t p = e / (h * w), at = e % (h * w), r = at / w, c = at % w;
        const T *plane = x + (size_t)p * h * w;
        const T *g = dy + (size_t)p * ho * wo;
        // Windows i with 2i - 1 <= r <= 2i + 1, likewise j.
        const uint32_t i0 = r / 2, i1 = min((r + 1) / 2, ho - 1);
        const uint32_t j0 = c / 2, j1 = min((c + 1) / 2, wo - 1);
        float sum = 0.f;
        for (uint32_t i = i0; i <= i1; ++i) {
            for (uint32_t j = j0; j <= j1; ++j) {
                if (argmax(plane, h, w, i, j) == at) {
                    sum += load(g, i * wo + j);
                }
            }
        }
        store(dx, e, sum);
    }
}

#define INSTANTIATE(T, NAME)                                                                    \
    extern "C" __global__ void max_pool_forward_##NAME(const T *x, T *y, uint32_t planes,       \
                                                       uint32_t h, uint32_t w) {                \
        forward(x, y, planes, h, w);                                                            \
    }                                                                                           \
    extern "C" __global__ void max_pool_backward_##NAME(const T *x, const T *dy, T *dx,         \
                                                        uint32_t planes, uint32_t h, uint32_t w) { \
        backward(x, dy, dx, planes, h, w);                                                      \
    }

INSTANTIATE(float, f32)
INSTANTIATE(__nv_bfloat16, bf16)
INSTANTIATE(__half, f16)
