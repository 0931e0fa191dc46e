"""The script launchers run: `deepspeed --num_gpus 2 trainer/main.py sft --config ...`,
`torchrun --nproc_per_node 2 trainer/main.py ...`. Same as `lastmile ...`."""

import sys
from pathlib import Path

# Run as a script, Python puts trainer/ itself first on sys.path, where our module names could
# shadow installed packages; use the project root instead.
_here = str(Path(__file__).resolve().parent)
sys.path = [p for p in sys.path if str(Path(p or ".").resolve()) != _here]
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
