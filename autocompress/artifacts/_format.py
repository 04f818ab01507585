"""The weights file: a safetensors file holding ONE uint8 tensor ``blob`` and a compact layout.

Every tensor of the state dict is one stream (see ``_encode``), the streams are concatenated in
state-dict order into ``blob``, and ``__metadata__`` holds
``{"format": "autocompress-weights/1", "layout": "<entry>;<entry>;..."}`` where each entry is
space-separated ``name shape kind enc codec nbytes [n]``:

* ``name``: state-dict key, percent-quoted (``urllib.parse.quote``, safe ``._-``).
* ``shape``: comma-separated dims, ``-`` for a scalar.
* ``kind``: how values become codes (``u4``, ``c3``, ``h16``, ``f16``, ``f32``, ``int64``...; see
  ``_kinds``).
* ``enc`` / ``codec`` / ``n``: the stream's encoding, entropy codec and entry count (``n`` is
  omitted for dense streams); ``nbytes``: the stream's length in ``blob``.

Example entry: ``fc1.weight 300,64 u4 r8 x 2686 5512``. One tensor and a text layout keep the
fixed overhead around 100 bytes plus ~35 bytes per tensor.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from math import prod
from typing import Any
from urllib.parse import quote, unquote

import torch

from autocompress.artifacts._encode import (
    CODECS,
    Stream,
    decode,
    encode_best,
    is_encoding,
    raw_size,
)
from autocompress.artifacts._kinds import aux_len, from_codes, kind_bits, to_codes
from autocompress.compress._meta import QuantRecord
from autocompress.errors import ArtifactError

WEIGHTS_FORMAT = "autocompress-weights/1"
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
    tail = "" if s.enc == "d" else f" {s.n}"
    return f"{quote(e.name, safe='._-')} {shape} {e.kind} {s.enc} {s.codec} {len(s.data)}{tail}"


def encode_state(state: Mapping[str, torch.Tensor], records: Mapping[str, QuantRecord]) -> bytes:
    """The weights file bytes of a state dict and its quant records (deterministic)."""
    unknown = sorted(set(records) - set(state))
    if unknown:
        raise ArtifactError(
            f"quant records name no tensor of the model: {unknown}; fix the records"
        )
    entries = []
    for name, t in state.items():
        coded = to_codes(name, t, records.get(name))
        stream = encode_best(coded.codes, coded.bits, coded.aux)
        entries.append(Entry(name, tuple(t.shape), coded.kind, stream))
    blob = b"".join(e.stream.data for e in entries)
    meta = {"format": WEIGHTS_FORMAT, "layout": ";".join(_line(e) for e in entries)}
    info = {"dtype": "U8", "shape": [len(blob)], "data_offsets": [0, len(blob)]}
    # Written by hand: safetensors' own writer orders metadata keys randomly per process, and
    # the same model must always give the same bytes. Padding to 8 bytes as safetensors does.
    header = json.dumps({"__metadata__": meta, "blob": info}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + blob


def _parse_entry(text: str) -> tuple[Entry, int]:
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
    if not is_encoding(enc) or codec not in CODECS or (len(f) == 7) == (enc == "d"):
        raise _bad(f"tensor {name!r} has unknown encoding {enc!r}/{codec!r}")
    nbytes, n = int(f[5]), (numel if enc == "d" else int(f[6]))
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
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _bad(f"header is not JSON: {e}") from None
    if not isinstance(header, dict) or set(header) != {"__metadata__", "blob"}:
        raise _bad("header must hold exactly '__metadata__' and 'blob'")
    return header, 8 + n


def parse_weights(data: bytes) -> list[Entry]:
    """Validated entries (with their stream bytes) of a weights file; ArtifactError if malformed."""
    header, start = _header(data)
    meta, info = header["__metadata__"], header["blob"]
    size = len(data) - start
    if not isinstance(meta, dict) or set(meta) != {"format", "layout"}:
        raise _bad("metadata must hold exactly 'format' and 'layout'")
    if meta["format"] != WEIGHTS_FORMAT:
        raise ArtifactError(
            f"weights format {meta['format']!r} is not {WEIGHTS_FORMAT!r}: "
            "upgrade autocompress or re-export the artifact"
        )
    if info != {"dtype": "U8", "shape": [size], "data_offsets": [0, size]}:
        raise _bad("'blob' must be the only U8 tensor and fill the file")
    layout = meta["layout"]
    if not isinstance(layout, str):
        raise _bad("layout is not a string")
    entries, offset, total, seen = [], start, 0, set()
    for text in layout.split(";") if layout else []:
        entry, nbytes = _parse_entry(text)
        total += entry.numel + aux_len(entry.kind, entry.shape) // 2  # scales count too
        if entry.name in seen or total > MAX_NUMEL or offset + nbytes > len(data):
            raise _bad(f"tensor {entry.name!r} is repeated, absurdly large or past the file end")
        seen.add(entry.name)
        s = entry.stream
        stream = Stream(s.enc, s.codec, s.n, data[offset : offset + nbytes])
        entries.append(Entry(entry.name, entry.shape, entry.kind, stream))
        offset += nbytes
    if offset != len(data):
        raise _bad(f"layout covers {offset - start} of the {size} blob bytes")
    return entries


def decode_state(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, QuantRecord]]:
    """State dict and quant records back from weights file bytes (bit-exact)."""
    state: dict[str, torch.Tensor] = {}
    records: dict[str, QuantRecord] = {}
    for e in parse_weights(data):
        bits = kind_bits(e.kind) or 0
        try:
            aux, codes = decode(e.stream, e.numel, bits, aux_len(e.kind, e.shape))
        except ValueError as err:
            raise _bad(f"tensor {e.name!r}: {err}") from None
        state[e.name], rec = from_codes(e.kind, codes, aux, e.shape)
        if rec is not None:
            records[e.name] = rec
    return state, records


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
        for e in parse_weights(data)
    ]
