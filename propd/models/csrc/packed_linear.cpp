// propd's CPU extension for decoding steps (AVX2 + FMA), float32 or bfloat16: a kernel for linear layers applied to
// few rows (below), attention of a few query tokens over the KV cache (tree_attention), rotary embedding with the cache
// write (rope_and_cache), RMSNorm (rms_norm), and a whole decoder layer of a step in one call (decoder_layer).
//
// The linear kernel:
// y[m, o] = sum_k x[m, k] * w[o, k]. The weight is packed once into panels of 16 output rows, (ceil(O/16), K, 16),
// so that for each k one load feeds 16 outputs; each panel is streamed from memory once per call, and the rows of x
// are taken in balanced blocks of at most 6 (12 accumulator registers), the register-blocked outer-product scheme of
// BLIS-style GEMM micro-kernels (Van Zee and van de Geijn, "BLIS: A Framework for Rapidly Instantiating BLAS
// Functionality", ACM TOMS 2015). While a panel is computed, its blocks prefetch the next panel (each block its share,
// the later blocks reading the current panel from cache), so the memory stream runs a panel ahead of the arithmetic
// and up to about 16 rows cost little more than one row's stream (benchmarks/linear_kernel.py).
//
// bfloat16 weights stay bfloat16 in memory (half the bytes to stream) and are widened to float32 in registers (a
// bfloat16 is the upper half of a float32); x is widened once per call, products and sums are float32, and y is rounded
// to bfloat16 at the end. Where the CPU has AVX-512F the panels run 16 wide (the AVX-512 path below, chosen at run
// time); the result is the same bit for bit.
//
// Every y[m, o] is one chain of fused multiply-adds over k in order, whatever the number of rows or their blocking: a
// row's result does not depend on the other rows (batch invariance).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <type_traits>
#include <thread>
#include <utility>
#include <vector>

namespace {

constexpr int64_t kPanel = 16;
constexpr int64_t kMaxBlock = 6;
constexpr int64_t kLine = 64;  // bytes per cache line

// Cache lines of the next panel to prefetch while this block runs: one every `every` steps of a micro-kernel's loop
// over k, from `next` on. step(count) once per step, ``count`` a local of the kernel's (so it stays in a register).
struct Prefetch {
    const char* next = nullptr;
    int64_t every = 0;  // 0: none
    inline void step(int64_t& count) {
        if (every && ++count == every) {
            count = 0;
            _mm_prefetch(next, _MM_HINT_T0);
            next += kLine;
        }
    }
};

// The paired panel kernels (micro512x2, micro_dp2) read one cache line of each panel per step over k and ask for the
// line kStreamAhead steps on into L2: with a few rows per step the hardware prefetcher keeps too few lines in flight
// to overlap the weights' stream with the multiply-adds (benchmarks/kernel_ab.py). Past a panel's end the line is the
// next panel's (or, past the weight's end, unused: a prefetch never faults).
// float32 panels of fewer rows stream as fast without it.
constexpr int64_t kStreamAhead = 48;
constexpr int kStreamAheadRows32 = 6;

inline void stream_ahead(const void* line) { _mm_prefetch(static_cast<const char*>(line), _MM_HINT_T1); }

// Calls f(std::integral_constant<int, R>{}) with R = mr, for 1 <= mr <= Max: the micro-kernels take their row count as
// a template argument so that every loop over rows unrolls; this is the one switch from a run-time count to it.
template <int Max, typename Fn>
inline void with_rows(int64_t mr, Fn&& f) {
    if constexpr (Max > 1) {
        if (mr < Max) {
            with_rows<Max - 1>(mr, std::forward<Fn>(f));
            return;
        }
    }
    f(std::integral_constant<int, Max>{});
}

// The 16 weights of one k of a panel, as two float32 vectors.
inline void load16(const float* p, __m256& w0, __m256& w1) {
    w0 = _mm256_loadu_ps(p);
    w1 = _mm256_loadu_ps(p + 8);
}

inline void load16(const uint16_t* p, __m256& w0, __m256& w1) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    w0 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(raw)), 16));
    w1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(raw, 1)), 16));
}

// Rows of 16 outputs held as two 8-wide halves, stored to y (row stride ldy); only the first ``width`` outputs where
// the panel is the last of a matrix whose row count is not a multiple of 16. Always inlined, so that the
// accumulators stay in registers in the micro-kernels' loops.
template <int MR>
inline __attribute__((always_inline)) void store_rows(const __m256* a0, const __m256* a1, float* y, int64_t ldy, int64_t width) {
    if (width == kPanel) {
#pragma GCC unroll 8
        for (int r = 0; r < MR; ++r) {
            _mm256_storeu_ps(y + r * ldy, a0[r]);
            _mm256_storeu_ps(y + r * ldy + 8, a1[r]);
        }
        return;
    }
    alignas(32) float tmp[kPanel];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
        _mm256_store_ps(tmp, a0[r]);
        _mm256_store_ps(tmp + 8, a1[r]);
        for (int64_t j = 0; j < width; ++j) y[r * ldy + j] = tmp[j];
    }
}

// From this many rows the AVX2 micro-kernel asks each step for its panel's line kStreamAheadAvx2 float32 steps on
// (the same bytes for bfloat16 panels) into L2, as the paired AVX-512 kernels do, rather than for the next panel a
// share per block: the weights' stream then overlaps the rows' multiply-adds, which it followed before (one row,
// whose arithmetic is short, keeps the next-panel prefetch). Farther than the AVX-512 pairs' distance: one stream
// per thread here, and more arithmetic per line at 8-wide FMAs.
constexpr int kStreamAheadRowsAvx2 = 2;
constexpr int64_t kStreamAheadAvx2 = 96;

// Every loop over r is fully unrolled so that the accumulators live in registers; a rolled loop makes GCC keep them in
// a stack array and store all 12 each k, which halves the speed.
template <int MR, typename W>
inline void micro(const W* __restrict__ panel, const float* __restrict__ x, int64_t K, float* __restrict__ y,
                  int64_t ldy, int64_t width, Prefetch pf) {
    __m256 a0[MR], a1[MR];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
        a0[r] = _mm256_setzero_ps();
        a1[r] = _mm256_setzero_ps();
    }
    int64_t count = 0;
    for (int64_t k = 0; k < K; ++k) {
        __m256 w0, w1;
        load16(panel + kPanel * k, w0, w1);
        if constexpr (MR >= kStreamAheadRowsAvx2) {
            stream_ahead(panel + kPanel * (k + kStreamAheadAvx2 * int64_t(sizeof(float) / sizeof(W))));
        } else {
            pf.step(count);
        }
#pragma GCC unroll 8
        for (int r = 0; r < MR; ++r) {
            const __m256 xb = _mm256_broadcast_ss(x + r * K + k);
            a0[r] = _mm256_fmadd_ps(w0, xb, a0[r]);
            a1[r] = _mm256_fmadd_ps(w1, xb, a1[r]);
        }
    }
    store_rows<MR>(a0, a1, y, ldy, width);
}

template <typename W>
void block(int64_t mr, const W* panel, const float* x, int64_t K, float* y, int64_t ldy, int64_t width, Prefetch pf) {
    with_rows<kMaxBlock>(mr, [&](auto rows) { micro<decltype(rows)::value>(panel, x, K, y, ldy, width, pf); });
}

// ---------------------------------------------------------------------------------------------- AVX-512 path
// The same panels with one 16-wide register per row: half the instructions of the AVX2 path per panel, and blocks of
// up to 12 rows (12 accumulators of the 32 registers), so that up to 12 rows read each panel once. Compiled for
// AVX-512F by function attributes and chosen at run time (cpu_has_avx512), so one build serves every x86-64 machine.
// Each y[m, o] is the same chain of fused multiply-adds over k in order as in the AVX2 path: results are equal bit
// for bit, whichever path runs.
constexpr int64_t kMaxBlock512 = 12;
// AVX-512 products take their panels in pairs (micro512x2, micro_dp2; a last odd panel alone) at every row count.

#define PROPD_AVX512 __attribute__((target("avx512f")))

PROPD_AVX512 inline __m512 load16z(const float* p) { return _mm512_loadu_ps(p); }

PROPD_AVX512 inline __m512 load16z(const uint16_t* p) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

template <int MR, typename W>
PROPD_AVX512 inline void micro512(const W* __restrict__ panel, const float* __restrict__ x, int64_t K,
                                  float* __restrict__ y, int64_t ldy, int64_t width, Prefetch pf) {
    __m512 a[MR];
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) a[r] = _mm512_setzero_ps();
    int64_t count = 0;
    for (int64_t k = 0; k < K; ++k) {
        const __m512 w = load16z(panel + kPanel * k);
        pf.step(count);
#pragma GCC unroll 16
        for (int r = 0; r < MR; ++r) a[r] = _mm512_fmadd_ps(w, _mm512_set1_ps(x[r * K + k]), a[r]);
    }
    const __mmask16 keep = width == kPanel ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << width) - 1);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) _mm512_mask_storeu_ps(y + r * ldy, keep, a[r]);
}

template <typename W>
PROPD_AVX512 void block512(int64_t mr, const W* panel, const float* x, int64_t K, float* y, int64_t ldy,
                           int64_t width, Prefetch pf) {
    with_rows<kMaxBlock512>(mr, [&](auto rows) { micro512<decltype(rows)::value>(panel, x, K, y, ldy, width, pf); });
}

// Two panels side by side. Few rows: two streams and two chains per row at once, where one panel's stream with the
// software prefetch of the next ran below the memory rate; many rows (prefill, large batched trees), where the
// arithmetic bounds the product: per k two weight loads and MR broadcasts feed 2 MR FMAs, where one panel needs
// MR + 1 loads for MR. Each output is micro512's chain of FMAs, op for op. The second panel's first ``width1`` outputs
// are real.
template <int MR>
PROPD_AVX512 inline void micro512x2(const float* __restrict__ p0, const float* __restrict__ p1,
                                    const float* __restrict__ x, int64_t K, float* __restrict__ y, int64_t ldy,
                                    int64_t width1) {
    __m512 a[MR], b[MR];
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) a[r] = b[r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; ++k) {
        const __m512 w0 = _mm512_loadu_ps(p0 + kPanel * k), w1 = _mm512_loadu_ps(p1 + kPanel * k);
        if constexpr (MR >= kStreamAheadRows32) {
            stream_ahead(p0 + kPanel * (k + kStreamAhead));
            stream_ahead(p1 + kPanel * (k + kStreamAhead));
        }
#pragma GCC unroll 16
        for (int r = 0; r < MR; ++r) {
            const __m512 xs = _mm512_set1_ps(x[r * K + k]);
            a[r] = _mm512_fmadd_ps(w0, xs, a[r]);
            b[r] = _mm512_fmadd_ps(w1, xs, b[r]);
        }
    }
    const auto keep = static_cast<__mmask16>(width1 == kPanel ? 0xFFFFu : (1u << width1) - 1);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
        _mm512_storeu_ps(y + r * ldy, a[r]);
        _mm512_mask_storeu_ps(y + r * ldy + kPanel, keep, b[r]);
    }
}

PROPD_AVX512 void block512x2(int64_t mr, const float* p0, const float* p1, const float* x, int64_t K, float* y,
                             int64_t ldy, int64_t width1) {
    with_rows<kMaxBlock512>(mr, [&](auto rows) { micro512x2<decltype(rows)::value>(p0, p1, x, K, y, ldy, width1); });
}

// ---------------------------------------------------------------------------------------------- AVX512-BF16 path
// bfloat16 weights on a CPU with AVX512-BF16: panels of pairs of k, (P, ceil(K/2), 16 x 2), so that one vdpbf16ps
// multiplies 16 outputs' pairs of bf16 weights by a broadcast pair of bf16 inputs and adds both products to float32
// sums: the pairs of multiply-adds that the AVX2 path widens and runs one by one, in one instruction. The products of
// two bf16 are exact in float32; the sums are rounded as the instruction rounds them, which can differ in the last bit
// from the AVX2 path's chain of FMAs, so bf16 results depend on whether the CPU has AVX512-BF16 (float32 never does).
// Each output is still one fixed sequence of instructions over k whatever the number of rows: a row's result does
// not depend on the other rows.
#define PROPD_AVX512BF16 __attribute__((target("avx512f,avx512bf16")))

template <int MR>
PROPD_AVX512BF16 inline void micro_dp(const uint16_t* __restrict__ panel, const uint16_t* __restrict__ x, int64_t K2,
                                      float* __restrict__ y, int64_t ldy, int64_t width) {
    __m512 a[MR];
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) a[r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K2; ++k) {
        const __m512i w = _mm512_loadu_si512(panel + 2 * kPanel * k);
#pragma GCC unroll 16
        for (int r = 0; r < MR; ++r) {
            uint32_t pair;
            std::memcpy(&pair, x + r * 2 * K2 + 2 * k, sizeof(pair));
            a[r] = _mm512_dpbf16_ps(a[r], (__m512bh)w, (__m512bh)_mm512_set1_epi32(static_cast<int>(pair)));
        }
    }
    const __mmask16 keep = width == kPanel ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << width) - 1);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) _mm512_mask_storeu_ps(y + r * ldy, keep, a[r]);
}

PROPD_AVX512BF16 void block_dp(int64_t mr, const uint16_t* panel, const uint16_t* x, int64_t K2, float* y,
                               int64_t ldy, int64_t width) {
    with_rows<kMaxBlock512>(mr, [&](auto rows) { micro_dp<decltype(rows)::value>(panel, x, K2, y, ldy, width); });
}

// Two pair-packed panels side by side (as micro512x2): each output is micro_dp's sequence of vdpbf16ps, op for op.
template <int MR>
PROPD_AVX512BF16 inline void micro_dp2(const uint16_t* __restrict__ p0, const uint16_t* __restrict__ p1,
                                       const uint16_t* __restrict__ x, int64_t K2, float* __restrict__ y, int64_t ldy,
                                       int64_t width1) {
    __m512 a[MR], b[MR];
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) a[r] = b[r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K2; ++k) {
        const __m512i w0 = _mm512_loadu_si512(p0 + 2 * kPanel * k), w1 = _mm512_loadu_si512(p1 + 2 * kPanel * k);
        stream_ahead(p0 + 2 * kPanel * (k + kStreamAhead));
        stream_ahead(p1 + 2 * kPanel * (k + kStreamAhead));
#pragma GCC unroll 16
        for (int r = 0; r < MR; ++r) {
            uint32_t pair;
            std::memcpy(&pair, x + r * 2 * K2 + 2 * k, sizeof(pair));
            const __m512bh xs = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
            a[r] = _mm512_dpbf16_ps(a[r], (__m512bh)w0, xs);
            b[r] = _mm512_dpbf16_ps(b[r], (__m512bh)w1, xs);
        }
    }
    const auto keep = static_cast<__mmask16>(width1 == kPanel ? 0xFFFFu : (1u << width1) - 1);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
        _mm512_storeu_ps(y + r * ldy, a[r]);
        _mm512_mask_storeu_ps(y + r * ldy + kPanel, keep, b[r]);
    }
}

PROPD_AVX512BF16 void block_dp2(int64_t mr, const uint16_t* p0, const uint16_t* p1, const uint16_t* x, int64_t K2,
                                float* y, int64_t ldy, int64_t width1) {
    with_rows<kMaxBlock512>(mr, [&](auto rows) { micro_dp2<decltype(rows)::value>(p0, p1, x, K2, y, ldy, width1); });
}

// ---------------------------------------------------------------------------------------------- AMX-BF16 path
// bfloat16 products on Intel's AMX tiles (TDPBF16PS: C (rows x 16 float32) += A (rows x 32 bf16) B (16 pairs x 16
// outputs x 2 bf16); Intel SDM vol. 2, "TDPBF16PS"). The pair-packed panels above are AMX's B layout already: 16 pairs
// of k of a panel are one 1 KiB B tile (rows of 64 bytes), and 32 k of up to 16 rows of x are one A tile. Two panels
// run side by side (two independent C tiles) and the hardware prefetcher streams them, so one row to 16 cost about
// one row's stream where vdpbf16ps becomes bound by its arithmetic at a few rows. Each row of C is computed from its
// own row of A alone, tile by tile over k in order, whatever the number of rows: a row's result does not depend on
// the other rows. The tile's sums round differently from vdpbf16ps's, so on a CPU with AMX every bf16 product takes
// this path, at every row count, and bf16 results depend on whether the CPU has AMX.
#define PROPD_AMX __attribute__((target("avx512f,amx-tile,amx-bf16")))

// The tile configuration (ldtilecfg's 64-byte operand, palette 1): C tiles 0 and 1, A tile 2, B tiles 3 and 4 (16
// pairs), and for K2 % 16 pairs left over, A tile 5 and B tiles 6 and 7 of that many pairs.
struct alignas(64) TileConfig {
    uint8_t palette = 1;
    uint8_t start_row = 0;
    uint8_t reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};

    TileConfig(int64_t mr, int64_t tail) {
        for (int t : {0, 1, 2}) set(t, mr, 64);
        for (int t : {3, 4}) set(t, 16, 64);
        if (tail) {
            set(5, mr, 4 * tail);
            for (int t : {6, 7}) set(t, tail, 64);
        }
    }
    void set(int t, int64_t r, int64_t bytes) {
        rows[t] = static_cast<uint8_t>(r);
        colsb[t] = static_cast<uint16_t>(bytes);
    }
};

// Rows m .. m + mr - 1 (mr <= 16, the loaded configuration's) of x (row stride 2 K2 bf16) times NP (1 or 2) panels
// from ``panel`` on (K2 pairs each), into c (NP x 16 x 16 float32).
template <int NP>
PROPD_AMX void amx_block(const uint16_t* panel, const uint16_t* x, int64_t K2, float* c) {
    const char* b = reinterpret_cast<const char*>(panel);
    const int64_t panel_bytes = K2 * 64, ldx = 4 * K2, full = K2 / 16;
    // one A tile (tile A: x's rows at xs) times one B tile per panel (tiles B0, B1 at bs and bs + panel_bytes) into C
    // tiles 0 and 1; a macro, since the intrinsics paste the tile numbers into their instructions' text
#define PROPD_AMX_PAIRS(A, B0, B1, xs, bs)          \
    do {                                             \
        _tile_loadd(A, xs, ldx);                     \
        _tile_loadd(B0, bs, 64);                     \
        _tile_dpbf16ps(0, A, B0);                    \
        if (NP == 2) {                               \
            _tile_loadd(B1, (bs) + panel_bytes, 64); \
            _tile_dpbf16ps(1, A, B1);                \
        }                                            \
    } while (0)
    _tile_zero(0);
    if (NP == 2) _tile_zero(1);
    for (int64_t t = 0; t < full; ++t) PROPD_AMX_PAIRS(2, 3, 4, x + 32 * t, b + 1024 * t);
    if (K2 % 16) PROPD_AMX_PAIRS(5, 6, 7, x + 32 * full, b + 1024 * full);
#undef PROPD_AMX_PAIRS
    _tile_stored(0, c, 64);
    if (NP == 2) _tile_stored(1, c + kPanel * kPanel, 64);
}

// ldtilecfg with the whole 64-byte operand declared as read (GCC 12's _tile_loadconfig declares 8 bytes, so the
// configuration's other stores could be dropped as dead)
PROPD_AMX void amx_load_config(const TileConfig& cfg) { asm volatile("ldtilecfg %0" : : "m"(cfg)); }
PROPD_AMX void amx_release() { _tile_release(); }

bool cpu_has_avx512() {
    static const bool has = __builtin_cpu_supports("avx512f");
    return has;
}

// 0: the best path this CPU has; 1: AVX2 only; 2: AVX-512 without AMX (tests compare the paths; PROPD_CPU_ISA=avx2
// or avx512 sets it from Python)
int g_isa_limit = 0;

bool use_avx512() { return g_isa_limit != 1 && cpu_has_avx512(); }
// The decoding attention kernel's 16-lane path (score_pair512, value_rows512) where the CPU has AVX-512F; its bits
// equal the 8-lane path's, so this is a choice of speed alone, made by cpu_kernel at load (benchmarks/attention.py).
bool g_attention_wide = true;
bool attention_wide() { return g_attention_wide && use_avx512(); }

bool cpu_has_avx512bf16() {
    static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16");
    return has;
}

// bf16 weights packed from now on go to the AVX512-BF16 path (weights packed earlier keep their layout)
bool use_bf16_pairs() { return g_isa_limit != 1 && cpu_has_avx512bf16(); }

// AMX-BF16 and the kernel's permission to use the tiles' state (Linux: arch_prctl ARCH_REQ_XCOMP_PERM for
// XFEATURE_XTILEDATA, once per process); without the permission the first tile instruction would fault.
constexpr int kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;  // from Linux's asm/prctl.h, fpu/xstate.h

bool cpu_has_amx() {
    static const bool has = cpu_has_avx512bf16() && __builtin_cpu_supports("amx-tile") &&
                            __builtin_cpu_supports("amx-bf16") &&
                            syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
    return has;
}

// 2: AVX-512 without AMX (tests compare the bf16 paths)
bool use_amx() { return g_isa_limit == 0 && cpu_has_amx(); }

// A product's work in units (panels, or groups of panels) that any thread may take: run(begin, end) computes units
// [begin, end). Products that share their input (a layer's q, k and v; gate and up) go through one parallel region
// (run_jobs): the memory stream does not stop and restart at a barrier between them, and each output is computed as
// it would be alone.
struct Job {
    int64_t units = 0;
    std::function<void(int64_t, int64_t)> run;
};

// A team of threads held for a whole decoding step (LayerStack.run): thread 0 runs the step's code as it would run
// alone, and where that code has parallel work (parallel_units) it hands each other thread its share through the
// team, instead of opening and closing a parallel region each time (about five per layer; a hand-off costs a
// fraction of a region's start and end). The others wait for work spinning, then
// yielding the core. Shares are at::parallel_for's (contiguous ranges of ceil(total / threads) units), and each
// unit's result depends on the unit alone, so the outputs are the same bit for bit.
struct Team {
    int threads = 1;
    const std::function<void(int64_t, int64_t)>* work = nullptr;
    int64_t total = 0;
    std::atomic<int64_t> epoch{0};
    std::atomic<int> done{0};
    std::atomic<bool> stop{false};

    void share(int tid) const {
        const int64_t chunk = (total + threads - 1) / threads, b = tid * chunk, e = std::min(total, b + chunk);
        if (b < e) (*work)(b, e);
    }
};

thread_local Team* t_team = nullptr;  // set on thread 0 of a team while its step runs

inline void team_wait(const std::function<bool()>& ready) {
    for (int spin = 0; !ready(); ++spin) {
        if (spin < 4000) {
            _mm_pause();
        } else {
            std::this_thread::yield();
        }
    }
}

// The other threads of a team: each share as it is handed out, until thread 0 is done.
void team_worker(Team& team, int tid) {
    int64_t seen = 0;
    while (true) {
        int64_t now = seen;
        team_wait([&] {
            now = team.epoch.load(std::memory_order_acquire);
            return now != seen || team.stop.load(std::memory_order_acquire);
        });
        if (now == seen) return;  // stopped: thread 0 sets stop only after every hand-off is done
        seen = now;
        team.share(tid);
        team.done.fetch_add(1, std::memory_order_acq_rel);
    }
}

// f(begin, end) over [0, total) in contiguous ranges: through the team where thread 0 of one calls, else
// at::parallel_for.
void parallel_units(int64_t total, const std::function<void(int64_t, int64_t)>& f) {
    Team* team = t_team;
    if (team == nullptr || team->threads < 2) {
        at::parallel_for(0, total, 1, f);
        return;
    }
    team->work = &f;
    team->total = total;
    team->done.store(0, std::memory_order_relaxed);
    team->epoch.fetch_add(1, std::memory_order_acq_rel);
    team->share(0);
    team_wait([&] { return team->done.load(std::memory_order_acquire) == team->threads - 1; });
}

// One parallel region over the jobs' units laid end to end, split in contiguous ranges over torch's threads.
void run_jobs(const std::vector<Job>& jobs) {
    int64_t total = 0;
    for (const auto& j : jobs) total += j.units;
    if (total == 0) return;
    parallel_units(total, [&](int64_t begin, int64_t end) {
        int64_t base = 0;
        for (const auto& j : jobs) {
            const int64_t b = std::max(begin, base), e = std::min(end, base + j.units);
            if (b < e) j.run(b - base, e - base);
            base += j.units;
        }
    });
}

