"""The tokdist-ray job: select tokens -> mine/generate snippets -> distill -> fit -> export -> evaluate.

    python jobs/expand_vocab.py                      # the CPU demo on a local Ray instance
    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/expand_vocab.py --config jobs/configs/demo_cpu.yaml --run_dir "$PWD/runs/demo"

(README.md, "Running the job", sets up the head and its token.)

Takes the same options as `tokdist-ray run` (see --help), including the reference
project's example.py flags. A resubmitted job skips the stages it already finished.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout or a `ray job submit` working dir
    sys.path.insert(0, str(ROOT))

from tokdist_ray.job.cli import main  # noqa: E402

DEMO = ROOT / "jobs" / "configs" / "demo_cpu.yaml"

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--config" not in args and not any(a.startswith("--config=") for a in args) and "-h" not in args and "--help" not in args:
        args = ["--config", str(DEMO), *args]
    sys.exit(main(["run", *args]))
