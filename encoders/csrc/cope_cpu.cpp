// CoPE attention as one fused CPU kernel per query row, forward and backward (OpenMP via
// at::parallel_for over batch x heads). The maths is encoders/cope_reference.py's; the Python
// side is encoders/cope_cpu.py, which registers the autograd formula and computes the position
// logits z = q e^T (and, for the onset gate, the differenced keys) with ordinary torch ops.
//
// Why a row kernel: with head dims of 16-32 the cost of CoPE is not its matmuls but a dozen
// elementwise passes over (B, H, T, T) tensors (scores, gates, positions, floor/ceil indices,
// gathered logits, softmax, and their gradients). Here a query row's scores, gates, positions
// and probabilities stay in a few T-long buffers in cache, and nothing of size T x T is stored:
// the forward keeps the output and the log-sum-exp, the backward recomputes the row.
//
// Per row i and direction (behind: keys j <= i, walked from the query outwards; ahead, when
// bidirectional: keys j > i), the running gate sum gives the position p_ij; once it reaches the
// cap npos-1 every key further away sits at the capped position, so its gate is neither computed
// nor differentiated (its position gradient is 0, and so is every farther gate's).

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

// exp that the compiler vectorises: float32 by Cephes' expf (range reduction by ln 2, degree-6
// polynomial, about 1 ulp), 0 below the smallest normal result (so exp(-inf) = 0); float64,
// which the tests compare with the reference to 1e-10, keeps std::exp.
#define COPE_INLINE inline __attribute__((always_inline))

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

// One (batch, head) slice of the inputs and the row-sized scratch buffers of one thread.
//
// A row is computed in passes over its keys, each a loop the compiler vectorises, except the
// two running gate sums (one per direction) and the scatter of dL/dz: scores, gates, signed
// positions P, then clamp, floor, weight and the interpolated logit c = z[lo] + w dz[lo] with
// dz[n] = z[n+1] - z[n] (equal to the reference's z[ceil] w + z[floor] (1 - w) up to rounding:
// w = 0 whenever ceil = floor).
template <typename scalar_t>
struct Head {
  int64_t T, D, R, npos;
  bool causal;
  int64_t gate;
  scalar_t scale;
  const scalar_t* q;
  const scalar_t* z;
  // Transposed (D, T) copies: the loops over keys then run over contiguous memory.
  std::vector<scalar_t> kT, vT, gkT, token_gate, key_valid;
  // Per key of the current row; dz per table row.
  std::vector<scalar_t> s, u, logit, w, g, sig, P, dz;
  std::vector<int32_t> lo;

  Head(int64_t T_, int64_t D_, int64_t R_, int64_t npos_, bool causal_, int64_t gate_)
      : T(T_), D(D_), R(R_), npos(npos_), causal(causal_), gate(gate_),
        scale(scalar_t(1) / std::sqrt(scalar_t(D_))),
        kT(D_ * T_), vT(D_ * T_), gkT(gate_ == kOnset ? D_ * T_ : 0),
        token_gate(gate_ == kToken ? T_ : 0), key_valid(T_), s(T_), u(gate_ == kOnset ? T_ : 0),
        logit(T_), w(T_), g(T_), sig(gate_ == kOnset ? T_ : 0), P(T_), dz(R_), lo(T_) {}

  static void transpose(const scalar_t* x, scalar_t* xT, int64_t T, int64_t D) {
    for (int64_t j = 0; j < T; ++j)
      for (int64_t d = 0; d < D; ++d) xT[d * T + j] = x[j * D + d];
  }

  void load(const scalar_t* q_, const scalar_t* k, const scalar_t* v, const scalar_t* z_,
            const scalar_t* gk, const scalar_t* gl, const uint8_t* valid) {
    q = q_;
    z = z_;
    transpose(k, kT.data(), T, D);
    transpose(v, vT.data(), T, D);
    if (gate == kOnset) transpose(gk, gkT.data(), T, D);
    if (gate == kToken)
      for (int64_t j = 0; j < T; ++j) token_gate[j] = sigmoid(gl[j]);
    for (int64_t j = 0; j < T; ++j) key_valid[j] = (!valid || valid[j]) ? 1 : 0;
  }

  // (x_i . y_j) * scale for keys j < n, with yT the (D, T) transposed keys.
  void dots(const scalar_t* xi, const scalar_t* yT, scalar_t* out, int64_t n) const {
    std::fill(out, out + n, scalar_t(0));
    for (int64_t d = 0; d < D; ++d) {
      const scalar_t x = xi[d];
      const scalar_t* y = yT + d * T;
      for (int64_t j = 0; j < n; ++j) out[j] += x * y[j];
    }
    for (int64_t j = 0; j < n; ++j) out[j] *= scale;
  }

