// Fast mode's CPU kernels for x86 with AVX-512 VNNI (mesh402/engine/qkernels.py builds and loads them):
// - q4q8_mm / q8q8_mm: block-quantized matmuls, 4-bit and 8-bit weight blocks of 32 times activations
//   quantized per block of 32 to two int8 planes (~16 bits), the block dot products in exact integer
//   arithmetic (vpdpbusd), scaled and summed in fp32;
// - attn_decode_rows: decode rows' KV writes and attention over their sessions' caches, in one call (the
//   library's flash-attention kernel spends ~20-40 us of set-up on each single query row).
//
// Why: torch's own int4 / int8 weight-only CPU kernels widen every weight to fp32 and run FMAs, which is
// compute-bound on small cores; an integer dot of four byte pairs per lane is 4x the work per instruction and
// reads the weights at 4 bits. No library packaged for this torch offers such a kernel on x86 (see
// docs/architecture.md, "Fast kernels").
//
// Exactness contract (what fast mode's batch-invariance and replay rest on): every output element
// y[m][n] is computed by one thread, from row m of x and row n of the weight only, by the same operations
// whatever M, the row's position in the batch, the tile it falls in, the thread count or the partition of
// N: integer block sums (exact, so their order cannot matter), then one fixed fp32 sequence. So a row gets
// the same bits alone, in any batch and in any split of work.
//
// Layouts (built by mesh402/engine/qkernels.py: pack_q4, pack_q8), one row of bytes per weight row, so a
// thread reads one sequential stream: q4 uint8 [N, K/2 + 4 * K/32], q8 uint8 [N, K + 2 * K/32]; the quants
// (in the order q4_rows / q8_row describe), then the fp16 block scales (and q4's offsets).
// Activations: x fp32 [M, K] -> per block of 32, two int8 planes (QRows below).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <new>
#include <vector>

namespace {

constexpr int QK = 32;
constexpr int MT = 8;    // activation rows sharing one pass over a q8 weight row
constexpr int GB = 16;   // blocks per group: one int32 lane per block

// Weight rows are groups of 16 blocks with one vpdpbusd lane per block, so the block sums come out of the
// integer dot products whole and the fp32 scaling runs once per 16 blocks; blocks past the last whole
// group (the tail) are packed 4 (q4) or 2 (q8) to a 64-byte vector instead, each lane a quarter (an
// eighth) of a block.

// 64-byte aligned storage for the quantized activations: every 64-byte vector load from them then stays in one
// cache line (malloc aligns to 16 bytes only; a load split over two lines costs the width-8 tiles ~1.5x).
template <typename T>
struct Aligned64 {
  using value_type = T;
  Aligned64() = default;
  template <typename U>
  Aligned64(const Aligned64<U>&) {}
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t{64})); }
  void deallocate(T* p, std::size_t) { ::operator delete(p, std::align_val_t{64}); }
  template <typename U>
  bool operator==(const Aligned64<U>&) const { return true; }
  template <typename U>
  bool operator!=(const Aligned64<U>&) const { return false; }
};
template <typename T>
using avec = std::vector<T, Aligned64<T>>;

// Activations quantized per block of 32, in two int8 planes: with t = x * 127 / max|x| (the block's),
// q1 = round(t) and q2 = round(256 * (t - q1)), so x = (max|x| / 127) * (q1 + q2 / 256) to ~1/512 of a
// step: ~16-bit activations from two integer dot products (one int8 plane alone flips near-ties of the
// model's logits, as llama.cpp's Q8 activations do). A block's integer sum is 256 * s1 + s2, and `d`
// below is max|x| / 127 / 256. Laid out as the kernels read them.
struct QRows {
  int64_t M = 0, nb = 0, G = 0, rt = 0, gt = 0;
  avec<int8_t> xg;   // [M, G, 2, 512]: q4: lo half (v = 0..3) then hi half; q8: v = 0..7; lane l = block l
  avec<float> dg;    // [M, G, 32]: d of the 16 blocks, then d * sum(256 q1 + q2) (q4) or 0 (q8)
  avec<int32_t> cg;  // q8: [M, G, 16]: 128 * sum(256 q1 + q2) per block (the u8 weights' +128, taken out)
  avec<int8_t> xt;   // tail, [M, gt, 2, 128] (q4: per 4 blocks, elements 0..15 of each, then 16..31)
                            //       [M, gt, 2, 64]  (q8: per 2 blocks, natural order)
  avec<float> dt;    // tail lanes' d [M, gt, 16]
  avec<float> st;    // q4 tail: d * sum(256 q1 + q2) per tail block [M, 16]
  avec<int32_t> ct;  // q8 tail: 128 * (256 q1 + q2 summed over the 4 quants each lane reads) [M, gt, 16]
};

