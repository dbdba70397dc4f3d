"""The LLM APIs' wire formats, and the names of the two APIs."""

OPENAI = "openai"
ANTHROPIC = "anthropic"
DEFAULT_ANTHROPIC_VERSION = "2023-06-01"  # sent when a client names none; Anthropic requires the header
