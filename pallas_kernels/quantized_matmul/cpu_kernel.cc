// The CPU kernel of quantized_matmul: y[M, N] = x[M, K] @ w[K, N], w stored as packed codes.
//
// An XLA FFI custom call (jax.ffi). Built on first use by cpu.py with the machine's C++
// compiler (-O3 -march=native); see cpu.py for the contract and reference.py for the
// terminology (codes, planes, groups, scales, zeros).
//
// Decoding is memory-bound at small M (token-by-token decoding), so the kernel reads the packed
// codes once and never writes the decoded weight: for each group of `group_size` rows (K) and
// each column, it accumulates sum_k x[m, k] * v[k, n] over the group's codes, then adds
// scale[g, n] * (that sum - zero[g, n] * sum_k x[m, k]) to y. The column range is split into
// chunks that the XLA CPU intra-op thread pool runs in parallel.
//
// Layout: a packed byte holds `per = 8 / bits` codes of consecutive columns (plane p: bits
// [p * bits, (p + 1) * bits)). The decoded rows, the accumulators, and the scales, zero points
// and y this kernel is called with are all plane-major ("deinterleaved": column per * j + p at
// p * packed_n + j, N padded to per * packed_n; cpu.py reorders them), so every inner loop
// runs over consecutive floats with unit stride and the compiler vectorizes it.
//
// Code kinds: 0 = two's complement integers (arithmetic sign extension), 1 = unsigned integers
// (the code itself), 2 = table lookup (`table[code]`: E2M1, E4M3, lookup formats).

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kChunkBytes = 64;  // bytes of a row per work item (128 columns at 4 bits)

struct Problem {
  int64_t m, k, n, packed_n, bits, kind, group_size;
  const float* x;         // [m, k]
  const uint8_t* codes;   // [k, packed_n]
  const float* scales;    // [k / group_size, n] plane-major, tensor scale included
  const float* zeros;     // [k / group_size, n] plane-major, or nullptr
  const float* table;     // [2**bits]
  float* y;               // [m, n] plane-major
};

// Decodes plane p of `bytes` packed bytes of one row into out[0 .. bytes).
template <int kBits, int kKind>
inline void DecodePlane(const uint8_t* __restrict row, int64_t bytes, int p,
                        const float* __restrict table, float* __restrict out) {
  constexpr int kMask = (1 << kBits) - 1;
  const int shift = p * kBits;
  if constexpr (kKind == 0) {
    // Move the code to the top of an int32, then shift back arithmetically: sign extension.
    const int up = 32 - kBits - shift;
    for (int64_t j = 0; j < bytes; ++j) {
      out[j] = static_cast<float>(static_cast<int32_t>(static_cast<uint32_t>(row[j]) << up) >>
                                  (32 - kBits));
    }
  } else if constexpr (kKind == 1) {
    for (int64_t j = 0; j < bytes; ++j) {
      out[j] = static_cast<float>((static_cast<int32_t>(row[j]) >> shift) & kMask);
    }
  } else {
    for (int64_t j = 0; j < bytes; ++j) {
      out[j] = table[(static_cast<int32_t>(row[j]) >> shift) & kMask];
    }
  }
}

// The value of the code in plane kP of byte b.
template <int kBits, int kKind, int kP>
inline float Decode1(uint32_t b, const float* __restrict table) {
  constexpr int kMask = (1 << kBits) - 1;
  if constexpr (kKind == 0) {
    return static_cast<float>(static_cast<int32_t>(b << (32 - kBits - kP * kBits)) >>
                              (32 - kBits));
  } else if constexpr (kKind == 1) {
    return static_cast<float>((b >> (kP * kBits)) & kMask);
  } else {
    return table[(b >> (kP * kBits)) & kMask];
  }
}