void quantize_rows(const float* x, int64_t M, int64_t K, bool q4, QRows& r) {
  r.M = M;
  r.nb = K / QK;
  r.G = r.nb / GB;
  r.rt = r.nb - r.G * GB;
  const int per = q4 ? 4 : 2;  // tail blocks per vector
  r.gt = (r.rt + per - 1) / per;
  r.xg.assign(M * r.G * 1024, 0);
  r.dg.assign(M * r.G * 32, 0.f);
  if (!q4) r.cg.assign(M * r.G * 16, 0);
  r.xt.assign(M * r.gt * (q4 ? 256 : 128), 0);
  r.dt.assign(M * r.gt * 16, 0.f);
  if (q4) r.st.assign(M * 16, 0.f);
  else r.ct.assign(M * r.gt * 16, 0);
  alignas(64) int8_t qb[2][QK];  // the block's two planes
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * K;
    for (int64_t b = 0; b < r.nb; ++b) {
      const float* xb = xr + b * QK;
      __m512 v0 = _mm512_loadu_ps(xb), v1 = _mm512_loadu_ps(xb + 16);
      float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
      float d = amax / 127.f / 256.f;
      // A NaN or inf in the block (hostile or broken input) must reach the output as non-finite, as in
      // any float matmul, so the sampler's and the pipeline's checks see it: max() may drop a NaN lane,
      // and the int8 quants cannot carry one, so the block's scale carries it (x * 0 is NaN for both).
      const float nonfinite = _mm512_reduce_add_ps(
          _mm512_add_ps(_mm512_mul_ps(v0, _mm512_setzero_ps()), _mm512_mul_ps(v1, _mm512_setzero_ps())));
      if (nonfinite != 0.f) {
        d = std::numeric_limits<float>::quiet_NaN();
        amax = 0.f;  // quants 0: the NaN scale alone marks the block
      }
      float id = amax > 0.f ? 127.f / amax : 0.f;
      __m512 vid = _mm512_set1_ps(id), k256 = _mm512_set1_ps(256.f);
      int32_t sq = 0;
      for (int h = 0; h < 2; ++h) {
        // cvtps rounds to nearest even (MXCSR default); |t| <= 127 up to rounding and |256 (t - q1)| <= 128:
        // both saturate to int8
        __m512 t = _mm512_mul_ps(h ? v1 : v0, vid);
        __m512i q1 = _mm512_cvtps_epi32(t);
        __m512i q2 = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_sub_ps(t, _mm512_cvtepi32_ps(q1)), k256));
        __m128i b1 = _mm512_cvtsepi32_epi8(q1), b2 = _mm512_cvtsepi32_epi8(q2);
        _mm_store_si128(reinterpret_cast<__m128i*>(qb[0] + 16 * h), b1);
        _mm_store_si128(reinterpret_cast<__m128i*>(qb[1] + 16 * h), b2);
        sq += 256 * _mm512_reduce_add_epi32(_mm512_cvtepi8_epi32(b1)) +
              _mm512_reduce_add_epi32(_mm512_cvtepi8_epi32(b2));
      }
      if (b < r.G * GB) {
        const int64_t g = b / GB, l = b % GB;
        for (int p = 0; p < 2; ++p) {
          const int32_t* w32 = reinterpret_cast<const int32_t*>(qb[p]);  // 8 words of 4 quants
          int32_t* dst = reinterpret_cast<int32_t*>(r.xg.data() + ((m * r.G + g) * 2 + p) * 512);
          for (int v = 0; v < 8; ++v) dst[v * 16 + l] = w32[v];  // vector v, lane l: quants 4v..4v+3 of block l
        }
        float* dg = r.dg.data() + (m * r.G + g) * 32;
        dg[l] = d;
        if (q4) dg[16 + l] = d * static_cast<float>(sq);
        else r.cg[(m * r.G + g) * 16 + l] = 128 * sq;
        continue;
      }
      const int64_t t = b - r.G * GB, g = t / per, j = t % per;
      if (q4) {
        for (int p = 0; p < 2; ++p) {
          int8_t* dst = r.xt.data() + ((m * r.gt + g) * 2 + p) * 128;
          std::memcpy(dst + 16 * j, qb[p], 16);           // elements 0..15
          std::memcpy(dst + 64 + 16 * j, qb[p] + 16, 16);  // elements 16..31
        }
        float* dl = r.dt.data() + (m * r.gt + g) * 16 + 4 * j;
        dl[0] = dl[1] = dl[2] = dl[3] = d;
        r.st[m * 16 + t] = d * static_cast<float>(sq);
      } else {
        for (int p = 0; p < 2; ++p) std::memcpy(r.xt.data() + ((m * r.gt + g) * 2 + p) * 64 + 32 * j, qb[p], 32);
        float* dl = r.dt.data() + (m * r.gt + g) * 16 + 8 * j;
        int32_t* cl = r.ct.data() + (m * r.gt + g) * 16 + 8 * j;
        for (int i = 0; i < 8; ++i) {
          dl[i] = d;
          int32_t s4 = 0;
          for (int k = 4 * i; k < 4 * i + 4; ++k) s4 += 256 * qb[0][k] + qb[1][k];
          cl[i] = 128 * s4;
        }
      }
    }
  }
}

inline __m512 halves_to_lanes(const at::Half* p, int nvalid, int per) {
  // `per` fp16 scales -> 16 fp32 lanes, lane l = scale l / (16 / per) (0 for scales past the row's end)
  __m128i h = _mm_maskz_loadu_epi16(static_cast<__mmask8>((1u << nvalid) - 1), p);
  __m512 f = _mm512_castps128_ps512(_mm_cvtph_ps(h));
  const __m512i i4 = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
  const __m512i i2 = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  return _mm512_permutexvar_ps(per == 4 ? i4 : i2, f);
}

