"""Host-side page (block) manager of the paged KV cache: vLLM-style, pure Python.

Pages 1..P-1 of the device pool (`ftjax.paged_kv`) are handed out to sequences; page 0
is the null page and is never handed out. Each sequence owns an ordered list of pages
(its page-table row): token position t lives in `pages[t // page_size]`.

Sharing is by reference count:
- `fork(parent, child)` (n samples, beams) shares every page; the first write into a
  shared, partly filled last page copies it first (copy-on-write: `append_slots`
  returns the (src, dst) page pairs for `paged_kv.copy_pages`).
- Automatic prefix caching: each full, page-aligned block of prompt tokens is named by
  a hash chain (sha256 of the parent block's hash and the block's token ids), so a
  block names its whole prefix. Once the engine has computed a block
  (`mark_computed`), later prompts starting with the same tokens reuse its page
  instead of recomputing it. A freed cached page is not wiped: it waits in an LRU
  "evictable" list, still findable, until a new page is needed and no never-cached
  free page is left.

Nothing here touches device memory; the manager decides which page ids go where.
Out-of-pages is checked before any change (`can_allocate`, `can_append`; the mutating
calls raise `OutOfPages` and leave the state as it was).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
from typing import Dict, Hashable, List, Optional, Sequence, Tuple

import numpy as np

NULL_PAGE = 0


class OutOfPages(RuntimeError):
    """Not enough free pages for the request; the manager's state is unchanged."""


@dataclasses.dataclass
class _Seq:
    pages: List[int]
    num_tokens: int
    block_hashes: List[bytes]   # hash chain of the prompt's full blocks


