// Causal attention of packed spans on a CPU with AVX512-BF16, forward and backward, in one call per layer.
//
// Written for posttrain (see posttrain/models/native.py for how it is built and models/attention.py for where
// it is used). The math is the same as posttrain's matrix-product span attention, _CausalSpanAttention:
//
//   S  = q k^T                     bf16 x bf16 products accumulated in fp32 (vdpbf16ps), never rounded to bf16
//   P  = softmax(S * scale), causal, fp32; lse = logsumexp per row is kept for the backward
//   O  = bf16(P) v                 fp32 accumulation, rounded to bf16 once
//   backward: P = exp(S * scale - lse) recomputed, dP = dO v^T (fp32), delta = rowsum(dO * O),
//             dS = P (dP - delta) scale, dQ = bf16(dS) k, dK = bf16(dS)^T q, dV = bf16(P)^T dO
//
// Grouped-query heads: the g query heads of one K/V head are one task, so K and V are packed once and dK, dV
// are summed over the group inside the products. Work is split into tasks (span, K/V head), run by OpenMP
// threads; each task walks its query rows in blocks of BLOCK rows, multiplying each block only by the keys it
// can see. Every product is one micro-kernel: C (fp32) [+]= A (bf16, rows with pairs of the reduction index
// adjacent) x B (bf16, "VNNI" layout: [K/2][N][2], the pair of reduction indices of one column adjacent).
//
// Shared prefixes (RL groups, posttrain/data/groups.py): a span's keys are its prefix's rows followed by its own,
// and its queries see the prefix in full. The prefix rows are a plain span of their own; their dK, dV also get
// every completion's share, which each task leaves in its own fp32 slot and one pass adds afterwards in table
// order, rounding each prefix row to bf16 once.
//
// Layout conventions: q, k, v, grad and outputs are addressed by (batch, head, position) strides with the head
// dimension D contiguous; D must be a multiple of 32. Buffers padded to 32 columns are zero in the padding.

#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <vector>

#include "span_tasks.h"

namespace {

typedef uint16_t bf16;
constexpr int BLOCK = 32;  // query rows per block
constexpr int MR = 8;      // micro-kernel rows
constexpr int NR = 32;     // micro-kernel columns (two 16-float vectors)

inline bf16 to_bf16(float f) {  // round to nearest even, as torch's .to(bfloat16)
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16)(u >> 16);
}

inline __m512 load_bf16x16(const bf16* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

inline void store_bf16x16(bf16* p, __m512 x) {
    _mm256_storeu_si256((__m256i*)p, (__m256i)_mm512_cvtneps_pbh(x));
}

// exp(x) for x <= 0 (softmax arguments): Cody-Waite reduction x = n ln2 + r, |r| <= ln2 / 2, degree-7 Taylor
// polynomial (truncation error < 1e-8 relative), 2^n by vscalefps (underflows to 0 below -149 ln2).
inline __m512 exp_ps(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-110.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
    __m512 p = _mm512_set1_ps(1.0f / 5040);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

inline __mmask16 head_mask(long remaining) {
    return remaining >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << remaining) - 1u);
}

// C[rows x 32] (row stride ldc) [+]= A[rows x 2kp] (row stride lda) x B (VNNI, [kp][ldb][2], columns 0..31)
template <int R>
void micro(long kp, const bf16* a, long lda, const bf16* b, long ldb, float* c, long ldc, bool accumulate) {
    __m512 c0[R], c1[R];
    for (int i = 0; i < R; ++i) {
        c0[i] = accumulate ? _mm512_loadu_ps(c + i * ldc) : _mm512_setzero_ps();
        c1[i] = accumulate ? _mm512_loadu_ps(c + i * ldc + 16) : _mm512_setzero_ps();
    }
    for (long p = 0; p < kp; ++p) {
        const __m512bh b0 = (__m512bh)_mm512_loadu_si512(b + p * ldb * 2);
        const __m512bh b1 = (__m512bh)_mm512_loadu_si512(b + p * ldb * 2 + 32);
        for (int i = 0; i < R; ++i) {
            int32_t pair;
            memcpy(&pair, a + i * lda + 2 * p, 4);
            const __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
            c0[i] = _mm512_dpbf16_ps(c0[i], av, b0);
            c1[i] = _mm512_dpbf16_ps(c1[i], av, b1);
        }
    }
    for (int i = 0; i < R; ++i) {
        _mm512_storeu_ps(c + i * ldc, c0[i]);
        _mm512_storeu_ps(c + i * ldc + 16, c1[i]);
    }
}

