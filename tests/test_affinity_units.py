"""What names a conversation, from the request alone."""

from llmproxy.conversation import carries_encrypted_content, conversation


def test_the_client_names_its_conversation_first():
    body = {
        "prompt_cache_key": "thread-1",
        "metadata": {"user_id": "u"},
        "messages": [{"role": "user", "content": "x"}],
    }
    assert conversation(body, "header-digest") == ("prompt_cache_key", "thread-1")
    del body["prompt_cache_key"]
    assert conversation(body, "header-digest") == ("metadata.user_id", "u")
    del body["metadata"]
    assert conversation(body, "header-digest") == ("header", "header-digest")
    assert conversation(body, None)[0] == "opening"
    assert conversation({"messages": [{"role": "assistant", "content": "x"}]}, None) is None  # no user message
    assert conversation({"input": [{"type": "function_call_output", "output": "x"}]}, None) is None


def test_the_opening_stays_the_same_from_turn_to_turn():
    marker = {"type": "ephemeral"}
    first = {
        "system": [{"type": "text", "text": "Be brief.", "cache_control": marker}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi", "cache_control": marker}]}],
    }
    second = {
        "system": [{"type": "text", "text": "Be brief.", "cache_control": marker}],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Hi"}]},  # the marker moved on
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": [{"type": "text", "text": "More", "cache_control": marker}]},
        ],
    }
    assert conversation(first, None) == conversation(second, None)
    chat = {"messages": [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}
    assert conversation(chat, None) != conversation({"messages": [{"role": "user", "content": "Hi"}]}, None)
    assert conversation({"instructions": "Be brief.", "input": "Hi"}, None) == conversation(
        {"instructions": "Be brief.", "input": [{"role": "user", "content": "Hi"}]}, None
    )


def test_encrypted_content_is_recognised_in_any_item():
    assert carries_encrypted_content({"input": [{"type": "reasoning", "encrypted_content": "gAAA"}]})
    assert carries_encrypted_content({"input": [{"type": "compaction", "encrypted_content": "gAAA"}]})
    assert not carries_encrypted_content({"input": "Hi"})
    assert not carries_encrypted_content({"messages": [{"role": "user", "content": "Hi"}]})
