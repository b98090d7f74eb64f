"""Local transformers engine (CPU or CUDA) with its own decode loop.

The package, one job per module:
    engine.py     HFEngine: prompts in, Results out; prefill, chunks by rows and GPU memory, OOM split
    batch.py      the decode batch as one object: its rows (what each sample has produced), cache,
                  mask, positions, per-row sampling parameters; sample, step, compact
    cache.py      the preallocated KV cache (BufferLayer), keys stored transposed on CPU
    attention.py  `aft_sdpa`: the decode step's attention as two matmuls (CPU)
    sampling.py   per-sample seeded uniform streams, inverse-CDF sampling, top-p/top-k
    text.py       a row's text decoded incrementally; stop strings looked for in the new tail only

Why our own loop rather than `model.generate` (benchmarks/bench_infer.py
measures the two side by side on the propose-and-aggregate workload):
  * the n samples of one prompt share a single prefill (the KV cache is
    expanded to n rows afterwards); `generate(num_return_sequences=n)`
    prefills n copies;
  * the KV cache is preallocated once per batch (`BufferLayer`): a decode
    step writes one position in place, where transformers' `DynamicCache`
    concatenates, copying the whole cache at every step (O(T) per token:
    32 rows x 300 positions took 184 ms a step with DynamicCache, 78 ms
    preallocated, SmolLM2-135M bf16 on 2 cores);
  * finished rows leave the batch, but in bulk (when a quarter of the rows
    are done): compacting the cache copies it, so it is not done per row;
  * sampling sorts the vocabulary only when it must: top-p/top-k take a
    `topk` of the few most likely tokens (widened until it holds the whole
    nucleus), and plain temperature sampling needs no ordering at all.
    Sorting 32 x 49k probabilities took ~45 ms a step, half a forward pass;
  * each sample draws from its own seeded stream of uniforms (inverse-CDF
    sampling), so a sample's random draws depend on its seed alone, not on
    what else shares the batch;
  * on CPU, prompts are prefilled without padding (grouped by length), so
    attention runs SDPA's causal fast path: a padded batch needs an explicit mask, with
    which SDPA's CPU kernel is slow (8 aggregator prompts, 5k tokens: 4.7 s
    padded, 3.3 s grouped);
  * on CPU, a decode step's attention (one query token) runs as two batched
    matmuls over the key/value heads (`aft_sdpa`, registered with
    transformers' AttentionInterface; SDPA for everything else), over keys
    stored transposed (a bf16 CPU matmul reads a slice of the usual layout far
    more slowly, copying it first): 0.37 against
    1.13 ms a layer at 32 rows x 200 positions, 0.34 against 0.46 at 8 x 700
    (benchmarks/probe_attention.py). On GPUs keys keep the usual layout
    (`keys_transposed`): SDPA's fused kernels need a contiguous last dimension;
  * on a GPU a chunk holds what fits 90% of the free memory (`chunk_bytes`
    estimates the KV cache, logits and prefill activations), and a chunk that
    runs out of memory anyway is split in two, down to one request, which then
    fails with a one-line error instead of CUDA's.
What is promised: the same requests in the same batch with the same seeds give
the same texts (same machine and software). A request's logits can differ in
the last bits alone against batched, since the matmul kernels round by shape
and CPU (a 2-core Intel Xeon with AVX-512 flipped a sampled token where an AMD
EPYC did not), so a sampled text is not promised equal alone and batched.
In float32, greedy output equals `generate(do_sample=False)` token for token
(tests/test_hf_engine.py). In bf16 neither is bit-stable: rounding follows the
matmul shapes, and `generate`'s own greedy text changes with its batch.
"""

from ..base import CHATML_TEMPLATE
from .cache import keys_transposed
from .engine import HFEngine

__all__ = ["CHATML_TEMPLATE", "HFEngine", "keys_transposed"]