// C[m x n] [+]= A[m x 2kp] B, n a multiple of 32.
void gemm(long m, long n, long kp, const bf16* a, long lda, const bf16* b, long ldb, float* c, long ldc,
          bool accumulate) {
    for (long j = 0; j < n; j += NR) {
        for (long i = 0; i < m; i += MR) {
            const bf16* ai = a + i * lda;
            const bf16* bj = b + j * 2;
            float* cij = c + i * ldc + j;
            switch (std::min<long>(MR, m - i)) {
                case 8: micro<8>(kp, ai, lda, bj, ldb, cij, ldc, accumulate); break;
                case 7: micro<7>(kp, ai, lda, bj, ldb, cij, ldc, accumulate); break;
                case 6: micro<6>(kp, ai, lda, bj, ldb, cij, ldc, accumulate); break;
                case 5: micro<5>(kp, ai, lda, bj, ldb, cij, ldc, accumulate); break;
                case 4: micro<4>(kp, ai, lda, bj, ldb, cij, ldc, accumulate); break;
                case 3: micro<3>(kp, ai, lda, bj, ldb, cij, ldc, accumulate); break;
                case 2: micro<2>(kp, ai, lda, bj, ldb, cij, ldc, accumulate); break;
                default: micro<1>(kp, ai, lda, bj, ldb, cij, ldc, accumulate); break;
            }
        }
    }
}

using Tensor4 = posttrain_span::Tensor4<bf16>;
using Problem = posttrain_span::Problem<bf16>;
using posttrain_span::round_up;
using posttrain_span::Span;
using posttrain_span::key_row;
inline Tensor4 tensor(void* data, const long* strides) { return posttrain_span::tensor<bf16>(data, strides); }

template <typename T>
struct Buffer {  // uninitialised: every element the kernel reads, padding included, is written first
    std::unique_ptr<T[]> p;
    explicit Buffer(long n) : p(new T[n]) {}
    T* data() { return p.get(); }
    T& operator[](long i) { return p[i]; }
};

// Per-thread work memory, sized for the longest span.
struct Work {
    Buffer<bf16> kt, vt, kn, vn, prow, pn, dsn, qt, dot;
    Buffer<float> s, dp, obuf, dkt, dvt;
    Work(long lp, long d, long g)
        : kt(d * lp), vt(d * lp), kn(lp * d), vn(lp * d), prow(BLOCK * lp), pn(g * BLOCK * lp),
          dsn(g * BLOCK * lp), qt(d * g * BLOCK), dot(d * g * BLOCK), s(BLOCK * lp), dp(BLOCK * lp),
          obuf(BLOCK * d), dkt(d * lp), dvt(d * lp) {}
};

// The keys a span's queries see (prefix, then span) packed both ways: xt = [D/2][lp][2] (B operand of q x^T),
// xn = [lp/2][D][2] (B of p x); zero for plen + len <= j < lp.
void pack_keys(const Tensor4& x, const Span& sp, long hk, long lp, long d, bf16* xt, bf16* xn) {
    uint32_t* xt32 = (uint32_t*)xt;
    const long keys = sp.plen + sp.len;
    for (long j = 0; j < lp; ++j) {
        const bf16* row = j < keys ? key_row(x, sp, hk, j) : nullptr;
        for (long p = 0; p < d / 2; ++p) {
            uint32_t pair = 0;
            if (row) memcpy(&pair, row + 2 * p, 4);
            xt32[p * lp + j] = pair;
        }
        bf16* dst = xn + (j / 2) * d * 2 + (j % 2);
        for (long e = 0; e < d; ++e) dst[2 * e] = row ? row[e] : (bf16)0;
    }
}

