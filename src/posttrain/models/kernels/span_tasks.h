// What posttrain's two span-attention kernels share (span_attention_avx512bf16.cpp, span_attention_fp32_avx2.cpp):
// the tensor addressing, the problem description and the task loop over (span, K/V head) on OpenMP threads.
// models/native.py hashes this header with each source, so a change here rebuilds both.
#pragma once

#include <omp.h>
#include <stdint.h>

#include <algorithm>
#include <vector>

namespace posttrain_span {

inline long round_up(long x, long m) { return (x + m - 1) / m * m; }

template <typename E>
struct Tensor4 {  // addressed as (batch, head, position, d), d contiguous
    E* data;
    long sb, sh, st;
    E* row(long b, long h, long t) const { return data + b * sb + h * sh + t * st; }
};

template <typename E>
Tensor4<E> tensor(void* data, const long* strides) { return Tensor4<E>{(E*)data, strides[0], strides[1], strides[2]}; }

template <typename E>
struct Problem {
    Tensor4<E> q, k, v, out, grad, dq, dk, dv;
    float* lse;  // [B][H][T]
    long B, H, Hkv, T, D;
    float scale;
    const int32_t* spans;  // [n][5]: batch row, start, end, prefix start, prefix end (equal: no shared prefix)
    long n_spans;
};

// One span of the table: its queries are positions [start, start + len) of row b; they see the shared prefix
// [ps, ps + plen) of the same row in full (none when plen is 0) and their own span causally.
struct Span {
    long index, b, start, len, ps, plen;
};

inline Span span_at(const int32_t* spans, long i) {
    const int32_t* s = spans + 5 * i;
    return Span{i, s[0], s[1], s[2] - s[1], s[3], s[4] - s[3]};
}

// Key j of a span's queries: the shared prefix's rows first, then the span's own.
template <typename E>
inline const E* key_row(const Tensor4<E>& x, const Span& sp, long hk, long j) {
    return j < sp.plen ? x.row(sp.b, hk, sp.ps + j) : x.row(sp.b, hk, sp.start + j - sp.plen);
}

// Where each span's fp32 slot of prefix-key gradients starts ([K/V head][plen][d] of dK, then of dV); the last
// entry is the total. A backward task writes its slot; the prefix rows get the sums afterwards.
inline std::vector<long> prefix_offsets(const int32_t* spans, long n, long hkv, long d) {
    std::vector<long> offsets(n + 1, 0);
    for (long i = 0; i < n; ++i) offsets[i + 1] = offsets[i] + 2 * hkv * span_at(spans, i).plen * d;
    return offsets;
}

// A backward task's dK^T, dV^T (fp32, d x lp) columns of its prefix keys (the first `pre`) into its slot.
inline void store_prefix_grads(const float* dkt, const float* dvt, long lp, long pre, long d, long hk, long hkv,
                               float* slot) {
    float* pk = slot + hk * pre * d;
    float* pv = pk + hkv * pre * d;
    for (long j = 0; j < pre; ++j)
        for (long e = 0; e < d; ++e) {
            pk[j * d + e] = dkt[e * lp + j];
            pv[j * d + e] = dvt[e * lp + j];
        }
}

// Every (span, K/V head) task once, on `threads` OpenMP threads taking tasks in order (spans come longest first);
// each thread owns one Work sized for the most keys a span's queries see (prefix + span), padded to `columns`.
template <typename Work, typename E, typename F>
void run_tasks(const Problem<E>& pb, int threads, long columns, F task) {
    long longest = 0;
    for (long i = 0; i < pb.n_spans; ++i) {
        const Span s = span_at(pb.spans, i);
        longest = std::max<long>(longest, s.plen + s.len);
    }
    const long lp = round_up(std::max<long>(longest, 1), columns), n = pb.n_spans * pb.Hkv;
#pragma omp parallel num_threads(threads)
    {
        Work w(lp, pb.D, pb.H / pb.Hkv);
#pragma omp for schedule(dynamic, 1)
        for (long t = 0; t < n; ++t) task(pb, w, span_at(pb.spans, t / pb.Hkv), t % pb.Hkv);
    }
}

}  // namespace posttrain_span
