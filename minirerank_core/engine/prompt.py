"""Vision-first prompts (P ⊕ V ⊕ Q) and score heads.

A template is two strings: the prefix P before `<|vision_start|>` and the query segment Q after `<|vision_end|>`.
Because special tokens split tokenisation, tokenising P, V and Q separately gives the same ids as tokenising the
whole chat text, which is what the dense reference does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

VISION_SEGMENT = "<|vision_start|><|image_pad|><|vision_end|>"


@dataclass(frozen=True)
class PromptTemplate:
    prefix: str
    query: str  # must contain "{query}"
    positive: str = "yes"  # label token whose logit is the relevance evidence
    negative: str = "no"

    def __post_init__(self):
        if "{query}" not in self.query:
            raise ValueError("PromptTemplate.query must contain '{query}'")

    def full_text(self, query: str) -> str:
        """The whole prompt, as a plain `transformers` user would hand it to the processor."""
        return self.prefix + VISION_SEGMENT + self.query.format(query=query)


DEFAULT_TEMPLATE = PromptTemplate(
    prefix="<|im_start|>system\nJudge whether the page answers the query. Answer yes or no.<|im_end|>\n<|im_start|>user\n",
    query="\nQuery: {query}\nDoes the page answer the query?<|im_end|>\n<|im_start|>assistant\n",
)

# MonoQwen2-VL (lightonai/MonoQwen2-VL-v0.1): image first, True/False; Qwen2-VL's default system prompt.
MONOQWEN_TEMPLATE = PromptTemplate(
    prefix="<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n",
    query=(
        "Assert the relevance of the previous image document to the following query, answer True or False. "
        "The query is: {query}<|im_end|>\n<|im_start|>assistant\n"
    ),
    positive="True",
    negative="False",
)

TEMPLATES = {"default": DEFAULT_TEMPLATE, "monoqwen": MONOQWEN_TEMPLATE}


class ScoreHead(Protocol):
    """Turns the final-normed hidden state of the last query token (B, H) into one relevance score per row."""

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor: ...


class YesNoHead(torch.nn.Module):
    """score = logit(positive) − logit(negative), computing only the two LM-head rows it needs."""

    def __init__(self, lm_head: torch.nn.Linear, positive_id: int, negative_id: int):
        super().__init__()
        self.lm_head = lm_head
        self.ids = (positive_id, negative_id)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        w = self.lm_head.weight[list(self.ids)]
        logits = hidden.to(w.dtype) @ w.T
        if self.lm_head.bias is not None:
            logits = logits + self.lm_head.bias[list(self.ids)]
        return (logits[:, 0] - logits[:, 1]).float()


class MLPHead(torch.nn.Module):
    """A small head on the last hidden state (jina-reranker-m0 style): Linear → ReLU → Linear(1)."""

    def __init__(self, hidden_size: int, inner: int = 1024):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(hidden_size, inner), torch.nn.ReLU(), torch.nn.Linear(inner, 1))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.net(hidden.to(self.net[0].weight.dtype)).squeeze(-1).float()


def label_token_id(tokenizer, text: str) -> int:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"label {text!r} must be a single token for this tokenizer, got {len(ids)} tokens")
    return ids[0]
