// MoE routing (threads over tokens) and alignment (stable counting sort by expert). See moe.h.
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu/moe.h"
#include "cpu/parallel.h"

namespace kernswap {
namespace cpu {
namespace {

// a ranks above b: larger value first, NaN above everything (like torch.topk); equal values keep the
// lower expert id first because the scan goes in id order and only a strictly better value replaces.
inline bool better(float a, float b) {
  if (std::isnan(a)) return !std::isnan(b);
  return a > b;
}

// top_k distinct ids of key[0, E), best first; taken[] is scratch of size E.
void select_topk(const float* key, int64_t E, int64_t k, int32_t* ids, unsigned char* taken) {
  std::memset(taken, 0, static_cast<size_t>(E));
  for (int64_t s = 0; s < k; ++s) {
    int64_t best = -1;
    for (int64_t e = 0; e < E; ++e) {
      if (taken[e]) continue;
      if (best < 0 || better(key[e], key[best])) best = e;
    }
    taken[best] = 1;
    ids[s] = static_cast<int32_t>(best);
  }
}

void route_token(const float* l, int64_t E, int64_t k, MoEScoring scoring, bool renormalize, const float* bias,
                 float* w, int32_t* ids, float* key, unsigned char* taken) {
  if (scoring == MoEScoring::SoftmaxTopk) {
    float mx = -INFINITY;
    for (int64_t e = 0; e < E; ++e) mx = l[e] > mx ? l[e] : mx;
    float sum = 0.f;
    for (int64_t e = 0; e < E; ++e) {
      key[e] = std::exp(l[e] - mx);
      sum += key[e];
    }
    for (int64_t e = 0; e < E; ++e) key[e] = key[e] / sum;
    select_topk(key, E, k, ids, taken);
    for (int64_t s = 0; s < k; ++s) w[s] = key[ids[s]];
  } else if (scoring == MoEScoring::TopkSoftmax) {
    select_topk(l, E, k, ids, taken);
    const float mx = l[ids[0]];
    float sum = 0.f;
    for (int64_t s = 0; s < k; ++s) {
      w[s] = std::exp(l[ids[s]] - mx);
      sum += w[s];
    }
    for (int64_t s = 0; s < k; ++s) w[s] = w[s] / sum;
  } else {
    for (int64_t e = 0; e < E; ++e) key[e] = 1.f / (1.f + std::exp(-l[e]));
    if (bias) {
      std::vector<float> biased(static_cast<size_t>(E));
      for (int64_t e = 0; e < E; ++e) biased[e] = key[e] + bias[e];
      select_topk(biased.data(), E, k, ids, taken);
    } else {
      select_topk(key, E, k, ids, taken);
    }
    for (int64_t s = 0; s < k; ++s) w[s] = key[ids[s]];
  }
  if (renormalize) {
    float sum = 0.f;
    for (int64_t s = 0; s < k; ++s) sum += w[s];
    for (int64_t s = 0; s < k; ++s) w[s] = w[s] / sum;
  }
}

}  // namespace

void moe_route(const float* logits, int64_t T, int64_t E, int64_t ld, int64_t top_k, MoEScoring scoring,
               bool renormalize, const float* bias, float* weights, int32_t* ids, int num_threads) {
  if (T <= 0 || E <= 0 || top_k <= 0 || top_k > E) return;
  const int threads = T * E >= (1 << 15) ? num_threads : 1;
  parallel_for(T, threads, [&](int64_t b, int64_t e) {
    std::vector<float> key(static_cast<size_t>(E));
    std::vector<unsigned char> taken(static_cast<size_t>(E));
    for (int64_t t = b; t < e; ++t)
      route_token(logits + t * ld, E, top_k, scoring, renormalize, bias, weights + t * top_k, ids + t * top_k,
                  key.data(), taken.data());
  });
}

int64_t moe_align(const int32_t* ids, int64_t P, int64_t E, int32_t* sorted, int32_t* offsets) {
  std::vector<int64_t> count(static_cast<size_t>(E) + 1, 0);
  int64_t bad = 0;
  for (int64_t p = 0; p < P; ++p) {
    const int32_t e = ids[p];
    if (e < 0 || e >= E) {
      ++bad;
      continue;
    }
    ++count[e + 1];
  }
  for (int64_t e = 0; e < E; ++e) count[e + 1] += count[e];
  for (int64_t e = 0; e <= E; ++e) offsets[e] = static_cast<int32_t>(count[e]);
  for (int64_t p = 0; p < P; ++p) {
    const int32_t e = ids[p];
    if (e >= 0 && e < E) sorted[count[e]++] = static_cast<int32_t>(p);
  }
  for (int64_t i = offsets[E]; i < P; ++i) sorted[i] = static_cast<int32_t>(P);  // sentinel for left-out pairs
  return bad;
}

}  // namespace cpu
}  // namespace kernswap