inline __m512 halves16(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// q4 row layout: G groups of 256 bytes (vector v = 0..3, lane l = block l of the group, byte k: low nibble
// quant 4v + k, high nibble quant 16 + 4v + k), then the tail's blocks, 16 bytes each (byte i: quant i | quant
// 16 + i << 4), then the scale section, w = a * q + c per block, in one of three forms (told apart by the
// row's length): fp16 a[nb] then fp16 c[nb] (Q4_1: 4 bytes a block); fp16 a[nb] alone, c = -8 a (Q4_0: 2
// bytes); Q4_K's own: uint8 sc[nb], uint8 mn[nb], fp16 d[nb / 8], fp16 dmin[nb / 8], a = d * sc and
// c = -(dmin * mn) per super-block of 8 blocks (2.5 bytes; both products exact in fp32). A decode step
// reads every weight byte once, so the scales are kept as small as the file has them.
enum Q4Form { Q4_AC = 0, Q4_A = 1, Q4_KS = 2 };

// The form of a q4 row of `row` bytes for K columns, or -1.
int q4_form(int64_t row, int64_t K) {
  const int64_t nb = K / QK;
  if (row == 20 * nb) return Q4_AC;
  if (row == 18 * nb) return Q4_A;
  if (nb % 8 == 0 && 2 * row == 37 * nb) return Q4_KS;
  return -1;
}

inline __m512 u8_16(const uint8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

// a and c of blocks 16 g .. 16 g + 15 of a row whose scale section is s (nb blocks), as fp32 lanes.
template <int form>
inline void group_ac(const uint8_t* s, int64_t nb, int64_t g, __m512& a, __m512& c) {
  const at::Half* h = reinterpret_cast<const at::Half*>(s);
  if constexpr (form == Q4_AC) {
    a = halves16(h + GB * g);
    c = halves16(h + nb + GB * g);
  } else if constexpr (form == Q4_A) {
    a = halves16(h + GB * g);
    c = _mm512_mul_ps(a, _mm512_set1_ps(-8.f));
  } else {
    const at::Half* dd = reinterpret_cast<const at::Half*>(s + 2 * nb);  // d[nb / 8], then dmin[nb / 8]
    const __m512i i2 = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m512 d = _mm512_permutexvar_ps(i2, _mm512_castps128_ps512(_mm_cvtph_ps(
        _mm_maskz_loadu_epi16(0x3, dd + 2 * g))));
    const __m512 dm = _mm512_permutexvar_ps(i2, _mm512_castps128_ps512(_mm_cvtph_ps(
        _mm_maskz_loadu_epi16(0x3, dd + nb / 8 + 2 * g))));
    a = _mm512_mul_ps(d, u8_16(s + GB * g));
    c = _mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(dm, u8_16(s + nb + GB * g)));
  }
}

// a and c of the tail's blocks (rt < 16 of them, from block 16 G on) as fp32 lanes, lane l = block 16 G + l,
// 0 past the row's end; by the same operations as group_ac. (Q4_K rows hold whole super-blocks of 8: a tail is
// one super-block.)
template <int form>
inline void tail_ac(const uint8_t* s, int64_t nb, int64_t G, int64_t rt, __m512& a, __m512& c) {
  const at::Half* h = reinterpret_cast<const at::Half*>(s);
  const __mmask16 m = static_cast<__mmask16>((1u << rt) - 1);
  if constexpr (form == Q4_KS) {
    const at::Half* dd = reinterpret_cast<const at::Half*>(s + 2 * nb);
    const __m512 d = _mm512_set1_ps(static_cast<float>(dd[2 * G]));
    const __m512 dm = _mm512_set1_ps(static_cast<float>(dd[nb / 8 + 2 * G]));
    const __m512 sc = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, s + GB * G)));
    const __m512 mn = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, s + nb + GB * G)));
    a = _mm512_mul_ps(d, sc);
    c = _mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(dm, mn));
    return;
  }
  a = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, h + GB * G));
  if constexpr (form == Q4_AC) c = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, h + nb + GB * G));
  else c = _mm512_mul_ps(a, _mm512_set1_ps(-8.f));
}
// The tail of NW q4 rows (blocks past their last whole group) for R activation rows, added into acc[j][i]
// (at_[j] / cf[j]: a and c of row j's tail blocks, tail_ac). Per output the same operations whatever NW and R.
template <int NW, int R>
void q4_tail(const uint8_t* const* w, const __m512* at_, const __m512* cf, const QRows& r, int64_t m0,
             __m512 (*acc)[R]) {
  const __m512i i4 = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
  if (r.rt <= 2) {
    // One or two tail blocks fill half a vector: the same operations on 256-bit vectors, lane for lane (the
    // 512-bit form's upper lanes hold +0 there and add nothing), at half the cost on cores that split 512-bit
    // work in two, each activation vector loaded once for the NW rows. A 576-wide row (18 blocks) spent ~40%
    // of a width-8 matmul in its 2-block tail.
    const __m256i lo4 = _mm256_set1_epi8(0x0F);
    const __mmask32 km = static_cast<__mmask32>((1ULL << (16 * r.rt)) - 1);
    __m256i lo[NW], hi[NW];
    __m256 al[NW], c8[NW];
    for (int j = 0; j < NW; ++j) {
      const __m256i v = _mm256_maskz_loadu_epi8(km, w[j] + 256 * r.G);
      lo[j] = _mm256_and_si256(v, lo4);
      hi[j] = _mm256_and_si256(_mm256_srli_epi16(v, 4), lo4);
      al[j] = _mm512_castps512_ps256(_mm512_permutexvar_ps(i4, at_[j]));
      c8[j] = _mm512_castps512_ps256(cf[j]);
    }
    for (int i = 0; i < R; ++i) {
      const int8_t* xq = r.xt.data() + (m0 + i) * r.gt * 256;
      const auto ld = [xq](int o) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + o)); };
      const __m256i x0 = ld(0), x1 = ld(64), x2 = ld(128), x3 = ld(192);
      const __m256 dx = _mm256_loadu_ps(r.dt.data() + (m0 + i) * r.gt * 16);
      const __m256 sx = _mm256_loadu_ps(r.st.data() + (m0 + i) * 16);
      for (int j = 0; j < NW; ++j) {
        __m256i s = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), lo[j], x0), hi[j], x1);
        const __m256i f = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), lo[j], x2), hi[j], x3);
        s = _mm256_add_epi32(_mm256_slli_epi32(s, 8), f);
        __m256 t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(al[j], dx), _mm256_setzero_ps());
        t = _mm256_fmadd_ps(c8[j], sx, t);
        acc[j][i] = _mm512_add_ps(acc[j][i], _mm512_zextps256_ps512(t));
      }
    }
    return;
  }
  const __m512i lo4 = _mm512_set1_epi8(0x0F);
  for (int j = 0; j < NW; ++j) {
    const uint8_t* wt = w[j] + 256 * r.G;
    __m512 tacc[R];
    for (int i = 0; i < R; ++i) tacc[i] = _mm512_setzero_ps();
    for (int64_t g = 0; g < r.gt; ++g) {
      const int nvalid = static_cast<int>(std::min<int64_t>(4, r.rt - 4 * g));
      const __mmask64 km = nvalid == 4 ? ~0ULL : ((1ULL << (16 * nvalid)) - 1);
      const __m512i v = _mm512_maskz_loadu_epi8(km, wt + 64 * g);
      const __m512i lo = _mm512_and_si512(v, lo4);
      const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), lo4);
      const __m512 al =
          _mm512_permutexvar_ps(_mm512_add_epi32(i4, _mm512_set1_epi32(static_cast<int>(4 * g))), at_[j]);
      for (int i = 0; i < R; ++i) {
        const int8_t* xq = r.xt.data() + ((m0 + i) * r.gt + g) * 256;
        __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(xq));
        s = _mm512_dpbusd_epi32(s, hi, _mm512_loadu_si512(xq + 64));
        __m512i f = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(xq + 128));
        f = _mm512_dpbusd_epi32(f, hi, _mm512_loadu_si512(xq + 192));
        s = _mm512_add_epi32(_mm512_slli_epi32(s, 8), f);
        const __m512 sc = _mm512_mul_ps(al, _mm512_loadu_ps(r.dt.data() + ((m0 + i) * r.gt + g) * 16));
        tacc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), sc, tacc[i]);
      }
    }
    // the tail's offsets: c * dx * sum(q) per tail block (< 16 of them)
    for (int i = 0; i < R; ++i) {
      tacc[i] = _mm512_fmadd_ps(cf[j], _mm512_loadu_ps(r.st.data() + (m0 + i) * 16), tacc[i]);
      acc[j][i] = _mm512_add_ps(acc[j][i], tacc[i]);
    }
  }
}

