"""Published reranker checkpoints, on tiny replicas with their files and key names (minirerank_core.testing), loaded
offline by path through the library's loaders; each vision-first one's exact configuration equals the scoring its
own published code does, recomputed here the way that code does it."""

from __future__ import annotations

import json
import logging
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file

from minirerank_core import ConfigError, MiniReranker, Page, RerankConfig
from minirerank_core.engine.prompt import (
    JINA_M0_TEMPLATE,
    MONOQWEN_TEMPLATE,
    QWEN3_VL_RERANKER_TEMPLATE,
    JinaM0Head,
    PromptTemplate,
    QueryFirstTemplate,
    qwen3_vl_reranker_template,
)
from minirerank_core.engine.reference import masked_scores
from minirerank_core.engine.scorer import score_cached
from minirerank_core.errors import ModelNotFoundError
from minirerank_core.rerankers.loading import load_checkpoint
from minirerank_core.testing import (
    merged_adapter_model,
    save_tiny_jina_m0,
    save_tiny_monoqwen,
    save_tiny_qwen3_vl_reranker,
)
from tests.helpers import MAX_PIXELS

QUERY = "what was the revenue growth in 2023"
OTHER_QUERY = "table of results for the last quarter"


def rel_err(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-6))


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    root = tmp_path_factory.mktemp("published")
    return {
        "monoqwen": save_tiny_monoqwen(root / "MonoQwen2-VL-v0.1", max_pixels=MAX_PIXELS),
        "jina": save_tiny_jina_m0(root / "jina-reranker-m0", max_pixels=MAX_PIXELS),
        "qwen3": save_tiny_qwen3_vl_reranker(root / "Qwen3-VL-Reranker-2B", max_pixels=MAX_PIXELS),
    }


# --- MonoQwen2-VL: a PEFT LoRA adapter over Qwen2-VL --------------------------------------------------------------
def test_monoqwen_adapter_loads_through_load_checkpoint(replicas, page_images):
    path = replicas["monoqwen"]
    assert sorted(p.name for p in path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    adapter_keys = load_file(path / "adapter_model.safetensors")
    assert any(k.startswith("base_model.model.model.layers.") for k in adapter_keys)  # the published (pre-5) names
    ckpt = load_checkpoint(path)
    base = json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert (ckpt.layout, ckpt.base, ckpt.template) == ("peft-adapter", base, MONOQWEN_TEMPLATE)
    assert ckpt.vision_first and ckpt.head is None

    # The adapter is applied: outputs equal the base with every LoRA pair added by hand, and differ from the base.
    inputs = ckpt.processor(text=[MONOQWEN_TEMPLATE.full_text(QUERY)], images=[page_images[0]], return_tensors="pt")
    reference = merged_adapter_model(path)
    from transformers import Qwen2VLForConditionalGeneration

    plain_base = Qwen2VLForConditionalGeneration.from_pretrained(base, local_files_only=True).eval()
    with torch.no_grad():
        got, want, base_only = (m(**inputs).logits[0, -1] for m in (ckpt.model.eval(), reference, plain_base))
    assert rel_err(got, want) < 1e-4
    assert rel_err(base_only, want) > 1e-2


def test_monoqwen_exact_config_equals_its_published_scoring(replicas, page_images):
    """Model card: base + load_adapter, the base's processor and chat template, image then the question, and the
    True/False logits of the last token of a plain forward."""
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    path = replicas["monoqwen"]
    base_dir = json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = Qwen2VLForConditionalGeneration.from_pretrained(base_dir, local_files_only=True).eval()
    model.load_adapter(str(path))
    processor = AutoProcessor.from_pretrained(base_dir, local_files_only=True)
    prompt = ("Assert the relevance of the previous image document to the following query, answer True or False. "
              f"The query is: {QUERY}")
    true_id, false_id = processor.tokenizer.convert_tokens_to_ids(["True", "False"])
    published = []
    for image in page_images:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        inputs = processor(text=[text], images=[image], return_tensors="pt")
        with torch.no_grad():
            logits = model(**inputs).logits[0, -1]
        published.append(float(logits[true_id] - logits[false_id]))

    reranker = MiniReranker.from_pretrained(path)  # RerankConfig defaults: the exact configuration
    assert reranker.template == MONOQWEN_TEMPLATE
    pages = [Page(im, id=f"p{i}") for i, im in enumerate(page_images)]
    assert len({reranker.visual_grid(p) for p in pages}) == 3
    assert rel_err(reranker.score(QUERY, pages), published) < 1e-4
    assert rel_err(load_checkpoint(path).dense_scores(QUERY, page_images), published) < 1e-4
    assert rel_err(reranker.score(OTHER_QUERY, pages), published) > 1e-3  # the comparison can fail


def test_adapter_whose_base_is_unavailable_names_both(replicas, tmp_path):
    adapter = tmp_path / "MonoQwen2-VL-v0.1"
    shutil.copytree(replicas["monoqwen"], adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "Qwen/Qwen2-VL-2B-Instruct"  # what the published adapter names
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelNotFoundError, match="Qwen/Qwen2-VL-2B-Instruct") as err:
        load_checkpoint(adapter, local_files_only=True)
    assert str(adapter) in str(err.value) and "base_model_name_or_path" in str(err.value)


# --- jina-reranker-m0: Qwen2-VL + its own score head, custom modeling.py -------------------------------------------
def jina_published_scores(path, query: str, images: list) -> torch.Tensor:
    """jina-reranker-m0's compute_score, as its modeling.py does it: the prompt of formatting_prompts_func (doc_type
    "image"), the processor at max_pixels=602112 / min_pixels=3136 padding on the left, token 100 appended, a plain
    Qwen2-VL forward, hidden_states[-1] at the last position through score = Sequential(Linear, ReLU, Linear)."""
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(path, local_files_only=True).eval()
    # compute_score passes max_pixels=602112, min_pixels=3136; transformers 5 spells that budget `size`.
    processor = AutoProcessor.from_pretrained(path, local_files_only=True,
                                              size={"longest_edge": 602112, "shortest_edge": 3136})
    tensors = load_file(path / "model.safetensors")
    hidden = model.config.text_config.hidden_size
    score = torch.nn.Sequential(torch.nn.Linear(hidden, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1))
    score.load_state_dict({k[len("score."):]: v for k, v in tensors.items() if k.startswith("score.")})
    prompt = "**Document**:\n<|vision_start|><|image_pad|><|vision_end|>" + "\n" + f"**Query**:\n{query}"
    batch = processor(text=[prompt] * len(images), images=images, padding=True, padding_side="left",
                      return_tensors="pt")
    n = batch["input_ids"].shape[0]
    batch["input_ids"] = torch.cat([batch["input_ids"], torch.full((n, 1), 100)], dim=1)
    batch["attention_mask"] = torch.cat([batch["attention_mask"], torch.ones((n, 1), dtype=torch.long)], dim=1)
    batch["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"], torch.zeros((n, 1), dtype=torch.long)], dim=1)
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
        return score(out.hidden_states[-1][:, -1]).squeeze(-1)


