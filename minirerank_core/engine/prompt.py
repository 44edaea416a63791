"""Prompts and score heads.

Vision-first prompts (P ⊕ V ⊕ Q): a `PromptTemplate` is the prefix P before `<|vision_start|>` and the query
segment Q after `<|vision_end|>`. Because special tokens split tokenisation, tokenising P, V and Q separately gives
the same ids as tokenising the whole chat text, which is what the dense reference does. Only a vision-first prompt
lets the page's KV be computed once and reused for every query.

Published rerankers, and what their own code does (the exact configuration reproduces it):

* MonoQwen2-VL (lightonai/MonoQwen2-VL-v0.1): Qwen2-VL chat, image then the question, logits of "True"/"False"
  at the last token (`MONOQWEN_TEMPLATE`, `YesNoHead`).
* jina-reranker-m0 (jinaai/jina-reranker-m0, modeling.py: `JinaVLForRanking`): no chat template,
  "**Document**:\n" + image + "\n**Query**:\n" + query, then token id 100 appended as the score token; an MLP
  `score` head on the last hidden state (`JINA_M0_TEMPLATE`, `JinaM0Head`). Vision-first.
* Qwen3-VL-Reranker-2B/8B (QwenLM/Qwen3-VL-Embedding, src/models/qwen3_vl_reranker.py): system + user turn
  "<Instruct>: …<Query>:" + query + "\n<Document>:" + image, yes/no at the last token. The query comes BEFORE the
  page, so the page's KV depends on the query and cannot be cached: `QueryFirstTemplate`, scored only densely.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch

from ..errors import ConfigError

VISION_SEGMENT = "<|vision_start|><|image_pad|><|vision_end|>"


@dataclass(frozen=True)
class PromptTemplate:
    """A vision-first prompt P ⊕ V ⊕ Q.

    prefix: the text before the page's vision segment (P). query: the text after it, with "{query}" (Q).
    positive / negative: label tokens whose logit difference is the score (`YesNoHead`).
    suffix_ids: token ids appended after Q's text: tokens that have no text form (jina-reranker-m0 appends its score
    token, id 100, a lone byte that no string tokenises to).
    """

    prefix: str
    query: str  # must contain "{query}"
    positive: str = "yes"  # label token whose logit is the relevance evidence
    negative: str = "no"
    suffix_ids: tuple[int, ...] = ()

    vision_first: ClassVar[bool] = True

    def __post_init__(self):
        if "{query}" not in self.query:
            raise ConfigError("PromptTemplate.query must contain '{query}'")
        # JSON gives a list back: keep a tuple so a reloaded template compares equal (and stays hashable).
        object.__setattr__(self, "suffix_ids", tuple(int(i) for i in self.suffix_ids))

    def full_text(self, query: str) -> str:
        """The prompt's text, as a plain `transformers` user would hand it to the processor (`suffix_ids` are
        appended to the processor's ids afterwards: they have no text)."""
        return self.prefix + VISION_SEGMENT + self.query.format(query=query)

    def query_ids(self, tokenizer, query: str) -> torch.Tensor:
        """Token ids of the query segment Q: its text, then `suffix_ids`."""
        ids = tokenizer(self.query.format(query=query), add_special_tokens=False)["input_ids"]
        return torch.tensor([*ids, *self.suffix_ids], dtype=torch.long)


@dataclass(frozen=True)
class QueryFirstTemplate:
    """A prompt whose query comes BEFORE the page: S = before(query) ⊕ V ⊕ after (Qwen3-VL-Reranker).

    The page's keys and values depend on the query, so nothing of the page can be computed once and reused: such a
    model cannot back `MiniReranker` or `ListwiseReranker` (cache reuse needs a vision-first model). It is scored
    exactly by a plain forward of the whole prompt (`reference.dense_scores`, `Checkpoint.dense_scores`), e.g. as
    a distillation teacher. Asking it for `prefix` / `query` (what the cached path needs) raises ConfigError.
    """

    before: str  # must contain "{query}"
    after: str
    positive: str = "yes"
    negative: str = "no"
    suffix_ids: tuple[int, ...] = ()
    name: str = "query-first prompt"

    vision_first: ClassVar[bool] = False

    def __post_init__(self):
        if "{query}" not in self.before:
            raise ConfigError("QueryFirstTemplate.before must contain '{query}'")
        object.__setattr__(self, "suffix_ids", tuple(int(i) for i in self.suffix_ids))

    def full_text(self, query: str) -> str:
        return self.before.format(query=query) + VISION_SEGMENT + self.after

    def cache_error(self) -> str:
        return (f"{self.name} puts the query before the page, so the page's KV depends on the query and cannot be "
                "cached and reused: MiniReranker and ListwiseReranker need a vision-first model (page before "
                "query: MonoQwen2-VL, jina-reranker-m0, minirerank checkpoints). Score this model exactly with "
                "load_checkpoint(...).dense_scores(query, images) (a plain forward per pair), e.g. as a "
                "distillation teacher.")

    @property
    def prefix(self) -> str:
        raise ConfigError(self.cache_error())

    @property
    def query(self) -> str:
        raise ConfigError(self.cache_error())

    def query_ids(self, tokenizer, query: str) -> torch.Tensor:
        raise ConfigError(self.cache_error())


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

