// Causal attention of packed spans on a CPU with AVX2 and FMA, in fp32, forward and backward, one call per layer.
//
// Written for posttrain (built by posttrain/models/native.py, used by models/attention.py). The fp32 counterpart
// of span_attention_avx512bf16.cpp, for the CPUs without fast bf16 (most laptops and many cloud CPUs), where
// posttrain trains in fp32 and PyTorch's fp32 CPU flash-attention kernel, called once per span, took 11% of a
// LoRA step (docs/benchmarks.md). The math:
//
//   S  = q k^T                     fp32 products (FMA)
//   P  = softmax(S * scale), causal; lse = logsumexp per row is kept for the backward
//   O  = P v
//   backward: P = exp(S * scale - lse) recomputed, dP = dO v^T, delta = rowsum(dO * O),
//             dS = P (dP - delta) scale, dQ = dS k, dK = dS^T q, dV = P^T dO
//
// Grouped-query heads: the g query heads of one K/V head are one task, so K and V are packed once and dK, dV
// are summed over the group inside the products. Tasks (span, K/V head) run on OpenMP threads (torch's pool);
// each walks its query rows in blocks of BLOCK rows, multiplying each block only by the keys it can see. Every
// product is one register-blocked micro-kernel: C (MR x 16) [+]= A (MR x K, rows) x B (K x 16, rows).
//
// Shared prefixes (RL groups, posttrain/data/groups.py: one prompt, then each completion as a span that sees it):
// a span's keys are its prefix's rows followed by its own, and its queries see the prefix in full. The prefix
// rows are a plain span of their own; their dK, dV also get every completion's share, which each task leaves in
// its own slot and one pass adds afterwards in table order.
//
// Layout: q, k, v, grad and outputs are fp32 addressed by (batch, head, position) strides with the head
// dimension D contiguous; D must be a multiple of 16. Each task writes only its own rows and slots, and the
// prefix sums run in a fixed order, so results do not depend on the thread count.

#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <vector>

#include "span_tasks.h"

#include "avx2_math.h"

namespace {

using posttrain_avx2::exp_ps;

constexpr int BLOCK = 32;  // query rows per block
constexpr int MR = 6;      // micro-kernel rows: 12 accumulators + 2 B vectors + 1 broadcast = 15 of 16 ymm
constexpr int NR = 16;     // micro-kernel columns (two 8-float vectors)

alignas(32) const int32_t kLaneTable[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};

// all-ones in the first `remaining` lanes (clamped to 0..8)
inline __m256 lane_mask(long remaining) {
    const long r = std::max<long>(0, std::min<long>(8, remaining));
    return _mm256_castsi256_ps(_mm256_loadu_si256((const __m256i*)(kLaneTable + 8 - r)));
}

inline float hsum(__m256 x) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

inline float hmax(__m256 x) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

// C[R x 16] (row stride ldc) [+]= A[R x k] (row stride lda) x B[k x 16] (row stride ldb)
template <int R>
void micro(long k, const float* a, long lda, const float* b, long ldb, float* c, long ldc, bool accumulate) {
    __m256 c0[R], c1[R];  // kept in registers: every loop over i is unrolled (else GCC spills them each step)
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
        c0[i] = accumulate ? _mm256_loadu_ps(c + i * ldc) : _mm256_setzero_ps();
        c1[i] = accumulate ? _mm256_loadu_ps(c + i * ldc + 8) : _mm256_setzero_ps();
    }
    for (long p = 0; p < k; ++p) {
        const __m256 b0 = _mm256_loadu_ps(b + p * ldb);
        const __m256 b1 = _mm256_loadu_ps(b + p * ldb + 8);
#pragma GCC unroll 8
        for (int i = 0; i < R; ++i) {
            const __m256 av = _mm256_broadcast_ss(a + i * lda + p);
            c0[i] = _mm256_fmadd_ps(av, b0, c0[i]);
            c1[i] = _mm256_fmadd_ps(av, b1, c1[i]);
        }
    }
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
        _mm256_storeu_ps(c + i * ldc, c0[i]);
        _mm256_storeu_ps(c + i * ldc + 8, c1[i]);
    }
}

