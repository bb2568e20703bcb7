"""The examples run: the notebook's code cells, and the Llama + Alpaca script."""

import importlib.util
import json
import os
import pathlib

import pytest

import tiny_models

EXAMPLES = pathlib.Path(__file__).parents[1] / "examples"


@pytest.mark.slow
def test_notebook_code_cells_run():
  nb = json.loads((EXAMPLES / "falqon_jax_training_loop.ipynb").read_text())
  source = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
  source = source.replace("STEPS = 200", "STEPS = 3")
  namespace = {}
  exec(compile(source, "falqon_jax_training_loop.ipynb", "exec"), namespace)
  assert int(namespace["opt_state"].count) == 3


@pytest.mark.slow
def test_finetune_llama_alpaca_script_on_a_local_checkpoint(tmp_path):
  from falqon_jax import export

  export.save_bf16(str(tmp_path / "llama"), *tiny_models.functional("llama", vocab_size=272))
  rows = [{"instruction": f"Add {i} and {i + 1}.", "input": "", "output": str(2 * i + 1)}
          for i in range(48)]
  (tmp_path / "alpaca.json").write_text(json.dumps(rows))
  spec = importlib.util.spec_from_file_location("ex", EXAMPLES / "finetune_llama_alpaca.py")
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  summary = script.main(["--model", str(tmp_path / "llama"), "--data", str(tmp_path / "alpaca.json"),
                         "--tokenizer", "byte", "--rank", "16", "--steps", "4", "--batch_size", "8",
                         "--eval_examples", "4", "--eval_every", "4", "--log_every", "2",
                         "--output_dir", str(tmp_path / "run"), "--no-progress"])
  assert summary["steps"] == 4 and summary["melded_layers"] == 14
  assert "eval_loss" in summary["final"]
  assert os.path.isdir(tmp_path / "run" / "checkpoints" / "4")
