// dist_nmt fused CPU operators for MXNet 1.9.1 (lib_api, MX_LIBRARY_VERSION 11), fp32, forward and backward.
//
// Built by scripts/bootstrap.sh (or dist_nmt.ops.build()) into dist_nmt/ops/libdist_nmt_ops.so and loaded with
// mx.library.load; the ops then appear as F.dn_* inside hybridized blocks. Python wrappers: dist_nmt/ops/__init__.py.
//
// Dropout. Masks come from a counter-based hash (splitmix64) of (seed, element index), so they are a pure function of
// the seed and are regenerated in backward instead of stored. The seed is the `ctrl` input, float32[3] =
// [seed_hi, seed_lo, train]: two 24-bit integers drawn by the Python graph from mx.random (so masks follow the
// process's mx.random seed like built-in Dropout) and a 0/1 training flag (lib_api does not pass is_train).
//
// Gradients. lib_api 1.9.1 does not forward the gradient req, so a backward always overwrites: these ops therefore
// take no parameters (LayerNorm's gamma/beta are applied by built-in ops in Python) and write every input's
// gradient (zeros for ctrl and lengths).
//
// Shapes: N rows, D features; BH = batch*heads, B batch, T queries, S keys, dk/dv head dims, A attention units.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "mxnet/lib_api.h"

using namespace mxnet::ext;
using Attrs = std::unordered_map<std::string, std::string>;

namespace {

float attr_float(const Attrs& attrs, const char* key, float fallback) {
  auto it = attrs.find(key);
  return it == attrs.end() ? fallback : std::stof(it->second);
}

// Dropout with keep probability 1-p, scale 1/(1-p); identity when not training or p == 0.
struct Dropout {
  uint64_t seed = 0;
  uint32_t threshold = 0;  // drop when hash < threshold
  float scale = 1.0f;
  bool active = false;

  Dropout() = default;
  Dropout(const Attrs& attrs, const MXTensor& ctrl) {
    const float p = attr_float(attrs, "p", 0.0f);
    const float* c = const_cast<MXTensor&>(ctrl).data<float>();
    active = p > 0.0f && c[2] > 0.5f;
    if (!active) return;
    seed = (static_cast<uint64_t>(c[0]) << 24) ^ static_cast<uint64_t>(c[1]);
    threshold = static_cast<uint32_t>(std::min(4294967295.0, p * 4294967296.0));
    scale = 1.0f / (1.0f - p);
  }

  // splitmix64 finaliser of seed-offset counter: statistically independent streams per (seed, index).
  inline float keep(uint64_t index) const {
    if (!active) return 1.0f;
    uint64_t z = seed * 0xD1B54A32D192ED03ULL + (index + 1) * 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    z ^= z >> 31;
    return static_cast<uint32_t>(z >> 32) < threshold ? 0.0f : scale;
  }
};

int64_t rows_of(const MXTensor& t) { return t.size() / t.shape.back(); }

void zero(MXTensor* t) {
  if (t->data_ptr != nullptr) std::memset(t->data_ptr, 0, t->size() * sizeof(float));
}

// Normalise one row in place: xhat = (s - mean) * rstd; returns rstd.
inline float normalize_row(float* s, int64_t d, float eps) {
  double sum = 0.0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < d; ++j) sum += s[j];
  const float mean = static_cast<float>(sum / d);
  double sq = 0.0;
#pragma omp simd reduction(+ : sq)
  for (int64_t j = 0; j < d; ++j) sq += (s[j] - mean) * (s[j] - mean);
  const float rstd = 1.0f / std::sqrt(static_cast<float>(sq / d) + eps);
#pragma omp simd
  for (int64_t j = 0; j < d; ++j) s[j] = (s[j] - mean) * rstd;
  return rstd;
}

// ds = rstd * (g - mean(g) - xhat * mean(g * xhat)) for one row, written into out.
inline void normalize_row_backward(const float* g, const float* xhat, float rstd, int64_t d, float* out) {
  float mg = 0.0f, mgx = 0.0f;
#pragma omp simd reduction(+ : mg, mgx)
  for (int64_t j = 0; j < d; ++j) {
    mg += g[j];
    mgx += g[j] * xhat[j];
  }
  mg /= d;
  mgx /= d;
#pragma omp simd
  for (int64_t j = 0; j < d; ++j) out[j] = rstd * (g[j] - mg - xhat[j] * mgx);
}

