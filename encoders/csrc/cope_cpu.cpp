// CoPE attention as one fused CPU kernel, forward and backward, a block of query rows at a time
// (OpenMP via at::parallel_for over batch x heads). The maths is encoders/cope_reference.py's;
// the Python side is encoders/cope_cpu.py, which registers the autograd formula (and, for the
// onset gate, computes the differenced keys with ordinary torch ops).
//
// Why blocks: with head dims of 16-32 a query row's work is a dozen short passes over its keys
// (scores, gates, positions, interpolated table logits, softmax, and their gradients). One row
// at a time, the running sums along the keys are sequential and every key-side gradient is a
// rank-1 update. A block of kBlock query rows of one (batch, head) turns the products into
// small matrix products (scores, the table logits z = q e^T, the output, and every gradient)
// and lays the block's (keys x rows) buffers out key-major, so that every elementwise pass and
// the running sums are vector operations across the block's rows. The scratch is O(kBlock x T)
// per thread; nothing of size T x T is stored: the forward keeps the output and the
// log-sum-exp, the backward recomputes the block.
//
// Per row i, the position of key j (Eq. 3) is the sum of the gates from the query outwards:
// behind (j <= i) a running sum from j = i down to 0, ahead (j > i, bidirectional) from
// j = i + 1 upwards, added in the reference's order, so that positions that are integers
// there (saturated gates, the cap) are integers here too.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define COPE_AVX2 1
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

enum GateKind : int64_t { kQK = 0, kOnset = 1, kToken = 2 };

// Query rows per block: the lanes of every elementwise pass and running sum.
constexpr int64_t kBlock = 32;

#define COPE_INLINE inline __attribute__((always_inline))

// exp that the compiler vectorises: float32 by Cephes' expf (range reduction by ln 2, degree-6
// polynomial, about 1 ulp), 0 below the smallest normal result (so exp(-inf) = 0); float64,
// which the tests compare with the reference to 1e-10, keeps std::exp.
COPE_INLINE double fast_exp(double x) { return std::exp(x); }

