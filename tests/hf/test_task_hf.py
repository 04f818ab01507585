"""Task.from_hf: raw transformers models (random init, tiny configs) as they come, no wrapper."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from autocompress import (
    AutocompressError,
    CompressionSpace,
    FinetuneSettings,
    LayerPlan,
    Plan,
    Task,
    compress,
    export,
    load,
)

transformers = pytest.importorskip("transformers")
ONE_EPOCH = FinetuneSettings(epochs=1, batch_size=16)


def _padded(n: int, seed: int, vocab: int = 100, length: int = 12) -> dict[str, torch.Tensor]:
    """A tokenizer-style batch: right-padded ids, attention mask, token types, labels."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, length + 1, (n,), generator=g)
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    ids = torch.randint(1, vocab, (n, length), generator=g) * mask
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "token_type_ids": torch.zeros_like(ids),
        "labels": ids[:, 0] % 2,
    }


def _examples(n: int, seed: int) -> list[dict]:
    """HF-datasets style rows: unpadded lists, a 'label' column and one the model does not take."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        k = int(torch.randint(3, 11, (1,), generator=g))
        ids = torch.randint(1, 100, (k,), generator=g).tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * k, "label": ids[0] % 2, "idx": i})
    return rows


def _bert(**kw) -> torch.nn.Module:
    cfg = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
        **kw,
    )
    return transformers.BertForSequenceClassification(cfg).eval()


def test_bert_with_mask_and_labels_compresses_exports_and_reloads(tmp_path: Path) -> None:
    bert = _bert()
    task = Task.from_hf(bert, _padded(64, 0), _padded(32, 1), _padded(32, 2))
    assert task.kind == "classification" and task.metric_name == "accuracy"
    x = task.example_input(8)
    assert sorted(x) == ["attention_mask", "input_ids", "token_type_ids"]
    space = CompressionSpace.from_model(bert)
    plan = space.validate(Plan.uniform(space.layer_names, sparsity=0.5, bits=8, finetune=ONE_EPOCH))
    small = compress.apply(bert, plan, task)
    assert isinstance(small, type(bert))  # the model as it came, no wrapper
    w = small.bert.encoder.layer[0].intermediate.dense.weight
    assert float((w == 0).float().mean()) >= 0.5
    art = export(small, plan, tmp_path / "bert")
    again = load(art.path, model=task.build_model(), example_input=task.example_input())
    with torch.no_grad():
        assert torch.equal(small(**x).logits, again(**x).logits)
    assert task.evaluate(again, "test") == task.evaluate(small, "test")
    # the mask matters: padding changes the answer, so it really reached the model
    with torch.no_grad():
        unmasked = small(input_ids=x["input_ids"]).logits
    assert not torch.allclose(unmasked, small(**x).logits)


def test_distilbert_from_example_rows_drops_foreign_columns() -> None:
    cfg = transformers.DistilBertConfig(
        vocab_size=100, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=32
    )
    model = transformers.DistilBertForSequenceClassification(cfg).eval()
    task = Task.from_hf(model, _examples(48, 0), _examples(24, 1), _examples(24, 2))
    x = task.example_input(4)
    assert sorted(x) == ["attention_mask", "input_ids"]  # 'idx' dropped, 'label' is the target
    assert x["input_ids"].shape[1] == 10  # padded to the split's longest row
    _, y = task.outputs(model, "val")
    assert y.shape == (24,)
    plan = Plan.uniform(["distilbert.transformer.layer.0.ffn.lin1"], bits=4, finetune=ONE_EPOCH)
    small = compress.apply(model, plan, task)
    assert 0.0 <= task.evaluate(small, "val")["accuracy"] <= 1.0


def test_gpt2_encoder_as_embedding_task_from_dataloaders(tmp_path: Path) -> None:
    cfg = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=32)
    model = transformers.GPT2Model(cfg).eval()
    g = torch.Generator().manual_seed(0)

    def loader(n: int, shuffle: bool) -> DataLoader:
        rows = [{"input_ids": r} for r in torch.randint(1, 100, (n, 10), generator=g)]
        gen = torch.Generator().manual_seed(0) if shuffle else None
        return DataLoader(rows, batch_size=8, shuffle=shuffle, generator=gen)

    task = Task.from_hf(model, loader(32, True), loader(16, False), loader(16, False))
    assert task.kind == "embedding" and task.metric_name == "cosine"
    assert task.evaluate(model, "val") == {"cosine": pytest.approx(1.0)}
    assert task.predict(model, "val").shape == (16, 10, 32)  # last_hidden_state, unlabeled
    plan = Plan(
        {"wte": LayerPlan(bits=8), "h.0.mlp.c_fc": LayerPlan(sparsity=0.5)},
        finetune=FinetuneSettings(epochs=1, batch_size=8),
    )
    small = compress.apply(model, plan, task)
    cos = task.evaluate(small, "val")["cosine"]
    assert 0.5 < cos < 1.0
    art = export(small, plan, tmp_path / "gpt2")
    again = load(art.path, model=task.build_model(), example_input=task.example_input())
    x = task.example_input(4)
    with torch.no_grad():
        assert torch.equal(small(**x).last_hidden_state, again(**x).last_hidden_state)


def test_kind_from_the_model_class_and_build_model_from_config() -> None:
    reg = _bert(num_labels=1)
    task = Task.from_hf(reg, _padded(8, 0), _padded(8, 1), _padded(8, 2))
    assert task.kind == "regression" and task.metric_name == "neg_mse"
    fresh = task.build_model()
    assert type(fresh) is type(reg) and fresh is not task.teacher()
    assert fresh.config.to_dict() == reg.config.to_dict()


def test_missing_transformers_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    bert = _bert()
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(AutocompressError, match=r'pip install "autocompress\[hf\]"'):
        Task.from_hf(bert, _padded(4, 0), _padded(4, 1), _padded(4, 2))


def test_not_a_transformers_model_or_not_tokenized_data_is_refused() -> None:
    with pytest.raises(AutocompressError, match="Task.from_module"):
        Task.from_hf(torch.nn.Linear(2, 2), {}, {}, {})
    with pytest.raises(AutocompressError, match="not tokenized data"):
        Task.from_hf(_bert(), 3, _padded(4, 1), _padded(4, 2))


def test_docs_recipe_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first python snippet of docs/huggingface.md runs as written."""
    import re

    doc = Path(__file__).resolve().parents[2] / "docs" / "huggingface.md"
    code = re.search(r"```python\n(.*?)```", doc.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(doc), "exec"), {"__name__": "docs_recipe"})
    assert (tmp_path / "bert-artifact" / "manifest.json").exists()


