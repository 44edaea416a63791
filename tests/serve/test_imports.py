"""The server is imported only when used: `import minirerank_core` and the CLI load no web framework or client."""

import json
import subprocess
import sys


def test_core_and_cli_do_not_import_the_server():
    code = (
        "import sys, json, minirerank_core, minirerank_core.cli, minirerank_core.pipeline\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('fastapi', 'starlette', 'uvicorn', "
        "'cohere', 'prometheus_client') or m.startswith('minirerank_core.serve'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_the_server_package_imports_on_its_own():
    code = "import minirerank_core.serve as s; print(s.create_app.__name__, s.Limits().max_documents)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.split() == ["create_app", "128"]
