#!/usr/bin/env python3
"""Decode throughput of a transformers model with tp_lora attached: 8 adapters in the batch vs the base model.

    PYTHONPATH=. python scripts/bench_transformers.py --out docs/bench/transformers.json [--model llama-1b]

World 1 (a one-rank NCCL group on CUDA, gloo on CPU), bf16 on CUDA. A randomly initialised Llama of the
``--model`` shape (no download) is built by transformers itself; 8 synthetic PEFT adapters (rank 16, every
linear module of every layer) are registered and activated in tp_lora. The same batch of ``--batch``
requests (prompt ``--prompt`` tokens) is decoded greedily for ``--new`` tokens through transformers'
``generate`` three ways: the bare model (tp_lora not attached), attached with every request on the base
model (None), and attached with the requests spread over the 8 adapters. Reports decode tokens/s
(batch * new tokens / time of the generate call, median of ``--repeats``) and writes JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

SHAPES = {  # Llama-style shapes (hidden, layers, heads, kv heads, intermediate, vocab)
    "llama-1b": (2048, 16, 32, 8, 8192, 32000),
    "llama-tiny": (256, 2, 8, 4, 512, 1000),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-1b", choices=sorted(SHAPES))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None, help="write the JSON here")
    args = ap.parse_args()

    import transformers

    from tp_lora import LoRAConfig
    from tp_lora.integrations.transformers import attach, build_manager
    from tp_lora.job.synthetic import write_synthetic_adapter

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda", 0) if cuda else torch.device("cpu")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1,
                            **({"device_id": dev} if cuda else {}))
    dtype = torch.bfloat16 if cuda else torch.float32
    h, L, nh, kvh, inter, vocab = SHAPES[args.model]
    cfg = transformers.LlamaConfig(hidden_size=h, num_hidden_layers=L, num_attention_heads=nh,
                                   num_key_value_heads=kvh, intermediate_size=inter, vocab_size=vocab,
                                   max_position_embeddings=4096, eos_token_id=None, bos_token_id=None)
    torch.manual_seed(0)
    with torch.device(dev):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    model.generation_config.eos_token_id = None

    mgr = build_manager(model, LoRAConfig(max_loras=args.adapters, max_lora_rank=args.rank,
                                          dtype="bfloat16" if cuda else "float32", device=str(dev),
                                          target_modules=("q", "k", "v", "o", "gate", "up", "down")))
    names = [f"a{i}" for i in range(args.adapters)]
    tmp = Path(tempfile.mkdtemp(prefix="tp_lora_bench_tf_"))
    for i, n in enumerate(names):
        mgr.register(n, write_synthetic_adapter(tmp / n, mgr.model, rank=args.rank, seed=i,
                                                targets=("q", "k", "v", "o", "gate", "up", "down")))
    mgr.activate(names)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (args.batch, args.prompt), generator=g).to(dev)
    mask = torch.ones_like(ids)
    gen = dict(do_sample=False, num_beams=1, max_new_tokens=args.new, min_new_tokens=args.new, pad_token_id=0)

    def timed(fn) -> float:
        times = []
        for _ in range(args.repeats + 1):   # the first run warms up (kernels, allocator)
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = fn()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            assert out.shape == (args.batch, args.new), out.shape
        return statistics.median(times[1:])

    bare = timed(lambda: model.generate(input_ids=ids, attention_mask=mask, **gen)[:, args.prompt:])
    lora = attach(model, mgr)
    base_rows = timed(lambda: lora.generate(ids, [None] * args.batch, args.new))
    mixed = [names[b % len(names)] for b in range(args.batch)]
    with_lora = timed(lambda: lora.generate(ids, mixed, args.new))
    # the adapters really act (not a benchmark of a no-op)
    t_base = lora.generate(ids[:2], [None, None], 4)
    t_lora = lora.generate(ids[:2], mixed[:2], 4)
    toks = args.batch * args.new
    res = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
        "model": args.model, "shape": dict(zip(("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab"),
                                               SHAPES[args.model])),
        "dtype": str(dtype).replace("torch.", ""), "batch": args.batch, "prompt": args.prompt, "new_tokens": args.new,
        "adapters": args.adapters, "lora_rank": args.rank, "backend": "TorchBackend",
        "tokens_per_s": {"bare_model": toks / bare, "attached_all_base": toks / base_rows,
                         "attached_8_adapters": toks / with_lora},
        "seconds": {"bare_model": bare, "attached_all_base": base_rows, "attached_8_adapters": with_lora},
        "lora_changes_tokens": bool((t_base != t_lora).any()),
    }
    res["ratio_8_adapters_vs_bare"] = res["tokens_per_s"]["attached_8_adapters"] / res["tokens_per_s"]["bare_model"]
    print(f"{'case':<24}{'tokens/s':>12}{'s':>10}")
    for k, v in res["tokens_per_s"].items():
        print(f"{k:<24}{v:>12.1f}{res['seconds'][k]:>10.3f}")
    print(f"8 adapters / bare: {res['ratio_8_adapters_vs_bare']:.3f}; adapters change tokens: "
          f"{res['lora_changes_tokens']}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=2))
    mgr.close()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