  // Gates of keys [0, n), 0 on padded keys.
  void gates(int64_t n) {
    scalar_t* gp = g.data();
    const scalar_t* kv = key_valid.data();
    if (gate == kQK) {
      const scalar_t* sp = s.data();
      for (int64_t j = 0; j < n; ++j) gp[j] = kv[j] * sigmoid(sp[j]);
    } else if (gate == kToken) {
      const scalar_t* tg = token_gate.data();
      for (int64_t j = 0; j < n; ++j) gp[j] = kv[j] * tg[j];
    } else {  // onset: |2 sigmoid(u) - 1|
      const scalar_t* up = u.data();
      scalar_t* sg = sig.data();
      for (int64_t j = 0; j < n; ++j) {
        sg[j] = sigmoid(up[j]);
        gp[j] = kv[j] * std::abs(2 * sg[j] - 1);
      }
    }
  }

  // Logits of row i over keys [0, n); false when the row has no key (fully padded).
  bool row(int64_t i, int64_t n) {
    const scalar_t* kv = key_valid.data();
    bool any = false;
    for (int64_t j = 0; j < n; ++j) any |= kv[j] != 0;
    if (!any) return false;
    dots(q + i * D, kT.data(), s.data(), n);
    if (gate == kOnset) dots(q + i * D, gkT.data(), u.data(), n);
    gates(n);
    // Signed positions (Eq. 3): running sums outwards from the query, one per direction.
    scalar_t* Pp = P.data();
    const scalar_t* gp = g.data();
    scalar_t run = 0;
    for (int64_t j = i; j >= 0; --j) {
      run += gp[j];
      Pp[j] = run;
    }
    run = 0;
    for (int64_t j = i + 1; j < n; ++j) {
      run += gp[j];
      Pp[j] = -run;
    }
    // Eq. 5 on the clamped positions; dz = z[n+1] - z[n] (0 past the last row).
    const scalar_t* zi = z + i * R;
    scalar_t* dzp = dz.data();
    for (int64_t r = 0; r + 1 < R; ++r) dzp[r] = zi[r + 1] - zi[r];
    dzp[R - 1] = 0;
    const scalar_t cap = scalar_t(npos - 1);
    const scalar_t low = causal ? scalar_t(0) : -cap;
    const int32_t offset = causal ? 0 : int32_t(npos - 1);
    const scalar_t* sp = s.data();
    scalar_t* lp = logit.data();
    scalar_t* wp = w.data();
    int32_t* lop = lo.data();
    const scalar_t minus_inf = -std::numeric_limits<scalar_t>::infinity();
    for (int64_t j = 0; j < n; ++j) {
      const scalar_t p = std::min(std::max(Pp[j], low), cap);
      const scalar_t fl = std::floor(p);
      const scalar_t wt = p - fl;
      const int32_t l = int32_t(fl) + offset;
      wp[j] = wt;
      lop[j] = l;
      lp[j] = kv[j] != 0 ? sp[j] + (zi[l] + wt * dzp[l]) : minus_inf;
    }
    return true;
  }
};

