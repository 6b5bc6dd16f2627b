#!/usr/bin/env python
"""PPO-RLHF of a language model: the main job.

    python experiments/ppo_gpt2.py                                  # default: configs/smollm2_sentiment.yaml
    python experiments/ppo_gpt2.py --config configs/offline.yaml    # the tiny random GPT-2 task, for smoke runs
    python experiments/ppo_gpt2.py --config configs/gpt2_sentiment.yaml --run-dir runs/sentiment
    python experiments/ppo_gpt2.py --set ppo.batch_size=32 --set optimizer.learning_rate=3e-4
    python experiments/ppo_gpt2.py --import mypkg.rewards --set reward.kind=my_reward
    python experiments/ppo_gpt2.py --help-config                    # every config field, documented

Rerunning the same command on an existing --run-dir resumes from its latest usable checkpoint; one job at a time
per --run-dir (a second one exits with code 2 naming the first). ``ppojax.cli`` parses the flags; the library's
``ppojax.train.build_run`` builds the run and ``Run.train`` drives it.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from ppojax.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