// One row of x (M = 1, decoding): four rows of codes per pass, decoded in registers and
// multiplied straight into the accumulators, every plane of a byte in the same pass.
template <int kBits, int kKind, int kP>
inline void FusedPlane(float* __restrict a, const uint8_t* __restrict r0,
                       const uint8_t* __restrict r1, const uint8_t* __restrict r2,
                       const uint8_t* __restrict r3, const float* xs, int64_t nb,
                       const float* __restrict table) {
  const float x0 = xs[0], x1 = xs[1], x2 = xs[2], x3 = xs[3];
  for (int64_t j = 0; j < nb; ++j) {
    // a chain of four multiply-adds (fused by -ffp-contract), not a tree of products and sums
    a[j] = (((a[j] + x0 * Decode1<kBits, kKind, kP>(r0[j], table)) +
             x1 * Decode1<kBits, kKind, kP>(r1[j], table)) +
            x2 * Decode1<kBits, kKind, kP>(r2[j], table)) +
           x3 * Decode1<kBits, kKind, kP>(r3[j], table);
  }
}

template <int kBits, int kKind, int... kPs>
inline void FusedRows(float* a, const uint8_t* r0, const uint8_t* r1, const uint8_t* r2,
                      const uint8_t* r3, const float* xs, int64_t nb, const float* table,
                      std::integer_sequence<int, kPs...>) {
  (FusedPlane<kBits, kKind, kPs>(a + kPs * nb, r0, r1, r2, r3, xs, nb, table), ...);
}

// acc[j] += sum_r xs[r] * decoded[r][j] for j < nb: kRows rows of K at once, so the
// accumulators are loaded and stored once per kRows multiply-adds.
template <int kRows>
inline void Axpy(float* __restrict acc, const float* __restrict decoded, int64_t stride,
                 const float* xs, int64_t nb) {
  if constexpr (kRows == 4) {
    const float x0 = xs[0], x1 = xs[1], x2 = xs[2], x3 = xs[3];
    const float* __restrict d0 = decoded;
    const float* __restrict d1 = decoded + stride;
    const float* __restrict d2 = decoded + 2 * stride;
    const float* __restrict d3 = decoded + 3 * stride;
    for (int64_t j = 0; j < nb; ++j) {
      acc[j] = (((acc[j] + x0 * d0[j]) + x1 * d1[j]) + x2 * d2[j]) + x3 * d3[j];
    }
  } else {
    const float x0 = xs[0];
    for (int64_t j = 0; j < nb; ++j) acc[j] += x0 * decoded[j];
  }
}

// Axpy<4> for kM rows of x at once (acc rows `stride` floats apart; xs: [kM rows of x][4 rows
// of K]): each decoded vector is loaded once for 4 * kM products. kM = 4 keeps the 16
// broadcast x values, 4 accumulators and 4 decoded vectors in the 32 vector registers.
template <int kM>
inline void AxpyMx4(float* acc, const float* __restrict decoded, int64_t stride,
                    const float* __restrict x, int64_t nb);

template <>
inline void AxpyMx4<4>(float* acc, const float* __restrict decoded, int64_t stride,
                        const float* __restrict x, int64_t nb) {
  float* __restrict a0 = acc + 0 * stride;
  float* __restrict a1 = acc + 1 * stride;
  float* __restrict a2 = acc + 2 * stride;
  float* __restrict a3 = acc + 3 * stride;
  const float* __restrict d0 = decoded;
  const float* __restrict d1 = decoded + stride;
  const float* __restrict d2 = decoded + 2 * stride;
  const float* __restrict d3 = decoded + 3 * stride;
  for (int64_t j = 0; j < nb; ++j) {
    const float v0 = d0[j], v1 = d1[j], v2 = d2[j], v3 = d3[j];
    a0[j] = (((a0[j] + x[0] * v0) + x[1] * v1) + x[2] * v2) + x[3] * v3;
    a1[j] = (((a1[j] + x[4] * v0) + x[5] * v1) + x[6] * v2) + x[7] * v3;
    a2[j] = (((a2[j] + x[8] * v0) + x[9] * v1) + x[10] * v2) + x[11] * v3;
    a3[j] = (((a3[j] + x[12] * v0) + x[13] * v1) + x[14] * v2) + x[15] * v3;
  }
}