def block_hashes(tokens: Sequence[int], page_size: int, salt: bytes = b"") -> List[bytes]:
    """The hash chain of the full page-aligned blocks of `tokens`: block i's hash covers
    tokens [0, (i + 1) * page_size). `salt` separates caches that must not share (e.g.
    another model or adapter)."""
    ids = np.asarray(tokens, np.int64)
    out, parent = [], hashlib.sha256(salt).digest()
    for i in range(len(ids) // page_size):
        parent = hashlib.sha256(parent + ids[i * page_size:(i + 1) * page_size].tobytes()).digest()
        out.append(parent)
    return out


class BlockManager:
    """Allocates pool pages to sequences (see the module docstring).

    Args:
      num_pages: P, pool pages including the null page 0 (P - 1 are usable).
      page_size: tokens per page.
      max_pages_per_seq: M, the page table's width (a sequence's page limit).
      prefix_caching: share computed full prompt blocks across sequences.
    """

    def __init__(self, num_pages: int, page_size: int, max_pages_per_seq: int,
                 prefix_caching: bool = True):
        if num_pages < 2:
            raise ValueError(f"num_pages must be >= 2 (page 0 is the null page), got {num_pages}")
        if page_size < 1 or max_pages_per_seq < 1:
            raise ValueError(f"page_size ({page_size}) and max_pages_per_seq "
                             f"({max_pages_per_seq}) must be >= 1")
        self.num_pages = num_pages
        self.page_size = page_size
        self.max_pages_per_seq = max_pages_per_seq
        self.prefix_caching = prefix_caching
        self._refcount = np.zeros(num_pages, np.int64)
        self._free = collections.deque(range(1, num_pages))   # never cached / wiped
        self._evictable: "collections.OrderedDict[int, None]" = collections.OrderedDict()
        self._page_of: Dict[bytes, int] = {}                  # block hash -> page
        self._hash_of: Dict[int, bytes] = {}                  # page -> block hash
        self._seqs: Dict[Hashable, _Seq] = {}
        self._hits = self._queries = self._cached_tokens = 0

    # -- queries ----------------------------------------------------------------

    @property
    def max_tokens(self) -> int:
        """The most tokens one sequence can hold (page-table width x page size)."""
        return self.max_pages_per_seq * self.page_size

    @property
    def num_free(self) -> int:
        """Pages a new allocation can take: free plus evictable cached pages."""
        return len(self._free) + len(self._evictable)

    def __contains__(self, seq) -> bool:
        return seq in self._seqs

    def pages(self, seq) -> List[int]:
        """The sequence's pages in order (its page-table row, unpadded)."""
        return list(self._get(seq).pages)

    def num_tokens(self, seq) -> int:
        return self._get(seq).num_tokens

    def table(self, seqs: Sequence) -> np.ndarray:
        """int32 `[len(seqs), M]` page-table rows; None or unused entries are page 0."""
        out = np.zeros((len(seqs), self.max_pages_per_seq), np.int32)
        for i, seq in enumerate(seqs):
            if seq is not None:
                pages = self._get(seq).pages
                out[i, :len(pages)] = pages
        return out

    def stats(self) -> dict:
        """Pages in use / free / cached-evictable / total (usable), prefix-cache lookups,
        hits (blocks) and tokens served from the cache."""
        return {"pages_total": self.num_pages - 1,
                "pages_in_use": int((self._refcount > 0).sum()),
                "pages_free": self.num_free,
                "pages_cached": len(self._page_of),
                "sequences": len(self._seqs),
                "prefix_queries": self._queries,
                "prefix_hits": self._hits,
                "cached_tokens": self._cached_tokens}

    # -- allocation ----------------------------------------------------------------

    def _get(self, seq) -> _Seq:
        try:
            return self._seqs[seq]
        except KeyError:
            raise KeyError(f"unknown sequence {seq!r}") from None

    def _check_len(self, n_tokens: int, what: str):
        if n_tokens > self.max_tokens:
            raise ValueError(f"{what} needs {n_tokens} tokens, more than max_pages_per_seq="
                             f"{self.max_pages_per_seq} x page_size={self.page_size} = "
                             f"{self.max_tokens}")

    def _lookup(self, tokens, n_tokens: int) -> Tuple[List[bytes], List[int]]:
        """Prompt block hashes and the pages of the longest cached prefix. Blocks ending
        at the last token are not reused: its logits must be computed anyway, and the
        page it is written into must not be shared."""
        if tokens is None or not self.prefix_caching:
            return [], []
        hashes = block_hashes(tokens[:n_tokens], self.page_size)
        hits = []
        for i, h in enumerate(hashes):
            page = self._page_of.get(h)
            if page is None or (i + 1) * self.page_size > n_tokens - 1:
                break
            hits.append(page)
        return hashes, hits

    def _needed(self, n_tokens: int, hits: List[int]) -> int:
        """Free pages an allocation takes: its new pages plus hits now evictable."""
        new = -(-n_tokens // self.page_size) - len(hits)
        return new + sum(1 for p in hits if self._refcount[p] == 0)

    def can_allocate(self, n_tokens: int, tokens: Optional[Sequence[int]] = None) -> bool:
        """Whether `allocate(..., n_tokens, tokens)` would succeed now."""
        if n_tokens > self.max_tokens:
            return False
        return self._needed(n_tokens, self._lookup(tokens, n_tokens)[1]) <= self.num_free

    def _take_free(self) -> int:
        if self._free:
            page = self._free.popleft()
        else:                                  # evict the least recently freed cached page
            page, _ = self._evictable.popitem(last=False)
            del self._page_of[self._hash_of.pop(page)]
        self._refcount[page] = 1
        return page

    def _share(self, page: int):
        if self._refcount[page] == 0:
            del self._evictable[page]
        self._refcount[page] += 1

    def allocate(self, seq, n_tokens: int, tokens: Optional[Sequence[int]] = None) -> int:
        """Gives a new sequence pages for its first `n_tokens` tokens.

        Args:
          seq: a new sequence id (any hashable).
          n_tokens: tokens to hold (e.g. the prompt length), >= 1.
          tokens: the prompt's token ids (>= n_tokens of them) for prefix caching;
            None: no sharing.
        Returns:
          How many leading tokens are already computed in shared pages (a multiple of
          page_size, < n_tokens): the engine prefills only from there on.
        Raises:
          ValueError: seq exists, n_tokens < 1 or beyond the page table.
          OutOfPages: not enough free pages (nothing changed).
        """
        if seq in self._seqs:
            raise ValueError(f"sequence {seq!r} is already allocated")
        if n_tokens < 1:
            raise ValueError(f"n_tokens must be >= 1, got {n_tokens}")
        self._check_len(n_tokens, f"sequence {seq!r}")
        if tokens is not None and len(tokens) < n_tokens:
            raise ValueError(f"tokens has {len(tokens)} ids, fewer than n_tokens={n_tokens}")
        hashes, hits = self._lookup(tokens, n_tokens)
        needed = self._needed(n_tokens, hits)
        if needed > self.num_free:
            raise OutOfPages(f"sequence {seq!r} needs {needed} free pages, {self.num_free} "
                             f"are free")
        for page in hits:
            self._share(page)
        pages = hits + [self._take_free()
                        for _ in range(-(-n_tokens // self.page_size) - len(hits))]
        self._seqs[seq] = _Seq(pages=pages, num_tokens=n_tokens, block_hashes=hashes)
        if tokens is not None and self.prefix_caching:
            self._queries += len(hashes)
            self._hits += len(hits)
            self._cached_tokens += len(hits) * self.page_size
        return len(hits) * self.page_size

    def mark_computed(self, seq, n_computed: int):
        """Registers the sequence's full prompt blocks within its first `n_computed`
        tokens (now written on device) in the prefix cache."""
        s = self._get(seq)
        if not self.prefix_caching:
            return
        for i, h in enumerate(s.block_hashes[:n_computed // self.page_size]):
            page = s.pages[i]
            if h in self._page_of or page in self._hash_of:
                continue   # already cached (a hit, or computed twice concurrently)
            self._page_of[h] = page
            self._hash_of[page] = h

    def _append_plan(self, s: _Seq, n: int) -> Tuple[int, bool]:
        """(new pages, copy-on-write of the last page?) for n more tokens."""
        ps = self.page_size
        new = -(-(s.num_tokens + n) // ps) - len(s.pages)
        cow = (n > 0 and s.num_tokens % ps != 0 and self._refcount[s.pages[-1]] > 1)
        return new, cow

    def can_append(self, seq, n: int = 1) -> bool:
        """Whether `append_slots(seq, n)` would succeed now."""
        s = self._get(seq)
        if s.num_tokens + n > self.max_tokens:
            return False
        new, cow = self._append_plan(s, n)
        return new + cow <= self.num_free

    def append_slots(self, seq, n: int = 1) -> List[Tuple[int, int]]:
        """Reserves slots for the sequence's next `n` tokens (positions num_tokens ..
        num_tokens + n - 1), taking new pages as pages fill.

        Returns:
          Copy-on-write pairs [(src, dst)]: before writing, copy page src to dst on
          device (`paged_kv.copy_pages`); the sequence now owns dst instead of its
          shared, partly filled last page src. Empty when nothing is shared.
        Raises:
          ValueError: beyond the page table. OutOfPages: nothing changed.
        """
        s = self._get(seq)
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        self._check_len(s.num_tokens + n, f"sequence {seq!r}")
        new, cow = self._append_plan(s, n)
        if new + cow > self.num_free:
            raise OutOfPages(f"sequence {seq!r} needs {new + cow} free pages, "
                             f"{self.num_free} are free")
        copies = []
        if cow:
            src = s.pages[-1]
            dst = self._take_free()
            self._refcount[src] -= 1        # still > 0: another sequence holds it
            s.pages[-1] = dst
            copies.append((src, dst))
        s.pages.extend(self._take_free() for _ in range(new))
        s.num_tokens += n
        return copies

    def append_slot(self, seq) -> Optional[Tuple[int, int]]:
        """`append_slots(seq, 1)`: the one copy-on-write pair, or None."""
        copies = self.append_slots(seq, 1)
        return copies[0] if copies else None

    def fork(self, parent, child):
        """The child shares all of the parent's pages (refcount + 1 each) and tokens."""
        p = self._get(parent)
        if child in self._seqs:
            raise ValueError(f"sequence {child!r} is already allocated")
        for page in p.pages:
            self._refcount[page] += 1
        self._seqs[child] = _Seq(pages=list(p.pages), num_tokens=p.num_tokens,
                                 block_hashes=list(p.block_hashes))

    def free(self, seq):
        """Releases the sequence's pages. A page no one holds goes back to the free list,
        or, if it holds a cached block, to the end of the LRU evictable list (the tail
        blocks of a prompt first, so its head blocks, the likeliest shared, live longest).
        """
        s = self._seqs.pop(seq, None)
        if s is None:
            raise KeyError(f"unknown sequence {seq!r}")
        for page in reversed(s.pages):
            self._refcount[page] -= 1
            if self._refcount[page] == 0:
                if page in self._hash_of:
                    self._evictable[page] = None
                else:
                    self._free.append(page)

    def reset_prefix_cache(self):
        """Forgets every cached block (e.g. after the weights change); pages in use stay."""
        for page in list(self._evictable):
            self._free.append(page)
        self._evictable.clear()
        self._page_of.clear()
        self._hash_of.clear()

    def check(self):
        """Asserts the invariants (tests): refcounts equal the holders of each page, every
        usable page is exactly one of in use / free / evictable, page 0 is never anywhere,
        and the prefix-cache maps are inverse to each other."""
        count = np.zeros(self.num_pages, np.int64)
        for s in self._seqs.values():
            assert len(s.pages) == -(-s.num_tokens // self.page_size), s
            assert len(s.pages) <= self.max_pages_per_seq
            for page in s.pages:
                count[page] += 1
        assert (count == self._refcount).all(), (count, self._refcount)
        assert count[NULL_PAGE] == 0
        free, evictable = list(self._free), list(self._evictable)
        in_use = set(np.flatnonzero(count).tolist())
        parts = [set(free), set(evictable), in_use]
        assert len(free) == len(parts[0]) and sum(map(len, parts)) == self.num_pages - 1
        assert set().union(*parts) == set(range(1, self.num_pages))
        assert all(self._hash_of.get(p) is not None for p in evictable)
        assert all(self._page_of[h] == p for p, h in self._hash_of.items())
        assert len(self._page_of) == len(self._hash_of)
