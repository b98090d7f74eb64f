"""What `--dtype auto` would choose on this CPU for a model, with the probe's timings (not cached: always measures).

    python benchmarks/probe_dtype.py [--model smollm2-135m] [--repeats 3]
    ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/probe_dtype.py   # without bf16 instructions

Prints, per repeat, the probe's score (ms of its weighted matmul mix, see aft/dtype_probe.py) in bf16
and fp32, the seconds the probe took, and the choice.
"""

from __future__ import annotations

import argparse
import os
import time

from transformers import AutoConfig

from aft.dtype_probe import layer_shapes, machine_key, probe
from aft.models import resolve


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    shapes = layer_shapes(AutoConfig.from_pretrained(resolve(args.model).path))
    print(machine_key(shapes), f"| ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', '')}")
    for _ in range(args.repeats):
        t = time.perf_counter()
        ms = probe(shapes)
        print(f"bf16 {ms['bfloat16']:.0f} ms  fp32 {ms['float32']:.0f} ms  probe {time.perf_counter() - t:.2f} s  "
              f"-> {min(ms, key=ms.get)}")


if __name__ == "__main__":
    main()