// ---------------------------------------------------------------------------------------------------------------
// dn_add_dropout_norm(x, h, ctrl; p, eps) -> (xhat, rstd): s = x + dropout(h), xhat = (s - mean) / std per row.
// dn_norm(x; eps) -> (xhat, rstd). dn_add_dropout(x, h, ctrl; p) -> x + dropout(h).
// The gradient of rstd is ignored (callers use it only for its shape).

MXReturnValue add_dropout_norm_forward(const Attrs& attrs, std::vector<MXTensor>* in, std::vector<MXTensor>* out,
                                       const OpResource&) {
  const bool has_residual = in->size() == 3;
  const float eps = attr_float(attrs, "eps", 1e-5f);
  const int64_t d = in->at(0).shape.back(), n = rows_of(in->at(0));
  const float* x = in->at(0).data<float>();
  const float* h = has_residual ? in->at(1).data<float>() : nullptr;
  const Dropout drop = has_residual ? Dropout(attrs, in->at(2)) : Dropout();
  float* xhat = out->at(0).data<float>();
  float* rstd = out->at(1).data<float>();
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    float* row = xhat + i * d;
    if (has_residual) {
      for (int64_t j = 0; j < d; ++j) row[j] = x[i * d + j] + h[i * d + j] * drop.keep(i * d + j);
    } else {
      std::memcpy(row, x + i * d, d * sizeof(float));
    }
    rstd[i] = normalize_row(row, d, eps);
  }
  return MX_SUCCESS;
}

// in: d_xhat, d_rstd, inputs..., xhat, rstd. out: dx, [dh, dctrl].
MXReturnValue add_dropout_norm_backward(const Attrs& attrs, std::vector<MXTensor>* in, std::vector<MXTensor>* out,
                                        const OpResource&) {
  const bool has_residual = out->size() == 3;
  const size_t num_inputs = out->size();
  const float* g = in->at(0).data<float>();
  const float* xhat = in->at(2 + num_inputs).data<float>();
  const float* rstd = in->at(3 + num_inputs).data<float>();
  const int64_t d = in->at(0).shape.back(), n = rows_of(in->at(0));
  float* dx = out->at(0).data<float>();
  const Dropout drop = has_residual ? Dropout(attrs, in->at(4)) : Dropout();
  float* dh = has_residual ? out->at(1).data<float>() : nullptr;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    normalize_row_backward(g + i * d, xhat + i * d, rstd[i], d, dx + i * d);
    if (has_residual) {
      for (int64_t j = 0; j < d; ++j) dh[i * d + j] = dx[i * d + j] * drop.keep(i * d + j);
    }
  }
  if (has_residual) zero(&out->at(2));
  return MX_SUCCESS;
}

MXReturnValue add_dropout_forward(const Attrs& attrs, std::vector<MXTensor>* in, std::vector<MXTensor>* out,
                                  const OpResource&) {
  const int64_t size = in->at(0).size();
  const float* x = in->at(0).data<float>();
  const float* h = in->at(1).data<float>();
  const Dropout drop(attrs, in->at(2));
  float* s = out->at(0).data<float>();
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < size; ++i) s[i] = x[i] + h[i] * drop.keep(i);
  return MX_SUCCESS;
}

// in: d_s, x, h, ctrl, s. out: dx, dh, dctrl.
MXReturnValue add_dropout_backward(const Attrs& attrs, std::vector<MXTensor>* in, std::vector<MXTensor>* out,
                                   const OpResource&) {
  const int64_t size = in->at(0).size();
  const float* g = in->at(0).data<float>();
  const Dropout drop(attrs, in->at(3));
  float* dx = out->at(0).data<float>();
  float* dh = out->at(1).data<float>();
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < size; ++i) {
    dx[i] = g[i];
    dh[i] = g[i] * drop.keep(i);
  }
  zero(&out->at(2));
  return MX_SUCCESS;
}

