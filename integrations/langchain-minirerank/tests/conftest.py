"""Fixtures of this package's tests (the root conftest.py sets the offline environment and the threads)."""

from __future__ import annotations

from typing import Any, Optional

import pytest

from minirerank_core import testing as T

MAX_PIXELS = 200 * 200  # the tiny rerankers' pixel budget: a few dozen visual tokens per test page


@pytest.fixture(scope="session")
def tiny():
    """(model, processor) of a tiny random Qwen-VL per family (and seed), built once per test session."""
    return T.TinyModels(MAX_PIXELS)


@pytest.fixture
def recording_chat_model():
    """The one stand-in of these tests: a chat model that records every list of messages it is sent and answers
    with how many image blocks it saw."""
    from langchain_core.callbacks import CallbackManagerForLLMRun
    from langchain_core.language_models import BaseChatModel
    from langchain_core.messages import AIMessage, BaseMessage
    from langchain_core.outputs import ChatGeneration, ChatResult
    from pydantic import Field

    class RecordingChatModel(BaseChatModel):
        received: list[list[BaseMessage]] = Field(default_factory=list)

        @property
        def _llm_type(self) -> str:
            return "recording-chat-model"

        def _generate(self, messages: list[BaseMessage], stop: Optional[list[str]] = None,
                      run_manager: Optional[CallbackManagerForLLMRun] = None, **kwargs: Any) -> ChatResult:
            self.received.append(list(messages))
            n = sum(isinstance(b, dict) and b.get("type") == "image" for m in messages
                    for b in (m.content if isinstance(m.content, list) else []))
            return ChatResult(generations=[ChatGeneration(message=AIMessage(content=f"received {n} page images"))])

    return RecordingChatModel()
