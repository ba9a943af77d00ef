"""Paged KV caches of one NSA layer: the latent cache, the index-K cache, a page allocator, req -> pages.

Page size 64 (NSA's only page size). A token's *global slot* is ``page * 64 + offset``; request ``r``'s
token ``j`` lives at ``pages(r)[j // 64] * 64 + j % 64``. Both caches use the same slots, so one page
table serves the sparse MLA (latent rows) and the indexer (index keys).

- Latent cache: ``[num_pages, 64, 1, 576]`` bfloat16 (``[512 latent | 64 rope]``) or the fp8 format
  ``[num_pages, 64, 1, 656]`` uint8 (:mod:`nsa_tp.ops.kv_format`). :meth:`PagedLatentCache.flat` is the
  ``[num_pages * 64, 1, D]`` view the sparse MLA op reads with global-slot indices.
- Index-K cache: ``[num_pages, 64 * 132]`` uint8 (:mod:`nsa_tp.ops.index_cache`).

Every rank of an attention TP group stores the same tokens (the KV projection is replicated), so each
holds a whole copy; attention DP groups each hold only their own requests.
"""

from __future__ import annotations

import torch

from nsa_tp.ops.check import check_tensor
from nsa_tp.ops.index_cache import INDEX_HEAD_DIM, new_index_k_cache, store_index_k
from nsa_tp.ops.kv_format import D_QK, FP8_BYTES_PER_TOKEN, pack_fp8_kv

__all__ = ["PAGE_SIZE", "CacheFullError", "PageAllocator", "PagedLatentCache", "NSACaches"]

PAGE_SIZE = 64


class CacheFullError(RuntimeError):
    """The allocator has fewer free pages than a request needs (the message says how many)."""


class PageAllocator:
    """Free list of page ids ``[0, num_pages)``; pages come out in ascending order for reproducible slots."""

    def __init__(self, num_pages: int):
        if num_pages < 1:
            raise ValueError(f"num_pages: expected >= 1, got {num_pages}")
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, -1, -1))  # a stack; pop() gives the lowest id first

    @property
    def num_free(self) -> int:
        return len(self._free)

    def alloc(self, n: int) -> list[int]:
        if n < 0:
            raise ValueError(f"n: expected >= 0 pages, got {n}")
        if n > len(self._free):
            raise CacheFullError(f"need {n} pages, {len(self._free)} of {self.num_pages} free")
        return [self._free.pop() for _ in range(n)]

    def free(self, pages: list[int]) -> None:
        for p in pages:
            if not 0 <= p < self.num_pages:
                raise ValueError(f"pages: page {p} is outside [0, {self.num_pages})")
        if set(pages) & set(self._free):
            raise ValueError("pages: freeing a page that is already free")
        self._free.extend(sorted(pages, reverse=True))


class PagedLatentCache:
    """The MLA latent cache in bf16 (576 values a token) or fp8 (656 bytes a token)."""

    def __init__(self, num_pages: int, kv_cache_dtype: str = "bfloat16", device: torch.device | str = "cpu"):
        if kv_cache_dtype == "bfloat16":
            self.buffer = torch.zeros(num_pages, PAGE_SIZE, 1, D_QK, dtype=torch.bfloat16, device=device)
        elif kv_cache_dtype == "fp8_e4m3":
            self.buffer = torch.zeros(num_pages, PAGE_SIZE, 1, FP8_BYTES_PER_TOKEN, dtype=torch.uint8, device=device)
        else:
            raise ValueError(f"kv_cache_dtype: expected 'bfloat16' or 'fp8_e4m3', got {kv_cache_dtype!r}")
        self.kv_cache_dtype = kv_cache_dtype
        self.num_slots = num_pages * PAGE_SIZE

    def flat(self) -> torch.Tensor:
        """``[num_pages * 64, 1, 576 | 656]`` view: row = global slot."""
        return self.buffer.view(self.num_slots, 1, self.buffer.shape[-1])

    def store(self, slots: torch.Tensor, latent: torch.Tensor, *, check_slots: bool = True) -> None:
        """Write ``latent [M, 576]`` (``[512 c_kv | 64 rope key]``, any float dtype) at ``slots [M]``.

        ``check_slots=False`` skips the range check (a host sync): for slots from :meth:`NSACaches.slots`,
        valid by construction, on the per-layer path.
        """
        check_tensor(slots, "slots", ndim=1, dtype=(torch.int32, torch.int64))
        check_tensor(latent, "latent", shape=(slots.shape[0], D_QK))
        if check_slots and slots.numel() and bool(((slots < 0) | (slots >= self.num_slots)).any()):
            raise ValueError(f"slots: expected every slot in [0, {self.num_slots})")
        rows = pack_fp8_kv(latent) if self.kv_cache_dtype == "fp8_e4m3" else latent.to(torch.bfloat16)
        self.flat()[slots.long(), 0] = rows

    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()


