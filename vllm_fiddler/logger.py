"""fiddler's logger: a child of vLLM's, so it shares vLLM's handlers and format."""

import logging

logger = logging.getLogger("vllm.fiddler")