# jina-reranker-m0 (modeling.py, formatting_prompts_func + compute_score): document first, no chat template, then
# the score token (id 100 in Qwen2's vocabulary) appended to the ids. Its head is JinaM0Head, not yes/no.
JINA_M0_SCORE_TOKEN_ID = 100
JINA_M0_TEMPLATE = PromptTemplate(
    prefix="**Document**:\n",
    query="\n**Query**:\n{query}",
    suffix_ids=(JINA_M0_SCORE_TOKEN_ID,),
)

QWEN3_VL_RERANKER_INSTRUCTION = "Given a search query, retrieve relevant candidates that answer the query."


def qwen3_vl_reranker_template(instruction: str = QWEN3_VL_RERANKER_INSTRUCTION) -> QueryFirstTemplate:
    """Qwen3-VL-Reranker's prompt for a text query and an image document, as its reference code builds it
    (`format_mm_instruction` + the Qwen3-VL chat template with a generation prompt): the text parts of the user turn
    are concatenated without separators, the image part becomes the vision segment."""
    instruction = instruction.replace("{", "{{").replace("}", "}}")
    return QueryFirstTemplate(
        before=(
            "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
            'Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
            f"<Instruct>: {instruction}<Query>:{{query}}\n<Document>:"
        ),
        after="<|im_end|>\n<|im_start|>assistant\n",
        name="Qwen3-VL-Reranker's prompt",
    )


QWEN3_VL_RERANKER_TEMPLATE = qwen3_vl_reranker_template()

TEMPLATES = {
    "default": DEFAULT_TEMPLATE,
    "monoqwen": MONOQWEN_TEMPLATE,
    "jina-m0": JINA_M0_TEMPLATE,
    "qwen3-vl-reranker": QWEN3_VL_RERANKER_TEMPLATE,
}


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
    """A small head on the last hidden state: Linear → ReLU → Linear(1) (for jina-reranker-m0's own weights see
    `JinaM0Head`)."""

    def __init__(self, hidden_size: int, inner: int = 1024):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(hidden_size, inner), torch.nn.ReLU(), torch.nn.Linear(inner, 1))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.net(hidden.to(self.net[0].weight.dtype)).squeeze(-1).float()


class JinaM0Head(torch.nn.Module):
    """jina-reranker-m0's score head, as its modeling.py (`JinaVLForRanking.__init__`) builds it:
    ``score = Sequential(Linear(H, H), ReLU(), Linear(H, 1))`` on the final-normed hidden state of the last token
    (the appended score token). Parameter names ``score.0.weight`` (H, H), ``score.0.bias`` (H,),
    ``score.2.weight`` (1, H), ``score.2.bias`` (1,) are the checkpoint's, so its tensors load as they are.

    The score is the raw logit (what `JinaVLForRanking.forward` pools); its `compute_score` reports
    ``sigmoid(logit - 2.65)`` (`probability`), which ranks identically. Kept in float32 whatever the model's dtype.
    """

    LOGIT_BIAS: ClassVar[float] = 2.65
    WEIGHT_NAMES: ClassVar[tuple[str, ...]] = ("score.0.weight", "score.0.bias", "score.2.weight", "score.2.bias")

    def __init__(self, hidden_size: int):
        super().__init__()
        self.score = torch.nn.Sequential(
            torch.nn.Linear(hidden_size, hidden_size), torch.nn.ReLU(), torch.nn.Linear(hidden_size, 1)
        )

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor]) -> "JinaM0Head":
        """The head from a checkpoint's ``score.*`` tensors (ConfigError naming what is missing or misshapen)."""
        missing = [n for n in cls.WEIGHT_NAMES if n not in tensors]
        if missing:
            raise ConfigError(f"jina-reranker-m0 head: tensors {missing} missing from the checkpoint")
        hidden = tensors["score.0.weight"].shape[-1]
        head = cls(hidden)
        want = {k: tuple(v.shape) for k, v in head.state_dict().items()}
        got = {k: tuple(tensors[k].shape) for k in cls.WEIGHT_NAMES}
        if want != got:
            raise ConfigError(f"jina-reranker-m0 head: tensor shapes {got} do not match a {hidden}-wide head {want}")
        head.load_state_dict({k: tensors[k].float() for k in cls.WEIGHT_NAMES})
        return head.eval()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        w = self.score[0].weight
        if w.device != hidden.device:  # follow the model wherever it was moved
            self.to(hidden.device)
        return self.score(hidden.to(torch.float32)).squeeze(-1)

    @classmethod
    def probability(cls, scores) -> torch.Tensor:
        """The model card's relevance in [0, 1]: sigmoid(score − 2.65)."""
        return torch.sigmoid(torch.as_tensor(scores, dtype=torch.float32) - cls.LOGIT_BIAS)


class NoLMHead(torch.nn.Identity):
    """The LM head of a model published without one (jina-reranker-m0 replaces it with Identity). Reading its
    ``weight`` — what a yes/no head needs — raises ConfigError saying which head to use instead."""

    def __init__(self, reason: str):
        super().__init__()
        self.reason = reason

    @property
    def weight(self):
        raise ConfigError(self.reason)

    @property
    def bias(self):
        raise ConfigError(self.reason)


def label_token_id(tokenizer, text: str) -> int:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"label {text!r} must be a single token for this tokenizer, got {len(ids)} tokens")
    return ids[0]