// The panel loop shared by every path, over panels [begin, end): each panel's M rows in balanced blocks of at most
// 6 (AVX2) or 12 (``wide``, the AVX-512 paths) rows, 8 rows as 4 + 4 rather than 6 + 2; block j of n prefetches
// lines [j * share, (j + 1) * share) of the next panel of the range while it computes (one block: all of it), so the
// memory stream runs one panel ahead of the arithmetic and a few rows cost about one row's stream (kernels that
// stream ahead within their panel instead, the AVX2 one from kStreamAheadRowsAvx2 rows, leave ``pf`` unused).
// ``steps`` is the micro-kernel's trip count over a panel (K, or K/2 for bf16 pairs); ``f(p, m, mr, width, pf)``
// runs rows m .. m + mr - 1 of panel p, whose ``width`` outputs are real.
template <typename F>
void for_each_block(const char* panels, int64_t panel_bytes, int64_t steps, int64_t M, int64_t O, bool wide,
                    int64_t begin, int64_t end, F&& f, int64_t wide_block = kMaxBlock512) {
    const int64_t panel_lines = (panel_bytes + kLine - 1) / kLine;
    const int64_t max_block = wide ? wide_block : kMaxBlock;
    const int64_t nblocks = (M + max_block - 1) / max_block;
    const int64_t share = (panel_lines + nblocks - 1) / nblocks;
    for (int64_t p = begin; p < end; ++p) {
        const int64_t width = std::min<int64_t>(kPanel, O - kPanel * p);
        int64_t m = 0;
        for (int64_t j = 0; m < M; ++j) {
            const int64_t left = M - m;
            const int64_t mr = (left + nblocks - j - 1) / (nblocks - j);
            Prefetch pf;
            const int64_t lines = std::min(share, panel_lines - j * share);
            if (p + 1 < end && lines > 0) {
                pf.next = panels + (p + 1) * panel_bytes + j * share * kLine;
                pf.every = std::max<int64_t>(1, steps / lines);
            }
            f(p, m, mr, width, pf);
            m += mr;
        }
    }
}

// The output of a product: float32 y, or bfloat16 yb (rows of ldy): then each block's float32 sums go to a tile on the
// stack and are rounded to bfloat16 as torch rounds (to nearest even) by the thread that computed them, so a bfloat16
// product needs no float32 result tensor and no conversion op after it.
struct Out {
    float* y = nullptr;
    uint16_t* yb = nullptr;
    int64_t ldy = 0;
    // runs kernel(dst, ld) for rows m .. m + mr - 1 of ``panels`` (1 or 2) panels from p, outputs [16 p, 16 p + width)
    template <typename Kernel>
    void block(int64_t p, int64_t m, int64_t mr, int64_t width, Kernel&& kernel, int64_t panels = 1) const {
        if (yb == nullptr) {
            kernel(y + m * ldy + kPanel * p, ldy);
            return;
        }
        alignas(64) float tile[2 * kPanel * kPanel];  // up to 16 rows of one panel (AMX) or 12 of two (pairs)
        const int64_t ld = panels * kPanel;
        kernel(tile, ld);
        for (int64_t r = 0; r < mr; ++r) {
            uint16_t* dst = yb + (m + r) * ldy + kPanel * p;
            for (int64_t j = 0; j < width; ++j) dst[j] = c10::BFloat16(tile[r * ld + j]).x;
        }
    }
};

// The paired paths' loop over panels [begin, end): two at a time (a last one alone), each pair's M rows in balanced
// blocks of at most kMaxBlock512; f(p, m, mr, two) runs rows m .. m + mr - 1 of panel p, and of p + 1 where two.
template <typename F>
void for_each_pair_block(int64_t M, int64_t begin, int64_t end, F&& f) {
    const int64_t nblocks = (M + kMaxBlock512 - 1) / kMaxBlock512;
    for (int64_t p = begin; p < end; p += 2) {
        for (int64_t j = 0, m = 0; m < M; ++j) {
            const int64_t mr = (M - m + nblocks - j - 1) / (nblocks - j);
            f(p, m, mr, p + 1 < end);
            m += mr;
        }
    }
}

// x (M, K) float32 times the packed weight (P, K, 16) of element type W; a unit is a panel.
template <typename W>
Job job_dense(const float* xp, const W* pp, Out out, int64_t M, int64_t K, int64_t O, int64_t P) {
    const bool wide = use_avx512();
    if constexpr (std::is_same_v<W, float>) {
        if (wide && out.yb == nullptr) {
            return {P, [=](int64_t begin, int64_t end) {
                for_each_pair_block(M, begin, end, [&](int64_t p, int64_t m, int64_t mr, bool two) {
                    const float* panel = pp + p * K * kPanel;
                    float* y = out.y + m * out.ldy + kPanel * p;
                    const int64_t width = std::min<int64_t>(kPanel, O - kPanel * (p + two));
                    if (two) {
                        block512x2(mr, panel, panel + K * kPanel, xp + m * K, K, y, out.ldy, width);
                    } else {
                        block512(mr, panel, xp + m * K, K, y, out.ldy, width, Prefetch{});
                    }
                });
            }};
        }
    }
    return {P, [=](int64_t begin, int64_t end) {
        for_each_block(reinterpret_cast<const char*>(pp), K * kPanel * static_cast<int64_t>(sizeof(W)), K, M, O, wide,
                       begin, end, [&](int64_t p, int64_t m, int64_t mr, int64_t width, Prefetch pf) {
                           const W* panel = pp + p * K * kPanel;
                           out.block(p, m, mr, width, [&](float* y, int64_t ldy) {
                               if (wide) {
                                   block512(mr, panel, xp + m * K, K, y, ldy, width, pf);
                               } else {
                                   block(mr, panel, xp + m * K, K, y, ldy, width, pf);
                               }
                           });
                       });
    }};
}

// x (M, 2 K2) bf16 (zero-padded to even K) times pair-packed bf16 panels (P, K2, 32) on AMX tiles.
Job job_amx(const uint16_t* xp, const uint16_t* pp, Out out, int64_t M, int64_t K2, int64_t O, int64_t P) {
    // units: pairs of panels; rows in balanced blocks of at most 16 (at most two sizes; the tile configuration is
    // loaded again when the size changes)
    return {(P + 1) / 2, [=](int64_t begin, int64_t end) {
        const int64_t nblocks = (M + kPanel - 1) / kPanel, tail = K2 % 16;
        int64_t loaded = -1;
        alignas(64) float c[2 * kPanel * kPanel];
        for (int64_t u = begin; u < end; ++u) {
            const int64_t p = 2 * u, np = std::min<int64_t>(2, P - p);
            int64_t m = 0;
            for (int64_t j = 0; j < nblocks; ++j) {
                const int64_t mr = (M - m + nblocks - j - 1) / (nblocks - j);
                if (mr != loaded) {
                    amx_load_config(TileConfig(mr, tail));
                    loaded = mr;
                }
                const uint16_t* panel = pp + p * K2 * 2 * kPanel;
                if (np == 2) {
                    amx_block<2>(panel, xp + m * 2 * K2, K2, c);
                } else {
                    amx_block<1>(panel, xp + m * 2 * K2, K2, c);
                }
                for (int64_t i = 0; i < np; ++i) {
                    const int64_t width = std::min<int64_t>(kPanel, O - kPanel * (p + i));
                    out.block(p + i, m, mr, width, [&](float* y, int64_t ldy) {
                        for (int64_t r = 0; r < mr; ++r) {
                            std::memcpy(y + r * ldy, c + (i * kPanel + r) * kPanel, width * sizeof(float));
                        }
                    });
                }
                m += mr;
            }
        }
        if (loaded >= 0) amx_release();
    }};
}

// The same product on AMX where the CPU has it, else by vdpbf16ps.
Job job_dp(const uint16_t* xp, const uint16_t* pp, Out out, int64_t M, int64_t K2, int64_t O, int64_t P) {
    if (use_amx()) return job_amx(xp, pp, out, M, K2, O, P);
    return {P, [=](int64_t begin, int64_t end) {
        for_each_pair_block(M, begin, end, [&](int64_t p, int64_t m, int64_t mr, bool two) {
            const uint16_t* panel = pp + p * K2 * 2 * kPanel;
            const int64_t width = std::min<int64_t>(kPanel, O - kPanel * (p + two));  // of the last panel
            out.block(p, m, mr, two * kPanel + width, [&](float* y, int64_t ldy) {
                if (two) {
                    block_dp2(mr, panel, panel + K2 * 2 * kPanel, xp + m * 2 * K2, K2, y, ldy, width);
                } else {
                    block_dp(mr, panel, xp + m * 2 * K2, K2, y, ldy, width);
                }
            }, 1 + two);
        });
    }};
}


// ---------------------------------------------------------------------------------------------- GGUF blocks
// Weights kept in ggml's block formats (32 weights per block along k, float16 scales): Q4_1, w = d * q + m with q in
// 0..15; Q8_0, w = q * d with q in -128..127. Each panel block (16 outputs x 32 k) is dequantized in registers, every
// weight rounded as gguf's reference dequantize rounds it, and multiplied into the same chain of FMAs over k, in order,
// as the float32 path: y equals the float32 kernel's on the dequantized weight bit for bit, on every path, at about a
// fifth of the bytes. gguf computes float32 (d * q) + m; d has 11 significant bits and q at most 8, so d * q is exact
// in float32 and fma(d, q, m), one rounding, is the same number. On AVX-512, q's float is looked up with vpermps (its
// index's low 4 bits are the nibble) from 0..15 in a register.
// Panel blocks: Q4_1 (320 bytes): d[16] fp16, m[16] fp16, then for each pair of k (2j, 2j + 1) one byte per output,
// q[2j] in the low nibble and q[2j + 1] in the high one (16 x 16 bytes). Q8_0 (544 bytes): d[16] fp16, then for each
// k one int8 per output (32 x 16 bytes). Packed by propd.models.quant.pack_blocks as (P, K / 32, bytes).
constexpr int64_t kQ41Bytes = 320, kQ80Bytes = 544, kQK = 32;
enum QFormat { kQ41 = 0, kQ80 = 1 };

PROPD_AVX512 inline __m512 q_iota() {
    return _mm512_setr_ps(0.f, 1.f, 2.f, 3.f, 4.f, 5.f, 6.f, 7.f, 8.f, 9.f, 10.f, 11.f, 12.f, 13.f, 14.f, 15.f);
}

template <int MR, int F>
PROPD_AVX512 inline void micro_q512(const uint8_t* __restrict__ panel, const float* __restrict__ x, int64_t K,
                                    float* __restrict__ y, int64_t ldy, int64_t width, Prefetch pf) {
    constexpr int64_t bytes = F == kQ41 ? kQ41Bytes : kQ80Bytes;
    __m512 a[MR];
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) a[r] = _mm512_setzero_ps();
    int64_t count = 0;
    for (int64_t b = 0; b < K / kQK; ++b) {
        const uint8_t* blk = panel + b * bytes;
        const float* xb = x + b * kQK;
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk)));
        if constexpr (F == kQ41) {
            const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 32)));
            const __m512 iota = q_iota();
            for (int64_t j = 0; j < kQK / 2; ++j) {
                const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 64 + 16 * j)));
                const __m512 w0 = _mm512_fmadd_ps(d, _mm512_permutexvar_ps(q, iota), m);
                const __m512 w1 = _mm512_fmadd_ps(d, _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), iota), m);
                pf.step(count);
#pragma GCC unroll 16
                for (int r = 0; r < MR; ++r) {
                    a[r] = _mm512_fmadd_ps(w0, _mm512_set1_ps(xb[r * K + 2 * j]), a[r]);
                    a[r] = _mm512_fmadd_ps(w1, _mm512_set1_ps(xb[r * K + 2 * j + 1]), a[r]);
                }
            }
        } else {
            for (int64_t k = 0; k < kQK; ++k) {
                const __m512i q = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 32 + 16 * k)));
                const __m512 w = _mm512_mul_ps(_mm512_cvtepi32_ps(q), d);
                pf.step(count);
#pragma GCC unroll 16
                for (int r = 0; r < MR; ++r) a[r] = _mm512_fmadd_ps(w, _mm512_set1_ps(xb[r * K + k]), a[r]);
            }
        }
    }
    const __mmask16 keep = width == kPanel ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << width) - 1);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) _mm512_mask_storeu_ps(y + r * ldy, keep, a[r]);
}

// MR (1-4) rows against NP whole panels at once: each output's sum is a chain of dependent FMAs, and a few rows give a
// panel only a few chains, so the FMA latency, not the dequantization, would set the pace; NP panels side by side give
// NP * MR independent chains. Each output's chain is the one above, op for op. While a group is computed, the next
// group is prefetched, a share per block of k: the hardware prefetcher alone does not keep these few-row products at
// the memory's pace.
template <int MR, int F, int NP>
PROPD_AVX512 inline void micro_q512_wide(const uint8_t* __restrict__ panel, int64_t panel_bytes,
                                         const float* __restrict__ x, int64_t K, float* __restrict__ y, int64_t ldy,
                                         const uint8_t* next = nullptr) {
    constexpr int64_t bytes = F == kQ41 ? kQ41Bytes : kQ80Bytes;
    // next: the following group of NP panels, prefetched a share per block of k while this group is computed
    const int64_t nb = K / kQK, lines = (NP * panel_bytes + kLine - 1) / kLine, per = (lines + nb - 1) / nb;
    __m512 a[NP][MR];
#pragma GCC unroll 8
    for (int p = 0; p < NP; ++p)
#pragma GCC unroll 4
        for (int r = 0; r < MR; ++r) a[p][r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < K / kQK; ++b) {
        if (next != nullptr) {
            for (int64_t l = b * per; l < std::min(lines, (b + 1) * per); ++l) {
                _mm_prefetch(reinterpret_cast<const char*>(next) + l * kLine, _MM_HINT_T0);
            }
        }
        const float* xb = x + b * kQK;
        __m512 d[NP], m[NP];
#pragma GCC unroll 8
        for (int p = 0; p < NP; ++p) {
            const uint8_t* blk = panel + p * panel_bytes + b * bytes;
            d[p] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk)));
            if constexpr (F == kQ41) m[p] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 32)));
        }
        if constexpr (F == kQ41) {
            const __m512 iota = q_iota();
            for (int64_t j = 0; j < kQK / 2; ++j) {
#pragma GCC unroll 8
                for (int p = 0; p < NP; ++p) {
                    const uint8_t* q8 = panel + p * panel_bytes + b * bytes + 64 + 16 * j;
                    const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q8)));
                    const __m512 w0 = _mm512_fmadd_ps(d[p], _mm512_permutexvar_ps(q, iota), m[p]);
                    const __m512 w1 = _mm512_fmadd_ps(d[p], _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), iota), m[p]);
#pragma GCC unroll 4
                    for (int r = 0; r < MR; ++r) {
                        a[p][r] = _mm512_fmadd_ps(w0, _mm512_set1_ps(xb[r * K + 2 * j]), a[p][r]);
                        a[p][r] = _mm512_fmadd_ps(w1, _mm512_set1_ps(xb[r * K + 2 * j + 1]), a[p][r]);
                    }
                }
            }
        } else {
            for (int64_t k = 0; k < kQK; ++k) {
#pragma GCC unroll 8
                for (int p = 0; p < NP; ++p) {
                    const uint8_t* q8 = panel + p * panel_bytes + b * bytes + 32 + 16 * k;
                    const __m512i q = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q8)));
                    const __m512 w = _mm512_mul_ps(_mm512_cvtepi32_ps(q), d[p]);
#pragma GCC unroll 4
                    for (int r = 0; r < MR; ++r) a[p][r] = _mm512_fmadd_ps(w, _mm512_set1_ps(xb[r * K + k]), a[p][r]);
                }
            }
        }
    }
#pragma GCC unroll 8
    for (int p = 0; p < NP; ++p)
#pragma GCC unroll 4
        for (int r = 0; r < MR; ++r) _mm512_storeu_ps(y + r * ldy + kPanel * p, a[p][r]);
}

// The AVX2 form: 16 outputs as two 8-wide halves, d and m widened with F16C.
inline void q_widen8(const uint8_t* p, __m256& lo, __m256& hi) {
    lo = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    hi = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16)));
}

template <int MR, int F>
inline void micro_q(const uint8_t* __restrict__ panel, const float* __restrict__ x, int64_t K, float* __restrict__ y,
                    int64_t ldy, int64_t width, Prefetch pf) {
    constexpr int64_t bytes = F == kQ41 ? kQ41Bytes : kQ80Bytes;
    __m256 a0[MR], a1[MR];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
        a0[r] = _mm256_setzero_ps();
        a1[r] = _mm256_setzero_ps();
    }
    int64_t count = 0;
    for (int64_t b = 0; b < K / kQK; ++b) {
        const uint8_t* blk = panel + b * bytes;
        const float* xb = x + b * kQK;
        __m256 d0, d1;
        q_widen8(blk, d0, d1);
        if constexpr (F == kQ41) {
            __m256 m0, m1;
            q_widen8(blk + 32, m0, m1);
            const __m256i low = _mm256_set1_epi32(15);
            for (int64_t j = 0; j < kQK / 2; ++j) {
                const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 64 + 16 * j));
                const __m256i q0 = _mm256_cvtepu8_epi32(raw), q1 = _mm256_cvtepu8_epi32(_mm_srli_si128(raw, 8));
                pf.step(count);
                for (int h = 0; h < 2; ++h) {  // h = 0: k = 2j (low nibbles), 1: k = 2j + 1 (high nibbles)
                    const __m256i e0 = h ? _mm256_srli_epi32(q0, 4) : _mm256_and_si256(q0, low);
                    const __m256i e1 = h ? _mm256_srli_epi32(q1, 4) : _mm256_and_si256(q1, low);
                    const __m256 w0 = _mm256_fmadd_ps(d0, _mm256_cvtepi32_ps(e0), m0);
                    const __m256 w1 = _mm256_fmadd_ps(d1, _mm256_cvtepi32_ps(e1), m1);
#pragma GCC unroll 8
                    for (int r = 0; r < MR; ++r) {
                        const __m256 xs = _mm256_broadcast_ss(xb + r * K + 2 * j + h);
                        a0[r] = _mm256_fmadd_ps(w0, xs, a0[r]);
                        a1[r] = _mm256_fmadd_ps(w1, xs, a1[r]);
                    }
                }
            }
        } else {
            for (int64_t k = 0; k < kQK; ++k) {
                const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 32 + 16 * k));
                const __m256 w0 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw)), d0);
                const __m256 w1 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(raw, 8))), d1);
                pf.step(count);
#pragma GCC unroll 8
                for (int r = 0; r < MR; ++r) {
                    const __m256 xs = _mm256_broadcast_ss(xb + r * K + k);
                    a0[r] = _mm256_fmadd_ps(w0, xs, a0[r]);
                    a1[r] = _mm256_fmadd_ps(w1, xs, a1[r]);
                }
            }
        }
    }
    store_rows<MR>(a0, a1, y, ldy, width);
}

// GGUF blocks on AVX-512: up to 16 rows per block (16 accumulators beside the dequantization's few registers), so
// that a panel block is dequantized once for up to 16 rows.
constexpr int64_t kMaxBlockQ512 = 16;

template <int F>
PROPD_AVX512 void block_q512(int64_t mr, const uint8_t* panel, const float* x, int64_t K, float* y, int64_t ldy,
                             int64_t width, Prefetch pf) {
    with_rows<kMaxBlockQ512>(mr, [&](auto rows) {
        micro_q512<decltype(rows)::value, F>(panel, x, K, y, ldy, width, pf);
    });
}

template <int F>
void block_q(int64_t mr, const uint8_t* panel, const float* x, int64_t K, float* y, int64_t ldy, int64_t width,
             Prefetch pf) {
    with_rows<kMaxBlock>(mr, [&](auto rows) { micro_q<decltype(rows)::value, F>(panel, x, K, y, ldy, width, pf); });
}

// y (M, O) float32 = x (M, K) float32 times block-packed panels (P, K / 32, bytes) of format F. A unit is a panel;
// for one to four rows on AVX-512 a thread's whole panels go side by side (micro_q512_wide), four at a time.
template <int F>
Job job_q(const float* xp, const uint8_t* pp, float* yp, int64_t M, int64_t K, int64_t O, int64_t P) {
    const bool wide = use_avx512();
    const int64_t panel_bytes = (K / kQK) * (F == kQ41 ? kQ41Bytes : kQ80Bytes);
    const int64_t steps = F == kQ41 ? K / 2 : K;
    // one to four rows: the whole panels of a thread's range four side by side (up to 16 accumulators), the last
    // one to three together; from five rows a panel has chains enough. A unit is a panel, so that the threads' ranges
    // differ by a panel at most (units of four panels left one thread a fifth more of a 36-panel product than the other).
    constexpr int64_t group = 4;
    const int64_t whole = wide && M <= 4 ? O / kPanel : 0;  // panels grouped; the rest (a partial panel) one by one
    return {P, [=](int64_t begin, int64_t end) {
        const int64_t ge = std::min(end, whole);
        for (int64_t p = begin; p < ge;) {
            const int64_t np = std::min(group, ge - p);
            const uint8_t* panel = pp + p * panel_bytes;
            float* y = yp + p * kPanel;
            const uint8_t* next = p + np < ge ? panel + np * panel_bytes : nullptr;
            with_rows<4>(M, [&](auto rows) {
                constexpr int R = decltype(rows)::value;
                switch (np) {
                    case 1: micro_q512_wide<R, F, 1>(panel, panel_bytes, xp, K, y, O, next); break;
                    case 2: micro_q512_wide<R, F, 2>(panel, panel_bytes, xp, K, y, O, next); break;
                    case 3: micro_q512_wide<R, F, 3>(panel, panel_bytes, xp, K, y, O, next); break;
                    default: micro_q512_wide<R, F, group>(panel, panel_bytes, xp, K, y, O, next); break;
                }
            });
            p += np;
        }
        const int64_t b = std::max(begin, ge), e = end;
        if (b >= e) return;
        for_each_block(reinterpret_cast<const char*>(pp), panel_bytes, steps, M, O, wide, b, e,
                       [&](int64_t p, int64_t m, int64_t mr, int64_t width, Prefetch pf) {
                           const uint8_t* panel = pp + p * panel_bytes;
                           if (wide) {
                               block_q512<F>(mr, panel, xp + m * K, K, yp + m * O + kPanel * p, O, width, pf);
                           } else {
                               block_q<F>(mr, panel, xp + m * K, K, yp + m * O + kPanel * p, O, width, pf);
                           }
                       }, kMaxBlockQ512);
    }};
}

// ------------------------------------------------------------------------- GGUF blocks, 8-bit activations
// llama.cpp's arithmetic (``--dtype gguf-q8``): each row of x is rounded per block of 32 k to int8,
// dx = max|x| / 127, xq = round-half-even(x * (1 / dx)), with qsum = sum(xq) and sx = dx * qsum (ggml's Q8_1), and
// each block's integer dot product isum = sum_k q[o, k] * xq[k] is exact. y[o] sums block by block, in order:
// Q4_1 (w = d * q + m): acc = acc + (d[o] * dx) * isum, then acc = acc + m[o] * sx; Q8_0 (w = d * q):
// acc = acc + (d[o] * dx) * isum; each product and sum rounded to float32 as written (no FMA). So every output is one
// fixed sequence of float32 operations whatever the number of rows, the ISA path or the blocking: row-invariant, and
// equal on the AVX512-VNNI (vpdpbusd: 64 u8 x s8 products per instruction) and AVX2 (vpmaddubsw + vpmaddwd) paths bit
// for bit. The output differs from float32's (x is rounded), as llama.cpp's does.
// Panel blocks (16 outputs x 32 k), marked by an int8 packed tensor: fp16 scales first, then groups g of 4 k, each 16
// outputs x 4 bytes (one 64-byte load feeds one vpdpbusd for 16 outputs x 4 k):
// Q4_1 (320 bytes): d[16], m[16], 4 groups, byte (g, o, i) = ggml's qs byte 4g + i of output o (low nibble
//   k = 4g + i, high nibble k = 16 + 4g + i);
// Q8_0 (544 bytes): d[16], 8 groups, byte (g, o, i) = q[o, 4g + i] + 128 (vpdpbusd takes the weights unsigned;
//   isum = dot - 128 * qsum).
constexpr int64_t kQ8Q41Bytes = 320, kQ8Q80Bytes = 544;

#define PROPD_AVX512VNNI __attribute__((target("avx512f,avx512bw,avx512vnni")))

