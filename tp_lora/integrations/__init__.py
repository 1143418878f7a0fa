"""Adapters that embed tp_lora as the LoRA backend of third-party inference engines.

Each integration imports its engine lazily: ``import tp_lora`` never needs transformers.
"""