def test_jina_m0_loads_without_running_its_code(replicas):
    path = replicas["jina"]
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["JinaVLForRanking"] and config["auto_map"] == {"AutoModel": "modeling.JinaVLForRanking"}
    ckpt = load_checkpoint(path)  # the replica's modeling.py raises if anything runs it
    assert not any(getattr(m, "__file__", None) and str(path) in str(m.__file__) for m in list(sys.modules.values()))
    assert ckpt.layout == "jina-reranker-m0" and ckpt.template == JINA_M0_TEMPLATE and ckpt.vision_first
    assert JINA_M0_TEMPLATE.suffix_ids == (100,)
    assert isinstance(ckpt.head, JinaM0Head)
    published = {k: v for k, v in load_file(path / "model.safetensors").items() if k.startswith("score.")}
    state = ckpt.head.state_dict()
    assert set(state) == set(published) == {"score.0.weight", "score.0.bias", "score.2.weight", "score.2.bias"}
    for k, v in published.items():
        assert torch.equal(state[k], v.float())
    hidden = ckpt.model.config.text_config.hidden_size
    assert state["score.0.weight"].shape == (hidden, hidden) and state["score.2.weight"].shape == (1, hidden)
    assert "lm_head.weight" not in ckpt.model.state_dict()  # the published model has no LM head
    with pytest.raises(ConfigError, match="JinaM0Head"):
        ckpt.model.lm_head.weight
    assert ckpt.processor.image_processor.size["longest_edge"] == 602112  # compute_score's own budget
    assert ckpt.processor.image_processor.size["shortest_edge"] == 3136