template <typename scalar_t>
void forward_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& z, const at::Tensor& gk, const at::Tensor& gl,
                    const at::Tensor& valid, int64_t gate, bool causal, int64_t npos,
                    at::Tensor& out, at::Tensor& lse) {
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), R = z.size(3);
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = k.data_ptr<scalar_t>();
  const scalar_t* vp = v.data_ptr<scalar_t>();
  const scalar_t* zp = z.data_ptr<scalar_t>();
  const scalar_t* gkp = gk.defined() ? gk.data_ptr<scalar_t>() : nullptr;
  const scalar_t* glp = gl.defined() ? gl.data_ptr<scalar_t>() : nullptr;
  const uint8_t* vap = valid.defined() ? valid.data_ptr<uint8_t>() : nullptr;
  scalar_t* op = out.data_ptr<scalar_t>();
  scalar_t* lp = lse.data_ptr<scalar_t>();
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    Head<scalar_t> head(T, D, R, npos, causal, gate);
    std::vector<scalar_t> acc(D), weight(T);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H;
      head.load(qp + bh * T * D, kp + bh * T * D, vp + bh * T * D, zp + bh * T * R,
                gkp ? gkp + bh * T * D : nullptr, glp ? glp + bh * T : nullptr,
                vap ? vap + b * T : nullptr);
      const scalar_t* vh = vp + bh * T * D;
      for (int64_t i = 0; i < T; ++i) {
        const int64_t n = causal ? i + 1 : T;
        scalar_t* oi = op + (bh * T + i) * D;
        if (!head.row(i, n)) {  // no key: output 0, lse -inf
          std::fill(oi, oi + D, scalar_t(0));
          lp[bh * T + i] = -std::numeric_limits<scalar_t>::infinity();
          continue;
        }
        const scalar_t* logit = head.logit.data();
        scalar_t m = -std::numeric_limits<scalar_t>::infinity();
        for (int64_t j = 0; j < n; ++j) m = std::max(m, logit[j]);
        scalar_t* e = weight.data();
        for (int64_t j = 0; j < n; ++j) e[j] = fast_exp(logit[j] - m);
        scalar_t sum = 0;
        for (int64_t j = 0; j < n; ++j) sum += e[j];
        std::fill(acc.begin(), acc.end(), scalar_t(0));
        for (int64_t j = 0; j < n; ++j) {
          const scalar_t* vj = vh + j * D;
          for (int64_t d = 0; d < D; ++d) acc[d] += e[j] * vj[d];
        }
        for (int64_t d = 0; d < D; ++d) oi[d] = acc[d] / sum;
        lp[bh * T + i] = m + std::log(sum);
      }
    }
  });
}

// dL/dz of one row: add dl (1 - w) to row lo and dl w to row lo + 1, walking the keys in an
// order where lo only moves one way, so that each row's sum is kept in registers.
template <typename scalar_t>
inline void scatter_row(const scalar_t* dl, const scalar_t* w, const int32_t* lo, int64_t first,
                        int64_t last, int64_t step, scalar_t* dzi) {
  if (first == last) return;
  int32_t current = lo[first];
  scalar_t at = 0, above = 0;
  for (int64_t j = first; j != last; j += step) {
    if (lo[j] != current) {
      dzi[current] += at;
      if (above != 0) dzi[current + 1] += above;  // w > 0 only below the last row
      current = lo[j];
      at = above = 0;
    }
    at += dl[j] * (1 - w[j]);
    above += dl[j] * w[j];
  }
  dzi[current] += at;
  if (above != 0) dzi[current + 1] += above;  // w > 0 only below the last row
}