// Columns [byte0 * per, byte1 * per) of y, all M rows.
template <int kBits, int kKind>
void RunChunk(const Problem& pr, int64_t byte0, int64_t byte1) {
  constexpr int kPer = 8 / kBits;
  constexpr int kRows = 4;
  const int64_t nb = byte1 - byte0;
  const int64_t m = pr.m, n = pr.n;
  const int64_t g = pr.group_size;
  const int64_t plane = kPer * nb;  // decoded floats of one row of the chunk
  // acc[(mi * kPer + p) * nb + j]; decoded[(r * kPer + p) * nb + j] for kRows rows
  std::vector<float> acc(static_cast<size_t>(m * plane));
  std::vector<float> decoded(static_cast<size_t>(kRows * plane));
  std::vector<float> xsum(static_cast<size_t>(m));
  std::vector<float> xs(static_cast<size_t>(m * kRows));
  for (int64_t g0 = 0; g0 < pr.k; g0 += g) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    std::fill(xsum.begin(), xsum.end(), 0.0f);
    for (int64_t kk = g0; kk < g0 + g;) {
      const int rows = (g0 + g - kk >= kRows) ? kRows : 1;
      if (m == 1 && rows == kRows) {
        const uint8_t* r0 = pr.codes + kk * pr.packed_n + byte0;
        const float* x4 = pr.x + kk;
        xsum[0] += (x4[0] + x4[1]) + (x4[2] + x4[3]);
        FusedRows<kBits, kKind>(acc.data(), r0, r0 + pr.packed_n, r0 + 2 * pr.packed_n,
                                r0 + 3 * pr.packed_n, x4, nb, pr.table,
                                std::make_integer_sequence<int, kPer>{});
        kk += rows;
        continue;
      }
      for (int r = 0; r < rows; ++r) {
        const uint8_t* row = pr.codes + (kk + r) * pr.packed_n + byte0;
        for (int p = 0; p < kPer; ++p) {
          DecodePlane<kBits, kKind>(row, nb, p, pr.table, decoded.data() + r * plane + p * nb);
        }
      }
      for (int64_t mi = 0; mi < m; ++mi) {
        float* x4 = xs.data() + mi * kRows;
        for (int r = 0; r < rows; ++r) {
          x4[r] = pr.x[mi * pr.k + kk + r];
          xsum[mi] += x4[r];
        }
      }
      int64_t mi = 0;
      if (rows == kRows) {
        for (; mi + 4 <= m; mi += 4) {
          AxpyMx4<4>(acc.data() + mi * plane, decoded.data(), plane, xs.data() + mi * kRows,
                     plane);
        }
      }
      for (; mi < m; ++mi) {
        float* a = acc.data() + mi * plane;
        if (rows == kRows) {
          Axpy<kRows>(a, decoded.data(), plane, xs.data() + mi * kRows, plane);
        } else {
          Axpy<1>(a, decoded.data(), plane, xs.data() + mi * kRows, plane);
        }
      }
      kk += rows;
    }
    // Scales, zero points and y are plane-major (column per * j + p at p * packed_n + j), so
    // this epilogue runs over consecutive floats too.
    const int64_t gi = g0 / g;
    const float* s = pr.scales + gi * n;
    const float* z = pr.zeros ? pr.zeros + gi * n : nullptr;
    for (int64_t mi = 0; mi < m; ++mi) {
      const float xs_m = xsum[mi];
      for (int p = 0; p < kPer; ++p) {
        const float* __restrict ap = acc.data() + mi * plane + p * nb;
        const float* __restrict sp = s + p * pr.packed_n + byte0;
        float* __restrict yp = pr.y + mi * n + p * pr.packed_n + byte0;
        if (z) {
          const float* __restrict zp = z + p * pr.packed_n + byte0;
          for (int64_t j = 0; j < nb; ++j) yp[j] += sp[j] * (ap[j] - zp[j] * xs_m);
        } else {
          for (int64_t j = 0; j < nb; ++j) yp[j] += sp[j] * ap[j];
        }
      }
    }
  }
}

using ChunkFn = void (*)(const Problem&, int64_t, int64_t);

