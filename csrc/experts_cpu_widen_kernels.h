// The float32 micro-kernels of the widened bf16 GEMM (csrc/experts_cpu_widen.cpp), written
// once and compiled once per vector ISA: experts_cpu_widen.cpp includes this file inside a
// namespace and a `#pragma GCC target` region after defining, for that ISA, the vector type
// V, kLanes, zero / load / store / broadcast / fma / add, sum4 (the four horizontal sums of
// four vectors as one __m128), load_bf16 / widen_low / widen_high (bf16 bits to float32 in
// the load), store_bf16_bits, in_register (a value the compiler must hold in a register: GCC
// otherwise folds a row's load into each of its FMAs, a load per product, and a dot tile then
// issued about as many loads as FMAs), and the tile shapes kDotRows x kDotCols (kDotCols 2 or
// 4) and kOuterRows x kOuterVectors (and, outside, the Prefetch struct).
//
// Why hand-written rather than ATen's float32 GEMM on the widened tiles: an expert has ~32
// rows at the Qwen3 prefill shape, and a [32, 2048] x [2048, 64] call costs oneDNN/MKL a copy
// of the tile into its own packed layout plus a dispatch per tile; the widened tile here is
// already laid out for these kernels (zero-padded, so no tails), so the only conversion
// is the widening itself, amortized over all of the expert's rows. No include guard and no
// #include: it is meant to be included more than once, after <immintrin.h>.

// A dot tile's kRows x kDotCols accumulators, zeroed.
template <int kRows>
inline void zero_accumulators(V (&acc)[kRows][kDotCols]) {
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < kDotCols; ++c) acc[r][c] = zero();
}

// A dot tile's kRows x kDotCols dot products (each the horizontal sum of its accumulator)
// into sums, added to what is there with accumulate (a later k chunk).
template <int kRows>
inline void store_dot_sums(V (&acc)[kRows][kDotCols], float* sums, int64_t ld_sums, bool accumulate) {
  static_assert(kDotCols == 2 || kDotCols == 4, "sum4 takes the columns 4 or 2 at a time");
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r) {
    float* out = sums + r * ld_sums;
    if constexpr (kDotCols == 4) {
      __m128 total = sum4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]);
      if (accumulate) total = _mm_add_ps(total, _mm_loadu_ps(out));
      _mm_storeu_ps(out, total);
    } else {
      // Once a k chunk per tile: the two empty lanes cost nothing that shows.
      __m128 total = sum4(acc[r][0], acc[r][kDotCols - 1], zero(), zero());
      if (accumulate) total = _mm_add_ps(total, _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(out))));
      _mm_store_sd(reinterpret_cast<double*>(out), _mm_castps_pd(total));
    }
  }
}

// The size of the next of `groups_left` row groups that share the `rows_left` rows as evenly
// as can be (each at most the tile's rows when groups_left = ceil(rows / tile rows)): 32 rows
// as 5, 5, 5, 5, 6, 6 rather than 6 x 5 + 2, whose 2-row tile has too few accumulators to hide
// the FMA latency and reads its whole weight for 2 rows.
inline int even_group(int64_t rows_left, int64_t groups_left) { return int(rows_left / groups_left); }

// Rows x kDotCols columns of dot products along k (the x @ W^T weights, whose rows are
// contiguous in k): sums[r, c] (+)= a[r, k0:k0+Kc] . b[c, k0:k0+Kc]. Kc a multiple of kLanes.
template <int kRows>
inline void dot_tile(int64_t Kc, const float* a, int64_t lda, const float* b, int64_t ldb, float* sums,
                     int64_t ld_sums, bool accumulate, Prefetch& prefetch) {
  V acc[kRows][kDotCols];
  zero_accumulators<kRows>(acc);
  // In registers for the loop: through the struct GCC would store `next` back every step.
  const char* prefetch_next = prefetch.next;
  const char* const prefetch_end = prefetch.end;
  const int64_t prefetch_lines = prefetch.lines_per_step;
  for (int64_t k = 0; k < Kc; k += kLanes) {
    // The last step may run up to lines_per_step - 1 lines past end: prefetches never fault.
    if (prefetch_next < prefetch_end) {
      for (int64_t i = 0; i < prefetch_lines; ++i, prefetch_next += 64) _mm_prefetch(prefetch_next, _MM_HINT_T1);
    }
    V b_vec[kDotCols];
#pragma GCC unroll 4
    for (int c = 0; c < kDotCols; ++c) b_vec[c] = load(b + c * ldb + k);
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      const V a_vec = load(a + r * lda + k);
#pragma GCC unroll 4
      for (int c = 0; c < kDotCols; ++c) acc[r][c] = fma(a_vec, b_vec[c], acc[r][c]);
    }
  }
  prefetch.next = prefetch_next;
  store_dot_sums<kRows>(acc, sums, ld_sums, accumulate);
}