// ---------------------------------------------------------------------------------------------------------------
// dn_attention(q, k, v, lengths, ctrl; p, scale) -> (context, probs).
// q (BH, T, dk), k (BH, S, dk), v (BH, S, dv), lengths (BH, T) float: query t sees keys s < lengths[bh, t]
// (clipped to [1, S]; a causal mask is lengths t+1). probs (BH, T, S) is the softmax before dropout (zero where
// masked); context = dropout(probs) @ v. One (bh) slice per OpenMP iteration.

struct AttentionDims {
  int64_t bh, t, s, dk, dv;
  explicit AttentionDims(std::vector<MXTensor>* in, size_t first = 0)
      : bh(in->at(first).shape[0]), t(in->at(first).shape[1]), s(in->at(first + 1).shape[1]),
        dk(in->at(first).shape[2]), dv(in->at(first + 2).shape[2]) {}
};

inline int64_t valid_keys(float length, int64_t s) {
  const int64_t len = static_cast<int64_t>(length);
  return len < 1 ? 1 : (len > s ? s : len);
}

inline float dot(const float* a, const float* b, int64_t n) {
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

inline void axpy(float alpha, const float* x, float* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

MXReturnValue attention_forward(const Attrs& attrs, std::vector<MXTensor>* in, std::vector<MXTensor>* out,
                                const OpResource&) {
  const AttentionDims dim(in);
  const float scale = attr_float(attrs, "scale", 1.0f);
  const float *q = in->at(0).data<float>(), *k = in->at(1).data<float>(), *v = in->at(2).data<float>();
  const float* lengths = in->at(3).data<float>();
  const Dropout drop(attrs, in->at(4));
  float* ctx = out->at(0).data<float>();
  float* probs = out->at(1).data<float>();
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < dim.bh; ++b) {
    const float *qb = q + b * dim.t * dim.dk, *kb = k + b * dim.s * dim.dk, *vb = v + b * dim.s * dim.dv;
    for (int64_t t = 0; t < dim.t; ++t) {
      const int64_t row = b * dim.t + t, len = valid_keys(lengths[row], dim.s);
      float* p = probs + row * dim.s;
      float top = -INFINITY;
      for (int64_t s = 0; s < len; ++s) {
        p[s] = dot(qb + t * dim.dk, kb + s * dim.dk, dim.dk) * scale;
        top = std::max(top, p[s]);
      }
      float sum = 0.0f;
      for (int64_t s = 0; s < len; ++s) sum += (p[s] = std::exp(p[s] - top));
      const float inv = 1.0f / sum;
      float* c = ctx + row * dim.dv;
      std::memset(c, 0, dim.dv * sizeof(float));
      for (int64_t s = 0; s < len; ++s) {
        p[s] *= inv;
        axpy(p[s] * drop.keep(row * dim.s + s), vb + s * dim.dv, c, dim.dv);
      }
      for (int64_t s = len; s < dim.s; ++s) p[s] = 0.0f;
    }
  }
  return MX_SUCCESS;
}

// in: d_ctx, d_probs (ignored), q, k, v, lengths, ctrl, ctx, probs. out: dq, dk, dv, dlengths, dctrl.
MXReturnValue attention_backward(const Attrs& attrs, std::vector<MXTensor>* in, std::vector<MXTensor>* out,
                                 const OpResource&) {
  const AttentionDims dim(in, 2);
  const float scale = attr_float(attrs, "scale", 1.0f);
  const float* g = in->at(0).data<float>();
  const float *q = in->at(2).data<float>(), *k = in->at(3).data<float>(), *v = in->at(4).data<float>();
  const float* lengths = in->at(5).data<float>();
  const Dropout drop(attrs, in->at(6));
  const float* probs = in->at(8).data<float>();
  float *dq = out->at(0).data<float>(), *dk = out->at(1).data<float>(), *dv = out->at(2).data<float>();
#pragma omp parallel
  {
    std::vector<float> dscore(dim.s);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < dim.bh; ++b) {
      const float *qb = q + b * dim.t * dim.dk, *kb = k + b * dim.s * dim.dk, *vb = v + b * dim.s * dim.dv;
      float *dqb = dq + b * dim.t * dim.dk, *dkb = dk + b * dim.s * dim.dk, *dvb = dv + b * dim.s * dim.dv;
      std::memset(dkb, 0, dim.s * dim.dk * sizeof(float));
      std::memset(dvb, 0, dim.s * dim.dv * sizeof(float));
      for (int64_t t = 0; t < dim.t; ++t) {
        const int64_t row = b * dim.t + t, len = valid_keys(lengths[row], dim.s);
        const float *p = probs + row * dim.s, *gt = g + row * dim.dv;
        float weighted = 0.0f;
        for (int64_t s = 0; s < len; ++s) {
          const float keep = drop.keep(row * dim.s + s);
          axpy(p[s] * keep, gt, dvb + s * dim.dv, dim.dv);  // dv += dropout(p)^T g
          dscore[s] = dot(gt, vb + s * dim.dv, dim.dv) * keep;  // d(probs before dropout)
          weighted += dscore[s] * p[s];
        }
        float* dqt = dqb + t * dim.dk;
        std::memset(dqt, 0, dim.dk * sizeof(float));
        for (int64_t s = 0; s < len; ++s) {
          const float ds = p[s] * (dscore[s] - weighted) * scale;  // softmax backward, then the scale
          axpy(ds, kb + s * dim.dk, dqt, dim.dk);
          axpy(ds, qb + t * dim.dk, dkb + s * dim.dk, dim.dk);
        }
      }
    }
  }
  zero(&out->at(3));
  zero(&out->at(4));
  return MX_SUCCESS;
}