COPE_INLINE float fast_exp(float x) {
  const float clamped = std::min(std::max(x, -87.0f), 88.0f);
  const float n = std::floor(clamped * 1.44269504088896341f + 0.5f);
  float r = clamped - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  const float r2 = r * r;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r2 + r + 1.0f;
  const int32_t bits = (int32_t(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.0f ? 0.0f : y * scale;
}

template <typename scalar_t>
COPE_INLINE scalar_t sigmoid(scalar_t x) {
  return scalar_t(1) / (scalar_t(1) + fast_exp(-x));
}

// 32-byte vectors (GCC/Clang vector extensions) for the matrix products and every pass over a
// block: vec holds W lanes (rows of the block), ivec their table indices. With AVX2 the floor
// and the table gathers are single instructions; elsewhere they are done lane by lane.
template <typename scalar_t>
struct Simd;

template <>
struct Simd<float> {
  typedef float vec __attribute__((vector_size(32)));
  typedef int32_t ivec __attribute__((vector_size(32)));
  static constexpr int64_t W = 8;

  static COPE_INLINE vec floor(vec x) {
#ifdef COPE_AVX2
    return (vec)_mm256_floor_ps((__m256)x);
#else
    for (int64_t l = 0; l < W; ++l) x[l] = std::floor(x[l]);
    return x;
#endif
  }
  // *p in every lane, loaded once.
  static COPE_INLINE vec broadcast(const float* p) {
#ifdef COPE_AVX2
    return (vec)_mm256_broadcast_ss(p);
#else
    return vec{} + *p;
#endif
  }
  // 1 / x: the approximate reciprocal refined by one Newton step (about 1 ulp; vdivps is several
  // times slower and does not pipeline).
  static COPE_INLINE vec reciprocal(vec x) {
#ifdef COPE_AVX2
    const vec r = (vec)_mm256_rcp_ps((__m256)x);
    return r * (2 - x * r);
#else
    return 1 / x;
#endif
  }
  static COPE_INLINE vec gather(const float* base, ivec index) {
#ifdef COPE_AVX2
    const __m256 all = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
    return (vec)_mm256_mask_i32gather_ps(_mm256_setzero_ps(), base, (__m256i)index, all, 4);
#else
    vec out;
    for (int64_t l = 0; l < W; ++l) out[l] = base[index[l]];
    return out;
#endif
  }
  // fast_exp, lane-wise.
  static COPE_INLINE vec exp(vec x) {
    const vec lowest = vec{} - 87.0f, highest = vec{} + 88.0f;
    vec clamped = x < lowest ? lowest : x;
    clamped = clamped > highest ? highest : clamped;
    const vec n = floor(clamped * 1.44269504088896341f + 0.5f);
    vec r = clamped - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    const vec r2 = r * r;
    vec y = vec{} + 1.9875691500e-4f;
    y = y * r + 1.3981999507e-3f;
    y = y * r + 8.3334519073e-3f;
    y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f;
    y = y * r + 5.0000001201e-1f;
    y = y * r2 + r + 1.0f;
    const ivec bits = (__builtin_convertvector(n, ivec) + 127) << 23;
    return x < lowest ? vec{} : y * (vec)bits;
  }
};

template <>
struct Simd<double> {
  typedef double vec __attribute__((vector_size(32)));
  typedef int32_t ivec __attribute__((vector_size(16)));
  static constexpr int64_t W = 4;

  static COPE_INLINE vec floor(vec x) {
#ifdef COPE_AVX2
    return (vec)_mm256_floor_pd((__m256d)x);
#else
    for (int64_t l = 0; l < W; ++l) x[l] = std::floor(x[l]);
    return x;
#endif
  }
  static COPE_INLINE vec broadcast(const double* p) {
#ifdef COPE_AVX2
    return (vec)_mm256_broadcast_sd(p);
#else
    return vec{} + *p;
#endif
  }
  static COPE_INLINE vec reciprocal(vec x) { return 1 / x; }
  static COPE_INLINE vec gather(const double* base, ivec index) {
#ifdef COPE_AVX2
    const __m256d all = _mm256_castsi256_pd(_mm256_set1_epi64x(-1));
    return (vec)_mm256_mask_i32gather_pd(_mm256_setzero_pd(), base, (__m128i)index, all, 8);
#else
    vec out;
    for (int64_t l = 0; l < W; ++l) out[l] = base[index[l]];
    return out;
#endif
  }
  static COPE_INLINE vec exp(vec x) {
    for (int64_t l = 0; l < W; ++l) x[l] = std::exp(x[l]);
    return x;
  }
};

template <typename scalar_t>
COPE_INLINE typename Simd<scalar_t>::vec load(const scalar_t* p) {
  typename Simd<scalar_t>::vec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename scalar_t>
COPE_INLINE void store(scalar_t* p, typename Simd<scalar_t>::vec v) {
  std::memcpy(p, &v, sizeof(v));
}

// C[m][r] = alpha sum_k A[m a_row + k a_col] Bt[k][r] (+ C[m][r] when accumulating), for the
// kBlock lanes r: (M x K) times (K x kBlock), the lanes in registers.
template <typename scalar_t>
void gemm_lanes(int64_t M, int64_t K, const scalar_t* A, int64_t a_row, int64_t a_col,
                const scalar_t* Bt, scalar_t alpha, bool accumulate, scalar_t* C) {
  using vec = typename Simd<scalar_t>::vec;
  constexpr int64_t W = Simd<scalar_t>::W, NV = kBlock / W, MB = NV <= 4 ? 3 : 1;
  int64_t m = 0;
  auto finish = [&](int64_t row, const vec* acc) {
    scalar_t* c = C + row * kBlock;
#pragma GCC unroll 8
    for (int64_t v = 0; v < NV; ++v) {
      vec out = acc[v] * alpha;
      if (accumulate) out += load(c + v * W);
      store(c + v * W, out);
    }
  };
  for (; m + MB <= M; m += MB) {
    vec acc[MB][NV] = {};
    for (int64_t k = 0; k < K; ++k) {
      vec b[NV];
#pragma GCC unroll 8
      for (int64_t v = 0; v < NV; ++v) b[v] = load(Bt + k * kBlock + v * W);
#pragma GCC unroll 4
      for (int64_t mb = 0; mb < MB; ++mb) {
        const vec x = Simd<scalar_t>::broadcast(A + (m + mb) * a_row + k * a_col);
#pragma GCC unroll 8
        for (int64_t v = 0; v < NV; ++v) acc[mb][v] += x * b[v];
      }
    }
    for (int64_t mb = 0; mb < MB; ++mb) finish(m + mb, acc[mb]);
  }
  for (; m < M; ++m) {
    vec acc[NV] = {};
    for (int64_t k = 0; k < K; ++k) {
      const vec x = Simd<scalar_t>::broadcast(A + m * a_row + k * a_col);
#pragma GCC unroll 8
      for (int64_t v = 0; v < NV; ++v) acc[v] += x * load(Bt + k * kBlock + v * W);
    }
    finish(m, acc);
  }
}

// C[m][d] += sum_r A[m][r] B[r][d]: (M x kBlock) times (kBlock x D), D = kD when kD > 0.
template <typename scalar_t, int64_t kD>
void gemm_rows(int64_t M, const scalar_t* A, const scalar_t* B, int64_t D, scalar_t* C) {
  if constexpr (kD == 0) {
    for (int64_t m = 0; m < M; ++m)
      for (int64_t r = 0; r < kBlock; ++r) {
        const scalar_t a = A[m * kBlock + r];
        for (int64_t d = 0; d < D; ++d) C[m * D + d] += a * B[r * D + d];
      }
  } else {
    using vec = typename Simd<scalar_t>::vec;
    constexpr int64_t W = Simd<scalar_t>::W, ND = kD / W, MB = ND >= 8 ? 1 : 8 / ND;
    static_assert(kD % W == 0, "compiled head dims are whole vectors");
    int64_t m = 0;
    for (; m + MB <= M; m += MB) {
      vec acc[MB][ND] = {};
      for (int64_t r = 0; r < kBlock; ++r) {
        vec b[ND];
#pragma GCC unroll 8
        for (int64_t v = 0; v < ND; ++v) b[v] = load(B + r * kD + v * W);
#pragma GCC unroll 8
        for (int64_t mb = 0; mb < MB; ++mb) {
          const vec x = Simd<scalar_t>::broadcast(A + (m + mb) * kBlock + r);
#pragma GCC unroll 8
          for (int64_t v = 0; v < ND; ++v) acc[mb][v] += x * b[v];
        }
      }
      for (int64_t mb = 0; mb < MB; ++mb)
        for (int64_t v = 0; v < ND; ++v) {
          scalar_t* c = C + (m + mb) * kD + v * W;
          store(c, load(c) + acc[mb][v]);
        }
    }
    for (; m < M; ++m) {
      vec acc[ND] = {};
      for (int64_t r = 0; r < kBlock; ++r) {
        const vec x = Simd<scalar_t>::broadcast(A + m * kBlock + r);
#pragma GCC unroll 8
        for (int64_t v = 0; v < ND; ++v) acc[v] += x * load(B + r * kD + v * W);
      }
      for (int64_t v = 0; v < ND; ++v) store(C + m * kD + v * W, load(C + m * kD + v * W) + acc[v]);
    }
  }
}

// 64-byte aligned scratch of n elements (a torch allocation, freed with the tensor).
template <typename T>
T* scratch(at::Tensor& holder, int64_t n, at::ScalarType type) {
  holder = at::empty({std::max<int64_t>(n, 1)}, at::TensorOptions().dtype(type));
  return static_cast<T*>(holder.data_ptr());
}

// One (batch, head) slice of the inputs, and the block scratch of one thread.
//
// Block buffers are key-major, (keys x kBlock): element [j * kBlock + r] is key j of the
// block's row r (query i0 + r), so that each pass runs over a key's NV vectors of rows. Rows
// past the sequence's end are computed as rows of a zero query with no output gradient and are
// never written out.
template <typename scalar_t, int64_t kD>
struct Slice {
  using S = Simd<scalar_t>;
  using vec = typename S::vec;
  using ivec = typename S::ivec;
  static constexpr int64_t W = S::W, NV = kBlock / W;

  const int64_t T, D, R, npos;
  const bool causal;
  const int64_t gate;
  const scalar_t scale;
  // The slice: q, k, v, onset keys (T x D), the table rows of its head (R x D), per-key flags.
  const scalar_t *q = nullptr, *k = nullptr, *v = nullptr, *gk = nullptr, *e = nullptr;
  scalar_t *key_valid, *token_gate;
  // Block scratch: q of the block transposed (D x kBlock) and as rows (kBlock x D); table
  // logits zt[n][r] = z_r[n] and their differences zd[n] = z[n+1] - z[n] (R x kBlock); and
  // (keys x kBlock) scores s, onset scores u and sigmoids sig, gates g, positions p.
  scalar_t *qt, *qrows, *zt, *zd, *s, *u, *sig, *g, *p;
  // The table rows [first_row, last_row] that the block's positions reach (zt and zd hold only
  // those): its positions lie between the longest sum ahead and the longest sum behind.
  int64_t first_row = 0, last_row = 0;
  at::Tensor holders[11];
  // Lane numbers r of each vector of a key, as values (for masks) and as table offsets.
  vec lane[NV];
  ivec lane_index[NV];

  Slice(int64_t T_, int64_t D_, int64_t R_, int64_t npos_, bool causal_, int64_t gate_)
      : T(T_), D(kD ? kD : D_), R(R_), npos(npos_), causal(causal_), gate(gate_),
        scale(scalar_t(1) / std::sqrt(scalar_t(kD ? kD : D_))) {
    const auto type = c10::CppTypeToScalarType<scalar_t>::value;
    const int64_t keys = T * kBlock;
    key_valid = scratch<scalar_t>(holders[0], T, type);
    token_gate = scratch<scalar_t>(holders[1], T, type);
    qt = scratch<scalar_t>(holders[2], D * kBlock, type);
    qrows = scratch<scalar_t>(holders[3], D * kBlock, type);
    zt = scratch<scalar_t>(holders[4], R * kBlock, type);
    zd = scratch<scalar_t>(holders[5], R * kBlock, type);
    s = scratch<scalar_t>(holders[6], keys, type);
    u = scratch<scalar_t>(holders[7], gate == kOnset ? keys : 0, type);
    sig = scratch<scalar_t>(holders[8], gate == kOnset ? keys : 0, type);
    g = scratch<scalar_t>(holders[9], keys, type);
    p = scratch<scalar_t>(holders[10], keys, type);
    for (int64_t x = 0; x < NV; ++x)
      for (int64_t l = 0; l < W; ++l) {
        lane[x][l] = scalar_t(x * W + l);
        lane_index[x][l] = int32_t(x * W + l);
      }
  }

  void load_slice(const scalar_t* q_, const scalar_t* k_, const scalar_t* v_,
                  const scalar_t* gk_, const scalar_t* e_, const scalar_t* gl,
                  const uint8_t* valid) {
    q = q_, k = k_, v = v_, gk = gk_, e = e_;
    for (int64_t j = 0; j < T; ++j) key_valid[j] = (!valid || valid[j]) ? 1 : 0;
    if (gate == kToken)
      for (int64_t j = 0; j < T; ++j) token_gate[j] = sigmoid(gl[j]);
  }

  // Keys a block of rows sees: all, or (causal) up to its last row.
  int64_t keys_of(int64_t i0) const { return causal ? std::min(i0 + kBlock, T) : T; }

  // Vector x of key j's rows: lanes r >= first keep yes, the others take no.
  COPE_INLINE vec from_lane(int64_t x, int64_t first, vec yes, vec no) const {
    return lane[x] >= scalar_t(first) ? yes : no;
  }

  static COPE_INLINE vec sigmoid_vec(vec x) { return S::reciprocal(1 + S::exp(-x)); }

  // Scores, gates, positions and table logits of the block of rows [i0, i0 + kBlock) over keys
  // [0, n): everything the logits need (see eq5).
  void prepare(int64_t i0, int64_t n) {
    const int64_t rows = std::min(kBlock, T - i0);
    for (int64_t r = 0; r < kBlock; ++r)
      for (int64_t d = 0; d < D; ++d) {
        const scalar_t x = r < rows ? q[(i0 + r) * D + d] : scalar_t(0);
        qt[d * kBlock + r] = x;
        qrows[r * D + d] = x;
      }
    gemm_lanes<scalar_t>(n, D, k, D, 1, qt, scale, false, s);  // s_ij = q_i . k_j / sqrt(d)
    if (gate == kOnset) gemm_lanes<scalar_t>(n, D, gk, D, 1, qt, scale, false, u);
    gates(n);
    positions(i0, n);
    // Eq. 4: z_i[n] = q_i . e[n] on the rows the positions reach, and the differences that
    // Eq. 5 interpolates along (zd[last_row] is only read when it is the table's last, 0).
    const int64_t rows_used = last_row - first_row + 1;
    gemm_lanes<scalar_t>(rows_used, D, e + first_row * D, D, 1, qt, scalar_t(1), false,
                         zt + first_row * kBlock);
    for (int64_t row = first_row; row < last_row; ++row)
      for (int64_t x = 0; x < NV; ++x)
        store(zd + row * kBlock + x * W,
              load(zt + (row + 1) * kBlock + x * W) - load(zt + row * kBlock + x * W));
    for (int64_t x = 0; x < NV; ++x) store(zd + last_row * kBlock + x * W, vec{});
  }

  // Table row of a position (Eq. 5's floor of the clamped position).
  int64_t table_row(scalar_t position) const {
    const scalar_t cap = scalar_t(npos - 1);
    const scalar_t clamped = std::min(std::max(position, causal ? scalar_t(0) : -cap), cap);
    return int64_t(std::floor(clamped)) + (causal ? 0 : npos - 1);
  }

  // Gates of keys [0, n), 0 on padded keys (when causal, not masked past the row: the
  // positions behind a row never reach them).
  void gates(int64_t n) {
    for (int64_t j = 0; j < n; ++j) {
      const scalar_t kv = key_valid[j];
      const int64_t at = j * kBlock;
#pragma GCC unroll 8
      for (int64_t x = 0; x < NV; ++x) {
        vec gate_value;
        if (gate == kQK) {
          gate_value = kv * sigmoid_vec(load(s + at + x * W));
        } else if (gate == kToken) {
          gate_value = vec{} + kv * token_gate[j];
        } else {  // onset: |2 sigmoid(u) - 1|
          const vec sg = sigmoid_vec(load(u + at + x * W));
          store(sig + at + x * W, sg);
          const vec t = 2 * sg - 1;
          gate_value = kv * (t < 0 ? -t : t);
        }
        store(g + at + x * W, gate_value);
      }
    }
  }

  // Signed positions (Eq. 3), by running sums vectorised across the block's rows. Lane r of
  // key j is behind its row (j <= i0 + r) where r >= j - i0.
  void positions(int64_t i0, int64_t n) {
    const int64_t diag_end = std::min(i0 + kBlock, n);  // keys [i0, diag_end): mixed lanes
    const vec zero = {};
    scalar_t longest_ahead = 0, longest_behind = 0;
    if (!causal) {
      // Ahead: p_ij = -sum_{k=i+1..j} g_ik, upwards from the query; lanes still behind add 0.
      vec run[NV] = {};
      for (int64_t j = i0 + 1; j < n; ++j) {
        const bool mixed = j < diag_end;
#pragma GCC unroll 8
        for (int64_t x = 0; x < NV; ++x) {
          vec gj = load(g + j * kBlock + x * W);
          if (mixed) gj = from_lane(x, j - i0, zero, gj);
          run[x] += gj;
          store(p + j * kBlock + x * W, -run[x]);
        }
      }
      for (int64_t x = 0; x < NV; ++x)
        for (int64_t l = 0; l < W; ++l) longest_ahead = std::max(longest_ahead, run[x][l]);
    }
    // Behind: p_ij = sum_{k=j..i} g_ik, downwards from the query; lanes ahead add nothing and
    // keep their ahead position (0 when causal).
    vec run[NV] = {};
    for (int64_t j = diag_end - 1; j >= 0; --j) {
      const bool mixed = j >= i0;
#pragma GCC unroll 8
      for (int64_t x = 0; x < NV; ++x) {
        const vec gj = load(g + j * kBlock + x * W);
        if (mixed) {
          const vec ahead = causal ? zero : load(p + j * kBlock + x * W);
          run[x] += from_lane(x, j - i0, gj, zero);
          store(p + j * kBlock + x * W, from_lane(x, j - i0, run[x], ahead));
        } else {
          run[x] += gj;
          store(p + j * kBlock + x * W, run[x]);
        }
      }
    }
    for (int64_t x = 0; x < NV; ++x)
      for (int64_t l = 0; l < W; ++l) longest_behind = std::max(longest_behind, run[x][l]);
    first_row = table_row(-longest_ahead);
    last_row = std::min(table_row(longest_behind) + 1, R - 1);
  }

  // Eq. 5 for vector x of key j: clamp, floor, weight w and the table offset at (row lo of the
  // table, times kBlock, plus the lane), the difference zdiff = z[lo+1] - z[lo], and the logit
  // s + c with c = z[lo] + w zdiff, which equals the reference's z[ceil] w + z[floor] (1 - w)
  // up to rounding (w = 0 whenever ceil = floor); -inf where the key is padded or (causal)
  // past the row.
  COPE_INLINE vec eq5(int64_t i0, int64_t j, int64_t x, vec& w, ivec& at, vec& zdiff) const {
    const scalar_t cap = scalar_t(npos - 1);
    const vec high = vec{} + cap, low = vec{} + (causal ? scalar_t(0) : -cap);
    const int32_t offset = causal ? 0 : int32_t(npos - 1);
    const vec pj = load(p + j * kBlock + x * W);
    vec pos = pj < low ? low : pj;
    pos = pos > high ? high : pos;
    const vec fl = S::floor(pos);
    w = pos - fl;
    at = (__builtin_convertvector(fl, ivec) + offset) * int32_t(kBlock) + lane_index[x];
    zdiff = S::gather(zd, at);
    const vec logit = load(s + j * kBlock + x * W) + (S::gather(zt, at) + w * zdiff);
    const vec minus_inf = vec{} - std::numeric_limits<scalar_t>::infinity();
    if (key_valid[j] == 0) return minus_inf;
    return causal && j > i0 ? from_lane(x, j - i0, logit, minus_inf) : logit;
  }
};

template <typename scalar_t, int64_t kD>
void forward_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& table, const at::Tensor& gk, const at::Tensor& gl,
                    const at::Tensor& valid, int64_t gate, bool causal, int64_t npos,
                    at::Tensor& out, at::Tensor& lse) {
  using Sl = Slice<scalar_t, kD>;
  using vec = typename Sl::vec;
  using ivec = typename Sl::ivec;
  constexpr int64_t W = Sl::W, NV = Sl::NV;
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3);
  const int64_t R = table.size(-2), table_step = table.dim() == 3 ? R * D : 0;
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = k.data_ptr<scalar_t>();
  const scalar_t* vp = v.data_ptr<scalar_t>();
  const scalar_t* ep = table.data_ptr<scalar_t>();
  const scalar_t* gkp = gk.defined() ? gk.data_ptr<scalar_t>() : nullptr;
  const scalar_t* glp = gl.defined() ? gl.data_ptr<scalar_t>() : nullptr;
  const uint8_t* vap = valid.defined() ? valid.data_ptr<uint8_t>() : nullptr;
  scalar_t* op = out.data_ptr<scalar_t>();
  scalar_t* lp = lse.data_ptr<scalar_t>();
  constexpr scalar_t inf = std::numeric_limits<scalar_t>::infinity();
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    Sl sl(T, D, R, npos, causal, gate);
    const int64_t Dh = sl.D;
    const auto type = c10::CppTypeToScalarType<scalar_t>::value;
    at::Tensor holders[2];
    scalar_t* prob = scratch<scalar_t>(holders[0], T * kBlock, type);  // logits, then exp
    scalar_t* ot = scratch<scalar_t>(holders[1], Dh * kBlock, type);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const scalar_t* vh = vp + bh * T * Dh;
      sl.load_slice(qp + bh * T * Dh, kp + bh * T * Dh, vh, gkp ? gkp + bh * T * Dh : nullptr,
                    ep + h * table_step, glp ? glp + bh * T : nullptr,
                    vap ? vap + b * T : nullptr);
      for (int64_t i0 = 0; i0 < T; i0 += kBlock) {
        const int64_t n = sl.keys_of(i0), rows = std::min(kBlock, T - i0);
        sl.prepare(i0, n);
        vec m[NV], sum[NV];
        for (int64_t x = 0; x < NV; ++x) m[x] = vec{} - inf, sum[x] = vec{};
        for (int64_t j = 0; j < n; ++j) {
#pragma GCC unroll 8
          for (int64_t x = 0; x < NV; ++x) {
            vec w, zdiff;
            ivec at;
            const vec logit = sl.eq5(i0, j, x, w, at, zdiff);
            store(prob + j * kBlock + x * W, logit);
            m[x] = logit > m[x] ? logit : m[x];
          }
        }
        // A row without a key (fully padded) has every logit -inf: output 0, lse -inf.
        for (int64_t x = 0; x < NV; ++x) m[x] = m[x] == -inf ? vec{} : m[x];
        for (int64_t j = 0; j < n; ++j) {
#pragma GCC unroll 8
          for (int64_t x = 0; x < NV; ++x) {
            const vec e = Sl::S::exp(load(prob + j * kBlock + x * W) - m[x]);
            store(prob + j * kBlock + x * W, e);
            sum[x] += e;
          }
        }
        // O^T (D x rows) = V^T E, normalised per row.
        gemm_lanes<scalar_t>(Dh, n, vh, 1, Dh, prob, scalar_t(1), false, ot);
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t i = i0 + r;
          const scalar_t total = sum[r / W][r % W], top = m[r / W][r % W];
          const scalar_t inv = total > 0 ? 1 / total : scalar_t(0);
          for (int64_t d = 0; d < Dh; ++d) op[(bh * T + i) * Dh + d] = ot[d * kBlock + r] * inv;
          lp[bh * T + i] = total > 0 ? top + std::log(total) : -inf;
        }
      }
    }
  });
}

