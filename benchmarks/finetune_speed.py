"""Fine-tune throughput: the engine's distillation loop vs a plain hand-written PyTorch loop.

    python benchmarks/finetune_speed.py            # 3 interleaved repeats per row (~1-2 min)
    python benchmarks/finetune_speed.py --quick    # 1 repeat, smaller data

Same process, same model (a small BERT-ish ``BertForSequenceClassification`` built from a
config, random init: no download), same data (padded ``input_ids`` + ``attention_mask`` +
``labels``), same batch size, optimizer, schedule and loss (``alpha * T^2 * KL + (1 - alpha) *
CE``), the same validation pass after every epoch and the best weights kept. Rows:

* **in memory**: a dict of tensors; both loops compute the teacher's logits on the train split
  once and index them per shuffled batch.
* **DataLoader**: the splits are ``DataLoader``s; both loops run the teacher per batch under
  ``no_grad``.

The engine side is ``autocompress.compress.distill`` on a ``Task.from_hf`` task. Each loop runs
on a fresh copy of the teacher, interleaved (engine, hand, engine, hand, ...), one torch thread;
the printed ratio is engine samples/s over hand-written samples/s (medians), target >= 0.9.
Samples/s are given by wall clock and by the process's CPU time: on a shared, loaded machine the
wall clock mostly measures the wait for a core, so the CPU-time ratio is the one to read there.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from autocompress import FinetuneSettings, Task  # noqa: E402
from autocompress.compress import distill  # noqa: E402
from autocompress.tasks import DictDataset  # noqa: E402


def make_model() -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(
        vocab_size=1000,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=64,
        num_labels=4,
    )
    torch.manual_seed(0)
    return BertForSequenceClassification(cfg).eval()


def make_split(n: int, seed: int, length: int = 32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, length + 1, (n,), generator=g)
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    ids = torch.randint(1, 1000, (n, length), generator=g) * mask
    return {"input_ids": ids, "attention_mask": mask, "labels": ids[:, 1] % 4}


def hand_loop(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    train: dict[str, torch.Tensor] | DataLoader,
    val: dict[str, torch.Tensor] | DataLoader,
    s: FinetuneSettings,
) -> None:
    """What a practitioner writes: Adam + cosine, KD + CE, val accuracy per epoch, best kept."""
    t = s.temperature
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(student.parameters(), lr=s.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=s.epochs)

    def batches(data, shuffle: bool):
        if isinstance(data, DataLoader):
            yield from data
            return
        n = len(data["labels"])
        order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
        for i in range(0, n, s.batch_size):
            idx = order[i : i + s.batch_size]
            yield {k: v[idx] for k, v in data.items()} | {"_idx": idx}

    soft = None
    if not isinstance(train, DataLoader):
        with torch.no_grad():
            soft = torch.cat(
                [
                    teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                    for b in batches(train, False)
                ]
            )
    best, best_state = -math.inf, None
    for _ in range(s.epochs):
        student.train()
        for b in batches(train, True):
            x = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
            if soft is not None:
                t_logits = soft[b["_idx"]]
            else:
                with torch.no_grad():
                    t_logits = teacher(**x).logits
            out = student(**x).logits
            kd = F.kl_div(
                F.log_softmax(out / t, 1), F.softmax(t_logits / t, 1), reduction="batchmean"
            )
            loss = s.alpha * kd * t * t + (1 - s.alpha) * F.cross_entropy(out, b["labels"])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        student.eval()
        with torch.no_grad():
            hits = [
                (
                    student(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
                    .logits.argmax(1)
                    .eq(b["labels"])
                )
                for b in batches(val, False)
            ]
        acc = float(torch.cat(hits).float().mean())
        if acc > best:
            best, best_state = acc, {k: v.clone() for k, v in student.state_dict().items()}
    student.load_state_dict(best_state)


def measure(teacher, task, train, val, s: FinetuneSettings, n: int, repeats: int) -> dict:
    """Median samples/s of each loop, by wall clock and by this process's CPU time."""
    rates: dict[str, list[float]] = {k: [] for k in ("engine", "hand", "engine_cpu", "hand_cpu")}
    for _ in range(repeats):
        for who in ("engine", "hand"):
            student = copy.deepcopy(teacher)
            torch.manual_seed(0)
            t0, c0 = time.perf_counter(), time.process_time()
            if who == "engine":
                distill(student, teacher, task, s)
            else:
                hand_loop(student, teacher, train, val, s)
            rates[who].append(s.epochs * n / (time.perf_counter() - t0))
            rates[f"{who}_cpu"].append(s.epochs * n / (time.process_time() - c0))
    return {k: statistics.median(v) for k, v in rates.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 repeat, 256 training examples")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--write", action="store_true", help="write the table to docs/benchmarks.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    n, repeats = (256, 1) if args.quick else (512, 3)
    s = FinetuneSettings(epochs=2, batch_size=32, lr=1e-4, patience=10, ramp=0.0)
    teacher = make_model()
    train, val, test = make_split(n, 0), make_split(64, 1), make_split(64, 2)
    rows = []
    task = Task.from_hf(teacher, train, val, test, eval_batch_size=64)
    rows.append(("in memory", measure(teacher, task, train, val, s, n, repeats)))

    def loader(d, shuffle: bool) -> DataLoader:
        gen = torch.Generator().manual_seed(0) if shuffle else None
        bs = s.batch_size if shuffle else 64
        return DataLoader(DictDataset(d), batch_size=bs, shuffle=shuffle, generator=gen)

    tl, vl = loader(train, True), loader(val, False)
    stask = Task.from_hf(teacher, tl, vl, loader(test, False))
    rows.append(("DataLoader", measure(teacher, stask, tl, vl, s, n, repeats)))
    print(f"BERT-ish {sum(p.numel() for p in teacher.parameters()) / 1e6:.2f}M parameters, "
          f"{n} examples x {s.epochs} epochs, batch {s.batch_size}, seq 32, "
          f"{args.threads} thread(s), median of {repeats}")  # fmt: skip
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    head = ("data", "engine samples/s", "hand samples/s", "ratio", "ratio (CPU time)")
    print(f"{head[0]:<12}{head[1]:>18}{head[2]:>16}{head[3]:>8}{head[4]:>18}")
    table = []
    for name, r in rows:
        ratio, cpu = r["engine"] / r["hand"], r["engine_cpu"] / r["hand_cpu"]
        print(f"{name:<12}{r['engine']:>18.1f}{r['hand']:>16.1f}{ratio:>8.2f}{cpu:>18.2f}")
        table.append(
            {
                "data": name,
                "engine samples/s": f"{r['engine']:.1f}",
                "hand-written samples/s": f"{r['hand']:.1f}",
                "ratio (wall)": f"{ratio:.2f}",
                "ratio (CPU time)": f"{cpu:.2f}",
            }
        )
    if args.write:
        from _md import table as md_table
        from _md import write_section

        body = (
            f"BERT-ish model, {sum(p.numel() for p in teacher.parameters()) / 1e6:.2f}M "
            f"parameters, {n} examples x {s.epochs} epochs, batch {s.batch_size}, sequence 32, "
            f"{args.threads} thread(s), median of {repeats} interleaved repeats; load average "
            f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores. Ratio = engine samples/s over "
            "a plain hand-written PyTorch distillation loop on the same model and data in the same "
            "process (target >= 0.9).\n\n" + md_table(table, list(table[0]))
        )
        command = "python benchmarks/finetune_speed.py --write" + (" --quick" if args.quick else "")
        write_section(
            "finetune-speed", "Fine-tune throughput vs a hand-written loop", command, body
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