// NW weight rows (w[j]: its bytes; its fp16 a then c after K/2 bytes) times R activation rows from m0:
// y[i * ldy + j]. Each activation vector loaded once for the NW rows, each weight vector once for the R
// rows. Per output the same operations whatever NW and R: the block sums are exact integers (256 * coarse
// plane + fine plane, < 2^24), then acc = fma(sum, a * d, acc), acc = fma(c, d * sum(q), acc) per group,
// the tail, one horizontal sum.
template <int NW, int R, int form>
void q4_rows(const uint8_t* const* w, int64_t K, const QRows& r, int64_t m0, float* y, int64_t ldy) {
  __m512 acc[NW][R];
  for (int j = 0; j < NW; ++j)
    for (int i = 0; i < R; ++i) acc[j][i] = _mm512_setzero_ps();
  const __m512i lo4 = _mm512_set1_epi8(0x0F);
  for (int64_t g = 0; g < r.G; ++g) {
    __m512i si[NW][R];
    if constexpr (NW * R == 1) {
      // one output (decode): its group's weights unpacked once, four independent dpbusd chains (two per
      // plane) so their latency overlaps
      __m512i lo[4], hi[4];
      for (int v = 0; v < 4; ++v) {
        const __m512i wv = _mm512_loadu_si512(w[0] + 256 * g + 64 * v);
        lo[v] = _mm512_and_si512(wv, lo4);
        hi[v] = _mm512_and_si512(_mm512_srli_epi16(wv, 4), lo4);
      }
      __m512i sp[2];
      for (int p = 0; p < 2; ++p) {
        const int8_t* xp = r.xg.data() + (m0 * r.G + g) * 1024 + 512 * p;
        __m512i s0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo[0], _mm512_loadu_si512(xp));
        __m512i s1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), hi[0], _mm512_loadu_si512(xp + 256));
        for (int v = 1; v < 4; ++v) {
          s0 = _mm512_dpbusd_epi32(s0, lo[v], _mm512_loadu_si512(xp + 64 * v));
          s1 = _mm512_dpbusd_epi32(s1, hi[v], _mm512_loadu_si512(xp + 256 + 64 * v));
        }
        sp[p] = _mm512_add_epi32(s0, s1);
      }
      si[0][0] = _mm512_add_epi32(_mm512_slli_epi32(sp[0], 8), sp[1]);
    } else {
      // a tile: each activation vector feeds NW weight rows, each weight vector R activation rows; one
      // chain per output (NW * R of them in flight)
      for (int j = 0; j < NW; ++j)
        for (int i = 0; i < R; ++i) si[j][i] = _mm512_setzero_si512();
      for (int p = 0; p < 2; ++p) {  // the coarse plane, then (the sums shifted by 8 bits) the fine one
        if (p == 1)
          for (int j = 0; j < NW; ++j)
            for (int i = 0; i < R; ++i) si[j][i] = _mm512_slli_epi32(si[j][i], 8);
        for (int v = 0; v < 4; ++v) {
          __m512i wl[NW], wh[NW];
          for (int j = 0; j < NW; ++j) {
            const __m512i wv = _mm512_loadu_si512(w[j] + 256 * g + 64 * v);
            wl[j] = _mm512_and_si512(wv, lo4);
            wh[j] = _mm512_and_si512(_mm512_srli_epi16(wv, 4), lo4);
          }
          for (int i = 0; i < R; ++i) {
            const int8_t* xp = r.xg.data() + ((m0 + i) * r.G + g) * 1024 + 512 * p + 64 * v;
            const __m512i xl = _mm512_loadu_si512(xp), xh = _mm512_loadu_si512(xp + 256);
            for (int j = 0; j < NW; ++j)
              si[j][i] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(si[j][i], wl[j], xl), wh[j], xh);
          }
        }
      }
    }
    for (int j = 0; j < NW; ++j) {
      __m512 a16, c16;
      group_ac<form>(w[j] + K / 2, r.nb, g, a16, c16);
      for (int i = 0; i < R; ++i) {
        const float* dg = r.dg.data() + ((m0 + i) * r.G + g) * 32;
        acc[j][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(si[j][i]), _mm512_mul_ps(a16, _mm512_loadu_ps(dg)), acc[j][i]);
        acc[j][i] = _mm512_fmadd_ps(c16, _mm512_loadu_ps(dg + 16), acc[j][i]);
      }
    }
  }
  if (r.rt) {
    __m512 at_[NW], ct_[NW];
    for (int j = 0; j < NW; ++j) tail_ac<form>(w[j] + K / 2, r.nb, r.G, r.rt, at_[j], ct_[j]);
    q4_tail<NW, R>(w, at_, ct_, r, m0, acc);
  }
  for (int j = 0; j < NW; ++j)
    for (int i = 0; i < R; ++i) y[i * ldy + j] = _mm512_reduce_add_ps(acc[j][i]);
}

