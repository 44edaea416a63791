"""Fixtures of this package's tests (the root conftest.py sets the offline environment and the threads)."""

from __future__ import annotations

from typing import Any, List, Sequence

import pytest

pytest.importorskip("llama_index.core")

from llama_index.core.base.llms.types import (  # noqa: E402
    ChatMessage,
    ChatResponse,
    CompletionResponse,
    CompletionResponseGen,
    ImageBlock,
    LLMMetadata,
    MessageRole,
)
from llama_index.core.bridge.pydantic import Field  # noqa: E402
from llama_index.core.llms import CustomLLM  # noqa: E402
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback  # noqa: E402


class RecordingLLM(CustomLLM):
    """The one stand-in of these tests: a multimodal chat LLM that records every chat it is sent and answers with
    how many images it saw. It refuses plain completion, so a flow that flattens the pages to a text prompt fails."""

    received: List[List[ChatMessage]] = Field(default_factory=list, exclude=True)

    @property
    def metadata(self) -> LLMMetadata:
        # a large context window, as multimodal models have: every page fits one call (no refine rounds)
        return LLMMetadata(is_chat_model=True, context_window=128_000, num_output=256, model_name="recording-llm")

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        self.received.append(list(messages))
        n = sum(isinstance(b, ImageBlock) for m in messages for b in m.blocks)
        return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=f"received {n} page images"))

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        raise AssertionError("a multimodal flow must send chat messages, not a text prompt")

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        raise AssertionError("a multimodal flow must send chat messages, not a text prompt")


@pytest.fixture
def recording_llm() -> RecordingLLM:
    return RecordingLLM()