bool cpu_has_avx512vnni() {
    static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                            __builtin_cpu_supports("avx512vnni");
    return has;
}

bool use_vnni() { return g_isa_limit != 1 && cpu_has_avx512vnni(); }

// x (M, K) float32 -> xq (M, K) int8; dx, sx (M, K / 32) float32 and qsum (M, K / 32) int32, as described above.
// Serial: at most a few hundred thousand values per call, where a parallel region would cost more than the work.
// _mm256_cvtps_epi32 rounds in the default rounding mode, half to even, as torch.round.
void quantize_rows_q8(const float* x, int64_t M, int64_t K, int8_t* xq, float* dx, float* sx, int32_t* qsum) {
    const int64_t n = M * (K / kQK);  // rows are contiguous: block i of the flat (M * K / 32) sequence
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i hi = _mm256_set1_epi32(127), lo = _mm256_set1_epi32(-127);
    alignas(32) int32_t q[kQK];
    for (int64_t i = 0; i < n; ++i) {
        const float* v = x + i * kQK;
        __m256 mx = _mm256_andnot_ps(sign, _mm256_loadu_ps(v));
        for (int j = 1; j < 4; ++j) mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, _mm256_loadu_ps(v + 8 * j)));
        alignas(32) float lanes[8];
        _mm256_store_ps(lanes, mx);
        float amax = 0.0f;
        for (int j = 0; j < 8; ++j) amax = std::max(amax, lanes[j]);
        const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        const __m256 ids = _mm256_set1_ps(id);
        __m256i sum = _mm256_setzero_si256();
        for (int j = 0; j < 4; ++j) {
            __m256i r = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(v + 8 * j), ids));
            r = _mm256_max_epi32(lo, _mm256_min_epi32(hi, r));
            sum = _mm256_add_epi32(sum, r);
            _mm256_store_si256(reinterpret_cast<__m256i*>(q + 8 * j), r);
        }
        alignas(32) int32_t s8[8];
        _mm256_store_si256(reinterpret_cast<__m256i*>(s8), sum);
        int32_t total = 0;
        for (int j = 0; j < 8; ++j) total += s8[j];
        for (int64_t k = 0; k < kQK; ++k) xq[i * kQK + k] = static_cast<int8_t>(q[k]);
        dx[i] = d;
        sx[i] = d * static_cast<float>(total);
        qsum[i] = total;
    }
}

inline int32_t load_i32(const int8_t* p) {
    int32_t v;
    std::memcpy(&v, p, sizeof(v));
    return v;
}

// One row block's rounded activations: rows of xq (stride K), dx, sx and qsum (stride nb).
struct Q8Rows {
    const int8_t* xq;
    const float* dx;
    const float* sx;
    const int32_t* qsum;
};

template <int MR, int F>
PROPD_AVX512VNNI inline void micro_q8_512(const uint8_t* __restrict__ panel, Q8Rows xr, int64_t K,
                                          float* __restrict__ y, int64_t ldy, int64_t width, Prefetch pf) {
    constexpr int64_t bytes = F == kQ41 ? kQ8Q41Bytes : kQ8Q80Bytes, body = F == kQ41 ? 64 : 32;
    constexpr int groups = F == kQ41 ? 4 : 8;
    const int64_t nb = K / kQK;
    const __m512i low = _mm512_set1_epi8(15);
    __m512 a[MR];
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) a[r] = _mm512_setzero_ps();
    int64_t count = 0;
    for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* blk = panel + b * bytes;
        const int8_t* xb = xr.xq + b * kQK;
        // few rows: two integer chains per row (integer sums: any grouping gives the same isum)
        constexpr int NS = MR <= 4 ? 2 : 1;
        __m512i s[NS][MR];
#pragma GCC unroll 2
        for (int c = 0; c < NS; ++c)
#pragma GCC unroll 16
            for (int r = 0; r < MR; ++r) s[c][r] = _mm512_setzero_si512();
#pragma GCC unroll 8
        for (int g = 0; g < groups; ++g) {
            const __m512i raw = _mm512_loadu_si512(blk + body + 64 * g);
            pf.step(count);
            if constexpr (F == kQ41) {
                const __m512i lo = _mm512_and_si512(raw, low), hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low);
#pragma GCC unroll 16
                for (int r = 0; r < MR; ++r) {
                    s[0][r] = _mm512_dpbusd_epi32(s[0][r], lo, _mm512_set1_epi32(load_i32(xb + r * K + 4 * g)));
                    s[NS - 1][r] = _mm512_dpbusd_epi32(s[NS - 1][r], hi,
                                                       _mm512_set1_epi32(load_i32(xb + r * K + 16 + 4 * g)));
                }
            } else {
#pragma GCC unroll 16
                for (int r = 0; r < MR; ++r) {
                    s[g % NS][r] = _mm512_dpbusd_epi32(s[g % NS][r], raw,
                                                       _mm512_set1_epi32(load_i32(xb + r * K + 4 * g)));
                }
            }
        }
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk)));
#pragma GCC unroll 16
        for (int r = 0; r < MR; ++r) {
            __m512i si = NS == 2 ? _mm512_add_epi32(s[0][r], s[NS - 1][r]) : s[0][r];
            if constexpr (F == kQ80) si = _mm512_sub_epi32(si, _mm512_set1_epi32(128 * xr.qsum[r * nb + b]));
            const __m512 scale = _mm512_mul_ps(d, _mm512_set1_ps(xr.dx[r * nb + b]));
            a[r] = _mm512_add_ps(a[r], _mm512_mul_ps(scale, _mm512_cvtepi32_ps(si)));
            if constexpr (F == kQ41) {
                const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 32)));
                a[r] = _mm512_add_ps(a[r], _mm512_mul_ps(m, _mm512_set1_ps(xr.sx[r * nb + b])));
            }
        }
    }
    const __mmask16 keep = width == kPanel ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << width) - 1);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) _mm512_mask_storeu_ps(y + r * ldy, keep, a[r]);
}

// The AVX2 form: 16 outputs as two halves of 8, each a 32-byte half of a group's 64 bytes. vpmaddubsw's 16-bit pair
// sums cannot saturate: Q4_1 at most 2 * 15 * 127; Q8_0 takes |q| (at most 128) against x signed by q (llama.cpp's
// sign trick), at most 2 * 128 * 127. vpmaddwd by ones then gives the int32 sums of four, the same isum as vpdpbusd.
template <int F>
inline __m256i dot4_q8(__m256i raw, __m256i xl, __m256i xh) {
    const __m256i ones = _mm256_set1_epi16(1);
    if constexpr (F == kQ41) {
        const __m256i low = _mm256_set1_epi8(15);
        const __m256i lo = _mm256_and_si256(raw, low), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);
        return _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(lo, xl), _mm256_maddubs_epi16(hi, xh)), ones);
    } else {
        const __m256i q = _mm256_xor_si256(raw, _mm256_set1_epi8(static_cast<char>(0x80)));  // q + 128 -> q
        return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(q), _mm256_sign_epi8(xl, q)), ones);
    }
}

template <int MR, int F>
inline void micro_q8(const uint8_t* __restrict__ panel, Q8Rows xr, int64_t K, float* __restrict__ y, int64_t ldy,
                     int64_t width, Prefetch pf) {
    constexpr int64_t bytes = F == kQ41 ? kQ8Q41Bytes : kQ8Q80Bytes, body = F == kQ41 ? 64 : 32;
    constexpr int groups = F == kQ41 ? 4 : 8;
    const int64_t nb = K / kQK;
    __m256 a0[MR], a1[MR];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
        a0[r] = _mm256_setzero_ps();
        a1[r] = _mm256_setzero_ps();
    }
    int64_t count = 0;
    for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* blk = panel + b * bytes;
        const int8_t* xb = xr.xq + b * kQK;
        __m256i s0[MR], s1[MR];
#pragma GCC unroll 8
        for (int r = 0; r < MR; ++r) {
            s0[r] = _mm256_setzero_si256();
            s1[r] = _mm256_setzero_si256();
        }
#pragma GCC unroll 8
        for (int g = 0; g < groups; ++g) {
            const __m256i raw0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + body + 64 * g));
            const __m256i raw1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + body + 32 + 64 * g));
            pf.step(count);
#pragma GCC unroll 8
            for (int r = 0; r < MR; ++r) {
                const __m256i xl = _mm256_set1_epi32(load_i32(xb + r * K + 4 * g));
                const __m256i xh = F == kQ41 ? _mm256_set1_epi32(load_i32(xb + r * K + 16 + 4 * g)) : xl;
                s0[r] = _mm256_add_epi32(s0[r], dot4_q8<F>(raw0, xl, xh));
                s1[r] = _mm256_add_epi32(s1[r], dot4_q8<F>(raw1, xl, xh));
            }
        }
        __m256 d0, d1, m0, m1;
        q_widen8(blk, d0, d1);
        if constexpr (F == kQ41) q_widen8(blk + 32, m0, m1);
#pragma GCC unroll 8
        for (int r = 0; r < MR; ++r) {
            const __m256 dxs = _mm256_set1_ps(xr.dx[r * nb + b]);
            a0[r] = _mm256_add_ps(a0[r], _mm256_mul_ps(_mm256_mul_ps(d0, dxs), _mm256_cvtepi32_ps(s0[r])));
            a1[r] = _mm256_add_ps(a1[r], _mm256_mul_ps(_mm256_mul_ps(d1, dxs), _mm256_cvtepi32_ps(s1[r])));
            if constexpr (F == kQ41) {
                const __m256 sxs = _mm256_set1_ps(xr.sx[r * nb + b]);
                a0[r] = _mm256_add_ps(a0[r], _mm256_mul_ps(m0, sxs));
                a1[r] = _mm256_add_ps(a1[r], _mm256_mul_ps(m1, sxs));
            }
        }
    }
    store_rows<MR>(a0, a1, y, ldy, width);
}

template <int F>
PROPD_AVX512VNNI void block_q8_512(int64_t mr, const uint8_t* panel, Q8Rows xr, int64_t K, float* y, int64_t ldy,
                                   int64_t width, Prefetch pf) {
    with_rows<kMaxBlock512>(mr, [&](auto rows) {
        micro_q8_512<decltype(rows)::value, F>(panel, xr, K, y, ldy, width, pf);
    });
}

template <int F>
void block_q8(int64_t mr, const uint8_t* panel, Q8Rows xr, int64_t K, float* y, int64_t ldy, int64_t width,
              Prefetch pf) {
    with_rows<kMaxBlock>(mr, [&](auto rows) { micro_q8<decltype(rows)::value, F>(panel, xr, K, y, ldy, width, pf); });
}

// x (M, K) float32 rounded to 8 bits per block (quantize_rows_q8), shared by the products that take it.
struct Q8Input {
    std::vector<int8_t> xq;
    std::vector<float> dx, sx;
    std::vector<int32_t> qsum;
    Q8Input(const float* xp, int64_t M, int64_t K)
        : xq(M * K), dx(M * (K / kQK)), sx(M * (K / kQK)), qsum(M * (K / kQK)) {
        quantize_rows_q8(xp, M, K, xq.data(), dx.data(), sx.data(), qsum.data());
    }
};

// y (M, O) float32 = x (M, K), rounded to 8 bits per block, times panels of format F for 8-bit activations
// (P, K / 32, bytes). Every row count goes here (prefill too): blocks of up to 12 rows reread a panel from cache.
template <int F>
Job job_q8(std::shared_ptr<const Q8Input> x, const uint8_t* pp, float* yp, int64_t M, int64_t K, int64_t O,
           int64_t P) {
    constexpr int64_t bytes = F == kQ41 ? kQ8Q41Bytes : kQ8Q80Bytes;
    const int64_t nb = K / kQK;
    const bool vnni = use_vnni();
    return {P, [=](int64_t begin, int64_t end) {
        for_each_block(reinterpret_cast<const char*>(pp), nb * bytes, nb * (F == kQ41 ? 4 : 8), M, O, vnni, begin, end,
                       [&](int64_t p, int64_t m, int64_t mr, int64_t width, Prefetch pf) {
                           const uint8_t* panel = pp + p * nb * bytes;
                           const Q8Rows xr{x->xq.data() + m * K, x->dx.data() + m * nb, x->sx.data() + m * nb,
                                           x->qsum.data() + m * nb};
                           float* y = yp + m * O + kPanel * p;
                           if (vnni) {
                               block_q8_512<F>(mr, panel, xr, K, y, O, width, pf);
                           } else {
                               block_q8<F>(mr, panel, xr, K, y, O, width, pf);
                           }
                       });
    }};
}

bool kernel_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16; }

// ---------------------------------------------------------------------------------------------------- attention

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

inline float widen_bits(float x) { return x; }
inline float widen_bits(uint16_t x) {  // a bfloat16's bits: the upper half of its float32
    const uint32_t u = static_cast<uint32_t>(x) << 16;
    float f;
    std::memcpy(&f, &u, sizeof(f));
    return f;
}

inline __m256 load8(const uint16_t* p) {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

inline float hsum(__m256 v) {
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

// exp(x) for x <= 0, 8 at a time: x = n ln2 + r, exp(x) = 2^n p(r) with Cephes' degree-6 polynomial for exp(r) on
// |r| <= ln2 / 2 (Moshier, "Methods and Programs for Mathematical Functions", 1989; the expf of cephes/avx_mathfun),
// within about 2 ulp of expf. Inputs below -87.3 return about 1e-38, never 0: callers zero masked entries themselves.
inline __m256 exp8(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln2 in two parts, for an exact r
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

// hsum of eight vectors at once: lane i of the result is hsum(v[i]) bit for bit (the same pairs of lanes added in the
// same order: the two 128-bit halves, then lanes 0+2 and 1+3, then those two), in 21 instructions instead of 48.
inline __m256 hsum8(const __m256* v) {
    __m256 s[4];
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i)  // [lo(v_i) + hi(v_i) | lo(v_i+4) + hi(v_i+4)]
        s[i] = _mm256_add_ps(_mm256_permute2f128_ps(v[i], v[i + 4], 0x20), _mm256_permute2f128_ps(v[i], v[i + 4], 0x31));
    const __m256 t01 = _mm256_add_ps(_mm256_shuffle_ps(s[0], s[1], 0x44), _mm256_shuffle_ps(s[0], s[1], 0xEE));
    const __m256 t23 = _mm256_add_ps(_mm256_shuffle_ps(s[2], s[3], 0x44), _mm256_shuffle_ps(s[2], s[3], 0xEE));
    return _mm256_add_ps(_mm256_shuffle_ps(t01, t23, 0x88), _mm256_shuffle_ps(t01, t23, 0xDD));
}

// Lane mask (all ones where true) of eight bools.
inline __m256 allowed8(const bool* a0, const bool* a1) {
    uint32_t lo, hi;
    std::memcpy(&lo, a0, 4);
    std::memcpy(&hi, a1, 4);
    const __m128i bytes = _mm_set_epi64x(0, static_cast<int64_t>(lo) | (static_cast<int64_t>(hi) << 32));
    return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_cvtepu8_epi32(bytes), _mm256_setzero_si256()));
}

// hsum of four vectors: lane i of the result is hsum(v[i]) bit for bit (hsum8's pairs of lanes, in 128-bit halves).
inline __m128 hsum4(const __m256* v) {
    __m128 s[4];
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) s[i] = _mm_add_ps(_mm256_castps256_ps128(v[i]), _mm256_extractf128_ps(v[i], 1));
    const __m128 t01 = _mm_add_ps(_mm_shuffle_ps(s[0], s[1], 0x44), _mm_shuffle_ps(s[0], s[1], 0xEE));
    const __m128 t23 = _mm_add_ps(_mm_shuffle_ps(s[2], s[3], 0x44), _mm_shuffle_ps(s[2], s[3], 0xEE));
    return _mm_add_ps(_mm_shuffle_ps(t01, t23, 0x88), _mm_shuffle_ps(t01, t23, 0xDD));
}

// Lane mask (all ones where true) of four bools.
inline __m128 allowed4(const bool* a) {
    uint32_t w;
    std::memcpy(&w, a, 4);
    const __m128i bytes = _mm_cvtepu8_epi32(_mm_cvtsi32_si128(static_cast<int>(w)));
    return _mm_castsi128_ps(_mm_cmpgt_epi32(bytes, _mm_setzero_si128()));
}

// One query row against one key: q_0 * k_0, then FMAs over d in order, 8 lanes; hsum then gives its score.
template <typename KV>
inline __m256 dot_lanes(const float* q, const KV* ks, int64_t D) {
    __m256 a = _mm256_mul_ps(_mm256_loadu_ps(q), load8(ks));
    for (int64_t d = 8; d < D; d += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), load8(ks + d), a);
    return a;
}

// Scores of R query rows against keys [s0, s1) one key at a time (the keys after the last block of eight): dot_lanes
// and hsum, as every score is computed.
template <int R, typename KV>
inline void score_keys(const float* const* q, const KV* k, int64_t sk, const bool* const* allowed, int64_t s0,
                       int64_t s1, int64_t D, float scale, float* const* scores, float* top) {
    for (int64_t s = s0; s < s1; ++s) {
#pragma GCC unroll 2
        for (int r = 0; r < R; ++r) {
            if (!allowed[r][s]) {
                scores[r][s] = -INFINITY;
                continue;
            }
            const float x = hsum(dot_lanes(q[r], k + s * sk, D)) * scale;
            scores[r][s] = x;
            top[r] = std::max(top[r], x);
        }
    }
}

// Scores of R (1-3) query rows of one key head against keys [s0, s1): scale * q.k_s where the row may attend,
// -inf elsewhere; top[r] becomes the max over row r's allowed keys. R x KB dot products at a time (one row and 8 keys,
// or two or three rows and 4 keys: each key chunk loaded once for every row), as many independent chains of FMAs,
// reduced by hsum8 (and hsum4 for a third row). Every (row, key) score is the same sequence of operations (dot_lanes,
// then hsum) however they are grouped.
template <int R, typename KV>
void score_rows(const float* const* q, const KV* k, int64_t sk, const bool* const* allowed, int64_t s0, int64_t s1,
                int64_t D, float scale, float* const* scores, float* top) {
    static_assert(R >= 1 && R <= 3, "one to three rows");
    constexpr int KB = R == 1 ? 8 : 4;  // keys per block
    const __m256 ninf = _mm256_set1_ps(-INFINITY), sc = _mm256_set1_ps(scale);
    const __m128 ninf4 = _mm_set1_ps(-INFINITY), sc4 = _mm_set1_ps(scale);
    __m256 tops = ninf;  // max is exact in any order: lanes are folded at the end
    __m128 tops2 = ninf4;
    int64_t s = s0;
    for (; s + KB <= s1; s += KB) {
        __m256 ok;  // lanes: row 0's keys (all 8 for one row), then row 1's; a third row's in ok2
        __m128 ok2 = _mm_setzero_ps();
        if constexpr (R == 1) {
            ok = allowed8(allowed[0] + s, allowed[0] + s + 4);
        } else {
            ok = allowed8(allowed[0] + s, allowed[1] + s);
        }
        if constexpr (R == 3) ok2 = allowed4(allowed[2] + s);
        if (_mm256_movemask_ps(ok) == 0 && (R < 3 || _mm_movemask_ps(ok2) == 0)) {
#pragma GCC unroll 12
            for (int j = 0; j < R * KB; ++j) scores[j / KB][s + j % KB] = -INFINITY;
            continue;
        }
        const KV* k0 = k + s * sk;
        __m256 a[R * KB];
        if constexpr (R == 2) {
            __m256 kv[4];
#pragma GCC unroll 4
            for (int j = 0; j < 4; ++j) kv[j] = load8(k0 + j * sk);
            const __m256 q0 = _mm256_loadu_ps(q[0]), q1 = _mm256_loadu_ps(q[1]);
#pragma GCC unroll 4
            for (int j = 0; j < 4; ++j) {
                a[j] = _mm256_mul_ps(q0, kv[j]);
                a[4 + j] = _mm256_mul_ps(q1, kv[j]);
            }
            for (int64_t d = 8; d < D; d += 8) {
#pragma GCC unroll 4
                for (int j = 0; j < 4; ++j) kv[j] = load8(k0 + j * sk + d);
                const __m256 p0 = _mm256_loadu_ps(q[0] + d), p1 = _mm256_loadu_ps(q[1] + d);
#pragma GCC unroll 4
                for (int j = 0; j < 4; ++j) {
                    a[j] = _mm256_fmadd_ps(p0, kv[j], a[j]);
                    a[4 + j] = _mm256_fmadd_ps(p1, kv[j], a[4 + j]);
                }
            }
        } else if constexpr (R == 1) {
            const __m256 q0 = _mm256_loadu_ps(q[0]);
#pragma GCC unroll 8
            for (int j = 0; j < 8; ++j) a[j] = _mm256_mul_ps(q0, load8(k0 + j * sk));
            for (int64_t d = 8; d < D; d += 8) {
                const __m256 p0 = _mm256_loadu_ps(q[0] + d);
#pragma GCC unroll 8
                for (int j = 0; j < 8; ++j) a[j] = _mm256_fmadd_ps(p0, load8(k0 + j * sk + d), a[j]);
            }
        } else {  // three rows: each key chunk loaded once for the three
            __m256 qr[3];
#pragma GCC unroll 3
            for (int r = 0; r < 3; ++r) qr[r] = _mm256_loadu_ps(q[r]);
#pragma GCC unroll 4
            for (int j = 0; j < 4; ++j) {
                const __m256 kj = load8(k0 + j * sk);
#pragma GCC unroll 3
                for (int r = 0; r < 3; ++r) a[r * 4 + j] = _mm256_mul_ps(qr[r], kj);
            }
            for (int64_t d = 8; d < D; d += 8) {
#pragma GCC unroll 3
                for (int r = 0; r < 3; ++r) qr[r] = _mm256_loadu_ps(q[r] + d);
#pragma GCC unroll 4
                for (int j = 0; j < 4; ++j) {
                    const __m256 kj = load8(k0 + j * sk + d);
#pragma GCC unroll 3
                    for (int r = 0; r < 3; ++r) a[r * 4 + j] = _mm256_fmadd_ps(qr[r], kj, a[r * 4 + j]);
                }
            }
        }
        const __m256 x = _mm256_blendv_ps(ninf, _mm256_mul_ps(hsum8(a), sc), ok);
        if constexpr (R == 1) {
            _mm256_storeu_ps(scores[0] + s, x);
        } else {
            _mm_storeu_ps(scores[0] + s, _mm256_castps256_ps128(x));
            _mm_storeu_ps(scores[1] + s, _mm256_extractf128_ps(x, 1));
        }
        tops = _mm256_max_ps(x, tops);
        if constexpr (R == 3) {
            const __m128 x2 = _mm_blendv_ps(ninf4, _mm_mul_ps(hsum4(a + 8), sc4), ok2);
            _mm_storeu_ps(scores[2] + s, x2);
            tops2 = _mm_max_ps(x2, tops2);
        }
    }
    alignas(32) float lanes[12];
    _mm256_store_ps(lanes, tops);
    _mm_store_ps(lanes + 8, tops2);
#pragma GCC unroll 12
    for (int j = 0; j < R * KB; ++j) top[j / KB] = std::max(top[j / KB], lanes[j]);
    score_keys<R>(q, k, sk, allowed, s, s1, D, scale, scores, top);
}

// Two query rows against eight keys at a time on AVX-512 (chosen at run time): one 16-lane register per key holds row
// 0's eight dot-product lanes in its low half and row 1's in its high half, each half the chain of dot_lanes op for op
// (q_0 * k_0, then FMAs over d in order), and each half's horizontal sum is hsum's (hsum8 of the halves): every score
// is the AVX2 path's bit for bit, at sixteen multiply-adds per instruction. Head sizes up to kPairMaxD.
constexpr int64_t kPairMaxD = 256;

PROPD_AVX512 inline __m512 key_pair(const float* p) {  // eight values of a key in both halves
    return _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_castps_pd(_mm256_loadu_ps(p))));
}
PROPD_AVX512 inline __m512 key_pair(const uint16_t* p) {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_broadcastsi128_si256(raw)), 16));
}