// ---------------------------------------------------------------------------------------------------------------
// dn_additive_score(q, k, v) -> scores: scores[b, t, s] = sum_a v[a] tanh(q[b, t, a] + k[b, s, a]), the additive
// (Bahdanau) attention score of the GNMT decoder without its (B, T, S, A) hidden tensor. q (B, T, A) (query
// projection, bias included), k (B, S, A), v (A,) -> scores (B, T, S). v must be an intermediate of the graph (a
// reshape or the weight-normalised vector), never the Parameter itself: dv is written, not added. Backward
// recomputes tanh. Masking is left to the softmax that follows; backward skips (t, s) pairs whose incoming gradient
// is exactly 0 (masked keys under a length softmax).

// tanh as Eigen's odd rational 13/6 minimax approximation (also XLA's and MLAS's): vectorises under omp simd where
// std::tanh does not; within a few float ulps of tanh, and exactly +-1 past the clamp where float tanh rounds to 1.
inline float fast_tanh(float x) {
  constexpr float clamp = 7.90531110763549805f;
  x = std::min(std::max(x, -clamp), clamp);
  const float x2 = x * x;
  float p = -2.76076847742355e-16f;
  p = p * x2 + 2.00018790482477e-13f;
  p = p * x2 - 8.60467152213735e-11f;
  p = p * x2 + 5.12229709037114e-08f;
  p = p * x2 + 1.48572235717979e-05f;
  p = p * x2 + 6.37261928875436e-04f;
  p = p * x2 + 4.89352455891786e-03f;
  float q = 1.19825839466702e-06f;
  q = q * x2 + 1.18534705686654e-04f;
  q = q * x2 + 2.26843463243900e-03f;
  q = q * x2 + 4.89352518554385e-03f;
  return x * p / q;
}

struct ScoreDims {
  int64_t b, t, s, a;
  explicit ScoreDims(std::vector<MXTensor>* in, size_t first = 0)
      : b(in->at(first).shape[0]), t(in->at(first).shape[1]), s(in->at(first + 1).shape[1]),
        a(in->at(first).shape[2]) {}
};

// One OpenMP iteration per (b, t) query row.
MXReturnValue additive_score_forward(const Attrs&, std::vector<MXTensor>* in, std::vector<MXTensor>* out,
                                     const OpResource&) {
  const ScoreDims dim(in);
  const float *q = in->at(0).data<float>(), *k = in->at(1).data<float>(), *v = in->at(2).data<float>();
  float* scores = out->at(0).data<float>();
#pragma omp parallel for schedule(static)
  for (int64_t row = 0; row < dim.b * dim.t; ++row) {
    const float *qr = q + row * dim.a, *kb = k + (row / dim.t) * dim.s * dim.a;
    for (int64_t s = 0; s < dim.s; ++s) {
      const float* ks = kb + s * dim.a;
      float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
      for (int64_t a = 0; a < dim.a; ++a) acc += v[a] * fast_tanh(qr[a] + ks[a]);
      scores[row * dim.s + s] = acc;
    }
  }
  return MX_SUCCESS;
}

