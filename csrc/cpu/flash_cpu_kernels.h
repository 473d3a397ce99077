// The CPU kernels' body, compiled once per instruction set: flash_cpu.cpp includes this file
// inside `namespace flash::cpu::<isa>` under a `#pragma GCC target(...)` per ISA, so the same
// source yields a baseline x86-64 build and an AVX2+FMA+F16C build chosen at run time. No
// include guard on purpose.
//
// The algorithm is FlashAttention-2's: the forward walks the keys of a block of query rows in
// tiles with an online softmax (no seqlen_q x seqlen_k buffer); the backward recomputes the
// probabilities from softmax_lse. Tiles are widened to float32 once.
//
// Vectorization. The forward's products are register-tiled micro-kernels (qk_tile, pv_tile:
// 6 x 16 float accumulators on AVX2) over packed tiles, its softmax explicit Vec8 code with a
// polynomial exp2; see the forward section. The backward's products go through gemm(), a 4-row
// register-blocked micro-kernel on GCC/Clang vector values (Vec8): left to the auto-vectorizer,
// its 16-wide tile spilled its accumulators to the stack and ran ~40% slower. The backward's
// other inner loops (tile loads and conversions, score scaling/softcap/ALiBi/masking, the
// polynomial exp, rescaling, stores) are plain loops over a contiguous row that GCC
// auto-vectorizes; checked with -O3 -fopt-info-vec-optimized (and -missed for the ones that
// were not, e.g. the exp loop until its clamp became an integer select).
//
// Work is spread through the ParallelFor the binding passes (torch's intra-op pool), items
// handed out dynamically (parallel() below):
//   forward  over (batch, kv head, block of (query row, head of the GQA group) pairs);
//   backward pass 1 over (batch, kv head, key block): dK and dV, summed over the query heads
//            of the GQA group, so no two workers write the same row;
//   backward pass 2 over (batch, query head, query block): dQ and per-item dsinks partials,
//            reduced afterwards in a fixed order.
// The backward is therefore deterministic whatever `deterministic` says.

constexpr int kBlockM = 128;  // backward: query rows per work item (a multiple of 4)
constexpr int kBlockN = 64;  // backward: keys per tile (a multiple of 16)
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