// q8 row layout: G groups of 512 bytes (vector v = 0..7, lane l = block l, bytes: quants 4v..4v+3, +128),
// then the tail's blocks, 32 bytes each, then fp16 d[nb]: w = d * (byte - 128).
template <int R>
void q8_row(const uint8_t* w, const at::Half* d, const QRows& r, int64_t m0, float* y, int64_t ldy) {
  __m512 acc[R];
  for (int i = 0; i < R; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t g = 0; g < r.G; ++g) {
    __m512i wv[8];
    for (int v = 0; v < 8; ++v) wv[v] = _mm512_loadu_si512(w + 512 * g + 64 * v);
    const __m512 d16 = halves16(d + GB * g);
    for (int i = 0; i < R; ++i) {
      const int64_t o = (m0 + i) * r.G + g;
      __m512i sp[2];
      for (int p = 0; p < 2; ++p) {
        const int8_t* xq = r.xg.data() + o * 1024 + 512 * p;
        __m512i s0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv[0], _mm512_loadu_si512(xq));
        __m512i s1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv[1], _mm512_loadu_si512(xq + 64));
        for (int v = 2; v < 8; v += 2) {
          s0 = _mm512_dpbusd_epi32(s0, wv[v], _mm512_loadu_si512(xq + 64 * v));
          s1 = _mm512_dpbusd_epi32(s1, wv[v + 1], _mm512_loadu_si512(xq + 64 * v + 64));
        }
        sp[p] = _mm512_add_epi32(s0, s1);
      }
      // 256 s1 + s2 - 128 sum(256 q1 + q2): |.| < 2^31 (int32 exact), rounded once to fp32
      __m512i s = _mm512_sub_epi32(_mm512_add_epi32(_mm512_slli_epi32(sp[0], 8), sp[1]),
                                   _mm512_loadu_si512(r.cg.data() + o * 16));
      acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(d16, _mm512_loadu_ps(r.dg.data() + o * 32)),
                               acc[i]);
    }
  }
  if (r.rt) {
    const uint8_t* wt = w + 512 * r.G;
    const at::Half* dt_ = d + GB * r.G;
    for (int64_t g = 0; g < r.gt; ++g) {
      const int nvalid = static_cast<int>(std::min<int64_t>(2, r.rt - 2 * g));
      const __mmask64 km = nvalid == 2 ? ~0ULL : ((1ULL << 32) - 1);
      const __m512i v = _mm512_maskz_loadu_epi8(km, wt + 64 * g);
      const __m512 dl = halves_to_lanes(dt_ + 2 * g, nvalid, 2);
      for (int i = 0; i < R; ++i) {
        const int64_t o = (m0 + i) * r.gt + g;
        __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), v, _mm512_loadu_si512(r.xt.data() + o * 128));
        __m512i f = _mm512_dpbusd_epi32(_mm512_setzero_si512(), v, _mm512_loadu_si512(r.xt.data() + o * 128 + 64));
        s = _mm512_sub_epi32(_mm512_add_epi32(_mm512_slli_epi32(s, 8), f), _mm512_loadu_si512(r.ct.data() + o * 16));
        acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(dl, _mm512_loadu_ps(r.dt.data() + o * 16)),
                                 acc[i]);
      }
    }
  }
  for (int i = 0; i < R; ++i) y[i * ldy] = _mm512_reduce_add_ps(acc[i]);
}

