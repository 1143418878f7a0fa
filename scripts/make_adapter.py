#!/usr/bin/env python
"""Write a seeded synthetic PEFT adapter of a model preset's shape.

A thin wrapper of ``tp-lora write-adapter`` (same options, same code, same exit status), e.g.::

    python scripts/make_adapter.py /tmp/a1 --model tiny-moe --rank 8 --fused-experts
"""

from __future__ import annotations

import argparse
import sys

from tp_lora.job import console
from tp_lora.job.cli import add_write_adapter_arguments, write_adapter_from_args


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="make_adapter.py", description=__doc__.splitlines()[0],
                                 parents=[console.common_options()])
    add_write_adapter_arguments(ap)
    args = ap.parse_args(argv)
    return console.run_command("make_adapter.py", lambda: write_adapter_from_args(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
