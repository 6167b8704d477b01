"""A persona LM's cache of prompt prefixes: the model state a prompt leaves, reused.

The state a session holds after its persona prompt depends only on (model, voice codes,
prompt tokens): the keys and values of the prompt's positions, its token ring, the tokens
its first live step must keep. So does the state after the voice and its silence alone
(model, voice codes). Both are kept here, in host memory, keyed by a hash of what they
depend on: a session whose prompt was seen starts with one copy of its state into its row
(`LMGen.restore` + `finish`), one whose voice was seen prefills only its text part.

Bounded by bytes (`--prefix-cache-mib`), least recently used first out; an entry larger
than the whole bound is not kept. Host memory on purpose: on a GPU the cache would take the
room of sessions' KV caches, and one copy of a prompt's state (a few hundred positions) in
takes milliseconds.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from moshi_grpc.models.lm_gen import Prefix

VOICE = "voice"
PROMPT = "prompt"


def prefix_key(model: str, level: str, voice: torch.Tensor, tokens: list[int] | None) -> str:
    """The cache key of a prefix: a hash of the model's identity, the level, the voice codes
    and (for a whole prompt) the prompt's tokens."""
    h = hashlib.sha256()
    h.update(f"{model}|{level}|{list(voice.shape)}|".encode())
    h.update(voice.to("cpu", torch.int64).contiguous().numpy().tobytes())
    if tokens is not None:
        h.update(("|" + ",".join(map(str, tokens))).encode())
    return h.hexdigest()


@dataclass(frozen=True)
class CachedPrefix:
    """A snapshot: keys and values of the first `steps` positions (host tensors), and for a
    whole prompt the rest of its state (`tail`: ring, fixed tokens, lagged user codes)."""

    kv: list[torch.Tensor]
    steps: int
    tail: Prefix | None = None

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.kv)


@dataclass
class CacheStats:
    entries: int = 0
    bytes: int = 0
    hits: int = 0
    voice_hits: int = 0
    misses: int = 0
    evictions: int = 0


class PrefixCache:
    """LRU by bytes. Used from the runner thread; `stats()` from the servicer's (locked)."""

    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"--prefix-cache-mib must be >= 0, got {capacity_bytes} bytes")
        self.capacity = capacity_bytes
        self._entries: OrderedDict[str, CachedPrefix] = OrderedDict()
        self._stats = CacheStats()
        self._lock = threading.Lock()

    def lookup(self, prompt_key: str, voice_key: str) -> tuple[str | None, CachedPrefix | None]:
        """The deepest cached prefix of a prompt: (PROMPT, entry), (VOICE, entry) or (None,
        None); counted as a hit, a voice hit or a miss."""
        with self._lock:
            for level, key in ((PROMPT, prompt_key), (VOICE, voice_key)):
                entry = self._entries.get(key)
                if entry is not None:
                    self._entries.move_to_end(key)
                    if level == PROMPT:
                        self._stats.hits += 1
                    else:
                        self._stats.voice_hits += 1
                    return level, entry
            self._stats.misses += 1
            return None, None

    def put(self, key: str, entry: CachedPrefix) -> bool:
        """Keep `entry` (evicting the least recently used as needed); False when it alone
        is larger than the bound."""
        size = entry.nbytes
        with self._lock:
            if size > self.capacity:
                return False
            old = self._entries.pop(key, None)
            if old is not None:
                self._stats.bytes -= old.nbytes
            while self._entries and self._stats.bytes + size > self.capacity:
                _, evicted = self._entries.popitem(last=False)
                self._stats.bytes -= evicted.nbytes
                self._stats.evictions += 1
            self._entries[key] = entry
            self._stats.bytes += size
            return True

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    def stats(self) -> CacheStats:
        with self._lock:
            self._stats.entries = len(self._entries)
            return CacheStats(**vars(self._stats))
