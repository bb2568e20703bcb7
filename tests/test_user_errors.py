"""Bad user input raises falqon_jax.UserInputError (a ValueError) with a one-line message,
and the CLI reports it as one line with exit status 2; counts take numpy ints, not bools."""

import csv
import json
import os

import jax
import numpy as np
import optax
import pytest

import falqon_jax
import tiny_models
from falqon_jax import checkpoint, cli, config, data, export, fp8, kernels, models, train
from falqon_jax import _safetensors as st
from falqon_jax import eval as fe
from falqon_jax.errors import UserInputError

TOK = data.ByteTokenizer()  # vocab 272: the tiny models below share it


def _tiny_llama(**kw):
  return tiny_models.functional("llama", vocab_size=TOK.vocab_size, num_hidden_layers=1, **kw)


@pytest.fixture(scope="module")
def llama():
  return _tiny_llama()


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, llama):
  """A 1-layer Llama HF folder (config.json, bf16 safetensors)."""
  model, params = llama
  return export.save_bf16(str(tmp_path_factory.mktemp("hf") / "llama"), model, params)


def _mmlu(root):
  rows = [("1+1?", "1", "2", "3", "4", "B"), ("2+2?", "4", "5", "6", "7", "A")]
  for split in ("dev", "test"):
    os.makedirs(root / split)
    with open(root / split / f"math_{split}.csv", "w", newline="") as f:
      csv.writer(f).writerows(rows)
  return str(root)


def _one_line_user_error(excinfo):
  e = excinfo.value
  assert isinstance(e, UserInputError) and isinstance(e, ValueError), type(e)
  assert "\n" not in str(e) and str(e), str(e)


def test_user_error_classes_share_one_base():
  assert falqon_jax.UserInputError is UserInputError and issubclass(UserInputError, ValueError)
  for cls in (config.ConfigError, data.DataError, checkpoint.CheckpointError,
              checkpoint.ResumeMismatchError):
    assert issubclass(cls, UserInputError), cls
  assert set(cli.user_errors()) == {UserInputError, OSError}


def _melded(shape=(64, 32), scaling="tensor"):
  kernel = jax.random.normal(jax.random.key(0), shape)
  return falqon_jax.meld({"w": {"kernel": kernel}}, rank=16, scaling=scaling)[0]


CORE_CASES = {
    "batch not divisible by devices": (
        lambda: train.DataParallel().check_batch_size(6), "not divisible by the 4 devices"),
    "rank above the kernel": (
        lambda: falqon_jax.meld_kernel(np.ones((64, 32), np.float32), rank=48),
        r"rank must be in \[1, min\(in, out\)\] = \[1, 32\]"),
    "targeted kernel shape": (
        lambda: falqon_jax.meld({"w": {"kernel": np.ones((40, 64), np.float32)}}, 16,
                                targets="w"), "multiples of 16"),
    "targets match nothing": (
        lambda: falqon_jax.meld({"w": {"kernel": np.ones((64, 64), np.float32)}}, 16,
                                targets="q_proj"), "matched no parameter"),
    "targets bad regex": (
        lambda: falqon_jax.meld({}, 16, targets="(q"), "not a valid regex"),
    "top_k above rows": (
        lambda: falqon_jax.proxy_update(optax.adam(1e-3), top_k=64).init(_melded()),
        "top_k=64 exceeds the 32 rows"),
    "warmup_steps": (
        lambda: falqon_jax.proxy_update(optax.adam(1e-3), topk_warmup_steps=-1),
        "topk_warmup_steps must be"),
    "reset option": (
        lambda: falqon_jax.proxy_update(optax.adam(1e-3), reset="some"), "reset must be one of"),
    "rounding option": (
        lambda: falqon_jax.merge_top_k(_melded()["w"]["kernel"], 2, rounding="up"),
        "rounding must be one of"),
    "merge k": (lambda: falqon_jax.merge_top_k(_melded()["w"]["kernel"], 0), "k must be an int"),
    "fp8 format": (lambda: fp8.get_format("e3m4"), "unsupported FP8 format"),
    "kernel implementation": (
        lambda: kernels.quantize(np.ones((16, 16), np.float32), implementation="cuda"),
        "implementation must be one of"),
    "kernel axis": (
        lambda: kernels.quantize(np.ones((16, 16), np.float32), axis=0), "axis must be None"),
    "kernel NaN": (
        lambda: falqon_jax.meld_kernel(np.full((32, 32), np.nan, np.float32), 16),
        "contains NaN or Inf"),
}


