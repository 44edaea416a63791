"""documents_to_messages: the reranked page documents as a chat turn for a multimodal chat model (images, not
text labels)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

from langchain_core.documents import Document
from langchain_core.messages import HumanMessage

from minirerank_core.glue import DEFAULT_INSTRUCTION, EncodedImage, item_label, prompt_parts

from langchain_minirerank.compressor import document_page


def _doc_id(doc: Document, i: int) -> str:
    return doc.id if doc.id is not None else f"#{i}"


def documents_to_messages(
    query: str,
    documents: Sequence[Document],
    *,
    instruction: Optional[str] = DEFAULT_INSTRUCTION,
    on_missing_image: str = "raise",
) -> list[HumanMessage]:
    """One HumanMessage for a chat model: the instruction, then for each document, in the order given (the
    compressor's output is best first), a text block "[i] label" ("report.pdf, page 3", from
    ``metadata["source"]`` and ``metadata["page"]``, else the document id) followed by the page as a standard
    image content block (``{"type": "image", "base64": ..., "mime_type": ...}``, which LangChain's chat model
    integrations translate for their provider), then "Question: ...".

    Images are read like MiniRerank reads them (``metadata["image_path"]``, base64 ``page_content``,
    ``metadata["image"]``...): PNG / JPEG / GIF / WEBP files as they are, anything else as PNG. A document without
    a readable image raises InvalidImageError, or is left out with a MissingImageWarning with
    ``on_missing_image="skip"``. Scores are not sent.

        chain = {"docs": compression_retriever, "question": RunnablePassthrough()} | RunnableLambda(
            lambda x: documents_to_messages(x["question"], x["docs"])) | chat_model
    """

    def block(part: str | EncodedImage) -> dict[str, Any]:
        if isinstance(part, EncodedImage):
            return {"type": "image", "base64": part.base64, "mime_type": part.mime_type}
        return {"type": "text", "text": part}

    parts = prompt_parts(query, list(documents), document_page, _doc_id,
                         lambda d, i: item_label(d.metadata, _doc_id(d, i)), "document",
                         instruction=instruction, on_missing_image=on_missing_image)
    return [HumanMessage(content=[block(p) for p in parts])]


__all__ = ["documents_to_messages"]