// The row count known at compile time: kRows down to 1 (an expert's last rows).
template <int kRows>
inline void dot_tile_rows(int rows, int64_t Kc, const float* a, int64_t lda, const float* b, int64_t ldb,
                          float* sums, int64_t ld_sums, bool accumulate, Prefetch& prefetch) {
  if (rows == kRows) {
    dot_tile<kRows>(Kc, a, lda, b, ldb, sums, ld_sums, accumulate, prefetch);
  } else if constexpr (kRows > 1) {
    dot_tile_rows<kRows - 1>(rows, Kc, a, lda, b, ldb, sums, ld_sums, accumulate, prefetch);
  }
}

// sums[rows, cols] = a[rows, Kp] b[cols, Kp]^T: a and b row-major, Kp and cols multiples of
// kLanes and 4, zero-padded. k is cut into chunks (the partial sums added in chunk order,
// fixed, so a call is reproducible) so that a group of kDotRows rows of a stays in L1 while
// every group of kDotCols weight columns streams past it from L2: at K = 2048 a whole row
// group is 48 KiB, as much as an L1, and re-reading it from L2 for every column group cost
// more L2 bandwidth than the FMAs leave.
constexpr int64_t kDotChunk = 1024;

// [prefetch_begin, prefetch_end): bytes the caller widens next (the next weight tile), asked
// into L2 a few lines at every k step, so that memory streams while the FMAs run: without it
// the widening of each tile waited on memory (12% of the Qwen3 forward at T = 512 against
// 24% in the kernel) and a core computed or streamed, seldom both.
void dot_gemm(int64_t rows, int64_t cols, int64_t Kp, const float* a, int64_t lda, const float* b, int64_t ldb,
              float* sums, int64_t ld_sums, const char* prefetch_begin, const char* prefetch_end) {
  Prefetch prefetch;
  const int64_t steps = (rows + kDotRows - 1) / kDotRows * (cols / kDotCols) * (Kp / kLanes);
  if (prefetch_begin != nullptr && prefetch_end > prefetch_begin && steps > 0) {
    const int64_t lines = (prefetch_end - prefetch_begin + 63) / 64;
    prefetch = {prefetch_begin, prefetch_end, (lines + steps - 1) / steps};
  }
  for (int64_t k0 = 0; k0 < Kp; k0 += kDotChunk) {
    const int64_t Kc = std::min(kDotChunk, Kp - k0);
    const int64_t row_groups = (rows + kDotRows - 1) / kDotRows;
    for (int64_t g = 0, m0 = 0, group = 0; g < row_groups; ++g, m0 += group) {
      group = even_group(rows - m0, row_groups - g);
      for (int64_t c0 = 0; c0 < cols; c0 += kDotCols) {
        dot_tile_rows<kDotRows>(group, Kc, a + m0 * lda + k0, lda, b + c0 * ldb + k0, ldb, sums + m0 * ld_sums + c0,
                                ld_sums, k0 > 0, prefetch);
      }
    }
  }
}

// Rows x kOuterWidth columns as outer products (weights stored [K, N], rows contiguous in
// n: the gpt_oss layout and every backward GEMM): sums[r, :] = sum_k a(r, k) b[k, :], a(r, k)
// at a[r * a_row + k * a_k] (either layout of the widened panel), b one packed strip
// [K, kOuterWidth].
constexpr int kOuterWidth = kOuterVectors * kLanes;