@pytest.mark.parametrize("case", sorted(CORE_CASES))
def test_core_bad_input_is_a_user_error(case):
  call, msg = CORE_CASES[case]
  with pytest.raises(UserInputError, match=msg) as excinfo:
    call()
  _one_line_user_error(excinfo)


def test_save_fp8_refusals_are_user_errors(llama, tmp_path):
  model, params = llama
  with pytest.raises(UserInputError, match="params hold no MeldedKernel") as excinfo:
    export.save_fp8(str(tmp_path / "plain"), model, params)
  _one_line_user_error(excinfo)
  lm = model.merge(params)
  falqon_jax.nnx.meld(lm, rank=16, scaling="row")
  with pytest.raises(UserInputError, match="uses scaling='row'") as excinfo:
    export.save_fp8(str(tmp_path / "row"), *models.split(lm))
  _one_line_user_error(excinfo)
  assert os.listdir(tmp_path) == []  # refused before anything was written


def _copy_config(hf_folder, folder):
  os.makedirs(folder)
  with open(os.path.join(hf_folder, "config.json")) as f:
    cfg = f.read()
  with open(os.path.join(folder, "config.json"), "w") as f:
    f.write(cfg)
  return folder


def test_damaged_hf_folders_are_user_errors(hf_folder, tmp_path):
  bad = _copy_config(hf_folder, str(tmp_path / "index"))
  with open(os.path.join(bad, st.INDEX), "w") as f:
    f.write("{}")
  with pytest.raises(UserInputError, match="no weight_map") as excinfo:
    models.load(bad)
  _one_line_user_error(excinfo)
  with open(os.path.join(bad, st.INDEX), "w") as f:
    f.write("{not json")
  with pytest.raises(UserInputError, match="not valid JSON") as excinfo:
    models.load(bad)
  _one_line_user_error(excinfo)
  extra = _copy_config(hf_folder, str(tmp_path / "extra"))
  st.save_file({"foo.weight": np.ones((2, 2), np.float32)}, os.path.join(extra, "model.safetensors"))
  with pytest.raises(UserInputError, match="unexpected tensor 'foo.weight'") as excinfo:
    models.load(extra)
  _one_line_user_error(excinfo)
  with open(os.path.join(extra, "config.json"), "w") as f:
    f.write("[1, 2]")
  with pytest.raises(UserInputError, match="expected a JSON object") as excinfo:
    models.load(extra)
  _one_line_user_error(excinfo)


@pytest.mark.parametrize("raw,msg", [
    (b"abc", "shorter than 8 bytes"),
    ((2**40).to_bytes(8, "little"), "header length"),
    ((3).to_bytes(8, "little") + b"{x}", "corrupt safetensors header"),
    ((6).to_bytes(8, "little") + b"[1, 2]", "not a JSON object"),
])
def test_corrupt_safetensors_are_user_errors(tmp_path, raw, msg):
  path = tmp_path / "model.safetensors"
  path.write_bytes(raw)
  with pytest.raises(UserInputError, match=msg) as excinfo:
    list(st.iter_tensors(str(path)))
  _one_line_user_error(excinfo)


