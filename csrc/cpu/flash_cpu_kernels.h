// The CPU kernels' body, compiled once per instruction set: flash_cpu.cpp includes this file
// inside `namespace flash::cpu::<isa>` under a `#pragma GCC target(...)` per ISA, so the same
// source yields a baseline x86-64 build and an AVX2+FMA+F16C build chosen at run time. No
// include guard on purpose.
//
// The algorithm is FlashAttention-2's: the forward walks the keys of a block of kBlockM query
// rows in tiles of kBlockN with an online softmax (no seqlen_q x seqlen_k buffer); the backward
// recomputes the probabilities from softmax_lse. Tiles are widened to float32 once.
//
// Vectorization. Every matrix product goes through gemm(), a 4-row register-blocked
// micro-kernel on GCC/Clang vector values (Vec8): left to the auto-vectorizer, its 16-wide
// tile spilled its accumulators to the stack and ran ~40% slower. Every other inner loop (tile
// loads and conversions, score scaling/softcap/ALiBi/masking, the polynomial exp, row max/sum,
// rescaling, stores) is a plain loop over a contiguous row that GCC auto-vectorizes; checked
// with -O3 -fopt-info-vec-optimized (and -missed for the ones that were not, e.g. the exp loop
// until its clamp became an integer select).
//
// Work is spread through the ParallelFor the binding passes (torch's intra-op pool), items
// handed out dynamically (parallel() below):
//   forward  over (batch, kv head, block of (query row, head of the GQA group) pairs);
//   backward pass 1 over (batch, kv head, key block): dK and dV, summed over the query heads
//            of the GQA group, so no two workers write the same row;
//   backward pass 2 over (batch, query head, query block): dQ and per-item dsinks partials,
//            reduced afterwards in a fixed order.
// The backward is therefore deterministic whatever `deterministic` says.

constexpr int kBlockM = 128;  // query rows per work item (a multiple of 4)
constexpr int kBlockN = 64;  // keys per tile (a multiple of 16)
constexpr float kInf = std::numeric_limits<float>::infinity();

// ---- element types ----------------------------------------------------------------------

struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

inline float to_float(float x) { return x; }
inline float to_float(BFloat16 x) { return bits_to_float(static_cast<uint32_t>(x.bits) << 16); }
inline float to_float(Half x) {
#if defined(FLASH_CPU_F16C) && defined(__FLT16_MAX__)  // the compiler has _Float16
  return static_cast<float>(__builtin_bit_cast(_Float16, x.bits));  // vcvtph2ps
#else
  const uint32_t sign = static_cast<uint32_t>(x.bits & 0x8000u) << 16;
  const uint32_t exp = (x.bits >> 10) & 0x1Fu;
  const uint32_t mant = x.bits & 0x3FFu;
  if (exp == 0x1Fu) return bits_to_float(sign | 0x7F800000u | (mant << 13));  // inf / nan
  if (exp != 0) return bits_to_float(sign | ((exp + 112u) << 23) | (mant << 13));
  // zero or subnormal: mant * 2^-24
  const float magnitude = static_cast<float>(mant) * 5.9604644775390625e-8f;
  return sign ? -magnitude : magnitude;
#endif
}

template <typename T>
T from_float(float x);

template <>
inline float from_float<float>(float x) {
  return x;
}
template <>
inline BFloat16 from_float<BFloat16>(float x) {
  const uint32_t u = float_to_bits(x);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;  // round to nearest even
  const uint32_t quiet_nan = (u >> 16) | 0x40u;
  // a select rather than a branch, so store loops vectorize
  return BFloat16{static_cast<uint16_t>((u & 0x7FFFFFFFu) > 0x7F800000u ? quiet_nan : rounded)};
}
template <>
inline Half from_float<Half>(float x) {
#if defined(FLASH_CPU_F16C) && defined(__FLT16_MAX__)  // the compiler has _Float16
  return Half{__builtin_bit_cast(uint16_t, static_cast<_Float16>(x))};  // vcvtps2ph, nearest even
#else
  const uint32_t u = float_to_bits(x);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t abs = u & 0x7FFFFFFFu;
  if (abs > 0x7F800000u) return Half{static_cast<uint16_t>(sign | 0x7E00u)};
  if (abs >= 0x477FF000u) return Half{static_cast<uint16_t>(sign | 0x7C00u)};  // rounds to >= 65520: inf
  if (abs < 0x38800000u) {
    // subnormal half: round abs * 2^24 to the nearest integer (ties to even, as rint does)
    const float scaled = bits_to_float(abs) * 16777216.0f;
    return Half{static_cast<uint16_t>(sign | static_cast<uint16_t>(std::nearbyint(scaled)))};
  }
  uint32_t r = abs + 0xFFFu + ((abs >> 13) & 1u);  // round mantissa to 10 bits, ties to even
  r -= 112u << 23;                                 // rebias the exponent 127 -> 15
  return Half{static_cast<uint16_t>(sign | (r >> 13))};
#endif
}

// ---- per-sequence geometry ---------------------------------------------------------------

