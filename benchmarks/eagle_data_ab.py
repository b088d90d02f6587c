"""Does more of the model's own text lift the EAGLE drafter on prompts it never saw? (docs/heads.md, "More text from
the same prompts"; docs/lab/2026-12-05-attention-sizer.md.)

Three small drafters, each ``train_eagle`` on awesome-chatgpt prompts only (64-token answers, 6 epochs, seed 0), in
OUT/A, OUT/F, OUT/C:

* A: the first 320 prompts;
* F: the same 320, plus one follow-up conversation each: the prompt, its first answer, one of ``FOLLOW_UPS`` (the
  i-th prompt gets number i mod 8), then the model's own answer to it. The turn is appended to the first answer's
  token ids (ChatML markers, as the default model's template writes them), which is what was measured;
  ``train-heads --follow-ups`` builds the same conversation through the chat template instead;
* C: the first 640 prompts.

Then the accepted tokens per step of a 4-node ``eagle`` tree (depth 4, top-k 4, float32, 64 new tokens) on the first
10 vicuna-bench and 10 Alpaca prompts of ``train/``, which none of the three trained on. Timing-free. About 45 minutes
on 2 CPU cores; each stage resumes from its cache.

    python benchmarks/eagle_data_ab.py OUT
"""

import json
import shutil
import sys
from pathlib import Path

import propd.training.eagle as te
from propd.decoder import Decoder
from propd.models.loading import load_model
from propd.strategies.eagle import EagleConfig, EagleProposer
from propd.training.data import FOLLOW_UPS, find_train_dir
from propd.training.eagle import EagleTrainConfig, train_eagle


def awesome_only(root: Path) -> Path:
    """A training data folder under ``root`` holding the awesome-chatgpt prompts alone."""
    awesome = root / "train_awesome"
    if not awesome.is_dir():
        shutil.copytree(find_train_dir() / "awesome_chatgpt_prompts", awesome / "awesome_chatgpt_prompts")
    return awesome


def unseen_prompts() -> list[str]:
    """The first 10 vicuna-bench and 10 Alpaca prompts of ``train/``, which the awesome-only drafters never saw."""
    prompts = []
    for src in ("vicuna_bench", "eagle_alpaca"):
        lines = (find_train_dir() / src / "question.jsonl").read_text().splitlines()
        prompts += [json.loads(line)["turns"][0] for line in lines[:10]]
    return prompts


def accepted_per_step(lm, prompts: list[str], n: int, max_new: int) -> tuple[float, int]:
    """Mean accepted tokens per step of an ``n``-node ``eagle`` tree (depth n - 1, top-k 4) with ``lm``'s drafter,
    over ``prompts`` at batch 1, and the number of steps."""
    dec = Decoder(lm, preset=None, sizer=f"static:tree=budget:{n}:{n - 1}",
                  proposer=EagleProposer(EagleConfig(top_k=4, depth=4)))
    acc = [s.accepted[0] for p in prompts for s in dec.generate([p], max_new_tokens=max_new).stats]
    return sum(acc) / len(acc), len(acc)


def start_from(root: Path, base: str, name: str) -> None:
    """Give run ``name`` the answers and hidden states of run ``base`` (both in ``root``) to resume from."""
    work = root / name / "work"
    if not (work / "answers.jsonl").exists():
        shutil.copytree(root / base / "work" / "hidden", work / "hidden")
        shutil.copy(root / base / "work" / "answers.jsonl", work / "answers.jsonl")


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "out/eagle-data-ab")
    common = dict(model="smollm2-135m-instruct", data=str(awesome_only(root)), max_new_tokens=64, epochs=6, seed=0)
    train_eagle(EagleTrainConfig(out=str(root / "A"), max_prompts=320, **common))
    first = [json.loads(line) for line in (root / "A" / "work" / "answers.jsonl").read_text().splitlines()]


    def with_follow_ups(model, cfg, observers=(), base=te.training_prompt_ids):
        decoder, ids = base(model, cfg, observers)
        tok = model.tokenizer
        end = tok.convert_tokens_to_ids("<|im_end|>")
        extra = []
        for i, (p, a) in enumerate(zip(ids, first)):
            turn = tok(("\n" if a and a[-1] == end else "<|im_end|>\n") + "<|im_start|>user\n"
                       + FOLLOW_UPS[i % len(FOLLOW_UPS)] + "<|im_end|>\n<|im_start|>assistant\n",
                       add_special_tokens=False)["input_ids"]
            extra.append(p + a + turn)
        return decoder, ids + extra

    for name in ("F", "C"):  # both start from A's answers and hidden states
        start_from(root, "A", name)
    te.training_prompt_ids = with_follow_ups
    train_eagle(EagleTrainConfig(out=str(root / "F"), max_prompts=320, **common))
    te.training_prompt_ids = with_follow_ups.__defaults__[-1]
    train_eagle(EagleTrainConfig(out=str(root / "C"), max_prompts=640, **common))

    prompts = unseen_prompts()
    lm = load_model("smollm2-135m-instruct", dtype="float32")
    for name in ("A", "F", "C"):
        lm.load_drafter(root / name)
        rate, steps = accepted_per_step(lm, prompts, 4, 64)
        print(f"{name}: {rate:.3f} accepted tokens per step over {steps} steps", flush=True)


if __name__ == "__main__":
    main()
