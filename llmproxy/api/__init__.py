"""The LLM APIs' wire formats (dialects), and the names of the dialects."""

OPENAI = "openai"
ANTHROPIC = "anthropic"
GEMINI = "gemini"

DEFAULT_ANTHROPIC_VERSION = "2023-06-01"  # sent when a client names none; Anthropic requires the header
