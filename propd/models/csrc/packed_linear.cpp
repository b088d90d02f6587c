// propd: a CPU kernel for float32 linear layers applied to few rows (AVX2 + FMA).
//
// y[m, o] = sum_k x[m, k] * w[o, k]. The weight is packed once into panels of 16 output rows, (ceil(O/16), K, 16),
// so that for each k one 64-byte load feeds 16 outputs; each panel is streamed from memory once per call, and the rows
// of x are taken in balanced blocks of at most 6 (12 accumulator registers), the register-blocked outer-product
// scheme of BLIS-style GEMM micro-kernels (Van Zee and van de Geijn, "BLIS: A Framework for Rapidly Instantiating BLAS
// Functionality", ACM TOMS 2015). With more than one block per panel, the later blocks read the panel from cache and
// the memory bus would idle; so each block also prefetches its share of the next panel, which keeps 7-24 rows about as
// cheap as one row's memory stream (benchmarks/linear_kernel.py). Every y[m, o] is one chain of fused multiply-adds over k in order, whatever the
// number of rows or their blocking: a row's result does not depend on the other rows (batch invariance).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>

namespace {

constexpr int64_t kPanel = 16;
constexpr int64_t kMaxBlock = 6;

// Lines of the next panel to prefetch while this block runs: one every `every` values of k, from `next` on.
struct Prefetch {
    const float* next = nullptr;
    int64_t every = 0;  // 0: none
};

// Every loop over r is fully unrolled so that the accumulators live in registers; a rolled loop makes GCC keep them in
// a stack array and store all 12 each k, which halves the speed.
template <int MR>
inline void micro(const float* __restrict__ panel, const float* __restrict__ x, int64_t K, float* __restrict__ y,
                  int64_t ldy, int64_t width, Prefetch pf) {
    __m256 a0[MR], a1[MR];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
        a0[r] = _mm256_setzero_ps();
        a1[r] = _mm256_setzero_ps();
    }
    int64_t count = 0;
    for (int64_t k = 0; k < K; ++k) {
        const __m256 w0 = _mm256_loadu_ps(panel + kPanel * k), w1 = _mm256_loadu_ps(panel + kPanel * k + 8);
        if (pf.every && ++count == pf.every) {
            count = 0;
            _mm_prefetch(reinterpret_cast<const char*>(pf.next), _MM_HINT_T0);
            pf.next += kPanel;
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

void block(int64_t mr, const float* panel, const float* x, int64_t K, float* y, int64_t ldy, int64_t width, Prefetch pf) {
    switch (mr) {
        case 6: micro<6>(panel, x, K, y, ldy, width, pf); break;
        case 5: micro<5>(panel, x, K, y, ldy, width, pf); break;
        case 4: micro<4>(panel, x, K, y, ldy, width, pf); break;
        case 3: micro<3>(panel, x, K, y, ldy, width, pf); break;
        case 2: micro<2>(panel, x, K, y, ldy, width, pf); break;
        default: micro<1>(panel, x, K, y, ldy, width, pf); break;
    }
}

}  // namespace

// (O, K) float32 -> (ceil(O/16), K, 16), zero-padded.
torch::Tensor pack(const torch::Tensor& w) {
    TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat && w.device().is_cpu(), "pack: a 2-D float32 CPU weight");
    const int64_t O = w.size(0), K = w.size(1), P = (O + kPanel - 1) / kPanel;
    auto padded = torch::zeros({P * kPanel, K}, w.options());
    padded.narrow(0, 0, O).copy_(w);
    return padded.view({P, kPanel, K}).transpose(1, 2).contiguous();
}

// x: (M, K) float32 contiguous; packed: pack(w) for w of O rows. Returns (M, O).
torch::Tensor packed_linear(const torch::Tensor& x, const torch::Tensor& packed, int64_t O) {
    TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat && x.device().is_cpu(),
                "packed_linear: x must be a contiguous 2-D float32 CPU tensor");
    TORCH_CHECK(packed.dim() == 3 && packed.is_contiguous() && packed.scalar_type() == at::kFloat, "packed_linear: bad packed weight");
    const int64_t M = x.size(0), K = x.size(1), P = packed.size(0);
    TORCH_CHECK(packed.size(1) == K && packed.size(2) == kPanel && (O + kPanel - 1) / kPanel == P,
                "packed_linear: the packed weight does not fit x or O");
    auto y = torch::empty({M, O}, x.options());
    if (M == 0 || O == 0) return y;
    const float* xp = x.data_ptr<float>();
    const float* pp = packed.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
        for (int64_t p = begin; p < end; ++p) {
            const float* panel = pp + p * K * kPanel;
            const int64_t width = std::min<int64_t>(kPanel, O - kPanel * p);
            const int64_t nblocks = (M + kMaxBlock - 1) / kMaxBlock, share = (K + nblocks - 1) / nblocks;
            int64_t m = 0;
            for (int64_t j = 0; m < M; ++j) {  // balanced blocks of at most 6 rows: 8 rows run as 4 + 4, not 6 + 2
                const int64_t left = M - m, blocks = (left + kMaxBlock - 1) / kMaxBlock;
                const int64_t mr = (left + blocks - 1) / blocks;
                Prefetch pf;  // block j fetches lines [j * share, (j + 1) * share) of the next panel of this thread
                const int64_t lines = std::min(share, K - j * share);
                if (nblocks > 1 && p + 1 < end && lines > 0) {
                    pf.next = panel + K * kPanel + j * share * kPanel;
                    pf.every = std::max<int64_t>(1, K / lines);
                }
                block(mr, panel, xp + m * K, K, yp + m * O + kPanel * p, O, width, pf);
                m += mr;
            }
        }
    });
    return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("pack", &pack, "pack a (O, K) float32 weight into 16-row panels");
    m.def("packed_linear", &packed_linear, "x @ w.T for few rows of x, w packed by pack()");
}