def test_eval_bad_files_and_options_are_user_errors(llama, tmp_path):
  model, params = llama
  binary = tmp_path / "binary.txt"
  binary.write_bytes(b"ok \xff\xfe")
  cases = [
      (lambda: fe.perplexity(model, params, TOK, str(binary)), "not UTF-8 text"),
      (lambda: fe.perplexity(model, params, TOK, ["abc"], seq_len=1), "seq_len must be"),
      (lambda: fe.multiple_choice(model, params, TOK, str(tmp_path), k_shot=-1), "k_shot"),
      (lambda: fe.multiple_choice(model, params, TOK, str(tmp_path), limit=0), "limit"),
      (lambda: fe.generate(model, params, TOK, ["x"], max_new_tokens=0), "max_new_tokens"),
      (lambda: fe.generate(model, params, TOK, ["x"], temperature=float("nan")), "temperature"),
      (lambda: fe.generate(model, params, TOK, ["x"], temperature=-1.0), "temperature"),
  ]
  for call, msg in cases:
    with pytest.raises(UserInputError, match=msg) as excinfo:
      call()
    _one_line_user_error(excinfo)
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": "a"}\nnot json\n')
  with pytest.raises(UserInputError, match=rf"{bad}:2: not valid JSON") as excinfo:
    fe.perplexity(model, params, TOK, str(bad))
  _one_line_user_error(excinfo)
  mmlu = _mmlu(tmp_path / "mmlu")
  with open(os.path.join(mmlu, "test", "math_test.csv"), "ab") as f:
    f.write(b"q\xff,a,b,c,d,A\n")
  with pytest.raises(UserInputError, match="math_test.csv: not UTF-8 text") as excinfo:
    fe.multiple_choice(model, params, TOK, mmlu, k_shot=0)
  _one_line_user_error(excinfo)


# ------------------------------------------------------------------- counts: numpy ints


@pytest.mark.parametrize("kwargs", [
    dict(batch_size=True), dict(group_size=True), dict(seed=True), dict(process_count=True),
    dict(source_max_len=True), dict(target_max_len=True),
])
def test_batches_refuse_bools_as_counts(kwargs):
  with pytest.raises(data.DataError, match=f"{next(iter(kwargs))} must be"):
    data.Batches(data.synthetic_task(16), **{"batch_size": 4, **kwargs})


def test_batches_take_numpy_ints():
  examples = data.synthetic_task(np.int64(32), seed=3)
  kw = dict(source_max_len=16, target_max_len=32, group_size=2, seed=1, process_count=2,
            process_index=1)
  want = data.Batches(examples, batch_size=4, **kw)
  got = data.Batches(examples, batch_size=np.int64(4),
                     **{k: np.int32(v) for k, v in kw.items()})
  for _ in range(3):
    a, b = next(want), next(got)
    assert all(np.array_equal(a[k], b[k]) for k in a)  # integer ids: exact
  assert json.dumps(got.state()) == json.dumps(want.state())


def test_examples_counts_take_numpy_ints_not_bools():
  rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(3)]
  assert len(data.load_examples(rows, limit=np.int64(2))) == 2
  with pytest.raises(data.DataError, match="limit must be a positive int"):
    data.load_examples(rows, limit=True)
  assert data.synthetic_task(np.int64(3), seed=0) == data.synthetic_task(3, seed=0)
  with pytest.raises(data.DataError, match="n must be a non-negative int"):
    data.synthetic_task(True)


@pytest.mark.parametrize("kwargs", [
    dict(max_new_tokens=True), dict(top_k=True), dict(batch_size=True),
])
def test_generate_refuses_bools_as_counts(llama, kwargs):
  model, params = llama
  with pytest.raises(UserInputError, match=f"{next(iter(kwargs))} must be a positive int"):
    fe.generate_ids(model, params, TOK, [[1, 2]], **kwargs)


def test_multiple_choice_refuses_bools_as_counts(llama, tmp_path):
  model, params = llama
  for kwargs in (dict(k_shot=True), dict(limit=True), dict(batch_size=True)):
    with pytest.raises(UserInputError, match=f"{next(iter(kwargs))} must be"):
      fe.multiple_choice(model, params, TOK, str(tmp_path), **kwargs)


