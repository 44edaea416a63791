"""RankGPT-style listwise prompts, their tokenisation, and the label head.

One template serves both layouts (V_i = <|vision_start|> visual tokens <|vision_end|> of page i, L_i its label):

    single_pass (ZipRerank):  prefix ⊕ intro(query) ⊕ L_1 V_1 ⊕ … ⊕ L_n V_n ⊕ instruction ⊕ "["
                              (label_after_page: … ⊕ V_1 L_1 ⊕ … ⊕ V_n L_n ⊕ …)
    cached (vision-first):    prefix ⊕ V_1 ⊕ … ⊕ V_n ⊕ intro(query) ⊕ L_1 ⊕ … ⊕ L_n ⊕ instruction ⊕ "["

In the cached layout L_i is `cached_label` when the template sets it (else `label`). Either may repeat the query,
so that the tokens bound to page i read it with the query in hand, as a point-wise reranker's query segment does.

Why labels after pages (the trained model's template): a label token that comes after its page, in a segment that
asks the point-wise question, holds both its own identity (its embedding) and its page's relevance (read from the
page as a point-wise reranker reads it), so the final "[" needs one attention step to turn "which label is most
relevant" into that label's logit. With the label before the page (ZipRerank's prompt), the page's relevance is
only known after the label, and some later token has to fetch the label back (see docs/DESIGN.md, listwise
training).

The answer "[" is appended as its own token (as ZipRerank does) so that the next token is a bare label.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...engine.prompt import VISION_SEGMENT, label_token_id
from ...errors import ConfigError


@dataclass(frozen=True)
class ListwiseTemplate:
    prefix: str = (
        "<|im_start|>system\nYou are RankGPT, an intelligent assistant that can rank pages based on their "
        "relevancy to the query.<|im_end|>\n<|im_start|>user\n"
    )
    intro: str = (  # must contain "{query}"; may contain "{n}"
        "I will provide you with {n} pages as images, each indicated by an identifier []. "
        "Rank the pages based on their relevance to the search query: {query}\n"
    )
    label: str = "\n[{label}] "  # must contain "{label}"; may contain "{query}"
    instruction: str = (  # may contain "{query}" and "{n}"
        "\nSearch Query: {query}\nRank the {n} pages above based on their relevance to the search query. "
        "List them in descending order using identifiers, the most relevant first, in the format [] > []. "
        "Only respond with the ranking.<|im_end|>\n<|im_start|>assistant\n"
    )
    answer: str = "["
    cached_label: str | None = None  # cached layout's L_i (None: `label`); must contain "{label}", may contain "{query}"
    label_after_page: bool = False  # single pass: L_i follows its page V_i instead of preceding it

    def __post_init__(self):
        if "{query}" not in self.intro:
            raise ValueError("ListwiseTemplate.intro must contain '{query}'")
        if "{label}" not in self.label:
            raise ValueError("ListwiseTemplate.label must contain '{label}'")
        if self.cached_label is not None and "{label}" not in self.cached_label:
            raise ValueError("ListwiseTemplate.cached_label must contain '{label}'")

    def cached_label_text(self, label: str, query: str, n: int) -> str:
        """L_i of the cached layout."""
        return (self.cached_label or self.label).format(label=label, query=query, n=n)

    def single_pass_text(self, query: str, labels: tuple[str, ...] | list[str]) -> str:
        """The ZipRerank prompt without the answer token, as a plain `transformers` user would write it."""
        n = len(labels)
        marks = [self.label.format(label=x, query=query, n=n) for x in labels]
        pages = "".join(VISION_SEGMENT + m if self.label_after_page else m + VISION_SEGMENT for m in marks)
        return self.prefix + self.intro.format(n=n, query=query) + pages + self.instruction.format(n=n, query=query)


DEFAULT_LISTWISE_TEMPLATE = ListwiseTemplate()


def single_token_ids(tokenizer, texts: tuple[str, ...] | list[str], what: str) -> list[int]:
    """Token id of each text, which must be one token for this tokenizer (ConfigError otherwise)."""
    try:
        return [label_token_id(tokenizer, t) for t in texts]
    except ValueError as e:
        raise ConfigError(f"{what}: {e}; choose {what} that this tokenizer keeps whole") from e


@dataclass
class SinglePassPrompt:
    """A tokenised ZipRerank prompt with every page's visual tokens expanded, like the HF processor does."""

    ids: torch.Tensor  # (S,)
    query_mask: torch.Tensor  # (S,) bool: tokens of the query in the intro (the text QI-EI compares pages with)
    grid_thw: torch.Tensor  # (n, 3)
    label_rows: torch.Tensor | None = None  # (n,) the row of each page's label token, in page order


