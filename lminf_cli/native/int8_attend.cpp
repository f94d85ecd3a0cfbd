// The decode step's Λ-attention over the int8 window in one pass per head: scores, one softmax over
// the window and the global keys, p @ V.  The kernel of lminf::int8_decode_attend (schema and
// fallback in lminf_cli/native.py; the same arithmetic in torch ops: step_script.int8_attend).
//
// Why a kernel of our own: in torch ops this is ~20 calls a layer (an integer product over every
// head's keys, four float passes over the [Hkv, g, n] scores, a softmax, one weight-only product per
// head, the global keys' branch), each reading or writing the scores again; at 9k tokens they took
// ~10 ms of a ~30 ms step on 2 cores.  Here each key and value byte is read once, the scores stay
// in the core's cache, and the query is not rounded to int8 (the torch path rounds it for its
// integer product).
//
// Shapes (one token, R = g query rows per KV head, D head dim, a multiple of 16):
//   ql, qg [Hkv, R, D] float32: query rows rotated at their position / to the distance cap
//   k8 [Hkv, S, D] int8 (row stride D), vt8 [Hkv, D, W] int8 (values transposed, W >= n)
//   scales [2, Hkv, S] float32: key / value scale of each slot (last dim contiguous)
//   local_bias [B, R, n] and global_bias [B, R, G] (B = 1 or Hkv): 0 / -inf, or ALiBi's linear
//   biases; k_global, v_global [Hkv, G, D]
// Returns out [Hkv, R, D] float32 and the log-sum-exp [Hkv, R].
//
// Compiled on the user's machine with -march=native (native.py): GCC's vector extensions below
// become AVX-512 or AVX2 instructions, whichever the machine has.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/_weight_int4pack_mm_for_cpu.h>
#include <ATen/ops/_weight_int8pack_mm.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/silu.h>
#include <torch/library.h>

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef uint16_t v16h __attribute__((vector_size(32)));
typedef uint32_t v16u __attribute__((vector_size(64)));

constexpr int L = 16;  // lanes
// Slots ahead of the one computed whose keys (and values) are prefetched: the hardware's prefetcher
// alone left the kernel waiting on memory (scores 70 us a layer from the cache, 125 from DRAM).
constexpr int64_t PREFETCH = 64;

inline v16f splat(float x) { return v16f{} + x; }

inline v16f load(const float* p) { v16f v; std::memcpy(&v, p, sizeof v); return v; }
inline v16f load(const at::BFloat16* p) {  // bfloat16 is float32's upper half
  v16h h; std::memcpy(&h, p, sizeof h);
  v16u u = __builtin_convertvector(h, v16u) << 16;
  v16f v; std::memcpy(&v, &u, sizeof v); return v;
}
// (GCC 12 turns a vector conversion from int8 into 16 scalar ones: the sign extension is spelled out.)
inline v16f load(const int8_t* p) {
#if defined(__AVX512F__)
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#elif defined(__AVX2__)
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
  const __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)));
  v16f v; std::memcpy(&v, &lo, 32); std::memcpy(reinterpret_cast<char*>(&v) + 32, &hi, 32); return v;
#else
  v16f v;
  for (int i = 0; i < L; ++i) v[i] = p[i];
  return v;
#endif
}
inline void store(float* p, v16f v) { std::memcpy(p, &v, sizeof v); }
inline float scalar(const float* p) { return *p; }
inline float scalar(const at::BFloat16* p) { return static_cast<float>(*p); }

inline float hsum(v16f v) {
  float s = 0.f;
  for (int i = 0; i < L; ++i) s += v[i];
  return s;
}

// Lane i of the result = the sum of a[i]'s lanes, for 16 vectors: four rounds that each add the two
// halves of every partial sum, interleaving pairs of vectors (15 shuffle-and-add steps in all, not 16
// horizontal sums).
template <typename V>
inline V transpose_sum(V* a) {
  const v16i h0 = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
  const v16i h1 = {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31};
  const v16i q0 = {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27};
  const v16i q1 = {4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31};
  const v16i e0 = {0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29};
  const v16i e1 = {2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31};
  const v16i o0 = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
  const v16i o1 = {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31};
  V b[8], c[4], d[2];
  for (int i = 0; i < 8; ++i) b[i] = __builtin_shuffle(a[2 * i], a[2 * i + 1], h0) + __builtin_shuffle(a[2 * i], a[2 * i + 1], h1);
  for (int i = 0; i < 4; ++i) c[i] = __builtin_shuffle(b[2 * i], b[2 * i + 1], q0) + __builtin_shuffle(b[2 * i], b[2 * i + 1], q1);
  for (int i = 0; i < 2; ++i) d[i] = __builtin_shuffle(c[2 * i], c[2 * i + 1], e0) + __builtin_shuffle(c[2 * i], c[2 * i + 1], e1);
  return __builtin_shuffle(d[0], d[1], o0) + __builtin_shuffle(d[0], d[1], o1);
}

