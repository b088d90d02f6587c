"""Are requests the model writes itself (``train-heads --kind eagle --self-prompts N``, Magpie) worth real prompts to
the EAGLE drafter? (docs/heads.md, "Requests the model writes itself".)

Three small drafters, each ``train_eagle`` on awesome-chatgpt prompts only (64-token answers, 6 epochs, seed 0), in
OUT/A, OUT/M, OUT/C:

* A: the first 320 prompts;
* M: the same 320, plus 320 requests the model wrote itself (``self_prompts=320``), with its answers;
* C: the first 640 prompts;
* with ``--scale``, M4: the same 320, plus 1,280 self-written requests (M's 320 among them).

Then the accepted tokens per step of 3- and 4-node ``eagle`` trees (depth 4, top-k 4, float32, 64 new tokens) on the
first 10 vicuna-bench and 10 Alpaca prompts of ``train/``, which none of the three trained on, and the validation
accuracies of each run's report. Timing-free. M and C resume A's answers and hidden states; each stage resumes from
its cache.

    python benchmarks/eagle_self_prompts_ab.py OUT [--skip-c] [--scale]
"""

import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from eagle_data_ab import accepted_per_step, awesome_only, start_from, unseen_prompts  # noqa: E402

from propd.models.loading import load_model  # noqa: E402
from propd.training.eagle import EagleTrainConfig, train_eagle  # noqa: E402


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    root = Path(args[0] if args else "out/eagle-self-prompts-ab")
    runs = {"A": {"max_prompts": 320}, "M": {"max_prompts": 320, "self_prompts": 320}}
    if "--skip-c" not in sys.argv:
        runs["C"] = {"max_prompts": 640}
    if "--scale" in sys.argv:
        runs["M4"] = {"max_prompts": 320, "self_prompts": 1280}
    common = dict(model="smollm2-135m-instruct", data=str(awesome_only(root)), max_new_tokens=64, epochs=6, seed=0)
    for name, extra in runs.items():
        if name != "A":  # M4 from M: A's answers, and the hidden states of both
            start_from(root, "M" if name == "M4" else "A", name)
        if name == "M4":  # and M's self-written requests and answers
            for f in (root / "M" / "work").glob("*self_prompt*"):
                if not (root / name / "work" / f.name).exists():
                    (shutil.copytree if f.is_dir() else shutil.copy)(f, root / name / "work" / f.name)
        train_eagle(EagleTrainConfig(out=str(root / name), **extra, **common))

    prompts = unseen_prompts()
    lm = load_model("smollm2-135m-instruct", dtype="float32")
    for name in runs:
        report = json.loads((root / name / "report.json").read_text())
        v = report["validation"]
        lm.load_drafter(root / name)
        rates = [f"N={n}: {accepted_per_step(lm, prompts, n, 64)[0]:.3f}" for n in (3, 4)]
        print(f"{name}: {report['train_sequences']} training sequences; accepted tokens per step {', '.join(rates)}; "
              f"validation top-1 {v['top1']:.3f}, second step {v.get('step2_top1', float('nan')):.3f}", flush=True)


if __name__ == "__main__":
    main()
