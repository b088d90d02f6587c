"""Medusa decoding heads (Cai et al. 2023, "Medusa: Simple LLM Inference Acceleration Framework with Multiple
Decoding Heads", arXiv 2401.10774).

Head i is ``num_layers`` residual blocks ``x + SiLU(W x + b)`` followed by a vocabulary projection: its own
(Medusa-1 checkpoints) or the base model's ``lm_head`` (shared; the checkpoint is then a few MB). Applied to the final
normed hidden state at position t, head i predicts the token at t + i + 2 (head 0: the token after next).

Checkpoint format (Medusa's): ``medusa_lm_head.safetensors`` or ``medusa_lm_head.pt`` holding the state dict of a
``ModuleList`` of ``Sequential(ResBlock * num_layers, [Linear])`` -- keys ``{i}.{j}.linear.weight``,
``{i}.{j}.linear.bias`` and, for own projections, ``{i}.{num_layers}.weight`` -- plus ``config.json`` with
``medusa_num_heads`` and ``medusa_num_layers``. When the config disagrees with the tensors, the tensors win.

Draft vocabulary (propd's addition, after FR-Spec: Zhao et al. 2025, "FR-Spec: Accelerating Large-Vocabulary Language
Models via Frequency-Ranked Speculative Sampling", arXiv 2502.14856): an optional ``draft_vocab.json`` beside the
weights lists token ids, most frequent first, counted in the base model's own greedy answers to training prompts.
When it is loaded, :meth:`MedusaHeads.topk` projects the heads onto those tokens only (the rows of the shared
``lm_head`` gathered once), so their guesses cost a fraction of a full vocabulary projection. A token outside it is
never guessed; verification by the base model is unchanged, so the output is too.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from propd.errors import PropdError

WEIGHT_FILES = ("medusa_lm_head.safetensors", "medusa_lm_head.pt")
DRAFT_VOCAB_FILE = "draft_vocab.json"
_KEY = re.compile(r"^(\d+)\.(\d+)\.(linear\.weight|linear\.bias|weight)$")


class ResBlock(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.linear = nn.Linear(hidden, hidden)
        nn.init.zeros_(self.linear.weight)  # starts as the identity, as Medusa does

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.silu(self.linear(x))


class MedusaHeads(nn.Module):
    """K heads; ``forward(hidden (.., H)) -> logits (.., K, V)``."""

    def __init__(self, hidden: int, vocab: int, num_heads: int, num_layers: int = 1, own_lm_head: bool = False,
                 shared_lm_head: nn.Linear | None = None):
        super().__init__()
        if num_heads < 1:
            raise PropdError(f"need at least one Medusa head, got {num_heads}")
        self.hidden, self.vocab, self.num_heads, self.num_layers = hidden, vocab, num_heads, num_layers
        self.own_lm_head = own_lm_head
        blocks = []
        for _ in range(num_heads):
            mods = [ResBlock(hidden) for _ in range(num_layers)]
            if own_lm_head:
                mods.append(nn.Linear(hidden, vocab, bias=False))
            blocks.append(nn.Sequential(*mods))
        self.heads = nn.ModuleList(blocks)
        # the shared projection is the base model's; kept out of this module's parameters and state dict
        self._shared = [shared_lm_head]
        self.register_buffer("draft_ids", None, persistent=False)  # (N,) token ids the heads may guess, or None
        self._draft_proj: dict[tuple, nn.Module] = {}  # (lm_head weight state, N) -> its N gathered rows

    def set_draft_vocab(self, ids: torch.Tensor | list[int] | None) -> None:
        """Restrict :meth:`topk` to these token ids (None: the whole vocabulary). See the module docstring."""
        if ids is not None:
            ids = torch.as_tensor(ids, dtype=torch.long).flatten()
            if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= self.vocab:
                raise PropdError(f"a draft vocabulary needs 1 or more token ids in 0..{self.vocab - 1}")
            if ids.unique().numel() != ids.numel():
                raise PropdError("the draft vocabulary lists a token id twice")
            ids = ids.to(next(self.parameters(), torch.empty(0)).device)
        self.draft_ids = ids
        self._draft_proj = {}

    def attach(self, lm_head: nn.Linear) -> None:
        self._shared = [lm_head]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = self._blocks(hidden)
        if self.own_lm_head:
            return x  # each ResBlock ended in its own vocabulary projection
        return self._lm_head()(x)  # one projection for all K heads: the weights are read once, not K times

    def _blocks(self, hidden: torch.Tensor) -> torch.Tensor:
        """Every head's ResBlocks (and own projection, if any) on ``hidden``: (.., K, H) or (.., K, V)."""
        first = self._first_blocks() if not (torch.is_grad_enabled() or self.own_lm_head) else None
        if first is None:
            return torch.stack([head(hidden) for head in self.heads], dim=-2)
        # every head's first ResBlock reads the same hidden state: one (K*H x H) product instead of K small ones
        x = hidden[..., None, :] + F.silu(first(hidden).view(*hidden.shape[:-1], self.num_heads, self.hidden))
        for j in range(1, self.num_layers):
            x = torch.stack([head[j](x[..., i, :]) for i, head in enumerate(self.heads)], dim=-2)
        return x

    def _first_blocks(self) -> nn.Module | None:
        """The K heads' first ResBlock linears stacked into one ``Linear`` (built once per weight version; None on
        devices other than the CPU, where the K products are not the cost)."""
        lins = [head[0].linear for head in self.heads]
        w = lins[0].weight
        if w.device.type != "cpu":
            return None
        from propd.models.cpu_modules import KernelLinear
        from propd.models.llama import tensor_version

        key = tuple((lin.weight.data_ptr(), tensor_version(lin.weight), lin.bias.data_ptr(), tensor_version(lin.bias))
                    for lin in lins)
        cached = getattr(self, "_first", None)
        if cached is None or cached[0] != key:
            fused = KernelLinear(self.hidden, self.num_heads * self.hidden, bias=True, device=w.device, dtype=w.dtype)
            fused.requires_grad_(False)
            fused.weight.data = torch.cat([lin.weight.detach() for lin in lins]).contiguous()
            fused.bias.data = torch.cat([lin.bias.detach() for lin in lins]).contiguous()
            cached = self._first = (key, fused)
        return cached[1]

    def _lm_head(self) -> nn.Module:
        if self._shared[0] is None:
            raise PropdError("these Medusa heads share the base model's lm_head, but none is attached")
        return self._shared[0]

    def topk(self, hidden: torch.Tensor, k: int, draft_vocab: int | None = None) -> torch.Tensor:
        """Token ids (.., K, k) of each head's k most likely guesses, best first.

        ``draft_vocab``: None guesses within the whole draft vocabulary when one is set (then only its rows of the
        shared ``lm_head`` are multiplied), else within the whole vocabulary; 0 within the whole vocabulary; N > 0
        within the draft vocabulary's N most frequent tokens. When fewer than k tokens are allowed, the last one is
        repeated up to k."""
        logits, ids = self.draft_logits(hidden, draft_vocab)
        top = logits.topk(min(k, logits.shape[-1]), dim=-1).indices
        if ids is not None:
            top = ids[top]
        if top.shape[-1] < k:  # fewer tokens than ranks asked for: repeat the last (a wasted sibling, never wrong)
            top = torch.cat([top, top[..., -1:].expand(*top.shape[:-1], k - top.shape[-1])], dim=-1)
        return top

    def draft_logits(self, hidden: torch.Tensor, draft_vocab: int | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Each head's logits (.., K, n) over the tokens :meth:`topk` guesses from (``draft_vocab`` as there), and
        the token id of each of the n columns (None: column i is token i, the whole vocabulary)."""
        n = self.draft_size(draft_vocab)
        if n == 0:
            return self(hidden), None
        return self._draft_projection(n)(self._blocks(hidden)), self.draft_ids[:n]

    def prepare(self, draft_vocab: int | None = None) -> None:
        """Build (and pack, where the CPU kernel serves it) the projection :meth:`topk` will use, ahead of the first
        call."""
        if not self.own_lm_head:
            first = self._first_blocks()
            if first is not None:
                first.prepare()
        n = self.draft_size(draft_vocab)
        if n and not self.own_lm_head and self._shared[0] is not None:
            self._draft_projection(n).prepare()

    def draft_size(self, draft_vocab: int | None = None) -> int:
        """How many tokens ``topk(..., draft_vocab)`` guesses from (0: the whole vocabulary); refuses impossible
        requests."""
        have = 0 if self.draft_ids is None or self.own_lm_head else self.draft_ids.numel()
        if draft_vocab is None:
            return have
        if draft_vocab < 0:
            raise PropdError(f"draft_vocab must be 0 (whole vocabulary) or positive, got {draft_vocab}")
        if draft_vocab > have:
            why = ("these heads have their own vocabulary projections" if self.own_lm_head else
                   f"these heads have no {DRAFT_VOCAB_FILE}" if not have else f"their {DRAFT_VOCAB_FILE} lists {have}")
            raise PropdError(f"draft_vocab={draft_vocab} needs that many ranked tokens, but {why}")
        return draft_vocab

    def _draft_projection(self, n: int) -> nn.Module:
        from propd.models.cpu_modules import KernelLinear
        from propd.models.llama import tensor_version

        w = self._lm_head().weight
        key = (w.data_ptr(), tensor_version(w), w.dtype, w.device, self.draft_ids.data_ptr(), n)
        proj = self._draft_proj.get(key)
        if proj is None:
            if len(self._draft_proj) >= 4:  # a few sizes at once (a comparison run); stale keys go
                self._draft_proj.clear()
            proj = KernelLinear.from_rows(w, self.draft_ids[:n])  # gathered once
            self._draft_proj[key] = proj
        return proj

    # ----------------------------------------------------------------------------------- checkpoints

    def save(self, directory: str | Path, dtype: torch.dtype | None = None, **extra_config: object) -> Path:
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        state = {k: (v.to(dtype) if dtype else v).detach().contiguous().cpu() for k, v in self.heads.state_dict().items()}
        save_file(state, str(d / WEIGHT_FILES[0]))
        config = {"medusa_num_heads": self.num_heads, "medusa_num_layers": self.num_layers,
                  "hidden_size": self.hidden, "vocab_size": self.vocab, "own_lm_head": self.own_lm_head}
        config.update(extra_config)
        (d / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        return d

    @classmethod
    def load(cls, path: str | Path, hidden: int, vocab: int, lm_head: nn.Linear | None = None) -> "MedusaHeads":
        """Load a Medusa checkpoint (a directory or the weights file itself) for a model of this hidden/vocab size,
        with the ``draft_vocab.json`` beside it if there is one."""
        p = Path(path).expanduser()
        if p.is_dir():
            files = [p / f for f in WEIGHT_FILES if (p / f).is_file()]
            if not files:
                raise PropdError(f"no Medusa heads in {p}: expected {' or '.join(WEIGHT_FILES)}")
            weights = files[0]
        elif p.is_file():
            weights = p
        else:
            raise PropdError(f"heads checkpoint {p} does not exist")
        state = _read_state(weights)
        heads_idx, layers_idx, own = set(), set(), set()
        for key in state:
            m = _KEY.match(key)
            if not m:
                raise PropdError(f"{weights.name} is not a Medusa heads checkpoint (unexpected tensor {key!r})")
            i, j, kind = int(m.group(1)), int(m.group(2)), m.group(3)
            heads_idx.add(i)
            (own if kind == "weight" else layers_idx).add(j if kind != "weight" else i)
        num_heads = max(heads_idx) + 1
        num_layers = max(layers_idx) + 1 if layers_idx else 0
        config_file = weights.parent / "config.json"
        if config_file.is_file():
            cfg = json.loads(config_file.read_text())
            if cfg.get("medusa_num_heads") not in (None, num_heads):
                import warnings

                warnings.warn(f"{config_file} says medusa_num_heads={cfg['medusa_num_heads']} but the checkpoint "
                              f"holds {num_heads} heads; using {num_heads}", stacklevel=2)
        for key, t in state.items():
            if key.endswith("linear.weight") and tuple(t.shape) != (hidden, hidden):
                raise PropdError(f"heads in {p} have hidden size {t.shape[-1]}, but the model's is {hidden}")
            if key.endswith(f".{num_layers}.weight") and tuple(t.shape) != (vocab, hidden):
                raise PropdError(f"heads in {p} project to a vocabulary of {t.shape[0]} (hidden {t.shape[1]}), "
                                 f"but the model has {vocab} tokens (hidden {hidden})")
        heads = cls(hidden, vocab, num_heads, num_layers, own_lm_head=bool(own), shared_lm_head=lm_head)
        missing, unexpected = heads.heads.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
        if missing or unexpected:
            raise PropdError(f"heads checkpoint {weights} is incomplete (missing {missing[:3]}...)")
        ids = None if heads.own_lm_head else read_draft_vocab(weights.parent, vocab)
        if ids is not None:
            heads.set_draft_vocab(ids)
        return heads


def read_draft_vocab(directory: Path, vocab: int) -> list[int] | None:
    """The ranked token ids of ``directory/draft_vocab.json``, or None when there is no such file."""
    f = Path(directory) / DRAFT_VOCAB_FILE
    if not f.is_file():
        return None
    try:
        ids = json.loads(f.read_text())["ids"]
    except (ValueError, KeyError, TypeError) as e:
        raise PropdError(f"{f} is not a draft vocabulary (a JSON object with a list \"ids\"): {e}") from None
    if not ids or not all(isinstance(i, int) and 0 <= i < vocab for i in ids):
        raise PropdError(f"{f} lists token ids outside this model's vocabulary of {vocab}")
    return ids


def write_draft_vocab(directory: str | Path, answers: list[list[int]], vocab: int, source: str,
                      then: list[list[int]] = ()) -> Path:
    """Write ``draft_vocab.json``: the tokens of ``answers`` (the base model's greedy answers) by count, most frequent
    first (ties by id), followed by the other tokens of ``then`` (e.g. the prompts' text) by their count; only tokens
    that occur are listed."""

    def ranked(seqs, skip=frozenset()):
        counts = torch.bincount(torch.tensor([t for a in seqs for t in a], dtype=torch.long), minlength=vocab).tolist()
        return sorted((i for i in range(vocab) if counts[i] > 0 and i not in skip), key=lambda i: (-counts[i], i))

    first = ranked(answers)
    order = first + ranked(then, frozenset(first))
    f = Path(directory) / DRAFT_VOCAB_FILE
    f.write_text(json.dumps({"source": source, "from_answers": len(first), "ids": order}) + "\n")
    return f


def _read_state(weights: Path) -> dict[str, torch.Tensor]:
    try:
        if weights.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(weights))
        state = torch.load(str(weights), map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or foreign file
        raise PropdError(f"cannot read heads checkpoint {weights}: {exc}") from None
    if not isinstance(state, dict):
        raise PropdError(f"{weights} does not hold a state dict")
    return state


EARLY_FILE = "early_heads.safetensors"


class EarlyHeads(nn.Module):
    """Early-exit prediction heads (ProPD, Zhong et al. 2024, section 4.1): for layer n, a ResBlock on the hidden
    state after n layers, followed by the base model's final norm and ``lm_head``, trained to predict the full
    model's next token. ``blocks[str(n)]`` holds the ResBlock; :meth:`logits` applies the shared parts."""

    def __init__(self, hidden: int, layers: list[int]):
        super().__init__()
        if not layers:
            raise PropdError("early heads need at least one layer")
        self.hidden = hidden
        self.blocks = nn.ModuleDict({str(n): ResBlock(hidden) for n in sorted(set(layers))})

    @property
    def layers(self) -> list[int]:
        return sorted(int(k) for k in self.blocks)

    def logits(self, layer: int, hidden: torch.Tensor, norm: nn.Module, lm_head: nn.Module) -> torch.Tensor:
        return lm_head(norm(self.blocks[str(layer)](hidden)))

    def save(self, directory: str | Path, dtype: torch.dtype | None = None) -> Path:
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        state = {k: (v.to(dtype) if dtype else v).detach().contiguous().cpu() for k, v in self.blocks.state_dict().items()}
        save_file(state, str(d / EARLY_FILE), metadata={"early_layers": json.dumps(self.layers)})
        return d / EARLY_FILE

    @classmethod
    def load(cls, path: str | Path, hidden: int, num_layers: int) -> "EarlyHeads":
        from safetensors.torch import load_file

        p = Path(path)
        f = p / EARLY_FILE if p.is_dir() else p
        if not f.is_file():
            raise PropdError(f"no early heads at {p} (expected {EARLY_FILE})")
        state = load_file(str(f))
        layers = sorted({int(k.split(".")[0]) for k in state})
        for k, t in state.items():
            if k.endswith("linear.weight") and tuple(t.shape) != (hidden, hidden):
                raise PropdError(f"early heads in {f} have hidden size {t.shape[-1]}, but the model's is {hidden}")
        bad = [n for n in layers if not 1 <= n < num_layers]
        if bad:
            raise PropdError(f"early heads in {f} are for layers {bad}, but the model has {num_layers} layers")
        heads = cls(hidden, layers)
        heads.blocks.load_state_dict({k: v.float() for k, v in state.items()})
        return heads