// Where sequence b's rows live and how many of them there are.
struct Seq {
  int64_t q_row0 = 0;  // first row of q / out / dq (varlen: offset into total_q)
  int len_q = 0;
  int len_k = 0;       // keys the sequence attends over (after leftpad, seqused_k)
  int64_t k_row0 = 0;  // first physical key row (dense or varlen; paged: first logical row)
  int kv_batch = 0;    // batch index into k / v (cache_batch_idx)
};

Seq sequence(const FlashFwdParams& p, int b) {
  Seq s;
  if (p.cu_seqlens_q) {
    s.q_row0 = p.cu_seqlens_q[b];
    s.len_q = p.cu_seqlens_q[b + 1] - p.cu_seqlens_q[b];
  } else {
    s.q_row0 = static_cast<int64_t>(b) * p.seqlen_q;
    s.len_q = p.seqlen_q;
  }
  int end_k = p.seqlen_k;
  if (p.seqused_k) {
    end_k = p.seqused_k[b];
  } else if (p.cu_seqlens_k) {
    end_k = p.cu_seqlens_k[b + 1] - p.cu_seqlens_k[b];
  }
  const int start_k = p.leftpad_k ? p.leftpad_k[b] : 0;
  s.len_k = std::max(0, end_k - start_k);
  s.k_row0 = start_k;
  if (p.cu_seqlens_k && !p.block_table) s.k_row0 += p.cu_seqlens_k[b];
  s.kv_batch = p.cache_batch_idx ? p.cache_batch_idx[b] : b;
  return s;
}

// Element offset of logical key j of sequence b (kv head hk) in a k- or v-like tensor.
inline int64_t key_offset(const FlashFwdParams& p, const Seq& s, int b, int64_t j, int hk, int64_t batch_stride,
                          int64_t row_stride, int64_t head_stride) {
  const int64_t t = s.k_row0 + j;
  if (p.block_table) {
    const int64_t page = p.block_table[static_cast<int64_t>(b) * p.block_table_batch_stride + t / p.page_size];
    return page * batch_stride + (t % p.page_size) * row_stride + hk * head_stride;
  }
  if (p.cu_seqlens_k) return t * row_stride + hk * head_stride;
  return static_cast<int64_t>(s.kv_batch) * batch_stride + t * row_stride + hk * head_stride;
}

// Element offset of query row i of sequence b, head h, in a q-like tensor.
inline int64_t query_offset(const FlashFwdParams& p, const Seq& s, int b, int64_t i, int h, int64_t batch_stride,
                            int64_t row_stride, int64_t head_stride) {
  if (p.cu_seqlens_q) return (s.q_row0 + i) * row_stride + h * head_stride;
  return static_cast<int64_t>(b) * batch_stride + i * row_stride + h * head_stride;
}

inline int64_t lse_index(const FlashFwdParams& p, const Seq& s, int b, int h, int64_t i) {
  if (p.cu_seqlens_q) return static_cast<int64_t>(h) * p.total_q + s.q_row0 + i;
  return (static_cast<int64_t>(b) * p.heads_q + h) * p.seqlen_q + i;
}

// The score modifiers shared by forward and backward, for one (sequence, query head).
struct RowMask {
  int diag = 0;     // len_k - len_q: bottom-right alignment
  int wl = -1, wr = -1;
  int len_k = 0;
  // Keys [lo, hi) that query row i sees.
  int lo(int i) const { return wl < 0 ? 0 : std::max(0, i + diag - wl); }
  int hi(int i) const { return wr < 0 ? len_k : std::min(len_k, i + diag + wr + 1); }
};

RowMask row_mask(const FlashFwdParams& p, const Seq& s) {
  RowMask m;
  m.diag = s.len_k - s.len_q;
  m.wl = p.window_left;
  m.wr = p.is_causal ? 0 : p.window_right;
  m.len_k = s.len_k;
  return m;
}

inline float alibi_slope(const FlashFwdParams& p, int b, int h) {
  return p.alibi_slopes ? p.alibi_slopes[static_cast<int64_t>(b) * p.alibi_batch_stride + h] : 0.0f;
}

// Scaled, soft-capped, biased scores of row i against keys [n0, n0 + kBlockN): `raw` holds
// q.k on entry and the final logits on exit (-inf where masked); `capped` keeps the
// soft-capped value divided by softcap (tanh), which the backward's chain rule needs.
inline void finish_scores(const FlashFwdParams& p, const RowMask& m, float slope, int i, int n0, float* raw,
                          float* tanh_out) {
  // one simple loop per modifier, so each vectorizes on its own
  const float scale = p.softmax_scale;
  for (int j = 0; j < kBlockN; ++j) raw[j] *= scale;
  if (p.softcap > 0.0f) {
    const float cap = p.softcap, inv_cap = 1.0f / p.softcap;
    for (int j = 0; j < kBlockN; ++j) {
      const float t = std::tanh(raw[j] * inv_cap);
      if (tanh_out) tanh_out[j] = t;
      raw[j] = cap * t;
    }
  }
  const int base = i + m.diag - n0;  // distance of column j: |base - j|
  if (slope != 0.0f)
    for (int j = 0; j < kBlockN; ++j) raw[j] -= slope * static_cast<float>(std::abs(base - j));
  const int lo = m.lo(i) - n0, hi = m.hi(i) - n0;
  for (int j = 0; j < kBlockN; ++j) raw[j] = (j >= lo && j < hi) ? raw[j] : -kInf;
}

