"""The paths big models rely on: chunked weights (never joined), hashing while writing,
verified reads, and ``load(model=...)`` without copying the weights it replaces."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from torch import nn

import autocompress.artifacts._io as io_mod
from autocompress.artifacts import export, load
from autocompress.artifacts._format import decode_state, encode_chunks, encode_state
from autocompress.artifacts._io import join, nbytes, read_verified, sha256
from autocompress.errors import ArtifactError
from autocompress.spaces._plan import LayerPlan, Plan


class Net(nn.Module):
    """Two fp32 layers, a tied pair and a non-persistent buffer."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, width)
        self.fc = nn.Linear(width, width)
        self.head = nn.Linear(width, 50, bias=False)
        self.head.weight = self.emb.weight
        self.register_buffer("steps", torch.arange(7), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc(self.emb(x)))) + self.steps.sum()


def _net(seed: int = 0, width: int = 64) -> Net:
    torch.manual_seed(seed)
    return Net(width).eval()


def test_chunks_join_to_the_weights_file_and_decode_bit_exact() -> None:
    net = _net()
    parts = encode_chunks(net.state_dict(), {})
    assert len(parts) > 2  # header, then one buffer per stored stream (the tied pair once)
    data = join(parts)
    assert data == bytes(encode_state(net.state_dict(), {}))
    assert nbytes(parts) == len(data) and sha256(parts) == hashlib.sha256(data).hexdigest()
    state, _, aliases = decode_state(data)
    assert aliases == {"head.weight": "emb.weight"}
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())


def test_chunked_write_verifies_and_is_bit_exact(tmp_path: Path) -> None:
    net = _net(width=96)
    art = export(net, Plan(), tmp_path / "a")
    assert art.files["weights.safetensors"] > 4 * 1024
    manifest, data = read_verified(art.path)
    weights = data["weights.safetensors"]
    assert hashlib.sha256(weights).hexdigest() == manifest["files"]["weights.safetensors"]["sha256"]
    back = load(art.path, model=_net(seed=1, width=96))
    assert all(torch.equal(back.state_dict()[k], v) for k, v in net.state_dict().items())
    again = export(net, Plan(), tmp_path / "b")  # same model, same bytes
    w = "weights.safetensors"
    assert (again.path / w).read_bytes() == (art.path / w).read_bytes()


@pytest.mark.parametrize("where", ["start", "middle", "last byte"])
def test_verified_read_refuses_a_flipped_byte(tmp_path: Path, where: str) -> None:
    art = export(_net(width=96), Plan(), tmp_path / "a")
    path = art.path / "weights.safetensors"
    d = bytearray(path.read_bytes())
    d[{"start": 0, "middle": len(d) // 2, "last byte": len(d) - 1}[where]] ^= 0x01
    path.write_bytes(bytes(d))
    with pytest.raises(ArtifactError, match="weights.safetensors fails its sha256 check") as e:
        load(art.path, model=_net(width=96))
    assert "\n" not in str(e.value)


def test_file_that_changes_size_after_the_check_is_refused(tmp_path: Path) -> None:
    art = export(_net(width=96), Plan(), tmp_path / "a")
    path = art.path / "weights.safetensors"
    size = path.stat().st_size
    for grown in (b"x", b""):  # longer than announced; shorter than announced
        data = path.read_bytes()
        path.write_bytes(data + grown if grown else data[:-1])
        _, digest = io_mod._read_hashed(path, size)
        assert digest is None
        path.write_bytes(data if grown else data + b"?")


def test_load_with_model_copies_only_what_the_artifact_does_not_replace(tmp_path: Path) -> None:
    net = _net()
    art = export(net, Plan(), tmp_path / "a")
    given = _net(seed=3)
    before = {k: v.clone() for k, v in given.state_dict().items()}
    back = load(art.path, model=given)
    assert all(torch.equal(given.state_dict()[k], v) for k, v in before.items())  # untouched
    assert all(torch.equal(back.state_dict()[k], v) for k, v in net.state_dict().items())
    assert torch.equal(back.steps, torch.arange(7)) and back.steps is not given.steps
    assert back.head.weight is back.emb.weight  # still tied
    x = torch.randint(0, 50, (3, 4))
    assert torch.equal(back(x), net(x))


def test_load_with_model_and_structural_plan_still_restructures(tmp_path: Path) -> None:
    from autocompress.compress import apply

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    plan = Plan(layers={"0": LayerPlan(rank_ratio=0.5)})
    small = apply(base, plan, example_input=torch.randn(2, 8))
    art = export(small, plan, tmp_path / "a")
    back = load(art.path, model=base, example_input=torch.randn(2, 8))
    assert "0.0.weight" in back.state_dict()  # factorized: the deep-copy path ran
    assert all(torch.equal(back.state_dict()[k], v) for k, v in small.state_dict().items())
    assert base[0].weight.shape == (16, 8)  # the given model is not restructured in place