template <int kRows>
inline void outer_tile(int64_t K, const float* a, int64_t a_row, int64_t a_k, const float* b, float* sums,
                       int64_t ld_sums, bool accumulate) {
  V acc[kRows][kOuterVectors];
#pragma GCC unroll 16
  for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < kOuterVectors; ++v) acc[r][v] = zero();
  for (int64_t k = 0; k < K; ++k) {
    V b_vec[kOuterVectors];
#pragma GCC unroll 4
    for (int v = 0; v < kOuterVectors; ++v) b_vec[v] = load(b + k * kOuterWidth + v * kLanes);
    const float* a_k_column = a + k * a_k;
#pragma GCC unroll 16
    for (int r = 0; r < kRows; ++r) {
      const V a_vec = broadcast(a_k_column + r * a_row);
#pragma GCC unroll 4
      for (int v = 0; v < kOuterVectors; ++v) acc[r][v] = fma(a_vec, b_vec[v], acc[r][v]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < kOuterVectors; ++v) {
      float* out = sums + r * ld_sums + v * kLanes;
      store(out, accumulate ? add(acc[r][v], load(out)) : acc[r][v]);
    }
}

template <int kRows>
inline void outer_tile_rows(int rows, int64_t K, const float* a, int64_t a_row, int64_t a_k, const float* b,
                            float* sums, int64_t ld_sums, bool accumulate) {
  if (rows == kRows) {
    outer_tile<kRows>(K, a, a_row, a_k, b, sums, ld_sums, accumulate);
  } else if constexpr (kRows > 1) {
    outer_tile_rows<kRows - 1>(rows, K, a, a_row, a_k, b, sums, ld_sums, accumulate);
  }
}

// sums[rows, strips * kOuterWidth] (+)= over strips packed one after another ([K, kOuterWidth]
// each, zero-padded past the last column); accumulate: add to the sums there (the caller's
// earlier chunks of k).
void outer_gemm(int64_t rows, int64_t strips, int64_t K, const float* a, int64_t a_row, int64_t a_k, const float* b,
                float* sums, int64_t ld_sums, bool accumulate) {
  const int64_t row_groups = (rows + kOuterRows - 1) / kOuterRows;
  for (int64_t g = 0, m0 = 0, group = 0; g < row_groups; ++g, m0 += group) {
    group = even_group(rows - m0, row_groups - g);
    for (int64_t strip = 0; strip < strips; ++strip) {
      outer_tile_rows<kOuterRows>(group, K, a + m0 * a_row, a_row, a_k, b + strip * K * kOuterWidth,
                                  sums + m0 * ld_sums + strip * kOuterWidth, ld_sums, accumulate);
    }
  }
}

// Float32 sums rounded to bf16 bits (round to nearest even, NaN to 0x7FC0: c10::BFloat16's
// conversion), rows ld apart: the scalar conversion was 9% of a training step, whose weight
// gradients are as many elements as the weights, each from only ~32 products.
void store_bf16_rows(const float* sums, int64_t ld_sums, int64_t rows, int64_t cols, uint16_t* out, int64_t ld_out) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* in = sums + r * ld_sums;
    uint16_t* row = out + r * ld_out;
    int64_t c = 0;
    for (; c + kLanes <= cols; c += kLanes) store_bf16_bits(row + c, load(in + c));
    for (; c < cols; ++c) row[c] = c10::BFloat16(in[c]).x;
  }
}

// Few rows (decode; experts with a handful of tokens): the weight is read once and used by
// at most 4 rows, so the time is the weight's stream from memory. Here its bf16 rows are
// widened in the loads themselves (no float32 tile written and read back) and the stream is
// asked into L2 `ahead` bytes in front of the loads: sums[r, c] = a[r, :K] . b[c, :K] for
// kRows x kCols, b's rows bf16 bits ldb apart, a's float32 rows zero-padded to kLanes.
template <int kRows, int kCols>
inline void dot_tile_bf16(int64_t K, const float* a, int64_t lda, const uint16_t* b, int64_t ldb, float* sums,
                          int64_t ld_sums, Prefetch& prefetch) {
  V acc[kRows][kCols];
#pragma GCC unroll 4
  for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < kCols; ++c) acc[r][c] = zero();
  const int64_t whole = K / kLanes * kLanes;
  const char* prefetch_next = prefetch.next;
  const char* prefetch_end = prefetch.end;
  for (int64_t k = 0; k < whole; k += kLanes) {
    if (prefetch_next >= prefetch_end && prefetch.then_next != nullptr) {
      // On to the second stretch, once.
      prefetch_next = prefetch.then_next, prefetch_end = prefetch.then_end;
      prefetch.then_next = nullptr;
    }
    if (prefetch_next < prefetch_end) {
      for (int64_t i = 0; i < prefetch.lines_per_step; ++i, prefetch_next += 64) _mm_prefetch(prefetch_next, _MM_HINT_T1);
    }
    V b_vec[kCols];
#pragma GCC unroll 4
    for (int c = 0; c < kCols; ++c) b_vec[c] = load_bf16(b + c * ldb + k);
#pragma GCC unroll 4
    for (int r = 0; r < kRows; ++r) {
      const V a_vec = load(a + r * lda + k);
#pragma GCC unroll 4
      for (int c = 0; c < kCols; ++c) acc[r][c] = fma(a_vec, b_vec[c], acc[r][c]);
    }
  }
  prefetch.next = prefetch_next, prefetch.end = prefetch_end;
  // The k % kLanes tail one product at a time, after the vector sums (a fixed order).
