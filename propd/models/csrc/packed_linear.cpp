// propd: a CPU kernel for linear layers applied to few rows (AVX2 + FMA), float32 or bfloat16 weights.
//
// y[m, o] = sum_k x[m, k] * w[o, k]. The weight is packed once into panels of 16 output rows, (ceil(O/16), K, 16),
// so that for each k one load feeds 16 outputs; each panel is streamed from memory once per call, and the rows of x
// are taken in balanced blocks of at most 6 (12 accumulator registers), the register-blocked outer-product scheme of
// BLIS-style GEMM micro-kernels (Van Zee and van de Geijn, "BLIS: A Framework for Rapidly Instantiating BLAS
// Functionality", ACM TOMS 2015). With more than one block per panel, the later blocks read the panel from cache and
// the memory bus would idle; so each block also prefetches its share of the next panel, which keeps up to about 16
// rows as cheap as one row's memory stream (benchmarks/linear_kernel.py).
//
// bfloat16 weights stay bfloat16 in memory (half the bytes to stream) and are widened to float32 in registers (a
// bfloat16 is the upper half of a float32); x is widened once per call, products and sums are float32, and y is rounded
// to bfloat16 at the end. This CPU class has no bf16 arithmetic (no AVX512_BF16), where torch's bf16 matrix products
// at a few rows run several times slower than float32 ones.
//
// Every y[m, o] is one chain of fused multiply-adds over k in order, whatever the number of rows or their blocking: a
// row's result does not depend on the other rows (batch invariance).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

namespace {

constexpr int64_t kPanel = 16;
constexpr int64_t kMaxBlock = 6;
constexpr int64_t kLine = 64;  // bytes per cache line

// Cache lines of the next panel to prefetch while this block runs: one every `every` values of k, from `next` on.
struct Prefetch {
    const char* next = nullptr;
    int64_t every = 0;  // 0: none
};

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
        if (pf.every && ++count == pf.every) {
            count = 0;
            _mm_prefetch(pf.next, _MM_HINT_T0);
            pf.next += kLine;
        }
#pragma GCC unroll 8
        for (int r = 0; r < MR; ++r) {
            const __m256 xb = _mm256_broadcast_ss(x + r * K + k);
            a0[r] = _mm256_fmadd_ps(w0, xb, a0[r]);
            a1[r] = _mm256_fmadd_ps(w1, xb, a1[r]);
        }
    }
    if (width == kPanel) {
#pragma GCC unroll 8
        for (int r = 0; r < MR; ++r) {
            _mm256_storeu_ps(y + r * ldy, a0[r]);
            _mm256_storeu_ps(y + r * ldy + 8, a1[r]);
        }
    } else {  // the last panel of a matrix whose row count is not a multiple of 16
        alignas(32) float tmp[kPanel];
#pragma GCC unroll 8
        for (int r = 0; r < MR; ++r) {
            _mm256_store_ps(tmp, a0[r]);
            _mm256_store_ps(tmp + 8, a1[r]);
            for (int64_t j = 0; j < width; ++j) y[r * ldy + j] = tmp[j];
        }
    }
}

template <typename W>
void block(int64_t mr, const W* panel, const float* x, int64_t K, float* y, int64_t ldy, int64_t width, Prefetch pf) {
    switch (mr) {
        case 6: micro<6>(panel, x, K, y, ldy, width, pf); break;
        case 5: micro<5>(panel, x, K, y, ldy, width, pf); break;
        case 4: micro<4>(panel, x, K, y, ldy, width, pf); break;
        case 3: micro<3>(panel, x, K, y, ldy, width, pf); break;
        case 2: micro<2>(panel, x, K, y, ldy, width, pf); break;
        default: micro<1>(panel, x, K, y, ldy, width, pf); break;
    }
}