// dL/dp -> dL/dg in place (in sl.p): dL/dg_ik is the sum of +-dL/dp_ij over the keys j at or
// beyond k on k's side of the query; running sums vectorised across the block's rows.
template <typename scalar_t, int64_t kD>
void gate_gradients(Slice<scalar_t, kD>& sl, int64_t i0, int64_t n) {
  using vec = typename Simd<scalar_t>::vec;
  constexpr int64_t W = Simd<scalar_t>::W, NV = kBlock / W;
  const int64_t diag_end = std::min(i0 + kBlock, n);
  scalar_t* p = sl.p;
  const vec zero = {};
  if (!sl.causal) {
    // Ahead (k > i): dg_ik = -sum_{j >= k} dp_ij, downwards from the last key; lanes behind
    // keep their dp for the pass below.
    vec run[NV] = {};
    for (int64_t j = n - 1; j > i0; --j) {
      const bool mixed = j < diag_end;
#pragma GCC unroll 8
      for (int64_t x = 0; x < NV; ++x) {
        const vec dp = load(p + j * kBlock + x * W);
        if (mixed) {
          run[x] += sl.from_lane(x, j - i0, zero, dp);
          store(p + j * kBlock + x * W, sl.from_lane(x, j - i0, dp, -run[x]));
        } else {
          run[x] += dp;
          store(p + j * kBlock + x * W, -run[x]);
        }
      }
    }
  }
  // Behind (k <= i): dg_ik = sum_{j <= k} dp_ij, upwards from key 0; lanes ahead keep theirs
  // (0 when causal).
  vec run[NV] = {};
  for (int64_t j = 0; j < diag_end; ++j) {
    const bool mixed = j >= i0;
#pragma GCC unroll 8
    for (int64_t x = 0; x < NV; ++x) {
      const vec dp = load(p + j * kBlock + x * W);
      if (mixed) {
        run[x] += sl.from_lane(x, j - i0, dp, zero);
        store(p + j * kBlock + x * W, sl.from_lane(x, j - i0, run[x], sl.causal ? zero : dp));
      } else {
        run[x] += dp;
        store(p + j * kBlock + x * W, run[x]);
      }
    }
  }
}