template <int MAXR, typename Fn>
void over_rows(int64_t M, int64_t m0, Fn&& fn) {
  switch (std::min<int64_t>(MAXR, M - m0)) {
    case 1: fn(std::integral_constant<int, 1>{}); break;
    case 2: fn(std::integral_constant<int, 2>{}); break;
    case 3: fn(std::integral_constant<int, 3>{}); break;
    case 4: fn(std::integral_constant<int, 4>{}); break;
    case 5: if constexpr (MAXR >= 5) fn(std::integral_constant<int, 5>{}); break;
    case 6: if constexpr (MAXR >= 6) fn(std::integral_constant<int, 6>{}); break;
    case 7: if constexpr (MAXR >= 7) fn(std::integral_constant<int, 7>{}); break;
    default: if constexpr (MAXR >= 8) fn(std::integral_constant<int, 8>{}); break;
  }
}

void check_x(const at::Tensor& x, int64_t K) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu(),
              "x must be a contiguous fp32 CPU matrix");
  TORCH_CHECK(x.size(1) == K && K % QK == 0, "x has ", x.size(1), " columns, the weight ", K);
}

// Each (row tile, weight row) pair is one unit of work; threads take ranges of weight rows.
constexpr int64_t GRAIN = 16;
constexpr int64_t AHEAD = 6;  // weight rows prefetched ahead: a row is a short run, too short for the
                              // hardware prefetcher to reach full bandwidth on its own

inline void prefetch(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t o = 0; o < bytes; o += 64) _mm_prefetch(c + o, _MM_HINT_T0);
}

// y[M, N] = x times each weight row, NW weight rows by up to MAXR activation rows at a time:
// `fn(nw, R, weight row pointers, activations, first activation row, out, ld)`.
template <int NW, int MAXR, typename Fn>
at::Tensor blocked_mm(const at::Tensor& x, const at::Tensor& qs, int64_t K, bool q4, Fn&& fn) {
  check_x(x, K);
  const int64_t M = x.size(0), N = qs.size(0), row = qs.size(1);
  QRows r;
  quantize_rows(x.data_ptr<float>(), M, K, q4, r);
  at::Tensor y = at::empty({M, N}, x.options());
  const uint8_t* w = qs.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, GRAIN, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; n += NW) {
      if (n + AHEAD < n1) prefetch(w + (n + AHEAD) * row, std::min<int64_t>(NW, n1 - n - AHEAD) * row);
      const int64_t nw = std::min<int64_t>(NW, n1 - n);
      const uint8_t* rows[NW];
      for (int64_t j = 0; j < NW; ++j) rows[j] = w + (n + std::min(j, nw - 1)) * row;
      for (int64_t m0 = 0; m0 < M; m0 += MAXR)
        over_rows<MAXR>(M, m0, [&](auto R) { fn(nw, R, rows, r, m0, yp + m0 * N + n, N); });
    }
  });
  return y;
}

// Same bits every way; speed (measured on Zen 4): a prefill chunk (16+ rows) in tiles of four weight rows,
// other widths in tiles of two, and one activation row over short weight rows (K < 2048) one weight row at
// a time with more dpbusd chains. (Four-row blocks for one activation row measured 35% slower: a burst of
// prefetches for four rows at a time.)
template <int NW, int form>
at::Tensor q4q8_blocks(const at::Tensor& x, const at::Tensor& qs, int64_t K) {
  return blocked_mm<NW, 4>(x, qs, K, true, [K](int64_t nw, auto R, const uint8_t* const* rows, const QRows& r,
                                               int64_t m0, float* y, int64_t ld) {
    constexpr int RR = decltype(R)::value;
    if constexpr (NW == 4) {
      if (nw == 4) return q4_rows<4, RR, form>(rows, K, r, m0, y, ld);
    }
    if (RR > 1 || K >= 2048) {
      for (int64_t j = 0; j < nw; j += 2) {
        if (nw - j >= 2) q4_rows<2, RR, form>(rows + j, K, r, m0, y + j, ld);
        else q4_rows<1, RR, form>(rows + j, K, r, m0, y + j, ld);
      }
    } else {
      for (int64_t j = 0; j < nw; ++j) q4_rows<1, RR, form>(rows + j, K, r, m0, y + j, ld);
    }
  });
}

