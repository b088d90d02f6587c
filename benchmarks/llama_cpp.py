"""propd's ``ar`` decoding against llama.cpp's on the default model, in one run, taking turns (issue: CPU engine at
the memory floor, part 7).

    python benchmarks/llama_cpp.py                      # builds llama.cpp once (about 4 minutes on 2 cores)
    python benchmarks/llama_cpp.py --rounds 5 --depth 300 --tokens 64
    python benchmarks/llama_cpp.py --llama-bin DIR      # a llama.cpp build's bin/ with llama-bench, llama-quantize

llama.cpp is the llama-cpp-python sdist's vendored copy from the package index, built with ``-DGGML_NATIVE=ON``
into ``$PROPD_CACHE/llama.cpp/<version>/`` (kept for later runs; the requantized files go in ``models/``). The
model's own Q4_1 GGUF file is requantized by ``llama-quantize --allow-requantize`` to F32 and BF16: the weights
propd's float32 conversion holds, and their bfloat16 rounding. Each round times, for each precision, ``llama-bench
-p 0 -n TOKENS -d DEPTH -t THREADS -r 1`` (TOKENS greedy tokens after a DEPTH-token context) and propd's ``ar``
decoding steps for TOKENS tokens after a DEPTH-token prompt (float32, bfloat16, and ``gguf`` and ``gguf-q8`` against
Q4_1), so a busy moment slows both alike. Prints the median decode tokens/s per engine and precision over the rounds, and
propd / llama.cpp.

llama.cpp's CPU path quantizes activations to 8 bits for its Q4_1 dot products (and its F32/BF16 paths sum in
another order), so its tokens may differ from propd's; propd's ``gguf`` gives float32's tokens, and ``gguf-q8`` takes
llama.cpp's 8-bit arithmetic (its sums in propd's own order).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
from pathlib import Path

import torch

from propd.models.loading import cache_dir, fetch_known_gguf, load_model

MODEL = "smollm2-135m-instruct"
SDIST = "llama-cpp-python"
# propd dtype -> the llama.cpp file type of the same weights
PRECISIONS = {"float32": "F32", "bfloat16": "BF16", "gguf": "Q4_1", "gguf-q8": "Q4_1"}


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        sys.exit(f"llama_cpp.py: {' '.join(map(str, cmd[:3]))} ... failed (exit {proc.returncode}):\n{tail}")
    return proc


def build_llama_cpp(version: str | None) -> Path:
    """Download the llama-cpp-python sdist (no binaries), build llama-bench and llama-quantize from its vendored
    llama.cpp, and return the directory holding them. Built once per version."""
    root = cache_dir() / "llama.cpp"
    src_dl = root / "sdist"
    src_dl.mkdir(parents=True, exist_ok=True)
    spec = f"{SDIST}=={version}" if version else SDIST
    # the newest on the index (downloaded once), or the version asked for
    if not list(src_dl.glob(f"*{version}*.tar.gz" if version else "*.tar.gz")):
        print(f"downloading the {spec} sdist from the package index", file=sys.stderr)
        run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             "--disable-pip-version-check", "-q", spec, "-d", str(src_dl)])
    sdists = sorted(src_dl.glob("*.tar.gz"), key=lambda p: p.stat().st_mtime)
    if version:
        sdists = [p for p in sdists if version in p.name]
    if not sdists:
        sys.exit(f"llama_cpp.py: no {spec} sdist in {src_dl}")
    sdist = sdists[-1]
    ver = sdist.name.removesuffix(".tar.gz").rsplit("-", 1)[-1]
    home = root / ver
    bins = home / "build" / "bin"
    if (bins / "llama-bench").exists() and (bins / "llama-quantize").exists():
        return bins
    src = home / "src"
    if not (src / "vendor" / "llama.cpp" / "CMakeLists.txt").exists():
        shutil.rmtree(src, ignore_errors=True)
        src.mkdir(parents=True)
        with tarfile.open(sdist) as tf:
            tf.extractall(src, filter="data")
        (inner,) = [p for p in src.iterdir() if p.is_dir()]
        for p in inner.iterdir():
            p.rename(src / p.name)
        inner.rmdir()
    print(f"building llama.cpp {ver} (llama-bench, llama-quantize; GGML_NATIVE=ON) in {home / 'build'}",
          file=sys.stderr)
    run(["cmake", "-S", str(src / "vendor" / "llama.cpp"), "-B", str(home / "build"), "-DCMAKE_BUILD_TYPE=Release",
         "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
         "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF"])
    run(["cmake", "--build", str(home / "build"), "--config", "Release", "-j", str(os.cpu_count() or 2),
         "--target", "llama-bench", "llama-quantize"])
    return bins


def model_files(bins: Path, q41: Path) -> dict[str, Path]:
    """The default model's GGUF per llama.cpp file type: its own Q4_1 file, and F32 and BF16 requantized from it."""
    files = {"Q4_1": q41}
    folder = cache_dir() / "llama.cpp" / "models"
    folder.mkdir(parents=True, exist_ok=True)
    for ftype in ("F32", "BF16"):
        out = folder / f"{q41.stem}.{ftype}.gguf"
        if not out.exists():
            tmp = out.with_suffix(".tmp")
            run([str(bins / "llama-quantize"), "--allow-requantize", str(q41), str(tmp), ftype])
            tmp.rename(out)
        files[ftype] = out
    return files