template <typename scalar_t>
void backward_kernel(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& v, const at::Tensor& z, const at::Tensor& gk,
                     const at::Tensor& gl, const at::Tensor& valid, const at::Tensor& out,
                     const at::Tensor& lse, int64_t gate, bool causal, int64_t npos,
                     at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, at::Tensor& dz,
                     at::Tensor& dgk, at::Tensor& dgl) {
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), R = z.size(3);
  const scalar_t* gop = grad_out.data_ptr<scalar_t>();
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = k.data_ptr<scalar_t>();
  const scalar_t* vp = v.data_ptr<scalar_t>();
  const scalar_t* zp = z.data_ptr<scalar_t>();
  const scalar_t* gkp = gk.defined() ? gk.data_ptr<scalar_t>() : nullptr;
  const scalar_t* glp = gl.defined() ? gl.data_ptr<scalar_t>() : nullptr;
  const uint8_t* vap = valid.defined() ? valid.data_ptr<uint8_t>() : nullptr;
  const scalar_t* op = out.data_ptr<scalar_t>();
  const scalar_t* lp = lse.data_ptr<scalar_t>();
  scalar_t* dqp = dq.data_ptr<scalar_t>();
  scalar_t* dkp = dk.data_ptr<scalar_t>();
  scalar_t* dvp = dv.data_ptr<scalar_t>();
  scalar_t* dzp = dz.data_ptr<scalar_t>();
  scalar_t* dgkp = gate == kOnset ? dgk.data_ptr<scalar_t>() : nullptr;
  scalar_t* dglp = gate == kToken ? dgl.data_ptr<scalar_t>() : nullptr;
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    Head<scalar_t> head(T, D, R, npos, causal, gate);
    std::vector<scalar_t> a(T), da(T), dl(T), dp(T), dg(T), ds(T), du(T), acc(D);
    std::vector<scalar_t> dkT(D * T), dvT(D * T), dgkT(gate == kOnset ? D * T : 0);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H;
      const scalar_t* kh = kp + bh * T * D;
      const scalar_t* gkh = gkp ? gkp + bh * T * D : nullptr;
      head.load(qp + bh * T * D, kh, vp + bh * T * D, zp + bh * T * R, gkh,
                glp ? glp + bh * T : nullptr, vap ? vap + b * T : nullptr);
      std::fill(dkT.begin(), dkT.end(), scalar_t(0));
      std::fill(dvT.begin(), dvT.end(), scalar_t(0));
      std::fill(dgkT.begin(), dgkT.end(), scalar_t(0));
      scalar_t* dgl_h = dglp ? dglp + bh * T : nullptr;
      const scalar_t scale = head.scale;
      const scalar_t* kv = head.key_valid.data();
      for (int64_t i = 0; i < T; ++i) {
        const int64_t n = causal ? i + 1 : T;
        if (!head.row(i, n)) continue;  // no key: every gradient of the row is 0
        const scalar_t* doi = gop + (bh * T + i) * D;
        const scalar_t* oi = op + (bh * T + i) * D;
        const scalar_t* qi = qp + (bh * T + i) * D;
        scalar_t* dzi = dzp + (bh * T + i) * R;
        const scalar_t lse_i = lp[bh * T + i];
        const scalar_t* logit = head.logit.data();
        const scalar_t* wp = head.w.data();
        const scalar_t* gp = head.g.data();
        const int32_t* lop = head.lo.data();
        const scalar_t* dzt = head.dz.data();
        scalar_t delta = 0;  // Delta_i = dO_i . O_i
        for (int64_t d = 0; d < D; ++d) delta += doi[d] * oi[d];
        // dL/da_ij = dO_i . v_j, then dL/dlogit and dL/dp.
        std::fill(da.begin(), da.begin() + n, scalar_t(0));
        for (int64_t d = 0; d < D; ++d) {
          const scalar_t x = doi[d];
          const scalar_t* y = head.vT.data() + d * T;
          for (int64_t j = 0; j < n; ++j) da[j] += x * y[j];
        }
        for (int64_t j = 0; j < n; ++j) {
          const scalar_t aj = fast_exp(logit[j] - lse_i);  // 0 on padded keys
          a[j] = aj;
          dl[j] = aj * (da[j] - delta);
          // dc/dp = z[ceil] - z[floor]: 0 at integer (incl. clamped) positions, as in the reference.
          dp[j] = wp[j] > 0 ? dl[j] * dzt[lop[j]] : scalar_t(0);
        }
        scatter_row(dl.data(), wp, lop, i, int64_t(-1), int64_t(-1), dzi);
        scatter_row(dl.data(), wp, lop, i + 1, n, int64_t(1), dzi);
        // dL/dg_ik = sum over keys j at or beyond k (same side) of +-dL/dp_ij.
        scalar_t run = 0;
        for (int64_t j = 0; j <= i; ++j) {
          run += dp[j];
          dg[j] = run;
        }
        run = 0;
        for (int64_t j = n - 1; j > i; --j) {
          run += dp[j];
          dg[j] = -run;
        }
        if (gate == kQK) {
          for (int64_t j = 0; j < n; ++j) ds[j] = dl[j] + kv[j] * dg[j] * gp[j] * (1 - gp[j]);
        } else {
          std::copy(dl.begin(), dl.begin() + n, ds.begin());
          if (gate == kToken) {
            const scalar_t* tg = head.token_gate.data();
            for (int64_t j = 0; j < n; ++j) dgl_h[j] += kv[j] * dg[j] * tg[j] * (1 - tg[j]);
          } else {
            const scalar_t* sg = head.sig.data();
            for (int64_t j = 0; j < n; ++j) {
              const scalar_t t = 2 * sg[j] - 1;
              const scalar_t sign = scalar_t((t > 0) - (t < 0));
              du[j] = kv[j] * dg[j] * sign * 2 * sg[j] * (1 - sg[j]);
            }
          }
        }
        // dq_i, and the key-side gradients in (D, T) layout.
        std::fill(acc.begin(), acc.end(), scalar_t(0));
        for (int64_t j = 0; j < n; ++j) {
          const scalar_t c = ds[j];
          const scalar_t* kj = kh + j * D;
          for (int64_t d = 0; d < D; ++d) acc[d] += c * kj[d];
        }
        if (gate == kOnset) {
          for (int64_t j = 0; j < n; ++j) {
            const scalar_t c = du[j];
            const scalar_t* kj = gkh + j * D;
            for (int64_t d = 0; d < D; ++d) acc[d] += c * kj[d];
          }
        }
        scalar_t* dqi = dqp + (bh * T + i) * D;
        for (int64_t d = 0; d < D; ++d) dqi[d] = acc[d] * scale;
        for (int64_t d = 0; d < D; ++d) {
          const scalar_t qd = qi[d] * scale, god = doi[d];
          scalar_t* dkd = dkT.data() + d * T;
          scalar_t* dvd = dvT.data() + d * T;
          for (int64_t j = 0; j < n; ++j) {
            dkd[j] += ds[j] * qd;
            dvd[j] += a[j] * god;
          }
          if (gate == kOnset) {
            scalar_t* dgd = dgkT.data() + d * T;
            for (int64_t j = 0; j < n; ++j) dgd[j] += du[j] * qd;
          }
        }
      }
      for (int64_t j = 0; j < T; ++j)
        for (int64_t d = 0; d < D; ++d) {
          dkp[(bh * T + j) * D + d] = dkT[d * T + j];
          dvp[(bh * T + j) * D + d] = dvT[d * T + j];
          if (gate == kOnset) dgkp[(bh * T + j) * D + d] = dgkT[d * T + j];
        }
    }
  });
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& z, int64_t npos, bool causal) {
  TORCH_CHECK(q.device().is_cpu(), "cope_cpu runs on CPU tensors");
  TORCH_CHECK(q.dim() == 4 && k.sizes() == q.sizes() && v.sizes() == q.sizes(),
              "q, k, v must be (B, H, T, D) of one shape");
  TORCH_CHECK(z.dim() == 4 && z.size(0) == q.size(0) && z.size(1) == q.size(1) &&
                  z.size(2) == q.size(2) && z.size(3) == (causal ? npos : 2 * npos - 1),
              "z must be (B, H, T, rows of the table)");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
              "cope_cpu computes in float32 or float64");
}

