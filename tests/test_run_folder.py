"""The run folder: checked before any work, locked, strict JSON, records kept on resume."""

import json
import os

import numpy as np
import pytest

from falqon_jax._run_folder import RunFolder, RunFolderError, json_safe


def _one_line_error(path, match):
  with pytest.raises(RunFolderError, match=match) as info:
    RunFolder(str(path)).open()
  assert "\n" not in str(info.value) and "--output_dir" in str(info.value)


def test_a_file_or_a_path_under_a_file_is_refused(tmp_path):
  (tmp_path / "f").write_text("mine")
  _one_line_error(tmp_path / "f", "is a file")
  _one_line_error(tmp_path / "f" / "run", r"cannot be created \(Not a directory\)")
  assert (tmp_path / "f").read_text() == "mine"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root writes into read-only folders")
def test_a_read_only_folder_is_refused(tmp_path):
  folder = tmp_path / "ro"
  folder.mkdir()
  folder.chmod(0o555)
  try:
    _one_line_error(folder, "is not writable")
  finally:
    folder.chmod(0o755)


def test_a_folder_that_cannot_be_made_is_refused_and_nothing_is_left(tmp_path):
  _one_line_error("/proc/self/falqon-run", "cannot be created")
  run = tmp_path / "new" / "run"
  folder = RunFolder(str(run)).open()
  folder.close()  # created, nothing written: removed again
  assert not run.exists()
  with RunFolder(str(run)) as folder:
    folder.append_metrics({"step": 0})
  assert (run / "metrics.jsonl").exists()  # something written: kept


def test_a_second_run_on_the_same_folder_is_refused(tmp_path):
  with RunFolder(str(tmp_path)):
    with pytest.raises(RunFolderError, match=rf"in use by another run \(pid {os.getpid()}\)"):
      RunFolder(str(tmp_path)).open()
  with RunFolder(str(tmp_path)):  # released when the first one closed
    pass


def test_json_is_strict_and_non_finite_values_are_null(tmp_path):
  assert json_safe({"a": [np.inf, 1.5], "b": float("nan"), "c": "x"}) == {
      "a": [None, 1.5], "b": None, "c": "x"}
  with RunFolder(str(tmp_path)) as folder:
    folder.append_metrics({"step": 1, "loss": float("nan")})
    folder.write_json("summary.json", {"final": {"loss": float("inf")}})
  text = (tmp_path / "metrics.jsonl").read_text() + (tmp_path / "summary.json").read_text()
  assert "NaN" not in text and "Infinity" not in text
  json.loads((tmp_path / "summary.json").read_text(), parse_constant=pytest.fail)


def test_rows_past_the_restored_step_are_dropped(tmp_path):
  with RunFolder(str(tmp_path)) as folder:
    for step in (0, 2, 4, 6):
      folder.append_metrics({"step": step})
    with open(folder.file("metrics.jsonl"), "a") as f:
      f.write('{"step": 8, "lo')  # torn by a kill
    assert [r["step"] for r in folder.truncate_metrics(4)] == [0, 2, 4]
    assert [r["step"] for r in folder.read_metrics()] == [0, 2, 4]


def test_config_history_keeps_every_part(tmp_path):
  with RunFolder(str(tmp_path)) as folder:
    assert folder.record_config({"lr": 0.01, "steps": 6, "resume": False}, 0, None) == {}
    changed = folder.record_config({"lr": 0.05, "steps": 8, "resume": True}, 6,
                                   {"lr": 0.01, "steps": 6, "resume": False})
  assert changed == {"lr": (0.01, 0.05), "steps": (6, 8)}
  history = [json.loads(l) for l in (tmp_path / "config_history.jsonl").read_text().splitlines()]
  assert [(h["start_step"], h["config"]["lr"]) for h in history] == [(0, 0.01), (6, 0.05)]
  assert "lr: 0.05" in (tmp_path / "config.yaml").read_text()
