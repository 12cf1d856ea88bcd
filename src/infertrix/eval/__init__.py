"""What users decide by: quality (perplexity, agreement, passkey retrieval, log-likelihood through a
compressed KV cache), speed, memory."""

from .agreement import greedy_agreement, greedy_tokens, next_token_agreement, token_agreement
from .loglikelihood import compressed_scoring, loglikelihood, loglikelihood_tokens
from .memory import current_rss, kv_cache_bytes, peak_rss, trimmed_rss
from .passkey import passkey_accuracy, passkey_prompt, passkey_trials
from .perplexity import continuation_perplexity, perplexity, token_windows
from .speed import SpeedResult, measure_speed, pinned_threads, prompt_ids
from .text import body_text, load_text

__all__ = [
    "SpeedResult",
    "body_text",
    "compressed_scoring",
    "continuation_perplexity",
    "current_rss",
    "greedy_agreement",
    "greedy_tokens",
    "kv_cache_bytes",
    "load_text",
    "loglikelihood",
    "loglikelihood_tokens",
    "measure_speed",
    "next_token_agreement",
    "passkey_accuracy",
    "passkey_prompt",
    "passkey_trials",
    "peak_rss",
    "perplexity",
    "pinned_threads",
    "prompt_ids",
    "token_agreement",
    "token_windows",
    "trimmed_rss",
]