#pragma GCC unroll 4
  for (int r = 0; r < kRows; ++r) {
    alignas(16) float total[4];
    _mm_store_ps(total, sum4(acc[r][0], kCols > 1 ? acc[r][kCols > 1 ? 1 : 0] : zero(),
                             kCols > 2 ? acc[r][kCols > 2 ? 2 : 0] : zero(), kCols > 3 ? acc[r][kCols > 3 ? 3 : 0] : zero()));
    for (int c = 0; c < kCols; ++c) {
      float sum = total[c];
      for (int64_t k = whole; k < K; ++k) {
        uint32_t bits = uint32_t(b[c * ldb + k]) << 16;
        float value;
        __builtin_memcpy(&value, &bits, 4);
        sum += a[r * lda + k] * value;
      }
      sums[r * ld_sums + c] = sum;
    }
  }
}

template <int kRows>
inline void dot_group_bf16(int cols, int64_t K, const float* a, int64_t lda, const uint16_t* b, int64_t ldb,
                           float* sums, int64_t ld_sums, Prefetch& prefetch) {
  switch (cols) {
    case 4: dot_tile_bf16<kRows, 4>(K, a, lda, b, ldb, sums, ld_sums, prefetch); break;
    case 3: dot_tile_bf16<kRows, 3>(K, a, lda, b, ldb, sums, ld_sums, prefetch); break;
    case 2: dot_tile_bf16<kRows, 2>(K, a, lda, b, ldb, sums, ld_sums, prefetch); break;
    default: dot_tile_bf16<kRows, 1>(K, a, lda, b, ldb, sums, ld_sums, prefetch); break;
  }
}

// sums[rows, cols] = a[rows, K] b[cols, K]^T for rows <= 4, b bf16 bits. prefetch: the
// stream to ask for (next, end, then its second stretch), starting ahead of b.
void dot_gemm_bf16(int64_t rows, int64_t cols, int64_t K, const float* a, int64_t lda, const uint16_t* b, int64_t ldb,
                   float* sums, int64_t ld_sums, Prefetch prefetch) {
  // As many lines a k step as the step reads (4 weight rows of kLanes bf16), so the prefetch
  // keeps its distance ahead of the loads.
  prefetch.lines_per_step = std::max<int64_t>(1, 4 * kLanes * 2 / 64);
  for (int64_t c0 = 0; c0 < cols; c0 += 4) {
    const int group = int(std::min<int64_t>(4, cols - c0));
    const uint16_t* b_group = b + c0 * ldb;
    float* out = sums + c0;
    switch (rows) {
      case 1: dot_group_bf16<1>(group, K, a, lda, b_group, ldb, out, ld_sums, prefetch); break;
      case 2: dot_group_bf16<2>(group, K, a, lda, b_group, ldb, out, ld_sums, prefetch); break;
      case 3: dot_group_bf16<3>(group, K, a, lda, b_group, ldb, out, ld_sums, prefetch); break;
      default: dot_group_bf16<4>(group, K, a, lda, b_group, ldb, out, ld_sums, prefetch); break;
    }
  }
}

// Many rows, bf16 weights and k a multiple of 2 kLanes: the weight's bf16 rows widened in
// the loads by one interleave with zeros a vector (unpack: its low and high halves give
// k = 0-3, 8-11, .. and 4-7, 12-15, .. of each 2 kLanes block as float32), so no float32
// tile is written and read back; the rows of a were widened in the same order
// (widen_permuted), so each product pairs the same k and the sums are the same dot
// products in a different, fixed order. Per 2 kLanes (AVX-512): 4 loads + 8 unpacks for 48
// FMAs, where the widened tile cost a 4-byte store and reload for every weight element.
void widen_permuted(const uint16_t* in, int64_t K, float* out) {
  for (int64_t k = 0; k < K; k += 2 * kLanes) {
    store(out + k, widen_low(in + k));
    store(out + k + kLanes, widen_high(in + k));
  }
}