template <typename KV>
PROPD_AVX512 void score_pair512(const float* const* q, const KV* k, int64_t sk, const bool* const* allowed,
                                int64_t s0, int64_t s1, int64_t D, float scale, float* const* scores, float* top) {
    alignas(64) float qp[2 * kPairMaxD];  // chunk c: [q_0[8c, 8c + 8) | q_1[8c, 8c + 8)]
    for (int64_t c = 0; c < D / 8; ++c) {
        std::memcpy(qp + 16 * c, q[0] + 8 * c, 8 * sizeof(float));
        std::memcpy(qp + 16 * c + 8, q[1] + 8 * c, 8 * sizeof(float));
    }
    const __m256 ninf = _mm256_set1_ps(-INFINITY), sc = _mm256_set1_ps(scale);
    __m256 tops0 = ninf, tops1 = ninf;
    int64_t s = s0;
    for (; s + 8 <= s1; s += 8) {
        const __m256 ok0 = allowed8(allowed[0] + s, allowed[0] + s + 4);
        const __m256 ok1 = allowed8(allowed[1] + s, allowed[1] + s + 4);
        if (_mm256_movemask_ps(_mm256_or_ps(ok0, ok1)) == 0) {
            _mm256_storeu_ps(scores[0] + s, ninf);
            _mm256_storeu_ps(scores[1] + s, ninf);
            continue;
        }
        const KV* k0 = k + s * sk;
        __m512 a[8];
        __m512 qc = _mm512_load_ps(qp);
#pragma GCC unroll 8
        for (int j = 0; j < 8; ++j) a[j] = _mm512_mul_ps(qc, key_pair(k0 + j * sk));
        for (int64_t d = 8; d < D; d += 8) {
            qc = _mm512_load_ps(qp + 2 * d);
#pragma GCC unroll 8
            for (int j = 0; j < 8; ++j) a[j] = _mm512_fmadd_ps(qc, key_pair(k0 + j * sk + d), a[j]);
        }
        __m256 lo[8], hi[8];
#pragma GCC unroll 8
        for (int j = 0; j < 8; ++j) {
            lo[j] = _mm512_castps512_ps256(a[j]);
            hi[j] = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a[j]), 1));
        }
        const __m256 x0 = _mm256_blendv_ps(ninf, _mm256_mul_ps(hsum8(lo), sc), ok0);
        const __m256 x1 = _mm256_blendv_ps(ninf, _mm256_mul_ps(hsum8(hi), sc), ok1);
        _mm256_storeu_ps(scores[0] + s, x0);
        _mm256_storeu_ps(scores[1] + s, x1);
        tops0 = _mm256_max_ps(x0, tops0);
        tops1 = _mm256_max_ps(x1, tops1);
    }
    alignas(32) float lanes[2][8];
    _mm256_store_ps(lanes[0], tops0);
    _mm256_store_ps(lanes[1], tops1);
    for (int r = 0; r < 2; ++r)
        for (int j = 0; j < 8; ++j) top[r] = std::max(top[r], lanes[r][j]);
    score_keys<2>(q, k, sk, allowed, s, s1, D, scale, scores, top);
}

// scores (S8 = S rounded up to 8, the tail -inf) -> exp(score - top), exact 0 where -inf (an allowed key's weight is
// never 0: exp8 stops at about 1e-38); returns 1 / their sum. The sum runs in 8 lanes by each allowed key's rank among
// the allowed keys, not by its position: a tree node's ancestors sit among masked siblings, where an AR step has the
// same keys side by side, and both must give the same bits. The allowed prefix goes 8 at a time, the rest one by one.
inline float softmax_weights(float* scores, int64_t S8, float top) {
    const __m256 m = _mm256_set1_ps(top), ninf = _mm256_set1_ps(-INFINITY), zero = _mm256_setzero_ps();
    for (int64_t s = 0; s < S8; s += 8) {
        const __m256 x = _mm256_loadu_ps(scores + s);
        _mm256_storeu_ps(scores + s, _mm256_andnot_ps(_mm256_cmp_ps(x, ninf, _CMP_EQ_OQ), exp8(_mm256_sub_ps(x, m))));
    }
    __m256 total = zero;
    int64_t s = 0;
    for (; s < S8; s += 8) {  // ranks equal positions while every key is allowed
        const __m256 p = _mm256_loadu_ps(scores + s);
        if (_mm256_movemask_ps(_mm256_cmp_ps(p, zero, _CMP_EQ_OQ))) break;
        total = _mm256_add_ps(total, p);
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, total);
    for (int lane = 0; s < S8; ++s) {  // s is a multiple of 8 here: the next allowed key's rank is 0 mod 8
        if (scores[s] != 0.0f) {
            lanes[lane] += scores[s];
            lane = (lane + 1) & 7;
        }
    }
    return 1.0f / hsum(_mm256_load_ps(lanes));
}

// out_r[d0, d0 + 8 NC) += sum over s in [s0, s1) of p_r[s] v_s, for R rows of one key head, s in order; a key the row
// may not attend (weight 0; its value row may hold anything) is skipped for that row. Each chunk of a value row
// is loaded once for the R rows; R x NC accumulators in registers. A row's sums are the same whatever its group.
template <int R, int NC, typename KV>
void value_rows(float* const* out, const float* const* p, const bool* const* allowed, const KV* v, int64_t sv,
                int64_t s0, int64_t s1, int64_t d0) {
    __m256 acc[R][NC];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
        for (int j = 0; j < NC; ++j) acc[r][j] = _mm256_loadu_ps(out[r] + d0 + 8 * j);
    for (int64_t s = s0; s < s1; ++s) {
        const KV* vs = v + s * sv + d0;
        float w[R];
        bool all = true;
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) {
            w[r] = p[r][s];
            all = all & allowed[r][s];
        }
        if (all) {
            __m256 wr[R];
#pragma GCC unroll 4
            for (int r = 0; r < R; ++r) wr[r] = _mm256_set1_ps(w[r]);
#pragma GCC unroll 4
            for (int j = 0; j < NC; ++j) {
                const __m256 x = load8(vs + 8 * j);
#pragma GCC unroll 4
                for (int r = 0; r < R; ++r) acc[r][j] = _mm256_fmadd_ps(wr[r], x, acc[r][j]);
            }
        } else {
#pragma GCC unroll 4
            for (int r = 0; r < R; ++r) {
                if (!allowed[r][s]) continue;
                const __m256 wr = _mm256_set1_ps(w[r]);
#pragma GCC unroll 4
                for (int j = 0; j < NC; ++j) acc[r][j] = _mm256_fmadd_ps(wr, load8(vs + 8 * j), acc[r][j]);
            }
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
        for (int j = 0; j < NC; ++j) _mm256_storeu_ps(out[r] + d0 + 8 * j, acc[r][j]);
}

// All of D for R rows: passes of 32 values of d (8 accumulators for 2 rows), then the rest.
template <int R, typename KV>
void value_rows(float* const* out, const float* const* p, const bool* const* allowed, const KV* v, int64_t sv,
                int64_t s0, int64_t s1, int64_t D) {
    int64_t d0 = 0;
    for (; d0 + 32 <= D; d0 += 32) value_rows<R, 4>(out, p, allowed, v, sv, s0, s1, d0);
    switch ((D - d0) / 8) {
        case 3: value_rows<R, 3>(out, p, allowed, v, sv, s0, s1, d0); break;
        case 2: value_rows<R, 2>(out, p, allowed, v, sv, s0, s1, d0); break;
        case 1: value_rows<R, 1>(out, p, allowed, v, sv, s0, s1, d0); break;
        default: break;
    }
}

// The same sums on AVX-512 (CPUs with AVX-512F, chosen at run time): each output element's chain of FMAs over s is the
// one above, lane for lane (the values have no horizontal sums), so the bits are the same; 16 lanes per register and
// up to 128 values of a row in registers, so each key's weight and mask are read once per 128 values rather than once
// per 32. ``tail``: the lanes of the last chunk that are real (D need only be a multiple of 8).
PROPD_AVX512 inline __m512 load16v(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
PROPD_AVX512 inline __m512 load16v(const uint16_t* p, __mmask16 m) {
    const __m256i raw = m == 0xFFFF ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                                    : _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

template <int R, int NC, typename KV>
PROPD_AVX512 void value_rows512(float* const* out, const float* const* p, const bool* const* allowed, const KV* v,
                                int64_t sv, int64_t s0, int64_t s1, int64_t d0, __mmask16 tail) {
    __m512 acc[R][NC];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
        for (int j = 0; j < NC; ++j) acc[r][j] = _mm512_maskz_loadu_ps(j == NC - 1 ? tail : 0xFFFF, out[r] + d0 + 16 * j);
    for (int64_t s = s0; s < s1; ++s) {
        const KV* vs = v + s * sv + d0;
        float w[R];
        bool all = true;
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) {
            w[r] = p[r][s];
            all = all & allowed[r][s];
        }
        if (all) {
            __m512 wr[R];
#pragma GCC unroll 4
            for (int r = 0; r < R; ++r) wr[r] = _mm512_set1_ps(w[r]);
#pragma GCC unroll 8
            for (int j = 0; j < NC; ++j) {
                const __m512 x = load16v(vs + 16 * j, j == NC - 1 ? tail : 0xFFFF);
#pragma GCC unroll 4
                for (int r = 0; r < R; ++r) acc[r][j] = _mm512_fmadd_ps(wr[r], x, acc[r][j]);
            }
        } else {
#pragma GCC unroll 4
            for (int r = 0; r < R; ++r) {
                if (!allowed[r][s]) continue;
                const __m512 wr = _mm512_set1_ps(w[r]);
#pragma GCC unroll 8
                for (int j = 0; j < NC; ++j)
                    acc[r][j] = _mm512_fmadd_ps(wr, load16v(vs + 16 * j, j == NC - 1 ? tail : 0xFFFF), acc[r][j]);
            }
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
        for (int j = 0; j < NC; ++j) _mm512_mask_storeu_ps(out[r] + d0 + 16 * j, j == NC - 1 ? tail : 0xFFFF, acc[r][j]);
}

// All of D for R rows on AVX-512: passes of 128 values of d, then the rest in one pass of up to 8 chunks.
template <int R, typename KV>
PROPD_AVX512 void value_rows512(float* const* out, const float* const* p, const bool* const* allowed, const KV* v,
                                int64_t sv, int64_t s0, int64_t s1, int64_t D) {
    int64_t d0 = 0;
    for (; d0 + 128 <= D; d0 += 128) value_rows512<R, 8>(out, p, allowed, v, sv, s0, s1, d0, 0xFFFF);
    const int64_t left = D - d0;  // a multiple of 8, below 128
    if (left == 0) return;
    const __mmask16 tail = left % 16 ? static_cast<__mmask16>(0x00FF) : static_cast<__mmask16>(0xFFFF);
    switch ((left + 15) / 16) {
        case 1: value_rows512<R, 1>(out, p, allowed, v, sv, s0, s1, d0, tail); break;
        case 2: value_rows512<R, 2>(out, p, allowed, v, sv, s0, s1, d0, tail); break;
        case 3: value_rows512<R, 3>(out, p, allowed, v, sv, s0, s1, d0, tail); break;
        case 4: value_rows512<R, 4>(out, p, allowed, v, sv, s0, s1, d0, tail); break;
        case 5: value_rows512<R, 5>(out, p, allowed, v, sv, s0, s1, d0, tail); break;
        case 6: value_rows512<R, 6>(out, p, allowed, v, sv, s0, s1, d0, tail); break;
        case 7: value_rows512<R, 7>(out, p, allowed, v, sv, s0, s1, d0, tail); break;
        default: value_rows512<R, 8>(out, p, allowed, v, sv, s0, s1, d0, tail); break;
    }
}

constexpr int64_t kKeyTile = 64;  // keys per tile: a tile's keys (or values) stay in L1 while every row of a block uses them
constexpr int64_t kRowBlock = 12;  // query rows (of one key head) per work item of the thread pool
constexpr int kRowGroup = 3;      // rows per register block of the score and value loops (AVX2; 2 on AVX-512)

// Rows per work item for ``rows`` query rows on each of ``heads`` key heads: at most kRowBlock, whole register groups
// of ``grp`` rows where rows allow, and a count of items that splits evenly over ``threads`` where one more block per
// head gives that (8 tokens on 3 key heads: 6 blocks of 12 rows, not 9 of 8). Rows that fit one register group per
// head (a query token's 3 on AVX2) stay one block while there are at least as many heads as threads: each block reads
// all of its head's keys and values, which at long contexts come from memory, so splitting it would read them twice.
inline int64_t rows_per_block(int64_t rows, int64_t heads, int64_t grp, int64_t threads) {
    if (rows <= grp) {  // one register group per head: split it only where heads alone would leave a thread no work
        if (heads >= threads) return rows;
        const int64_t items_per_head = (2 * threads + heads - 1) / heads;
        const int64_t n = std::max<int64_t>(1, std::min(rows, items_per_head));
        return (rows + n - 1) / n;
    }
    const int64_t units = (rows + grp - 1) / grp;
    auto block = [&](int64_t n) { return (units + n - 1) / n * grp; };
    int64_t n = (rows + kRowBlock - 1) / kRowBlock;
    if ((heads * n) % threads != 0 && n + 1 <= units && block(n + 1) <= kRowBlock) n += 1;
    return std::min(block(n), kRowBlock);
}

// Query rows that share one key head (the heads of its group times the T tokens, GQA), a token's heads side by side:
// in blocks (rows_per_block), each block walks the keys tile by tile. A row's result is the same as it would be alone:
// its sums run over s in order.
// q and out are of the cache's type KV (bfloat16 as its bits: each q row is widened to float32 on the stack, and each
// output row rounded to bfloat16 as torch rounds once it is done).
template <typename KV>
void attend(const KV* q, const KV* k, const KV* v, const bool* mask, KV* out, int64_t B, int64_t Hq,
            int64_t Hk, int64_t T, int64_t S, int64_t D, const int64_t* ks, const int64_t* vs, float scale) {
    constexpr bool float_kv = std::is_same_v<KV, float>;
    const bool wide_isa = attention_wide();
    const int64_t group = Hq / Hk, S8 = (S + 7) / 8 * 8, rows = group * T;
    const int64_t grp = wide_isa ? 2 : kRowGroup;  // AVX-512 scores take rows in pairs (score_pair512)
    const int64_t block_rows = rows_per_block(rows, B * Hk, grp, at::get_num_threads());
    const int64_t blocks = (rows + block_rows - 1) / block_rows;
    parallel_units(B * Hk * blocks, [&](int64_t begin, int64_t end) {
        std::vector<float> buf(kRowBlock * S8), rows_f(float_kv ? 0 : 2 * kRowBlock * D);
        KV* dst[kRowBlock];
        const float* qr[kRowBlock];
        const bool* mr[kRowBlock];
        float* orow[kRowBlock];
        float top[kRowBlock], inv[kRowBlock];
        for (int64_t i = begin; i < end; ++i) {
            const int64_t b = i / (Hk * blocks), g = (i / blocks) % Hk, r0 = (i % blocks) * block_rows;
            const int64_t R = std::min(block_rows, rows - r0);
            const KV* kb = k + b * ks[0] + g * ks[1];
            const KV* vb = v + b * vs[0] + g * vs[1];
            for (int64_t r = 0; r < R; ++r) {  // row r0 + r: token (r0 + r) / group, head g * group + (r0 + r) % group
                const int64_t h = g * group + (r0 + r) % group, t = (r0 + r) / group;
                const KV* qs = q + ((b * Hq + h) * T + t) * D;
                dst[r] = out + ((b * T + t) * Hq + h) * D;
                if constexpr (float_kv) {
                    qr[r] = qs;
                    orow[r] = dst[r];
                } else {
                    float* qw = rows_f.data() + r * D;
                    for (int64_t d = 0; d < D; ++d) qw[d] = widen_bits(qs[d]);
                    qr[r] = qw;
                    orow[r] = rows_f.data() + (kRowBlock + r) * D;
                }
                mr[r] = mask + (b * T + t) * S;
                top[r] = -INFINITY;
                std::fill(buf.begin() + r * S8 + S, buf.begin() + (r + 1) * S8, -INFINITY);
                std::fill(orow[r], orow[r] + D, 0.0f);
            }
            float* sr[kRowBlock];
            const float* pr[kRowBlock];
            for (int64_t r = 0; r < R; ++r) pr[r] = sr[r] = &buf[r * S8];
            for (int64_t s0 = 0; s0 < S; s0 += kKeyTile) {  // rows in register groups, each tile in L1
                const int64_t s1 = std::min(S, s0 + kKeyTile);
                for (int64_t r = 0; r < R; r += grp)
                    with_rows<kRowGroup>(std::min<int64_t>(grp, R - r), [&](auto n) {
                        if (decltype(n)::value == 2 && wide_isa && D <= kPairMaxD) {
                            score_pair512(qr + r, kb, ks[2], mr + r, s0, s1, D, scale, sr + r, top + r);
                        } else {
                            score_rows<decltype(n)::value>(qr + r, kb, ks[2], mr + r, s0, s1, D, scale, sr + r, top + r);
                        }
                    });
            }
            for (int64_t r = 0; r < R; ++r) inv[r] = softmax_weights(&buf[r * S8], S8, top[r]);
            for (int64_t s0 = 0; s0 < S; s0 += kKeyTile) {
                const int64_t s1 = std::min(S, s0 + kKeyTile);
                for (int64_t r = 0; r < R; r += grp)
                    with_rows<kRowGroup>(std::min<int64_t>(grp, R - r), [&](auto n) {
                        if (wide_isa) {
                            value_rows512<decltype(n)::value>(orow + r, pr + r, mr + r, vb, vs[2], s0, s1, D);
                        } else {
                            value_rows<decltype(n)::value>(orow + r, pr + r, mr + r, vb, vs[2], s0, s1, D);
                        }
                    });
            }
            for (int64_t r = 0; r < R; ++r) {
                const __m256 w = _mm256_set1_ps(inv[r]);
                for (int64_t d = 0; d < D; d += 8) _mm256_storeu_ps(orow[r] + d, _mm256_mul_ps(_mm256_loadu_ps(orow[r] + d), w));
                if constexpr (!float_kv) {
                    for (int64_t d = 0; d < D; ++d) dst[r][d] = c10::BFloat16(orow[r][d]).x;
                }
            }
        }
    });
}

}  // namespace

// Attention of T query tokens per row over S cached keys, for decoding steps (few queries): q (B, Hq, T, D), keys and
// values (B, Hk, S, D) with unit stride in D (views of the cache), mask (B, T, S) bool (true: may attend). Returns
// (B, T, Hq * D), the layout the output projection takes. D must be a multiple of 8; Hq a multiple of Hk (grouped-
// query attention). float32, or bfloat16 (computed in float32, rounded once).
torch::Tensor tree_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                             const torch::Tensor& mask, double scale) {
    TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && mask.dim() == 3, "tree_attention: bad ranks");
    const int64_t B = q.size(0), Hq = q.size(1), T = q.size(2), D = q.size(3), Hk = k.size(1), S = k.size(2);
    TORCH_CHECK(kernel_dtype(q.scalar_type()) && k.scalar_type() == q.scalar_type() &&
                v.scalar_type() == q.scalar_type() && q.device().is_cpu() && k.device().is_cpu() &&
                v.device().is_cpu() && mask.device().is_cpu(), "tree_attention: float32 or bfloat16 CPU tensors");
    TORCH_CHECK(D % 8 == 0 && Hk > 0 && Hq % Hk == 0 && k.size(0) == B && v.size(0) == B && v.size(1) == Hk &&
                v.size(2) == S && k.size(3) == D && v.size(3) == D && k.stride(3) == 1 && v.stride(3) == 1,
                "tree_attention: shapes do not fit");
    TORCH_CHECK(mask.scalar_type() == at::kBool && mask.size(0) == B && mask.size(1) == T && mask.size(2) == S,
                "tree_attention: mask must be (B, T, S) bool");
    const auto qc = q.contiguous();
    const auto m = mask.contiguous();
    auto out = torch::empty({B, T, Hq * D}, qc.options());
    const int64_t ks[3] = {k.stride(0), k.stride(1), k.stride(2)}, vs[3] = {v.stride(0), v.stride(1), v.stride(2)};
    if (B * T * Hq > 0 && S > 0) {
        if (q.scalar_type() == at::kBFloat16) {
            const auto bits = [](const torch::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>()); };
            attend<uint16_t>(bits(qc), bits(k), bits(v), m.data_ptr<bool>(), bits(out), B, Hq, Hk, T, S, D, ks, vs,
                             static_cast<float>(scale));
        } else {
            attend<float>(qc.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), m.data_ptr<bool>(),
                          out.data_ptr<float>(), B, Hq, Hk, T, S, D, ks, vs, static_cast<float>(scale));
        }
    }
    return out;
}

// ---------------------------------------------------------------------------------------------- prefill attention
// Causal self-attention of a prompt's chunk (a prefill's T positions S - T .. S - 1 over keys [0, S)), float32:
// flash attention (Dao et al., "FlashAttention", 2022) with the online softmax (Milakov and Gimelshein, 2018). The
// keys of each key head are first transposed into blocks of 16 (D, 16; 8 on AVX2), so that a tile of 12 query rows
// scores 16 keys per register with one load of keys and 12 broadcasts of queries per d, as a product's micro-kernel;
// each 64 keys update the rows' running max, sum and output (O <- O exp(m_old - m_new) + P V). A row's result depends
// only on its query, what it sees and the key count, not on the rows beside it or the batch.
namespace causal {

constexpr int64_t kRows = 12;  // query rows (tokens of one head) per tile
constexpr int64_t kKeys = 64;  // keys per online-softmax update

PROPD_AVX512 inline void transpose16(__m512* r) {  // r[i][j] -> r[j][i], a 16 x 16 block of float32
    __m512 t[16];
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
        const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
        const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
        r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
        r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
        r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
        r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
    }
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
        t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
        t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xDD);
        t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
        t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xDD);
    }
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) {
        r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
        r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xDD);
    }
}

// kt (nb, D, 16): block j holds keys 16 j .. 16 j + 15 of one key head, transposed; keys past T are 0.
template <int64_t D>
PROPD_AVX512 void transpose_keys(const float* k, int64_t sk, int64_t T, int64_t j, float* kt) {
    float* dst = kt + j * D * 16;
    const int64_t n = std::min<int64_t>(16, T - 16 * j);
    for (int64_t d0 = 0; d0 < D; d0 += 16) {
        __m512 r[16];
#pragma GCC unroll 16
        for (int i = 0; i < 16; ++i)
            r[i] = i < n ? _mm512_loadu_ps(k + (16 * j + i) * sk + d0) : _mm512_setzero_ps();
        transpose16(r);
#pragma GCC unroll 16
        for (int i = 0; i < 16; ++i) _mm512_store_ps(dst + (d0 + i) * 16, r[i]);
    }
}

PROPD_AVX512 inline __mmask16 allowed16(const bool* a) {  // 16 bools as a lane mask
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(a));
    return _mm512_test_epi32_mask(_mm512_cvtepu8_epi32(bytes), _mm512_set1_epi32(0xFF));
}

// The online softmax's update of one row after a block of its scores Sr[0, n) (-inf where unseen, n a multiple of 8):
// Sr becomes the weights exp(s - m_new) (0 where unseen), the row's max m and sum l follow, and its output O (D values)
// is rescaled by exp(m - m_new) (Milakov and Gimelshein, 2018). 8 lanes for both ISAs: a small part of a tile's work.
inline float hmax8(__m256 v) {
    const __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 t = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(t, _mm_movehdup_ps(t)));
}

inline void softmax_update(float* Sr, int64_t n, float& m, float& l, float* O, int64_t D) {
    const __m256 ninf = _mm256_set1_ps(-INFINITY);
    __m256 mx = ninf;
    for (int64_t j = 0; j < n; j += 8) mx = _mm256_max_ps(mx, _mm256_loadu_ps(Sr + j));
    const float m_new = std::max(m, hmax8(mx));
    if (m_new == -INFINITY) {  // no key seen yet (a padding row before its slot): weights 0
        std::fill(Sr, Sr + n, 0.0f);
        return;
    }
    const __m256 mm = _mm256_set1_ps(m_new);
    __m256 sum = _mm256_setzero_ps();
    for (int64_t j = 0; j < n; j += 8) {
        const __m256 x = _mm256_loadu_ps(Sr + j);
        const __m256 p = _mm256_andnot_ps(_mm256_cmp_ps(x, ninf, _CMP_EQ_OQ), exp8(_mm256_sub_ps(x, mm)));
        _mm256_storeu_ps(Sr + j, p);
        sum = _mm256_add_ps(sum, p);
    }
    const float corr = m == -INFINITY ? 0.0f : std::exp(m - m_new);
    l = l * corr + hsum(sum);
    m = m_new;
    if (corr != 1.0f) {
        const __m256 c = _mm256_set1_ps(corr);
        for (int64_t d = 0; d < D; d += 8) _mm256_storeu_ps(O + d, _mm256_mul_ps(_mm256_loadu_ps(O + d), c));
    }
}

