"""Tests for advmend.checkpoint: safetensors round trip, verification, safety, atomic writes."""

from __future__ import annotations

import errno
import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file as real_save_file

import advmend.checkpoint as ckpt_mod
from advmend.checkpoint import FORMAT, load_checkpoint, save_checkpoint
from advmend.errors import CheckpointError
from advmend.models import create_model


def _model(seed: int = 0) -> torch.nn.Module:
    """small_cnn (conv, BatchNorm with int64 buffers, linear) at width 2: tiny and fast."""
    torch.manual_seed(seed)
    return create_model("small_cnn", num_classes=10, width=2)


def _sgd(model: torch.nn.Module) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)


def _train_steps(model, opt, n: int = 3, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(n):
        x = torch.rand(8, 3, 8, 8, generator=g)
        y = torch.randint(0, 10, (8,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


RECORD = {
    "epoch": 3,
    "metrics": {"loss": 1.25, "train_acc": 40.0},
    "best": {"epoch": 2, "metric": "val_robust_acc", "value": 12.5},
    "config": {"model": {"name": "small_cnn", "options": {"width": 2}}},
    "num_classes": 10,
    "image_shape": [3, 8, 8],
    "eps": 8 / 255,
}


@pytest.fixture
def saved(tmp_path):
    """A trained model + optimizer saved to tmp_path/ckpt.safetensors."""
    model = _model()
    opt = _sgd(model)
    _train_steps(model, opt)
    path = save_checkpoint(tmp_path / "ckpt.safetensors", model, RECORD, opt)
    return path, model, opt


def _flip_byte(path: Path, offset_from_end: int = 9) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


# --------------------------------------------------------------------------- round trip


def test_round_trip_model_state_and_record(saved):
    path, model, _ = saved
    assert path == path.parent / "ckpt.safetensors" and path.is_file()
    state, record = load_checkpoint(path)
    ref = model.state_dict()
    assert set(state) == set(ref)
    for k, v in ref.items():
        assert state[k].dtype == v.dtype and state[k].shape == v.shape, k
        assert torch.equal(state[k], v), k
    for k, v in RECORD.items():
        assert record[k] == v, k
    assert record["format"] == FORMAT
    assert "torch" in record["versions"]
    assert len(record["tensors_sha256"]) == 64
    # A fresh model accepts the state strictly and computes the same function.
    fresh = _model(seed=123)
    fresh.load_state_dict(state)
    x = torch.rand(4, 3, 8, 8)
    model.eval(), fresh.eval()
    assert torch.equal(model(x), fresh(x))


def test_record_is_not_mutated(saved):
    before = json.dumps(RECORD, sort_keys=True)
    load_checkpoint(saved[0])
    assert json.dumps(RECORD, sort_keys=True) == before
    assert "format" not in RECORD and "optimizer" not in RECORD


def test_optimizer_state_restores_momentum(saved):
    path, model, opt = saved
    state, record = load_checkpoint(path)
    assert "optimizer_state" in record and "optimizer" not in record

    fresh_model = _model(seed=99)
    fresh_model.load_state_dict(state)
    fresh_opt = _sgd(fresh_model)
    fresh_opt.load_state_dict(record["optimizer_state"])

    ref_state, new_state = opt.state_dict(), fresh_opt.state_dict()
    assert set(new_state["state"]) == set(ref_state["state"]) and ref_state["state"]
    for pid, slots in ref_state["state"].items():
        assert torch.equal(new_state["state"][pid]["momentum_buffer"], slots["momentum_buffer"]), pid
    for g_ref, g_new in zip(ref_state["param_groups"], new_state["param_groups"]):
        for key in ("lr", "momentum", "weight_decay", "nesterov", "params"):
            assert g_new[key] == g_ref[key], key

    # Continuing training from the restored state is bit-identical to never having stopped.
    _train_steps(model, opt, n=2, seed=7)
    _train_steps(fresh_model, fresh_opt, n=2, seed=7)
    for (k, a), b in zip(model.state_dict().items(), fresh_model.state_dict().values()):
        assert torch.equal(a, b), k


def test_without_optimizer_has_no_optimizer_state(tmp_path):
    path = save_checkpoint(tmp_path / "m.safetensors", _model(), {"epoch": 1})
    _, record = load_checkpoint(path)
    assert "optimizer_state" not in record and "optimizer" not in record
    assert record["epoch"] == 1


def test_sidecar_json(saved):
    path, _, _ = saved
    sidecar = path.with_suffix(".json")
    assert sidecar.is_file()
    side = json.loads(sidecar.read_text())
    _, record = load_checkpoint(path)
    assert side["epoch"] == RECORD["epoch"]
    assert side["metrics"] == RECORD["metrics"]
    assert side["format"] == FORMAT
    assert side["tensors_sha256"] == record["tensors_sha256"]
    assert "param_groups" in side["optimizer"]


def test_tied_weights_are_saved(tmp_path):
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(4, 4)
            self.b = torch.nn.Linear(4, 4)
            self.b.weight = self.a.weight

    m = Tied()
    path = save_checkpoint(tmp_path / "tied.safetensors", m, {"epoch": 0})
    state, _ = load_checkpoint(path)
    assert torch.equal(state["a.weight"], state["b.weight"])
    assert torch.equal(state["a.weight"], m.a.weight.detach())


# --------------------------------------------------------------------------- corrupt or foreign files


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("keep", [0.5, 0.99, 16])
def test_truncated_file(saved, keep):
    path = saved[0]
    data = path.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else keep
    path.write_bytes(data[:n])
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_empty_file(tmp_path):
    p = tmp_path / "empty.safetensors"
    p.write_bytes(b"")
    with pytest.raises(CheckpointError):
        load_checkpoint(p)


@pytest.mark.parametrize("offset_from_end", [1, 9, 1000])
def test_flipped_byte_in_tensor_data(saved, offset_from_end):
    path = saved[0]
    _flip_byte(path, offset_from_end)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert "modified" in msg or "corrupt" in msg


def test_plain_text_file(tmp_path):
    p = tmp_path / "notes.safetensors"
    p.write_text("this is not a checkpoint, just some text\n" * 10)
    with pytest.raises(CheckpointError):
        load_checkpoint(p)


def test_torch_save_pickle_file(tmp_path):
    p = tmp_path / "pickled.safetensors"
    torch.save(_model().state_dict(), p)
    with pytest.raises(CheckpointError):
        load_checkpoint(p)


def test_safetensors_without_advmend_metadata(tmp_path):
    p = tmp_path / "plain.safetensors"
    real_save_file({"w": torch.ones(3)}, str(p))
    with pytest.raises(CheckpointError, match="advmend"):
        load_checkpoint(p)
    real_save_file({"w": torch.ones(3)}, str(p), metadata={"other": "x"})
    with pytest.raises(CheckpointError, match="advmend"):
        load_checkpoint(p)


def test_advmend_metadata_not_json(tmp_path):
    p = tmp_path / "badmeta.safetensors"
    real_save_file({"model.w": torch.ones(3)}, str(p), metadata={"advmend": "{not json"})
    with pytest.raises(CheckpointError):
        load_checkpoint(p)


def test_wrong_format_tag(tmp_path):
    p = tmp_path / "fmt.safetensors"
    real_save_file({"model.w": torch.ones(3)}, str(p), metadata={"advmend": json.dumps({"format": "other-9"})})
    with pytest.raises(CheckpointError, match="format"):
        load_checkpoint(p)


def test_tensor_swapped_with_valid_file_but_old_digest(saved, tmp_path):
    """A well-formed safetensors file whose tensors were replaced keeps the old digest: rejected."""
    path = saved[0]
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    name = next(k for k in tensors if k.startswith("model.") and tensors[k].is_floating_point())
    tensors[name] = tensors[name] + 1.0
    forged = tmp_path / "forged.safetensors"
    real_save_file(tensors, str(forged), metadata=meta)
    with pytest.raises(CheckpointError, match="modified"):
        load_checkpoint(forged)


def _raw(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("change", [
    {"eps": 0.5 / 255},  # the case: the attacks would silently run at this eps
    {"num_classes": 11},
    {"config": {"model": {"name": "small_cnn", "options": {"width": 4}}}},
])  # fmt: skip
def test_modified_record_is_refused(saved, tmp_path, change):
    """The record (config, eps) is sealed with the tensors: editing it is refused like editing a tensor."""
    meta, tensors = _raw(saved[0])
    meta["advmend"] = json.dumps(dict(json.loads(meta["advmend"]), **change), indent=2, sort_keys=True)
    forged = tmp_path / "forged.safetensors"
    real_save_file(tensors, str(forged), metadata=meta)
    with pytest.raises(CheckpointError, match="record .*modified"):
        load_checkpoint(forged)


def test_record_edit_that_keeps_the_json_equal_is_still_refused(saved, tmp_path):
    """The seal covers the stored text itself: even whitespace changes break it."""
    meta, tensors = _raw(saved[0])
    meta["advmend"] = json.dumps(json.loads(meta["advmend"]), sort_keys=True)  # same data, other layout
    forged = tmp_path / "forged.safetensors"
    real_save_file(tensors, str(forged), metadata=meta)
    with pytest.raises(CheckpointError, match="modified"):
        load_checkpoint(forged)


def test_missing_seal_is_refused(saved, tmp_path):
    meta, tensors = _raw(saved[0])
    del meta["advmend_sha256"]
    forged = tmp_path / "forged.safetensors"
    real_save_file(tensors, str(forged), metadata=meta)
    with pytest.raises(CheckpointError, match="modified"):
        load_checkpoint(forged)


def test_format_1_checkpoint_is_refused_with_what_to_do(saved, tmp_path):
    """A checkpoint of the old format (a digest of the tensors alone, its own digest intact): its record
    cannot be verified, so it is refused with a message saying to retrain, not trusted."""
    meta, tensors = _raw(saved[0])
    record = dict(json.loads(meta["advmend"]), format="advmend-checkpoint-1")
    old = tmp_path / "old.safetensors"
    real_save_file(tensors, str(old), metadata={"advmend": json.dumps(record)})
    with pytest.raises(CheckpointError, match="advmend-checkpoint-1.*cannot be verified.*retrain"):
        load_checkpoint(old)


@pytest.mark.parametrize("field,value", [
    ("image_shape", [3, -1, 32]), ("image_shape", [3, 32]), ("image_shape", [3, 32.5, 32]),
    ("image_shape", [3, True, 32]), ("image_shape", "3x32x32"), ("image_shape", None),
    ("num_classes", 1), ("num_classes", 10.0), ("num_classes", "10"),
    ("eps", 0), ("eps", -0.1), ("eps", float("inf")), ("eps", float("nan")), ("eps", "8/255"),
    ("epoch", -1), ("epoch", 2.5), ("config", [1, 2]), ("best", {"value": "high"}),
])  # fmt: skip
def test_invalid_record_fields_are_refused_at_load(tmp_path, field, value):
    """A sealed record (as a buggy writer would leave it) whose fields loading relies on are invalid."""
    path = save_checkpoint(tmp_path / "c.safetensors", _model(), dict(RECORD, **{field: value}))
    with pytest.raises(CheckpointError, match=f"invalid checkpoint record: {field}") as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value)


class _Evil:
    """Unpickling this creates the marker file (what a malicious checkpoint would do)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_payload_is_never_executed(tmp_path):
    # The payload is live: unpickling it really does create a file.
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Evil(probe)))
    assert probe.exists()

    marker = tmp_path / "pwned"
    raw = tmp_path / "evil.safetensors"
    raw.write_bytes(pickle.dumps(_Evil(marker)))
    with pytest.raises(CheckpointError):
        load_checkpoint(raw)
    assert not marker.exists()

    zipped = tmp_path / "evil_zip.safetensors"
    torch.save({"model.w": torch.ones(2), "x": _Evil(marker)}, zipped)
    with pytest.raises(CheckpointError):
        load_checkpoint(zipped)
    assert not marker.exists()


# --------------------------------------------------------------------------- atomic writes


def _failing_save_file(tensors, filename, metadata=None):
    with open(filename, "wb") as f:
        f.write(b'\x10\x00\x00\x00\x00\x00\x00\x00{"partial')
    raise RuntimeError("disk full (simulated)")


def test_atomic_write_keeps_previous_checkpoint(saved, monkeypatch):
    path, model, opt = saved
    before_bytes = path.read_bytes()
    sidecar_before = path.with_suffix(".json").read_text()
    state_before, _ = load_checkpoint(path)

    _train_steps(model, opt, n=1, seed=5)  # the model changes; the failed save must not leak it
    monkeypatch.setattr(ckpt_mod, "save_file", _failing_save_file)
    with pytest.raises(RuntimeError, match="simulated"):
        save_checkpoint(path, model, dict(RECORD, epoch=4), opt)

    assert path.read_bytes() == before_bytes
    state, record = load_checkpoint(path)
    assert record["epoch"] == 3
    assert all(torch.equal(state[k], state_before[k]) for k in state_before)
    assert path.with_suffix(".json").read_text() == sidecar_before
    assert sorted(p.name for p in path.parent.iterdir()) == ["ckpt.json", "ckpt.safetensors"]


def test_atomic_write_failure_leaves_nothing_new(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt_mod, "save_file", _failing_save_file)
    with pytest.raises(RuntimeError):
        save_checkpoint(tmp_path / "new.safetensors", _model(), {"epoch": 1})
    assert list(tmp_path.iterdir()) == []


def test_successful_save_leaves_no_temp_files(tmp_path):
    m = _model()
    save_checkpoint(tmp_path / "a.safetensors", m, {"epoch": 1})
    save_checkpoint(tmp_path / "a.safetensors", m, {"epoch": 2})  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "a.safetensors"]
    assert load_checkpoint(tmp_path / "a.safetensors")[1]["epoch"] == 2


def _safetensors_disk_full(tensors, filename, metadata=None):
    with open(filename, "wb") as f:
        f.write(b"\x10\x00\x00")  # what got written before the disk filled up
    # What safetensors raises when the disk fills up while it writes.
    raise SafetensorError(
        'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
    )


def _os_disk_full(tensors, filename, metadata=None):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("failing", [_safetensors_disk_full, _os_disk_full])
def test_disk_full_keeps_the_previous_checkpoint_and_its_sidecar(saved, monkeypatch, failing):
    path, model, opt = saved
    before = {p.name: p.read_bytes() for p in path.parent.iterdir()}
    monkeypatch.setattr(ckpt_mod, "save_file", failing)
    with pytest.raises((SafetensorError, OSError)):
        save_checkpoint(path, model, dict(RECORD, epoch=4), opt)
    assert {p.name: p.read_bytes() for p in path.parent.iterdir()} == before  # no temp file left
    assert load_checkpoint(path)[1]["epoch"] == 3


def test_sidecar_write_failure_renames_neither_file(saved, monkeypatch):
    """The sidecar is written before either file is renamed: a full disk then leaves the pair as it was,
    never a new checkpoint beside an old sidecar."""
    path, model, opt = saved
    before = {p.name: p.read_bytes() for p in path.parent.iterdir()}
    real = Path.write_text

    def full(self, *args, **kwargs):
        if self.name.startswith(".ckpt.json."):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OSError):
        save_checkpoint(path, model, dict(RECORD, epoch=4), opt)
    assert {p.name: p.read_bytes() for p in path.parent.iterdir()} == before