// softmax over the visible keys of one row (in place, fp32), zero up to `width`; returns logsumexp.
float softmax_row(float* s, long visible, long width, float scale) {
    __m512 vmax = _mm512_set1_ps(-INFINITY);
    for (long j = 0; j < visible; j += 16) {
        const __mmask16 m = head_mask(visible - j);
        vmax = _mm512_mask_max_ps(vmax, m, vmax, _mm512_maskz_loadu_ps(m, s + j));
    }
    const float mx = _mm512_reduce_max_ps(vmax) * scale;
    const __m512 vs = _mm512_set1_ps(scale), vm = _mm512_set1_ps(mx);
    __m512 vsum = _mm512_setzero_ps();
    long j = 0;
    for (; j < visible; j += 16) {
        const __mmask16 m = head_mask(visible - j);
        const __m512 e = _mm512_maskz_mov_ps(m, exp_ps(_mm512_fmsub_ps(_mm512_loadu_ps(s + j), vs, vm)));
        vsum = _mm512_add_ps(vsum, e);
        _mm512_storeu_ps(s + j, e);
    }
    for (; j < width; j += 16) _mm512_storeu_ps(s + j, _mm512_setzero_ps());
    const float sum = _mm512_reduce_add_ps(vsum);
    const __m512 inv = _mm512_set1_ps(1.0f / sum);
    for (long i = 0; i < visible; i += 16) _mm512_storeu_ps(s + i, _mm512_mul_ps(_mm512_loadu_ps(s + i), inv));
    return mx + std::log(sum);
}

// fp32 rows [rows x width] -> bf16 "VNNI over rows": element (i, j) at ((base + i) / 2 * ld + j) * 2 + (base + i) % 2,
// rows past `rows` up to BLOCK written as zeros. base is even.
void pack_rows_vnni(const float* src, long ld_src, long rows, long width, bf16* dst, long ld, long base) {
    static const int16_t order[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                      8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
    const __m512i interleave = _mm512_loadu_si512(order);  // element 2e <- lo[e], 2e + 1 <- hi[e]
    for (long i = 0; i < BLOCK; i += 2) {
        bf16* out = dst + ((base + i) / 2) * ld * 2;
        for (long j = 0; j < width; j += 16) {
            const __m512 lo = i < rows ? _mm512_loadu_ps(src + i * ld_src + j) : _mm512_setzero_ps();
            const __m512 hi = i + 1 < rows ? _mm512_loadu_ps(src + (i + 1) * ld_src + j) : _mm512_setzero_ps();
            const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);  // lo in elements 0-15, hi in 16-31
            _mm512_storeu_si512(out + j * 2, _mm512_permutexvar_epi16(interleave, both));
        }
    }
}

void forward_task(const Problem& pb, Work& w, const Span& sp, long hk) {
    const long d = pb.D, g = pb.H / pb.Hkv, len = sp.len, pre = sp.plen, lp = round_up(pre + len, NR);
    pack_keys(pb.k, sp, hk, lp, d, w.kt.data(), w.kn.data());
    pack_keys(pb.v, sp, hk, lp, d, w.vt.data(), w.vn.data());
    for (long r0 = 0; r0 < len; r0 += BLOCK) {
        const long rows = std::min<long>(BLOCK, len - r0), np = round_up(pre + r0 + rows, NR);
        for (long hq = hk * g; hq < (hk + 1) * g; ++hq) {
            const bf16* qrow = pb.q.row(sp.b, hq, sp.start + r0);
            gemm(rows, np, d / 2, qrow, pb.q.st, w.kt.data(), lp, w.s.data(), lp, false);
            float* lse = pb.lse + (sp.b * pb.H + hq) * pb.T + sp.start + r0;
            for (long i = 0; i < rows; ++i) {
                float* s = w.s.data() + i * lp;
                lse[i] = softmax_row(s, pre + r0 + i + 1, np, pb.scale);
                for (long j = 0; j < np; j += 16) store_bf16x16(w.prow.data() + i * lp + j, _mm512_loadu_ps(s + j));
            }
            gemm(rows, d, np / 2, w.prow.data(), lp, w.vn.data(), d, w.obuf.data(), d, false);
            for (long i = 0; i < rows; ++i) {
                bf16* o = pb.out.row(sp.b, hq, sp.start + r0 + i);
                for (long e = 0; e < d; e += 16) store_bf16x16(o + e, _mm512_loadu_ps(w.obuf.data() + i * d + e));
            }
        }
    }
}

