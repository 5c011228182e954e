"""openai_compat plugin: OpenAI-compatible chat/completions routes over SGLang workers (see README.md)."""

from slime_router_core.errors import require

require("The openai_compat plugin", "trajectory")  # chat templates and the tokenizer stack