// A tile's start and end: rows' outputs O (rows x D) 0, maxima -inf, sums 0; then out[r] = O[r] / l[r].
inline void start_rows(float* O, float* m, float* l, int rows, int64_t D) {
    std::fill(O, O + rows * D, 0.0f);
    std::fill(m, m + rows, -INFINITY);
    std::fill(l, l + rows, 0.0f);
}

inline void finish_rows(const float* O, const float* l, int rows, int64_t D, float* const* out) {
    for (int r = 0; r < rows; ++r) {
        const __m256 inv = _mm256_set1_ps(1.0f / l[r]);
        for (int64_t d = 0; d < D; d += 8)
            _mm256_storeu_ps(out[r] + d, _mm256_mul_ps(_mm256_loadu_ps(O + r * D + d), inv));
    }
}

// Which of 16 keys from s each row sees. Causal: row r at position p0 + r sees keys [0, p0 + r]. Masked: a (T, S)
// bool row per query row (a decoding step's tree), keys [0, dense) seen by every row.
struct CausalRows {
    int64_t p0;
    int64_t end(int rows) const { return p0 + rows; }  // keys [0, end) matter
    static constexpr bool garbage = false;            // every key below end holds a written value
    PROPD_AVX512 __mmask16 ok(int r, int64_t s) const {
        const __m512i keys = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(s)),
                                              _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
        return _mm512_cmple_epi32_mask(keys, _mm512_set1_epi32(static_cast<int>(p0 + r)));
    }
    __m256 ok8(int r, int64_t s) const {  // lanes of 8 keys from s, all ones where seen
        const __m256i keys =
            _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(s)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(p0 + r + 1)), keys));
    }
};

struct MaskRows {
    const bool* const* rows;
    int64_t S, dense;
    int64_t end(int) const { return S; }
    static constexpr bool garbage = true;  // a key no row of a tile sees may hold anything (a padding slot)
    PROPD_AVX512 __mmask16 ok(int r, int64_t s) const {
        if (s + 16 <= dense) return 0xFFFF;
        if (s + 16 <= S) return allowed16(rows[r] + s);
        __mmask16 m = 0;
        for (int64_t j = 0; s + j < S; ++j) m |= static_cast<__mmask16>(rows[r][s + j] ? 1u << j : 0u);
        return m;
    }
};

// Scores of MR rows (q[r]) against the 16 keys from s (a block of kt): rows x 16, scaled, -inf where not seen.
template <int MR, int64_t D, typename M>
PROPD_AVX512 inline void score16(const float* const* q, const float* ktj, const M& mask, int64_t s, float scale,
                                 float* S, int64_t ldS) {
    __m512 a[MR];
#pragma GCC unroll 12
    for (int r = 0; r < MR; ++r) a[r] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; ++d) {
        const __m512 kv = _mm512_load_ps(ktj + d * 16);
#pragma GCC unroll 12
        for (int r = 0; r < MR; ++r) a[r] = _mm512_fmadd_ps(_mm512_set1_ps(q[r][d]), kv, a[r]);
    }
    const __m512 sc = _mm512_set1_ps(scale), ninf = _mm512_set1_ps(-INFINITY);
#pragma GCC unroll 12
    for (int r = 0; r < MR; ++r)
        _mm512_storeu_ps(S + r * ldS, _mm512_mask_blend_ps(mask.ok(r, s), ninf, _mm512_mul_ps(a[r], sc)));
}

// O[r] += sum over s in [0, n) of P[r][s] v_s for MR rows, D = 16 NC values each; with ``skip``, a key whose weight is
// 0 in every row is left out (its value row may hold anything).
template <int MR, int NC, bool skip>
PROPD_AVX512 inline void add_values(const float* P, int64_t ldP, const float* v, int64_t sv, int64_t n, float* O) {
    __m512 acc[MR][NC];
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
        for (int c = 0; c < NC; ++c) acc[r][c] = _mm512_loadu_ps(O + r * 16 * NC + 16 * c);
    for (int64_t s = 0; s < n; ++s) {
        if constexpr (skip) {
            bool any = false;
#pragma GCC unroll 6
            for (int r = 0; r < MR; ++r) any = any || P[r * ldP + s] != 0.0f;
            if (!any) continue;
        }
        __m512 vv[NC];
#pragma GCC unroll 8
        for (int c = 0; c < NC; ++c) vv[c] = _mm512_loadu_ps(v + s * sv + 16 * c);
#pragma GCC unroll 6
        for (int r = 0; r < MR; ++r) {
            const __m512 w = _mm512_set1_ps(P[r * ldP + s]);
#pragma GCC unroll 8
            for (int c = 0; c < NC; ++c) acc[r][c] = _mm512_fmadd_ps(w, vv[c], acc[r][c]);
        }
    }
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
        for (int c = 0; c < NC; ++c) _mm512_storeu_ps(O + r * 16 * NC + 16 * c, acc[r][c]);
}

// One tile of MR query rows of one key head: q[r] in, out[r] out (D values each), keys as ``mask`` says.
template <int MR, int64_t D, typename M>
PROPD_AVX512 void tile(const float* const* q, const float* kt, const float* v, int64_t sv, const M& mask,
                       float scale, float* const* out) {
    constexpr int NC = static_cast<int>(D / 16), RG = NC <= 4 ? 24 / NC : 2;  // rows per value pass
    alignas(64) float S[kRows * kKeys];
    alignas(64) float O[kRows * D];
    float m[kRows], l[kRows];
    start_rows(O, m, l, MR, D);
    const int64_t last = mask.end(MR);
    for (int64_t s0 = 0; s0 < last; s0 += kKeys) {
        const int64_t n = std::min(kKeys, last - s0);
        for (int64_t j = 0; j < n; j += 16)
            score16<MR, D>(q, kt + (s0 + j) / 16 * D * 16, mask, s0 + j, scale, S + j, kKeys);
        const int64_t n16 = (n + 15) / 16 * 16;
        for (int r = 0; r < MR; ++r) softmax_update(S + r * kKeys, n16, m[r], l[r], O + r * D, D);
        const float* vs0 = v + s0 * sv;
        for (int r = 0; r < MR; r += RG)
            with_rows<RG>(std::min<int64_t>(RG, MR - r), [&](auto g) {
                add_values<decltype(g)::value, NC, M::garbage>(S + r * kKeys, kKeys, vs0, sv, n, O + r * D);
            });
    }
    finish_rows(O, l, MR, D, out);
}

// The causal tiles on AVX2 (8 keys per register): keys transposed in blocks of 8 (nb, D, 8), 12 rows scoring 8 keys
// with one load and 12 broadcasts per step of d, value passes of 3 rows x 32 values. (Decoding steps stay on the
// decoding kernel there, which is faster on AVX2.)
inline void transpose8(__m256* r) {  // r[i][j] -> r[j][i], an 8 x 8 block of float32
    __m256 t[8], u[8];
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
        t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
#pragma GCC unroll 2
    for (int i = 0; i < 2; ++i) {
        u[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
        u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
        u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
        u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
    }
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
        r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
        r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
    }
}

template <int64_t D>
void transpose_keys8(const float* k, int64_t sk, int64_t T, int64_t j, float* kt) {
    float* dst = kt + j * D * 8;
    const int64_t n = std::min<int64_t>(8, T - 8 * j);
    for (int64_t d0 = 0; d0 < D; d0 += 8) {
        __m256 r[8];
#pragma GCC unroll 8
        for (int i = 0; i < 8; ++i) r[i] = i < n ? _mm256_loadu_ps(k + (8 * j + i) * sk + d0) : _mm256_setzero_ps();
        transpose8(r);
#pragma GCC unroll 8
        for (int i = 0; i < 8; ++i) _mm256_store_ps(dst + (d0 + i) * 8, r[i]);
    }
}

template <int MR, int64_t D, typename M>
inline void score8(const float* const* q, const float* ktj, const M& mask, int64_t s, float scale, float* S,
                   int64_t ldS) {
    __m256 a[MR];
#pragma GCC unroll 12
    for (int r = 0; r < MR; ++r) a[r] = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; ++d) {
        const __m256 kv = _mm256_load_ps(ktj + d * 8);
#pragma GCC unroll 12
        for (int r = 0; r < MR; ++r) a[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(q[r] + d), kv, a[r]);
    }
    const __m256 sc = _mm256_set1_ps(scale), ninf = _mm256_set1_ps(-INFINITY);
#pragma GCC unroll 12
    for (int r = 0; r < MR; ++r)
        _mm256_storeu_ps(S + r * ldS, _mm256_blendv_ps(ninf, _mm256_mul_ps(a[r], sc), mask.ok8(r, s)));
}

template <int MR>  // add_values' sums (every key below n written: only causal tiles run on AVX2)
inline void add_values8(const float* P, int64_t ldP, const float* v, int64_t sv, int64_t n, float* O, int64_t D) {
    for (int64_t d0 = 0; d0 < D; d0 += 32) {
        __m256 acc[MR][4];
#pragma GCC unroll 3
        for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
            for (int c = 0; c < 4; ++c) acc[r][c] = _mm256_loadu_ps(O + r * D + d0 + 8 * c);
        for (int64_t s = 0; s < n; ++s) {
            __m256 w[MR];
#pragma GCC unroll 3
            for (int r = 0; r < MR; ++r) w[r] = _mm256_set1_ps(P[r * ldP + s]);
#pragma GCC unroll 4
            for (int c = 0; c < 4; ++c) {
                const __m256 x = _mm256_loadu_ps(v + s * sv + d0 + 8 * c);
#pragma GCC unroll 3
                for (int r = 0; r < MR; ++r) acc[r][c] = _mm256_fmadd_ps(w[r], x, acc[r][c]);
            }
        }
#pragma GCC unroll 3
        for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
            for (int c = 0; c < 4; ++c) _mm256_storeu_ps(O + r * D + d0 + 8 * c, acc[r][c]);
    }
}

template <int MR, int64_t D, typename M>
void tile8(const float* const* q, const float* kt, const float* v, int64_t sv, const M& mask, float scale,
           float* const* out) {
    alignas(32) float S[kRows * kKeys];
    alignas(32) float O[kRows * D];
    float m[kRows], l[kRows];
    start_rows(O, m, l, MR, D);
    const int64_t last = mask.end(MR);
    for (int64_t s0 = 0; s0 < last; s0 += kKeys) {
        const int64_t n = std::min(kKeys, last - s0);
        for (int64_t j = 0; j < n; j += 8)
            score8<MR, D>(q, kt + (s0 + j) / 8 * D * 8, mask, s0 + j, scale, S + j, kKeys);
        const int64_t n8 = (n + 7) / 8 * 8;
        for (int r = 0; r < MR; ++r) softmax_update(S + r * kKeys, n8, m[r], l[r], O + r * D, D);
        const float* vs0 = v + s0 * sv;
        for (int r = 0; r < MR; r += 3)
            with_rows<3>(std::min<int64_t>(3, MR - r), [&](auto g) {
                static_assert(!M::garbage, "AVX2 tiles run causal prefill chunks only");
                add_values8<decltype(g)::value>(S + r * kKeys, kKeys, vs0, sv, n, O + r * D, D);
            });
    }
    finish_rows(O, l, MR, D, out);
}

// Keys of every (row, key head) transposed into (B Hk, nb, D, 16), nb = ceil(S / 16), in the calling thread's buffer
// (kept between calls: a fresh one of this size would be mapped and zeroed by the OS on every call).
template <int64_t D>
float* transposed_keys(const float* k, const int64_t* kst, int64_t B, int64_t Hk, int64_t S, bool wide) {
    const int64_t nb = (S + 15) / 16;  // units of 16 keys (AVX2: two blocks of 8)
    thread_local std::vector<float> buf;
    const size_t need = static_cast<size_t>(B * Hk * nb * D * 16 + 16);
    if (buf.size() < need) buf.resize(need);
    float* p = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(buf.data()) + 63) & ~uintptr_t(63));
    parallel_units(B * Hk * nb, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
            const int64_t bg = i / nb, j = i % nb;
            const float* kh = k + (bg / Hk) * kst[0] + (bg % Hk) * kst[1];
            float* dst = p + bg * nb * D * 16;
            if (wide) {
                transpose_keys<D>(kh, kst[2], S, j, dst);
            } else {
                for (int64_t h = 2 * j; h < 2 * j + 2 && 8 * h < S; ++h) transpose_keys8<D>(kh, kst[2], S, h, dst);
            }
        }
    });
    return p;
}

template <int64_t D>
void run(const float* q, const int64_t* qst, const float* k, const int64_t* kst, const float* v, const int64_t* vst,
         float* out, int64_t B, int64_t Hq, int64_t Hk, int64_t T, int64_t S, float scale) {
    const int64_t nb = (S + 15) / 16, group = Hq / Hk, tiles = (T + kRows - 1) / kRows;
    const bool wide = use_avx512();
    const float* kt = transposed_keys<D>(k, kst, B, Hk, S, wide);
    // units: (row b, head h, tile); tiles taken from both ends in turn, so that contiguous ranges of units hold as
    // many long tiles (late tokens see more keys) as short ones
    parallel_units(B * Hq * tiles, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
            const int64_t u = i % tiles, bh = i / tiles, b = bh / Hq, h = bh % Hq, g = h / group;
            const int64_t t = u % 2 == 0 ? u / 2 : tiles - 1 - u / 2, t0 = t * kRows;
            const int64_t rows = std::min(kRows, T - t0);
            const float* qr[kRows];
            float* orow[kRows];
            for (int64_t r = 0; r < rows; ++r) {
                qr[r] = q + b * qst[0] + h * qst[1] + (t0 + r) * qst[2];
                orow[r] = out + ((b * T + t0 + r) * Hq + h) * D;
            }
            const float* kth = kt + (b * Hk + g) * nb * D * 16;
            const float* vh = v + b * vst[0] + g * vst[1];
            with_rows<kRows>(rows, [&](auto n) {
                if (wide) {
                    tile<decltype(n)::value, D>(qr, kth, vh, vst[2], CausalRows{S - T + t0}, scale, orow);
                } else {
                    tile8<decltype(n)::value, D>(qr, kth, vh, vst[2], CausalRows{S - T + t0}, scale, orow);
                }
            });
        }
    });
}

// A decoding step's attention with a mask: the rows of one key head (its group's heads times the T tokens) in tiles
// of up to kRows, as many tiles per head as split evenly over the threads where rows allow.
template <int64_t D>
void run_masked(const float* q, const int64_t* qst, const float* k, const int64_t* kst, const float* v,
                const int64_t* vst, const bool* mask, int64_t dense, float* out, int64_t B, int64_t Hq, int64_t Hk,
                int64_t T, int64_t S, float scale) {
    const int64_t nb = (S + 15) / 16, group = Hq / Hk, rows = group * T;
    int64_t tiles = (rows + kRows - 1) / kRows;
    const int64_t threads = at::get_num_threads();
    if ((B * Hk * tiles) % threads != 0 && rows >= 4 * (tiles + 1)) tiles += 1;
    const float* kt = transposed_keys<D>(k, kst, B, Hk, S, true);
    parallel_units(B * Hk * tiles, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
            const int64_t b = i / (Hk * tiles), g = (i / tiles) % Hk, u = i % tiles;
            const int64_t r0 = rows * u / tiles, n = rows * (u + 1) / tiles - r0;
            const float* qr[kRows];
            const bool* mr[kRows];
            float* orow[kRows];
            for (int64_t r = 0; r < n; ++r) {  // row r0 + r: token (r0 + r) / group, head g group + (r0 + r) % group
                const int64_t h = g * group + (r0 + r) % group, t = (r0 + r) / group;
                qr[r] = q + b * qst[0] + h * qst[1] + t * qst[2];
                mr[r] = mask + (b * T + t) * S;
                orow[r] = out + ((b * T + t) * Hq + h) * D;
            }
            const float* kth = kt + (b * Hk + g) * nb * D * 16;
            const float* vh = v + b * vst[0] + g * vst[1];
            with_rows<kRows>(n, [&](auto c) {
                tile<decltype(c)::value, D>(qr, kth, vh, vst[2], MaskRows{mr, S, dense}, scale, orow);
            });
        }
    });
}

}  // namespace causal

// Causal self-attention of a prefill chunk: q (B, Hq, T, D) at positions S - T .. S - 1, keys and values (B, Hk, S, D)
// with unit stride in D (views of the cache), each query seeing keys [0, its position]; float32, D of 64 or 128.
// Returns (B, T, Hq * D).
torch::Tensor causal_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, double scale) {
    TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "causal_attention: bad ranks");
    const int64_t B = q.size(0), Hq = q.size(1), T = q.size(2), D = q.size(3), Hk = k.size(1), S = k.size(2);
    TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat &&
                q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
                "causal_attention: float32 CPU tensors");
    TORCH_CHECK((D == 64 || D == 128) && Hk > 0 && Hq % Hk == 0 && k.size(0) == B && v.size(0) == B &&
                v.size(1) == Hk && S >= T && v.size(2) == S && k.size(3) == D && v.size(3) == D &&
                q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "causal_attention: shapes do not fit");
    auto out = torch::empty({B, T, Hq * D}, q.options());
    if (B * T * Hq == 0) return out;
    const int64_t qst[3] = {q.stride(0), q.stride(1), q.stride(2)}, kst[3] = {k.stride(0), k.stride(1), k.stride(2)},
                  vst[3] = {v.stride(0), v.stride(1), v.stride(2)};
    const auto f = D == 64 ? &causal::run<64> : &causal::run<128>;
    f(q.data_ptr<float>(), qst, k.data_ptr<float>(), kst, v.data_ptr<float>(), vst, out.data_ptr<float>(), B, Hq, Hk,
      T, S, static_cast<float>(scale));
    return out;
}

// A decoding step's attention (few query tokens per row over cached keys) on the causal kernel's tiles, for float32
// steps where row invariance is not asked (cpu_kernel.masked_attention): q (B, Hq, T, D), keys and values (B, Hk, S,
// D) with unit stride in D, mask (B, T, S) bool; D of 64 or 128, AVX-512. Returns (B, T, Hq * D).
torch::Tensor masked_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                               const torch::Tensor& mask, double scale) {
    TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && mask.dim() == 3, "masked_attention: bad ranks");
    const int64_t B = q.size(0), Hq = q.size(1), T = q.size(2), D = q.size(3), Hk = k.size(1), S = k.size(2);
    TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat &&
                q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu() && mask.device().is_cpu(),
                "masked_attention: float32 CPU tensors");
    TORCH_CHECK((D == 64 || D == 128) && Hk > 0 && Hq % Hk == 0 && k.size(0) == B && v.size(0) == B &&
                v.size(1) == Hk && v.size(2) == S && k.size(3) == D && v.size(3) == D && q.stride(3) == 1 &&
                k.stride(3) == 1 && v.stride(3) == 1, "masked_attention: shapes do not fit");
    TORCH_CHECK(mask.scalar_type() == at::kBool && mask.size(0) == B && mask.size(1) == T && mask.size(2) == S,
                "masked_attention: mask must be (B, T, S) bool");
    TORCH_CHECK(use_avx512(), "masked_attention: needs AVX-512 (on AVX2 the decoding kernel is faster)");
    const auto m = mask.contiguous();
    auto out = torch::empty({B, T, Hq * D}, q.options());
    if (B * T * Hq == 0 || S == 0) return out;
    const bool* mp = m.data_ptr<bool>();
    int64_t dense = S;  // keys every query sees: the shortest row's prefix
    for (int64_t i = 0; i < B * T; ++i) {
        const void* hole = std::memchr(mp + i * S, 0, static_cast<size_t>(dense));
        if (hole != nullptr) dense = static_cast<const bool*>(hole) - (mp + i * S);
    }
    const int64_t qst[3] = {q.stride(0), q.stride(1), q.stride(2)}, kst[3] = {k.stride(0), k.stride(1), k.stride(2)},
                  vst[3] = {v.stride(0), v.stride(1), v.stride(2)};
    const auto f = D == 64 ? &causal::run_masked<64> : &causal::run_masked<128>;
    f(q.data_ptr<float>(), qst, k.data_ptr<float>(), kst, v.data_ptr<float>(), vst, mp, dense, out.data_ptr<float>(),
      B, Hq, Hk, T, S, static_cast<float>(scale));
    return out;
}

// A decoding step's attention: tree_attention, whose rows are invariant to the tree and batch around them, where
// ``invariant`` (bfloat16, 8-bit activations: cpu_kernel.rounds_to_tokens) or where the tiles of masked_attention do
// not pay (fewer than kTileMinQueries query tokens: its keys are transposed per call; no AVX-512; other head sizes);
// else masked_attention.
constexpr int64_t kTileMinQueries = 4;

torch::Tensor step_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                             const torch::Tensor& mask, double scale, bool invariant) {
    if (!invariant && q.scalar_type() == at::kFloat && q.dim() == 4 && q.size(2) >= kTileMinQueries &&
        (q.size(3) == 64 || q.size(3) == 128) && q.stride(3) == 1 && use_avx512())
        return masked_attention(q, k, v, mask, scale);
    return tree_attention(q, k, v, mask, scale);
}

// (O, K) float32 or bfloat16 -> (ceil(O/16), K, 16) of the same type, zero-padded.
torch::Tensor pack(const torch::Tensor& w) {
    TORCH_CHECK(w.dim() == 2 && kernel_dtype(w.scalar_type()) && w.device().is_cpu(),
                "pack: a 2-D float32 or bfloat16 CPU weight");
    const int64_t O = w.size(0), K = w.size(1), P = (O + kPanel - 1) / kPanel;
    if (w.scalar_type() == at::kBFloat16 && use_bf16_pairs()) {  // (P, K2, 16 x 2): pairs of k per output row
        const int64_t K2 = (K + 1) / 2;
        auto padded = torch::zeros({P * kPanel, 2 * K2}, w.options());
        padded.narrow(0, 0, O).narrow(1, 0, K).copy_(w);
        return padded.view({P, kPanel, K2, 2}).permute({0, 2, 1, 3}).contiguous().view({P, K2, 2 * kPanel});
    }
    auto padded = torch::zeros({P * kPanel, K}, w.options());
    padded.narrow(0, 0, O).copy_(w);
    return padded.view({P, kPanel, K}).transpose(1, 2).contiguous();
}

// ggml blocks (O, K / 32 * block bytes) uint8, rows of Q4_1 (20-byte) or Q8_0 (34-byte) blocks, into the panels the
// block kernel reads (P, K / 32, panel bytes), layout above; rows past O are zero blocks (weight 0). Q4_1's block
// holds weight j in the low nibble of byte j and weight j + 16 in its high nibble; panels pair k = 2i, 2i + 1.
torch::Tensor pack_gguf_blocks(const torch::Tensor& blocks, int64_t block_bytes) {
    TORCH_CHECK(blocks.dim() == 2 && blocks.is_contiguous() && blocks.scalar_type() == at::kByte &&
                    blocks.device().is_cpu() && (block_bytes == 20 || block_bytes == 34) &&
                    blocks.size(1) % block_bytes == 0,
                "pack_gguf_blocks: blocks must be a contiguous (O, n * block bytes) uint8 CPU tensor of Q4_1 or Q8_0");
    const bool q41 = block_bytes == 20;
    const int64_t O = blocks.size(0), nb = blocks.size(1) / block_bytes, P = (O + kPanel - 1) / kPanel;
    const int64_t bytes = q41 ? kQ41Bytes : kQ80Bytes;
    auto out = torch::zeros({P, nb, bytes}, blocks.options());
    const uint8_t* src = blocks.data_ptr<uint8_t>();
    uint8_t* dst = out.data_ptr<uint8_t>();
    at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
        for (int64_t p = begin; p < end; ++p) {
            for (int64_t b = 0; b < nb; ++b) {
                uint8_t* panel = dst + (p * nb + b) * bytes;
                for (int64_t o = 0; o < kPanel && p * kPanel + o < O; ++o) {
                    const uint8_t* blk = src + (p * kPanel + o) * nb * block_bytes + b * block_bytes;
                    panel[2 * o] = blk[0];
                    panel[2 * o + 1] = blk[1];
                    if (q41) {
                        panel[2 * kPanel + 2 * o] = blk[2];
                        panel[2 * kPanel + 2 * o + 1] = blk[3];
                        const uint8_t* qs = blk + 4;
                        for (int64_t i = 0; i < kQK / 2; ++i) {
                            const int64_t k0 = 2 * i, k1 = 2 * i + 1;
                            const uint8_t q0 = k0 < 16 ? (qs[k0] & 15) : (qs[k0 - 16] >> 4);
                            const uint8_t q1 = k1 < 16 ? (qs[k1] & 15) : (qs[k1 - 16] >> 4);
                            panel[4 * kPanel + i * kPanel + o] = static_cast<uint8_t>(q0 | (q1 << 4));
                        }
                    } else {
                        for (int64_t k = 0; k < kQK; ++k) panel[2 * kPanel + k * kPanel + o] = blk[2 + k];
                    }
                }
            }
        }
    });
    return out;
}

