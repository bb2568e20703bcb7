"""A small numpy reader/writer for the safetensors format (no torch, bf16 and fp8 included).

Format: an 8-byte little-endian header length, a JSON header mapping each tensor name to
``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the end of the
header) plus an optional ``"__metadata__"`` dict of strings, then the raw bytes, C order.
Reading memory-maps the file, so a tensor costs host memory only once it is copied.
"""

from __future__ import annotations

import glob
import json
import os
import struct
from typing import Iterator, Mapping, Optional

import ml_dtypes
import numpy as np

from falqon_jax.errors import UserInputError

DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


def read_header(path: str) -> dict:
  """The JSON header of a safetensors file (without ``__metadata__``)."""
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) != 8:
      raise UserInputError(f"{path}: not a safetensors file (shorter than 8 bytes)")
    (n,) = struct.unpack("<Q", raw)
    if n > _MAX_HEADER:
      raise UserInputError(f"{path}: not a safetensors file (header length {n})")
    try:
      header = json.loads(f.read(n))
    except ValueError as e:
      raise UserInputError(f"{path}: corrupt safetensors header ({e})") from None
  if not isinstance(header, dict):
    raise UserInputError(f"{path}: corrupt safetensors header (not a JSON object)")
  header.pop("__metadata__", None)
  return header


def iter_tensors(path: str, names: Optional[set] = None) -> Iterator[tuple[str, np.ndarray]]:
  """Yields ``(name, array)`` for the tensors of one file; arrays are read-only memmaps."""
  header = read_header(path)
  with open(path, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
  start = 8 + n
  size = os.path.getsize(path)
  for name, info in header.items():
    if names is not None and name not in names:
      continue
    dtype = DTYPES.get(info["dtype"])
    if dtype is None:
      raise UserInputError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
    begin, end = info["data_offsets"]
    shape = tuple(info["shape"])
    count = int(np.prod(shape, dtype=np.int64))
    if end - begin != count * dtype.itemsize or start + end > size:
      raise UserInputError(f"{path}: tensor {name!r} has inconsistent offsets (truncated file?)")
    if count == 0:
      yield name, np.zeros(shape, dtype)
      continue
    arr = np.memmap(path, dtype=dtype, mode="r", offset=start + begin, shape=shape)
    yield name, arr


def save_file(tensors: Mapping[str, np.ndarray], path: str, metadata: Optional[dict] = None):
  """Writes ``{name: array}`` to ``path`` in safetensors format."""
  header, offset, arrays = {}, 0, []
  for name in sorted(tensors):
    arr = np.asarray(tensors[name])
    if not arr.flags.c_contiguous:
      arr = np.ascontiguousarray(arr)  # (ascontiguousarray would make a 0-d array 1-d)
    if arr.dtype not in NAMES:
      raise TypeError(f"tensor {name!r}: dtype {arr.dtype} cannot be stored in safetensors")
    header[name] = {
        "dtype": NAMES[arr.dtype],
        "shape": list(arr.shape),
        "data_offsets": [offset, offset + arr.nbytes],
    }
    offset += arr.nbytes
    arrays.append(arr)
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # keep the data 8-byte aligned
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for arr in arrays:
      f.write(arr.tobytes())


INDEX = "model.safetensors.index.json"


def read_json(path: str) -> dict:
  """A JSON object from a file (a config or an index); a damaged file is a one-line error."""
  with open(path) as f:
    try:
      value = json.load(f)
    except ValueError as e:  # also a file that is not UTF-8
      raise UserInputError(f"{path}: not valid JSON ({e}); repair or regenerate it") from None
  if not isinstance(value, dict):
    raise UserInputError(f"{path}: expected a JSON object, got {type(value).__name__}")
  return value


def weight_files(folder: str) -> list[str]:
  """The safetensors shards of a checkpoint folder: those its index file lists, else
  ``model.safetensors`` (as transformers reads it: a Hub folder may also hold other files,
  such as Mistral's ``consolidated.safetensors``), else the one ``*.safetensors`` there is;
  possibly none."""
  index = os.path.join(folder, INDEX)
  if not os.path.isfile(index):
    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(single):
      return [single]
    found = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if len(found) > 1:
      raise UserInputError(
          f"{folder}: {len(found)} *.safetensors files but no model.safetensors or {INDEX};"
          " add the index file that says which to read")
    return found
  weight_map = read_json(index).get("weight_map")
  if not isinstance(weight_map, dict) or not weight_map:
    raise UserInputError(f"{index}: no weight_map; regenerate the index file")
  files = sorted(set(weight_map.values()))
  for name in files:
    if not os.path.isfile(os.path.join(folder, name)):
      raise FileNotFoundError(f"{index} lists shard {name!r}, which is missing; download it"
                              " again or regenerate the index")
  return [os.path.join(folder, name) for name in files]
