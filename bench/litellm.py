"""LiteLLM's proxy as a baseline: its own venv, one worker, an `openai/` model on our upstream."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from bench.procs import SERVICE_CORE, Proc, pinned, wait_http
from bench.upstreams import MODEL

VENV = Path(__file__).resolve().parent / ".litellm-venv"
MASTER_KEY = "sk-bench-" + "0123456789abcdef" * 4  # clients authenticate, as with the service


def ensure_installed() -> Path:
    """The `litellm` command of bench/.litellm-venv, installing `litellm[proxy]` if needed."""
    command = VENV / "bin" / "litellm"
    if command.exists():
        return command
    print("installing litellm[proxy] into bench/.litellm-venv (first run only) ...", flush=True)
    python = VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True, capture_output=True)
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "litellm[proxy]"],
        capture_output=True,
        text=True,
        check=False,
        timeout=900,
    )
    if install.returncode != 0 or not command.exists():
        last = (install.stderr or install.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"pip install 'litellm[proxy]' failed: {last[0][:200]}")
    return command


def start(workdir: Path, upstream_port: int) -> tuple[Proc, int]:
    from bench.procs import free_port

    command = ensure_installed()
    config = workdir / "litellm.yaml"
    config.write_text(
        f"""model_list:
  - model_name: {MODEL}
    litellm_params:
      model: openai/{MODEL}
      api_base: http://127.0.0.1:{upstream_port}/v1
      api_key: bench-upstream-key
litellm_settings:
  telemetry: false
  drop_params: true
"""
    )
    port = free_port()
    env = {
        **os.environ,
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_LOG": "ERROR",
        "LITELLM_TELEMETRY": "False",
        "DISABLE_SCHEMA_UPDATE": "True",
    }
    for name in ("DATABASE_URL", "REDIS_URL", "REDIS_HOST"):
        env.pop(name, None)
    env["LITELLM_MASTER_KEY"] = MASTER_KEY
    argv = [str(command), "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--num_workers", "1"]
    proc = Proc("litellm", pinned(SERVICE_CORE, argv), log_dir=workdir, env=env, cwd=workdir)
    try:
        wait_http(proc, port, "/health/liveliness", timeout=180)
    except BaseException:
        proc.stop()
        raise
    return proc, port