class NSACaches:
    """Latent + index-K caches of one layer, their allocator and each request's pages."""

    def __init__(self, num_pages: int, kv_cache_dtype: str = "bfloat16", device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.latent = PagedLatentCache(num_pages, kv_cache_dtype, device)
        self.index_k = new_index_k_cache(num_pages, device)
        self.allocator = PageAllocator(num_pages)
        self._pages: dict[int, list[int]] = {}
        self._lens: dict[int, int] = {}

    @staticmethod
    def pages_for(num_tokens: int) -> int:
        return -(-num_tokens // PAGE_SIZE)

    def seq_len(self, req: int) -> int:
        """Tokens of ``req`` reserved so far (0 for an unknown request)."""
        return self._lens.get(req, 0)

    def reserve(self, req: int, total_len: int) -> None:
        """Make room for ``req``'s first ``total_len`` tokens (allocates only the missing pages)."""
        pages = self._pages.setdefault(req, [])
        need = self.pages_for(total_len) - len(pages)
        if need > 0:
            pages.extend(self.allocator.alloc(need))
        self._lens[req] = max(self._lens.get(req, 0), total_len)

    def release(self, req: int) -> None:
        self.allocator.free(self._pages.pop(req, []))
        self._lens.pop(req, None)

    def slots(self, req: int, start: int, end: int) -> torch.Tensor:
        """Global slots of ``req``'s tokens ``[start, end)``: ``[end - start]`` int64 on the cache device."""
        if not 0 <= start <= end <= self.seq_len(req):
            raise ValueError(f"slots: tokens [{start}, {end}) are outside request {req}'s {self.seq_len(req)} "
                             "reserved tokens")
        pages = torch.tensor(self._pages.get(req, []), dtype=torch.int64)
        pos = torch.arange(start, end, dtype=torch.int64)
        return (pages[pos // PAGE_SIZE] * PAGE_SIZE + pos % PAGE_SIZE).to(self.device)

    def page_table(self, reqs: list[int], width: int | None = None) -> torch.Tensor:
        """``[len(reqs), width]`` int32 page ids, ``-1`` past each request's pages (width: the longest)."""
        rows = [self._pages.get(r, []) for r in reqs]
        w = max((len(p) for p in rows), default=0) if width is None else width
        if any(len(p) > w for p in rows):
            raise ValueError(f"width: {w} pages is narrower than a request's {max(len(p) for p in rows)}")
        table = torch.full((len(reqs), max(w, 1)), -1, dtype=torch.int32)
        for i, p in enumerate(rows):
            table[i, : len(p)] = torch.tensor(p, dtype=torch.int32)
        return table.to(self.device)

    def store_index_k(self, slots: torch.Tensor, k_fp8: torch.Tensor, k_scale: torch.Tensor) -> None:
        """``k_fp8 [M, 128]`` e4m3 and ``k_scale [M]`` float32 at ``slots [M]`` (see ``ops.index_cache``)."""
        check_tensor(k_fp8, "k_fp8", shape=(slots.shape[0], INDEX_HEAD_DIM))
        store_index_k(self.index_k, slots, k_fp8, k_scale)

    def nbytes(self) -> int:
        return self.latent.nbytes() + self.index_k.numel()
