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

// 32-byte vectors (GCC/Clang vector extensions) for the matrix products and the running sums.
template <typename scalar_t>
struct Simd;
template <>
struct Simd<float> {
  typedef float vec __attribute__((vector_size(32)));
  static constexpr int64_t W = 8;
};
template <>
struct Simd<double> {
  typedef double vec __attribute__((vector_size(32)));
  static constexpr int64_t W = 4;
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
  constexpr int64_t W = Simd<scalar_t>::W, NV = kBlock / W, MB = NV <= 4 ? 2 : 1;
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
        const vec x = vec{} + A[(m + mb) * a_row + k * a_col];
#pragma GCC unroll 8
        for (int64_t v = 0; v < NV; ++v) acc[mb][v] += x * b[v];
      }
    }
    for (int64_t mb = 0; mb < MB; ++mb) finish(m + mb, acc[mb]);
  }
  for (; m < M; ++m) {
    vec acc[NV] = {};
    for (int64_t k = 0; k < K; ++k) {
      const vec x = vec{} + A[m * a_row + k * a_col];
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
          const vec x = vec{} + A[(m + mb) * kBlock + r];
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
        const vec x = vec{} + A[m * kBlock + r];
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
// block's row r (query i0 + r). Rows past the sequence's end are computed as rows without a
// key (zero query, zero output gradient) and never written out.
template <typename scalar_t, int64_t kD>
struct Slice {
  using vec = typename Simd<scalar_t>::vec;
  static constexpr int64_t W = Simd<scalar_t>::W, NV = kBlock / W;

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
  at::Tensor holders[11];

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
    // Eq. 4: z_i[n] = q_i . e[n], and the differences that Eq. 5 interpolates along.
    gemm_lanes<scalar_t>(R, D, e, D, 1, qt, scalar_t(1), false, zt);
    for (int64_t n_ = 0; n_ + 1 < R; ++n_)
      for (int64_t r = 0; r < kBlock; ++r)
        zd[n_ * kBlock + r] = zt[(n_ + 1) * kBlock + r] - zt[n_ * kBlock + r];
    for (int64_t r = 0; r < kBlock; ++r) zd[(R - 1) * kBlock + r] = 0;
    gates(n);
    positions(i0, n);
  }

  // Gates of keys [0, n), 0 on padded keys (and, when causal, not yet masked past the row).
  void gates(int64_t n) {
    for (int64_t j = 0; j < n; ++j) {
      const scalar_t kv = key_valid[j];
      scalar_t* gj = g + j * kBlock;
      if (gate == kQK) {
        const scalar_t* sj = s + j * kBlock;
        for (int64_t r = 0; r < kBlock; ++r) gj[r] = kv * sigmoid(sj[r]);
      } else if (gate == kToken) {
        const scalar_t tg = kv * token_gate[j];
        for (int64_t r = 0; r < kBlock; ++r) gj[r] = tg;
      } else {  // onset: |2 sigmoid(u) - 1|
        const scalar_t* uj = u + j * kBlock;
        scalar_t* sg = sig + j * kBlock;
        for (int64_t r = 0; r < kBlock; ++r) {
          sg[r] = sigmoid(uj[r]);
          gj[r] = kv * std::abs(2 * sg[r] - 1);
        }
      }
    }
  }

  // Lane r of key j is behind its row (j <= i0 + r) where r >= j - i0.
  static COPE_INLINE vec lane_mask(int64_t v, int64_t first_behind, vec yes, vec no) {
    vec out;
    for (int64_t l = 0; l < W; ++l) out[l] = v * W + l >= first_behind ? yes[l] : no[l];
    return out;
  }

  // Signed positions (Eq. 3), by running sums vectorised across the block's rows.
  void positions(int64_t i0, int64_t n) {
    const int64_t diag_end = std::min(i0 + kBlock, n);  // keys [i0, diag_end): mixed lanes
    const vec zero = {};
    if (!causal) {
      // Ahead: p_ij = -sum_{k=i+1..j} g_ik, upwards from the query; lanes still behind add 0.
      vec run[NV] = {};
      for (int64_t j = i0 + 1; j < n; ++j) {
        const bool mixed = j < diag_end;
#pragma GCC unroll 8
        for (int64_t v = 0; v < NV; ++v) {
          vec gj = load(g + j * kBlock + v * W);
          if (mixed) gj = lane_mask(v, j - i0, zero, gj);
          run[v] += gj;
          store(p + j * kBlock + v * W, -run[v]);
        }
      }
    }
    // Behind: p_ij = sum_{k=j..i} g_ik, downwards from the query; lanes ahead add nothing and
    // keep their ahead position (0 when causal).
    vec run[NV] = {};
    for (int64_t j = diag_end - 1; j >= 0; --j) {
      const bool mixed = j >= i0;
#pragma GCC unroll 8
      for (int64_t v = 0; v < NV; ++v) {
        vec gj = load(g + j * kBlock + v * W);
        if (mixed) {
          const vec ahead = causal ? zero : load(p + j * kBlock + v * W);
          gj = lane_mask(v, j - i0, gj, zero);
          run[v] += gj;
          store(p + j * kBlock + v * W, lane_mask(v, j - i0, run[v], ahead));
        } else {
          run[v] += gj;
          store(p + j * kBlock + v * W, run[v]);
        }
      }
    }
  }
};

// Eq. 5 for one key of the block (lanes r): clamp, floor, weight w and row lo of the table, and
// the logit s + c with c = z[lo] + w (z[lo+1] - z[lo]), which equals the reference's
// z[ceil] w + z[floor] (1 - w) up to rounding (w = 0 whenever ceil = floor); -inf where the key
// is padded or (causal) past the row.
template <typename scalar_t, int64_t kD>
COPE_INLINE void eq5(const Slice<scalar_t, kD>& sl, int64_t i0, int64_t j, scalar_t* logit,
                     scalar_t* w, int32_t* lo) {
  const scalar_t cap = scalar_t(sl.npos - 1);
  const scalar_t low = sl.causal ? scalar_t(0) : -cap;
  const int32_t offset = sl.causal ? 0 : int32_t(sl.npos - 1);
  const scalar_t minus_inf = -std::numeric_limits<scalar_t>::infinity();
  const scalar_t* pj = sl.p + j * kBlock;
  const scalar_t* sj = sl.s + j * kBlock;
  const int64_t first = sl.causal ? j - i0 : 0;  // lanes r >= first see key j
  const bool valid = sl.key_valid[j] != 0;
  for (int64_t r = 0; r < kBlock; ++r) {
    const scalar_t pos = std::min(std::max(pj[r], low), cap);
    const scalar_t fl = std::floor(pos);
    const scalar_t wt = pos - fl;
    const int32_t l = int32_t(fl) + offset;
    const int64_t at = int64_t(l) * kBlock + r;
    const scalar_t x = sj[r] + (sl.zt[at] + wt * sl.zd[at]);
    w[r] = wt;
    lo[r] = l;
    logit[r] = valid && r >= first ? x : minus_inf;
  }
}

template <typename scalar_t, int64_t kD>
void forward_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& table, const at::Tensor& gk, const at::Tensor& gl,
                    const at::Tensor& valid, int64_t gate, bool causal, int64_t npos,
                    at::Tensor& out, at::Tensor& lse) {
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
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    Slice<scalar_t, kD> sl(T, D, R, npos, causal, gate);
    const auto type = c10::CppTypeToScalarType<scalar_t>::value;
    at::Tensor holders[4];
    scalar_t* logit = scratch<scalar_t>(holders[0], T * kBlock, type);
    scalar_t* w = scratch<scalar_t>(holders[1], kBlock, type);
    int32_t* lo = scratch<int32_t>(holders[2], kBlock, at::kInt);
    scalar_t* ot = scratch<scalar_t>(holders[3], D * kBlock, type);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      sl.load_slice(qp + bh * T * D, kp + bh * T * D, vp + bh * T * D,
                    gkp ? gkp + bh * T * D : nullptr, ep + h * table_step,
                    glp ? glp + bh * T : nullptr, vap ? vap + b * T : nullptr);
      for (int64_t i0 = 0; i0 < T; i0 += kBlock) {
        const int64_t n = sl.keys_of(i0), rows = std::min(kBlock, T - i0);
        sl.prepare(i0, n);
        scalar_t m[kBlock], sum[kBlock];
        std::fill(m, m + kBlock, -std::numeric_limits<scalar_t>::infinity());
        for (int64_t j = 0; j < n; ++j) {
          scalar_t* lj = logit + j * kBlock;
          eq5(sl, i0, j, lj, w, lo);
          for (int64_t r = 0; r < kBlock; ++r) m[r] = std::max(m[r], lj[r]);
        }
        // A row without a key (fully padded) has every logit -inf: output 0, lse -inf.
        for (int64_t r = 0; r < kBlock; ++r) {
          if (m[r] == -std::numeric_limits<scalar_t>::infinity()) m[r] = 0;
          sum[r] = 0;
        }
        for (int64_t j = 0; j < n; ++j) {
          scalar_t* lj = logit + j * kBlock;
          for (int64_t r = 0; r < kBlock; ++r) {
            lj[r] = fast_exp(lj[r] - m[r]);
            sum[r] += lj[r];
          }
        }
        // O^T (D x rows) = V^T E, normalised per row.
        gemm_lanes<scalar_t>(sl.D, n, vp + bh * T * D, 1, sl.D, logit, scalar_t(1), false, ot);
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t i = i0 + r;
          const scalar_t inv = sum[r] > 0 ? 1 / sum[r] : scalar_t(0);
          for (int64_t d = 0; d < sl.D; ++d) op[(bh * T + i) * sl.D + d] = ot[d * kBlock + r] * inv;
          lp[bh * T + i] = sum[r] > 0 ? m[r] + std::log(sum[r])
                                      : -std::numeric_limits<scalar_t>::infinity();
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
      for (int64_t v = 0; v < NV; ++v) {
        const vec dp = load(p + j * kBlock + v * W);
        if (mixed) {
          run[v] += Slice<scalar_t, kD>::lane_mask(v, j - i0, zero, dp);
          store(p + j * kBlock + v * W, Slice<scalar_t, kD>::lane_mask(v, j - i0, dp, -run[v]));
        } else {
          run[v] += dp;
          store(p + j * kBlock + v * W, -run[v]);
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
    for (int64_t v = 0; v < NV; ++v) {
      const vec dp = load(p + j * kBlock + v * W);
      if (mixed) {
        run[v] += Slice<scalar_t, kD>::lane_mask(v, j - i0, dp, zero);
        const vec ahead = sl.causal ? zero : dp;
        store(p + j * kBlock + v * W, Slice<scalar_t, kD>::lane_mask(v, j - i0, run[v], ahead));
      } else {
        run[v] += dp;
        store(p + j * kBlock + v * W, run[v]);
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
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    Slice<scalar_t, kD> sl(T, D, R, npos, causal, gate);
    const int64_t Dh = sl.D;
    const auto type = c10::CppTypeToScalarType<scalar_t>::value;
    at::Tensor holders[8];
    const int64_t keys = T * kBlock;
    scalar_t* a = scratch<scalar_t>(holders[0], keys, type);    // probabilities
    scalar_t* dl = scratch<scalar_t>(holders[1], keys, type);   // dL/da, then dL/dlogit, dL/ds
    scalar_t* w = scratch<scalar_t>(holders[2], keys, type);
    int32_t* lo = scratch<int32_t>(holders[3], keys, at::kInt);
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
        scalar_t delta[kBlock], lse_r[kBlock];
        for (int64_t r = 0; r < kBlock; ++r) {
          const int64_t i = i0 + r;
          delta[r] = 0;
          lse_r[r] = std::numeric_limits<scalar_t>::infinity();
          for (int64_t d = 0; d < Dh; ++d) {
            const scalar_t x = r < rows ? gop[(bh * T + i) * Dh + d] : scalar_t(0);
            dot[d * kBlock + r] = x;
            dorows[r * Dh + d] = x;
            if (r < rows) delta[r] += x * op[(bh * T + i) * Dh + d];
          }
          if (r < rows && lp[bh * T + i] != -std::numeric_limits<scalar_t>::infinity())
            lse_r[r] = lp[bh * T + i];
        }
        // dL/da_ij = dO_i . v_j.
        gemm_lanes<scalar_t>(n, Dh, vh, Dh, 1, dot, scalar_t(1), false, dl);
        for (int64_t j = 0; j < n; ++j) {
          scalar_t* lj = a + j * kBlock;
          scalar_t* wj = w + j * kBlock;
          int32_t* loj = lo + j * kBlock;
          eq5(sl, i0, j, lj, wj, loj);
          scalar_t* dlj = dl + j * kBlock;
          scalar_t* dpj = sl.p + j * kBlock;  // positions are no longer needed: dL/dp
          for (int64_t r = 0; r < kBlock; ++r) {
            const scalar_t aj = fast_exp(lj[r] - lse_r[r]);  // 0 on masked keys
            lj[r] = aj;
            const scalar_t dlogit = aj * (dlj[r] - delta[r]);
            dlj[r] = dlogit;
            // dc/dp = z[ceil] - z[floor]: 0 at integer (incl. clamped) positions, as in the
            // reference.
            dpj[r] = wj[r] > 0 ? dlogit * sl.zd[int64_t(loj[r]) * kBlock + r] : scalar_t(0);
          }
        }
        // dL/dz: dl (1 - w) to row lo, dl w to row lo + 1 (a spare row R takes w = 0's).
        std::fill(dzt, dzt + (R + 1) * kBlock, scalar_t(0));
        for (int64_t j = 0; j < n; ++j) {
          const scalar_t* dlj = dl + j * kBlock;
          const scalar_t* wj = w + j * kBlock;
          const int32_t* loj = lo + j * kBlock;
          for (int64_t r = 0; r < kBlock; ++r) {
            const int64_t at = int64_t(loj[r]) * kBlock + r;
            dzt[at] += dlj[r] * (1 - wj[r]);
            dzt[at + kBlock] += dlj[r] * wj[r];
          }
        }
        gate_gradients(sl, i0, n);
        // dL/dlogit -> dL/ds (qk: ds = dl + dg g (1 - g)); token and onset gradients.
        const scalar_t* dg = sl.p;
        for (int64_t j = 0; j < n; ++j) {
          scalar_t* dlj = dl + j * kBlock;
          const scalar_t* dgj = dg + j * kBlock;
          if (gate == kQK) {
            const scalar_t* gj = sl.g + j * kBlock;
            for (int64_t r = 0; r < kBlock; ++r) dlj[r] += dgj[r] * gj[r] * (1 - gj[r]);
          } else if (gate == kToken) {
            scalar_t total = 0;
            for (int64_t r = 0; r < kBlock; ++r) total += dgj[r];
            const scalar_t tg = sl.token_gate[j];
            dgl_h[j] += sl.key_valid[j] * total * tg * (1 - tg);
          } else {  // onset: du = dg sign(2 sig - 1) 2 sig (1 - sig), kept in g
            const scalar_t* sg = sl.sig + j * kBlock;
            scalar_t* du = sl.g + j * kBlock;
            const scalar_t kv = sl.key_valid[j];
            for (int64_t r = 0; r < kBlock; ++r) {
              const scalar_t t = 2 * sg[r] - 1;
              const scalar_t sign = scalar_t((t > 0) - (t < 0));
              du[r] = kv * dgj[r] * sign * 2 * sg[r] * (1 - sg[r]);
            }
          }
        }
        // dQ^T = (K^T ds + GK^T du) / sqrt(d) + E^T dz, for the block's rows.
        gemm_lanes<scalar_t>(Dh, n, kh, 1, Dh, dl, sl.scale, false, dqt);
        if (gate == kOnset) gemm_lanes<scalar_t>(Dh, n, gkh, 1, Dh, sl.g, sl.scale, true, dqt);
        gemm_lanes<scalar_t>(Dh, R, eh, 1, Dh, dzt, scalar_t(1), true, dqt);
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t d = 0; d < Dh; ++d) dqp[(bh * T + i0 + r) * Dh + d] = dqt[d * kBlock + r];
        // Key side: dK += ds^T Q (scaled below), dV += A^T dO, dGK += du^T Q, dE += dz^T Q.
        gemm_rows<scalar_t, kD>(n, dl, sl.qrows, Dh, dkh);
        gemm_rows<scalar_t, kD>(n, a, dorows, Dh, dvh);
        if (gate == kOnset) gemm_rows<scalar_t, kD>(n, sl.g, sl.qrows, Dh, dgkh);
        gemm_rows<scalar_t, kD>(R, dzt, sl.qrows, Dh, deh);
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