template <typename scalar_t, int64_t kD>
void backward_kernel(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& v, const at::Tensor& table, const at::Tensor& gk,
                     const at::Tensor& gl, const at::Tensor& valid, const at::Tensor& out,
                     const at::Tensor& lse, int64_t gate, bool causal, int64_t npos,
                     at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, at::Tensor& dtable_parts,
                     at::Tensor& dgk, at::Tensor& dgl) {
  using Sl = Slice<scalar_t, kD>;
  using vec = typename Sl::vec;
  using ivec = typename Sl::ivec;
  constexpr int64_t W = Sl::W, NV = Sl::NV;
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3);
  const int64_t R = table.size(-2), per_head = table.dim() == 3;
  const int64_t table_step = per_head ? R * D : 0;
  const scalar_t* gop = grad_out.data_ptr<scalar_t>();
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = k.data_ptr<scalar_t>();
  const scalar_t* vp = v.data_ptr<scalar_t>();
  const scalar_t* ep = table.data_ptr<scalar_t>();
  const scalar_t* gkp = gk.defined() ? gk.data_ptr<scalar_t>() : nullptr;
  const scalar_t* glp = gl.defined() ? gl.data_ptr<scalar_t>() : nullptr;
  const uint8_t* vap = valid.defined() ? valid.data_ptr<uint8_t>() : nullptr;
  const scalar_t* op = out.data_ptr<scalar_t>();
  const scalar_t* lp = lse.data_ptr<scalar_t>();
  scalar_t* dqp = dq.data_ptr<scalar_t>();
  scalar_t* dkp = dk.data_ptr<scalar_t>();
  scalar_t* dvp = dv.data_ptr<scalar_t>();
  scalar_t* dtp = dtable_parts.data_ptr<scalar_t>();
  scalar_t* dgkp = gate == kOnset ? dgk.data_ptr<scalar_t>() : nullptr;
  scalar_t* dglp = gate == kToken ? dgl.data_ptr<scalar_t>() : nullptr;
  const int64_t parts = dtable_parts.size(0);
  constexpr scalar_t inf = std::numeric_limits<scalar_t>::infinity();
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    Sl sl(T, D, R, npos, causal, gate);
    const int64_t Dh = sl.D;
    const auto type = c10::CppTypeToScalarType<scalar_t>::value;
    at::Tensor holders[8];
    const int64_t keys = T * kBlock;
    scalar_t* a = scratch<scalar_t>(holders[0], keys, type);    // probabilities
    scalar_t* dl = scratch<scalar_t>(holders[1], keys, type);   // dL/da, then dL/dlogit, dL/ds
    scalar_t* w = scratch<scalar_t>(holders[2], keys, type);
    int32_t* lo = scratch<int32_t>(holders[3], keys, at::kInt);  // table offsets (eq5's at)
    scalar_t* dzt = scratch<scalar_t>(holders[4], (R + 1) * kBlock, type);  // dL/dz, R x rows
    scalar_t* dot = scratch<scalar_t>(holders[5], Dh * kBlock, type);  // dO^T of the block
    scalar_t* dorows = scratch<scalar_t>(holders[6], Dh * kBlock, type);
    scalar_t* dqt = scratch<scalar_t>(holders[7], Dh * kBlock, type);
    // Gradients of the table: one accumulator per thread, summed by the caller.
    const int64_t part = std::min<int64_t>(at::get_thread_num(), parts - 1);
    scalar_t* dtable_thread = dtp + part * (per_head ? H : 1) * R * Dh;
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const scalar_t* kh = kp + bh * T * Dh;
      const scalar_t* vh = vp + bh * T * Dh;
      const scalar_t* gkh = gkp ? gkp + bh * T * Dh : nullptr;
      const scalar_t* eh = ep + h * table_step;
      sl.load_slice(qp + bh * T * Dh, kh, vh, gkh, eh, glp ? glp + bh * T : nullptr,
                    vap ? vap + b * T : nullptr);
      scalar_t* dkh = dkp + bh * T * Dh;
      scalar_t* dvh = dvp + bh * T * Dh;
      scalar_t* dgkh = dgkp ? dgkp + bh * T * Dh : nullptr;
      scalar_t* dgl_h = dglp ? dglp + bh * T : nullptr;
      scalar_t* deh = dtable_thread + (per_head ? h * R * Dh : 0);
      std::fill(dkh, dkh + T * Dh, scalar_t(0));
      std::fill(dvh, dvh + T * Dh, scalar_t(0));
      if (dgkh) std::fill(dgkh, dgkh + T * Dh, scalar_t(0));
      for (int64_t i0 = 0; i0 < T; i0 += kBlock) {
        const int64_t n = sl.keys_of(i0), rows = std::min(kBlock, T - i0);
        sl.prepare(i0, n);
        // dO of the block (rows past the end: 0), Delta_i = dO_i . O_i, and lse (+inf for a
        // row without a key, so that its probabilities exp(logit - lse) are 0).
        vec delta[NV], lse_r[NV];
        for (int64_t r = 0; r < kBlock; ++r) {
          const int64_t i = i0 + r;
          scalar_t dot_product = 0;
          for (int64_t d = 0; d < Dh; ++d) {
            const scalar_t x = r < rows ? gop[(bh * T + i) * Dh + d] : scalar_t(0);
            dot[d * kBlock + r] = x;
            dorows[r * Dh + d] = x;
            if (r < rows) dot_product += x * op[(bh * T + i) * Dh + d];
          }
          delta[r / W][r % W] = dot_product;
          lse_r[r / W][r % W] = r < rows && lp[bh * T + i] != -inf ? lp[bh * T + i] : inf;
        }
        // dL/da_ij = dO_i . v_j.
        gemm_lanes<scalar_t>(n, Dh, vh, Dh, 1, dot, scalar_t(1), false, dl);
        // Probabilities, dL/dlogit and dL/dp (positions are no longer needed: dp goes to p).
        for (int64_t j = 0; j < n; ++j) {
#pragma GCC unroll 8
          for (int64_t x = 0; x < NV; ++x) {
            const int64_t at = j * kBlock + x * W;
            vec wt, zdiff;
            ivec index;
            const vec logit = sl.eq5(i0, j, x, wt, index, zdiff);
            const vec prob = Sl::S::exp(logit - lse_r[x]);  // 0 on masked keys
            const vec dlogit = prob * (load(dl + at) - delta[x]);
            store(a + at, prob);
            store(dl + at, dlogit);
            store(w + at, wt);
            std::memcpy(lo + at, &index, sizeof(index));
            // dc/dp = z[ceil] - z[floor]: 0 at integer (incl. clamped) positions, as in the
            // reference.
            store(sl.p + at, wt > 0 ? dlogit * zdiff : vec{});
          }
        }
        // dL/dz: dl (1 - w) to row lo, dl w to row lo + 1 (a spare row R takes w = 0's).
        const int64_t first_row = sl.first_row, rows_used = sl.last_row - first_row + 1;
        std::fill(dzt + first_row * kBlock, dzt + (sl.last_row + 2) * kBlock, scalar_t(0));
        for (int64_t at = 0; at < n * kBlock; ++at) {
          dzt[lo[at]] += dl[at] * (1 - w[at]);
          dzt[lo[at] + kBlock] += dl[at] * w[at];
        }
        gate_gradients(sl, i0, n);
        // dL/dlogit -> dL/ds (qk: ds = dl + dg g (1 - g)); token and onset gradients.
        const scalar_t* dg = sl.p;
        for (int64_t j = 0; j < n; ++j) {
          const scalar_t kv = sl.key_valid[j];
          if (gate == kToken) {
            vec total = {};
            for (int64_t x = 0; x < NV; ++x) total += load(dg + j * kBlock + x * W);
            scalar_t sum = 0;
            for (int64_t l = 0; l < W; ++l) sum += total[l];
            const scalar_t tg = sl.token_gate[j];
            dgl_h[j] += kv * sum * tg * (1 - tg);
            continue;
          }
#pragma GCC unroll 8
          for (int64_t x = 0; x < NV; ++x) {
            const int64_t at = j * kBlock + x * W;
            const vec dgj = load(dg + at);
            if (gate == kQK) {
              const vec gj = load(sl.g + at);
              store(dl + at, load(dl + at) + dgj * gj * (1 - gj));
            } else {  // onset: du = dg sign(2 sig - 1) 2 sig (1 - sig), kept in g
              const vec sg = load(sl.sig + at), t = 2 * sg - 1, zero = {};
              const vec sign = t > zero ? zero + 1 : (t < zero ? zero - 1 : zero);
              store(sl.g + at, kv * dgj * sign * 2 * sg * (1 - sg));
            }
          }
        }
        // dQ^T = (K^T ds + GK^T du) / sqrt(d) + E^T dz, for the block's rows.
        gemm_lanes<scalar_t>(Dh, n, kh, 1, Dh, dl, sl.scale, false, dqt);
        if (gate == kOnset) gemm_lanes<scalar_t>(Dh, n, gkh, 1, Dh, sl.g, sl.scale, true, dqt);
        gemm_lanes<scalar_t>(Dh, rows_used, eh + first_row * Dh, 1, Dh, dzt + first_row * kBlock,
                             scalar_t(1), true, dqt);
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t d = 0; d < Dh; ++d) dqp[(bh * T + i0 + r) * Dh + d] = dqt[d * kBlock + r];
        // Key side: dK += ds^T Q (scaled below), dV += A^T dO, dGK += du^T Q, dE += dz^T Q.
        gemm_rows<scalar_t, kD>(n, dl, sl.qrows, Dh, dkh);
        gemm_rows<scalar_t, kD>(n, a, dorows, Dh, dvh);
        if (gate == kOnset) gemm_rows<scalar_t, kD>(n, sl.g, sl.qrows, Dh, dgkh);
        gemm_rows<scalar_t, kD>(rows_used, dzt + first_row * kBlock, sl.qrows, Dh,
                                deh + first_row * Dh);
      }
      for (int64_t x = 0; x < T * Dh; ++x) dkh[x] *= sl.scale;
      if (dgkh)
        for (int64_t x = 0; x < T * Dh; ++x) dgkh[x] *= sl.scale;
    }
  });
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& table, int64_t npos, bool causal) {
  TORCH_CHECK(q.device().is_cpu(), "cope_cpu runs on CPU tensors");
  TORCH_CHECK(q.dim() == 4 && k.sizes() == q.sizes() && v.sizes() == q.sizes(),
              "q, k, v must be (B, H, T, D) of one shape");
  TORCH_CHECK((table.dim() == 2 || (table.dim() == 3 && table.size(0) == q.size(1))) &&
                  table.size(-2) == (causal ? npos : 2 * npos - 1) &&
                  table.size(-1) == q.size(3),
              "the table must be (rows, D) or (H, rows, D)");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
              "cope_cpu computes in float32 or float64");
}

