"""Real translating routers for the end-to-end tests: claude-code-router and LiteLLM's proxy.

Both are installed, pinned, by ``scripts/install_translators.sh`` (cached under
``${STABLEPREFIX_CACHE:-~/.cache/stableprefix}/ccr`` and ``.../litellm``); they are found through
``CCR_BIN``/``LITELLM_BIN`` (what the installer prints), else in that cache at the pinned versions. Each
runs on 127.0.0.1 on a free port with its configuration in a temp directory, takes Claude Code's Anthropic
Messages requests and sends the OpenAI shape to `target` (an ``http://127.0.0.1:port`` base URL); each is
started and stopped by pid through `stableprefix.cli.process.Child`.

- claude-code-router: ``node <dist/cli.js> start`` runs the server in the foreground, configured by
  ``$HOME/.claude-code-router/config.json`` (one provider at ``<target>/v1/chat/completions``).
- LiteLLM: ``litellm --config`` with one wildcard deployment ``openai/<model>`` at ``<target>/v1``; by default
  its ``/v1/messages`` sends the OpenAI Responses API, with ``chat=True``
  (``use_chat_completions_url_for_anthropic_messages``) chat completions. It refuses to start without a
  master key, so each run gets a random one, which the client sends as its API key.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path

from stableprefix.cli import process
from tests.support.helpers import free_port
from tests.support.helpers import wait_until

INSTALLER = Path(__file__).resolve().parents[2] / "scripts" / "install_translators.sh"
MODEL = "smol"  # the model name the routers send upstream


def _pinned(name: str) -> str:
    """A version constant of the installer (``readonly NAME="x.y.z"``): one place to bump."""
    m = re.search(rf'^readonly {name}="([^"]+)"', INSTALLER.read_text(), re.M)
    if m is None:
        raise RuntimeError(f"{INSTALLER} has no {name}")
    return m.group(1)


def _cache() -> Path:
    base = os.environ.get("STABLEPREFIX_CACHE") or str(Path.home() / ".cache" / "stableprefix")
    return Path(base)


def ccr_bin() -> Path | None:
    """claude-code-router's entry script (CCR_BIN, else the installer's cache), None when not installed."""
    if env := os.environ.get("CCR_BIN"):
        path = Path(env)
    else:
        version = _pinned("CCR_VERSION")
        path = _cache() / "ccr" / version / "node_modules/@musistudio/claude-code-router/dist/cli.js"
    return path if path.is_file() else None


def litellm_bin() -> Path | None:
    """LiteLLM's ``litellm`` command in its venv (LITELLM_BIN, else the cache), None when not installed."""
    if env := os.environ.get("LITELLM_BIN"):
        path = Path(env)
    else:
        dest = _cache() / "litellm" / _pinned("LITELLM_VERSION")
        path = dest / "bin" / "litellm" if (dest / ".ok").is_file() else dest / "missing"
    return path if path.is_file() and os.access(path, os.X_OK) else None


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@dataclass
class Router:
    """A running router: its base URL, the API key clients must send, its process."""

    name: str
    port: int
    api_key: str
    child: process.Child

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.child.pid

    def output(self) -> str:
        return self.child.output()

    def stop(self) -> int:
        return self.child.stop(grace=10)


def start_ccr(target: str, home: Path, timeout: float = 60.0) -> Router:
    """claude-code-router in the foreground with its config in `home`, sending to `target`."""
    found = ccr_bin()
    if found is None:
        raise FileNotFoundError("claude-code-router is not installed (scripts/install_translators.sh)")
    port = free_port()
    conf = home / ".claude-code-router"
    conf.mkdir(parents=True, exist_ok=True)
    config = {
        "PORT": port,
        "LOG": False,
        "API_TIMEOUT_MS": 600000,
        "Providers": [
            {
                "name": "local",
                "api_base_url": f"{target}/v1/chat/completions",
                "api_key": "dummy",
                "models": [MODEL],
            }
        ],
        "Router": {"default": f"local,{MODEL}", "background": f"local,{MODEL}"},
    }
    (conf / "config.json").write_text(json.dumps(config))
    child = process.Child(["node", str(found), "start"], env={"HOME": str(home)})
    router = Router("claude-code-router", port, "dummy", child)
    if not wait_until(lambda: child.proc.poll() is None and _listening(port), timeout, interval=0.2):
        router.stop()
        raise RuntimeError(f"claude-code-router did not listen on {port}:\n{child.output()[-3000:]}")
    return router


def start_litellm(target: str, workdir: Path, chat: bool = False, timeout: float = 180.0) -> Router:
    """LiteLLM's proxy with one ``openai/`` deployment at `target`; Responses API unless `chat`."""
    found = litellm_bin()
    if found is None:
        raise FileNotFoundError("LiteLLM is not installed (scripts/install_translators.sh)")
    port = free_port()
    key = "sk-" + secrets.token_hex(32)
    config: dict[str, object] = {
        "model_list": [
            {
                "model_name": "*",
                "litellm_params": {
                    "model": f"openai/{MODEL}",
                    "api_base": f"{target}/v1",
                    "api_key": "dummy",
                },
            }
        ],
        "general_settings": {"master_key": key},
    }
    if chat:
        config["litellm_settings"] = {"use_chat_completions_url_for_anthropic_messages": True}
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "litellm.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    env = {"HOME": str(workdir), "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_TELEMETRY": "False"}
    args = [str(found), "--config", str(path), "--host", "127.0.0.1", "--port", str(port)]
    child = process.Child(args, env=env)
    router = Router("litellm" + ("-chat" if chat else ""), port, key, child)
    started = child.wait_for("Application startup complete", timeout)
    if not started or not wait_until(
        lambda: child.proc.poll() is None and _listening(port), 30, interval=0.2
    ):
        router.stop()
        raise RuntimeError(f"LiteLLM did not start:\n{child.output()[-3000:]}")
    return router