// C[m x n] [+]= A[m x k] B[k x n], n a multiple of 16.
void gemm(long m, long n, long k, const float* a, long lda, const float* b, long ldb, float* c, long ldc,
          bool accumulate) {
    for (long j = 0; j < n; j += NR) {
        for (long i = 0; i < m; i += MR) {
            const float* ai = a + i * lda;
            const float* bj = b + j;
            float* cij = c + i * ldc + j;
            switch (std::min<long>(MR, m - i)) {
                case 6: micro<6>(k, ai, lda, bj, ldb, cij, ldc, accumulate); break;
                case 5: micro<5>(k, ai, lda, bj, ldb, cij, ldc, accumulate); break;
                case 4: micro<4>(k, ai, lda, bj, ldb, cij, ldc, accumulate); break;
                case 3: micro<3>(k, ai, lda, bj, ldb, cij, ldc, accumulate); break;
                case 2: micro<2>(k, ai, lda, bj, ldb, cij, ldc, accumulate); break;
                default: micro<1>(k, ai, lda, bj, ldb, cij, ldc, accumulate); break;
            }
        }
    }
}

using Tensor4 = posttrain_span::Tensor4<float>;
using Problem = posttrain_span::Problem<float>;
using posttrain_span::round_up;
using posttrain_span::Span;
using posttrain_span::key_row;
inline Tensor4 tensor(void* data, const long* strides) { return posttrain_span::tensor<float>(data, strides); }

// Per-thread work memory, sized for the most keys a span's queries see (lp columns, a multiple of 16).
struct Work {
    std::unique_ptr<float[]> kt, vt, s, dp, pn, dsn, qt, dot, dkt, dvt, rows;
    Work(long lp, long d, long g)
        : kt(new float[d * lp]), vt(new float[d * lp]), s(new float[BLOCK * lp]), dp(new float[BLOCK * lp]),
          pn(new float[g * BLOCK * lp]), dsn(new float[g * BLOCK * lp]), qt(new float[d * g * BLOCK]),
          dot(new float[d * g * BLOCK]), dkt(new float[d * lp]), dvt(new float[d * lp]), rows(new float[lp * d]) {}
};

// x^T of the keys a span's queries see: xt[e][j] = key j's element e, zero for plen + len <= j < lp.
void transpose_keys(const Tensor4& x, const Span& sp, long hk, long lp, long d, float* xt) {
    const long keys = sp.plen + sp.len;
    for (long j = 0; j < lp; ++j) {
        const float* row = j < keys ? key_row(x, sp, hk, j) : nullptr;
        for (long e = 0; e < d; ++e) xt[e * lp + j] = row ? row[e] : 0.f;
    }
}

// The keys as one row-major (plen + len) x d matrix with row stride *ld: the tensor itself for a plain span, a
// gathered copy in buf when a prefix lies elsewhere in the row.
const float* key_rows(const Tensor4& x, const Span& sp, long hk, long d, float* buf, long* ld) {
    if (!sp.plen) {
        *ld = x.st;
        return x.row(sp.b, hk, sp.start);
    }
    for (long j = 0; j < sp.plen + sp.len; ++j) memcpy(buf + j * d, key_row(x, sp, hk, j), d * sizeof(float));
    *ld = d;
    return buf;
}

// softmax over the visible keys of one row (in place), zero up to `width`; returns logsumexp.
float softmax_row(float* s, long visible, long width, float scale) {
    __m256 vmax = _mm256_set1_ps(-INFINITY);
    for (long j = 0; j < visible; j += 8)
        vmax = _mm256_max_ps(vmax, _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), _mm256_loadu_ps(s + j),
                                                     lane_mask(visible - j)));
    const float mx = hmax(vmax) * scale;
    const __m256 vs = _mm256_set1_ps(scale), vm = _mm256_set1_ps(mx);
    __m256 vsum = _mm256_setzero_ps();
    long j = 0;
    for (; j < visible; j += 8) {
        const __m256 e = _mm256_and_ps(exp_ps(_mm256_fmsub_ps(_mm256_loadu_ps(s + j), vs, vm)), lane_mask(visible - j));
        vsum = _mm256_add_ps(vsum, e);
        _mm256_storeu_ps(s + j, e);
    }
    for (; j < width; j += 8) _mm256_storeu_ps(s + j, _mm256_setzero_ps());
    const float sum = hsum(vsum);
    const __m256 inv = _mm256_set1_ps(1.0f / sum);
    for (long i = 0; i < visible; i += 8) _mm256_storeu_ps(s + i, _mm256_mul_ps(_mm256_loadu_ps(s + i), inv));
    return mx + std::log(sum);
}

