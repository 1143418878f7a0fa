"""The main job's entry point, kept at ``python -m tp_lora.run`` (torchrun's ``-m`` form); see ``tp_lora.job.run``."""

from .job.run import main

if __name__ == "__main__":
    raise SystemExit(main())
