"""Evaluate a model on a task's held-out prompts, after training (or before it, on the base model).

    python experiments/evaluate.py --model runs/smollm2_arithmetic/export --task arithmetic \
        --config configs/smollm2_arithmetic.yaml --out runs/smollm2_arithmetic/eval.json
    python experiments/evaluate.py --model HuggingFaceTB/SmolLM2-135M-Instruct --task arithmetic \
        --config configs/smollm2_arithmetic.yaml          # the base model, offline from its GGUF

``--model`` is an export directory, a hub id or a ``.gguf`` file. It prints a short table and, with ``--out``,
writes JSON with ``accuracy`` (verifiable tasks), ``score_mean``, the settings and ``items`` (one per prompt:
``prompt``, ``response``, ``target``, ``correct`` / ``score``). With ``--config`` (a config file or a run's
``config.yaml``) the task's settings, the prompt rendering and the generation length are the run's, so the numbers
are the ones its ``eval/`` rows logged. ``--samples K`` samples K responses per prompt and adds pass@K and mean@K.
``ppojax.cli`` parses the flags; ``ppojax.train.Run.evaluate`` does the work.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from ppojax.cli import evaluate_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(evaluate_main())
