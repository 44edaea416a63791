"""The runtime import path stays light: training (renderer, BM25, matplotlib) and the frameworks load only when
used."""

import json
import subprocess
import sys


def test_runtime_imports_no_training_or_framework_code():
    code = (
        "import sys, json, minirerank_core, minirerank_core.pipeline, minirerank_core.cli, minirerank_core.retrieval, "
        "minirerank_core.distributed, minirerank_core.cache\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith(('matplotlib', 'minirerank_core.train', "
        "'rank_bm25', 'langchain', 'llama_index', 'ray', 's3fs')))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