template <int kBits>
ChunkFn PickKind(int64_t kind) {
  if (kind == 0) return RunChunk<kBits, 0>;
  if (kind == 1) return RunChunk<kBits, 1>;
  return RunChunk<kBits, 2>;
}

ChunkFn Pick(int64_t bits, int64_t kind) {
  if (bits == 2) return PickKind<2>(kind);
  if (bits == 4) return PickKind<4>(kind);
  return PickKind<8>(kind);
}

// Work items are claimed from a shared counter, by the caller and by tasks on the pool; the
// caller waits only for items another thread has claimed (and is running), so it never waits
// on a task still queued behind busy workers. Tasks that start late find nothing to claim.
struct Work {
  Problem pr;
  ChunkFn fn;
  int64_t items, chunk;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void Drain() {
    for (int64_t i; (i = next.fetch_add(1)) < items;) {
      const int64_t b0 = i * chunk;
      fn(pr, b0, std::min(b0 + chunk, pr.packed_n));
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

ffi::Error Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> codes,
                ffi::Buffer<ffi::F32> scales, ffi::Buffer<ffi::F32> zeros,
                ffi::Buffer<ffi::F32> table, ffi::ResultBuffer<ffi::F32> y, int64_t bits,
                int64_t kind, int64_t group_size, bool has_zeros) {
  auto xd = x.dimensions(), cd = codes.dimensions(), sd = scales.dimensions();
  if (xd.size() != 2 || cd.size() != 2 || sd.size() != 2) {
    return ffi::Error::InvalidArgument("quantized_matmul_cpu: x, codes, scales must be 2-D");
  }
  if (bits != 2 && bits != 4 && bits != 8) {
    return ffi::Error::InvalidArgument("quantized_matmul_cpu: bits must be 2, 4 or 8");
  }
  Problem pr;
  pr.m = xd[0];
  pr.k = xd[1];
  pr.n = sd[1];
  pr.packed_n = cd[1];
  pr.bits = bits;
  pr.kind = kind;
  pr.group_size = group_size > 0 ? group_size : pr.k;
  if (cd[0] != pr.k || pr.group_size == 0 || pr.k % pr.group_size ||
      sd[0] != pr.k / pr.group_size || pr.n != pr.packed_n * (8 / bits)) {
    return ffi::Error::InvalidArgument("quantized_matmul_cpu: inconsistent shapes");
  }
  if (table.element_count() != (int64_t{1} << bits)) {
    return ffi::Error::InvalidArgument("quantized_matmul_cpu: table must have 2**bits values");
  }
  pr.x = x.typed_data();
  pr.codes = codes.typed_data();
  pr.scales = scales.typed_data();
  pr.zeros = has_zeros ? zeros.typed_data() : nullptr;
  pr.table = table.typed_data();
  pr.y = y->typed_data();
  std::memset(pr.y, 0, sizeof(float) * pr.m * pr.n);
  if (pr.m == 0 || pr.n == 0 || pr.k == 0) return ffi::Error::Success();

  auto work = std::make_shared<Work>();
  work->pr = pr;
  work->fn = Pick(bits, kind);
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  // One item per thread (fewer passes over each row's start), at least kChunkBytes each.
  int64_t chunk = std::max<int64_t>(kChunkBytes, (pr.packed_n + threads - 1) / threads);
  chunk = (chunk + 15) / 16 * 16;
  work->chunk = chunk;
  work->items = (pr.packed_n + chunk - 1) / chunk;
  for (int64_t t = 1; t < std::min(threads, work->items); ++t) {
    pool.Schedule([work] { work->Drain(); });
  }
  work->Drain();
  while (work->done.load(std::memory_order_acquire) < work->items) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxquantQuantizedMatmulCpu, Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::U8>>()   // codes
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scales
                                  .Arg<ffi::Buffer<ffi::F32>>()  // zeros ([0] when absent)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // table
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y
                                  .Attr<int64_t>("bits")
                                  .Attr<int64_t>("kind")
                                  .Attr<int64_t>("group_size")
                                  .Attr<bool>("has_zeros"));