def test_jina_m0_exact_config_equals_its_published_scoring(replicas, page_images):
    path = replicas["jina"]
    published = jina_published_scores(path, QUERY, page_images)
    ckpt = load_checkpoint(path)
    assert rel_err(ckpt.dense_scores(QUERY, page_images), published) < 1e-4
    assert rel_err(JinaM0Head.probability(ckpt.dense_scores(QUERY, page_images)),
                   torch.sigmoid(published - 2.65)) < 1e-4

    # The cached engine with RerankConfig defaults, fed the query segment with its score token.
    reranker = MiniReranker(ckpt.model, ckpt.processor, template=ckpt.template, head=ckpt.head)
    pages = [Page(im, id=f"p{i}") for i, im in enumerate(page_images)]
    assert len({reranker.visual_grid(p) for p in pages}) == 3
    q_ids = ckpt.template.query_ids(reranker.tokenizer, QUERY)
    assert q_ids[-1] == 100
    with torch.inference_mode():
        cached = score_cached(reranker.adapter, reranker.prefix_cache, q_ids, reranker.pages.kv(pages),
                              reranker.config, reranker.head, [None] * len(pages))
    assert rel_err(cached, published) < 1e-4
    assert rel_err(cached, jina_published_scores(path, OTHER_QUERY, page_images)) > 1e-3


def test_jina_m0_sparse_path_equals_explicit_mask_reference(replicas, page_images):
    """The score token flows through the sparse semantics too (query side of band and exit)."""
    ckpt = load_checkpoint(replicas["jina"])
    cfg = RerankConfig(exit_layer=5, band=(2, 4))
    reranker = MiniReranker(ckpt.model, ckpt.processor, cfg, template=ckpt.template, head=ckpt.head)
    pages = [Page(im, id=f"p{i}") for i, im in enumerate(page_images)]
    with torch.inference_mode():
        fast = score_cached(reranker.adapter, reranker.prefix_cache, ckpt.template.query_ids(reranker.tokenizer, QUERY),
                            reranker.pages.kv(pages), reranker.config, reranker.head, [None] * len(pages))
    ref = [masked_scores(reranker.adapter, ckpt.processor, ckpt.template, ckpt.head, QUERY, im,
                         exit_layer=cfg.exit_layer, band=cfg.band) for im in page_images]
    assert rel_err(fast, ref) < 1e-4
    assert rel_err(fast, ckpt.dense_scores(QUERY, page_images)) > 1e-2


def test_jina_m0_sharded_checkpoint(tmp_path, replicas):
    path = save_tiny_jina_m0(tmp_path / "jina-reranker-m0", max_pixels=MAX_PIXELS, shards=2)
    assert (path / "model.safetensors.index.json").is_file() and not (path / "model.safetensors").exists()
    ckpt = load_checkpoint(path)
    single = load_checkpoint(replicas["jina"])
    for k, v in single.head.state_dict().items():
        assert torch.equal(ckpt.head.state_dict()[k], v)


def test_jina_m0_from_pretrained_equals_its_published_scoring(replicas, page_images):
    path = replicas["jina"]
    reranker = MiniReranker.from_pretrained(path)
    pages = [Page(im, id=f"p{i}") for i, im in enumerate(page_images)]
    assert rel_err(reranker.score(QUERY, pages), jina_published_scores(path, QUERY, page_images)) < 1e-4


# --- Qwen3-VL-Reranker: yes/no, but query before document ---------------------------------------------------------
# vllm-project/vllm, examples/pooling/score/template/qwen3_vl_reranker.jinja: the published prompt, rendered here
# with the default instruction, the query as text and the document as one image.
QWEN3_VL_RERANKER_JINJA = (
    '<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct '
    'provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n<Instruct>: '
    '{{ instruction | default("Given a search query, retrieve relevant candidates that answer the query.", true) }}'
    "<Query>:{{ query }}\n<Document>:{{ document }}<|im_end|>\n<|im_start|>assistant\n"
)


def test_qwen3_vl_reranker_prompt_is_the_published_one():
    import jinja2

    rendered = jinja2.Template(QWEN3_VL_RERANKER_JINJA, keep_trailing_newline=True).render(
        query=QUERY, document="<|vision_start|><|image_pad|><|vision_end|>")
    assert QWEN3_VL_RERANKER_TEMPLATE.full_text(QUERY) == rendered
    assert not QWEN3_VL_RERANKER_TEMPLATE.vision_first and PromptTemplate.vision_first
    custom = qwen3_vl_reranker_template("Find {pages} about finance.")
    assert "<Instruct>: Find {pages} about finance.<Query>:x\n" in custom.full_text("x")


