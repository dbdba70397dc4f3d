"""`GET /v1/models` answers in each API's list format, for the models the proxy names itself."""

import time


def openai_model_list(models: list[str]) -> dict:
    created = int(time.time())
    return {
        "object": "list",
        "data": [{"id": model, "object": "model", "created": created, "owned_by": "openai"} for model in models],
    }


def anthropic_model_list(models: list[str]) -> dict:
    """Anthropic's list shape, each entry also carrying OpenAI's fields for clients of the OpenAI-format endpoint."""
    now = time.time()
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
    data = [
        {
            "type": "model",
            "id": model,
            "display_name": model,
            "created_at": created,
            "object": "model",
            "created": int(now),
            "owned_by": "anthropic",
        }
        for model in models
    ]
    return {
        "data": data,
        "has_more": False,
        "first_id": models[0] if models else None,
        "last_id": models[-1] if models else None,
    }


def gemini_model_list(models: list[str]) -> dict:
    """Gemini's `models.list` shape, as google-genai's `models.list()` reads it."""
    methods = ["generateContent", "streamGenerateContent", "countTokens"]
    return {
        "models": [
            {"name": f"models/{model}", "displayName": model, "supportedGenerationMethods": methods} for model in models
        ]
    }
