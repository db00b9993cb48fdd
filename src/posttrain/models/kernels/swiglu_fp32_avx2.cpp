// The backward of SwiGLU, h = silu(g) * u, in one pass, fp32, AVX2 and FMA, on torch's OpenMP threads.
//
// Written for posttrain (built by posttrain/models/native.py, used by models/fused_mlp.py, whose forward is
// PyTorch's own ops). PyTorch runs the backward as two muls and a silu_backward, three passes over the
// (tokens x intermediate) tensors, from a kept silu(g); here one pass from g and u:
//
//   backward  du = dh g sigmoid(g)
//             dg = dh u sigmoid(g) (1 + g (1 - sigmoid(g)))                 reads dh, g, u; writes dg, du
//
// sigmoid(g) = 1 / (1 + exp(-g)), from e = exp(-|g|) (argument <= 0): 1 / (1 + e) for g >= 0, e / (1 + e) below,
// so neither branch overflows; the division is IEEE (no reciprocal estimate). Within a few ulp of PyTorch's.

#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

#include <algorithm>

#include "avx2_math.h"

namespace {

using posttrain_avx2::exp_ps;


inline __m256 sigmoid_ps(__m256 g) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256 e = exp_ps(_mm256_or_ps(g, sign));  // exp(-|g|)
    const __m256 one = _mm256_set1_ps(1.0f);
    const __m256 den = _mm256_add_ps(one, e);
    const __m256 negative = _mm256_cmp_ps(g, _mm256_setzero_ps(), _CMP_LT_OQ);
    return _mm256_div_ps(_mm256_blendv_ps(one, e, negative), den);
}

inline float sigmoid1(float g) {  // the scalar tail: same formula
    const float e = __builtin_expf(-(g < 0 ? -g : g));
    return (g < 0 ? e : 1.0f) / (1.0f + e);
}

constexpr long CHUNK = 4096;  // elements per OpenMP work item (16 KB of each input)

// Subnormal inputs and results are flushed to zero inside the kernels (MXCSR's FTZ and DAZ bits, restored
// after): a gate far below zero makes sigmoid, silu and their products subnormal, which many x86 CPUs compute
// through a slow microcode assist. A subnormal is below 1.2e-38: flushing it changes no trained weight.
struct FlushDenormals {
    unsigned int saved;
    FlushDenormals() : saved(_mm_getcsr()) { _mm_setcsr(saved | 0x8040); }  // FTZ (bit 15) | DAZ (bit 6)
    ~FlushDenormals() { _mm_setcsr(saved); }
};

}  // namespace

extern "C" {

void posttrain_swiglu_backward(const float* dh, const float* g, const float* u, float* dg, float* du, long n,
                               int threads) {
    const long chunks = (n + CHUNK - 1) / CHUNK;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long c = 0; c < chunks; ++c) {
        const FlushDenormals flush;
        const long lo = c * CHUNK, hi = std::min(n, lo + CHUNK);
        const __m256 one = _mm256_set1_ps(1.0f);
        long i = lo;
        for (; i + 8 <= hi; i += 8) {
            const __m256 gv = _mm256_loadu_ps(g + i), dv = _mm256_loadu_ps(dh + i);
            const __m256 s = sigmoid_ps(gv);
            const __m256 silu = _mm256_mul_ps(gv, s);
            _mm256_storeu_ps(du + i, _mm256_mul_ps(dv, silu));
            // sigmoid(g) (1 + g (1 - sigmoid(g))) = s + silu (1 - s)
            const __m256 dsilu = _mm256_fmadd_ps(silu, _mm256_sub_ps(one, s), s);
            _mm256_storeu_ps(dg + i, _mm256_mul_ps(_mm256_mul_ps(dv, _mm256_loadu_ps(u + i)), dsilu));
        }
        for (; i < hi; ++i) {
            const float s = sigmoid1(g[i]), silu = g[i] * s;
            du[i] = dh[i] * silu;
            dg[i] = dh[i] * u[i] * (s + silu * (1.0f - s));
        }
    }
}

}  // extern "C"