template <int kRows>
inline void dot_tile_packed(int64_t Kc, const float* a, int64_t lda, const uint16_t* b, int64_t ldb, float* sums,
                            int64_t ld_sums, bool accumulate, Prefetch& prefetch) {
  V acc[kRows][kDotCols];
  zero_accumulators<kRows>(acc);
  const char* prefetch_next = prefetch.next;
  const char* const prefetch_end = prefetch.end;
  const int64_t prefetch_lines = prefetch.lines_per_step;
  for (int64_t k = 0; k < Kc; k += 2 * kLanes) {
    if (prefetch_next < prefetch_end) {
      for (int64_t i = 0; i < prefetch_lines; ++i, prefetch_next += 64) _mm_prefetch(prefetch_next, _MM_HINT_T1);
    }
    V b_vec[kDotCols];
#pragma GCC unroll 4
    for (int c = 0; c < kDotCols; ++c) b_vec[c] = widen_low(b + c * ldb + k);
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      const V a_vec = in_register(load(a + r * lda + k));
#pragma GCC unroll 4
      for (int c = 0; c < kDotCols; ++c) acc[r][c] = fma(a_vec, b_vec[c], acc[r][c]);
    }
#pragma GCC unroll 4
    for (int c = 0; c < kDotCols; ++c) b_vec[c] = widen_high(b + c * ldb + k);
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      const V a_vec = in_register(load(a + r * lda + k + kLanes));
#pragma GCC unroll 4
      for (int c = 0; c < kDotCols; ++c) acc[r][c] = fma(a_vec, b_vec[c], acc[r][c]);
    }
  }
  prefetch.next = prefetch_next;
  store_dot_sums<kRows>(acc, sums, ld_sums, accumulate);
}

template <int kRows>
inline void dot_tile_packed_rows(int rows, int64_t Kc, const float* a, int64_t lda, const uint16_t* b, int64_t ldb,
                                 float* sums, int64_t ld_sums, bool accumulate, Prefetch& prefetch) {
  if (rows == kRows) {
    dot_tile_packed<kRows>(Kc, a, lda, b, ldb, sums, ld_sums, accumulate, prefetch);
  } else if constexpr (kRows > 1) {
    dot_tile_packed_rows<kRows - 1>(rows, Kc, a, lda, b, ldb, sums, ld_sums, accumulate, prefetch);
  }
}

// sums[rows, cols] = a[rows, K] b[cols, K]^T, a widened by widen_permuted, b bf16 bits, K a
// multiple of 2 kLanes; k in chunks as in dot_gemm. cols >= kDotCols: a last partial group
// is the weight's last kDotCols columns, summed into scratch columns at ld_sums - kDotCols
// (past cols: in place, its overlap with the group before would be added twice from the
// second chunk) and its new columns copied over at the end.
void dot_gemm_packed(int64_t rows, int64_t cols, int64_t K, const float* a, int64_t lda, const uint16_t* b,
                     int64_t ldb, float* sums, int64_t ld_sums, const char* prefetch_begin, const char* prefetch_end) {
  Prefetch prefetch;
  const int64_t groups = (cols + kDotCols - 1) / kDotCols;
  const int64_t steps = (rows + kDotRows - 1) / kDotRows * groups * (K / (2 * kLanes));
  if (prefetch_begin != nullptr && prefetch_end > prefetch_begin && steps > 0) {
    const int64_t lines = (prefetch_end - prefetch_begin + 63) / 64;
    prefetch = {prefetch_begin, prefetch_end, (lines + steps - 1) / steps};
  }
  for (int64_t k0 = 0; k0 < K; k0 += kDotChunk) {
    const int64_t Kc = std::min(kDotChunk, K - k0);
    const int64_t row_groups = (rows + kDotRows - 1) / kDotRows;
    for (int64_t h = 0, m0 = 0, group = 0; h < row_groups; ++h, m0 += group) {
      group = even_group(rows - m0, row_groups - h);
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t c0 = std::min(kDotCols * g, cols - kDotCols);
        const int64_t out = kDotCols * g == c0 ? c0 : ld_sums - kDotCols;
        dot_tile_packed_rows<kDotRows>(group, Kc, a + m0 * lda + k0, lda, b + c0 * ldb + k0, ldb,
                                       sums + m0 * ld_sums + out, ld_sums, k0 > 0, prefetch);
      }
    }
  }
  if (cols % kDotCols != 0) {
    for (int64_t r = 0; r < rows; ++r) {
      float* row = sums + r * ld_sums;
      for (int64_t c = cols / kDotCols * kDotCols; c < cols; ++c) row[c] = row[ld_sums - cols + c];
    }
  }
}
