"""Training code for minirerank's models (usable on real checkpoints too).

Stages, each a module with a command line (``python -m minirerank_core.train.<stage> --help``):

    data      offline corpus (Python standard-library docstrings) -> rendered pages, queries, hard negatives,
              splits by source document, and a byte-level BPE tokenizer trained in code
    pretrain  "reading" pretraining of the shared Qwen3-VL vision tower: each merged visual token predicts the
              text tokens rendered under it (the renderer knows every word's box)
    embedder  ColQwen3 first stage: contrastive MaxSim training with in-batch and hard negatives
    reranker  dense vision-first teacher (point-wise yes/no, guided attention), then the mini student (early
              exit, interaction band, shared query positions, pruning by the embedder's importance) distilled
              from the teacher
    export    shipped defaults: HF save_pretrained directories, minirerank_config.json, sample corpus

``recipe.py`` chains them (``python -m minirerank_core.train.recipe --out DIR``). Nothing here is imported by
the inference path; this package's ``__init__`` stays import-light on purpose.
"""
