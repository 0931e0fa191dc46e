"""The script launchers run: `deepspeed --num_gpus 2 trainer/main.py sft --config ...`,
`torchrun --nproc_per_node 2 trainer/main.py ...`. Same as `lastmile ...`.

It imports the installed package `lastmile` (this folder, installed by `make install` or
`pip install -e .`), exactly as the console script does. Run as a script, Python puts this folder
first on sys.path, where our module names (`config`, `data`, `metrics`, ...) could shadow installed
packages, so it is removed first; nothing else is added."""

import sys
from pathlib import Path

_here = Path(__file__).resolve().parent
sys.path = [p for p in sys.path if Path(p or ".").resolve() != _here]

try:
    from lastmile.cli import main
except ModuleNotFoundError as e:
    if e.name != "lastmile":
        raise
    sys.exit(f"error: the package `lastmile` is not installed in this Python ({sys.executable}). "
             "Run `make install` (or `pip install -e .` in the project root) and use that environment.")

if __name__ == "__main__":
    sys.exit(main())
