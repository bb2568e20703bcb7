"""Fine-tune a local Llama checkpoint on an Alpaca-style JSON file with FALQON.

  python examples/finetune_llama_alpaca.py --model /path/to/llama-7b-hf \\
      --data alpaca_data.json --output_dir runs/llama-alpaca --steps 1875 --rank 64

The model folder is a Hugging Face folder (config.json, *.safetensors, tokenizer files);
it is loaded without PyTorch. The data is a JSON/JSONL list of {instruction, input,
output}. Every other `falqon-jax finetune` flag passes through (e.g. --batch_size 16
--lr 2e-3 --reset all --rounding nearest for the reference's exact settings).
Afterwards: `falqon-jax eval RUN --mmlu mmlu/` and `falqon-jax export RUN OUT --format fp8`.
"""

import argparse
import sys

from falqon_jax import config as config_lib
from falqon_jax import finetune


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", required=True, help="local HF Llama folder")
  parser.add_argument("--data", required=True, help="Alpaca-style JSON or JSONL file")
  args, rest = parser.parse_known_args(argv)
  # The reference's setup: rank 64, 16 x (16 + 512) tokens, AdamW 2e-3, clip 3.0.
  defaults = {"rank": 64, "batch_size": 16, "lr": 2e-3, "max_grad_norm": 3.0,
              "data_format": "alpaca", "output_dir": "runs/llama-alpaca",
              "model": args.model, "data": args.data}
  cfg = config_lib.resolve(config_lib.FinetuneConfig, file_values=defaults, flags=rest)
  summary = finetune.run(cfg)
  return summary


if __name__ == "__main__":
  main(sys.argv[1:])