// exp(x) for x <= 0 (scores minus their maximum): Cody-Waite reduction x = k ln2 + f, |f| <= ln2/2,
// and Cephes' degree-7 polynomial for e^f (relative error ~1e-7); 0 below -87 (and for -inf).
inline v16f exp_neg(v16f x) {
  const v16f big = splat(12582912.f);  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  v16f xc = x < splat(-87.f) ? splat(-87.f) : x;
  v16f k = (xc * splat(1.44269504088896341f) + big) - big;
  v16f f = xc - k * splat(0.693359375f) - k * splat(-2.12194440e-4f);
  v16f p = splat(1.9875691500e-4f);
  p = p * f + splat(1.3981999507e-3f);
  p = p * f + splat(8.3334519073e-3f);
  p = p * f + splat(4.1665795894e-2f);
  p = p * f + splat(1.6666665459e-1f);
  p = p * f + splat(5.0000001201e-1f);
  p = p * f * f + f + splat(1.f);
  v16i e = (__builtin_convertvector(k, v16i) + 127) << 23;
  v16f two_k; std::memcpy(&two_k, &e, sizeof two_k);
  v16f r = p * two_k;
  return x < splat(-87.f) ? splat(0.f) : r;
}

// Scores of one query row q (pre-scaled, D = 16 C floats) against slots [a, b) of a head's keys:
// s[j] = q . k8[j] * kscale[j].  Sixteen slots at a time: their keys widened to float once (into
// kf, for every row of the head), each slot's 16-lane partial sums kept in registers, then one
// transpose_sum.  C is a template argument for the common head dims (64, 128: the loops unroll
// and q stays in registers); 0 reads it at run time.
template <int C>
void scores_block(const float* const* q, int64_t R, int64_t c_run, const int8_t* k, const float* ks, int64_t a,
                  int64_t b, float* const* s) {
  const int64_t nc = C ? C : c_run, D = nc * L;
  alignas(64) float kf[L * 16 * L];  // 16 slots x up to 16 chunks
  int64_t j = a;
  for (; j + L <= b; j += L) {
    for (int i = 0; i < L; ++i)
      for (int64_t c = 0; c < nc; ++c) store(kf + (i * nc + c) * L, load(k + (j + i) * D + c * L));
    const v16f kscale = load(ks + j);
    for (int64_t r = 0; r < R; ++r) {
      v16f part[L];
      for (int i = 0; i < L; ++i) {
        v16f acc = load(q[r]) * load(kf + i * nc * L);
        for (int64_t c = 1; c < nc; ++c) acc += load(q[r] + c * L) * load(kf + (i * nc + c) * L);
        part[i] = acc;
      }
      store(s[r] + j, transpose_sum(part) * kscale);
    }
  }
  for (; j < b; ++j)  // the last < 16 slots
    for (int64_t r = 0; r < R; ++r) {
      v16f acc{};
      for (int64_t c = 0; c < nc; ++c) acc += load(q[r] + c * L) * load(k + j * D + c * L);
      s[r][j] = hsum(acc) * ks[j];
    }
}

