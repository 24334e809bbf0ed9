"""kivi: KIVI quantized KV caches (Liu et al., ICML 2024) as CUDA kernels generated and compiled (NVRTC) for the
layout you ask for, on PyTorch CUDA tensors.

Every tensor is used in place (``tensor.data_ptr()``: no copies) and every kernel runs on torch's current stream of
the cache's device, so kivi composes with the surrounding PyTorch work and with CUDA graphs. The cache's storage is
allocated as torch tensors, so torch's caching allocator owns it.

    import torch, kivi
    cache = kivi.KiviCache("kivi-2, llama-3-8b", batch=4, capacity=8192)
    cache.prefill(k, v)                 # [batch, num_kv_heads, tokens, head_dim] fp16 (bf16 with `dtype: bf16`)
    out = cache.decode(q, k_new, v_new) # q [batch, num_heads, head_dim]; k_new, v_new [batch, num_kv_heads, head_dim]
                                        # (v_new and out: value_head_dim where the spec gives values their own)
    out = cache.decode_tokens(q, k, v)  # q_len > 1 (causal): q [q_len, batch, num_heads, head_dim], ...

Bad input (a tensor on the CPU or another GPU, of another dtype or shape, a non-contiguous decode input, a length
beyond the capacity) raises ``ValueError`` or ``TypeError`` naming the value and the rule.
"""

from __future__ import annotations

from typing import Optional, Sequence

from . import _kivi

__all__ = ["KiviCache", "Module", "CUDA_MAJOR"]


#: The CUDA major version this build loads (libnvrtc.so.13 by default; 12 for a wheel built with
#: ``maturin build --no-default-features --features cuda-12``).
CUDA_MAJOR: int = _kivi.CUDA_MAJOR


def _pip_nvrtc() -> None:
    """Points kivi at the NVRTC that pip-installed PyTorch brings (the ``nvidia-cuda-nvrtc`` wheel under
    site-packages/nvidia) when no other is configured: KIVI_NVRTC and CUDA_HOME unset and no toolkit in
    /usr/local/cuda. kivi's own search (README, "Pointing kivi at CUDA") does not look in site-packages."""
    import importlib.util
    import os

    if os.environ.get("KIVI_NVRTC") or os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    if os.path.exists(f"/usr/local/cuda/lib64/libnvrtc.so.{CUDA_MAJOR}"):
        return
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return
    sub = "cu13/lib" if CUDA_MAJOR == 13 else "cuda_nvrtc/lib"
    for root in spec.submodule_search_locations:
        lib = os.path.join(root, sub, f"libnvrtc.so.{CUDA_MAJOR}")
        if os.path.exists(lib):
            os.environ["KIVI_NVRTC"] = lib
            return


_pip_nvrtc()

Module = _kivi.Module


def _torch():
    try:
        import torch
    except ImportError as e:  # pragma: no cover - torch is a run-time requirement
        raise ImportError("kivi needs PyTorch with CUDA (import torch failed: pip install torch)") from e
    return torch


