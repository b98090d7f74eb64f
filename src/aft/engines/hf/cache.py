"""The preallocated KV cache: a `DynamicCache` whose full-attention layers are `BufferLayer`s.

A `BufferLayer` allocates `capacity` positions once per batch; a decode step writes one position in
place (transformers' `DynamicLayer` concatenates, copying the whole cache every step). Keys are stored
transposed on CPU (`keys_transposed`).
"""

from __future__ import annotations

import functools

import torch


def preallocated_cache(config, capacity: int):
    """A `DynamicCache` whose plain full-attention layers write into buffers of `capacity` positions."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache(config=config)
    layer_cls = buffer_layer_class()  # defined lazily: importing transformers is slow
    cache.layers = [layer_cls(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def keys_transposed(device) -> bool:
    """Whether the cache stores keys transposed, (b, h, d, capacity): on CPU only.

    On CPU the filled part, transposed, is a matrix per head with unit stride along positions, which a
    bf16 CPU matmul (q @ k^T) reads far faster than a slice of the (b, h, capacity, d) layout. On GPUs
    SDPA's fused kernels (flash, memory-efficient) need keys whose last dimension is contiguous; a
    transposed view sends every layer to the math kernel (fp32 copies, O(L^2) memory on a prefill).
    """
    return torch.device(device).type == "cpu"


@functools.cache
def buffer_layer_class():
    from transformers.cache_utils import DynamicLayer

    class BufferLayer(DynamicLayer):
        """A DynamicLayer that preallocates `capacity` positions and returns views of the filled part.

        Same semantics as DynamicLayer, without the per-step `torch.cat` of the whole cache.
        """

        def __init__(self, capacity: int):
            super().__init__()
            self.capacity, self.length = capacity, 0

        def lazy_initialization(self, key_states, value_states, batch: int | None = None):
            self.dtype, self.device = key_states.dtype, key_states.device
            b, h, _, d = key_states.shape
            self.transposed = keys_transposed(self.device)
            # Zeros, not empty: padding positions are masked, but 0 x NaN would still be NaN.
            kshape = (batch or b, h, d, self.capacity) if self.transposed else (batch or b, h, self.capacity, d)
            self._alloc(key_states.new_zeros(kshape),
                        value_states.new_zeros((batch or b, h, self.capacity, value_states.shape[-1])))
            self.is_initialized = True

        def _alloc(self, kstore, vbuf) -> None:
            self.kstore, self.vbuf = kstore, vbuf
            # (b, h, capacity, d), as DynamicLayer's keys: a view of the transposed store on CPU
            self.kbuf = kstore.transpose(-1, -2) if self.transposed else kstore
            self.set_length(self.length)

        def set_length(self, n: int) -> None:
            self.length = n
            self.keys, self.values = self.kbuf[:, :, :n], self.vbuf[:, :, :n]

        def rebuild(self, keep: torch.Tensor, end: int, width: int, length: int, capacity: int, joins) -> None:
            """Lay the rows out anew in buffers of `capacity` positions, each row's last position at `length` - 1:
            first the rows `keep` of this layer with their `width` positions before `end`, then each join's rows
            (`joins`: (keys, values, index), keys (b, h, n, d) of a prefill, rows `index` of them)."""
            ref_v = self.vbuf if self.is_initialized else joins[0][1]
            if not self.is_initialized:
                self.dtype, self.device = ref_v.dtype, ref_v.device
                self.transposed = keys_transposed(self.device)
                dk = joins[0][0].shape[-1]
                self.is_initialized = True
            else:
                dk = self.kbuf.shape[-1]
            rows = len(keep) + sum(len(index) for _, _, index in joins)
            heads, dv = ref_v.shape[1], ref_v.shape[-1]
            kstore = ref_v.new_zeros((rows, heads, dk, capacity) if self.transposed else (rows, heads, capacity, dk))
            vbuf = ref_v.new_zeros((rows, heads, capacity, dv))
            kbuf = kstore.transpose(-1, -2) if self.transposed else kstore
            if len(keep) and width:
                kbuf[:len(keep), :, length - width:length] = self.kbuf[keep, :, end - width:end]
                vbuf[:len(keep), :, length - width:length] = self.vbuf[keep, :, end - width:end]
            r = len(keep)
            for keys, values, index in joins:
                n = keys.shape[-2]
                kbuf[r:r + len(index), :, length - n:length] = keys[index]
                vbuf[r:r + len(index), :, length - n:length] = values[index]
                r += len(index)
            self.capacity = capacity
            self._alloc(kstore, vbuf)
            self.set_length(length)

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n = self.length + key_states.shape[-2]
            if n > self.capacity:  # not expected (capacity covers prompt + max_tokens); grow rather than fail
                self.capacity = max(n, 2 * self.capacity)
                self._alloc(_grow(self.kstore, self.capacity, -1 if self.transposed else -2),
                            _grow(self.vbuf, self.capacity, -2))
            self.kbuf[:, :, self.length:n] = key_states
            self.vbuf[:, :, self.length:n] = value_states
            self.set_length(n)
            return self.keys, self.values

        def reorder_columns(self, index: torch.Tensor) -> None:
            """Column j of row r takes column index[r, j], for j < index.shape[1] (speculative decoding drops
            its holes with this: see batch.py)."""
            n = index.shape[1]
            for buf in (self.kbuf, self.vbuf):
                i = index[:, None, :, None].expand(buf.shape[0], buf.shape[1], n, buf.shape[-1])
                buf[:, :, :n] = buf[:, :, :n].gather(2, i)

        def get_seq_length(self) -> int:
            return self.length

        def reset(self) -> None:
            self.length = 0
            super().reset()

        def crop(self, tokens_to_remove: int) -> None:
            raise NotImplementedError("BufferLayer does not crop")

        def batch_repeat_interleave(self, repeats: int) -> None:
            self.batch_select_indices(torch.arange(self.vbuf.shape[0], device=self.vbuf.device).repeat_interleave(repeats))

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            if self.is_initialized:
                self._alloc(self.kstore[indices], self.vbuf[indices])

    return BufferLayer


def _grow(buf: torch.Tensor, capacity: int, dim: int) -> torch.Tensor:
    shape = list(buf.shape)
    shape[dim] = capacity
    new = buf.new_zeros(shape)
    new.narrow(dim, 0, buf.shape[dim]).copy_(buf)
    return new
