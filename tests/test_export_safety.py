"""falqon_jax.export never deletes what it did not write, and never leaves a half model."""

import os

import pytest
from flax import nnx

from falqon_jax import export, models
from falqon_jax import nnx as fnnx
from falqon_jax import _safetensors as st


@pytest.fixture(scope="module")
def llama():
  lm = models.CausalLM(models.tiny_config("llama"), rngs=nnx.Rngs(0))
  fnnx.meld(lm, rank=16)
  return models.split(lm)


def _snapshot(folder) -> dict:
  """Every file under ``folder`` (relative path -> bytes), and every empty subfolder."""
  out = {}
  for root, dirs, files in os.walk(folder):
    rel = os.path.relpath(root, folder)
    if not dirs and not files:
      out[rel + "/"] = None
    for f in files:
      with open(os.path.join(root, f), "rb") as fh_:
        out[os.path.normpath(os.path.join(rel, f))] = fh_.read()
  return out


def _temps(parent) -> list:
  return [f for f in os.listdir(parent) if ".tmp-" in f]


def _run_folder(path):
  """The layout ``falqon-jax finetune`` leaves in a run folder."""
  os.makedirs(os.path.join(path, "checkpoints", "7"))
  with open(os.path.join(path, "checkpoints", "7", "state"), "wb") as f:
    f.write(b"\x00\x01orbax")
  for name, text in (("config.yaml", "rank: 8\n"), ("metrics.jsonl", '{"step": 7}\n'),
                     ("summary.json", "{}")):
    with open(os.path.join(path, name), "w") as f:
      f.write(text)


def _user_folder(path):
  os.makedirs(os.path.join(path, "data"))
  with open(os.path.join(path, "notes.txt"), "w") as f:
    f.write("mine")
  with open(os.path.join(path, "data", "train.jsonl"), "w") as f:
    f.write('{"text": "x"}\n')


def _run_itself(tmp_path):
  _run_folder(tmp_path / "run")  # `falqon-jax export run run`
  return tmp_path / "run"


def _parent_of_runs(tmp_path):
  _run_folder(tmp_path / "runs" / "run1")  # `falqon-jax export runs/run1 runs`
  _run_folder(tmp_path / "runs" / "run2")
  return tmp_path / "runs"


def _user_files(tmp_path):
  _user_folder(tmp_path / "mine")
  return tmp_path / "mine"


FOLDERS = pytest.mark.parametrize("make", [_run_itself, _parent_of_runs, _user_files],
                                  ids=["run-folder", "parent-of-runs", "user-files"])


@FOLDERS
def test_non_empty_folder_refused_in_one_line(llama, tmp_path, make):
  model, params = llama
  target = make(tmp_path)
  before = _snapshot(target)
  for save in (export.save_fp8, export.save_bf16):
    with pytest.raises(FileExistsError) as e:
      save(str(target), model, params)
    msg = str(e.value)
    assert "\n" not in msg and str(target) in msg
    assert "overwrite=True" in msg and "--overwrite" in msg and "new or empty folder" in msg
  assert _snapshot(target) == before
  assert _temps(target.parent) == []


@FOLDERS
def test_overwrite_adds_the_model_and_keeps_every_other_file(llama, tmp_path, make):
  model, params = llama
  target = make(tmp_path)
  before = _snapshot(target)
  export.save_fp8(str(target), model, params, overwrite=True)
  after = _snapshot(target)
  assert {k: after.get(k) for k in before} == before
  assert set(after) - set(before) == {"config.json", "model.safetensors"}
  assert models.load(str(target)).config.model_type == "llama"
  assert _temps(target.parent) == []


def test_empty_folder_is_written_without_overwrite(llama, tmp_path):
  model, params = llama
  (tmp_path / "out").mkdir()
  export.save_bf16(str(tmp_path / "out"), model, params)
  assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "model.safetensors"]


def test_overwrite_replaces_model_files_and_removes_stale_ones(llama, tmp_path):
  model, params = llama
  fresh = export.save_fp8(str(tmp_path / "fresh"), model, params)
  target = str(tmp_path / "m")
  export.save_bf16(target, model, params, max_shard_bytes=40_000)
  shards = [f for f in os.listdir(target) if f.startswith("model-0")]
  assert len(shards) > 1 and os.path.isfile(os.path.join(target, "model.safetensors.index.json"))
  for stale in ("pytorch_model.bin", "flax_model.msgpack"):  # weights of other loaders
    with open(os.path.join(target, stale), "wb") as f:
      f.write(b"old")
  with open(os.path.join(target, "README.md"), "w") as f:
    f.write("mine")
  with open(os.path.join(target, "tokenizer.json"), "w") as f:
    f.write("{}")  # a tokenizer this export does not replace stays
  export.save_fp8(target, model, params, overwrite=True)
  assert sorted(os.listdir(target)) == [
      "README.md", "config.json", "model.safetensors", "tokenizer.json"]
  for name in ("config.json", "model.safetensors"):  # byte for byte a fresh export
    with open(os.path.join(target, name), "rb") as a, open(os.path.join(fresh, name), "rb") as b:
      assert a.read() == b.read()
  # and back: one file to shards leaves no model.safetensors for loaders to mix in
  export.save_bf16(target, model, params, max_shard_bytes=40_000, overwrite=True)
  names = set(os.listdir(target))
  assert "model.safetensors" not in names and "model.safetensors.index.json" in names
  assert {"README.md", "tokenizer.json"} <= names
  assert _temps(tmp_path) == []


def test_a_failed_write_changes_nothing_and_leaves_no_temp(llama, tmp_path, monkeypatch):
  model, params = llama
  target = tmp_path / "m"
  export.save_fp8(str(target), model, params)
  (target / "notes.txt").write_text("mine")
  before = _snapshot(target)

  def boom(*a, **k):
    raise KeyboardInterrupt

  monkeypatch.setattr(st, "save_file", boom)
  with pytest.raises(KeyboardInterrupt):
    export.save_bf16(str(target), model, params, overwrite=True)
  assert _snapshot(target) == before
  assert _temps(tmp_path) == []


@pytest.mark.parametrize(
    "side, name",
    [("src", "config.json"), ("dst", "model.safetensors"),
     ("src", "model.safetensors.index.json"), ("dst", "config.json")],
    ids=["old config out", "new weights in", "stale index out", "new config in"])
def test_a_failure_while_moving_files_in_restores_the_old_model(
    llama, tmp_path, monkeypatch, side, name):
  model, params = llama
  target = tmp_path / "m"
  export.save_bf16(str(target), model, params, max_shard_bytes=40_000)
  (target / "notes.txt").write_text("mine")
  before = _snapshot(target)
  real_replace, hit = os.replace, []

  def interrupted(src, dst):  # Ctrl-C at one move; the undo's moves go through
    if not hit and str({"src": src, "dst": dst}[side]) == str(target / name):
      hit.append(dst)
      raise KeyboardInterrupt
    return real_replace(src, dst)

  monkeypatch.setattr(os, "replace", interrupted)
  with pytest.raises(KeyboardInterrupt):
    export.save_fp8(str(target), model, params, overwrite=True)
  monkeypatch.undo()
  assert _snapshot(target) == before
  assert _temps(tmp_path) == []