// in: d_scores, q, k, v, scores. out: dq, dk, dv. With h = tanh(q_t + k_s) and g = d_scores[b, t, s]:
// dq[b, t] = v * sum_s g (1 - h^2), dk[b, s] = v * sum_t g (1 - h^2), dv = sum_{b,t,s} g h.
// One OpenMP iteration per batch row b, so each thread owns dq and dk of its rows (tanh is computed once, no atomics);
// dv is summed per thread, then over threads.
MXReturnValue additive_score_backward(const Attrs&, std::vector<MXTensor>* in, std::vector<MXTensor>* out,
                                      const OpResource&) {
  const ScoreDims dim(in, 1);
  const float* g = in->at(0).data<float>();
  const float *q = in->at(1).data<float>(), *k = in->at(2).data<float>(), *v = in->at(3).data<float>();
  float *dq = out->at(0).data<float>(), *dk = out->at(1).data<float>(), *dv = out->at(2).data<float>();
  const int num_threads = omp_get_max_threads();
  std::vector<float> dv_parts(static_cast<size_t>(num_threads) * dim.a, 0.0f);
#pragma omp parallel
  {
    float* dv_part = dv_parts.data() + static_cast<size_t>(omp_get_thread_num()) * dim.a;
    std::vector<float> dpre_sum(dim.a);  // sum_s g (1 - h^2) of one query row
#pragma omp for schedule(static)
    for (int64_t b = 0; b < dim.b; ++b) {
      const float* kb = k + b * dim.s * dim.a;
      float* dkb = dk + b * dim.s * dim.a;
      std::memset(dkb, 0, dim.s * dim.a * sizeof(float));
      for (int64_t t = 0; t < dim.t; ++t) {
        const int64_t row = b * dim.t + t;
        const float *qr = q + row * dim.a, *gr = g + row * dim.s;
        float* acc = dpre_sum.data();
        std::fill(acc, acc + dim.a, 0.0f);
        for (int64_t s = 0; s < dim.s; ++s) {
          const float gs = gr[s];
          if (gs == 0.0f) continue;  // masked key: contributes nothing
          const float* ks = kb + s * dim.a;
          float* dks = dkb + s * dim.a;
#pragma omp simd
          for (int64_t a = 0; a < dim.a; ++a) {
            const float h = fast_tanh(qr[a] + ks[a]);
            const float dpre = gs * (1.0f - h * h);
            dv_part[a] += gs * h;
            acc[a] += dpre;
            dks[a] += dpre * v[a];
          }
        }
        float* dqr = dq + row * dim.a;
#pragma omp simd
        for (int64_t a = 0; a < dim.a; ++a) dqr[a] = acc[a] * v[a];
      }
    }
  }
  std::memset(dv, 0, dim.a * sizeof(float));
  for (int i = 0; i < num_threads; ++i) axpy(1.0f, dv_parts.data() + static_cast<size_t>(i) * dim.a, dv, dim.a);
  return MX_SUCCESS;
}

// ---------------------------------------------------------------------------------------------------------------
// dn_smoothed_nll(logits, labels; eps) -> (loss, nll, lse), one row at a time so nothing (N, V) is stored besides
// the logits: logits (N, V), labels (N,) float ids. nll = lse - x[label]; loss = (1-eps) nll + eps (lse - mean x)
// (the uniform-smoothed cross-entropy of dist_nmt/loss.py). Backward recomputes softmax from logits and lse; the
// gradient of lse is ignored (callers use it only for its value).

inline int64_t label_of(float label, int64_t v) {
  const int64_t id = static_cast<int64_t>(label);
  return id < 0 ? 0 : (id >= v ? v - 1 : id);
}

