"""radix_tree plugin: the trajectory cache (exact tokens, logprobs, loss masks, weight versions)."""

from slime_router_core.errors import require

require("The radix_tree plugin", "trajectory")  # the tokenizer stack: skipped, with a hint, where it is missing

from .cache import Detokenizer, PreparedPrompt, TrajectoryCache  # noqa: E402 -- after the check above
from .trie import Match, StringRadixTrie  # noqa: E402

__all__ = ["Detokenizer", "Match", "PreparedPrompt", "StringRadixTrie", "TrajectoryCache"]
