"""The LLM APIs' wire formats, and the names of the two APIs."""

OPENAI = "openai"
ANTHROPIC = "anthropic"
SERVICE_NAMES = {OPENAI: "OpenAI", ANTHROPIC: "Anthropic"}  # as the status page names them
DEFAULT_ANTHROPIC_VERSION = "2023-06-01"  # sent when a client names none; Anthropic requires the header