void forward_task(const Problem& pb, Work& w, const Span& sp, long hk) {
    const long d = pb.D, g = pb.H / pb.Hkv, len = sp.len, pre = sp.plen, lp = round_up(pre + len, NR);
    transpose_keys(pb.k, sp, hk, lp, d, w.kt.get());
    long ldv;
    const float* v0 = key_rows(pb.v, sp, hk, d, w.rows.get(), &ldv);
    for (long r0 = 0; r0 < len; r0 += BLOCK) {
        const long rows = std::min<long>(BLOCK, len - r0), keys = pre + r0 + rows, np = round_up(keys, NR);
        for (long hq = hk * g; hq < (hk + 1) * g; ++hq) {
            gemm(rows, np, d, pb.q.row(sp.b, hq, sp.start + r0), pb.q.st, w.kt.get(), lp, w.s.get(), lp, false);
            float* lse = pb.lse + (sp.b * pb.H + hq) * pb.T + sp.start + r0;
            for (long i = 0; i < rows; ++i) lse[i] = softmax_row(w.s.get() + i * lp, pre + r0 + i + 1, np, pb.scale);
            // O = P v over the visible keys only (the zero tail of P needs no rows of v)
            gemm(rows, d, keys, w.s.get(), lp, v0, ldv, pb.out.row(sp.b, hq, sp.start + r0), pb.out.st, false);
        }
    }
}

// dK and dV of a span's prefix keys go to `prefix` (this span's slot: [K/V head][plen][d] of dK, then of dV),
// summed into the prefix's rows after every task is done (add_prefix_grads): several spans share one prefix.
void backward_task(const Problem& pb, Work& w, const Span& sp, long hk, float* prefix) {
    const long d = pb.D, g = pb.H / pb.Hkv, len = sp.len, pre = sp.plen, lp = round_up(pre + len, NR), gb = g * BLOCK;
    transpose_keys(pb.k, sp, hk, lp, d, w.kt.get());
    transpose_keys(pb.v, sp, hk, lp, d, w.vt.get());
    long ldk;
    const float* k0 = key_rows(pb.k, sp, hk, d, w.rows.get(), &ldk);
    std::fill(w.dkt.get(), w.dkt.get() + d * lp, 0.f);
    std::fill(w.dvt.get(), w.dvt.get() + d * lp, 0.f);
    const __m256 vs = _mm256_set1_ps(pb.scale);
    for (long r0 = 0; r0 < len; r0 += BLOCK) {
        const long rows = std::min<long>(BLOCK, len - r0), keys = pre + r0 + rows, np = round_up(keys, NR);
        for (long hh = 0; hh < g; ++hh) {
            const long hq = hk * g + hh;
            const float* qrow = pb.q.row(sp.b, hq, sp.start + r0);
            const float* grow = pb.grad.row(sp.b, hq, sp.start + r0);
            gemm(rows, np, d, qrow, pb.q.st, w.kt.get(), lp, w.s.get(), lp, false);     // S
            gemm(rows, np, d, grow, pb.grad.st, w.vt.get(), lp, w.dp.get(), lp, false);  // dP
            const float* lse = pb.lse + (sp.b * pb.H + hq) * pb.T + sp.start + r0;
            float* pn = w.pn.get() + hh * BLOCK * lp;
            float* dsn = w.dsn.get() + hh * BLOCK * lp;
            for (long i = 0; i < rows; ++i) {
                const long visible = pre + r0 + i + 1;
                const float* s = w.s.get() + i * lp;
                const float* dp = w.dp.get() + i * lp;
                const float* o = pb.out.row(sp.b, hq, sp.start + r0 + i);
                const float* go = grow + i * pb.grad.st;
                __m256 acc = _mm256_setzero_ps();
                for (long e = 0; e < d; e += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(go + e), _mm256_loadu_ps(o + e), acc);
                const __m256 delta = _mm256_set1_ps(hsum(acc));
                const __m256 vl = _mm256_set1_ps(lse[i]);
                for (long j = 0; j < np; j += 8) {
                    const __m256 p = _mm256_and_ps(exp_ps(_mm256_fmsub_ps(_mm256_loadu_ps(s + j), vs, vl)),
                                                   lane_mask(visible - j));
                    _mm256_storeu_ps(pn + i * lp + j, p);
                    _mm256_storeu_ps(dsn + i * lp + j,
                                     _mm256_mul_ps(_mm256_mul_ps(p, _mm256_sub_ps(_mm256_loadu_ps(dp + j), delta)), vs));
                }
            }
            for (long i = rows; i < BLOCK; ++i) {  // rows past the span: zero, they join the dK, dV products
                std::fill(pn + i * lp, pn + i * lp + np, 0.f);
                std::fill(dsn + i * lp, dsn + i * lp + np, 0.f);
            }
            // dQ = dS k over the visible keys, written in place
            gemm(rows, d, keys, dsn, lp, k0, ldk, pb.dq.row(sp.b, hq, sp.start + r0), pb.dq.st, false);
            for (long e = 0; e < d; ++e) {  // q^T and dO^T of this head's rows: A operands of dK^T, dV^T
                float* qt = w.qt.get() + e * gb + hh * BLOCK;
                float* dot = w.dot.get() + e * gb + hh * BLOCK;
                for (long i = 0; i < BLOCK; ++i) {
                    qt[i] = i < rows ? qrow[i * pb.q.st + e] : 0.f;
                    dot[i] = i < rows ? grow[i * pb.grad.st + e] : 0.f;
                }
            }
        }
        gemm(d, np, gb, w.qt.get(), gb, w.dsn.get(), lp, w.dkt.get(), lp, true);   // dK^T += q^T dS
        gemm(d, np, gb, w.dot.get(), gb, w.pn.get(), lp, w.dvt.get(), lp, true);   // dV^T += dO^T P
    }
    for (long j = 0; j < len; ++j) {
        float* dk = pb.dk.row(sp.b, hk, sp.start + j);
        float* dv = pb.dv.row(sp.b, hk, sp.start + j);
        for (long e = 0; e < d; ++e) {
            dk[e] = w.dkt[e * lp + pre + j];
            dv[e] = w.dvt[e * lp + pre + j];
        }
    }
    posttrain_span::store_prefix_grads(w.dkt.get(), w.dvt.get(), lp, pre, d, hk, pb.Hkv, prefix);
}