#if defined(__AVX512BW__)
// The same scores with the query rounded to int16 (q16 [R][D], one scale per row: qs[r]) and the
// keys widened to int16: products summed in int32, exactly (|sum| <= 512 * 32767 * 127 < 2^31 for
// D <= 512), 32 at a time (VNNI: one instruction; else multiply-add and add).  Rounding the query to
// 1/65,534 of its largest element costs ~1e-5 of a score; it halves the arithmetic of the float
// path, whose int8 -> float widening took most of it.  D = 32 NC (template, for 64 and 128).
template <int NC>
void scores_block_i16(const int16_t* const* q16, const float* qs, int64_t R, const int8_t* k, const float* ks,
                      int64_t a, int64_t b, float* const* s) {
  constexpr int64_t D = 32 * NC;
  constexpr int MAXR = 8;
  int64_t j = a;
  for (int64_t r0 = 0; r0 < R; r0 += MAXR) {  // rows eight at a time: each key is widened once for them all
    const int64_t nr = std::min<int64_t>(MAXR, R - r0);
    __m512i qv[MAXR][NC];
    for (int64_t r = 0; r < nr; ++r)
      for (int c = 0; c < NC; ++c) qv[r][c] = _mm512_loadu_si512(q16[r0 + r] + 32 * c);
    alignas(64) v16i part[MAXR][L];
    for (j = a; j + L <= b; j += L) {
      for (int i = 0; i < L; ++i) {
        __builtin_prefetch(k + (j + PREFETCH + i) * D);
        __m512i kw[NC];
        for (int c = 0; c < NC; ++c)
          kw[c] = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(k + (j + i) * D + 32 * c)));
        for (int64_t r = 0; r < nr; ++r) {
          __m512i acc = _mm512_setzero_si512();
          for (int c = 0; c < NC; ++c) {
#if defined(__AVX512VNNI__)
            acc = _mm512_dpwssd_epi32(acc, kw[c], qv[r][c]);
#else
            acc = _mm512_add_epi32(acc, _mm512_madd_epi16(kw[c], qv[r][c]));
#endif
          }
          std::memcpy(&part[r][i], &acc, sizeof acc);
        }
      }
      const v16f kscale = load(ks + j);
      for (int64_t r = 0; r < nr; ++r)
        store(s[r0 + r] + j, __builtin_convertvector(transpose_sum(part[r]), v16f) * (splat(qs[r0 + r]) * kscale));
    }
    for (int64_t t = j; t < b; ++t)  // the last < 16 slots
      for (int64_t r = r0; r < r0 + nr; ++r) {
        int32_t acc = 0;
        for (int64_t e = 0; e < D; ++e) acc += int32_t(q16[r][e]) * int32_t(k[t * D + e]);
        s[r][t] = float(acc) * qs[r] * ks[t];
      }
  }
}
#endif

template <typename G>
void global_scores(const float* q, int64_t D, const G* kg, int64_t G_n, const float* gbias, float* s) {
  for (int64_t j = 0; j < G_n; ++j) {
    v16f acc{};
    for (int64_t c = 0; c < D / L; ++c) acc += load(q + c * L) * load(kg + j * D + c * L);
    s[j] = hsum(acc) + gbias[j];
  }
}

inline v16f vmax(v16f a, v16f b) { return a > b ? a : b; }

// One row's softmax over its n local scores (+ bias) and G global ones, in place; the local
// probabilities then carry the value scales (p @ V reads int8 values).  Returns the row's lse.
template <typename B>
float softmax_row(float* s, const B* bias, int64_t n, int64_t G_n, const float* vs) {
  const float inf = std::numeric_limits<float>::infinity();
  v16f mv = splat(-inf);
  int64_t j = 0;
  for (; j + L <= n; j += L) { v16f x = load(s + j) + load(bias + j); store(s + j, x); mv = vmax(mv, x); }
  float mx = -inf;
  for (int i = 0; i < L; ++i) mx = std::max(mx, mv[i]);
  for (; j < n; ++j) { s[j] += scalar(bias + j); mx = std::max(mx, s[j]); }
  const int64_t m = n + G_n;
  for (j = n; j < m; ++j) mx = std::max(mx, s[j]);
  if (mx == -inf) {  // a row that sees no key (not in a decode step): zeros, like the torch path's nan-free rows
    for (j = 0; j < m; ++j) s[j] = 0.f;
    return mx;
  }
  v16f sum{};
  for (j = 0; j + L <= m; j += L) { v16f e = exp_neg(load(s + j) - splat(mx)); store(s + j, e); sum += e; }
  float total = hsum(sum);
  for (; j < m; ++j) { float e = std::exp(s[j] - mx); s[j] = e; total += e; }
  const float inv = 1.f / total;
  const v16f vinv = splat(inv);
  for (j = 0; j + L <= n; j += L) store(s + j, load(s + j) * load(vs + j) * vinv);
  for (; j < n; ++j) s[j] = s[j] * vs[j] * inv;
  for (j = n; j < m; ++j) s[j] *= inv;
  return mx + std::log(total);
}