MXReturnValue smoothed_nll_forward(const Attrs& attrs, std::vector<MXTensor>* in, std::vector<MXTensor>* out,
                                   const OpResource&) {
  const float eps = attr_float(attrs, "eps", 0.0f);
  const int64_t v = in->at(0).shape.back(), n = rows_of(in->at(0));
  const float* x = in->at(0).data<float>();
  const float* labels = in->at(1).data<float>();
  float *loss = out->at(0).data<float>(), *nll = out->at(1).data<float>(), *lse = out->at(2).data<float>();
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const float* row = x + i * v;
    float top = -INFINITY;
    double total = 0.0, sum_exp = 0.0;
    for (int64_t j = 0; j < v; ++j) top = std::max(top, row[j]);
#pragma omp simd reduction(+ : total, sum_exp)
    for (int64_t j = 0; j < v; ++j) {
      total += row[j];
      sum_exp += std::exp(row[j] - top);
    }
    lse[i] = top + static_cast<float>(std::log(sum_exp));
    nll[i] = lse[i] - row[label_of(labels[i], v)];
    loss[i] = (1.0f - eps) * nll[i] + eps * (lse[i] - static_cast<float>(total / v));
  }
  return MX_SUCCESS;
}

// in: d_loss, d_nll, d_lse (ignored), logits, labels, loss, nll, lse. out: dlogits, dlabels.
MXReturnValue smoothed_nll_backward(const Attrs& attrs, std::vector<MXTensor>* in, std::vector<MXTensor>* out,
                                    const OpResource&) {
  const float eps = attr_float(attrs, "eps", 0.0f);
  const float *g_loss = in->at(0).data<float>(), *g_nll = in->at(1).data<float>();
  const float* x = in->at(3).data<float>();
  const float* labels = in->at(4).data<float>();
  const float* lse = in->at(7).data<float>();
  const int64_t v = in->at(3).shape.back(), n = rows_of(in->at(3));
  float* dx = out->at(0).data<float>();
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const float g = g_loss[i] + g_nll[i], uniform = g_loss[i] * eps / v;
    const float *row = x + i * v;
    float* drow = dx + i * v;
#pragma omp simd
    for (int64_t j = 0; j < v; ++j) drow[j] = g * std::exp(row[j] - lse[i]) - uniform;
    drow[label_of(labels[i], v)] -= g_loss[i] * (1.0f - eps) + g_nll[i];
  }
  zero(&out->at(1));
  return MX_SUCCESS;
}

// ---------------------------------------------------------------------------------------------------------------
// Shape/type inference and registration.

MXReturnValue all_float32(const Attrs&, std::vector<int>* in_types, std::vector<int>* out_types) {
  for (size_t i = 0; i < in_types->size(); ++i) {
    if (in_types->at(i) != kFloat32) {
      MX_ERROR_MSG << "dist_nmt fused op: input " << i << " must be float32 (cast it, or use model.fused_ops=off)";
      return MX_FAIL;
    }
  }
  for (auto& t : *out_types) t = kFloat32;
  return MX_SUCCESS;
}

bool same_shape(const std::vector<std::vector<unsigned int>>& shapes, size_t a, size_t b) {
  return shapes.at(a) == shapes.at(b);
}

// Inputs and outputs of each op (lib_api's parseAttrs callback; none of the ops has a variable count).
template <int kInputs, int kOutputs>
MXReturnValue parse_io(const Attrs&, int* num_in, int* num_out) {
  *num_in = kInputs;
  *num_out = kOutputs;
  return MX_SUCCESS;
}

MXReturnValue shape_smoothed_nll(const Attrs&, std::vector<std::vector<unsigned int>>* in,
                                 std::vector<std::vector<unsigned int>>* out) {
  std::vector<unsigned int> rows(in->at(0).begin(), in->at(0).end() - 1);
  if (in->at(0).size() < 2 || in->at(1) != rows) {
    MX_ERROR_MSG << "dn_smoothed_nll: expected logits (..., V) and labels (...)";
    return MX_FAIL;
  }
  for (auto& o : *out) o = rows;
  return MX_SUCCESS;
}

MXReturnValue shape_norm(const Attrs&, std::vector<std::vector<unsigned int>>* in,
                         std::vector<std::vector<unsigned int>>* out) {
  if (in->size() == 3 && (!same_shape(*in, 0, 1) || in->at(2) != std::vector<unsigned int>{3})) {
    MX_ERROR_MSG << "dn_add_dropout_norm: x and h must have one shape and ctrl shape (3,)";
    return MX_FAIL;
  }
  std::vector<unsigned int> rows = in->at(0);
  rows.back() = 1;
  out->at(0) = in->at(0);
  out->at(1) = rows;
  return MX_SUCCESS;
}