// ggml Q4_1 (20-byte) or Q8_0 (34-byte) blocks (O, K / 32 * block bytes) uint8 into the panels of the
// 8-bit-activation kernel (P, K / 32, 320 or 544), as an int8 tensor (the mark packed_linear dispatches on); layout in
// "GGUF blocks, 8-bit activations" above.
torch::Tensor pack_gguf_for_q8(const torch::Tensor& blocks, int64_t block_bytes) {
    TORCH_CHECK(blocks.dim() == 2 && blocks.is_contiguous() && blocks.scalar_type() == at::kByte &&
                    blocks.device().is_cpu() && (block_bytes == 20 || block_bytes == 34) &&
                    blocks.size(1) % block_bytes == 0,
                "pack_gguf_for_q8: blocks must be a contiguous (O, n * block bytes) uint8 CPU tensor of Q4_1 or Q8_0");
    const bool q41 = block_bytes == 20;
    const int64_t O = blocks.size(0), nb = blocks.size(1) / block_bytes, P = (O + kPanel - 1) / kPanel;
    const int64_t bytes = q41 ? kQ8Q41Bytes : kQ8Q80Bytes;
    auto out = torch::zeros({P, nb, bytes}, blocks.options().dtype(at::kChar));
    const uint8_t* src = blocks.data_ptr<uint8_t>();
    uint8_t* dst = reinterpret_cast<uint8_t*>(out.data_ptr<int8_t>());
    at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
        for (int64_t p = begin; p < end; ++p) {
            for (int64_t b = 0; b < nb; ++b) {
                uint8_t* panel = dst + (p * nb + b) * bytes;
                for (int64_t o = 0; o < kPanel; ++o) {
                    const bool real = p * kPanel + o < O;
                    const uint8_t* blk = src + (p * kPanel + o) * nb * block_bytes + b * block_bytes;
                    if (q41) {
                        if (!real) continue;  // zero scales and quants: weight 0
                        std::memcpy(panel + 2 * o, blk, 2);
                        std::memcpy(panel + 2 * kPanel + 2 * o, blk + 2, 2);
                        for (int64_t g = 0; g < 4; ++g) std::memcpy(panel + 64 + 64 * g + 4 * o, blk + 4 + 4 * g, 4);
                    } else {
                        if (real) std::memcpy(panel + 2 * o, blk, 2);
                        for (int64_t g = 0; g < 8; ++g) {
                            for (int64_t i = 0; i < 4; ++i) {  // padding outputs: q = 0, stored as 128
                                panel[32 + 64 * g + 4 * o + i] = static_cast<uint8_t>((real ? blk[2 + 4 * g + i] : 0) ^ 0x80);
                            }
                        }
                    }
                }
            }
        }
    });
    return out;
}

// The (O, K) float32 matrix of block-packed panels (P, K / 32, bytes), each weight rounded as gguf's dequantize:
// Q4_1 d * q + m (d * q exact in float32, one rounding), Q8_0 q * d. For calls of more rows than the block kernel
// takes (prefill), which multiply the dense matrix; parallel over panels.
torch::Tensor dequantize_packed(const torch::Tensor& packed, int64_t O) {
    const bool q8 = packed.scalar_type() == at::kChar;  // panels for 8-bit activations (pack_gguf_for_q8)
    TORCH_CHECK(packed.dim() == 3 && packed.is_contiguous() && (packed.scalar_type() == at::kByte || q8) &&
                    (q8 ? packed.size(2) == kQ8Q41Bytes || packed.size(2) == kQ8Q80Bytes
                        : packed.size(2) == kQ41Bytes || packed.size(2) == kQ80Bytes) &&
                    (O + kPanel - 1) / kPanel == packed.size(0),
                "dequantize_packed: not block-packed panels of O outputs");
    const int64_t P = packed.size(0), nb = packed.size(1), K = nb * kQK, bytes = packed.size(2);
    const bool q41 = bytes == (q8 ? kQ8Q41Bytes : kQ41Bytes);
    auto w = torch::empty({O, K}, packed.options().dtype(at::kFloat));
    const uint8_t* pp = reinterpret_cast<const uint8_t*>(packed.data_ptr());
    float* wp = w.data_ptr<float>();
    at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
        float tile[kQK][kPanel];
        for (int64_t p = begin; p < end; ++p) {
            const int64_t rows = std::min<int64_t>(kPanel, O - p * kPanel);
            for (int64_t b = 0; b < nb; ++b) {
                const uint8_t* blk = pp + (p * nb + b) * bytes;
                const uint16_t* h = reinterpret_cast<const uint16_t*>(blk);
                float d[kPanel], m[kPanel];
                for (int64_t o = 0; o < kPanel; ++o) {
                    d[o] = c10::detail::fp16_ieee_to_fp32_value(h[o]);
                    m[o] = q41 ? c10::detail::fp16_ieee_to_fp32_value(h[kPanel + o]) : 0.0f;
                }
                if (q8) {  // groups g of 4 k, 16 outputs x 4 bytes: Q4_1 nibbles k = 4g + i, 16 + 4g + i; Q8_0 q + 128
                    const uint8_t* q = blk + (q41 ? 64 : 32);
                    for (int64_t g = 0; g < (q41 ? 4 : 8); ++g) {
                        for (int64_t o = 0; o < kPanel; ++o) {
                            for (int64_t i = 0; i < 4; ++i) {
                                const uint8_t v = q[64 * g + 4 * o + i];
                                if (q41) {
                                    tile[4 * g + i][o] = d[o] * static_cast<float>(v & 15) + m[o];
                                    tile[16 + 4 * g + i][o] = d[o] * static_cast<float>(v >> 4) + m[o];
                                } else {
                                    tile[4 * g + i][o] = static_cast<float>(static_cast<int8_t>(v ^ 0x80)) * d[o];
                                }
                            }
                        }
                    }
                } else if (q41) {
                    const uint8_t* q = blk + 4 * kPanel;
                    for (int64_t j = 0; j < kQK / 2; ++j) {
                        for (int64_t o = 0; o < kPanel; ++o) {
                            const uint8_t v = q[j * kPanel + o];
                            tile[2 * j][o] = d[o] * static_cast<float>(v & 15) + m[o];
                            tile[2 * j + 1][o] = d[o] * static_cast<float>(v >> 4) + m[o];
                        }
                    }
                } else {
                    const int8_t* q = reinterpret_cast<const int8_t*>(blk + 2 * kPanel);
                    for (int64_t k = 0; k < kQK; ++k) {
                        for (int64_t o = 0; o < kPanel; ++o) tile[k][o] = static_cast<float>(q[k * kPanel + o]) * d[o];
                    }
                }
                for (int64_t o = 0; o < rows; ++o) {
                    float* dst = wp + (p * kPanel + o) * K + b * kQK;
                    for (int64_t k = 0; k < kQK; ++k) dst[k] = tile[k][o];
                }
            }
        }
    });
    return w;
}

// Whether two packed weights can share one packed_linears call: the same dtype and panel layout (and K).
bool packed_alike(const torch::Tensor& a, const torch::Tensor& b) {
    return a.dim() == 3 && b.dim() == 3 && a.scalar_type() == b.scalar_type() && a.size(1) == b.size(1) &&
           a.size(2) == b.size(2);
}

// x: (M, K) contiguous, of the packed weights' type; packed[i]: pack(w_i) for w_i of outs[i] rows, all packed alike
// (one dtype, one panel layout). Returns x @ w_i^T, (M, outs[i]) of x's type, for each i, computed in one parallel
// region (run_jobs); each result is the one packed_linear(x, packed[i], outs[i]) gives alone, bit for bit.
std::vector<torch::Tensor> packed_linears(const torch::Tensor& x, const std::vector<torch::Tensor>& packed,
                                          const std::vector<int64_t>& outs) {
    TORCH_CHECK(!packed.empty() && packed.size() == outs.size(), "packed_linear: one output size per packed weight");
    const auto& p0 = packed[0];
    for (const auto& p : packed) {
        TORCH_CHECK(p.is_contiguous() && packed_alike(p, p0),
                    "packed_linear: the packed weights of one call must be packed alike");
    }
    const int64_t M = x.dim() == 2 ? x.size(0) : 0, K = x.dim() == 2 ? x.size(1) : 0;
    std::vector<torch::Tensor> ys;
    std::vector<Job> jobs;
    const bool q8 = p0.scalar_type() == at::kChar;  // int8: GGUF panels for 8-bit activations (pack_gguf_for_q8)
    if (q8 || p0.scalar_type() == at::kByte) {       // uint8: GGUF blocks for float32 activations
        TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.device().is_cpu() && x.scalar_type() == at::kFloat,
                    "packed_linear: GGUF blocks take a contiguous 2-D float32 CPU x");
        const int64_t q41_bytes = q8 ? kQ8Q41Bytes : kQ41Bytes, q80_bytes = q8 ? kQ8Q80Bytes : kQ80Bytes;
        const bool q41 = p0.size(2) == q41_bytes;
        TORCH_CHECK(K % kQK == 0 && p0.size(1) == K / kQK && (q41 || p0.size(2) == q80_bytes),
                    "packed_linear: the block-packed weight does not fit x or O");
        std::shared_ptr<const Q8Input> xq;
        if (q8 && M > 0) xq = std::make_shared<const Q8Input>(x.data_ptr<float>(), M, K);
        for (size_t i = 0; i < packed.size(); ++i) {
            const int64_t O = outs[i], P = packed[i].size(0);
            TORCH_CHECK((O + kPanel - 1) / kPanel == P, "packed_linear: the block-packed weight does not fit x or O");
            ys.push_back(torch::empty({M, O}, x.options()));
            if (M == 0 || O == 0) continue;
            const uint8_t* pp = reinterpret_cast<const uint8_t*>(packed[i].data_ptr());
            float* yp = ys.back().data_ptr<float>();
            if (q8) {
                jobs.push_back(q41 ? job_q8<kQ41>(xq, pp, yp, M, K, O, P) : job_q8<kQ80>(xq, pp, yp, M, K, O, P));
            } else {
                const float* xp = x.data_ptr<float>();
                jobs.push_back(q41 ? job_q<kQ41>(xp, pp, yp, M, K, O, P) : job_q<kQ80>(xp, pp, yp, M, K, O, P));
            }
        }
        run_jobs(jobs);
        return ys;
    }
    TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.device().is_cpu() && x.scalar_type() == p0.scalar_type(),
                "packed_linear: x must be a contiguous 2-D CPU tensor of the packed weight's type");
    TORCH_CHECK(kernel_dtype(p0.scalar_type()), "packed_linear: bad packed weight");
    const bool bf16 = p0.scalar_type() == at::kBFloat16;
    const bool pairs = p0.size(2) == 2 * kPanel;  // bf16 pairs: the AVX512-BF16 path
    TORCH_CHECK(pairs ? bf16 && p0.size(1) == (K + 1) / 2 && cpu_has_avx512bf16()
                      : p0.size(1) == K && p0.size(2) == kPanel,
                "packed_linear: the packed weight does not fit x or O");
    // pairs take x as bf16 (zero-padded to even K); panels of widened weights take it as float32
    const auto xk = pairs ? (K % 2 ? at::constant_pad_nd(x, {0, 1}) : x) : (bf16 ? x.to(at::kFloat) : x);
    for (size_t i = 0; i < packed.size(); ++i) {
        const int64_t O = outs[i], P = packed[i].size(0);
        TORCH_CHECK((O + kPanel - 1) / kPanel == P, "packed_linear: the packed weight does not fit x or O");
        ys.push_back(torch::empty({M, O}, x.options()));
        if (M == 0 || O == 0) continue;
        Out out;
        out.ldy = O;
        if (bf16) {
            out.yb = reinterpret_cast<uint16_t*>(ys.back().data_ptr<at::BFloat16>());
        } else {
            out.y = ys.back().data_ptr<float>();
        }
        if (pairs) {
            jobs.push_back(job_dp(reinterpret_cast<const uint16_t*>(xk.data_ptr<at::BFloat16>()),
                                  reinterpret_cast<const uint16_t*>(packed[i].data_ptr<at::BFloat16>()), out, M,
                                  p0.size(1), O, P));
        } else if (bf16) {
            jobs.push_back(job_dense(xk.data_ptr<float>(),
                                     reinterpret_cast<const uint16_t*>(packed[i].data_ptr<at::BFloat16>()), out, M, K,
                                     O, P));
        } else {
            jobs.push_back(job_dense(xk.data_ptr<float>(), packed[i].data_ptr<float>(), out, M, K, O, P));
        }
    }
    run_jobs(jobs);
    return ys;
}

// packed_linears where the weights are packed alike, else one packed_linear each (a GGUF file may mix block types).
std::vector<torch::Tensor> packed_linears_any(const torch::Tensor& x, const std::vector<torch::Tensor>& packed,
                                              const std::vector<int64_t>& outs) {
    if (std::all_of(packed.begin(), packed.end(), [&](const torch::Tensor& p) { return packed_alike(p, packed[0]); })) {
        return packed_linears(x, packed, outs);
    }
    std::vector<torch::Tensor> ys;
    for (size_t i = 0; i < packed.size(); ++i) ys.push_back(packed_linears(x, {packed[i]}, {outs[i]})[0]);
    return ys;
}

// x: (M, K) contiguous, of the packed weight's type; packed: pack(w) for w of O rows. Returns (M, O) of that type.
torch::Tensor packed_linear(const torch::Tensor& x, const torch::Tensor& packed, int64_t O) {
    return packed_linears(x, {packed}, {O})[0];
}

namespace {

inline float widen(float x) { return x; }
inline float widen(at::BFloat16 x) { return static_cast<float>(x); }
template <typename E> inline E narrow(float x) { return static_cast<E>(x); }  // bfloat16: round to nearest even

// Rotary embedding of one head vector, as torch computes ``x * cos + rotate_half(x) * sin`` element by element in
// type E: each product rounded to E, then the sum (this file is built with -ffp-contract=off, so no FMA merges them).
// Eight lanes at a time: the same operations on each element (float32 products and sums, each rounded to E as torch
// rounds: bfloat16 to nearest even, NaN to 0x7FC0), so the same bits as the scalar loop that finishes the row.
inline __m256 load8(const at::BFloat16* p) { return load8(reinterpret_cast<const uint16_t*>(p)); }
inline __m256i bf16_bits8(__m256 v) {  // c10's round_to_nearest_even, lane by lane: the bfloat16 bits in 32-bit lanes
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
}
inline __m256 round8(__m256 v, float) { return v; }
inline __m256 round8(__m256 v, at::BFloat16) { return _mm256_castsi256_ps(_mm256_slli_epi32(bf16_bits8(v), 16)); }
inline void store8e(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store8e(at::BFloat16* p, __m256 v) {
    const __m256i b = bf16_bits8(v);  // 8 x 32-bit lanes holding 16-bit values: pack them to 8 x 16 bits
    const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}

template <typename E>
inline void rotate(const E* x, const E* c, const E* sn, E* out, int64_t D) {
    const int64_t h = D / 2;
    const __m256 sign = _mm256_set1_ps(-0.0f);
    int64_t i = 0;
    for (; i + 8 <= h; i += 8) {
        const __m256 x1 = load8(x + i), x2 = load8(x + i + h);
        const __m256 a = round8(_mm256_mul_ps(x1, load8(c + i)), E());
        const __m256 b = round8(_mm256_mul_ps(_mm256_xor_ps(x2, sign), load8(sn + i)), E());
        store8e(out + i, _mm256_add_ps(a, b));
        const __m256 a2 = round8(_mm256_mul_ps(x2, load8(c + i + h)), E());
        const __m256 b2 = round8(_mm256_mul_ps(x1, load8(sn + i + h)), E());
        store8e(out + i + h, _mm256_add_ps(a2, b2));
    }
    for (; i < h; ++i) {
        const float x1 = widen(x[i]), x2 = widen(x[i + h]);
        const float a = widen(narrow<E>(x1 * widen(c[i]))), b = widen(narrow<E>(-x2 * widen(sn[i])));
        out[i] = narrow<E>(a + b);
        const float a2 = widen(narrow<E>(x2 * widen(c[i + h]))), b2 = widen(narrow<E>(x1 * widen(sn[i + h])));
        out[i + h] = narrow<E>(a2 + b2);
    }
}

template <typename E>
void rope_cache_impl(const E* q, const E* k, const E* v, const E* cos, const E* sin, E* kc, E* vc, const int64_t* pos,
                     E* qout, int64_t B, int64_t T, int64_t Hq, int64_t Hk, int64_t D, const int64_t* cs) {
    at::parallel_for(0, B * T, 16, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
            const int64_t b = i / T, t = i % T, p = pos[i];
            const E* c = cos + i * D;
            const E* sn = sin + i * D;
            for (int64_t h = 0; h < Hq; ++h) rotate(q + (i * Hq + h) * D, c, sn, qout + ((b * Hq + h) * T + t) * D, D);
            for (int64_t h = 0; h < Hk; ++h) {
                const int64_t at = b * cs[0] + h * cs[1] + p * cs[2];
                rotate(k + (i * Hk + h) * D, c, sn, kc + at, D);
                std::copy(v + (i * Hk + h) * D, v + (i * Hk + h + 1) * D, vc + at);
            }
        }
    });
}

}  // namespace

// Rotary position embedding (Su et al. 2021) for q and k of T new tokens per row, and the cache write of k and v.
// q: (B, T, Hq * D), k and v: (B, T, Hk * D), the projections' outputs; cos and sin: (B, T, D) at each token's
// position; k_cache and v_cache: one layer's (B, Hk, capacity, D) with unit stride in D; pos: (B, T) cache positions.
// Writes the rotated keys and the values at pos and returns the rotated queries as (B, Hq, T, D). The values equal
// torch's element-wise ``x * cos + rotate_half(x) * sin`` bit for bit (float32 or bfloat16).
torch::Tensor rope_and_cache(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                             const torch::Tensor& cos, const torch::Tensor& sin, torch::Tensor& k_cache,
                             torch::Tensor& v_cache, const torch::Tensor& pos) {
    const auto dt = q.scalar_type();
    TORCH_CHECK(kernel_dtype(dt) && k.scalar_type() == dt && v.scalar_type() == dt && cos.scalar_type() == dt &&
                sin.scalar_type() == dt && k_cache.scalar_type() == dt && v_cache.scalar_type() == dt &&
                pos.scalar_type() == at::kLong, "rope_and_cache: float32 or bfloat16 tensors of one type, int64 pos");
    TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous() && cos.is_contiguous() &&
                sin.is_contiguous() && pos.is_contiguous() && k_cache.stride(3) == 1 &&
                k_cache.strides() == v_cache.strides() && k_cache.sizes() == v_cache.sizes(),
                "rope_and_cache: contiguous inputs, caches of one layout");
    const int64_t B = q.size(0), T = q.size(1), Hk = k_cache.size(1), D = k_cache.size(3), cap = k_cache.size(2);
    TORCH_CHECK(D % 2 == 0 && q.size(2) % D == 0 && k.size(2) == Hk * D && v.size(2) == Hk * D && k_cache.size(0) == B &&
                cos.numel() == B * T * D && sin.numel() == B * T * D && pos.numel() == B * T,
                "rope_and_cache: shapes do not fit");
    const int64_t* pp = pos.data_ptr<int64_t>();  // a plain loop: two ATen reductions per layer cost more than this
    TORCH_CHECK(std::all_of(pp, pp + B * T, [cap](int64_t p) { return p >= 0 && p < cap; }),
                "rope_and_cache: a position is outside the cache");
    const int64_t Hq = q.size(2) / D;
    auto out = torch::empty({B, Hq, T, D}, q.options());
    const int64_t cs[3] = {k_cache.stride(0), k_cache.stride(1), k_cache.stride(2)};
    if (dt == at::kBFloat16) {
        using E = at::BFloat16;
        rope_cache_impl(q.data_ptr<E>(), k.data_ptr<E>(), v.data_ptr<E>(), cos.data_ptr<E>(), sin.data_ptr<E>(),
                        k_cache.data_ptr<E>(), v_cache.data_ptr<E>(), pos.data_ptr<int64_t>(), out.data_ptr<E>(), B, T,
                        Hq, Hk, D, cs);
    } else {
        rope_cache_impl(q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), cos.data_ptr<float>(),
                        sin.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(),
                        pos.data_ptr<int64_t>(), out.data_ptr<float>(), B, T, Hq, Hk, D, cs);
    }
    return out;
}

// RMSNorm (Zhang and Sennrich 2019) of each row of x (R, N), N a multiple of 8: y = w * (x / sqrt(mean(x^2) + eps)),
// computed in float32 (sum of squares in 8 lanes, in order), the normalized row rounded to x's type before the
// weight is applied, as the torch module does. Each row on its own: the result does not depend on the other rows.
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& w, double eps) {
    const auto dt = x.scalar_type();
    TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && w.is_contiguous() && kernel_dtype(dt) && w.scalar_type() == dt &&
                w.numel() == x.size(1) && x.size(1) % 8 == 0, "rms_norm: contiguous (R, N) x, N % 8 == 0, weight (N)");
    const int64_t R = x.size(0), N = x.size(1);
    auto y = torch::empty_like(x);
    const float e = static_cast<float>(eps);
    auto body = [&](auto tag) {
        using E = decltype(tag);
        const E* xp = x.data_ptr<E>();
        const E* wp = w.data_ptr<E>();
        E* yp = y.data_ptr<E>();
        at::parallel_for(0, R, 64, [&](int64_t begin, int64_t end) {
            std::vector<float> row(N);
            for (int64_t r = begin; r < end; ++r) {
                const E* xr = xp + r * N;
                for (int64_t i = 0; i < N; ++i) row[i] = widen(xr[i]);
                __m256 acc = _mm256_setzero_ps();
                for (int64_t i = 0; i < N; i += 8) {
                    const __m256 v = _mm256_loadu_ps(row.data() + i);
                    acc = _mm256_fmadd_ps(v, v, acc);
                }
                const float inv = 1.0f / std::sqrt(hsum(acc) / static_cast<float>(N) + e);
                for (int64_t i = 0; i < N; ++i) yp[r * N + i] = narrow<E>(widen(wp[i]) * widen(narrow<E>(row[i] * inv)));
            }
        });
    };
    if (dt == at::kBFloat16) body(at::BFloat16()); else body(0.0f);
    return y;
}

// y = op(y, b) in place, elementwise, as torch's binary ops compute it (float32: one rounding; bfloat16: both widened,
// the float32 result rounded to nearest even): a layer's residual adds and silu(gate) * up without a dispatch and an
// allocation each.
template <typename Op>
torch::Tensor combine_into(torch::Tensor y, const torch::Tensor& b, Op op) {
    TORCH_CHECK(y.sizes() == b.sizes() && y.scalar_type() == b.scalar_type() && y.is_contiguous() && b.is_contiguous(),
                "combine_into: same shape and type, contiguous");
    const int64_t n = y.numel();
    if (y.scalar_type() == at::kFloat) {
        float* o = y.data_ptr<float>();
        const float* r = b.data_ptr<float>();
        for (int64_t i = 0; i < n; ++i) o[i] = op(o[i], r[i]);
    } else {
        auto* o = y.data_ptr<at::BFloat16>();
        const auto* r = b.data_ptr<at::BFloat16>();
        for (int64_t i = 0; i < n; ++i) o[i] = c10::BFloat16(op(static_cast<float>(o[i]), static_cast<float>(r[i])));
    }
    return y;
}

torch::Tensor add_residual(torch::Tensor y, const torch::Tensor& res) {
    return combine_into(std::move(y), res, [](float o, float r) { return r + o; });
}

torch::Tensor mul_into(torch::Tensor a, const torch::Tensor& b) {
    return combine_into(std::move(a), b, [](float x, float m) { return x * m; });
}