// p @ V for NR query rows and four value dims: out[r][e] += sum_j p[r][j] * v[e][j] over j < n.
// NR x 4 accumulators stay in registers; each p vector is loaded once for the four dims.
template <int NR>
void pv_block(const float* const* p, const int8_t* const* v, int64_t n, float (*out)[4]) {
  v16f acc[NR][4] = {};
  int64_t j = 0;
  for (; j + L <= n; j += L) {
    if (j % 64 == 0)
      for (int e = 0; e < 4; ++e) __builtin_prefetch(v[e] + j + 16 * PREFETCH);
    const v16f v0 = load(v[0] + j), v1 = load(v[1] + j), v2 = load(v[2] + j), v3 = load(v[3] + j);
    for (int r = 0; r < NR; ++r) {
      const v16f pj = load(p[r] + j);
      acc[r][0] += pj * v0; acc[r][1] += pj * v1; acc[r][2] += pj * v2; acc[r][3] += pj * v3;
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int e = 0; e < 4; ++e) {
      float t = hsum(acc[r][e]);
      for (int64_t i = j; i < n; ++i) t += p[r][i] * v[e][i];
      out[r][e] += t;
    }
}

template <typename B, typename G>
std::tuple<at::Tensor, at::Tensor> attend(const at::Tensor& ql_in, const at::Tensor& qg_in, const at::Tensor& k8,
                                          const at::Tensor& vt8, const at::Tensor& scales, int64_t n,
                                          const at::Tensor& local_bias, const at::Tensor& k_global,
                                          const at::Tensor& v_global, const c10::optional<at::Tensor>& global_bias,
                                          double scale) {
  const int64_t H = ql_in.size(0), R = ql_in.size(1), D = ql_in.size(2), C = D / L;
  const int64_t G_n = global_bias.has_value() ? k_global.size(1) : 0;
  // Query rows pre-scaled, contiguous float32 (a few hundred numbers).
  at::Tensor ql = ql_in.to(at::kFloat).mul(scale).contiguous();
  at::Tensor qg = G_n ? qg_in.to(at::kFloat).mul(scale).contiguous() : ql;
  at::Tensor kg = k_global.contiguous(), vg = v_global.contiguous();
  at::Tensor gb = G_n ? global_bias->to(at::kFloat).reshape({-1, R, G_n}).contiguous() : at::Tensor();
  const int64_t gb_head = G_n && gb.size(0) > 1 ? R * G_n : 0;
  at::Tensor bias = local_bias.reshape({-1, R, n});
  const int64_t bias_heads = bias.size(0), bias_head = bias.stride(0), bias_row = bias.stride(1);

  const int64_t m = n + G_n, s_row = (m + L - 1) / L * L;
  at::Tensor scores = at::empty({H, R, s_row}, ql.options());
  at::Tensor out = at::empty({H, R, D}, ql.options());
  at::Tensor lse = at::empty({H, R}, ql.options());
  float* S = scores.data_ptr<float>();
  float* O = out.data_ptr<float>();
  float* LS = lse.data_ptr<float>();
  const float* Q = ql.data_ptr<float>();
  const float* QG = qg.data_ptr<float>();
  const int8_t* K = k8.data_ptr<int8_t>();
  const int8_t* V = vt8.data_ptr<int8_t>();
  const float* SC = scales.data_ptr<float>();
  const B* BI = bias.data_ptr<B>();
  const int64_t k_head = k8.stride(0), v_head = vt8.stride(0), v_row = vt8.stride(1);
  const int64_t sc_kind = scales.stride(0), sc_head = scales.stride(1);

  // The query rows in int16 for the integer scores (scores_block_i16): a few hundred numbers.
  std::vector<int16_t> Q16(H * R * D);
  std::vector<float> QS(H * R);
  for (int64_t w = 0; w < H * R; ++w) {
    float mx = 0.f;
    for (int64_t e = 0; e < D; ++e) mx = std::max(mx, std::fabs(Q[w * D + e]));
    const float qscale = mx > 0.f ? mx / 32767.f : 1.f;
    QS[w] = qscale;
    for (int64_t e = 0; e < D; ++e) Q16[w * D + e] = static_cast<int16_t>(std::nearbyint(Q[w * D + e] / qscale));
  }
  // 1. Scores without the bias: work items are (head, block of slots); the global keys' scores go
  // with each head's first block.
  constexpr int64_t BLOCK = 512;
  const int64_t blocks = (n + BLOCK - 1) / BLOCK;
  at::parallel_for(0, H * blocks, 1, [&](int64_t w0, int64_t w1) {
    std::vector<const float*> q(R);
    std::vector<float*> s(R);
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t h = w / blocks, a = (w % blocks) * BLOCK, b = std::min(n, a + BLOCK);
      for (int64_t r = 0; r < R; ++r) { q[r] = Q + (h * R + r) * D; s[r] = S + (h * R + r) * s_row; }
      const int8_t* k = K + h * k_head;
      const float* ks = SC + h * sc_head;
#if defined(__AVX512BW__)
      std::vector<const int16_t*> q16r(R);
      for (int64_t r = 0; r < R; ++r) q16r[r] = Q16.data() + (h * R + r) * D;
      if (D == 64) { scores_block_i16<2>(q16r.data(), QS.data() + h * R, R, k, ks, a, b, s.data()); }
      else if (D == 128) { scores_block_i16<4>(q16r.data(), QS.data() + h * R, R, k, ks, a, b, s.data()); }
      else
#endif
      if (C == 4) scores_block<4>(q.data(), R, C, k, ks, a, b, s.data());
      else if (C == 8) scores_block<8>(q.data(), R, C, k, ks, a, b, s.data());
      else scores_block<0>(q.data(), R, C, k, ks, a, b, s.data());
      if (G_n && a == 0)
        for (int64_t r = 0; r < R; ++r)
          global_scores(QG + (h * R + r) * D, D, kg.data_ptr<G>() + h * G_n * D, G_n, gb.data_ptr<float>() + h * gb_head + r * G_n,
                        s[r] + n);
    }
  });
  // 2. Bias and softmax of each row, then its global keys' share of the output (p_global @ V_global).
  at::parallel_for(0, H * R, 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t h = w / R, r = w % R;
      float* s = S + w * s_row;
      LS[w] = softmax_row(s, BI + (bias_heads == 1 ? 0 : h * bias_head) + r * bias_row, n, G_n,
                          SC + sc_kind + h * sc_head);
      const G* vgh = vg.data_ptr<G>() + h * G_n * D;
      for (int64_t c = 0; c < C; ++c) {
        v16f acc{};
        for (int64_t j = 0; j < G_n; ++j) acc += splat(s[n + j]) * load(vgh + j * D + c * L);
        store(O + w * D + c * L, acc);
      }
    }
  });
  // 3. p @ V over the slots: work items are (head, four value dims), each reading four rows of vt8;
  // the query rows four at a time.
  at::parallel_for(0, H * (D / 4), 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t h = w / (D / 4), d = (w % (D / 4)) * 4;
      const int8_t* v[4];
      for (int e = 0; e < 4; ++e) v[e] = V + h * v_head + (d + e) * v_row;
      for (int64_t r0 = 0; r0 < R; r0 += 4) {
        const int64_t nr = std::min<int64_t>(4, R - r0);
        const float* p[4];
        float acc[4][4] = {};
        for (int64_t r = 0; r < nr; ++r) p[r] = S + (h * R + r0 + r) * s_row;
        switch (nr) {
          case 1: pv_block<1>(p, v, n, acc); break;
          case 2: pv_block<2>(p, v, n, acc); break;
          case 3: pv_block<3>(p, v, n, acc); break;
          default: pv_block<4>(p, v, n, acc); break;
        }
        for (int64_t r = 0; r < nr; ++r)
          for (int e = 0; e < 4; ++e) O[(h * R + r0 + r) * D + d + e] += acc[r][e];
      }
    }
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> int8_decode_attend(const at::Tensor& ql, const at::Tensor& qg, const at::Tensor& k8,
                                                      const at::Tensor& vt8, const at::Tensor& scales, int64_t n,
                                                      const at::Tensor& local_bias, const at::Tensor& k_global,
                                                      const at::Tensor& v_global,
                                                      const c10::optional<at::Tensor>& global_bias, double scale) {
  TORCH_CHECK(ql.dim() == 3 && ql.size(2) % L == 0, "int8_decode_attend: head dim must be a multiple of 16");
  TORCH_CHECK(k8.scalar_type() == at::kChar && vt8.scalar_type() == at::kChar && scales.scalar_type() == at::kFloat,
              "int8_decode_attend: int8 keys and values, float32 scales");
  TORCH_CHECK(k8.stride(2) == 1 && k8.stride(1) == ql.size(2) && vt8.stride(2) == 1 && scales.stride(2) == 1,
              "int8_decode_attend: ring buffers must be row-contiguous");
  TORCH_CHECK(n > 0 && n <= k8.size(1) && n <= vt8.size(2) && n <= scales.size(2), "int8_decode_attend: n out of range");
  TORCH_CHECK(k8.dim() == 3 && vt8.dim() == 3 && scales.dim() == 3 && k8.size(0) == ql.size(0) &&
                  vt8.size(0) == ql.size(0) && scales.size(0) == 2 && scales.size(1) == ql.size(0) &&
                  vt8.size(1) == ql.size(2) && k8.size(2) == ql.size(2),
              "int8_decode_attend: ring buffers do not match the query's heads and head dim");
  TORCH_CHECK(!global_bias.has_value() || (qg.sizes() == ql.sizes() && k_global.size(0) == ql.size(0) &&
                                           k_global.size(2) == ql.size(2) && v_global.sizes() == k_global.sizes()),
              "int8_decode_attend: global keys do not match the query");
  TORCH_CHECK(local_bias.numel() % (ql.size(1) * n) == 0, "int8_decode_attend: local_bias is not [.., R, n]");
  TORCH_CHECK(k_global.scalar_type() == v_global.scalar_type(), "int8_decode_attend: global keys and values differ in dtype");
  const bool bias_bf16 = local_bias.scalar_type() == at::kBFloat16;
  const bool global_bf16 = k_global.scalar_type() == at::kBFloat16;
  at::Tensor bias = (bias_bf16 || local_bias.scalar_type() == at::kFloat) ? local_bias : local_bias.to(at::kFloat);
  at::Tensor kg = k_global, vg = v_global;
  if (!global_bf16 && k_global.scalar_type() != at::kFloat) { kg = k_global.to(at::kFloat); vg = v_global.to(at::kFloat); }
  if (bias.stride(-1) != 1) bias = bias.contiguous();
  if (bias_bf16) {
    return global_bf16 ? attend<at::BFloat16, at::BFloat16>(ql, qg, k8, vt8, scales, n, bias, kg, vg, global_bias, scale)
                       : attend<at::BFloat16, float>(ql, qg, k8, vt8, scales, n, bias, kg, vg, global_bias, scale);
  }
  return global_bf16 ? attend<float, at::BFloat16>(ql, qg, k8, vt8, scales, n, bias, kg, vg, global_bias, scale)
                     : attend<float, float>(ql, qg, k8, vt8, scales, n, bias, kg, vg, global_bias, scale);
}