// The prefix keys' dK, dV from every span that sees them, added to the prefix rows (which their own plain span
// wrote), span by span in table order: the sum's order, and so the result, does not depend on the thread count.
void add_prefix_grads(const Problem& pb, const float* prefix, const long* offsets, int threads) {
    const long d = pb.D;
#pragma omp parallel for num_threads(threads) schedule(static, 1)
    for (long hk = 0; hk < pb.Hkv; ++hk) {
        for (long i = 0; i < pb.n_spans; ++i) {
            const Span sp = posttrain_span::span_at(pb.spans, i);
            if (!sp.plen) continue;
            const float* pk = prefix + offsets[i] + hk * sp.plen * d;
            const float* pv = pk + pb.Hkv * sp.plen * d;
            for (long j = 0; j < sp.plen; ++j) {
                float* dk = pb.dk.row(sp.b, hk, sp.ps + j);
                float* dv = pb.dv.row(sp.b, hk, sp.ps + j);
                for (long e = 0; e < d; ++e) {
                    dk[e] += pk[j * d + e];
                    dv[e] += pv[j * d + e];
                }
            }
        }
    }
}

}  // namespace

extern "C" {

// Strides are (batch, head, position) in elements. spans: n_spans x (batch row, start, end, prefix start, prefix
// end), longest first for balance; a span's queries see its prefix in full (RL's shared prompts, data/groups.py),
// and the prefix's rows must be a span of their own. Returns 0, or 1 when the head dimension is not a multiple of
// 16 or H is not a multiple of Hkv.
int posttrain_span_attention_forward(void* q, const long* qs, void* k, const long* ks, void* v, const long* vs,
                                     void* out, const long* os, float* lse, long B, long H, long Hkv, long T, long D,
                                     const int32_t* spans, long n_spans, float scale, int threads) {
    if (D % 16 || H % Hkv) return 1;
    Problem pb{tensor(q, qs), tensor(k, ks), tensor(v, vs), tensor(out, os), {}, {}, {}, {},
               lse, B, H, Hkv, T, D, scale, spans, n_spans};
    posttrain_span::run_tasks<Work>(pb, threads, NR, forward_task);
    return 0;
}

int posttrain_span_attention_backward(void* q, const long* qs, void* k, const long* ks, void* v, const long* vs,
                                      void* out, const long* os, void* grad, const long* gs, float* lse,
                                      void* dq, const long* dqs, void* dk, const long* dks, void* dv, const long* dvs,
                                      long B, long H, long Hkv, long T, long D, const int32_t* spans, long n_spans,
                                      float scale, int threads) {
    if (D % 16 || H % Hkv) return 1;
    Problem pb{tensor(q, qs), tensor(k, ks), tensor(v, vs), tensor(out, os), tensor(grad, gs),
               tensor(dq, dqs), tensor(dk, dks), tensor(dv, dvs), lse, B, H, Hkv, T, D, scale, spans, n_spans};
    const std::vector<long> offsets = posttrain_span::prefix_offsets(spans, n_spans, Hkv, D);
    std::vector<float> prefix(offsets[n_spans]);
    posttrain_span::run_tasks<Work>(pb, threads, NR, [&](const Problem& p, Work& w, const Span& sp, long hk) {
        backward_task(p, w, sp, hk, prefix.data() + offsets[sp.index]);
    });
    if (offsets[n_spans]) add_prefix_grads(pb, prefix.data(), offsets.data(), threads);
    return 0;
}

}  // extern "C"
