"""The main job's entry point, kept at ``python -m tp_lora.run`` (torchrun's ``-m`` form); see ``tp_lora.job.run``.

SIGTERM is caught before the job's modules (and torch) are imported: torchrun stops the other ranks as
soon as one fails, often while they are still importing, and each of them then still ends with its one
line (``stopped by SIGTERM``) and status 143 instead of dying silently.
"""

from __future__ import annotations

import sys

from .job import console


def _main() -> int:
    try:
        with console.sigterm_raises():
            from .job.run import main  # seconds under load: torch, the planner, the kernels' modules
    except console.Terminated as e:
        return console.report_failure("tp_lora.run", e, debug=console.debug_requested(sys.argv[1:]))
    return main()


if __name__ == "__main__":
    sys.exit(_main())
