"""Local transformers engine (CPU or CUDA) with its own decode loop.

The package, one job per module:
    engine.py     HFEngine: prompts in, Results out; prefill; the memory estimate
    scheduler.py  continuous batching: concurrent calls share one decode batch; rows join between
                  steps and leave in bulk; streaming; admission by rows and GPU memory; OOM
    batch.py      the decode batch as one object: its rows (what each sample has produced), cache,
                  mask, positions, per-row sampling parameters; sample, step, rebuild (leave/join)
    cache.py      the preallocated KV cache (BufferLayer), keys stored transposed on CPU
    attention.py  `aft_sdpa`: the decode step's attention as two matmuls (CPU)
    sampling.py   per-sample seeded uniform streams, inverse-CDF sampling, top-p/top-k
    text.py       a row's text decoded incrementally; stop strings looked for in the new tail only;
                  what may be streamed (a possible stop string's start is held back)
    fallback.py   transformers' `generate`, for model types the loop is not checked on (CHECKED_MODEL_TYPES
                  in engine.py: llama, qwen2; others log one line and fall back)

Continuous batching (scheduler.py): `generate` may be called from several threads at
once (`continuous = True`). Each call's requests are queued; the thread that finds
the loop idle drives it (and hands it to a waiting caller when its own call is done).
Between decode steps, queued requests are prefilled, their first token drawn, and
their rows join the running batch; finished rows leave. Each call returns when its
own requests are done; `on_text(request, completion, delta)` streams each completion.
Cache layout (batch.py): column t of the cache is position t of the batch; all rows
end at the last column (right-aligned, left padding masked out) and carry their own
position ids, so a row's attention and RoPE see exactly its own tokens wherever its
columns start. When rows leave or join, the cache is laid out anew (one copy): the
new length is the longest row, so a joining prompt longer than the batch shifts the
others right and columns no row needs any more are dropped. The copy is why rows
leave in bulk and join when it pays (scheduler.py's docstring says when).

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
    are done, or when new rows join): re-laying the cache copies it, so it is
    not done per row;
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
  * on a GPU rows are admitted while the batch fits 90% of the free memory
    (`chunk_bytes` estimates the KV cache, logits and prefill activations);
    out of memory anyway, a prefill is retried with fewer rows and a decode
    step sends the newest requests back to the queue (they resume from their
    tokens), down to one request, which then fails its call with a one-line
    error instead of CUDA's.
What is promised: the same requests with the same seeds, scheduled the same way
(the same calls, in the same order, joining at the same steps: e.g. one call
alone), give the same texts (same machine and software). A row's draws depend on
its seed alone (its own uniform stream, whatever the schedule), and its logits on
its own tokens alone, up to rounding: the matmul kernels round by shape and CPU
(a 2-core Intel Xeon with AVX-512 flipped a sampled token where an AMD EPYC did
not), so across schedules (alone, batched, joining a running batch, resumed after
an out-of-memory step) a sampled text is not promised equal. In float32 on the
tiny test models it is, greedy and sampled, and greedy output equals
`generate(do_sample=False)` token for token (tests/test_hf_engine.py,
tests/test_hf_scheduler.py). In bf16 nothing is bit-stable across shapes:
rounding follows the matmul shapes, and `generate`'s own greedy text changes
with its batch.
"""

from ..base import CHATML_TEMPLATE
from .cache import keys_transposed
from .engine import HFEngine

__all__ = ["CHATML_TEMPLATE", "HFEngine", "keys_transposed"]