def test_eval_counts_take_numpy_ints(llama, tmp_path):
  model, params = llama
  prompts = [[TOK.bos_id, 5, 6], [TOK.bos_id, 7]]
  kw = dict(temperature=1.0, seed=2)
  want = fe.generate_ids(model, params, TOK, prompts, max_new_tokens=3, top_k=4, batch_size=2,
                         **kw)
  got = fe.generate_ids(model, params, TOK, prompts, max_new_tokens=np.int64(3),
                        top_k=np.int32(4), batch_size=np.int64(2), **kw)
  assert got == want  # the same compiled program on the same inputs
  mmlu = _mmlu(tmp_path / "mmlu")
  want = fe.multiple_choice(model, params, TOK, mmlu, k_shot=1, limit=1, batch_size=4)
  got = fe.multiple_choice(model, params, TOK, mmlu, k_shot=np.int64(1), limit=np.int64(1),
                           batch_size=np.int64(4))
  assert got == want


# ---------------------------------------------------------------------------------- CLI


def _cli_error(capsys, argv):
  assert cli.main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1, err
  return err[0]


def test_cli_unsupported_model_type_is_one_line(tmp_path, capsys):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
  err = _cli_error(capsys, ["eval", str(tmp_path), "--builtin"])
  assert ("unsupported model_type 'bert'; supported: llama, mistral, qwen2, qwen3, gemma,"
          " gemma2, gemma3_text, gpt2") in err


def test_cli_corrupt_weights_are_one_line(hf_folder, tmp_path, capsys):
  bad = _copy_config(hf_folder, str(tmp_path / "bad"))
  (tmp_path / "bad" / "model.safetensors").write_bytes(b"abc")
  err = _cli_error(capsys, ["eval", bad, "--builtin"])
  assert "model.safetensors: not a safetensors file" in err


@pytest.mark.parametrize("args,msg", [
    (["generate", "{hf}", "x", "--max_new_tokens", "0"], "max_new_tokens must be"),
    (["generate", "{hf}", "x", "--temperature", "nan"], "temperature must be"),
    (["eval", "{hf}", "--perplexity", "{tmp}/binary.txt"], "binary.txt: not UTF-8 text"),
    (["eval", "{hf}", "--perplexity", "{tmp}/a.txt", "--seq_len", "1"], "seq_len must be"),
    (["eval", "{hf}", "--mmlu", "{tmp}", "--limit", "0"], "limit must be"),
])
def test_cli_bad_eval_options_are_one_line(hf_folder, tmp_path, capsys, args, msg):
  (tmp_path / "binary.txt").write_bytes(b"\xff\xfe")
  (tmp_path / "a.txt").write_text("abc")
  err = _cli_error(capsys, [a.format(hf=hf_folder, tmp=tmp_path) for a in args])
  assert msg in err, err


@pytest.mark.parametrize("out,where", [
    ("{run}", "is the source folder"),
    ("{parent}", "holds the source folder"),
    ("{run}/sub", "is inside the source folder"),
    ("{parent}/link/sub", "is inside the source folder"),  # a link to the run folder
    ("{run}/../run", "is the source folder"),
])
def test_cli_export_refuses_the_source_folder(tmp_path, capsys, out, where):
  # Not a loadable run: the refusal must come before any model is loaded.
  run = tmp_path / "runs" / "run"
  run.mkdir(parents=True)
  (run / "config.yaml").write_text("model: /no/such/model\n")
  os.symlink(run, tmp_path / "runs" / "link")
  before = sorted(os.walk(tmp_path))
  out = out.format(run=run, parent=tmp_path / "runs")
  err = _cli_error(capsys, ["export", str(run), out, "--overwrite"])
  assert f"export folder {out!r} {where} {str(run)!r}" in err, err
  # A sibling whose name merely starts like the run's passes the check: loading the run
  # then stops at its missing model.
  err = _cli_error(capsys, ["export", str(run), str(tmp_path / "runs" / "run2")])
  assert "/no/such/model" in err and "export folder" not in err, err
  assert sorted(os.walk(tmp_path)) == before  # nothing written