def test_qwen3_vl_reranker_scores_exactly_densely_and_refuses_the_cache(replicas, page_images, caplog):
    path = replicas["qwen3"]
    with caplog.at_level(logging.WARNING, logger="minirerank"):
        ckpt = load_checkpoint(path)
    assert ckpt.template == QWEN3_VL_RERANKER_TEMPLATE and not ckpt.vision_first
    assert "vision-first" in caplog.text
    assert ckpt.processor.image_processor.size["longest_edge"] == 1800 * 32 * 32  # its reference code's budget

    # Its reference code: model.model(...).last_hidden_state[:, -1] through Linear(w_yes - w_no), then sigmoid.
    tok = ckpt.processor.tokenizer
    yes, no = tok.get_vocab()["yes"], tok.get_vocab()["no"]
    w = ckpt.model.lm_head.weight.detach()
    published = []
    for image in page_images:
        text = QWEN3_VL_RERANKER_TEMPLATE.full_text(QUERY)
        inputs = ckpt.processor(text=[text], images=[image], return_tensors="pt")
        with torch.no_grad():
            h = ckpt.model.model(**inputs).last_hidden_state[0, -1]
        published.append(float(h @ (w[yes] - w[no])))
    assert rel_err(ckpt.dense_scores(QUERY, page_images), published) < 1e-4

    with pytest.raises(ConfigError, match="vision-first"):
        MiniReranker.from_pretrained(path)
    with pytest.raises(ConfigError, match="vision-first"):
        MiniReranker(ckpt.model, ckpt.processor, template="qwen3-vl-reranker")
    with pytest.raises(ConfigError, match="query before the page"):
        QWEN3_VL_RERANKER_TEMPLATE.query_ids(tok, QUERY)


def test_query_first_page_states_depend_on_the_query(replicas, page_images):
    """Why the cache cannot serve Qwen3-VL-Reranker: the page's hidden states change with the query."""
    ckpt = load_checkpoint(replicas["qwen3"])
    states = []
    for q in (QUERY, OTHER_QUERY):
        inputs = ckpt.processor(text=[QWEN3_VL_RERANKER_TEMPLATE.full_text(q)], images=[page_images[0]],
                                return_tensors="pt")
        visual = inputs["input_ids"][0] == ckpt.model.config.image_token_id
        with torch.no_grad():
            states.append(ckpt.model.model(**inputs).last_hidden_state[0, visual])
    assert states[0].shape == states[1].shape
    assert float((states[0] - states[1]).abs().max()) > 1e-3


def test_published_template_recognised_only_by_name(replicas, tmp_path):
    renamed = tmp_path / "my-reranker"
    shutil.copytree(replicas["qwen3"], renamed)
    ckpt = load_checkpoint(renamed)
    assert ckpt.settings.template is None and ckpt.template.vision_first  # nothing in the files says otherwise
    assert isinstance(load_checkpoint(replicas["qwen3"]).template, QueryFirstTemplate)
    inside = tmp_path / "Qwen3-VL-Reranker-experiments" / "my-reranker"  # a folder it sits in does not count
    shutil.copytree(replicas["qwen3"], inside)
    assert load_checkpoint(inside).settings.template is None


# --- hub ids ----------------------------------------------------------------------------------------------------
def test_unknown_hub_id_offline_raises_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    name = "minirerank-tests/no-such-reranker"
    for load in (load_checkpoint, MiniReranker.from_pretrained):
        with pytest.raises(ModelNotFoundError, match=name) as err:
            load(name)
        assert isinstance(err.value, ConfigError) and isinstance(err.value, OSError)
        assert "offline" in str(err.value) or "local_files_only" in str(err.value)


def test_directory_without_a_checkpoint_raises_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="config.json"):
        load_checkpoint(tmp_path)


def test_calibrate_scores_with_the_checkpoints_own_head(replicas, page_images, monkeypatch):
    """Every reranker calibrate builds for its sweep scores with the checkpoint's head (jina-reranker-m0's score
    head, not yes/no logits), so its reference is the published scoring."""
    import minirerank_core.rerankers as rerankers
    from minirerank_core.calibrate import Setting, calibrate

    ckpt = load_checkpoint(replicas["jina"])
    reranker = MiniReranker(ckpt.model, ckpt.processor, template=ckpt.template, head=ckpt.head)
    built = []

    class Recording(MiniReranker):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(rerankers, "MiniReranker", Recording)
    pages = [Page(im, id=f"p{i}") for i, im in enumerate(page_images)]
    L = reranker.adapter.num_layers
    cal = calibrate(reranker, pages, [QUERY, OTHER_QUERY], grid=[Setting(L, (0, L)), Setting(L - 1, (0, L - 1))])
    assert len(built) == 3 and all(r.head is ckpt.head for r in built)
    published = jina_published_scores(replicas["jina"], QUERY, page_images)
    assert rel_err(built[0].score(QUERY, pages), published) < 1e-4
    assert cal.rows[0].exact and cal.rows[0].ndcg5 == pytest.approx(1.0)
