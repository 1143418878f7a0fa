"""Shared test helpers: independent references (``runtime_ref``, ``tp_reference``), adapter writers,
the hostile corpus, peft fixtures and the multi-process runner (``distributed``). ``tests/conftest.py``
puts ``tests/`` on ``sys.path`` so ``from support.x import ...`` works from every test folder and from
the processes ``distributed`` spawns."""