// dK and dV of a span's prefix keys go to `prefix` (this span's slot: [K/V head][plen][d] of dK, then of dV, fp32),
// added to the prefix's rows after every task is done (add_prefix_grads): several spans share one prefix.
void backward_task(const Problem& pb, Work& w, const Span& sp, long hk, float* prefix) {
    const long d = pb.D, g = pb.H / pb.Hkv, len = sp.len, pre = sp.plen, lp = round_up(pre + len, NR), gb = g * BLOCK;
    const long b = sp.b, start = sp.start;
    pack_keys(pb.k, sp, hk, lp, d, w.kt.data(), w.kn.data());
    pack_keys(pb.v, sp, hk, lp, d, w.vt.data(), w.vn.data());
    std::fill(w.dkt.data(), w.dkt.data() + d * lp, 0.f);
    std::fill(w.dvt.data(), w.dvt.data() + d * lp, 0.f);
    const __m512 vs = _mm512_set1_ps(pb.scale);
    for (long r0 = 0; r0 < len; r0 += BLOCK) {
        const long rows = std::min<long>(BLOCK, len - r0), np = round_up(pre + r0 + rows, NR);
        for (long hh = 0; hh < g; ++hh) {
            const long hq = hk * g + hh;
            const bf16* qrow = pb.q.row(b, hq, start + r0);
            const bf16* grow = pb.grad.row(b, hq, start + r0);
            gemm(rows, np, d / 2, qrow, pb.q.st, w.kt.data(), lp, w.s.data(), lp, false);    // S
            gemm(rows, np, d / 2, grow, pb.grad.st, w.vt.data(), lp, w.dp.data(), lp, false);  // dP
            const float* lse = pb.lse + (b * pb.H + hq) * pb.T + start + r0;
            for (long i = 0; i < rows; ++i) {
                const long visible = pre + r0 + i + 1;
                float* s = w.s.data() + i * lp;
                float* dp = w.dp.data() + i * lp;
                const bf16* o = pb.out.row(b, hq, start + r0 + i);
                const bf16* go = grow + i * pb.grad.st;
                __m512 acc = _mm512_setzero_ps();
                for (long e = 0; e < d; e += 16) acc = _mm512_fmadd_ps(load_bf16x16(go + e), load_bf16x16(o + e), acc);
                const __m512 delta = _mm512_set1_ps(_mm512_reduce_add_ps(acc));
                const __m512 vl = _mm512_set1_ps(lse[i]);
                for (long j = 0; j < np; j += 16) {
                    const __mmask16 m = j < visible ? head_mask(visible - j) : (__mmask16)0;
                    const __m512 p = _mm512_maskz_mov_ps(m, exp_ps(_mm512_fmsub_ps(_mm512_loadu_ps(s + j), vs, vl)));
                    const __m512 ds = _mm512_mul_ps(_mm512_mul_ps(p, _mm512_sub_ps(_mm512_loadu_ps(dp + j), delta)), vs);
                    _mm512_storeu_ps(s + j, p);
                    _mm512_storeu_ps(dp + j, ds);
                    store_bf16x16(w.prow.data() + i * lp + j, ds);  // dS row-major for dQ
                }
            }
            gemm(rows, d, np / 2, w.prow.data(), lp, w.kn.data(), d, w.obuf.data(), d, false);  // dQ
            for (long i = 0; i < rows; ++i) {
                bf16* dq = pb.dq.row(b, hq, start + r0 + i);
                for (long e = 0; e < d; e += 16) store_bf16x16(dq + e, _mm512_loadu_ps(w.obuf.data() + i * d + e));
            }
            pack_rows_vnni(w.s.data(), lp, rows, np, w.pn.data(), lp, hh * BLOCK);
            pack_rows_vnni(w.dp.data(), lp, rows, np, w.dsn.data(), lp, hh * BLOCK);
            for (long e = 0; e < d; ++e) {  // q^T and dO^T of this head's rows: A operands of dK^T, dV^T
                bf16* qt = w.qt.data() + e * gb + hh * BLOCK;
                bf16* dot = w.dot.data() + e * gb + hh * BLOCK;
                for (long i = 0; i < BLOCK; ++i) {
                    qt[i] = i < rows ? qrow[i * pb.q.st + e] : (bf16)0;
                    dot[i] = i < rows ? grow[i * pb.grad.st + e] : (bf16)0;
                }
            }
        }
        gemm(d, np, gb / 2, w.qt.data(), gb, w.dsn.data(), lp, w.dkt.data(), lp, true);   // dK^T += q^T dS
        gemm(d, np, gb / 2, w.dot.data(), gb, w.pn.data(), lp, w.dvt.data(), lp, true);   // dV^T += dO^T P
    }
    for (long j = 0; j < len; ++j) {
        bf16* dk = pb.dk.row(b, hk, start + j);
        bf16* dv = pb.dv.row(b, hk, start + j);
        for (long e = 0; e < d; ++e) {
            dk[e] = to_bf16(w.dkt[e * lp + pre + j]);
            dv[e] = to_bf16(w.dvt[e * lp + pre + j]);
        }
    }
    posttrain_span::store_prefix_grads(w.dkt.data(), w.dvt.data(), lp, pre, d, hk, pb.Hkv, prefix);
}