template <int form>
at::Tensor q4q8_form(const at::Tensor& x, const at::Tensor& qs, int64_t K) {
  return x.size(0) >= 16 ? q4q8_blocks<4, form>(x, qs, K) : q4q8_blocks<2, form>(x, qs, K);
}

at::Tensor q4q8_mm(const at::Tensor& x, const at::Tensor& qs) {
  TORCH_CHECK(qs.dim() == 2 && qs.scalar_type() == at::kByte && qs.is_contiguous() && qs.device().is_cpu(),
              "w: uint8 [N, K/2 + scale section]");
  TORCH_CHECK(x.dim() == 2, "x must be a matrix");
  const int64_t K = x.size(1);
  const int form = K % QK == 0 ? q4_form(qs.size(1), K) : -1;
  TORCH_CHECK(form >= 0, "x has ", K, " columns; no 4-bit weight layout for those columns has ", qs.size(1),
              " bytes a row");
  if (form == Q4_AC) return q4q8_form<Q4_AC>(x, qs, K);
  if (form == Q4_A) return q4q8_form<Q4_A>(x, qs, K);
  return q4q8_form<Q4_KS>(x, qs, K);
}

at::Tensor q8q8_mm(const at::Tensor& x, const at::Tensor& qs) {
  TORCH_CHECK(qs.dim() == 2 && qs.scalar_type() == at::kByte && qs.is_contiguous() && qs.size(1) % 34 == 0 &&
              qs.device().is_cpu(), "w: uint8 [N, K + K/16]");
  const int64_t K = qs.size(1) / 34 * 32;
  return blocked_mm<1, MT>(x, qs, K, false, [K](int64_t, auto R, const uint8_t* const* rows, const QRows& r,
                                                int64_t m0, float* y, int64_t ld) {
    q8_row<decltype(R)::value>(rows[0], reinterpret_cast<const at::Half*>(rows[0] + K), r, m0, y, ld);
  });
}

// ---- decode attention ------------------------------------------------------------------------------

inline __m512 exp_ps(__m512 x) {
  // e^x for x <= 0 (softmax after subtracting the max): 2^n * p(r), r = x - n ln2, |r| <= ln2 / 2,
  // p the degree-6 Taylor polynomial (relative error ~2e-7); below -87 the result flushes to 0.
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// One KV head of one decode row: writes the row's K and V (kn, vn: [hd]) at `pos` of the head's cache
// (Kh, Vh: [cap, hd]), then attends its g query heads (q: [g, hd]) over positions [0, pos] into o ([g, hd]).
// A fixed order on one thread: the same bits for a row whatever runs beside it.
void attn_head(const float* q, const float* kn, const float* vn, float* Kh, float* Vh, int64_t hd, int64_t g,
               int64_t pos, float* o) {
  std::memcpy(Kh + pos * hd, kn, hd * sizeof(float));
  std::memcpy(Vh + pos * hd, vn, hd * sizeof(float));
  const int64_t L = pos + 1, nv = hd / 16, Lp = (L + 15) / 16 * 16;
  std::vector<float> s(g * Lp);
  std::vector<__m512> qv(g * nv);
  const __m512 scale = _mm512_set1_ps(1.f / std::sqrt(static_cast<float>(hd)));
  for (int64_t i = 0; i < g; ++i)
    for (int64_t c = 0; c < nv; ++c) qv[i * nv + c] = _mm512_mul_ps(_mm512_loadu_ps(q + i * hd + 16 * c), scale);
  // scores: each position's K row read once for the group's query heads
  for (int64_t j = 0; j < L; ++j) {
    const float* kj = Kh + j * hd;
    if (j + 4 < L) _mm_prefetch(reinterpret_cast<const char*>(kj + 4 * hd), _MM_HINT_T0);
    for (int64_t i = 0; i < g; ++i) {
      __m512 acc = _mm512_mul_ps(qv[i * nv], _mm512_loadu_ps(kj));
      for (int64_t c = 1; c < nv; ++c) acc = _mm512_fmadd_ps(qv[i * nv + c], _mm512_loadu_ps(kj + 16 * c), acc);
      s[i * Lp + j] = _mm512_reduce_add_ps(acc);
    }
  }
  for (int64_t i = 0; i < g; ++i) {
    float* si = s.data() + i * Lp;
    // softmax over [0, L): max, exp, sum, 16 positions at a time (the tail masked)
    __m512 mx = _mm512_set1_ps(-INFINITY);
    for (int64_t j = 0; j < L; j += 16) {
      __mmask16 km = L - j >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (L - j)) - 1);
      mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), km, si + j));
    }
    const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < L; j += 16) {
      __mmask16 km = L - j >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (L - j)) - 1);
      __m512 e = _mm512_maskz_mov_ps(km, exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(km, si + j), m)));
      _mm512_storeu_ps(si + j, e);
      sum = _mm512_add_ps(sum, e);
    }
    const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(sum));
    __m512 acc[8];
    float* oi = o + i * hd;
    for (int64_t c0 = 0; c0 < nv; c0 += 8) {  // 8 vectors (128 values of a head) at a time
      const int64_t cn = std::min<int64_t>(8, nv - c0);
      for (int64_t c = 0; c < cn; ++c) acc[c] = _mm512_setzero_ps();
      for (int64_t j = 0; j < L; ++j) {
        const __m512 p = _mm512_set1_ps(si[j]);
        const float* vj = Vh + j * hd + 16 * c0;
        for (int64_t c = 0; c < cn; ++c) acc[c] = _mm512_fmadd_ps(p, _mm512_loadu_ps(vj + 16 * c), acc[c]);
      }
      for (int64_t c = 0; c < cn; ++c) _mm512_storeu_ps(oi + 16 * (c0 + c), _mm512_mul_ps(acc[c], inv));
    }
  }
}