def llama_bench(bins: Path, path: Path, depth: int, tokens: int, threads: int) -> float:
    """llama.cpp's decode tokens/s: TOKENS tokens generated after a DEPTH-token context, one repetition."""
    proc = run([str(bins / "llama-bench"), "-m", str(path), "-p", "0", "-n", str(tokens), "-d", str(depth),
                "-t", str(threads), "-r", "1", "-o", "json"])
    rows = json.loads(proc.stdout)
    return float(rows[0]["avg_ts"])


def propd_prompt(tokenizer, depth: int) -> list[int]:
    """A DEPTH-token prompt of ordinary text (no chat template), so that greedy decoding runs on rather than ending."""
    text = ("The history of the Roman Empire spans many centuries, from the founding of the city to the fall of "
            "Constantinople. ") * (depth // 8 + 4)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:depth]
    if len(ids) < depth:
        sys.exit(f"llama_cpp.py: could not build a {depth}-token prompt")
    return ids


def propd_decode(decoder, prompt: list[int], tokens: int) -> float:
    """propd's decode tokens/s: tokens the steps produced over the steps' time (the prefill left out, as llama-bench
    leaves the context's out)."""
    r = decoder.generate_ids([prompt], max_new_tokens=tokens + 1)
    steps = sum(sum(s.accepted) for s in r.stats)
    return steps / sum(s.step_time_s for s in r.stats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llama-bin", default=None, help="a llama.cpp bin/ directory (default: build it once)")
    ap.add_argument("--llama-cpp-version", default=None, help=f"the {SDIST} sdist to build (default: the newest)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--depth", type=int, default=300, help="context tokens before the timed ones")
    ap.add_argument("--tokens", type=int, default=64, help="tokens timed per round")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--dtypes", default=",".join(PRECISIONS), help="propd dtypes (and their llama.cpp file types)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bins = Path(args.llama_bin) if args.llama_bin else build_llama_cpp(args.llama_cpp_version)
    files = model_files(bins, fetch_known_gguf(MODEL))
    dtypes = args.dtypes.split(",")
    decoders = {}
    from propd.decoder import Decoder

    for dt in dtypes:
        decoders[dt] = Decoder(load_model(MODEL, dtype=dt), preset="ar", threads=args.threads)  # as llama-bench -t
    prompt = propd_prompt(decoders[dtypes[0]].model.tokenizer, args.depth)
    for dt in dtypes:  # warm-up: the extension's first calls, llama.cpp's page cache
        propd_decode(decoders[dt], prompt, 4)
        llama_bench(bins, files[PRECISIONS[dt]], args.depth, 4, args.threads)
    rates: dict[tuple[str, str], list[float]] = {}
    for rnd in range(args.rounds):
        for dt in dtypes:
            ft = PRECISIONS[dt]
            rates.setdefault(("llama.cpp", ft), []).append(llama_bench(bins, files[ft], args.depth, args.tokens,
                                                                        args.threads))
            rates.setdefault(("propd", dt), []).append(propd_decode(decoders[dt], prompt, args.tokens))
        print(f"round {rnd + 1}/{args.rounds} done", file=sys.stderr)
    print(f"decode tokens/s, median of {args.rounds} rounds: {args.tokens} tokens after a {args.depth}-token context, "
          f"batch 1, {args.threads} threads")
    print(f"{'precision':18s} {'llama.cpp':>10s} {'propd ar':>10s} {'ratio':>7s}  per-round ratios: median (range)")
    for dt in dtypes:
        ft = PRECISIONS[dt]
        lcs, prs = rates[("llama.cpp", ft)], rates[("propd", dt)]
        lc, pr = statistics.median(lcs), statistics.median(prs)
        ratios = [p / c for p, c in zip(prs, lcs)]  # each round's pair ran back to back
        print(f"{ft + ' / ' + dt:18s} {lc:10.1f} {pr:10.1f} {pr / lc:6.2f}x  {statistics.median(ratios):.2f}x "
              f"({min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    with torch.inference_mode():
        main()
