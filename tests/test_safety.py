"""Safety (issue 9): nothing in the code can unpickle a file or run a model repository's code, and the cluster the
project ships is token-authenticated with its dashboard / Jobs API on localhost unless configured otherwise."""

from __future__ import annotations

import ast
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("fairdiff_ray", "jobs", "bench")

# module.function calls that unpickle (run arbitrary code from a file)
PICKLE_CALLS = {("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"), ("cloudpickle", "load"),
                ("cloudpickle", "loads"), ("dill", "load"), ("dill", "loads"), ("joblib", "load"),
                ("pd", "read_pickle"), ("pandas", "read_pickle"), ("yaml", "unsafe_load"), ("yaml", "full_load")}


def _dotted(node: ast.expr) -> tuple[str, str] | None:
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        return node.value.id, node.attr
    return None


def _kw(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_calls(source: str, filename: str = "<src>") -> list[str]:
    """'file:line: what' for every unsafe loading call in ``source``."""
    out = []
    tree = ast.parse(source, filename)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in ("pickle", "cloudpickle", "dill"):
            out.append(f"{filename}:{node.lineno}: from {node.module} import ...")
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        where = f"{filename}:{node.lineno}"
        if name == ("torch", "load") and not _is_true(_kw(node, "weights_only")):
            out.append(f"{where}: torch.load without weights_only=True")
        if name in PICKLE_CALLS:
            out.append(f"{where}: {'.'.join(name)}")
        if name in (("np", "load"), ("numpy", "load")) and _is_true(_kw(node, "allow_pickle")):
            out.append(f"{where}: np.load(allow_pickle=True)")
        if name == ("yaml", "load") and "Safe" not in ast.unparse(_kw(node, "Loader") or ast.Constant(None)):
            out.append(f"{where}: yaml.load without SafeLoader")
        trust = _kw(node, "trust_remote_code")
        if trust is not None and not (isinstance(trust, ast.Constant) and trust.value is False):
            out.append(f"{where}: trust_remote_code={ast.unparse(trust)}")
    return out


def test_scanner_flags_what_it_should() -> None:
    bad = ("import torch, pickle, numpy as np, yaml\nfrom transformers import AutoModel\n"
           "torch.load('a.pt')\ntorch.load('a.pt', weights_only=False)\npickle.load(open('x', 'rb'))\n"
           "np.load('x.npy', allow_pickle=True)\nAutoModel.from_pretrained('m', trust_remote_code=True)\n"
           "yaml.load('a: 1', Loader=yaml.Loader)\n")
    assert len(unsafe_calls(bad)) == 6
    good = ("import torch, numpy as np, yaml\ntorch.load('a.pt', weights_only=True)\nnp.load('x.npy')\n"
            "yaml.load('a: 1', Loader=yaml.SafeLoader)\nyaml.safe_load('a: 1')\n")
    assert unsafe_calls(good) == []


def test_no_unsafe_loading_in_the_code() -> None:
    """Model, adaptor and checkpoint files are read with safetensors or torch.load(weights_only=True) only; no
    pickle, no trust_remote_code anywhere in the package, the job scripts or the benchmarks."""
    found, files = [], 0
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            files += 1
            found += unsafe_calls(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
    assert files > 50  # the scan saw the code
    assert found == [], "\n".join(found)
    # and no text mention slipped past the AST scan (e.g. a kwargs dict {"trust_remote_code": True})
    for top in SCANNED:
        for path in (ROOT / top).rglob("*.py"):
            text = path.read_text(encoding="utf-8")
            assert not re.search(r"trust_remote_code[\"']?\s*[:=]\s*True", text), path


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def _start_commands(cluster: dict) -> list[str]:
    return [c for c in cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"] if "ray start" in c]


def test_cluster_yaml_turns_on_token_auth(cluster: dict) -> None:
    starts = _start_commands(cluster)
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token" in c for c in starts)
    assert "-e RAY_AUTH_MODE=token" in cluster["docker"]["run_options"]  # every process in the container
    assert cluster["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"  # the same token on every node
    assert any("chmod 600 ~/.ray/auth_token" in c for c in cluster["setup_commands"])
    text = (ROOT / "cluster.yaml").read_text()
    assert "ray get-auth-token --generate" in text and "export RAY_AUTH_MODE=token" in text  # documented


def _expand(word: str, env: dict[str, str]) -> str:
    """What bash makes of a ray start argument (the cluster launcher runs the commands through a shell)."""
    base = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME")}
    return subprocess.run(["bash", "-c", f"printf %s {word}"], capture_output=True, text=True,
                          env={**base, **env}, check=True).stdout


def test_cluster_dashboard_listens_on_localhost_unless_configured(cluster: dict) -> None:
    head = " ".join(cluster["head_start_ray_commands"])
    m = re.search(r"--dashboard-host[= ](\S+)", head)
    assert m, "the head must pass --dashboard-host (ray's default is all interfaces)"
    assert _expand(m.group(1), {}) in ("127.0.0.1", "localhost")
    assert _expand(m.group(1), {"FAIRDIFF_DASHBOARD_HOST": "0.0.0.0"}) == "0.0.0.0"  # configurable
    for c in _start_commands(cluster):
        assert "0.0.0.0" not in c, c