// y (M, O) float32 = x (M, K) float32 times the packed weight (P, K, 16) of element type W.
template <typename W>
void run(const float* xp, const W* pp, float* yp, int64_t M, int64_t K, int64_t O, int64_t P) {
    const int64_t panel_lines = (K * kPanel * static_cast<int64_t>(sizeof(W)) + kLine - 1) / kLine;
    at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
        for (int64_t p = begin; p < end; ++p) {
            const W* panel = pp + p * K * kPanel;
            const int64_t width = std::min<int64_t>(kPanel, O - kPanel * p);
            const int64_t nblocks = (M + kMaxBlock - 1) / kMaxBlock;
            const int64_t share = (panel_lines + nblocks - 1) / nblocks;
            int64_t m = 0;
            for (int64_t j = 0; m < M; ++j) {  // balanced blocks of at most 6 rows: 8 rows run as 4 + 4, not 6 + 2
                const int64_t left = M - m, blocks = (left + kMaxBlock - 1) / kMaxBlock;
                const int64_t mr = (left + blocks - 1) / blocks;
                Prefetch pf;  // block j fetches lines [j * share, (j + 1) * share) of the next panel of this thread
                const int64_t lines = std::min(share, panel_lines - j * share);
                if (nblocks > 1 && p + 1 < end && lines > 0) {
                    pf.next = reinterpret_cast<const char*>(panel + K * kPanel) + j * share * kLine;
                    pf.every = std::max<int64_t>(1, K / lines);
                }
                block(mr, panel, xp + m * K, K, yp + m * O + kPanel * p, O, width, pf);
                m += mr;
            }
        }
    });
}

bool kernel_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16; }

}  // namespace

// (O, K) float32 or bfloat16 -> (ceil(O/16), K, 16) of the same type, zero-padded.
torch::Tensor pack(const torch::Tensor& w) {
    TORCH_CHECK(w.dim() == 2 && kernel_dtype(w.scalar_type()) && w.device().is_cpu(),
                "pack: a 2-D float32 or bfloat16 CPU weight");
    const int64_t O = w.size(0), K = w.size(1), P = (O + kPanel - 1) / kPanel;
    auto padded = torch::zeros({P * kPanel, K}, w.options());
    padded.narrow(0, 0, O).copy_(w);
    return padded.view({P, kPanel, K}).transpose(1, 2).contiguous();
}

// x: (M, K) contiguous, of the packed weight's type; packed: pack(w) for w of O rows. Returns (M, O) of that type.
torch::Tensor packed_linear(const torch::Tensor& x, const torch::Tensor& packed, int64_t O) {
    TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.device().is_cpu() && x.scalar_type() == packed.scalar_type(),
                "packed_linear: x must be a contiguous 2-D CPU tensor of the packed weight's type");
    TORCH_CHECK(packed.dim() == 3 && packed.is_contiguous() && kernel_dtype(packed.scalar_type()),
                "packed_linear: bad packed weight");
    const int64_t M = x.size(0), K = x.size(1), P = packed.size(0);
    TORCH_CHECK(packed.size(1) == K && packed.size(2) == kPanel && (O + kPanel - 1) / kPanel == P,
                "packed_linear: the packed weight does not fit x or O");
    const bool bf16 = packed.scalar_type() == at::kBFloat16;
    const auto xf = bf16 ? x.to(at::kFloat) : x;
    auto y = torch::empty({M, O}, xf.options());
    if (M > 0 && O > 0) {
        if (bf16) {
            run(xf.data_ptr<float>(), reinterpret_cast<const uint16_t*>(packed.data_ptr<at::BFloat16>()),
                y.data_ptr<float>(), M, K, O, P);
        } else {
            run(xf.data_ptr<float>(), packed.data_ptr<float>(), y.data_ptr<float>(), M, K, O, P);
        }
    }
    return bf16 ? y.to(at::kBFloat16) : y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("pack", &pack, "pack a (O, K) float32 or bfloat16 weight into 16-row panels");
    m.def("packed_linear", &packed_linear, "x @ w.T for few rows of x, w packed by pack()");
}