def single_pass_prompt(tokenizer, template: ListwiseTemplate, query: str, labels, grid_thw: torch.Tensor,
                       merge_size: int, answer_id: int, image_token_id: int) -> SinglePassPrompt:
    text = template.single_pass_text(query, labels)
    q_start = len(template.prefix) + template.intro.format(n=len(labels), query="\0").index("\0")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = torch.tensor(enc["input_ids"] + [answer_id])
    # A token belongs to the query when its characters overlap the query's (byte-level BPE glues the space before).
    spans = torch.tensor(enc["offset_mapping"] + [(len(text), len(text))])
    in_query = (spans[:, 0] < q_start + len(query)) & (spans[:, 1] > q_start)
    # Expand each image placeholder to the page's visual token count (t·h·w / merge²).
    counts = torch.ones(len(ids), dtype=torch.long)
    is_img = ids == image_token_id
    if int(is_img.sum()) != len(grid_thw):
        raise ValueError(f"prompt has {int(is_img.sum())} image placeholders for {len(grid_thw)} pages")
    counts[is_img] = grid_thw.prod(-1) // merge_size**2
    # Each label's character, from the pieces single_pass_text joins, and the token that covers it (after expansion).
    n, pos, chars = len(labels), len(template.prefix) + len(template.intro.format(n=len(labels), query=query)), []
    before_label = template.label.split("{label}")[0].format(query=query, n=n)
    for x in labels:
        mark = template.label.format(label=x, query=query, n=n)
        page_first = len(VISION_SEGMENT) if template.label_after_page else 0
        chars.append(pos + page_first + len(before_label))
        pos += len(VISION_SEGMENT) + len(mark)
    covering = [torch.nonzero((spans[:, 0] <= c) & (spans[:, 1] > c)) for c in chars]
    label_rows = None  # (only the read-back fit needs them; a tokenizer without offsets for them just has none)
    if all(len(t) for t in covering):
        label_rows = (torch.cumsum(counts, 0) - counts)[torch.cat([t[0] for t in covering])]
    return SinglePassPrompt(ids.repeat_interleave(counts), in_query.repeat_interleave(counts), grid_thw, label_rows)


@dataclass
class CachedQuery:
    """The query segment of the cached layout. seg tags each token: -1 intro, i label of page i, n the tail."""

    ids: torch.Tensor  # (Tq,)
    seg: torch.Tensor  # (Tq,) int64

    def label_rows(self) -> torch.Tensor:
        """The last token of each label segment L_1 … L_n (it has read its whole label segment and nothing else)."""
        n = int(self.seg.max())  # the tail's tag
        return torch.stack([torch.nonzero(self.seg == i)[-1, 0] for i in range(n)])


def cached_query(tokenizer, template: ListwiseTemplate, query: str, labels, answer_id: int) -> CachedQuery:
    n = len(labels)
    # Each piece is tokenised on its own (in one batch call), so a label run is exactly the tokens of its label text.
    texts = [template.intro.format(n=n, query=query), *(template.cached_label_text(x, query, n) for x in labels),
             template.instruction.format(n=n, query=query)]
    pieces = [torch.tensor(ids, dtype=torch.long) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    pieces[-1] = torch.cat([pieces[-1], torch.tensor([answer_id])])
    seg = torch.cat([torch.full((len(p),), tag) for tag, p in zip(range(-1, n + 1), pieces)])
    return CachedQuery(torch.cat(pieces), seg)


class LabelHead(torch.nn.Module):
    """Logits of the label tokens (n_labels,) per row, computing only those LM-head rows."""

    def __init__(self, lm_head: torch.nn.Linear, label_ids: list[int]):
        super().__init__()
        self.lm_head = lm_head
        self.ids = list(label_ids)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        w = self.lm_head.weight[self.ids]
        logits = hidden.to(w.dtype) @ w.T
        if self.lm_head.bias is not None:
            logits = logits + self.lm_head.bias[self.ids]
        return logits.float()