// One Llama decoder layer for a decoding step, in one call: the same functions and arithmetic, in the same order, as
// propd.models.llama.DecoderLayer.forward takes when each of its parts goes to this extension, so the result is the
// same bit for bit; only the Python between them is gone (a few dozen calls per layer), and q, k, v (and gate, up)
// share one parallel region (packed_linears), so the weights stream without a barrier between them. x: (B, T, H); w: the input
// norm's weight (empty: no input norm, as EAGLE's drafter layer), q, k, v and o packed, the post-attention norm's
// weight, gate, up and down packed; outs: the output sizes of q, k, v, o, gate, up, down; mask: (B, T, S) with S the
// keys to read.
torch::Tensor decoder_layer(const torch::Tensor& x, const std::vector<torch::Tensor>& w, const std::vector<int64_t>& outs,
                            const torch::Tensor& cos, const torch::Tensor& sin, torch::Tensor& k_cache,
                            torch::Tensor& v_cache, const torch::Tensor& pos, const torch::Tensor& mask, double eps,
                            double scale, bool invariant = true) {
    TORCH_CHECK(x.dim() == 3 && w.size() == 9 && outs.size() == 7, "decoder_layer: bad arguments");
    const int64_t B = x.size(0), T = x.size(1), H = x.size(2), R = B * T, S = mask.size(2);
    const auto x2 = x.reshape({R, H}).contiguous();
    const auto h = w[0].numel() == 0 ? x2 : rms_norm(x2, w[0], eps);
    const auto qkv = packed_linears_any(h, {w[1], w[2], w[3]}, {outs[0], outs[1], outs[2]});
    const auto q = qkv[0].view({B, T, outs[0]});
    const auto k = qkv[1].view({B, T, outs[1]});
    const auto v = qkv[2].view({B, T, outs[2]});
    const auto qr = rope_and_cache(q, k, v, cos, sin, k_cache, v_cache, pos);
    const auto att = step_attention(qr, k_cache.narrow(2, 0, S), v_cache.narrow(2, 0, S), mask, scale, invariant);
    const auto x1 = add_residual(packed_linear(att.view({R, outs[0]}), w[4], outs[3]), x2);
    const auto h2 = rms_norm(x1, w[5], eps);
    auto gate_up = packed_linears_any(h2, {w[6], w[7]}, {outs[4], outs[5]});
    at::silu_(gate_up[0]);
    return add_residual(packed_linear(mul_into(gate_up[0], gate_up[1]), w[8], outs[6]), x1).view({B, T, H});
}

// ---------------------------------------------------------------------------------------------- argmax
// torch.argmax(x, dim=-1) of (N, V) float32 or bfloat16 rows: the first index of each row's maximum, or of its first
// NaN (torch orders NaN above every number). Eight lanes each keep their largest value and its first index (a later
// equal value does not replace it), then the lanes are folded; rows, and where there are fewer rows than threads
// parts of a row, go to the threads. A greedy step reads only each node's argmax over the vocabulary, and torch's
// argmax is several times slower than one pass over the values.
struct ArgBest {
    float v = 0.0f;
    int64_t i = -1;  // -1: an empty range
    bool nan = false;
};

// a precedes b in the row: the first NaN, else the larger value, else a's (earlier) index
inline ArgBest arg_combine(const ArgBest& a, const ArgBest& b) {
    if (a.i < 0) return b;
    if (b.i < 0 || a.nan) return a;
    if (b.nan || b.v > a.v) return b;
    return a;
}

template <typename T>
ArgBest argmax_range(const T* x, int64_t b, int64_t e) {
    ArgBest best;
    int64_t s = b;
    if (e - b >= 8) {
        __m256 bv = load8(x + b);
        __m256i bi = _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(static_cast<int>(b)));
        __m256i cur = bi;
        __m256 unordered = _mm256_cmp_ps(bv, bv, _CMP_UNORD_Q);
        const __m256i eight = _mm256_set1_epi32(8);
        for (s = b + 8; s + 8 <= e; s += 8) {
            const __m256 v = load8(x + s);
            cur = _mm256_add_epi32(cur, eight);
            const __m256 gt = _mm256_cmp_ps(v, bv, _CMP_GT_OQ);
            bv = _mm256_blendv_ps(bv, v, gt);
            bi = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(bi), _mm256_castsi256_ps(cur), gt));
            unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        }
        if (_mm256_movemask_ps(unordered)) {  // the first NaN of the range
            for (int64_t j = b; j < e; ++j) {
                if (std::isnan(widen_bits(x[j]))) return {widen_bits(x[j]), j, true};
            }
        }
        alignas(32) float lv[8];
        alignas(32) int32_t li[8];
        _mm256_store_ps(lv, bv);
        _mm256_store_si256(reinterpret_cast<__m256i*>(li), bi);
        for (int l = 0; l < 8; ++l) {
            if (best.i < 0 || lv[l] > best.v || (lv[l] == best.v && li[l] < best.i)) best = {lv[l], li[l], false};
        }
    }
    for (; s < e; ++s) best = arg_combine(best, {widen_bits(x[s]), s, std::isnan(widen_bits(x[s]))});
    return best;
}

// A decoding step's attention mask and positions for query nodes node_idx (B, Tq) of a tree of T nodes (entries equal
// to T: padding), as propd.models.llama.tree_attention_inputs builds them with torch ops: key s of row b is seen by
// node i when it is in the row's prefix (s < lengths[b]), or s = lengths[b] + j for a tree node j that tree_mask
// (T, T), or (B, T, T) per row, lets i see; a padding node sees only the spare slot lengths[b] + T. Returns mask
// (B, 1, Tq, S) bool, positions lengths + depth(i) (B, Tq) and write positions lengths + i (B, Tq), depths (T,) or
// (B, T) int64; one call instead of about fifteen small ops.
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> tree_mask(const torch::Tensor& lengths, int64_t S,
                                                                  const torch::Tensor& node_idx,
                                                                  const torch::Tensor& tree_mask,
                                                                  const torch::Tensor& depths) {
    TORCH_CHECK(lengths.dim() == 1 && node_idx.dim() == 2 && node_idx.size(0) == lengths.size(0) &&
                    lengths.scalar_type() == at::kLong && node_idx.scalar_type() == at::kLong &&
                    tree_mask.scalar_type() == at::kBool && depths.scalar_type() == at::kLong &&
                    (tree_mask.dim() == 2 || tree_mask.dim() == 3) && depths.dim() == tree_mask.dim() - 1 &&
                    lengths.device().is_cpu() && node_idx.device().is_cpu() && tree_mask.device().is_cpu() &&
                    depths.device().is_cpu(),
                "tree_mask: CPU lengths (B,) and node_idx (B, Tq) int64, tree_mask (T, T) or (B, T, T) bool, "
                "depths (T,) or (B, T) int64");
    const int64_t B = node_idx.size(0), Tq = node_idx.size(1), T = tree_mask.size(-1);
    const bool per_row = tree_mask.dim() == 3;
    TORCH_CHECK(tree_mask.size(-2) == T && depths.size(-1) == T && (!per_row || (tree_mask.size(0) == B &&
                                                                               depths.size(0) == B)),
                "tree_mask: tree_mask and depths do not fit");
    const auto L = lengths.contiguous(), idx = node_idx.contiguous(), tm = tree_mask.contiguous(),
               dp = depths.contiguous();
    const int64_t* lp = L.data_ptr<int64_t>();
    const int64_t* ip = idx.data_ptr<int64_t>();
    const bool* tp = tm.data_ptr<bool>();
    const int64_t* dptr = dp.data_ptr<int64_t>();
    auto mask = torch::empty({B, 1, Tq, S}, lengths.options().dtype(at::kBool));
    auto pos = torch::empty({B, Tq}, lengths.options()), wpos = torch::empty({B, Tq}, lengths.options());
    bool* mp = mask.data_ptr<bool>();
    int64_t *pp = pos.data_ptr<int64_t>(), *wp = wpos.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) {
        const int64_t len = lp[b];
        const bool* trow = tp + (per_row ? b * T * T : 0);
        const int64_t* drow = dptr + (per_row ? b * T : 0);
        for (int64_t q = 0; q < Tq; ++q) {
            const int64_t i = ip[b * Tq + q];
            TORCH_CHECK(0 <= i && i <= T, "tree_mask: node index ", i, " outside 0..", T);
            bool* m = mp + (b * Tq + q) * S;
            const int64_t prefix = std::clamp<int64_t>(len, 0, S);
            std::fill(m, m + prefix, true);  // rel < 0
            std::fill(m + prefix, m + S, false);
            for (int64_t j = 0; j <= T && len + j < S; ++j) {
                if (len + j < 0) continue;
                m[len + j] = i < T ? (j < T && trow[i * T + j]) : j == T;
            }
            pp[b * Tq + q] = len + (i < T ? drow[i] : 0);
            wp[b * Tq + q] = len + i;
        }
    }
    return {mask, pos, wpos};
}

// propd.tree.RowTrees.from_parents with a given depth D for CPU parents (B, T) int64 (node 0 each row's root): each
// node's depth, ancestor row and path from its parent's, as RowTrees._from_host_parents walks them. Returns depths
// (B, T) int64, mask (B, T, T) bool (i sees j: j is i or an ancestor) and paths_to (B, T, D + 1) int64 (the path's
// depth-d node, padded with the node itself), or nothing when some node does not come after its parent.
std::vector<torch::Tensor> row_trees(const torch::Tensor& parents, int64_t D) {
    TORCH_CHECK(parents.dim() == 2 && parents.scalar_type() == at::kLong && parents.device().is_cpu() && D >= 0,
                "row_trees: CPU parents (B, T) int64 and a depth >= 0");
    const auto p = parents.contiguous();
    const int64_t B = p.size(0), T = p.size(1), W = D + 1;
    auto depths = torch::zeros({B, T}, p.options()), paths = torch::zeros({B, T, W}, p.options());
    auto mask = torch::zeros({B, T, T}, p.options().dtype(at::kBool));
    const int64_t* pp = p.data_ptr<int64_t>();
    int64_t *dp = depths.data_ptr<int64_t>(), *tp = paths.data_ptr<int64_t>();
    bool* mp = mask.data_ptr<bool>();
    for (int64_t b = 0; b < B; ++b) {
        const int64_t *par = pp + b * T;
        int64_t *dep = dp + b * T, *path = tp + b * T * W;
        bool* m = mp + b * T * T;
        for (int64_t i = 0; i < T; ++i) {
            if (i == 0) {  // the root: its own path, padded with itself (0)
                m[0] = true;
                continue;
            }
            const int64_t q = par[i];
            if (q < 0 || q >= i) return {};
            dep[i] = dep[q] + 1;
            std::copy(m + q * T, m + q * T + T, m + i * T);
            m[i * T + i] = true;
            for (int64_t d = 0; d < W; ++d) path[i * W + d] = d <= dep[q] ? path[q * W + d] : i;
        }
    }
    return {depths, mask, paths};
}

torch::Tensor row_argmax(const torch::Tensor& x) {
    TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.device().is_cpu() && kernel_dtype(x.scalar_type()) &&
                    x.size(1) > 0 && x.size(1) < (int64_t(1) << 31),
                "row_argmax: a contiguous (N, V) float32 or bfloat16 CPU tensor, 0 < V < 2^31");
    const int64_t N = x.size(0), V = x.size(1);
    auto out = torch::empty({N}, x.options().dtype(at::kLong));
    const int64_t threads = at::get_num_threads();
    const int64_t parts = N >= threads ? 1 : std::max<int64_t>(1, std::min((threads + N - 1) / N, V / 4096));
    const int64_t len = (V + parts - 1) / parts;
    std::vector<ArgBest> found(N * parts);
    const bool bf16 = x.scalar_type() == at::kBFloat16;
    at::parallel_for(0, N * parts, 1, [&](int64_t begin, int64_t end) {
        for (int64_t u = begin; u < end; ++u) {
            const int64_t r = u / parts, b = (u % parts) * len, e = std::min(V, b + len);
            if (b >= e) continue;
            found[u] = bf16 ? argmax_range(reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()) + r * V, b, e)
                            : argmax_range(x.data_ptr<float>() + r * V, b, e);
        }
    });
    int64_t* o = out.data_ptr<int64_t>();
    for (int64_t r = 0; r < N; ++r) {
        ArgBest best;
        for (int64_t j = 0; j < parts; ++j) best = arg_combine(best, found[r * parts + j]);
        o[r] = best.i;
    }
    return out;
}

// Where the exact logits are rounded to bfloat16 before the argmax, an id can share the rounded maximum without its
// float32 logit reaching the floor F (the maximum's lower bound): it needs only z >= the least float32 that rounds
// (to nearest even) to bfloat16(F) or above, the midpoint between bfloat16(F) and the bfloat16 below it. The floor
// lowered so, and by 1e-30 on both sides for products whose denormals the bfloat16 instructions flush; monotone in F,
// so a coarser floor stays below a finer one. Without bf16, F as is.
inline float rounding_floor(float f, bool bf16) {
    if (!bf16 || !std::isfinite(f)) return f;
    const uint16_t q = c10::BFloat16(static_cast<float>(static_cast<double>(f) - 1e-30)).x;
    const uint16_t below = (q & 0x7fff) == 0 ? 0x8001 : (q & 0x8000) ? q + 1 : q - 1;  // the next bfloat16 down
    const double mid = 0.5 * (static_cast<double>(widen_bits(q)) + widen_bits(below)) - 1e-30;
    return std::nextafter(static_cast<float>(mid), -INFINITY);
}

// The argmax screen's coarse pass (propd.models.screen): with bounds c[n, v] = l1[n] * e[v] + l2[n] * m[v], the ids v
// (ascending) where some row n has a[n, v] + c[n, v] >= max_u (a[n, u] - c[n, u]). The float32 operations are
// torch's for the same expression (products, then their sum; no fused multiply-add), and a row whose floor is NaN
// (a NaN in a - c) admits no id, as torch's amax and >= do; one pass for the floors and one for the ids. With
// ``bf16`` the exact logits are rounded to bfloat16, and each floor is lowered by rounding_floor first.
std::vector<int64_t> survivor_ids(const float* a, int64_t N, int64_t V, const float* pl1, const float* pl2,
                                  const float* pe, const float* pm, bool bf16) {
    std::vector<float> floor(N);
    for (int64_t n = 0; n < N; ++n) {
        const float* an = a + n * V;
        const __m256 b1 = _mm256_set1_ps(pl1[n]), b2 = _mm256_set1_ps(pl2[n]);
        __m256 top = _mm256_set1_ps(-INFINITY), nan = _mm256_setzero_ps();
        int64_t v = 0;
        for (; v + 8 <= V; v += 8) {
            const __m256 c =
                _mm256_add_ps(_mm256_mul_ps(b1, _mm256_loadu_ps(pe + v)), _mm256_mul_ps(b2, _mm256_loadu_ps(pm + v)));
            const __m256 lo = _mm256_sub_ps(_mm256_loadu_ps(an + v), c);
            nan = _mm256_or_ps(nan, _mm256_cmp_ps(lo, lo, _CMP_UNORD_Q));
            top = _mm256_max_ps(top, lo);
        }
        alignas(32) float lanes[8];
        _mm256_store_ps(lanes, top);
        float f = -INFINITY;
        bool has_nan = _mm256_movemask_ps(nan) != 0;
        for (int j = 0; j < 8; ++j) f = std::max(f, lanes[j]);
        for (; v < V; ++v) {
            const float c = pl1[n] * pe[v] + pl2[n] * pm[v];
            const float lo = an[v] - c;
            has_nan = has_nan || std::isnan(lo);
            f = std::max(f, lo);
        }
        floor[n] = has_nan ? NAN : rounding_floor(f, bf16);
    }
    std::vector<int64_t> ids;
    int64_t v = 0;
    for (; v + 8 <= V; v += 8) {
        const __m256 ev = _mm256_loadu_ps(pe + v), mv = _mm256_loadu_ps(pm + v);
        __m256 any = _mm256_setzero_ps();
        for (int64_t n = 0; n < N; ++n) {
            const __m256 c = _mm256_add_ps(_mm256_mul_ps(_mm256_set1_ps(pl1[n]), ev),
                                           _mm256_mul_ps(_mm256_set1_ps(pl2[n]), mv));
            const __m256 hi = _mm256_add_ps(_mm256_loadu_ps(a + n * V + v), c);
            any = _mm256_or_ps(any, _mm256_cmp_ps(hi, _mm256_set1_ps(floor[n]), _CMP_GE_OQ));
        }
        for (int bits = _mm256_movemask_ps(any); bits; bits &= bits - 1) ids.push_back(v + __builtin_ctz(bits));
    }
    for (; v < V; ++v) {
        for (int64_t n = 0; n < N; ++n) {
            const float c = pl1[n] * pe[v] + pl2[n] * pm[v];
            if (a[n * V + v] + c >= floor[n]) {
                ids.push_back(v);
                break;
            }
        }
    }
    return ids;
}

// ids as a (len,) int64 CPU tensor
torch::Tensor long_tensor(const std::vector<int64_t>& ids) {
    auto out = torch::empty({static_cast<int64_t>(ids.size())}, torch::dtype(torch::kLong));
    std::copy(ids.begin(), ids.end(), out.data_ptr<int64_t>());
    return out;
}

torch::Tensor screen_survivors(const torch::Tensor& approx, const torch::Tensor& l1, const torch::Tensor& l2,
                               const torch::Tensor& e, const torch::Tensor& m) {
    TORCH_CHECK(approx.dim() == 2 && approx.is_contiguous() && approx.scalar_type() == at::kFloat &&
                    approx.device().is_cpu(),
                "screen_survivors: approx must be a contiguous (N, V) float32 CPU tensor");
    const int64_t N = approx.size(0), V = approx.size(1);
    for (const auto* t : {&l1, &l2, &e, &m}) {
        TORCH_CHECK(t->dim() == 1 && t->is_contiguous() && t->scalar_type() == at::kFloat && t->device().is_cpu(),
                    "screen_survivors: bounds must be contiguous float32 CPU vectors");
    }
    TORCH_CHECK(l1.size(0) == N && l2.size(0) == N && e.size(0) == V && m.size(0) == V,
                "screen_survivors: l1, l2 of N entries, e, m of V");
    return long_tensor(survivor_ids(approx.data_ptr<float>(), N, V, l1.data_ptr<float>(), l2.data_ptr<float>(),
                                    e.data_ptr<float>(), m.data_ptr<float>(), false));
}

// The argmax screen's tables from its float32 or bfloat16 (V, K) weight w in one parallel pass (propd.models.screen's
// definitions, as its torch reference computes them on w in float32): ggml Q8_0 blocks (V, K / 32 * 34) uint8 (d =
// max|w| / 127 kept as fp16, q = round(w / d) half away from zero, as quantize_q8_0), per block b of row v E[v, b] +
// rounding A[v, b] and (1 + rounding) |w'_vb|_2 as coef (V, 2 K / 32), and each row's largest of both (V,) (the
// coarse bound's).
template <typename E>
void screen_tables_rows(const E* wp, int64_t V, int64_t K, float r, float grow, uint8_t* bp, float* cp, float* ep,
                        float* np) {
    const int64_t nb = K / kQK;
    at::parallel_for(0, V, 64, [&](int64_t begin, int64_t end) {
        float x[kQK];
        for (int64_t v = begin; v < end; ++v) {
            float emax = 0.0f, nmax = 0.0f;
            for (int64_t b = 0; b < nb; ++b) {
                for (int64_t i = 0; i < kQK; ++i) x[i] = static_cast<float>(wp[v * K + b * kQK + i]);
                uint8_t* blk = bp + (v * nb + b) * 34;
                float amax = 0.0f;
                for (int64_t i = 0; i < kQK; ++i) amax = std::max(amax, std::fabs(x[i]));
                const float d = amax / 127.0f, inv = d > 0.0f ? 1.0f / d : 0.0f;
                const uint16_t h = c10::detail::fp16_ieee_from_fp32_value(d);
                std::memcpy(blk, &h, 2);
                const float dh = c10::detail::fp16_ieee_to_fp32_value(h);
                float err = 0.0f, mag = 0.0f, sq = 0.0f;
                for (int64_t i = 0; i < kQK; ++i) {
                    const float y = x[i] * inv, a = std::floor(std::fabs(y) + 0.5f);
                    const float q = std::max(-127.0f, std::min(127.0f, y < 0.0f ? -a : a));
                    blk[2 + i] = static_cast<uint8_t>(static_cast<int8_t>(q));
                    const float wq = q * dh;
                    err = std::max(err, std::fabs(x[i] - wq));
                    mag = std::max(mag, std::max(std::fabs(x[i]), std::fabs(wq)));
                    sq += wq * wq;
                }
                const float e = err + r * mag, n = std::sqrt(sq) * grow;
                cp[v * 2 * nb + b] = e;
                cp[v * 2 * nb + nb + b] = n;
                emax = std::max(emax, e);
                nmax = std::max(nmax, n);
            }
            ep[v] = emax;
            np[v] = nmax;
        }
    });
}

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor> screen_tables(const torch::Tensor& w,
                                                                                     double rounding) {
    TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && kernel_dtype(w.scalar_type()) && w.device().is_cpu() &&
                    w.size(1) % kQK == 0,
                "screen_tables: w must be a contiguous (V, K) float32 or bfloat16 CPU tensor, K % 32 == 0");
    const int64_t V = w.size(0), K = w.size(1), nb = K / kQK;
    const auto f = w.options().dtype(at::kFloat);
    auto blocks = torch::empty({V, nb * 34}, w.options().dtype(at::kByte));
    auto coef = torch::empty({V, 2 * nb}, f);
    auto err_max = torch::empty({V}, f), norm_max = torch::empty({V}, f);
    const float r = static_cast<float>(rounding), grow = static_cast<float>(1.0 + rounding);
    uint8_t* bp = blocks.data_ptr<uint8_t>();
    float *cp = coef.data_ptr<float>(), *ep = err_max.data_ptr<float>(), *np = norm_max.data_ptr<float>();
    if (w.scalar_type() == at::kBFloat16) {
        screen_tables_rows(w.data_ptr<at::BFloat16>(), V, K, r, grow, bp, cp, ep, np);
    } else {
        screen_tables_rows(w.data_ptr<float>(), V, K, r, grow, bp, cp, ep, np);
    }
    return {blocks, coef, err_max, norm_max};
}