// weight * rms_norm(x) over the last dim, computed in float32 and rounded like the torch ops of
// step_script.rms_norm: the normalized row to x's dtype, then the product with the weight in it.
// Why: torch's rms_norm of one 576-wide row is ~8 us of dispatch and five kernels (pow, mean, add,
// rsqrt, mul), and a decode step calls it twice a layer.
template <typename T>
void rms_rows(const T* x, const T* w, T* y, int64_t rows, int64_t K, float eps) {
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * K;
      T* yr = y + r * K;
      float ss = 0.f;
      for (int64_t e = 0; e < K; ++e) { const float v = static_cast<float>(xr[e]); ss += v * v; }
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(K) + eps);
      for (int64_t e = 0; e < K; ++e) {
        const T normed = static_cast<T>(static_cast<float>(xr[e]) * inv);  // (rounded to T first, as torch does)
        yr[e] = static_cast<T>(static_cast<float>(w[e]) * static_cast<float>(normed));
      }
    }
  });
}

at::Tensor rms_norm(const at::Tensor& x_in, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x_in.scalar_type() == weight.scalar_type() && weight.dim() == 1 && weight.size(0) == x_in.size(-1),
              "lminf::rms_norm: a weight of x's dtype and last dim");
  const at::Tensor x = x_in.contiguous(), w = weight.contiguous();
  at::Tensor y = at::empty_like(x);
  const int64_t K = x.size(-1), rows = K ? x.numel() / K : 0;
  if (x.scalar_type() == at::kBFloat16)
    rms_rows(x.data_ptr<at::BFloat16>(), w.data_ptr<at::BFloat16>(), y.data_ptr<at::BFloat16>(), rows, K, float(eps));
  else if (x.scalar_type() == at::kFloat)
    rms_rows(x.data_ptr<float>(), w.data_ptr<float>(), y.data_ptr<float>(), rows, K, float(eps));
  else
    TORCH_CHECK(false, "lminf::rms_norm: float32 or bfloat16");
  return y;
}