inline float from_bf16(bf16 x) {
    const uint32_t u = (uint32_t)x << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

// The prefix keys' dK, dV from every span that sees them, added to the prefix rows, which their own plain span
// wrote: per prefix, its rows' gradient plus every span's share, summed in fp32 in table order and rounded to
// bf16 once, so the result does not depend on the thread count.
void add_prefix_grads(const Problem& pb, const float* prefix, const long* offsets, int threads) {
    const long d = pb.D;
#pragma omp parallel for num_threads(threads) schedule(static, 1)
    for (long hk = 0; hk < pb.Hkv; ++hk) {
        std::unique_ptr<float[]> acc(new float[2 * d]);
        for (long i = 0; i < pb.n_spans; ++i) {
            const Span first = posttrain_span::span_at(pb.spans, i);
            bool seen = !first.plen;  // a plain span, or a prefix an earlier span of the table already summed
            for (long i0 = 0; i0 < i && !seen; ++i0) {
                const Span other = posttrain_span::span_at(pb.spans, i0);
                seen = other.plen == first.plen && other.b == first.b && other.ps == first.ps;
            }
            if (seen) continue;
            for (long j = 0; j < first.plen; ++j) {
                bf16* dk = pb.dk.row(first.b, hk, first.ps + j);
                bf16* dv = pb.dv.row(first.b, hk, first.ps + j);
                for (long e = 0; e < d; ++e) {
                    acc[e] = from_bf16(dk[e]);
                    acc[d + e] = from_bf16(dv[e]);
                }
                for (long i2 = i; i2 < pb.n_spans; ++i2) {
                    const Span sp = posttrain_span::span_at(pb.spans, i2);
                    if (sp.plen != first.plen || sp.b != first.b || sp.ps != first.ps) continue;
                    const float* pk = prefix + offsets[i2] + (hk * sp.plen + j) * d;
                    const float* pv = prefix + offsets[i2] + ((pb.Hkv + hk) * sp.plen + j) * d;
                    for (long e = 0; e < d; ++e) {
                        acc[e] += pk[e];
                        acc[d + e] += pv[e];
                    }
                }
                for (long e = 0; e < d; ++e) {
                    dk[e] = to_bf16(acc[e]);
                    dv[e] = to_bf16(acc[d + e]);
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
// 32 or H is not a multiple of Hkv.
int posttrain_span_attention_forward(void* q, const long* qs, void* k, const long* ks, void* v, const long* vs,
                                     void* out, const long* os, float* lse, long B, long H, long Hkv, long T, long D,
                                     const int32_t* spans, long n_spans, float scale, int threads) {
    if (D % 32 || H % Hkv) return 1;
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
    if (D % 32 || H % Hkv) return 1;
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