// Scaled, soft-capped, biased scores of row i against keys n0 + [j0, j1): `raw` holds q.k on
// entry and the final logits on exit (-inf where masked); `tanh_out` keeps the soft-capped value
// divided by softcap (tanh), which the backward's chain rule needs.
inline void finish_scores(const FlashFwdParams& p, const RowMask& m, float slope, int i, int n0, int j0, int j1,
                          float* raw, float* tanh_out) {
  // one simple loop per modifier, so each vectorizes on its own
  const float scale = p.softmax_scale;
  for (int j = j0; j < j1; ++j) raw[j] *= scale;
  if (p.softcap > 0.0f) {
    const float cap = p.softcap, inv_cap = 1.0f / p.softcap;
    for (int j = j0; j < j1; ++j) {
      const float t = std::tanh(raw[j] * inv_cap);
      if (tanh_out) tanh_out[j] = t;
      raw[j] = cap * t;
    }
  }
  const int base = i + m.diag - n0;  // distance of column j: |base - j|
  if (slope != 0.0f)
    for (int j = j0; j < j1; ++j) raw[j] -= slope * static_cast<float>(std::abs(base - j));
  const int lo = m.lo(i) - n0, hi = m.hi(i) - n0;
  for (int j = j0; j < j1; ++j) raw[j] = (j >= lo && j < hi) ? raw[j] : -kInf;
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

// Dropout keep flags of row i against keys n0 + [j0, j1) (j0, j1 multiples of 4).
inline void dropout_row(const FlashFwdParams& p, uint32_t threshold, int64_t bh, int i, int n0, int j0, int j1,
                        bool* keep) {
  for (int j = j0; j < j1; j += 4) {
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

// Per-thread scratch reused across work items, so a tile costs no allocation (fresh buffers of
// this size would go through mmap/munmap and page faults on every item). Pieces start on 64-byte
// boundaries, so vector loads do not straddle cache lines.
class Arena {
 public:
  static constexpr size_t kAlign = 16;  // floats

  explicit Arena(size_t floats) {
    thread_local std::vector<float> buffer;
    if (buffer.size() < floats + kAlign) buffer.resize(floats + kAlign);
    const uintptr_t addr = reinterpret_cast<uintptr_t>(buffer.data());
    next_ = buffer.data() + ((64 - addr % 64) % 64) / sizeof(float);
    end_ = buffer.data() + buffer.size();
  }
  float* take(size_t n) {
    n = (n + kAlign - 1) / kAlign * kAlign;
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

// Scratch floats a backward work item takes.
size_t bwd_scratch_floats(int d) {
  return 4 * static_cast<size_t>(kBlockM) * d + 4 * static_cast<size_t>(kBlockN) * d +
         4 * static_cast<size_t>(kBlockM) * kBlockN + 4 * static_cast<size_t>(kBlockM) + 16 * Arena::kAlign;
}

struct Dropout {
  bool on;
  uint32_t threshold;
  float keep_scale;  // 1 / (1 - p)
  explicit Dropout(float p)
      : on(p > 0.0f), threshold(dropout_threshold(p)), keep_scale(p > 0.0f ? 1.0f / (1.0f - p) : 1.0f) {}
};

// ---- forward -----------------------------------------------------------------------------
//
// A work item is a block of block_m rows of (query row, head of the GQA group) pairs that
// share a KV head; it walks its keys in tiles of kFwdBlockN. Each key tile is widened to float
// once per item and packed so the micro-kernels read it sequentially: K transposed in panels of
// kPanelCols keys ([key panel][d][kPanelCols]), V in panels of kPanelCols head-dim columns
// ([column panel][key][kPanelCols], the head dim padded to a multiple of kPanelCols). The rows
// are then taken kPanelRows at a time: S = Q K^T into a small buffer that stays in L1, the
// online softmax on it, and O = O * correction + P V. Both products are register tiles of
// kPanelRows x kPanelCols float accumulators; a panel computes only the key columns its rows
// can see (in steps of kPanelCols), and the mask is applied only where a panel crosses a mask
// edge. Rows of q, k, v and out are prefetched a few rows ahead of their loads and stores: they
// sit heads apart in memory, where the hardware prefetchers do not follow.

#if defined(FLASH_CPU_AVX2)
constexpr int kPanelRows = 6;  // 6 x 2 accumulators + 2 values of V or K^T + 1 broadcast: 15 of 16 ymm
#else
constexpr int kPanelRows = 3;  // SSE: each Vec8 takes two of the 16 xmm registers
#endif
constexpr int kPanelCols = 16;   // two Vec8
// Rows per work item, at most: every item reads and packs all the keys its rows see, from rows
// heads apart in memory (a TLB miss and a cache miss per key row), so large items pay off.
constexpr int kFwdMaxBlockM = 1536;
constexpr int kFwdBlockN = 128;  // keys per tile: a multiple of kPanelCols
// Floats between V's column panels: a cache line more than a panel, so the panels' rows do not
// sit 4 KiB apart (loads and stores 4 KiB apart falsely depend on each other).
constexpr int kVPanelStride = kFwdBlockN * kPanelCols + 16;
constexpr float kLog2e = 1.4426950408889634f;

typedef int32_t Vec8i __attribute__((vector_size(32), aligned(4), may_alias));

inline Vec8 load8(const float* p) { return *reinterpret_cast<const Vec8*>(p); }
inline void store8(float* p, Vec8 v) { *reinterpret_cast<Vec8*>(p) = v; }

// Transposes the 8 x 8 block r[0..7] in place (unpack, shuffle, then swap 128-bit halves).
inline void transpose8(Vec8* r) {
  const Vec8i lo = {0, 8, 1, 9, 4, 12, 5, 13}, hi = {2, 10, 3, 11, 6, 14, 7, 15};
  const Vec8i lo2 = {0, 1, 8, 9, 4, 5, 12, 13}, hi2 = {2, 3, 10, 11, 6, 7, 14, 15};
  const Vec8i first = {0, 1, 2, 3, 8, 9, 10, 11}, second = {4, 5, 6, 7, 12, 13, 14, 15};
  Vec8 t[8], u[8];
  for (int k = 0; k < 8; k += 2) {
    t[k] = __builtin_shuffle(r[k], r[k + 1], lo);
    t[k + 1] = __builtin_shuffle(r[k], r[k + 1], hi);
  }
  for (int k = 0; k < 8; k += 4) {
    u[k] = __builtin_shuffle(t[k], t[k + 2], lo2);
    u[k + 1] = __builtin_shuffle(t[k], t[k + 2], hi2);
    u[k + 2] = __builtin_shuffle(t[k + 1], t[k + 3], lo2);
    u[k + 3] = __builtin_shuffle(t[k + 1], t[k + 3], hi2);
  }
  for (int k = 0; k < 4; ++k) {
    r[k] = __builtin_shuffle(u[k], u[k + 4], first);
    r[k + 4] = __builtin_shuffle(u[k], u[k + 4], second);
  }
}

// 2^t for t <= 0, eight at a time: t = n + f with n = round(t), Cephes' exp2f polynomial for 2^f
// on [-0.5, 0.5] (about 2 ulp), 2^n built in the exponent bits. t is clamped to -127, where the
// exponent field becomes 0 and the result exactly 0 (so -inf, a masked score, gives 0); NaN
// passes through the clamp and stays NaN.
inline Vec8 exp2_nonpos(Vec8 t) {
  const Vec8 lowest = Vec8{} - 127.0f;
#if defined(FLASH_CPU_AVX2)
  t = __builtin_ia32_maxps256(lowest, t);  // vmaxps keeps its second operand when one is NaN
#else
  t = lowest > t ? lowest : t;  // a NaN t is kept
#endif
  // 1.5 * 2^23 + 127: round(t) + 127 lands in the low mantissa bits, ready to be shifted into
  // the exponent field (the constant's own bits shift out)
  constexpr float kShifter = 12583039.0f;
  const Vec8 shifted = t + kShifter;
  const Vec8 f = t - (shifted - kShifter);
  Vec8 poly = f * 1.535336188319500e-4f + 1.339887440266574e-3f;
  poly = poly * f + 9.618437357674640e-3f;
  poly = poly * f + 5.550332471162809e-2f;
  poly = poly * f + 2.402264791363012e-1f;
  poly = poly * f + 6.931472028550421e-1f;
  poly = poly * f + 1.0f;
  const Vec8i exponent = reinterpret_cast<const Vec8i&>(shifted) << 23;
  return poly * reinterpret_cast<const Vec8&>(exponent);
}

// Max and sum of the eight lanes, as trees of three shuffles (a lane-by-lane scalar loop takes
// about three times the instructions).
inline Vec8 swap_halves(Vec8 v) { return __builtin_shuffle(v, Vec8i{4, 5, 6, 7, 0, 1, 2, 3}); }
inline Vec8 swap_pairs(Vec8 v) { return __builtin_shuffle(v, Vec8i{2, 3, 0, 1, 6, 7, 4, 5}); }
inline Vec8 swap_neighbours(Vec8 v) { return __builtin_shuffle(v, Vec8i{1, 0, 3, 2, 5, 4, 7, 6}); }
inline Vec8 vmax(Vec8 a, Vec8 b) { return a > b ? a : b; }
inline float hmax8(Vec8 v) {
  v = vmax(v, swap_halves(v));
  v = vmax(v, swap_pairs(v));
  return vmax(v, swap_neighbours(v))[0];
}
inline float hsum8(Vec8 v) {
  v += swap_halves(v);
  v += swap_pairs(v);
  return (v + swap_neighbours(v))[0];
}

// S[R x 16] = Q panel (packed [d][R]) . K^T panel (packed [d][16]).
template <int R>
inline void qk_tile(int d, const float* qp, const float* kp, float* s, int lds) {
  Vec8 acc0[R], acc1[R];
  for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = Vec8{};
  for (int c = 0; c < d; ++c) {
    const Vec8 b0 = load8(kp + c * kPanelCols), b1 = load8(kp + c * kPanelCols + 8);
    for (int r = 0; r < R; ++r) {
      const float a = qp[c * R + r];
      acc0[r] += a * b0;
      acc1[r] += a * b1;
    }
  }
  for (int r = 0; r < R; ++r) {
    store8(s + r * lds, acc0[r]);
    store8(s + r * lds + 8, acc1[r]);
  }
}

// O[R x 16] = O * corr + P[R x [j0, j1)] . V panel (packed [key][16]).
template <int R>
inline void pv_tile(int j0, int j1, const float* pm, int ldp, const float* vp, float* o, int ldo, const float* corr) {
  Vec8 acc0[R], acc1[R];
  for (int r = 0; r < R; ++r) {
    acc0[r] = load8(o + r * ldo) * corr[r];
    acc1[r] = load8(o + r * ldo + 8) * corr[r];
  }
  for (int j = j0; j < j1; ++j) {
    const Vec8 b0 = load8(vp + j * kPanelCols), b1 = load8(vp + j * kPanelCols + 8);
    for (int r = 0; r < R; ++r) {
      const float a = pm[r * ldp + j];
      acc0[r] += a * b0;
      acc1[r] += a * b1;
    }
  }
  for (int r = 0; r < R; ++r) {
    store8(o + r * ldo, acc0[r]);
    store8(o + r * ldo + 8, acc1[r]);
  }
}

int round_up(int n, int m) { return (n + m - 1) / m * m; }

// Asks for the `bytes` at `row` to be brought into cache ahead of use. Rows of q, k, v and out
// sit a page or more apart at typical sizes, so each one read cold costs a TLB walk and a memory
// round trip; prefetched a few rows ahead, several of those overlap.
inline void prefetch_row(const void* row, int bytes, bool write = false) {
  const char* c = static_cast<const char*>(row);
  for (int off = 0; off < bytes; off += 64) {
    if (write)
      __builtin_prefetch(c + off, 1, 3);
    else
      __builtin_prefetch(c + off, 0, 2);  // prefetcht1: into L2, the packed tiles own L1
  }
}

template <typename T>
struct Forward {
  const FlashFwdParams& p;
  int block_m;   // rows per work item, a multiple of kPanelRows
  int m_blocks;  // row blocks per (batch, kv head), from the longest sequence

  size_t scratch_floats(int d) const {
    const size_t dp = static_cast<size_t>(round_up(d, kPanelCols));
    return block_m * (d + dp + 2) + kFwdBlockN * d + (dp / kPanelCols) * kVPanelStride + kPanelRows * kFwdBlockN +
           9 * dp + 9 * Arena::kAlign;
  }

  // Key rows g .. g + 7 of a tile as float rows: pointers into k / v themselves for float
  // inputs, else widened into `rows` (stride dp); keys past len_k read `zeros`.
  void key_rows(const Seq& s, int b, int hk, int key0, const void* base, int64_t bs, int64_t rs, int64_t hs,
                float* rows, const float* zeros, const float** out) const {
    const int d = p.head_dim, dp = round_up(d, kPanelCols);
    for (int u = 0; u < 8; ++u) {
      if (key0 + u >= s.len_k) {
        out[u] = zeros;
        continue;
      }
      const T* src = static_cast<const T*>(base) + key_offset(p, s, b, key0 + u, hk, bs, rs, hs);
      if constexpr (std::is_same<T, float>::value) {
        out[u] = reinterpret_cast<const float*>(src);
      } else {
        load_row(src, rows + u * dp, d);
        out[u] = rows + u * dp;
      }
    }
  }

  // Prefetches the k and v rows of keys [key0, key1) (clipped to the sequence).
  void prefetch_keys(const Seq& s, int b, int hk, int key0, int key1) const {
    const int bytes = p.head_dim * static_cast<int>(sizeof(T));
    for (int j = std::max(key0, 0); j < std::min(key1, s.len_k); ++j) {
      prefetch_row(static_cast<const T*>(p.k) + key_offset(p, s, b, j, hk, p.k_batch_stride, p.k_row_stride,
                                                           p.k_head_stride), bytes);
      prefetch_row(static_cast<const T*>(p.v) + key_offset(p, s, b, j, hk, p.v_batch_stride, p.v_row_stride,
                                                           p.v_head_stride), bytes);
    }
  }

  // Packs keys n0 + [j0, j1) (multiples of kPanelCols) of (b, hk) as float, 8 keys at a time;
  // keys past len_k and head-dim padding are zero. K is transposed 8 x 8 in registers:
  // scattering single floats into the panels touches a cache line per float and thrashes L1.
  void pack_kv(const Seq& s, int b, int hk, int n0, int j0, int j1, float* kp, float* vp, float* rows,
               const float* zeros) const {
    const int d = p.head_dim;
    const float* src[8];
    prefetch_keys(s, b, hk, n0 + j0, n0 + std::min(j0 + 16, j1));
    for (int g = j0; g < j1; g += 8) {
      // two groups ahead: the rows arrive while this group is transposed
      if (g + 16 < j1) prefetch_keys(s, b, hk, n0 + g + 16, n0 + std::min(g + 24, j1));
      key_rows(s, b, hk, n0 + g, p.k, p.k_batch_stride, p.k_row_stride, p.k_head_stride, rows, zeros, src);
      float* kpanel = kp + (g / kPanelCols) * kPanelCols * d + g % kPanelCols;
      for (int c = 0; c < d; c += 8) {
        Vec8 r[8];
        for (int u = 0; u < 8; ++u) r[u] = load8(src[u] + c);
        transpose8(r);
        for (int u = 0; u < 8; ++u) store8(kpanel + (c + u) * kPanelCols, r[u]);
      }
      key_rows(s, b, hk, n0 + g, p.v, p.v_batch_stride, p.v_row_stride, p.v_head_stride, rows, zeros, src);
      for (int u = 0; u < 8; ++u) {
        float* dst = vp + (g + u) * kPanelCols;
        for (int c = 0; c < d; c += 8) store8(dst + (c / kPanelCols) * kVPanelStride + c % kPanelCols, load8(src[u] + c));
        if (d % kPanelCols) store8(dst + (d / kPanelCols) * kVPanelStride + 8, Vec8{});
      }
    }
  }

  void run_item(int64_t item) const {
    const int mb = static_cast<int>(item % m_blocks);
    const int hk = static_cast<int>((item / m_blocks) % p.heads_kv);
    const int b = static_cast<int>(item / (static_cast<int64_t>(m_blocks) * p.heads_kv));
    const int group = p.heads_q / p.heads_kv;
    const Seq s = sequence(p, b);
    const int t0 = mb * block_m;
    const int total_rows = s.len_q * group;
    if (t0 >= total_rows) return;
    const int rows = std::min(total_rows - t0, block_m);
    const int padded_rows = round_up(rows, kPanelRows);
    const int d = p.head_dim, dp = round_up(d, kPanelCols);
    const RowMask mask = row_mask(p, s);
    const Dropout drop(p.dropout_p);
    // Padding rows of the last panel repeat the last row's mask and are never stored.
    auto query_row = [&](int r) { return (t0 + std::min(r, rows - 1)) / group; };
    auto query_head = [&](int r) { return hk * group + (t0 + std::min(r, rows - 1)) % group; };

    Arena arena(scratch_floats(d));
    float* qp = arena.take(static_cast<size_t>(block_m) * d);  // [panel][d][kPanelRows]
    float* o = arena.zeros(static_cast<size_t>(block_m) * dp);
    float* kp = arena.take(static_cast<size_t>(kFwdBlockN) * d);
    float* vp = arena.take(static_cast<size_t>(dp / kPanelCols) * kVPanelStride);
    float* sbuf = arena.take(static_cast<size_t>(kPanelRows) * kFwdBlockN);
    float* row = arena.take(8 * static_cast<size_t>(dp));  // pack scratch
    const float* zeros = arena.zeros(dp);
    float* maxes = arena.take(block_m);  // running max of the logits, per row
    float* sums = arena.zeros(block_m);
    std::fill(maxes, maxes + block_m, -kInf);
    bool keep[kFwdBlockN];

    const T* qb = static_cast<const T*>(p.q);
    auto q_row = [&](int r) {
      const int t = t0 + r;
      return qb + query_offset(p, s, b, t / group, hk * group + t % group, p.q_batch_stride, p.q_row_stride,
                               p.q_head_stride);
    };
    constexpr int kAhead = 8;  // rows prefetched ahead of the one being read or written
    for (int r = 0; r < std::min(rows, kAhead); ++r) prefetch_row(q_row(r), d * static_cast<int>(sizeof(T)));
    for (int r = 0; r < padded_rows; ++r) {
      float* dst = qp + static_cast<size_t>(r / kPanelRows) * d * kPanelRows + r % kPanelRows;
      if (r + kAhead < rows) prefetch_row(q_row(r + kAhead), d * static_cast<int>(sizeof(T)));
      if (r < rows) {
        load_row(q_row(r), row, d);
        for (int c = 0; c < d; ++c) dst[c * kPanelRows] = row[c];
      } else {
        for (int c = 0; c < d; ++c) dst[c * kPanelRows] = 0.0f;
      }
    }

    // mask bounds grow with the query row, so the block's key range is lo(first) .. hi(last)
    const int lo = mask.lo(query_row(0)), hi = mask.hi(query_row(rows - 1));
    for (int n0 = (lo / kFwdBlockN) * kFwdBlockN; n0 < hi; n0 += kFwdBlockN) {
      const int jb = std::max(lo - n0, 0) / kPanelCols * kPanelCols;
      const int je = round_up(std::min(hi - n0, kFwdBlockN), kPanelCols);
      pack_kv(s, b, hk, n0, jb, je, kp, vp, row, zeros);
      for (int r0 = 0; r0 < padded_rows; r0 += kPanelRows) {
        const int first = query_row(r0), last = query_row(r0 + kPanelRows - 1);
        const int j0 = std::max(mask.lo(first) - n0, jb) / kPanelCols * kPanelCols;
        const int j1 = round_up(std::min(mask.hi(last) - n0, je), kPanelCols);
        if (j1 <= j0) continue;  // no row of the panel sees a key of this tile
        const bool inside = mask.lo(last) - n0 <= j0 && mask.hi(first) - n0 >= j1;
        for (int j = j0; j < j1; j += kPanelCols)
          qk_tile<kPanelRows>(d, qp + static_cast<size_t>(r0) * d, kp + static_cast<size_t>(j) * d, sbuf + j,
                              kFwdBlockN);
        float corr[kPanelRows];
        softmax_panel(mask, drop, b, r0, rows, n0, j0, j1, inside, sbuf, maxes + r0, sums + r0, corr,
                      keep, query_row, query_head);
        for (int c0 = 0; c0 < dp; c0 += kPanelCols)
          pv_tile<kPanelRows>(j0, j1, sbuf, kFwdBlockN, vp + static_cast<size_t>(c0 / kPanelCols) * kVPanelStride,
                              o + static_cast<size_t>(r0) * dp + c0, dp, corr);
      }
    }

    T* ob = static_cast<T*>(p.out);
    auto out_row = [&](int r) {
      return ob + query_offset(p, s, b, query_row(r), query_head(r), p.o_batch_stride, p.o_row_stride,
                               p.o_head_stride);
    };
    for (int r = 0; r < std::min(rows, kAhead); ++r) prefetch_row(out_row(r), d * static_cast<int>(sizeof(T)), true);
    for (int r = 0; r < rows; ++r) {
      if (r + kAhead < rows) prefetch_row(out_row(r + kAhead), d * static_cast<int>(sizeof(T)), true);
      const int i = query_row(r), h = query_head(r);
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
      store_row(o + static_cast<size_t>(r) * dp, inv * drop.keep_scale, out_row(r), d);
      p.softmax_lse[lse_index(p, s, b, h, i)] = lse;
    }
  }

  // Online softmax of one panel's scores against keys n0 + [j0, j1): turns sbuf's rows into
  // probabilities (0 where masked or dropped), updates the running maxes and sums, and returns
  // in corr the factor each row's accumulated output is rescaled by.
  template <typename RowFn, typename HeadFn>
  void softmax_panel(const RowMask& mask, const Dropout& drop, int b, int r0, int rows, int n0,
                     int j0, int j1, bool inside, float* sbuf, float* maxes, float* sums, float* corr, bool* keep,
                     const RowFn& query_row, const HeadFn& query_head) const {
    // Without softcap and ALiBi the scale is folded into the exponent: exp2(s * scale * log2e - max * log2e).
    const bool plain = p.softcap <= 0.0f && !p.alibi_slopes && p.softmax_scale > 0.0f;
    const float to_logit = plain ? p.softmax_scale : 1.0f;
    const float to_exp2 = to_logit * kLog2e;
    float new_max[8], delta[8];
    for (int r = 0; r < kPanelRows; ++r) {
      float* x = sbuf + r * kFwdBlockN;
      const int i = query_row(r0 + r);
      if (!plain) {
        finish_scores(p, mask, alibi_slope(p, b, query_head(r0 + r)), i, n0, j0, j1, x, nullptr);
      } else if (!inside) {
        const int lo = mask.lo(i) - n0, hi = mask.hi(i) - n0;
        for (int j = j0; j < j1; ++j) x[j] = (j >= lo && j < hi) ? x[j] : -kInf;
      }
      Vec8 m0 = load8(x + j0), m1 = load8(x + j0 + 8);
      for (int j = j0 + kPanelCols; j < j1; j += kPanelCols) {
        const Vec8 a = load8(x + j), c = load8(x + j + 8);
        m0 = m0 > a ? m0 : a;
        m1 = m1 > c ? m1 : c;
      }
      const float mx = hmax8(m0 > m1 ? m0 : m1);
      new_max[r] = std::max(maxes[r], mx * to_logit);
      // a row that has seen no key yet keeps corr = 1 (its output is still 0)
      delta[r] = new_max[r] == -kInf ? 0.0f : (maxes[r] - new_max[r]) * kLog2e;
    }
    for (int r = kPanelRows; r < 8; ++r) delta[r] = 0.0f;
    const Vec8 c8 = exp2_nonpos(load8(delta));
    for (int r = 0; r < kPanelRows; ++r) corr[r] = c8[r];

    for (int r = 0; r < kPanelRows; ++r) {
      float* x = sbuf + r * kFwdBlockN;
      maxes[r] = new_max[r];
      if (new_max[r] == -kInf) {
        std::fill(x + j0, x + j1, 0.0f);
        continue;
      }
      const float shift = new_max[r] * kLog2e;
      Vec8 sum0{}, sum1{};
      for (int j = j0; j < j1; j += kPanelCols) {
        const Vec8 e0 = exp2_nonpos(load8(x + j) * to_exp2 - shift);
        const Vec8 e1 = exp2_nonpos(load8(x + j + 8) * to_exp2 - shift);
        store8(x + j, e0);
        store8(x + j + 8, e1);
        sum0 += e0;
        sum1 += e1;
      }
      sums[r] = sums[r] * corr[r] + hsum8(sum0 + sum1);
      if (drop.on && r0 + r < rows) {
        // dropped after the sum: the normalizer counts every probability
        dropout_row(p, drop.threshold, static_cast<int64_t>(b) * p.heads_q + query_head(r0 + r), query_row(r0 + r),
                    n0, j0, j1, keep);
        for (int j = j0; j < j1; ++j) x[j] = keep[j] ? x[j] : 0.0f;
      }
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
  finish_scores(p, mask, slope, i, n0, 0, kBlockN, score, p.softcap > 0.0f ? tanh_buf : nullptr);
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

    Arena arena(bwd_scratch_floats(d));
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
          if (drop.on) dropout_row(p, drop.threshold, bh, i, n0, 0, kBlockN, keep);
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

    Arena arena(bwd_scratch_floats(d));
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
        if (drop.on) dropout_row(p, drop.threshold, bh, i, n0, 0, kBlockN, keep);
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
  // Equal blocks of at most kFwdMaxBlockM rows, and at least 32 items overall while blocks
  // keep 96 rows or more, so the pool has work to balance.
  const int rows = max_len_q(p) * (p.heads_q / p.heads_kv);
  if (rows == 0) return;
  const int heads = std::max(1, p.batch * p.heads_kv);
  const int blocks = std::max(num_blocks(rows, kFwdMaxBlockM), std::min(num_blocks(32, heads), num_blocks(rows, 96)));
  const int block_m = round_up(num_blocks(rows, std::max(blocks, 1)), kPanelRows);
  const Forward<T> f{p, block_m, num_blocks(rows, block_m)};
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
