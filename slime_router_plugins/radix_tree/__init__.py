"""radix_tree plugin: the trajectory cache (exact tokens, logprobs, loss masks, weight versions)."""

from .cache import Detokenizer, PreparedPrompt, TrajectoryCache
from .trie import Match, StringRadixTrie

__all__ = ["Detokenizer", "Match", "PreparedPrompt", "StringRadixTrie", "TrajectoryCache"]