def test_dict_of_lists_and_indexable_rows_are_padded_like_a_collator() -> None:
    """A tokenizer's BatchEncoding without return_tensors, and a datasets.Dataset-like table."""
    rows = _examples(6, 0)

    class Table:  # what datasets.Dataset offers: len() and row dicts by index, not a list
        def __len__(self) -> int:
            return len(rows)

        def __getitem__(self, i: int) -> dict:
            return rows[i]

    enc = transformers.BatchEncoding(
        {"input_ids": [r["input_ids"] for r in rows], "labels": [r["label"] for r in rows]}
    )
    model = _bert(pad_token_id=7)
    task = Task.from_hf(model, enc, Table(), Table())
    ids = task.data("train").tensors["input_ids"]
    longest = max(len(r["input_ids"]) for r in rows)
    assert ids.shape == (6, longest)
    short = min(range(6), key=lambda i: len(rows[i]["input_ids"]))
    assert ids[short, -1] == 7  # padded with the config's pad_token_id
    val = task.data("val").tensors
    assert sorted(val) == ["attention_mask", "input_ids", "label"]
    assert val["attention_mask"][short, -1] == 0


def test_causal_lm_labels_are_shifted_like_hugging_face_does() -> None:
    from autocompress.tasks._train import task_loss

    cfg = transformers.GPT2Config(vocab_size=60, n_embd=32, n_layer=1, n_head=4, n_positions=16)
    lm = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 60, (24, 10), generator=torch.Generator().manual_seed(0))
    data = {"input_ids": ids, "labels": ids.clone()}
    task = Task.from_hf(lm, data, data, data)
    assert task.kind == "classification" and task.shift_labels
    inputs, y = task.split(data)
    with torch.no_grad():
        ours = task_loss(task, lm(**inputs).logits, y)
        theirs = lm(input_ids=ids, labels=ids).loss
    assert torch.allclose(ours, theirs, atol=1e-5)
    plan = Plan.uniform(["transformer.h.0.mlp.c_fc"], sparsity=0.5, finetune=ONE_EPOCH)
    small = compress.apply(lm, plan, task)
    assert 0.0 <= task.evaluate(small, "val")["accuracy"] <= 1.0


def test_heads_plan_applies_and_round_trips_through_the_artifact(tmp_path) -> None:
    """Plan.heads reaches the engine (restructure) and the loader rebuilds the same shapes."""
    from autocompress import Plan, compress, export, load
    from autocompress._zoo import ZOO, zoo_inputs
    from autocompress.spaces._plan import FinetuneSettings

    model = ZOO["bert"].build()
    x = zoo_inputs("bert", 16)
    data = {**x, "labels": x["input_ids"][:, 0] % 3}
    task = Task.from_hf(model, data, data, data)
    plan = Plan(width=1.0, heads=0.5, finetune=FinetuneSettings(epochs=1, batch_size=8))
    small = compress.apply(model, plan, task)
    attn = small.bert.encoder.layer[0].attention.self
    assert attn.query.out_features == model.config.hidden_size // 2  # 2 of 4 heads
    assert small.bert.encoder.layer[0].intermediate.dense.out_features == 128  # FFN whole
    back = load(
        export(small, plan, tmp_path / "a").path,
        model=task.build_model(),
        example_input=task.example_input(),
    )
    assert torch.equal(small(**x).logits, back(**x).logits)
