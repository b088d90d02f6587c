"""The exact argmax of a float32 or bfloat16 ``lm_head`` for a quarter or half of its bytes (CPU, propd's extension).

Greedy decoding needs each position's argmax, not its logits. :class:`ArgmaxScreen` keeps the (V, K) weight W also
as Q8_0 blocks (ggml's: 32 weights share a float16 scale; :mod:`propd.models.quant`) and, per row x:

1. approximate logits z'_v = W'_v x' with the 8-bit weights W' and x rounded to 8 bits per block of 32 as the
   kernel rounds it (x'; integer products, float32 scales and sums), in one pass over a quarter of W's bytes;
2. a bound |z'_v - z_v| <= e_v on the distance to the float32 kernel's logits z_v: per block b,
   |w x - w' x'| <= |w - w'| |x| + |w'| |x - x'|, so |z'_v - z_v| <= sum_b (E[v, b] + 2e-4 A[v, b]) |x_b|_1 +
   (1 + 2e-4) |w'_vb|_2 |x_b - x'_b|_2 (Cauchy-Schwarz), with E the largest weight rounding error and A the largest
   weight magnitude of row v's block b (measured once); 2e-4 A |x_b|_1 covers both products' float32 rounding
   (sums of K = 576 terms: about 4e-5 relative) several times over: e_v;
3. candidates: every v with z'_v + e_v >= max_u (z'_u - e_u), a set that holds every maximum of z. Found in two
   passes: first with a coarser bound c_v >= e_v from each row of W's largest block coefficients,
   c_v = max_b (E[v, b] + 2e-4 A[v, b]) |x|_1 + (1 + 2e-4) max_b |w'_vb|_2 sum_b |x_b - x'_b|_2 (two vectors of V
   instead of a (V, 2 K / 32) matrix: about 1.4x e_v on the default model), then e_v for the few survivors. The
   survivors hold the maximiser u* of z'_u - e_u (z'_u* + c_u* >= z'_u* - e_u* >= z'_w - e_w >= z'_w - c_w) and
   every candidate (z'_v + c_v >= z'_v + e_v >= z'_u* - e_u* >= max_w (z'_w - c_w)), so the candidates are the same;
4. the candidates' exact logits, by the same packed kernel as the full ``lm_head`` (each output one chain of
   fused multiply-adds over k in order, whatever rows sit beside it), and their argmax, the lowest index among equal
   maxima, as ``torch.argmax``.

A bfloat16 weight's logits are its float32 sums rounded to bfloat16, where distinct sums can round to one maximum:
the floor max_u (z'_u - e_u) is lowered to the least float32 that rounds to its bfloat16 value or above (the
midpoint to the bfloat16 below), so every id whose rounded logit can tie the maximum stays a candidate, and the
candidates' exact logits are the bfloat16 kernel's.

So the result is the full ``lm_head``'s argmax bit for bit (tested against it on random weights with near-ties, and
on the default model's states: ``benchmarks/argmax_screen.py``, where a row leaves a few candidates). A row with more
than ``max_candidates`` candidates, or with a value that is not finite, takes the full product.
"""

from __future__ import annotations

import torch

from propd.models import cpu_kernel

QK = 32
ROUNDING = 2e-4  # relative slack for float32 rounding in both products (see the module docstring)


class ArgmaxScreen:
    def __init__(self, weight: torch.Tensor, max_candidates: int = 128):
        from propd.models.quant import QuantLinear

        V, K = weight.shape
        self.weight = weight.detach().contiguous()  # the (V, K) weight, read for the candidates' rows
        blocks, self.coef, self.err_max, self.norm_max = cpu_kernel.screen_tables(self.weight, ROUNDING)
        self.q8 = QuantLinear.from_blocks(blocks, "Q8_0", K, V, activations="q8")  # Q8_0 blocks, 8-bit activations
        self.max_candidates = max_candidates

    @staticmethod
    def available(weight: torch.Tensor) -> bool:
        return (weight.dim() == 2 and weight.dtype in (torch.float32, torch.bfloat16) and weight.device.type == "cpu"
                and weight.shape[1] % QK == 0 and cpu_kernel.extension() is not None)

    def _screen(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Steps 1-4 for rows ``x`` (N, K) contiguous float32, the 8-bit product here and the rest in one extension
        call (``screen_argmax``): the argmax (N,) of the rows it settles, which rows those are (N,) bool, the ids
        (C,) that are a candidate of some row, ascending, which of them are each row's (N, C) bool, and whether each
        row's bound is finite (N,)."""
        x = x.float()  # bfloat16 rows (a bfloat16 weight's) exactly
        return cpu_kernel.screen_argmax(x, self.q8(x), self.err_max, self.norm_max, self.coef, self.weight,
                                        self.max_candidates)

    def _candidates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The ids (C,) that are a candidate of some row of ``x`` (N, K), which of them are each row's (N, C) bool,
        and whether each row's bound is finite (N,)."""
        return self._screen(x.contiguous())[2:]

    def candidates(self, x: torch.Tensor) -> torch.Tensor:
        """How many ids (N,) each row of ``x`` (N, K) leaves to the exact check."""
        return self._candidates(x)[1].sum(dim=1)

    def argmax(self, x: torch.Tensor, full) -> torch.Tensor:
        """Argmax ids (N,) of ``x`` (N, K) (the weight's dtype) times the weight; ``full(x)`` gives the full logits
        (N, V) for the rows the screen cannot settle."""
        x = x.contiguous()
        out, settled, _, _, _ = self._screen(x)
        if not bool(settled.all()):
            rest = (~settled).nonzero()[:, 0]
            out[rest] = cpu_kernel.argmax(full(x[rest]))
        return out


def reference_tables(weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """:class:`ArgmaxScreen`'s tables by torch ops, the definitions ``cpu_kernel.screen_tables`` computes in one pass:
    the Q8_0 blocks (V, K / 32 * 34), coef (V, 2 K / 32) = [E + 2e-4 A, (1 + 2e-4) |w'_vb|_2] per block, and each
    row's largest of both (V,)."""
    from propd.models.quant import dequantize_blocks, quantize_q8_0

    V, K = weight.shape
    blocks = quantize_q8_0(weight)
    w = weight.detach().float().reshape(V, K // QK, QK)
    wq = dequantize_blocks(blocks, "Q8_0", V, K).reshape(V, K // QK, QK)
    mag = torch.maximum(w.abs(), wq.abs()).amax(dim=2)  # (V, nb): A
    err = (w - wq).abs().amax(dim=2) + ROUNDING * mag  # E + 2e-4 A
    norm = wq.norm(dim=2) * (1 + ROUNDING)  # (1 + 2e-4) |w'_vb|_2
    return blocks, torch.cat([err, norm], dim=1), err.amax(dim=1), norm.amax(dim=1)
