"""Seeds x hyperparameter grids in one compiled program per group of runs (``ppojax.cli`` parses the flags,
``ppojax.train.sweep_job`` runs it).

    python experiments/sweep.py --config configs/offline.yaml --seeds 4 --grid ppo.clip_eps=0.1,0.2,0.3
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from ppojax.cli import sweep_main as main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