MXReturnValue shape_add_dropout(const Attrs&, std::vector<std::vector<unsigned int>>* in,
                                std::vector<std::vector<unsigned int>>* out) {
  if (!same_shape(*in, 0, 1) || in->at(2) != std::vector<unsigned int>{3}) {
    MX_ERROR_MSG << "dn_add_dropout: x and h must have one shape and ctrl shape (3,)";
    return MX_FAIL;
  }
  out->at(0) = in->at(0);
  return MX_SUCCESS;
}

MXReturnValue shape_attention(const Attrs&, std::vector<std::vector<unsigned int>>* in,
                              std::vector<std::vector<unsigned int>>* out) {
  const auto &q = in->at(0), &k = in->at(1), &v = in->at(2), &len = in->at(3);
  if (q.size() != 3 || k.size() != 3 || v.size() != 3 || k[0] != q[0] || v[0] != q[0] || k[2] != q[2] ||
      v[1] != k[1] || len != std::vector<unsigned int>{q[0], q[1]} || in->at(4) != std::vector<unsigned int>{3}) {
    MX_ERROR_MSG << "dn_attention: expected q (BH,T,dk), k (BH,S,dk), v (BH,S,dv), lengths (BH,T), ctrl (3,)";
    return MX_FAIL;
  }
  out->at(0) = {q[0], q[1], v[2]};
  out->at(1) = {q[0], q[1], k[1]};
  return MX_SUCCESS;
}

MXReturnValue shape_additive_score(const Attrs&, std::vector<std::vector<unsigned int>>* in,
                                   std::vector<std::vector<unsigned int>>* out) {
  const auto &q = in->at(0), &k = in->at(1), &v = in->at(2);
  if (q.size() != 3 || k.size() != 3 || k[0] != q[0] || k[2] != q[2] || v != std::vector<unsigned int>{q[2]}) {
    MX_ERROR_MSG << "dn_additive_score: expected q (B,T,A), k (B,S,A), v (A,)";
    return MX_FAIL;
  }
  out->at(0) = {q[0], q[1], k[1]};
  return MX_SUCCESS;
}

}  // namespace

REGISTER_OP(dn_add_dropout_norm)
    .setForward(add_dropout_norm_forward, "cpu")
    .setBackward(add_dropout_norm_backward, "cpu")
    .setParseAttrs(parse_io<3, 2>)
    .setInferType(all_float32)
    .setInferShape(shape_norm);

REGISTER_OP(dn_norm)
    .setForward(add_dropout_norm_forward, "cpu")
    .setBackward(add_dropout_norm_backward, "cpu")
    .setParseAttrs(parse_io<1, 2>)
    .setInferType(all_float32)
    .setInferShape(shape_norm);

REGISTER_OP(dn_add_dropout)
    .setForward(add_dropout_forward, "cpu")
    .setBackward(add_dropout_backward, "cpu")
    .setParseAttrs(parse_io<3, 1>)
    .setInferType(all_float32)
    .setInferShape(shape_add_dropout);

REGISTER_OP(dn_attention)
    .setForward(attention_forward, "cpu")
    .setBackward(attention_backward, "cpu")
    .setParseAttrs(parse_io<5, 2>)
    .setInferType(all_float32)
    .setInferShape(shape_attention);

REGISTER_OP(dn_additive_score)
    .setForward(additive_score_forward, "cpu")
    .setBackward(additive_score_backward, "cpu")
    .setParseAttrs(parse_io<3, 1>)
    .setInferType(all_float32)
    .setInferShape(shape_additive_score);

REGISTER_OP(dn_smoothed_nll)
    .setForward(smoothed_nll_forward, "cpu")
    .setBackward(smoothed_nll_backward, "cpu")
    .setParseAttrs(parse_io<2, 3>)
    .setInferType(all_float32)
    .setInferShape(shape_smoothed_nll);

MXReturnValue initialize(int version) {
  if (version >= 10900) return MX_SUCCESS;
  MX_ERROR_MSG << "dist_nmt ops need MXNet >= 1.9.0, found " << version;
  return MX_FAIL;
}
