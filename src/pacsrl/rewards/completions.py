"""Reading the completions TRL gives a reward function: plain strings, or lists of chat messages."""

from __future__ import annotations

from typing import Any


def completion_text(completion: Any, index: int = 0) -> str:
    """The text of a completion as TRL passes it to a reward function.

    A string is its own text; a conversational completion (a list of chat messages) is read from its last
    assistant message: its ``content`` string, the text parts of a list of content parts joined, or "" for
    None. ``index`` (the completion's position in the batch) only names it in errors.

    Raises:
        TypeError: for anything else (a number, an assistant content that is neither text nor parts).
        ValueError: for a message list without an assistant message.
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, (list, tuple)):
        for message in reversed(completion):
            if isinstance(message, dict) and message.get("role") == "assistant":
                content = message.get("content")
                if content is None:
                    return ""
                if isinstance(content, str):
                    return content
                if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}, ...]
                    parts = [p for p in content if isinstance(p, dict) and p.get("type") == "text"]
                    return "".join(p.get("text") or "" for p in parts)
                raise TypeError(
                    f"completion {index}: assistant content is a {type(content).__name__}, "
                    "expected str or a list of content parts"
                )
        roles = [m.get("role") if isinstance(m, dict) else type(m).__name__ for m in completion]
        raise ValueError(f"completion {index} has no assistant message (roles: {roles})")
    raise TypeError(
        f"completion {index} is a {type(completion).__name__}; expected a string or a list of chat messages"
    )


__all__ = ["completion_text"]