at::Tensor maybe_contiguous(const std::optional<at::Tensor>& x) {
  return x.has_value() ? x->contiguous() : at::Tensor();
}

std::tuple<at::Tensor, at::Tensor> cope_forward(
    const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, const at::Tensor& z_,
    const std::optional<at::Tensor>& gate_keys, const std::optional<at::Tensor>& gate_logits,
    const std::optional<at::Tensor>& valid, int64_t gate, bool causal, int64_t npos) {
  check_inputs(q_, k_, v_, z_, npos, causal);
  const at::Tensor q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous(),
                   z = z_.contiguous();
  const at::Tensor gk = maybe_contiguous(gate_keys), gl = maybe_contiguous(gate_logits),
                   va = maybe_contiguous(valid);
  at::Tensor out = at::empty_like(q);
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "cope_forward", [&] {
    forward_kernel<scalar_t>(q, k, v, z, gk, gl, va, gate, causal, npos, out, lse);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cope_backward(
    const at::Tensor& grad_out, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
    const at::Tensor& z_, const std::optional<at::Tensor>& gate_keys,
    const std::optional<at::Tensor>& gate_logits, const std::optional<at::Tensor>& valid,
    const at::Tensor& out, const at::Tensor& lse, int64_t gate, bool causal, int64_t npos) {
  check_inputs(q_, k_, v_, z_, npos, causal);
  const at::Tensor q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous(),
                   z = z_.contiguous(), go = grad_out.contiguous(), o = out.contiguous(),
                   l = lse.contiguous();
  const at::Tensor gk = maybe_contiguous(gate_keys), gl = maybe_contiguous(gate_logits),
                   va = maybe_contiguous(valid);
  at::Tensor dq = at::zeros_like(q), dk = at::empty_like(k), dv = at::empty_like(v),
             dz = at::zeros_like(z);
  at::Tensor dgk = gate == kOnset ? at::empty_like(q) : at::empty({0}, q.options());
  at::Tensor dgl = gate == kToken ? at::zeros({q.size(0), q.size(1), q.size(2)}, q.options())
                                  : at::empty({0}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "cope_backward", [&] {
    backward_kernel<scalar_t>(go, q, k, v, z, gk, gl, va, o, l, gate, causal, npos, dq, dk, dv,
                              dz, dgk, dgl);
  });
  return {dq, dk, dv, dz, dgk, dgl};
}

}  // namespace

TORCH_LIBRARY(cope, m) {
  m.def(
      "forward(Tensor q, Tensor k, Tensor v, Tensor z, Tensor? gate_keys, Tensor? gate_logits, "
      "Tensor? valid, int gate, bool causal, int npos) -> (Tensor, Tensor)");
  m.def(
      "backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor z, Tensor? gate_keys, "
      "Tensor? gate_logits, Tensor? valid, Tensor out, Tensor lse, int gate, bool causal, "
      "int npos) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(cope, CPU, m) {
  m.impl("forward", &cope_forward);
  m.impl("backward", &cope_backward);
}
