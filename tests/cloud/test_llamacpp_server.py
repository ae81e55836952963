"""`HttpCloudSession(engine="generic")` against a real llama.cpp server (llama-cpp-python).

llama-cpp-python is an optional, locally built tool (never a dependency of Tether: CI does not
build it), so this module skips where it is not installed, and where the edge GGUF has not
been assembled. It starts ``python -m llama_cpp.server`` on the 0.5B edge model and drives the
generic engine through chat, text generation and the unsupported scoring operations.

On CPUs whose native build faults (AMX) build it with, e.g.::

    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=ON -DGGML_FMA=ON -DGGML_F16C=ON \
        -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" \
        pip install 'llama-cpp-python[server]==0.3.36'
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("llama_cpp")
pytest.importorskip("llama_cpp.server", reason="llama-cpp-python was installed without its [server] extra")

from tether.cloud import SamplingParams, UnsupportedOperation  # noqa: E402
from tether.cloud._http import HttpCloudSession  # noqa: E402

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

EDGE = "qwen2.5-coder-0.5b"
READY_TIMEOUT_S = 60.0
QUESTION = "Write a one-line Python expression that reverses a string s."


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _edge_gguf() -> Path:
    from tether.models import cache_status

    status = cache_status(EDGE)
    if not status.assembled:
        pytest.skip(f"{EDGE} is not assembled at {status.gguf_path} (`tether models path {EDGE} --gguf` assembles it)")
    return status.gguf_path


@pytest.fixture(scope="module")
def llamacpp_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A llama.cpp OpenAI server on the edge GGUF, on a free loopback port."""
    gguf = _edge_gguf()
    port = _free_port()
    log = tmp_path_factory.mktemp("llamacpp") / "server.log"
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--n_threads", "2",
           "--n_ctx", "2048", "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"llama.cpp server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/v1/models", timeout=2.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"llama.cpp server not ready after {READY_TIMEOUT_S:.0f} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.25)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def edge_tokenizer() -> Any:
    from tether.models import load_tokenizer

    return load_tokenizer(EDGE, progress=False)


async def test_capabilities_and_unsupported_scoring(llamacpp_url: str, edge_tokenizer: Any) -> None:
    async with HttpCloudSession(llamacpp_url, engine="generic", tokenizer=edge_tokenizer) as s:
        info = await s.open()
        assert info.model.endswith(".gguf")  # llama.cpp lists the model by its path
        caps = info.capabilities
        assert caps.chat and caps.generate
        assert not caps.verify and not caps.score and not caps.sampling_verify
        assert info.eos_token_ids == (edge_tokenizer.eos_token_id,)
        await s.append(edge_tokenizer.encode("def add(a, b):", add_special_tokens=False))
        with pytest.raises(UnsupportedOperation, match="'generic' cannot score prompts, so verify"):
            await s.verify([1])
        with pytest.raises(UnsupportedOperation, match="cannot score prompts, so score"):
            await s.score([1])


async def test_chat_and_generate_agree_greedily(llamacpp_url: str, edge_tokenizer: Any) -> None:
    """Chat returns text; `generate` from the same chat-templated prompt (sent as text) gives
    the same greedy continuation, so the prompt survives the text round trip."""
    messages = [{"role": "user", "content": QUESTION}]
    async with HttpCloudSession(llamacpp_url, engine="generic", tokenizer=edge_tokenizer) as s:
        await s.open(sampling=SamplingParams(temperature=0.0))
        chat = await s.chat(messages, max_tokens=24)
        assert chat.text.strip()
        assert chat.prompt_tokens > 0 and 0 < chat.completion_tokens <= 24
        assert chat.finish_reason in ("stop", "length")

        prompt = edge_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                    return_dict=True)["input_ids"]
        await s.append(prompt)
        chunks = [c async for c in s.generate(24)]
        ids = [t for c in chunks for t in c.token_ids]
        assert ids and chunks[-1].finish_reason in ("stop", "length")
        assert s.length == len(prompt) + len(ids)
        text = edge_tokenizer.decode(ids, skip_special_tokens=True)
        assert text.strip() and text == chat.text

        # rollback then generate again: the same greedy output
        await s.rollback(len(prompt))
        again = [t for c in [c async for c in s.generate(24)] for t in c.token_ids]
        assert again == ids


async def test_chat_json_mode(llamacpp_url: str, edge_tokenizer: Any) -> None:
    async with HttpCloudSession(llamacpp_url, engine="generic", tokenizer=edge_tokenizer) as s:
        await s.open()
        res = await s.chat([{"role": "user", "content": "Give a JSON object with a key named answer."}],
                           max_tokens=48, json_mode=True)
        assert isinstance(json.loads(res.text), dict)