struct Cache {
  float* K;
  float* V;
  int64_t cap;
};

Cache check_cache(at::Tensor& kc, at::Tensor& vc, int64_t layer, int64_t nkv, int64_t hd, int64_t pos) {
  TORCH_CHECK(kc.dim() == 4 && vc.dim() == 4 && kc.scalar_type() == at::kFloat && vc.scalar_type() == at::kFloat &&
              kc.is_contiguous() && vc.is_contiguous() && kc.device().is_cpu() && vc.device().is_cpu(),
              "attn_decode: caches must be contiguous fp32 CPU [layers, nkv, cap, hd]");
  TORCH_CHECK(kc.size(1) == nkv && kc.size(3) == hd && vc.sizes() == kc.sizes(), "attn_decode: cache shape ",
              kc.sizes(), " does not fit ", nkv, " KV heads of ", hd);
  TORCH_CHECK(layer >= 0 && layer < kc.size(0), "attn_decode: layer ", layer, " outside the cache (", kc.size(0), ")");
  TORCH_CHECK(pos >= 0 && pos < kc.size(2), "attn_decode: position ", pos, " outside the cache (", kc.size(2), ")");
  const int64_t cap = kc.size(2), off = layer * nkv * cap * hd;
  return {kc.data_ptr<float>() + off, vc.data_ptr<float>() + off, cap};
}

// B decode rows of one layer, row b at position pos[b] of the session whose caches (all layers) are
// kcs[b] / vcs[b]:
// qk [B, nh + nkv, hd] (rotated q heads, then rotated k heads), v [B, nkv * hd] (rows may be strided).
// Query head h reads KV head h / (nh / nkv) (grouped-query attention). Returns [B, nh * hd]. The (row,
// KV head) pairs are spread over threads; each is computed whole by one (attn_head).
at::Tensor attn_decode_rows(const at::Tensor& qk, const at::Tensor& v, at::TensorList kcs, at::TensorList vcs,
                            at::IntArrayRef pos, int64_t layer) {
  TORCH_CHECK(qk.dim() == 3 && qk.scalar_type() == at::kFloat && qk.is_contiguous() && qk.device().is_cpu(),
              "attn_decode: qk must be contiguous fp32 CPU [B, nh + nkv, hd]");
  const int64_t B = qk.size(0), hd = qk.size(2);
  TORCH_CHECK(B >= 1 && static_cast<int64_t>(kcs.size()) == B && static_cast<int64_t>(vcs.size()) == B &&
              static_cast<int64_t>(pos.size()) == B, "attn_decode: one cache pair and position per row");
  TORCH_CHECK(hd % 16 == 0 && hd > 0, "attn_decode: head size ", hd, " is not a multiple of 16");
  const int64_t nkv = kcs[0].dim() == 4 ? kcs[0].size(1) : 0;
  const int64_t nh = qk.size(1) - nkv;
  TORCH_CHECK(nkv > 0 && nh > 0 && nh % nkv == 0, "attn_decode: ", qk.size(1), " heads do not split into query and ",
              nkv, " KV heads");
  TORCH_CHECK(v.dim() == 2 && v.size(0) == B && v.size(1) == nkv * hd && v.stride(1) == 1 &&
              v.scalar_type() == at::kFloat && v.device().is_cpu(), "attn_decode: v must be fp32 [B, nkv * hd]");
  std::vector<Cache> caches;
  for (int64_t b = 0; b < B; ++b) {
    at::Tensor kc = kcs[b], vc = vcs[b];
    caches.push_back(check_cache(kc, vc, layer, nkv, hd, pos[b]));
  }
  const int64_t g = nh / nkv;
  at::Tensor out = at::empty({B, nh * hd}, qk.options());
  const float* q = qk.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const int64_t vs = v.stride(0);
  at::parallel_for(0, B * nkv, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / nkv, kh = i % nkv;
      const Cache& c = caches[b];
      const float* qb = q + b * (nh + nkv) * hd;
      attn_head(qb + kh * g * hd, qb + (nh + kh) * hd, vp + b * vs + kh * hd, c.K + kh * c.cap * hd,
                c.V + kh * c.cap * hd, hd, g, pos[b], o + b * nh * hd + kh * g * hd);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(mesh402, m) {
  m.def("q4q8_mm(Tensor x, Tensor w) -> Tensor", &q4q8_mm);
  m.def("q8q8_mm(Tensor x, Tensor w) -> Tensor", &q8q8_mm);
  m.def("attn_decode_rows(Tensor qk, Tensor v, Tensor(a!)[] kcs, Tensor(b!)[] vcs, int[] pos, int layer) -> Tensor",
        &attn_decode_rows);
}