// The whole argmax screen after its 8-bit product (propd.models.screen, steps 2-4) in one call: x (N, K) float32,
// approx (N, V) = the 8-bit product, err and norm (V,) the coarse bound's coefficients, coef (V, 2 K / 32) the
// per-block ones, weight (V, K) float32. The activations are rounded as the 8-bit kernel rounds them; per row and
// block, |x_b|_1 and |x_b - x'_b|_2; the coarse pass (survivor_ids); the per-block bound e of the survivors and each
// row's candidates (z + e >= max (z - e)); the union of the settled rows' candidates multiplied out exactly by the
// packed float32 kernel (pack, packed_linear: the full lm_head's bits) and each settled row's argmax among its own
// candidates, the lowest id among equal maxima. Returns (argmax (N,), settled (N,): at most max_candidates
// candidates and finite bounds and x; the others' argmax is left 0 for the caller's full product, survivor ids (C,),
// candidates (N, C) bool, finite (N,)).
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor> screen_argmax(
        const torch::Tensor& x, const torch::Tensor& approx, const torch::Tensor& err, const torch::Tensor& norm,
        const torch::Tensor& coef, const torch::Tensor& weight, int64_t max_candidates) {
    TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat && x.device().is_cpu() &&
                    x.size(1) % kQK == 0, "screen_argmax: x must be a contiguous (N, K) float32 CPU tensor, K % 32 == 0");
    const int64_t N = x.size(0), K = x.size(1), nb = K / kQK, V = weight.size(0);
    for (const auto* t : {&approx, &err, &norm, &coef}) {
        TORCH_CHECK(t->is_contiguous() && t->scalar_type() == at::kFloat && t->device().is_cpu(),
                    "screen_argmax: contiguous float32 CPU tensors");
    }
    const bool bf16 = weight.scalar_type() == at::kBFloat16;  // logits rounded to bfloat16 (8 significant bits)
    TORCH_CHECK(weight.is_contiguous() && (bf16 || weight.scalar_type() == at::kFloat) && weight.device().is_cpu(),
                "screen_argmax: weight must be a contiguous float32 or bfloat16 CPU tensor");
    TORCH_CHECK(approx.dim() == 2 && approx.size(0) == N && approx.size(1) == V && err.numel() == V &&
                    norm.numel() == V && coef.dim() == 2 && coef.size(0) == V && coef.size(1) == 2 * nb &&
                    weight.dim() == 2 && weight.size(1) == K, "screen_argmax: shapes do not fit");
    const float* xp = x.data_ptr<float>();
    const float* a = approx.data_ptr<float>();
    std::vector<int8_t> xq(N * K);
    std::vector<float> dx(N * nb), sx(N * nb);
    std::vector<int32_t> qsum(N * nb);
    quantize_rows_q8(xp, N, K, xq.data(), dx.data(), sx.data(), qsum.data());
    std::vector<float> blocks(N * 2 * nb), l1(N, 0.0f), l2(N, 0.0f);  // per row: |x_b|_1 for each b, then |x_b - x'_b|_2
    std::vector<char> finite(N, 1);
    for (int64_t n = 0; n < N; ++n) {
        for (int64_t b = 0; b < nb; ++b) {
            float s1 = 0.0f, s2 = 0.0f;
            for (int64_t i = b * kQK; i < (b + 1) * kQK; ++i) {
                const float v = xp[n * K + i], d = v - static_cast<float>(xq[n * K + i]) * dx[n * nb + b];
                finite[n] &= std::isfinite(v);
                s1 += std::fabs(v);
                s2 += d * d;
            }
            blocks[n * 2 * nb + b] = s1;
            blocks[n * 2 * nb + nb + b] = std::sqrt(s2);
            l1[n] += s1;
            l2[n] += blocks[n * 2 * nb + nb + b];
        }
    }
    const auto ids =
        survivor_ids(a, N, V, l1.data(), l2.data(), err.data_ptr<float>(), norm.data_ptr<float>(), bf16);
    const int64_t C = static_cast<int64_t>(ids.size());
    auto cand = torch::zeros({N, C}, x.options().dtype(at::kBool));
    auto fin = torch::zeros({N}, x.options().dtype(at::kBool));
    auto ok = torch::zeros({N}, x.options().dtype(at::kBool));
    auto out = torch::zeros({N}, x.options().dtype(at::kLong));
    bool* pc = cand.data_ptr<bool>();
    bool* pok = ok.data_ptr<bool>();
    const float* cf = coef.data_ptr<float>();
    std::vector<float> hi(C);  // the row's z + e per survivor
    std::vector<char> col_used(C, 0);
    for (int64_t n = 0; n < N; ++n) {
        float floor = -INFINITY;
        bool nan = C == 0;
        for (int64_t c = 0; c < C; ++c) {
            float e = 0.0f;
            const float* row = cf + ids[c] * 2 * nb;
            for (int64_t j = 0; j < 2 * nb; ++j) e += blocks[n * 2 * nb + j] * row[j];
            const float z = a[n * V + ids[c]], lo = z - e;
            hi[c] = z + e;
            nan = nan || std::isnan(lo);
            floor = std::max(floor, lo);
        }
        floor = nan ? NAN : rounding_floor(floor, bf16);
        int64_t count = 0;
        for (int64_t c = 0; c < C; ++c) count += pc[n * C + c] = hi[c] >= floor;
        const bool good = std::isfinite(floor) && finite[n];
        fin.data_ptr<bool>()[n] = good;
        pok[n] = good && count <= max_candidates;
        if (pok[n]) {
            for (int64_t c = 0; c < C; ++c) col_used[c] |= pc[n * C + c];
        }
    }
    std::vector<int64_t> cols;
    for (int64_t c = 0; c < C; ++c) {
        if (col_used[c]) cols.push_back(c);
    }
    if (!cols.empty()) {
        auto rows = torch::empty({static_cast<int64_t>(cols.size())}, x.options().dtype(at::kLong));
        for (size_t j = 0; j < cols.size(); ++j) rows.data_ptr<int64_t>()[j] = ids[cols[j]];
        const auto sub = weight.index_select(0, rows);
        // (N, C'): bfloat16 logits from x's bfloat16 values (x holds them exactly), read as float32
        const auto exact = packed_linear(bf16 ? x.to(at::kBFloat16) : x, pack(sub), static_cast<int64_t>(cols.size()))
                               .to(at::kFloat).contiguous();
        const float* ex = exact.data_ptr<float>();
        int64_t* po = out.data_ptr<int64_t>();
        for (int64_t n = 0; n < N; ++n) {
            if (!pok[n]) continue;
            int64_t best = -1;
            float top = 0.0f;
            for (size_t j = 0; j < cols.size(); ++j) {
                if (!pc[n * C + cols[j]]) continue;
                const float v = ex[n * cols.size() + j];
                if (best < 0 || v > top || (std::isnan(v) && !std::isnan(top))) {  // torch.argmax: NaN is the maximum
                    best = static_cast<int64_t>(j);
                    top = v;
                }
            }
            if (best < 0) {  // no candidate of its own (cannot happen with finite bounds): the full product decides
                pok[n] = false;
                continue;
            }
            po[n] = ids[cols[best]];
        }
    }
    return std::make_tuple(out, ok, long_tensor(ids), cand, fin);
}

// A model's decoder layers for decoding steps, run in one call: decoder_layer for each layer in turn, with the weights
// held here (9 per layer, as decoder_layer takes them) so that a step passes only its activations and inputs. k_all and
// v_all: the cache's (L, B, Hk, capacity, D) buffers; layer i uses k_all[i] and v_all[i].
// watched: the tensors the weights derive from (the modules' parameters and buffers), whose in-place change counters
// current() compares with their values at construction (inference tensors have none and are skipped).
struct LayerStack {
    std::vector<torch::Tensor> w, watched;
    std::vector<int64_t> outs, versions;
    double eps, scale;
    bool invariant;  // step_attention's
    LayerStack(std::vector<torch::Tensor> weights, std::vector<int64_t> out_sizes, double eps_, double scale_,
               std::vector<torch::Tensor> watch, bool invariant_ = true)
        : w(std::move(weights)), watched(std::move(watch)), outs(std::move(out_sizes)), eps(eps_), scale(scale_),
          invariant(invariant_) {
        TORCH_CHECK(w.size() % 9 == 0 && outs.size() == 7, "LayerStack: 9 weights per layer and 7 output sizes");
        for (const auto& t : watched) versions.push_back(t.is_inference() ? -1 : static_cast<int64_t>(t._version()));
    }
    bool current() const {
        for (size_t i = 0; i < watched.size(); ++i) {
            if (!watched[i].is_inference() && static_cast<int64_t>(watched[i]._version()) != versions[i]) return false;
        }
        return true;
    }
    int64_t layers() const { return static_cast<int64_t>(w.size() / 9); }
    torch::Tensor run(torch::Tensor x, const torch::Tensor& cos, const torch::Tensor& sin, const torch::Tensor& k_all,
                      const torch::Tensor& v_all, const torch::Tensor& pos, const torch::Tensor& mask, int64_t start,
                      int64_t end) const {
        TORCH_CHECK(0 <= start && start <= end && end <= layers() && k_all.size(0) >= end && v_all.size(0) >= end,
                    "LayerStack.run: layers out of range");
        const auto layers_from = [&](torch::Tensor h) {
            std::vector<torch::Tensor> lw(9);
            for (int64_t i = start; i < end; ++i) {
                for (int j = 0; j < 9; ++j) lw[j] = w[9 * i + j];
                auto kc = k_all.select(0, i);
                auto vc = v_all.select(0, i);
                h = decoder_layer(h, lw, outs, cos, sin, kc, vc, pos, mask, eps, scale, invariant);
            }
            return h;
        };
        const int threads = at::get_num_threads();
        if (threads < 2 || at::in_parallel_region() || t_team != nullptr || start == end) return layers_from(x);
        Team team;  // one parallel region for the step's layers (Team above)
        std::exception_ptr error;
#pragma omp parallel num_threads(threads)
        {
            const int tid = omp_get_thread_num();
            if (tid == 0) {
                team.threads = omp_get_num_threads();
                t_team = &team;
                try {
                    x = layers_from(x);
                } catch (...) {
                    error = std::current_exception();
                }
                t_team = nullptr;
                team.stop.store(true, std::memory_order_release);
            } else {
                team_worker(team, tid);
            }
        }
        if (error) std::rethrow_exception(error);
        return x;
    }
};

// ---------------------------------------------------------------------------------------------- EAGLE-2 drafting
// propd.strategies.eagle.EagleProposer's draft (EAGLE-2, Li et al. 2024, arXiv 2406.16858) in one call: the read of
// the tokens committed since the last draft (``_catch_up``), the expansion and the reranking (``_expand_torch``),
// with the same ATen ops and extension functions in the same order as its Python, so the draft is the same bit for
// bit; what goes is the Python between them (about a hundred and fifty small calls per draft).
namespace eagle {

struct Drafter {
    torch::Tensor k_cache, v_cache, embed, fc_packed, fc_bias, proj_packed, draft_ids, inv_freq;
    int64_t fc_out, proj_out;
    at::ScalarType proj_dtype;
    std::vector<torch::Tensor> layer_w;
    std::vector<int64_t> layer_outs;
    double eps, attn_scale, rope_scale;
    bool invariant;

    // KernelLinear / QuantLinear forward: the rows of x through the packed kernel (plus the bias), shaped back
    static torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& bias,
                                int64_t out) {
        const int64_t K = x.size(-1), rows = x.numel() / K;
        auto y = packed_linear(x.reshape({rows, K}).contiguous(), packed, out);
        if (bias.numel() > 0) y += bias;
        std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 1);
        shape.push_back(out);
        return y.view(shape);
    }

    // EagleDrafter.forward of features (B, T, H) and next tokens (B, T) at query nodes node_idx (B, T) of a tree
    // (tmask, depths: shared (T', T') and (T',), or per row), after each row's ``lengths``, with
    // propd.models.llama.tree_attention_inputs' mask, positions and rotary tables (its AR form for one node)
    torch::Tensor forward(const torch::Tensor& features, const torch::Tensor& tokens, const torch::Tensor& lengths,
                          int64_t S, const torch::Tensor& node_idx, const torch::Tensor& tmask,
                          const torch::Tensor& depths) const {
        const auto dt = layer_w[5].scalar_type();  // the drafter's activations: its post-attention norm's type
        const auto x = at::cat({at::embedding(embed, tokens).to(dt), features.to(dt)}, -1);
        const auto h = linear(x, fc_packed, fc_bias, fc_out);
        torch::Tensor mask, pos, wpos;
        if (tmask.size(-1) == 1 && node_idx.size(1) == 1) {
            const auto rel = at::arange(S, lengths.options()).unsqueeze(0) - lengths.unsqueeze(1);  // (B, S)
            mask = (rel <= 0).unsqueeze(1);  // (B, 1, S)
            pos = wpos = lengths.unsqueeze(1);
        } else {
            auto m = tree_mask(lengths, S, node_idx, tmask, depths);
            mask = std::get<0>(m).select(1, 0);
            pos = std::get<1>(m);
            wpos = std::get<2>(m);
        }
        const auto freqs = pos.unsqueeze(-1).to(at::kFloat) * inv_freq;
        const auto emb = at::cat({freqs, freqs}, -1).unsqueeze(1);
        const auto cos = (emb.cos() * rope_scale).to(dt).contiguous();
        const auto sin = (emb.sin() * rope_scale).to(dt).contiguous();
        auto kc = k_cache, vc = v_cache;
        return decoder_layer(h, layer_w, layer_outs, cos, sin, kc, vc, wpos.contiguous(), mask.contiguous(), eps,
                             attn_scale, invariant);
    }

    // EagleDrafter.draft_logits and EagleProposer._guesses: the k best guesses (ids, log-probabilities) after g, over
    // the draft vocabulary (draft_ids) or the whole one (draft_ids empty: proj is the base model's lm_head)
    std::pair<torch::Tensor, torch::Tensor> guesses(const torch::Tensor& g, int64_t k) const {
        const auto logits = linear(g.to(proj_dtype), proj_packed, torch::Tensor(), proj_out);
        const auto top = at::log_softmax(logits.to(at::kFloat), -1).topk(std::min(k, logits.size(-1)), -1);
        const auto& idx = std::get<1>(top);
        return {draft_ids.numel() > 0 ? draft_ids.index({idx}) : idx, std::get<0>(top)};
    }
};

}  // namespace eagle

// feats (B, W, H), n (B,), history (B, L), causal (W, W): the read, W >= 1; lengths (B,) and max_len,
// max_len_after: the drafter cache's lengths before the read and their maximum before and after it (its buffers
// k_cache, v_cache (B, Hkv, C, D) reserved for both); embed (V, H): the base model's embeddings; fc and proj: packed
// weights (fc_bias empty: none) and output sizes, proj taking inputs of proj_like's type, over the draft vocabulary
// draft_ids (n,) (empty: the whole vocabulary); layer_w, layer_outs, eps, attn_scale, invariant: decoder_layer's
// arguments; inv_freq (D / 2,), rope_scale: the rotary tables. Returns tokens, parents (B, N) int64 and path
// probabilities, confidences (B, N) float32, N = 1 + min(budget, pool).
std::vector<torch::Tensor> eagle_draft(const torch::Tensor& feats, const torch::Tensor& n,
                                       const torch::Tensor& history, const torch::Tensor& causal,
                                       const torch::Tensor& roots, const torch::Tensor& lengths, int64_t max_len,
                                       int64_t max_len_after, const torch::Tensor& k_cache,
                                       const torch::Tensor& v_cache, const torch::Tensor& embed,
                                       const torch::Tensor& fc_packed, const torch::Tensor& fc_bias, int64_t fc_out,
                                       const torch::Tensor& proj_packed, int64_t proj_out,
                                       const torch::Tensor& proj_like, const torch::Tensor& draft_ids,
                                       const std::vector<torch::Tensor>& layer_w,
                                       const std::vector<int64_t>& layer_outs, double eps, double attn_scale,
                                       bool invariant, const torch::Tensor& inv_freq, double rope_scale,
                                       int64_t top_k, int64_t depth, int64_t budget) {
    using torch::indexing::Slice;
    TORCH_CHECK(roots.dim() == 1 && lengths.dim() == 1 && lengths.size(0) == roots.size(0) && feats.dim() == 3 &&
                    feats.size(0) == roots.size(0) && feats.size(1) >= 1 && layer_w.size() == 9 &&
                    layer_outs.size() == 7 && top_k >= 1 && depth >= 1 && budget >= 1,
                "eagle_draft: bad arguments");
    constexpr double kScoreTie = 1e-4;  // as propd.strategies.eagle._SCORE_TIE
    const eagle::Drafter d{k_cache, v_cache, embed, fc_packed, fc_bias, proj_packed, draft_ids, inv_freq, fc_out,
                           proj_out, proj_like.scalar_type(), layer_w, layer_outs, eps, attn_scale, rope_scale,
                           invariant};
    const int64_t B = roots.size(0);
    const auto lopt = roots.options();
    // _catch_up: the pairs (f_t, x_{t+1}) of the tokens committed since the last read; g0 (B, H) the last one's output
    const int64_t W = feats.size(1);
    const auto ar = at::arange(W, lopt);
    const auto node_idx = at::where(ar.unsqueeze(0) < n.unsqueeze(1), ar.unsqueeze(0),
                                    at::full_like(ar, W).unsqueeze(0));
    const auto tok_pos = (lengths.unsqueeze(1) + 1 + ar.unsqueeze(0)).clamp_max(history.size(1) - 1);
    const auto g_read = d.forward(feats, history.gather(1, tok_pos), lengths, max_len + W + 1, node_idx, causal, ar);
    const auto last = (n - 1).clamp_min(0).view({B, 1, 1}).expand({-1, 1, g_read.size(-1)});
    const auto g0 = g_read.gather(1, last).select(1, 0);
    const auto after = lengths + n;
    const int64_t H = g0.size(1);
    auto [tok, lp] = d.guesses(g0, std::min(top_k, budget));  // (B, k) the roots' children
    const int64_t k = tok.size(1), n_fed = (depth - 1) * k, Nf = std::max<int64_t>(n_fed, 1);
    const int64_t S = max_len_after + Nf + 1;
    std::vector<torch::Tensor> pool_tok{tok}, pool_score{lp - kScoreTie}, pool_parent{at::full({B, k}, -1, lopt)},
        pool_lp{lp};
    torch::Tensor front_tok = tok, front_score = pool_score[0], front_pool = at::arange(k, lopt).expand({B, k});
    torch::Tensor front_in = g0.unsqueeze(1).expand({B, k, H}), front_slot;
    auto fed_mask = at::zeros({B, Nf, Nf}, lopt.dtype(at::kBool));
    const auto fed_depth = at::arange(Nf, lopt).floor_divide(k);  // a fed node's level - 1
    int64_t offset = k;
    for (int64_t level = 1; level < depth; ++level) {
        const auto slots = at::arange((level - 1) * k, level * k, lopt);
        if (front_slot.defined()) {
            fed_mask.index_put_({Slice(), slots}, fed_mask.gather(1, front_slot.unsqueeze(-1).expand({-1, -1, Nf})));
        }
        fed_mask.index_put_({Slice(), slots, slots}, true);
        const auto g = d.forward(front_in, front_tok, after, S, slots.expand({B, k}), fed_mask,
                                 fed_depth.expand({B, -1}));  // (B, k, H)
        auto [ctok, clp] = d.guesses(g, k);  // (B, k, k)
        const auto score = (front_score.unsqueeze(-1) + clp - kScoreTie).flatten(1);  // (B, k * k)
        pool_tok.push_back(ctok.flatten(1));
        pool_score.push_back(score);
        pool_parent.push_back(front_pool.unsqueeze(-1).expand({B, k, k}).flatten(1));
        pool_lp.push_back(clp.flatten(1));
        const auto best = std::get<1>(score.topk(k, 1));  // the next frontier, by path score
        const auto parent_of = best.floor_divide(k);
        front_tok = ctok.flatten(1).gather(1, best);
        front_score = score.gather(1, best);
        front_pool = best + offset;
        front_in = g.gather(1, parent_of.unsqueeze(-1).expand({-1, -1, g.size(-1)}));
        front_slot = slots.index({parent_of});
        offset += k * k;
    }
    const auto scores = at::cat(pool_score, 1);  // (B, pool)
    const int64_t N = std::min(budget, scores.size(1));
    const auto chosen = std::get<0>(std::get<1>(scores.topk(N, 1)).sort(1));  // pool order: parents first
    auto where = at::zeros({B, scores.size(1)}, lopt);  // pool index -> tree node
    where.scatter_(1, chosen, at::arange(1, N + 1, lopt).expand({B, N}));
    const auto parent_pool = at::cat(pool_parent, 1).gather(1, chosen);
    auto parents = at::where(parent_pool < 0, at::Scalar(0), where.gather(1, parent_pool.clamp_min(0)));
    parents = at::cat({at::full({B, 1}, -1, lopt), parents}, 1);
    const auto tokens = at::cat({roots.unsqueeze(1), at::cat(pool_tok, 1).gather(1, chosen)}, 1);
    const auto ones = at::ones({B, 1}, g0.options().dtype(at::kFloat));
    const auto probs = at::cat({ones, at::cat(pool_lp, 1).gather(1, chosen).exp()}, 1);
    const auto conf = at::cat({ones, scores.gather(1, chosen).exp()}, 1);
    return {tokens, parents, probs, conf};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("pack", &pack, "pack a (O, K) float32 or bfloat16 weight into 16-row panels");
    m.def("packed_linears", &packed_linears, "packed_linear of one x by several weights packed alike, in one parallel region");
    m.def("packed_linear", &packed_linear, "x @ w.T for few rows of x, w packed by pack() or GGUF blocks packed by propd.models.quant");
    m.def("pack_gguf_blocks", &pack_gguf_blocks, "ggml Q4_1 or Q8_0 blocks into the block kernel's panels");
    m.def("pack_gguf_for_q8", &pack_gguf_for_q8, "ggml Q4_1 or Q8_0 blocks into panels for 8-bit activations");
    m.def("quantize_rows_q8", [](const torch::Tensor& x) {
        TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat && x.size(1) % kQK == 0,
                    "quantize_rows_q8: a contiguous (M, K) float32 x, K a multiple of 32");
        const int64_t M = x.size(0), K = x.size(1);
        auto xq = torch::empty({M, K}, x.options().dtype(at::kChar));
        auto dx = torch::empty({M, K / kQK}, x.options()), sx = torch::empty({M, K / kQK}, x.options());
        auto qsum = torch::empty({M, K / kQK}, x.options().dtype(at::kInt));
        quantize_rows_q8(x.data_ptr<float>(), M, K, xq.data_ptr<int8_t>(), dx.data_ptr<float>(), sx.data_ptr<float>(),
                         qsum.data_ptr<int32_t>());
        return std::make_tuple(xq, dx, sx, qsum);
    }, "x rounded to int8 per block of 32 (xq, dx, sx, qsum), as the 8-bit-activation kernel rounds it");
    m.def("dequantize_packed", &dequantize_packed, "the (O, K) float32 matrix of GGUF blocks packed by propd.models.quant");
    m.def("tree_attention", &tree_attention, "attention of a few query tokens per row over cached keys");
    m.def("causal_attention", &causal_attention, "causal self-attention of a prefill chunk");
    m.def("masked_attention", &masked_attention, "a float32 decoding step's attention on the causal kernel's tiles");
    m.def("rope_and_cache", &rope_and_cache, "rotary embedding of q and k, and the cache write of k and v");
    m.def("rms_norm", &rms_norm, "RMSNorm of each row");
    m.def("tree_mask", &tree_mask, "a decoding step's tree attention mask and positions");
    m.def("row_trees", &row_trees, "per-row trees' depths, ancestor masks and paths from their parents");
    m.def("row_argmax", &row_argmax, "torch.argmax(x, dim=-1) of (N, V) rows");
    m.def("screen_survivors", &screen_survivors, "the argmax screen's coarse pass: the ids some row cannot rule out");
    m.def("screen_tables", &screen_tables, "the argmax screen's Q8_0 blocks and bounds of a weight");
    m.def("screen_argmax", &screen_argmax, "the argmax screen after its 8-bit product: bounds, candidates, exact rows");
    m.def("decoder_layer", &decoder_layer, "one Llama decoder layer of a decoding step", pybind11::arg("x"),
          pybind11::arg("w"), pybind11::arg("outs"), pybind11::arg("cos"), pybind11::arg("sin"),
          pybind11::arg("k_cache"), pybind11::arg("v_cache"), pybind11::arg("pos"), pybind11::arg("mask"),
          pybind11::arg("eps"), pybind11::arg("scale"), pybind11::arg("invariant") = true);
    m.def("eagle_draft", &eagle_draft, "an EAGLE-2 draft (read, expansion, reranking) in one call");
    m.def("step_attention", &step_attention, "a decoding step's attention (tree_attention or masked_attention)");
    // module-local: two builds of this file load side by side (benchmarks/kernel_ab.py) without a type clash
    pybind11::class_<LayerStack>(m, "LayerStack", pybind11::module_local(),
                                 "a model's decoder layers for decoding steps, run in one call")
        .def(pybind11::init<std::vector<torch::Tensor>, std::vector<int64_t>, double, double,
                            std::vector<torch::Tensor>, bool>(),
             pybind11::arg("weights"), pybind11::arg("out_sizes"), pybind11::arg("eps"), pybind11::arg("scale"),
             pybind11::arg("watch"), pybind11::arg("invariant") = true)
        .def("current", &LayerStack::current, "whether no watched tensor changed in place since construction")
        .def("run", &LayerStack::run, "run layers start..end-1 of a decoding step on x (B, T, H)");
    m.def("set_isa_limit", [](int64_t limit) { g_isa_limit = static_cast<int>(limit); },
          "0: the best path this CPU has; 1: AVX2 only; 2: AVX-512 without AMX");
    m.def("has_vnni", []() { return use_vnni(); }, "whether the 8-bit-activation kernel runs on AVX512-VNNI now");
    m.def("attention_wide", []() { return g_attention_wide; },
          "whether tree_attention may take its AVX-512 path (set_attention_wide)");
    m.def("set_attention_wide", [](bool wide) { g_attention_wide = wide; },
          "whether tree_attention may take its AVX-512 path (the same bits as its AVX2 path)");
    m.def("isa", []() {
            return std::string(use_avx512() ? (use_bf16_pairs() ? (use_amx() ? "avx512bf16-amx" : "avx512bf16") : "avx512")
                                            : "avx2");
        },
          "the instruction set the linear kernel runs with now (avx512bf16: bf16 weights packed from now on use it)");
}