class KiviCache:
    """One layer's KIVI KV cache for ``batch`` sequences of up to ``capacity`` tokens each, on one CUDA device.

    Keys are quantized per-channel and values per-token in blocks of R = ``residual_length`` tokens; the newest
    tokens stay in full precision (KIVI Algorithm 1). Tensors are ``self.dtype``: torch.float16, or torch.bfloat16
    for a spec with ``dtype: bf16``. Sequences may have different lengths (``prefill(..., lens=...)``). With
    ``paged=True`` the quantized blocks live in ``pages`` pages of R tokens addressed through ``block_table`` (an
    int32 ``[batch, entries_per_seq]`` CUDA tensor of page indices; entries are checked on the device).
    """

    def __init__(self, spec: str, batch: int, capacity: int, device=None, *, paged: bool = False,
                 block_table=None, pages: int = 0):
        torch = _torch()
        dev = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
        if dev.type != "cuda":
            raise ValueError(f"device {dev} is not a CUDA device")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        if batch < 1:
            raise ValueError(f"batch is {batch}, but it must be at least 1")
        self.device = dev
        self.module = _kivi.Module(spec, dev.index, paged)
        shape = self.module.shape()
        self.num_heads = shape["num_heads"]
        self.num_kv_heads = shape["num_kv_heads"]
        self.head_dim = shape["head_dim"]              # keys and queries
        self.value_head_dim = shape["value_head_dim"]  # values and outputs (head_dim unless the spec differs)
        self.residual_length = r = shape["residual_length"]
        # The activations' dtype (the spec's `dtype`): every q, k, v and output tensor has it.
        dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16}
        if shape["dtype"] not in dtypes:
            raise ValueError(f"the module's activation dtype {shape['dtype']!r} is not one of {sorted(dtypes)}")
        self.dtype = dtypes[shape["dtype"]]
        self.batch = batch
        if paged:
            if block_table is None:
                raise ValueError("a paged cache needs block_table (int32 [batch, entries_per_seq] on the device)")
            self._check(block_table, "block_table", torch.int32, None)
            if block_table.dim() != 2 or block_table.shape[0] != batch or not block_table.is_contiguous():
                raise ValueError(f"block_table must be a contiguous [batch {batch}, entries] tensor, "
                                 f"got {tuple(block_table.shape)}")
            if pages < 1:
                raise ValueError(f"pages is {pages}, but a paged cache needs at least 1")
            self.block_table = block_table
            self.per_seq = block_table.shape[1]
            self.pages = pages
            self.capacity = self.per_seq * r + shape["sink_tokens"]  # the sinks live beside the rings
        else:
            if capacity < 1:
                raise ValueError(f"capacity is {capacity}, but it must be at least 1")
            self.block_table = None
            self.per_seq = -(-max(capacity - shape["sink_tokens"], 1) // r)  # blocks; the sinks live beside the rings
            self.pages = 0
            self.capacity = capacity
        self.splits = self.module.graph_grid_splits(self.capacity)
        sizes = self.module.buffer_bytes(batch, self.per_seq, self.pages, paged, self.splits)
        self._buf = {name: torch.zeros(max(n, 16), dtype=torch.uint8, device=dev) for name, n in sizes.items()}
        self._lens = [torch.zeros(batch, dtype=torch.int32, device=dev) for _ in range(2)]
        self._cur = 0
        self.error_flag = torch.zeros(1, dtype=torch.int32, device=dev)
        self.lens = [0] * batch

    # -- checks ---------------------------------------------------------------------------------------------
    def _check(self, t, name, dtype, shape):
        torch = _torch()
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != self.device:
            raise ValueError(f"{name} is on {t.device}, but the cache is on {self.device}")
        if t.dtype != dtype:
            raise TypeError(f"{name} has dtype {t.dtype}, but it must be {dtype}")
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise ValueError(f"{name} has shape {tuple(t.shape)}, but it must be {tuple(shape)}")

    def _stream(self) -> int:
        return _torch().cuda.current_stream(self.device).cuda_stream

    def _cache_ptrs(self):
        return [self._buf[n].data_ptr() for n in ("k_codes", "k_params", "k_res", "v_codes", "v_scale", "v_mn",
                                                    "v_res")]

    def _table(self):
        return (self.block_table.data_ptr() if self.block_table is not None else 0), self.per_seq, self.pages

    # -- Algorithm 1 --------------------------------------------------------------------------------------------
    def reset(self):
        """Empties every sequence (lengths 0) and clears the error flag."""
        for t in self._lens:
            t.zero_()
        self.error_flag.zero_()
        self._buf["counters"].zero_()
        self.lens = [0] * self.batch

    def prefill(self, k, v, lens: Optional[Sequence[int]] = None):
        """Prefills empty sequences from ``k``, ``v``: ``self.dtype`` ``[batch, num_kv_heads, tokens, head_dim]`` CUDA
        tensors (``value_head_dim`` for ``v``; any strides with a unit last one, e.g. a transposed
        ``[batch, tokens, heads, dim]`` view).
        ``lens`` (default: all ``tokens``) gives each batch entry's length; rows past it are not read."""
        torch = _torch()
        if any(self.lens):
            raise ValueError(f"prefill needs empty sequences, these hold {self.lens} tokens: reset() first")
        for name, t, d in (("k", k, self.head_dim), ("v", v, self.value_head_dim)):
            self._check(t, name, self.dtype, None)
            if t.dim() != 4 or t.shape[0] != self.batch or t.shape[1] != self.num_kv_heads or t.shape[3] != d:
                raise ValueError(f"{name} has shape {tuple(t.shape)}, but it must be [batch {self.batch}, "
                                 f"num_kv_heads {self.num_kv_heads}, tokens, head_dim {d}]")
            if t.stride(3) != 1:
                raise ValueError(f"{name}'s head_dim must be contiguous (stride 1), it is {t.stride(3)}")
        if k.shape[:3] != v.shape[:3]:
            raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} differ in batch, heads or tokens")
        tokens = k.shape[2]
        lens = [tokens] * self.batch if lens is None else [int(n) for n in lens]
        if len(lens) != self.batch:
            raise ValueError(f"lens has {len(lens)} entries, but the batch is {self.batch}")
        bad = [n for n in lens if n < 0 or n > tokens or n > self.capacity]
        if bad:
            raise ValueError(f"lengths {bad} are outside [0, min(tokens {tokens}, capacity {self.capacity})]")
        max_len = max(lens)
        if max_len == 0:
            return
        self._lens[self._cur].copy_(torch.tensor(lens, dtype=torch.int32), non_blocking=False)
        rows = lambda t: (t.data_ptr(), t.stride(0), t.stride(1), t.stride(2))  # noqa: E731
        table, per_seq, pages = self._table()
        self.module.prefill(self._stream(), self.batch, rows(k), rows(v), self._lens[self._cur].data_ptr(),
                            max_len, self._cache_ptrs(), table, per_seq, pages, self.error_flag.data_ptr())
        self.lens = lens

    def decode(self, q, k_new, v_new, out=None, *, lse: bool = False, window: int = 0,
               softmax_scale: Optional[float] = None):
        """One decode step: appends ``k_new``, ``v_new`` (``self.dtype`` ``[batch, num_kv_heads, head_dim]``, with
        ``value_head_dim`` for ``v_new``) to every sequence and returns the attention of ``q`` (the same
        dtype, ``[batch, num_heads, head_dim]``) over its tokens (the new one included) in that dtype,
        ``[batch, num_heads, value_head_dim]`` (into ``out`` when given), then runs the flushes of Algorithm 1.
        With ``lse=True`` also returns the fp32 ``[batch, num_heads]`` log-sum-exp of the scaled scores.
        ``window`` > 0 attends the newest ``window`` tokens (after the sink tokens) and the sinks only;
        ``softmax_scale`` defaults to 1 / sqrt(head_dim). All inputs must be contiguous."""
        torch = _torch()
        b, h, hkv, d, dv = self.batch, self.num_heads, self.num_kv_heads, self.head_dim, self.value_head_dim
        self._check(q, "q", self.dtype, (b, h, d))
        self._check(k_new, "k_new", self.dtype, (b, hkv, d))
        self._check(v_new, "v_new", self.dtype, (b, hkv, dv))
        if out is None:
            out = torch.empty((b, h, dv), dtype=self.dtype, device=self.device)
        self._check(out, "out", self.dtype, (b, h, dv))
        for name, t in (("q", q), ("k_new", k_new), ("v_new", v_new), ("out", out)):
            if not t.is_contiguous():
                raise ValueError(f"{name} must be contiguous")
        if max(self.lens) + 1 > self.capacity:
            raise ValueError(f"a sequence of {max(self.lens)} tokens has no room in the capacity {self.capacity}")
        lse_t = torch.empty((b, h), dtype=torch.float32, device=self.device) if lse else None
        table, per_seq, pages = self._table()
        scratch = (self._buf["part_acc"].data_ptr(), self._buf["part_ml"].data_ptr(),
                   self._buf["counters"].data_ptr(), self.splits)
        grid = self.module.decode_splits(max(self.lens) + 1, window)
        self.module.decode(self._stream(), b, q.data_ptr(), k_new.data_ptr(), v_new.data_ptr(), out.data_ptr(),
                           lse_t.data_ptr() if lse else 0, self._lens[self._cur].data_ptr(),
                           self._lens[1 - self._cur].data_ptr(), self._cache_ptrs(), table, per_seq, pages,
                           scratch, grid, window, softmax_scale, self.error_flag.data_ptr())
        self._cur = 1 - self._cur
        self.lens = [n + 1 for n in self.lens]
        return (out, lse_t) if lse else out

    def decode_tokens(self, q, k_new, v_new, out=None, *, q_lens: Optional[Sequence[int]] = None,
                      lse: bool = False, window: int = 0, softmax_scale: Optional[float] = None):
        """Several new tokens per sequence (q_len > 1: draft-token verification, chunked prefill), causal:
        ``q`` ``[q_len, batch, num_heads, head_dim]``, ``k_new``, ``v_new``
        ``[q_len, batch, num_kv_heads, head_dim]`` (``value_head_dim`` for ``v_new`` and ``out``; token-major:
        token ``j``'s rows are one step's). Sequence ``b``
        takes its first ``q_lens[b]`` tokens (all ``q_len`` by default); token ``j`` attends to every earlier token
        and itself. Exactly ``q_lens[b]`` repeated ``decode`` steps (bit for bit), queued as ``q_len`` launches;
        rows past a sequence's ``q_lens[b]`` are neither read nor written (an error at token ``j`` leaves tokens
        before it appended: ``lens`` tells). Returns ``out``
        ``[q_len, batch, num_heads, head_dim]`` (and the ``[q_len, batch, num_heads]`` log-sum-exp with
        ``lse=True``)."""
        torch = _torch()
        b, h, hkv, d, dv = self.batch, self.num_heads, self.num_kv_heads, self.head_dim, self.value_head_dim
        self._check(q, "q", self.dtype, None)
        if q.dim() != 4 or q.shape[0] < 1:
            raise ValueError(f"q has shape {tuple(q.shape)}, but it must be [q_len >= 1, batch {b}, num_heads {h}, "
                             f"head_dim {d}]")
        t = q.shape[0]
        self._check(q, "q", self.dtype, (t, b, h, d))
        self._check(k_new, "k_new", self.dtype, (t, b, hkv, d))
        self._check(v_new, "v_new", self.dtype, (t, b, hkv, dv))
        if out is None:
            out = torch.empty((t, b, h, dv), dtype=self.dtype, device=self.device)
        self._check(out, "out", self.dtype, (t, b, h, dv))
        for name, x in (("q", q), ("k_new", k_new), ("v_new", v_new), ("out", out)):
            if not x.is_contiguous():
                raise ValueError(f"{name} must be contiguous")
        per_seq = [t] * b if q_lens is None else [int(n) for n in q_lens]
        if len(per_seq) != b:
            raise ValueError(f"q_lens has {len(per_seq)} entries, but the batch is {b}")
        bad = [n for n in per_seq if n < 0 or n > t]
        if bad:
            raise ValueError(f"q_lens entries {bad} are outside [0, q_len {t}]")
        full = [i for i, (n, m) in enumerate(zip(self.lens, per_seq)) if n + m > self.capacity]
        if full:
            raise ValueError(f"batch entries {full} have no room for their tokens in the capacity {self.capacity}")
        lse_t = torch.empty((t, b, h), dtype=torch.float32, device=self.device) if lse else None
        ql = torch.tensor(per_seq, dtype=torch.int32).to(self.device) if q_lens is not None else None
        table, per, pages = self._table()
        scratch = (self._buf["part_acc"].data_ptr(), self._buf["part_ml"].data_ptr(),
                   self._buf["counters"].data_ptr(), self.splits)
        grid = self.module.decode_splits(max(n + m for n, m in zip(self.lens, per_seq)), window)
        for j in range(t):
            self.module.decode(self._stream(), b, q[j].data_ptr(), k_new[j].data_ptr(), v_new[j].data_ptr(),
                               out[j].data_ptr(), lse_t[j].data_ptr() if lse else 0,
                               self._lens[self._cur].data_ptr(), self._lens[1 - self._cur].data_ptr(),
                               self._cache_ptrs(), table, per, pages, scratch, grid, window, softmax_scale,
                               self.error_flag.data_ptr(), ql.data_ptr() if ql is not None else 0, j)
            # Per launch, so that an error at token j leaves the host's lengths where the device's are.
            self._cur = 1 - self._cur
            self.lens = [n + (1 if j < m else 0) for n, m in zip(self.lens, per_seq)]
        return (out, lse_t) if lse else out

    def check_device_errors(self):
        """Raises RuntimeError if the kernels flagged bad input on the device (synchronizes); clears the flag."""
        bits = int(self.error_flag.item())
        if bits:
            self.error_flag.zero_()
            raise RuntimeError("the kernels reported: " + _kivi.describe_device_error(bits))