at::Tensor maybe_contiguous(const std::optional<at::Tensor>& x) {
  return x.has_value() ? x->contiguous() : at::Tensor();
}

// The head dim compiled in where it is common (16, 32), else read at run time (kD = 0).
#define COPE_DISPATCH_DIM(D, KERNEL, ...)     \
  do {                                        \
    if ((D) == 16)                            \
      KERNEL<scalar_t, 16>(__VA_ARGS__);      \
    else if ((D) == 32)                       \
      KERNEL<scalar_t, 32>(__VA_ARGS__);      \
    else                                      \
      KERNEL<scalar_t, 0>(__VA_ARGS__);       \
  } while (0)

std::tuple<at::Tensor, at::Tensor> cope_forward(
    const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, const at::Tensor& table_,
    const std::optional<at::Tensor>& gate_keys, const std::optional<at::Tensor>& gate_logits,
    const std::optional<at::Tensor>& valid, int64_t gate, bool causal, int64_t npos) {
  check_inputs(q_, k_, v_, table_, npos, causal);
  const at::Tensor q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous(),
                   table = table_.to(q_.scalar_type()).contiguous();
  const at::Tensor gk = maybe_contiguous(gate_keys), gl = maybe_contiguous(gate_logits),
                   va = maybe_contiguous(valid);
  at::Tensor out = at::empty_like(q);
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "cope_forward", [&] {
    COPE_DISPATCH_DIM(q.size(3), forward_kernel, q, k, v, table, gk, gl, va, gate, causal, npos,
                      out, lse);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cope_backward(
    const at::Tensor& grad_out, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
    const at::Tensor& table_, const std::optional<at::Tensor>& gate_keys,
    const std::optional<at::Tensor>& gate_logits, const std::optional<at::Tensor>& valid,
    const at::Tensor& out, const at::Tensor& lse, int64_t gate, bool causal, int64_t npos) {
  check_inputs(q_, k_, v_, table_, npos, causal);
  const at::Tensor q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous(),
                   table = table_.to(q_.scalar_type()).contiguous(),
                   go = grad_out.contiguous(), o = out.contiguous(), l = lse.contiguous();
  const at::Tensor gk = maybe_contiguous(gate_keys), gl = maybe_contiguous(gate_logits),
                   va = maybe_contiguous(valid);
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  at::Tensor dgk = gate == kOnset ? at::empty_like(q) : at::empty({0}, q.options());
  at::Tensor dgl = gate == kToken ? at::zeros({q.size(0), q.size(1), q.size(2)}, q.options())
                                  : at::empty({0}, q.options());
  // One table gradient per thread, summed here.
  std::vector<int64_t> part_shape{at::get_num_threads()};
  for (int64_t size : table.sizes()) part_shape.push_back(size);
  at::Tensor dtable_parts = at::zeros(part_shape, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "cope_backward", [&] {
    COPE_DISPATCH_DIM(q.size(3), backward_kernel, go, q, k, v, table, gk, gl, va, o, l, gate,
                      causal, npos, dq, dk, dv, dtable_parts, dgk, dgl);
  });
  at::Tensor dtable = dtable_parts.sum(0).to(table_.scalar_type());
  return {dq, dk, dv, dtable, dgk, dgl};
}

}  // namespace

TORCH_LIBRARY(cope, m) {
  m.def(
      "forward(Tensor q, Tensor k, Tensor v, Tensor table, Tensor? gate_keys, "
      "Tensor? gate_logits, Tensor? valid, int gate, bool causal, int npos) -> (Tensor, Tensor)");
  m.def(
      "backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor table, Tensor? gate_keys, "
      "Tensor? gate_logits, Tensor? valid, Tensor out, Tensor lse, int gate, bool causal, "
      "int npos) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(cope, CPU, m) {
  m.impl("forward", &cope_forward);
  m.impl("backward", &cope_backward);
}
