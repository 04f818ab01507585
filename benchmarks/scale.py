"""Scale benchmark: artifact export and load time against safetensors, on 23M and 110M models.

Random-initialized Hugging Face ``BertModel``s built from configs (no download): BERT-base
(``BertConfig()``, ~110M parameters) and a 6-layer, 384-wide one (~23M, MiniLM-L6 size). For
each, side by side in one process: ``safetensors.torch.save_file`` / ``load_file`` of the model's
state dict against ``export`` / ``load`` (sha256-verified, bit-exact, architecture rebuilt
and weights loaded) of the fp32 teacher and of a 4-bit, 50%-sparse plan on every Linear layer
(``compress.apply`` without fine-tune). Each timing is the best of ``--repeats`` runs.

    python benchmarks/scale.py             # both models, writes docs/benchmarks.md
    python benchmarks/scale.py --quick     # the 23M model only, prints, writes nothing
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _md import table, write_section  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from torch import nn  # noqa: E402

from autocompress.artifacts import export, load  # noqa: E402
from autocompress.compress import apply  # noqa: E402
from autocompress.spaces import Plan  # noqa: E402

COLUMNS = [
    "model",
    "params",
    "artifact",
    "safetensors MB",
    "artifact MB",
    "save_file s",
    "export s",
    "export / save_file",
    "export / save_file (CPU s)",
    "load_file s",
    "load_file + load_state_dict s",
    "load s",
    "load / (load_file + load_state_dict)",
    "load / (...) (CPU s)",
]


def configs() -> dict[str, object]:
    from transformers import BertConfig

    small = BertConfig(
        hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536
    )
    return {"bert-6x384": small, "bert-base": BertConfig()}


def best_of(repeats: int, fn) -> tuple[float, float]:  # noqa: ANN001
    """Best wall and best CPU (process time, all threads) seconds of ``repeats`` calls."""
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return min(wall), min(cpu)


def measure(name: str, label: str, model: nn.Module, plan: Plan, cfg, tmp: Path, repeats: int):  # noqa: ANN001, ANN201
    from transformers import BertModel

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    st_path = tmp / f"{name}-{label}.safetensors"
    art_path = tmp / f"{name}-{label}"
    skeleton = BertModel(cfg).eval()
    save = best_of(repeats, lambda: save_file(state, st_path))
    read = best_of(repeats, lambda: load_file(st_path))  # lazy: tensors map the file
    read_in = best_of(repeats, lambda: skeleton.load_state_dict(load_file(st_path)))
    arts = []
    exp = best_of(repeats, lambda: arts.append(export(model, plan, art_path)))
    loaded = []
    ld = best_of(repeats, lambda: loaded.append(load(art_path, model=skeleton)))
    back = loaded[-1].state_dict()
    if not all(torch.equal(back[k], v) for k, v in state.items()):
        raise SystemExit(f"{name} {label}: loaded weights differ from the exported ones")
    params = sum(t.numel() for t in state.values())
    return {
        "model": name,
        "params": f"{params / 1e6:.1f}M",
        "artifact": label,
        "safetensors MB": f"{st_path.stat().st_size / 1e6:.1f}",
        "artifact MB": f"{arts[-1].size_bytes / 1e6:.1f}",
        "save_file s": f"{save[0]:.2f}",
        "export s": f"{exp[0]:.2f}",
        "export / save_file": f"{exp[0] / save[0]:.1f}x",
        "export / save_file (CPU s)": f"{exp[1] / max(save[1], 1e-3):.1f}x",
        "load_file s": f"{read[0]:.2f}",
        "load_file + load_state_dict s": f"{read_in[0]:.2f}",
        "load s": f"{ld[0]:.2f}",
        "load / (load_file + load_state_dict)": f"{ld[0] / read_in[0]:.1f}x",
        "load / (...) (CPU s)": f"{ld[1] / max(read_in[1], 1e-3):.1f}x",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="23M model only; write nothing")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    from transformers import BertModel

    rows = []
    load_avg = f"{os.getloadavg()[0]:.1f}"
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for name, cfg in configs().items():
            if args.quick and name != "bert-6x384":
                continue
            torch.manual_seed(0)
            model = BertModel(cfg).eval()
            rows.append(measure(name, "fp32", model, Plan(), cfg, tmp, args.repeats))
            print(rows[-1], flush=True)
            linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
            plan = Plan.uniform(linears, sparsity=0.5, bits=4)
            small = apply(model, plan)
            rows.append(measure(name, "4-bit 50% sparse", small, plan, cfg, tmp, args.repeats))
            print(rows[-1], flush=True)
            del model, small
    text = table(rows, COLUMNS)
    print(text)
    if args.quick:
        return
    body = (
        "Random-initialized `transformers` `BertModel`s from configs: `bert-base` is "
        "`BertConfig()`, `bert-6x384` has 6 layers of width 384 (MiniLM-L6 size). "
        "`save_file`/`load_file` are safetensors' on the model's state dict (no hashing, "
        "no fsync; `load_file` maps the file lazily, so `load_file + load_state_dict` into the "
        "architecture is the comparable load); `export` writes the artifact (encoding choice, "
        "zstd, sha256, atomic fsync'd writes) and `load` verifies sizes and sha256, decodes "
        "bit-exact weights, copies the `model=` architecture and loads them. CPU columns "
        "compare process time (all threads), which other jobs on the machine disturb less "
        "than wall time. The 4-bit row is "
        "`Plan.uniform(<every Linear>, sparsity=0.5, bits=4)` applied without fine-tune "
        "(embeddings stay fp32); its safetensors columns save the same (baked, fp32) tensors. "
        f"Best of {args.repeats} runs each, measured side by side in one run; load average "
        f"{load_avg} at the start (other jobs shared the 2 cores, so wall times are noisy).\n\n"
        + text
    )
    write_section(
        "scale",
        "Scale: artifact export and load vs safetensors",
        "python benchmarks/scale.py",
        body,
    )


if __name__ == "__main__":
    main()