// Ring slots [a, b) of keys k8 [Hkv, S, D], values vt8 [Hkv, D, W] (transposed) and scales
// [2, Hkv, S] take k and v [Hkv, b - a, D] rounded to int8, one scale per slot and head: the
// roundings of quant.int8_rows with bfloat16 scales (step_script.int8_write's torch ops), bit for bit:
// scale = bf16(max(max|x| * float(1/127), 1e-12)), q = clamp(round_half_even(x / scale), +-127).
// Why: those ops are ~20 calls a layer for one token's 2 x 3 rows.
void int8_write(const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& k8, const at::Tensor& vt8,
                const at::Tensor& scales, int64_t a, int64_t b) {
  const at::Tensor k = k_in.to(at::kFloat).contiguous(), v = v_in.to(at::kFloat).contiguous();
  const int64_t H = k.size(0), C = k.size(1), D = k.size(2);
  TORCH_CHECK(b - a == C && v.sizes() == k.sizes() && k8.size(2) == D && k8.stride(2) == 1 && vt8.stride(2) == 1,
              "lminf::int8_write: shapes");
  TORCH_CHECK(a >= 0 && b <= k8.size(1) && b <= vt8.size(2) && b <= scales.size(2) && k8.size(0) == H &&
                  vt8.size(0) == H && vt8.size(1) == D && scales.size(0) == 2 && scales.size(1) == H,
              "lminf::int8_write: slots or heads out of range");
  int8_t* K8 = k8.data_ptr<int8_t>();
  int8_t* V8 = vt8.data_ptr<int8_t>();
  float* SC = scales.data_ptr<float>();
  const float* src[2] = {k.data_ptr<float>(), v.data_ptr<float>()};
  const float inv127 = static_cast<float>(1.0 / 127.0);
  for (int kind = 0; kind < 2; ++kind)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t c = 0; c < C; ++c) {
        const float* x = src[kind] + (h * C + c) * D;
        float mx = 0.f;
        for (int64_t e = 0; e < D; ++e) mx = std::max(mx, std::fabs(x[e]));
        const float scale = static_cast<float>(static_cast<at::BFloat16>(std::max(mx * inv127, 1e-12f)));
        const int64_t slot = a + c;
        SC[kind * scales.stride(0) + h * scales.stride(1) + slot] = scale;
        for (int64_t e = 0; e < D; ++e) {
          const float q = std::min(127.f, std::max(-127.f, std::nearbyint(x[e] / scale)));
          if (kind == 0) K8[h * k8.stride(0) + slot * k8.stride(1) + e] = static_cast<int8_t>(q);
          else V8[h * vt8.stride(0) + e * vt8.stride(1) + slot] = static_cast<int8_t>(q);
        }
      }
}

