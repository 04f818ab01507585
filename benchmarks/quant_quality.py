"""4-bit quantization quality on the pretrained all-MiniLM-L6-v2, no fine-tune.

    HF_HUB_OFFLINE=1 python benchmarks/quant_quality.py            # writes docs/benchmarks.md
    HF_HUB_OFFLINE=1 python benchmarks/quant_quality.py --no-write --test 64 --quick

Every plan goes through ``compress.apply`` as a user would run it (``calibration="gptq"`` reads
the first ``CALIBRATION_SAMPLES`` sentences of the built-in ``minilm`` task's *train* split);
scores are on its *test* split, disjoint from the calibration sentences: mean and minimum cosine
of the compressed model's sentence embeddings to the teacher's, recall@1 of each sentence's
own teacher embedding, and the real artifact bytes (``export(...).size_bytes``). Compared side
by side, in one run: every Linear at 4 bits per output channel (round to nearest) against
group-wise scales (128/64/32 weights per scale) and against GPTQ (groups of 128/64); the
word embedding at 4 bits per row against groups of 32; the two combined; and the word embedding
split into hot and cold rows (``hot_rows=0.1, hot_bits=4``: the 10% of rows the train split
looks up most at 4 bits, every other row at 2 or 3 bits, groups of 64, clipped scales), alone
and with every Linear 4-bit g64 GPTQ.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _md import table, write_section  # noqa: E402

from autocompress.artifacts import export  # noqa: E402
from autocompress.compress import apply  # noqa: E402
from autocompress.compress._gptq import CALIBRATION_SAMPLES  # noqa: E402
from autocompress.spaces import CompressionSpace, FinetuneSettings, LayerPlan, Plan  # noqa: E402

EMBED = "embeddings.word_embeddings"
HOT = {"hot_rows": 0.1, "hot_bits": 4}
"""The hot tier of the tiered word-embedding rows: 10% of the rows at 4 bits."""


def plans(linears: list[str], quick: bool) -> list[tuple[str, Plan]]:
    """The compared plans: (label, plan), all without fine-tune."""
    ft = FinetuneSettings(epochs=0)

    def mk(lin: LayerPlan | None, emb: LayerPlan | None, cal: str = "none") -> Plan:
        layers = {n: lin for n in linears} if lin else {}
        if emb:
            layers[EMBED] = emb
        return Plan(layers=layers, finetune=ft, calibration=cal)

    out = [
        ("Linear 4-bit per channel, RTN", mk(LayerPlan(bits=4), None)),
        ("Linear 4-bit g128, RTN", mk(LayerPlan(bits=4, group=128), None)),
        ("Linear 4-bit g64, RTN", mk(LayerPlan(bits=4, group=64), None)),
        ("Linear 4-bit g32, RTN", mk(LayerPlan(bits=4, group=32), None)),
        ("Linear 4-bit g128, GPTQ", mk(LayerPlan(bits=4, group=128), None, "gptq")),
        ("Linear 4-bit g64, GPTQ", mk(LayerPlan(bits=4, group=64), None, "gptq")),
        ("word embedding 4-bit per row", mk(None, LayerPlan(bits=4))),
        ("word embedding 4-bit g32", mk(None, LayerPlan(bits=4, group=32))),
        (
            "Linear 4-bit g64 GPTQ + embedding 4-bit g32",
            mk(LayerPlan(bits=4, group=64), LayerPlan(bits=4, group=32), "gptq"),
        ),
        (
            "Linear 8-bit + embedding 4-bit per row (hand plan of issue 13)",
            mk(LayerPlan(bits=8), LayerPlan(bits=4)),
        ),
        # calibration "gptq" here: the embedding's scales are clipped (no Linear is quantized)
        ("word embedding 3-bit g64, clipped", mk(None, LayerPlan(bits=3, group=64), "gptq")),
        (
            "word embedding tiered: hot 10% 4-bit + cold 2-bit g64",
            mk(None, LayerPlan(bits=2, group=64, **HOT), "gptq"),
        ),
        (
            "word embedding tiered: hot 10% 4-bit + cold 3-bit g64",
            mk(None, LayerPlan(bits=3, group=64, **HOT), "gptq"),
        ),
        (
            "Linear 4-bit g64 GPTQ + embedding tiered (hot 10% 4-bit + cold 2-bit g64)",
            mk(LayerPlan(bits=4, group=64), LayerPlan(bits=2, group=64, **HOT), "gptq"),
        ),
    ]
    return out[:2] + out[4:5] + out[11:12] if quick else out


def scores(task, model, teacher_out: torch.Tensor, split: str) -> dict[str, float]:
    out = task.predict(model, split)
    cos = torch.nn.functional.cosine_similarity(out, teacher_out, dim=1)
    sim = (
        torch.nn.functional.normalize(out, dim=1)
        @ torch.nn.functional.normalize(teacher_out, dim=1).T
    )
    recall = float((sim.argmax(dim=1) == torch.arange(len(out))).float().mean())
    return {"mean": float(cos.mean()), "min": float(cos.min()), "recall": recall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--test", type=int, default=300, help="test sentences scored")
    ap.add_argument("--quick", action="store_true", help="four plans only (a smoke run)")
    ap.add_argument("--no-write", action="store_true", help="print, do not write the doc")
    args = ap.parse_args()
    from autocompress.tasks._minilm import minilm

    task = minilm(test_size=args.test)
    teacher = task.teacher()
    teacher_out = task.predict(teacher, "test")
    space = CompressionSpace.from_model(teacher)
    linears = [layer.name for layer in space.layers if layer.kind == "Linear"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, plan) in enumerate(plans(linears, args.quick)):
            t0 = time.perf_counter()
            model = apply(teacher, plan, task)
            secs = time.perf_counter() - t0
            s = scores(task, model, teacher_out, "test")
            size = export(model, plan, Path(tmp) / str(i)).size_bytes
            rows.append(
                {
                    "plan": label,
                    "mean cosine": f"{s['mean']:.4f}",
                    "min cosine": f"{s['min']:.4f}",
                    "recall@1": f"{s['recall']:.3f}",
                    "MB": f"{size / 1e6:.2f}",
                    "apply s": f"{secs:.1f}",
                }
            )
            print(rows[-1], flush=True)
    cols = ["plan", "mean cosine", "min cosine", "recall@1", "MB", "apply s"]
    body = (
        f"Pretrained all-MiniLM-L6-v2 ({len(linears)} Linear layers + the 30522x384 word "
        f"embedding), no fine-tune. Scores on the `minilm` task's {len(teacher_out)} test "
        f"sentences against the fp32 teacher; GPTQ calibrates on the first "
        f"{CALIBRATION_SAMPLES} *train* sentences (disjoint). Layers not named stay fp32. "
        "`MB` is the artifact's real `size_bytes`; `apply s` the wall time of "
        "`compress.apply` (GPTQ included).\n\n" + table(rows, cols)
    )
    print(body)
    if not args.no_write:
        write_section(
            "quant_quality",
            "4-bit quantization on a pretrained transformer: group-wise scales and GPTQ",
            "HF_HUB_OFFLINE=1 python benchmarks/quant_quality.py",
            body,
        )


if __name__ == "__main__":
    main()