// exp(x) for x <= 0 (softmax arguments), branch-free so loops over it vectorize: Cephes'
// expf range reduction and degree-6 polynomial (about 1 ulp); exactly 0 below -87.
inline float exp_nonpos(float x) {
  // The clamp and the final select work on the bits: for x <= 0 (and NaN, which then
  // propagates), x > -87 <=> bits(x) < bits(-87) as unsigned. Integer selects vectorize where
  // GCC refuses to if-convert float compares (they may trap).
  const uint32_t bits = __builtin_bit_cast(uint32_t, x);
  const uint32_t kMinBits = 0xC2AE0000u;  // -87.0f
  const uint32_t valid = bits < kMinBits ? 0xFFFFFFFFu : 0u;
  const float clamped = __builtin_bit_cast(float, (bits & valid) | (kMinBits & ~valid));
  // round to nearest through the 1.5 * 2^23 shifter (no libm call)
  const float n = (clamped * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = clamped - n * 0.693359375f + n * 2.12194440e-4f;
  float poly = 1.9875691500e-4f;
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  poly = poly * r * r + r + 1.0f;
  const float scale = __builtin_bit_cast(float, (static_cast<int32_t>(n) + 127) << 23);
  return __builtin_bit_cast(float, __builtin_bit_cast(uint32_t, poly * scale) & valid);
}

// out[j] = exp(x[j] - sub) over kBlockN floats, for x[j] <= sub.
inline void exp_row(const float* x, float sub, float* out) {
  for (int j = 0; j < kBlockN; ++j) out[j] = exp_nonpos(x[j] - sub);
}

// max and sum over kBlockN floats through 8 independent lanes (vectorizable without -ffast-math).
inline float row_max(const float* x) {
  float lane[8];
  for (int u = 0; u < 8; ++u) lane[u] = x[u];
  for (int j = 8; j < kBlockN; j += 8)
    for (int u = 0; u < 8; ++u) lane[u] = lane[u] > x[j + u] ? lane[u] : x[j + u];
  float m = lane[0];
  for (int u = 1; u < 8; ++u) m = m > lane[u] ? m : lane[u];
  return m;
}

inline float row_sum(const float* x) {
  float lane[8] = {};
  for (int j = 0; j < kBlockN; j += 8)
    for (int u = 0; u < 8; ++u) lane[u] += x[j + u];
  return ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
}

// Dropout keep flags of row i against keys [n0, n0 + kBlockN).
inline void dropout_row(const FlashFwdParams& p, uint32_t threshold, int64_t bh, int i, int n0, bool* keep) {
  for (int j = 0; j < kBlockN; j += 4) {
    const Philox4 r = dropout_randoms(p.philox_seed, p.philox_offset, bh, i, n0 + j);
    keep[j] = r.x >= threshold;
    keep[j + 1] = r.y >= threshold;
    keep[j + 2] = r.z >= threshold;
    keep[j + 3] = r.w >= threshold;
  }
}

// Loads keys [n0, n0 + kBlockN) of (b, hk) as float: transposed (D x kBlockN) into kt and,
// when krow is set, row-major (kBlockN x D) into krow. Keys past len_k are zero.
template <typename T>
void load_keys(const FlashFwdParams& p, const Seq& s, int b, int hk, int n0, const T* base, int64_t bs, int64_t rs,
               int64_t hs, float* kt, float* krow) {
  const int d = p.head_dim;
  for (int j = 0; j < kBlockN; ++j) {
    const int col = n0 + j;
    if (col < s.len_k) {
      const T* src = base + key_offset(p, s, b, col, hk, bs, rs, hs);
      for (int c = 0; c < d; ++c) kt[c * kBlockN + j] = to_float(src[c]);
      if (krow)
        for (int c = 0; c < d; ++c) krow[j * d + c] = to_float(src[c]);
    } else {
      for (int c = 0; c < d; ++c) kt[c * kBlockN + j] = 0.0f;
      if (krow) std::fill(krow + j * d, krow + (j + 1) * d, 0.0f);
    }
  }
}

template <typename T>
void load_row(const T* src, float* dst, int d) {
  for (int c = 0; c < d; ++c) dst[c] = to_float(src[c]);
}

template <typename T>
void store_row(const float* src, float scale, T* dst, int d) {
  for (int c = 0; c < d; ++c) dst[c] = from_float<T>(src[c] * scale);
}

int num_blocks(int n, int block) { return (n + block - 1) / block; }

int round_up4(int n) { return (n + 3) & ~3; }

// ---- matrix products -----------------------------------------------------------------------

// Eight floats as one GCC/Clang vector value (an AVX register, or two SSE ones in the baseline
// build); unaligned and alias-safe, so it can view any float row.
typedef float Vec8 __attribute__((vector_size(32), aligned(4), may_alias));

// C[4 x W] (+)= A[4 x K] * B[K x W], W = 8 * V: 4 x V accumulators that stay in registers while
// one row of B is streamed per step of K.
template <int V>
inline void gemm_tile(int K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
                      bool accumulate) {
  Vec8 acc[4][V];
  for (int r = 0; r < 4; ++r)
    for (int v = 0; v < V; ++v)
      acc[r][v] = accumulate ? *reinterpret_cast<const Vec8*>(C + r * ldc + 8 * v) : Vec8{};
  for (int c = 0; c < K; ++c) {
    Vec8 b[V];
    for (int v = 0; v < V; ++v) b[v] = *reinterpret_cast<const Vec8*>(B + c * ldb + 8 * v);
    for (int r = 0; r < 4; ++r) {
      const float a = A[r * lda + c];
      for (int v = 0; v < V; ++v) acc[r][v] += a * b[v];
    }
  }
  for (int r = 0; r < 4; ++r)
    for (int v = 0; v < V; ++v) *reinterpret_cast<Vec8*>(C + r * ldc + 8 * v) = acc[r][v];
}

// C[M x N] (+)= A[M x K] * B[K x N], row-major with the given row strides; M % 4 == 0, N % 8 == 0.
inline void gemm(int M, int N, int K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
                 bool accumulate) {
  for (int m = 0; m < M; m += 4) {
    int n = 0;
    for (; n + 16 <= N; n += 16) gemm_tile<2>(K, A + m * lda, lda, B + n, ldb, C + m * ldc + n, ldc, accumulate);
    for (; n < N; n += 8) gemm_tile<1>(K, A + m * lda, lda, B + n, ldb, C + m * ldc + n, ldc, accumulate);
  }
}

// Loads rows [i0, i0 + rows) of (b, h) from a q-like tensor into a kBlockM x d float tile,
// zero-filling the rows up to round_up4(rows).
template <typename T>
void load_query_tile(const FlashFwdParams& p, const Seq& s, int b, int h, int i0, int rows, const void* base,
                     int64_t bs, int64_t rs, int64_t hs, float* dst) {
  const int d = p.head_dim;
  for (int r = 0; r < rows; ++r)
    load_row(static_cast<const T*>(base) + query_offset(p, s, b, i0 + r, h, bs, rs, hs), dst + r * d, d);
  std::fill(dst + rows * d, dst + round_up4(rows) * d, 0.0f);
}

// Loads keys [n0, n0 + kBlockN) of (b, hk) row-major (kBlockN x d); keys past len_k are zero.
template <typename T>
void load_key_rows(const FlashFwdParams& p, const Seq& s, int b, int hk, int n0, const void* base, int64_t bs,
                   int64_t rs, int64_t hs, float* dst) {
  const int d = p.head_dim;
  for (int j = 0; j < kBlockN; ++j) {
    if (n0 + j < s.len_k) {
      load_row(static_cast<const T*>(base) + key_offset(p, s, b, n0 + j, hk, bs, rs, hs), dst + j * d, d);
    } else {
      std::fill(dst + j * d, dst + (j + 1) * d, 0.0f);
    }
  }
}

// Per-thread scratch reused across work items, so a tile costs no allocation (fresh buffers of
// this size would go through mmap/munmap and page faults on every item).
class Arena {
 public:
  explicit Arena(int head_dim) {
    const size_t floats = 4 * static_cast<size_t>(kBlockM) * head_dim + 4 * static_cast<size_t>(kBlockN) * head_dim +
                          4 * static_cast<size_t>(kBlockM) * kBlockN + 4 * static_cast<size_t>(kBlockM);
    thread_local std::vector<float> buffer;
    if (buffer.size() < floats) buffer.resize(floats);
    next_ = buffer.data();
    end_ = buffer.data() + floats;
  }
  float* take(size_t n) {
    if (next_ + n > end_) throw std::logic_error("flash cpu: scratch arena too small");
    float* p = next_;
    next_ += n;
    return p;
  }
  float* zeros(size_t n) {
    float* p = take(n);
    std::fill(p, p + n, 0.0f);
    return p;
  }

 private:
  float* next_;
  float* end_;
};

struct Dropout {
  bool on;
  uint32_t threshold;
  float keep_scale;  // 1 / (1 - p)
  explicit Dropout(float p)
      : on(p > 0.0f), threshold(dropout_threshold(p)), keep_scale(p > 0.0f ? 1.0f / (1.0f - p) : 1.0f) {}
};

// ---- forward -----------------------------------------------------------------------------

// One work item: kBlockM rows of (query row i, query head h) pairs of one sequence that share
// the KV head hk, row t <-> (i = t / group, h = hk * group + t % group) ("pack GQA"), so every
// key tile is loaded and widened once for the whole group (decoding with GQA/MQA is mostly that).
template <typename T>
struct Forward {
  const FlashFwdParams& p;
  int m_blocks;  // row blocks per (batch, kv head), from the longest sequence

  void run_item(int64_t item) const {
    const int mb = static_cast<int>(item % m_blocks);
    const int hk = static_cast<int>((item / m_blocks) % p.heads_kv);
    const int b = static_cast<int>(item / (static_cast<int64_t>(m_blocks) * p.heads_kv));
    const int group = p.heads_q / p.heads_kv;
    const Seq s = sequence(p, b);
    const int t0 = mb * kBlockM;
    const int total_rows = s.len_q * group;
    if (t0 >= total_rows) return;
    const int rows = std::min(total_rows - t0, kBlockM);
    const int rows4 = round_up4(rows);
    const int d = p.head_dim;
    const RowMask mask = row_mask(p, s);
    const Dropout drop(p.dropout_p);

    Arena arena(d);
    float* q = arena.take(static_cast<size_t>(kBlockM) * d);
    float* acc = arena.zeros(static_cast<size_t>(kBlockM) * d);
    float* kt = arena.take(static_cast<size_t>(d) * kBlockN);
    float* v = arena.take(static_cast<size_t>(kBlockN) * d);
    float* score = arena.take(static_cast<size_t>(kBlockM) * kBlockN);
    float* maxes = arena.take(kBlockM);
    float* sums = arena.zeros(kBlockM);
    std::fill(maxes, maxes + kBlockM, -kInf);
    bool keep[kBlockN];

    const T* qb = static_cast<const T*>(p.q);
    for (int r = 0; r < rows; ++r) {
      const int t = t0 + r;
      load_row(qb + query_offset(p, s, b, t / group, hk * group + t % group, p.q_batch_stride, p.q_row_stride,
                                 p.q_head_stride),
               q + static_cast<size_t>(r) * d, d);
    }
    std::fill(q + static_cast<size_t>(rows) * d, q + static_cast<size_t>(rows4) * d, 0.0f);
    // mask bounds grow with the query row, so the block's key range is lo(first) .. hi(last)
    const int lo = mask.lo(t0 / group), hi = mask.hi((t0 + rows - 1) / group);
    for (int n0 = (lo / kBlockN) * kBlockN; n0 < hi; n0 += kBlockN) {
      load_keys(p, s, b, hk, n0, static_cast<const T*>(p.k), p.k_batch_stride, p.k_row_stride, p.k_head_stride,
                kt, nullptr);
      load_key_rows<T>(p, s, b, hk, n0, p.v, p.v_batch_stride, p.v_row_stride, p.v_head_stride, v);
      gemm(rows4, kBlockN, d, q, d, kt, kBlockN, score, kBlockN, false);
      for (int r = 0; r < rows4; ++r) {
        float* srow = &score[static_cast<size_t>(r) * kBlockN];
        const int i = (t0 + r) / group, h = hk * group + (t0 + r) % group;
        if (r >= rows || mask.hi(i) <= n0 || mask.lo(i) >= n0 + kBlockN) {
          std::fill(srow, srow + kBlockN, 0.0f);
          continue;
        }
        finish_scores(p, mask, alibi_slope(p, b, h), i, n0, srow, nullptr);
        const float tile_max = row_max(srow);
        if (tile_max == -kInf) {
          std::fill(srow, srow + kBlockN, 0.0f);
          continue;
        }
        const float new_max = std::max(maxes[r], tile_max);
        const float correction = std::exp(maxes[r] - new_max);
        maxes[r] = new_max;
        float* a = acc + static_cast<size_t>(r) * d;
        for (int c = 0; c < d; ++c) a[c] *= correction;
        exp_row(srow, new_max, srow);
        sums[r] = sums[r] * correction + row_sum(srow);
        if (drop.on) {
          // dropped after the sum: the normalizer counts every probability
          dropout_row(p, drop.threshold, static_cast<int64_t>(b) * p.heads_q + h, i, n0, keep);
          for (int j = 0; j < kBlockN; ++j) srow[j] = keep[j] ? srow[j] : 0.0f;
        }
      }
      gemm(rows4, d, kBlockN, score, kBlockN, v, d, acc, d, true);
    }

    T* ob = static_cast<T*>(p.out);
    for (int r = 0; r < rows; ++r) {
      const int i = (t0 + r) / group, h = hk * group + (t0 + r) % group;
      float lse = kInf;
      float inv = 0.0f;
      if (sums[r] > 0.0f) {
        float mx = maxes[r], sum = sums[r];
        if (p.sinks) {
          const float sink = p.sinks[h];
          const float m2 = std::max(mx, sink);
          sum = sum * std::exp(mx - m2) + std::exp(sink - m2);
          inv = std::exp(mx - m2) / sum;
          mx = m2;
        } else {
          inv = 1.0f / sum;
        }
        lse = mx + std::log(sum);
      }
      store_row(acc + static_cast<size_t>(r) * d, inv * drop.keep_scale,
                ob + query_offset(p, s, b, i, h, p.o_batch_stride, p.o_row_stride, p.o_head_stride), d);
      p.softmax_lse[lse_index(p, s, b, h, i)] = lse;
    }
  }
};

// ---- backward ----------------------------------------------------------------------------

// Probabilities and score gradients of one query row against one key tile, shared by both
// backward passes. `score` holds q.k and `grad` dO.v on entry; on exit prob[j] = P (before
// dropout) and grad[j] = dS with respect to q.k (softmax_scale and the softcap chain rule
// included).
inline void score_grads(const FlashFwdParams& p, const RowMask& mask, float slope, int i, int n0, float lse,
                        float delta, const Dropout& drop, const bool* keep, float* score, float* tanh_buf,
                        float* grad, float* prob) {
  finish_scores(p, mask, slope, i, n0, score, p.softcap > 0.0f ? tanh_buf : nullptr);
  exp_row(score, lse, prob);
  for (int j = 0; j < kBlockN; ++j) {
    float dp = grad[j];
    if (drop.on) {
      const float kept = dp * drop.keep_scale;
      dp = keep[j] ? kept : 0.0f;
    }
    float ds = prob[j] * (dp - delta);
    if (p.softcap > 0.0f) ds *= 1.0f - tanh_buf[j] * tanh_buf[j];
    grad[j] = ds * p.softmax_scale;
  }
}

template <typename T>
struct Backward {
  const FlashBwdParams& p;
  int m_blocks, n_blocks;

  // Rows [i0, i0 + rows) of (b, h): q, dout, lse and delta = rowsum(dO * O).
  struct QueryTile {
    float *q, *dout, *lse, *delta;
    QueryTile(Arena& arena, int d)
        : q(arena.take(static_cast<size_t>(kBlockM) * d)), dout(arena.take(static_cast<size_t>(kBlockM) * d)),
          lse(arena.take(kBlockM)), delta(arena.take(kBlockM)) {}
  };

  void load_query(const Seq& s, int b, int h, int i0, int rows, QueryTile& t) const {
    const int d = p.head_dim;
    load_query_tile<T>(p, s, b, h, i0, rows, p.q, p.q_batch_stride, p.q_row_stride, p.q_head_stride, t.q);
    load_query_tile<T>(p, s, b, h, i0, rows, p.dout, p.do_batch_stride, p.do_row_stride, p.do_head_stride,
                       t.dout);
    for (int r = 0; r < rows; ++r) {
      const int i = i0 + r;
      t.lse[r] = p.softmax_lse[lse_index(p, s, b, h, i)];
      const T* o = static_cast<const T*>(p.out) + query_offset(p, s, b, i, h, p.o_batch_stride, p.o_row_stride,
                                                               p.o_head_stride);
      const float* dout = &t.dout[static_cast<size_t>(r) * d];
      float sum = 0.0f;
      for (int c = 0; c < d; ++c) sum += dout[c] * to_float(o[c]);
      t.delta[r] = sum;
    }
  }

  // Pass 1: dK, dV of keys [n0, n0 + kBlockN) of (b, hk).
  void dkdv_item(int64_t item) const {
    const int nb = static_cast<int>(item % n_blocks);
    const int hk = static_cast<int>((item / n_blocks) % p.heads_kv);
    const int b = static_cast<int>(item / (static_cast<int64_t>(n_blocks) * p.heads_kv));
    const Seq s = sequence(p, b);
    const int n0 = nb * kBlockN;
    if (n0 >= s.len_k) return;
    const int n1 = std::min(s.len_k, n0 + kBlockN);
    const int d = p.head_dim;
    const int group = p.heads_q / p.heads_kv;
    const RowMask mask = row_mask(p, s);
    const Dropout drop(p.dropout_p);

    Arena arena(d);
    float* kt = arena.take(static_cast<size_t>(d) * kBlockN);
    float* vt = arena.take(static_cast<size_t>(d) * kBlockN);
    float* dk = arena.zeros(static_cast<size_t>(kBlockN) * d);
    float* dv = arena.zeros(static_cast<size_t>(kBlockN) * d);
    float* score = arena.take(static_cast<size_t>(kBlockM) * kBlockN);
    float* grad = arena.take(static_cast<size_t>(kBlockM) * kBlockN);
    // P (after dropout) and dS, transposed: kBlockN x kBlockM
    float* pt = arena.take(static_cast<size_t>(kBlockN) * kBlockM);
    float* dst = arena.take(static_cast<size_t>(kBlockN) * kBlockM);
    QueryTile tile(arena, d);
    float tanh_buf[kBlockN], prob[kBlockN];
    bool keep[kBlockN];
    load_keys(p, s, b, hk, n0, static_cast<const T*>(p.k), p.k_batch_stride, p.k_row_stride, p.k_head_stride,
              kt, nullptr);
    load_keys(p, s, b, hk, n0, static_cast<const T*>(p.v), p.v_batch_stride, p.v_row_stride, p.v_head_stride,
              vt, nullptr);

    for (int h = hk * group; h < (hk + 1) * group; ++h) {
      const float slope = alibi_slope(p, b, h);
      const int64_t bh = static_cast<int64_t>(b) * p.heads_q + h;
      for (int i0 = 0; i0 < s.len_q; i0 += kBlockM) {
        const int rows = std::min(s.len_q - i0, kBlockM);
        if (mask.hi(i0 + rows - 1) <= n0 || mask.lo(i0) >= n1) continue;
        const int rows4 = round_up4(rows);
        load_query(s, b, h, i0, rows, tile);
        gemm(rows4, kBlockN, d, tile.q, d, kt, kBlockN, score, kBlockN, false);
        gemm(rows4, kBlockN, d, tile.dout, d, vt, kBlockN, grad, kBlockN, false);
        for (int r = 0; r < rows4; ++r) {
          const int i = i0 + r;
          if (r >= rows || tile.lse[r] == kInf || mask.hi(i) <= n0 || mask.lo(i) >= n1) {
            for (int j = 0; j < kBlockN; ++j) pt[j * kBlockM + r] = dst[j * kBlockM + r] = 0.0f;
            continue;
          }
          float* g = &grad[static_cast<size_t>(r) * kBlockN];
          if (drop.on) dropout_row(p, drop.threshold, bh, i, n0, keep);
          score_grads(p, mask, slope, i, n0, tile.lse[r], tile.delta[r], drop, keep,
                      &score[static_cast<size_t>(r) * kBlockN], tanh_buf, g, prob);
          for (int j = 0; j < kBlockN; ++j) {
            const float kept = prob[j] * drop.keep_scale;
            const float pd = drop.on ? (keep[j] ? kept : 0.0f) : prob[j];
            pt[j * kBlockM + r] = pd;
            dst[j * kBlockM + r] = g[j];
          }
        }
        gemm(kBlockN, d, rows4, pt, kBlockM, tile.dout, d, dv, d, true);
        gemm(kBlockN, d, rows4, dst, kBlockM, tile.q, d, dk, d, true);
      }
    }
    T* dkb = static_cast<T*>(p.dk);
    T* dvb = static_cast<T*>(p.dv);
    for (int j = 0; j < n1 - n0; ++j) {
      store_row(&dk[static_cast<size_t>(j) * d], 1.0f,
                dkb + key_offset(p, s, b, n0 + j, hk, p.dk_batch_stride, p.dk_row_stride, p.dk_head_stride), d);
      store_row(&dv[static_cast<size_t>(j) * d], 1.0f,
                dvb + key_offset(p, s, b, n0 + j, hk, p.dv_batch_stride, p.dv_row_stride, p.dv_head_stride), d);
    }
  }

  // Pass 2: dQ of query rows [i0, i0 + kBlockM) of (b, h); returns this item's dsinks partial.
  float dq_item(int64_t item) const {
    const int mb = static_cast<int>(item % m_blocks);
    const int h = static_cast<int>((item / m_blocks) % p.heads_q);
    const int b = static_cast<int>(item / (static_cast<int64_t>(m_blocks) * p.heads_q));
    const Seq s = sequence(p, b);
    const int i0 = mb * kBlockM;
    if (i0 >= s.len_q) return 0.0f;
    const int rows = std::min(s.len_q - i0, kBlockM);
    const int rows4 = round_up4(rows);
    const int d = p.head_dim;
    const int hk = h / (p.heads_q / p.heads_kv);
    const RowMask mask = row_mask(p, s);
    const float slope = alibi_slope(p, b, h);
    const int64_t bh = static_cast<int64_t>(b) * p.heads_q + h;
    const Dropout drop(p.dropout_p);

    Arena arena(d);
    QueryTile tile(arena, d);
    float* dq = arena.zeros(static_cast<size_t>(kBlockM) * d);
    float* kt = arena.take(static_cast<size_t>(d) * kBlockN);
    float* krow = arena.take(static_cast<size_t>(kBlockN) * d);
    float* vt = arena.take(static_cast<size_t>(d) * kBlockN);
    float* score = arena.take(static_cast<size_t>(kBlockM) * kBlockN);
    float* grad = arena.take(static_cast<size_t>(kBlockM) * kBlockN);
    float tanh_buf[kBlockN], prob[kBlockN];
    bool keep[kBlockN];

    load_query(s, b, h, i0, rows, tile);
    float dsink = 0.0f;
    if (p.sinks) {
      // d lse / d sink = P(sink) and d out / d sink = -P(sink) * out, so dL/dsink = -P(sink) * delta.
      for (int r = 0; r < rows; ++r)
        if (tile.lse[r] != kInf) dsink -= std::exp(p.sinks[h] - tile.lse[r]) * tile.delta[r];
    }
    const int lo = mask.lo(i0), hi = mask.hi(i0 + rows - 1);
    for (int n0 = (lo / kBlockN) * kBlockN; n0 < hi; n0 += kBlockN) {
      load_keys(p, s, b, hk, n0, static_cast<const T*>(p.k), p.k_batch_stride, p.k_row_stride, p.k_head_stride,
                kt, krow);
      load_keys(p, s, b, hk, n0, static_cast<const T*>(p.v), p.v_batch_stride, p.v_row_stride, p.v_head_stride,
                vt, nullptr);
      gemm(rows4, kBlockN, d, tile.q, d, kt, kBlockN, score, kBlockN, false);
      gemm(rows4, kBlockN, d, tile.dout, d, vt, kBlockN, grad, kBlockN, false);
      for (int r = 0; r < rows4; ++r) {
        const int i = i0 + r;
        float* g = &grad[static_cast<size_t>(r) * kBlockN];
        if (r >= rows || tile.lse[r] == kInf || mask.hi(i) <= n0 || mask.lo(i) >= n0 + kBlockN) {
          std::fill(g, g + kBlockN, 0.0f);
          continue;
        }
        if (drop.on) dropout_row(p, drop.threshold, bh, i, n0, keep);
        score_grads(p, mask, slope, i, n0, tile.lse[r], tile.delta[r], drop, keep,
                    &score[static_cast<size_t>(r) * kBlockN], tanh_buf, g, prob);
      }
      gemm(rows4, d, kBlockN, grad, kBlockN, krow, d, dq, d, true);
    }
    T* dqb = static_cast<T*>(p.dq);
    for (int r = 0; r < rows; ++r)
      store_row(&dq[static_cast<size_t>(r) * d], 1.0f,
                dqb + query_offset(p, s, b, i0 + r, h, p.dq_batch_stride, p.dq_row_stride, p.dq_head_stride), d);
    return dsink;
  }
};

// ---- entry points --------------------------------------------------------------------------

// Runs fn(item) for every item in [0, n) on the pool. Items are handed out one at a time from a
// shared counter (dynamic scheduling: causal masks make their costs uneven), last item first
// when `heavy_last` says the costly ones sit at the end. Each item's result does not depend
// on the thread that runs it, so the output is deterministic.
template <typename F>
void parallel(ParallelFor parallel_for, int64_t n, bool heavy_last, const F& fn) {
  if (n <= 0) return;
  struct Work {
    const F& fn;
    int64_t n;
    bool reverse;
    std::atomic<int64_t> next{0};
  } work{fn, n, heavy_last};
  parallel_for(n, &work, [](void* ctx, int64_t, int64_t) {
    Work& w = *static_cast<Work*>(ctx);
    for (int64_t i = w.next.fetch_add(1); i < w.n; i = w.next.fetch_add(1)) w.fn(w.reverse ? w.n - 1 - i : i);
  });
}

int max_len_q(const FlashFwdParams& p) {
  int m = 0;
  for (int b = 0; b < p.batch; ++b) m = std::max(m, sequence(p, b).len_q);
  return m;
}

int max_len_k(const FlashFwdParams& p) {
  int m = 0;
  for (int b = 0; b < p.batch; ++b) m = std::max(m, sequence(p, b).len_k);
  return m;
}

template <typename T>
void fwd_typed(const FlashFwdParams& p, ParallelFor parallel_for) {
  const Forward<T> f{p, num_blocks(max_len_q(p) * (p.heads_q / p.heads_kv), kBlockM)};
  // later query blocks see more keys under a causal mask: hand them out first
  parallel(parallel_for, static_cast<int64_t>(p.batch) * p.heads_kv * f.m_blocks, /*heavy_last=*/true,
           [&](int64_t item) { f.run_item(item); });
}

template <typename T>
void bwd_typed(const FlashBwdParams& p, ParallelFor parallel_for) {
  const Backward<T> bw{p, num_blocks(max_len_q(p), kBlockM), num_blocks(max_len_k(p), kBlockN)};
  parallel(parallel_for, static_cast<int64_t>(p.batch) * p.heads_kv * bw.n_blocks, /*heavy_last=*/false,
           [&](int64_t item) { bw.dkdv_item(item); });
  const int64_t items = static_cast<int64_t>(p.batch) * p.heads_q * bw.m_blocks;
  std::vector<float> dsink_parts(p.sinks ? items : 0, 0.0f);
  parallel(parallel_for, items, /*heavy_last=*/true, [&](int64_t item) {
    const float part = bw.dq_item(item);
    if (p.sinks) dsink_parts[item] = part;
  });
  if (p.sinks && p.dsinks) {
    // a fixed-order reduction keeps dsinks bit-identical across thread counts
    for (int h = 0; h < p.heads_q; ++h) p.dsinks[h] = 0.0f;
    for (int64_t item = 0; item < items; ++item) p.dsinks[(item / bw.m_blocks) % p.heads_q] += dsink_parts[item];
  }
}

void run_fwd(const FlashFwdParams& p, ParallelFor parallel_for) {
  switch (p.dtype) {
    case DType::kFloat32: return fwd_typed<float>(p, parallel_for);
    case DType::kFloat16: return fwd_typed<Half>(p, parallel_for);
    case DType::kBFloat16: return fwd_typed<BFloat16>(p, parallel_for);
  }
  throw std::invalid_argument("unsupported dtype");
}

void run_bwd(const FlashBwdParams& p, ParallelFor parallel_for) {
  switch (p.dtype) {
    case DType::kFloat32: return bwd_typed<float>(p, parallel_for);
    case DType::kFloat16: return bwd_typed<Half>(p, parallel_for);
    case DType::kBFloat16: return bwd_typed<BFloat16>(p, parallel_for);
  }
  throw std::invalid_argument("unsupported dtype");
}