// quant.packed_product for one row: x [1, K] @ a packed weight^T (+ bias) -> [1, N] in x's dtype,
// the product in bfloat16 through torch's weight-only kernels (kind 4: int4, 8: int8).
at::Tensor packed_product(const at::Tensor& x, int64_t kind, const at::Tensor& qweight, const at::Tensor& qscales,
                          const c10::optional<at::Tensor>& bias, int64_t group) {
  const at::Tensor rows = x.scalar_type() == at::kBFloat16 ? x : x.to(at::kBFloat16);
  at::Tensor y = kind == 4 ? at::_weight_int4pack_mm_for_cpu(rows, qweight, group, qscales)
                           : at::_weight_int8pack_mm(rows, qweight, qscales);
  if (y.scalar_type() != x.scalar_type()) y = y.to(x.scalar_type());
  return bias.has_value() ? y.add(*bias) : y;
}

// step_script.llama_layers, operation for operation, in C++, with this file's attention, write and
// norm in place of its torch ops: every Llama-family block for one token x [1, hidden].  The layer-
// by-layer path calls the same native kernels and the same ATen kernels in the same order on the
// same dtypes, so the logits are its bit for bit (tests/test_step_script.py); what goes is
// TorchScript's interpreter and ~25 small dispatches a layer.  The blocks' tensors come flattened (LlamaAdapter._native_blocks): per layer 10 weights
// (input norm, post-attention norm, then qweight and qscales of q/k/v fused, o, gate/up fused,
// down), 4 biases and 4 kinds (4 or 8 bits), 2 eps, 6 ring tensors (k8, vt8, scales, unused,
// k_global, v_global).
at::Tensor llama_layers(const at::Tensor& x_in, at::TensorList weights, const c10::List<c10::optional<at::Tensor>>& biases,
                        at::IntArrayRef kinds, at::ArrayRef<double> eps, at::TensorList rings, const at::Tensor& step_mat,
                        int64_t slot, int64_t n, const at::Tensor& local_bias, const c10::optional<at::Tensor>& global_bias,
                        int64_t n_global, double scale, int64_t n_heads, int64_t n_kv_heads, int64_t head_dim,
                        int64_t group) {
  const int64_t L_n = static_cast<int64_t>(weights.size()) / 10, H = n_heads, HKV = n_kv_heads, D = head_dim,
                g = H / HKV;
  TORCH_CHECK(L_n * 10 == static_cast<int64_t>(weights.size()) && static_cast<int64_t>(biases.size()) == 4 * L_n &&
                  static_cast<int64_t>(kinds.size()) == 4 * L_n && static_cast<int64_t>(eps.size()) == 2 * L_n &&
                  static_cast<int64_t>(rings.size()) == 6 * L_n,
              "lminf::llama_layers: 10 weights, 4 biases, 4 kinds, 2 eps and 6 ring tensors a layer");
  at::Tensor x = x_in;
  for (int64_t i = 0; i < L_n; ++i) {
    const at::Tensor* w = &weights[10 * i];
    const at::Tensor* r = &rings[6 * i];
    auto b = [&](int64_t j) -> c10::optional<at::Tensor> { return biases.get(4 * i + j); };
    const at::Tensor qkv = packed_product(rms_norm(x, w[0], eps[2 * i]), kinds[4 * i], w[2], w[3], b(0), group);
    at::Tensor qk_in = qkv.select(0, 0).narrow(0, 0, (H + HKV) * D).view({H + HKV, D});
    if (qk_in.scalar_type() != at::kFloat) qk_in = qk_in.to(at::kFloat);
    const at::Tensor qk = at::matmul(qk_in, step_mat);                                      // [H + Hkv, 2D]
    const at::Tensor v = qkv.select(0, 0).narrow(0, (H + HKV) * D, HKV * D).view({HKV, 1, D});
    int8_write(qk.narrow(0, H, HKV).narrow(1, 0, D).view({HKV, 1, D}), v, r[0], r[1], r[2], slot, slot + 1);
    const at::Tensor q_local = qk.narrow(0, 0, H).narrow(1, 0, D).reshape({HKV, g, D});
    const at::Tensor q_cap = global_bias.has_value() ? qk.narrow(0, 0, H).narrow(1, D, D).reshape({HKV, g, D}) : q_local;
    const at::Tensor o = std::get<0>(int8_decode_attend(q_local, q_cap, r[0], r[1], r[2], n, local_bias,
                                                        r[4].narrow(1, 0, n_global), r[5].narrow(1, 0, n_global),
                                                        global_bias, scale));                  // [Hkv, g, D]
    const at::Tensor o_x = o.scalar_type() == x.scalar_type() ? o : o.to(x.scalar_type());
    x = x.add(packed_product(o_x.view({1, H * D}), kinds[4 * i + 1], w[4], w[5], b(1), group));
    const at::Tensor gate_up = packed_product(rms_norm(x, w[1], eps[2 * i + 1]), kinds[4 * i + 2], w[6], w[7], b(2),
                                              group);                                            // [1, 2 I]
    const int64_t inter = gate_up.size(-1) / 2;
    const at::Tensor act = at::silu(gate_up.narrow(1, 0, inter)).mul(gate_up.narrow(1, inter, inter));
    x = x.add(packed_product(act, kinds[4 * i + 3], w[8], w[9], b(3), group));
  }
  return x;
}

}  // namespace

TORCH_LIBRARY_IMPL(lminf, CPU, m) {
  m.impl("llama_layers", &llama_layers);
  m.impl("int8_write", &int8_write);
  m.impl("int8_decode_attend", &int8_decode_attend);
  m.impl("rms_norm", &rms_norm);
}
