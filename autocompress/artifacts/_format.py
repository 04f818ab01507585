"""The weights file: a safetensors file holding ONE uint8 tensor ``blob`` and a compact layout.

Every stored tensor of the state dict is one stream (see ``_encode``), the streams are concatenated
in state-dict order into ``blob``, and ``__metadata__`` holds
``{"format": "autocompress-weights/2", "layout": "<entry>;<entry>;..."}`` where each entry is
space-separated ``name shape kind enc codec nbytes [n]``:

* ``name``: state-dict key, percent-quoted (``urllib.parse.quote``, safe ``._-``).
* ``shape``: comma-separated dims, ``-`` for a scalar.
* ``kind``: how values become codes (``u4``, ``c3``, ``h16``, ``f16``, ``f32``, ``int64``...; see
  ``_kinds``).
* ``enc`` / ``codec`` / ``n``: the stream's encoding, entropy codec and entry count (``n`` is
  omitted for dense and byte-plane streams); ``nbytes``: the stream's length in ``blob``.

or ``name = target`` for a tied tensor: a state-dict key that is the very same tensor as the
earlier stored entry ``target`` (GPT-2's ``lm_head.weight`` and ``transformer.wte.weight``). Its
data is stored once; loading gives both keys one tensor (``load`` ties the parameters again).

Example entries: ``fc1.weight 300,64 u4 r8 x 2686 5512``, ``lm_head.weight = wte.weight``. One
tensor and a text layout keep the fixed overhead around 100 bytes plus ~35 bytes per tensor.

Format 1 (``autocompress-weights/1``, no ``p`` encoding, no zstd, no aliases, deflate allowed)
still loads; format 2 only adds to it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from math import prod
from typing import Any
from urllib.parse import quote, unquote

import torch

from autocompress.artifacts._encode import (
    CODECS,
    SEARCH_NUMEL,
    Stream,
    decode,
    encode_best,
    is_encoding,
    raw_size,
)
from autocompress.artifacts._kinds import aux_len, from_codes, kind_bits, to_codes
from autocompress.compress._meta import QuantRecord
from autocompress.errors import ArtifactError

WEIGHTS_FORMAT = "autocompress-weights/2"
READABLE_FORMATS = ("autocompress-weights/1", WEIGHTS_FORMAT)
_V1_CODECS = ("n", "z", "x")
MAX_NUMEL = 2**31
_MAX_HEADER = 64 << 20
_INT = re.compile(r"^(0|[1-9][0-9]{0,11})$")
_SHAPE = re.compile(r"^(-|(0|[1-9][0-9]{0,11})(,(0|[1-9][0-9]{0,11}))*)$")


@dataclass(frozen=True)
class Entry:
    """One tensor of the weights file: its name, shape, kind and stream."""

    name: str
    shape: tuple[int, ...]
    kind: str
    stream: Stream

    @property
    def numel(self) -> int:
        return prod(self.shape)


def _bad(why: str) -> ArtifactError:
    return ArtifactError(f"weights.safetensors is malformed ({why}): re-export the artifact")


def _line(e: Entry) -> str:
    shape = ",".join(map(str, e.shape)) or "-"
    s = e.stream
    tail = "" if s.enc in ("d", "p") else f" {s.n}"
    return f"{quote(e.name, safe='._-')} {shape} {e.kind} {s.enc} {s.codec} {len(s.data)}{tail}"


def _alias_line(name: str, target: str) -> str:
    return f"{quote(name, safe='._-')} = {quote(target, safe='._-')}"


def tied_groups(state: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """``{alias: target}`` for keys of ``state`` that are the same tensor as an earlier key.

    Same tensor = same storage, offset, shape, strides and dtype (tied parameters share one
    ``Parameter``, so their state-dict entries do). Empty tensors are never aliased.

    Example:
        >>> w = torch.ones(2, 2)
        >>> tied_groups({"a": w, "b": torch.zeros(2), "c": w})
        {'c': 'a'}
    """
    first: dict[tuple, str] = {}
    out: dict[str, str] = {}
    for name, t in state.items():
        if t.numel() == 0:
            continue
        key = (
            t.device,
            t.untyped_storage().data_ptr(),
            t.storage_offset(),
            tuple(t.shape),
            t.stride(),
            t.dtype,
        )
        if key in first:
            out[name] = first[key]
        else:
            first[key] = name
    return out


def _workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def encode_chunks(
    state: Mapping[str, torch.Tensor], records: Mapping[str, QuantRecord]
) -> list[bytes | memoryview]:
    """The weights file of a state dict and its quant records as buffers to write back to back:
    the safetensors header, then every stored tensor's stream (deterministic).

    Tied tensors are stored once (see :func:`tied_groups`); a tied group is coded with the
    record of its first name that has one. Tensors are encoded in parallel threads (the heavy
    numpy, torch and zstd calls release the GIL); the result does not depend on the order.
    The streams are returned as they were encoded, not joined: a big model's file is written
    and hashed from them directly (see ``_io``), without a second copy of its bytes.

    Example:
        >>> parts = encode_chunks({"w": torch.zeros(4)}, {})
        >>> b"".join(parts) == bytes(encode_state({"w": torch.zeros(4)}, {}))
        True
    """
    unknown = sorted(set(records) - set(state))
    if unknown:
        raise ArtifactError(
            f"quant records name no tensor of the model: {unknown}; fix the records"
        )
    aliases = tied_groups(state)
    group_rec = {a: records[a] for a in aliases if a in records}
    stored = [n for n in state if n not in aliases]
    search = sum(state[n].numel() for n in stored) <= SEARCH_NUMEL

    def one(name: str) -> Entry:
        rec = records.get(name)
        if rec is None:
            rec = next((r for a, r in group_rec.items() if aliases[a] == name), None)
        t = state[name]
        coded = to_codes(name, t, rec)
        stream = encode_best(coded.codes, coded.bits, coded.aux, search=search)
        return Entry(name, tuple(t.shape), coded.kind, stream)

    by_size = sorted(stored, key=lambda n: -state[n].numel())  # big tensors start first
    with ThreadPoolExecutor(_workers()) as pool:
        done = dict(zip(by_size, pool.map(one, by_size), strict=True))
    lines = [_alias_line(n, aliases[n]) if n in aliases else _line(done[n]) for n in state]
    meta = {"format": WEIGHTS_FORMAT, "layout": ";".join(lines)}
    total = sum(len(done[n].stream.data) for n in stored)
    info = {"dtype": "U8", "shape": [total], "data_offsets": [0, total]}
    # Written by hand: safetensors' own writer orders metadata keys randomly per process, and
    # the same model must always give the same bytes. Padding to 8 bytes as safetensors does.
    header = json.dumps({"__metadata__": meta, "blob": info}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    parts: list[bytes | memoryview] = [len(header).to_bytes(8, "little") + header]
    parts += [memoryview(done[n].stream.data).cast("B") for n in stored if done[n].stream.data]
    return parts


def encode_state(
    state: Mapping[str, torch.Tensor], records: Mapping[str, QuantRecord]
) -> bytearray:
    """The weights file bytes of a state dict and its quant records, as one buffer
    (:func:`encode_chunks` joined)."""
    return bytearray(b"".join(encode_chunks(state, records)))


def _parse_entry(text: str, version: int) -> tuple[Entry, int]:
    f = text.split(" ")
    if len(f) not in (6, 7) or not _SHAPE.match(f[1]) or not all(map(_INT.match, f[5:])):
        raise _bad(f"layout entry {text[:80]!r} is not 'name shape kind enc codec nbytes [n]'")
    name, kind, enc, codec = unquote(f[0]), f[2], f[3], f[4]
    shape = () if f[1] == "-" else tuple(int(d) for d in f[1].split(","))
    numel = prod(shape)
    bits = kind_bits(kind)
    if numel > MAX_NUMEL or max(shape, default=0) > MAX_NUMEL:
        raise _bad(f"tensor {name!r} declares an absurd shape {list(shape)}")
    if bits is None or (kind[0] == "u" and not shape):
        raise _bad(f"tensor {name!r} has unknown kind {kind!r}")
    dense = enc in ("d", "p")
    ok = is_encoding(enc) and codec in (CODECS if version > 1 else _V1_CODECS)
    ok = ok and (enc != "p" or (version > 1 and bits in (16, 32, 64)))
    if not ok or (len(f) == 7) == dense:
        raise _bad(f"tensor {name!r} has unknown encoding {enc!r}/{codec!r}")
    nbytes, n = int(f[5]), (numel if dense else int(f[6]))
    if n > numel:
        raise _bad(f"tensor {name!r} declares {n} entries for {numel} elements")
    expected = raw_size(enc, numel, n, bits, aux_len(kind, shape))
    if codec == "n" and nbytes != expected:
        raise _bad(f"tensor {name!r} stream has {nbytes} bytes, its layout implies {expected}")
    return Entry(name, shape, kind, Stream(enc, codec, n, b"")), nbytes


def _header(data: bytes) -> tuple[dict[str, Any], int]:
    if len(data) < 8:
        raise _bad("shorter than its 8-byte header length")
    n = int.from_bytes(data[:8], "little")
    if n > min(len(data) - 8, _MAX_HEADER):
        raise _bad(f"header length {n} exceeds the file")
    try:
        header = json.loads(bytes(data[8 : 8 + n]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _bad(f"header is not JSON: {e}") from None
    if not isinstance(header, dict) or set(header) != {"__metadata__", "blob"}:
        raise _bad("header must hold exactly '__metadata__' and 'blob'")
    return header, 8 + n


def parse_weights(data: bytes) -> tuple[list[Entry], dict[str, str]]:
    """Validated entries (with their stream bytes) and ``{alias: target}`` of a weights file.

    ``ArtifactError`` if it is malformed. Stream bytes are zero-copy views of ``data``.
    """
    header, start = _header(data)
    meta, info = header["__metadata__"], header["blob"]
    size = len(data) - start
    if not isinstance(meta, dict) or set(meta) != {"format", "layout"}:
        raise _bad("metadata must hold exactly 'format' and 'layout'")
    if meta["format"] not in READABLE_FORMATS:
        raise ArtifactError(
            f"weights format {meta['format']!r} is not one of {list(READABLE_FORMATS)}: "
            "upgrade autocompress or re-export the artifact"
        )
    version = READABLE_FORMATS.index(meta["format"]) + 1
    if info != {"dtype": "U8", "shape": [size], "data_offsets": [0, size]}:
        raise _bad("'blob' must be the only U8 tensor and fill the file")
    layout = meta["layout"]
    if not isinstance(layout, str):
        raise _bad("layout is not a string")
    view = memoryview(data)
    entries, aliases, offset, total, seen = [], {}, start, 0, set()
    for text in layout.split(";") if layout else []:
        f = text.split(" ")
        if version > 1 and len(f) == 3 and f[1] == "=":
            name, target = unquote(f[0]), unquote(f[2])
            if name in seen or target not in seen or target in aliases:
                raise _bad(f"alias {name!r} must name an earlier stored tensor, not {target!r}")
            seen.add(name)
            aliases[name] = target
            continue
        entry, nbytes = _parse_entry(text, version)
        total += entry.numel + aux_len(entry.kind, entry.shape) // 2  # scales count too
        if entry.name in seen or total > MAX_NUMEL or offset + nbytes > len(data):
            raise _bad(f"tensor {entry.name!r} is repeated, absurdly large or past the file end")
        seen.add(entry.name)
        s = entry.stream
        stream = Stream(s.enc, s.codec, s.n, view[offset : offset + nbytes])
        entries.append(Entry(entry.name, entry.shape, entry.kind, stream))
        offset += nbytes
    if offset != len(data):
        raise _bad(f"layout covers {offset - start} of the {size} blob bytes")
    return entries, aliases


def decode_state(
    data: bytes,
) -> tuple[dict[str, torch.Tensor], dict[str, QuantRecord], dict[str, str]]:
    """State dict, quant records and ``{alias: target}`` back from weights file bytes.

    Bit-exact; an alias maps to the very tensor (and record) of its target.
    """
    entries, aliases = parse_weights(data)
    state: dict[str, torch.Tensor] = {}
    records: dict[str, QuantRecord] = {}

    def one(e: Entry) -> tuple[torch.Tensor, QuantRecord | None]:
        bits = kind_bits(e.kind) or 0
        try:
            aux, codes = decode(e.stream, e.numel, bits, aux_len(e.kind, e.shape))
        except ValueError as err:
            raise _bad(f"tensor {e.name!r}: {err}") from None
        return from_codes(e.kind, codes, aux, e.shape)

    with ThreadPoolExecutor(_workers()) as pool:
        for e, (t, rec) in zip(entries, pool.map(one, entries), strict=True):
            state[e.name] = t
            if rec is not None:
                records[e.name] = rec
    for alias, target in aliases.items():
        state[alias] = state[target]
        if target in records:
            records[alias] = records[target]
    return state, records, aliases


def describe(data: bytes) -> list[dict[str, Any]]:
    """Per-tensor summary of a weights file: kind, encoding, codec, bytes, bits per value."""
    return [
        {
            "name": e.name,
            "shape": list(e.shape),
            "kind": e.kind,
            "encoding": e.stream.enc,
            "codec": e.stream.codec,
            "entries": e.stream.n,
            "bytes": len(e.stream.data),
            "bits_per_value": 8 * len(e.stream.data) / max(e.numel, 1),
        }
        for e in parse_weights(data)[0]
    ]
