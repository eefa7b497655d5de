"""formats/zse-v1.md and formats/manifest.schema.json agree with zse_runtime.zsefile and the converter.

(a) the spec's tables and the schema's enums against the constants module;
(b) real conversions of tiny checkpoints: manifests validate against the schema and the bytes follow §1;
(c) the schema rejects what the spec forbids and accepts what minor versions may add.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import struct
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import xxhash

from zse_convert import convert as convert_module
from zse_convert.architectures import HF_ARCHITECTURES
from zse_convert.convert import ConvertOptions, convert
from zse_runtime import zsefile as zf
from zse_runtime.zsefile import ZseFile

from .checkpoints import make_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SPEC_PATH = ROOT / "formats" / "zse-v1.md"
SCHEMA_PATH = ROOT / "formats" / "manifest.schema.json"


# ---------------------------------------------------------------------------------------------
# Reading the spec's tables
# ---------------------------------------------------------------------------------------------


def _parse_tables(text: str) -> dict[str, list[list[str]]]:
    """Heading text -> body rows (cells) of the first table under it. Code blocks are skipped."""
    tables: dict[str, list[list[str]]] = {}
    heading, in_code, rows = None, False, None
    for line in text.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if in_code or not line.startswith("|"):
            rows = None
            if not in_code and line.startswith("#"):
                heading = line.lstrip("#").strip()
            continue
        if rows is None:  # a table starts: this line holds the column titles
            rows = tables.setdefault(heading, []) if heading not in tables else []
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not all(set(c) <= set("-: ") for c in cells):
            rows.append(cells)
    return tables


SPEC_TEXT = SPEC_PATH.read_text(encoding="utf-8")
TABLES = _parse_tables(SPEC_TEXT)
SCHEMA = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


def table(title: str) -> list[list[str]]:
    matches = [h for h in TABLES if h == title or h.endswith(" " + title)]
    assert len(matches) == 1, f"expected one table under a heading '{title}', found {matches}"
    return TABLES[matches[0]]


def ticks(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def first_tick(cell: str) -> str:
    found = ticks(cell)
    assert found, f"first column must be an identifier in backticks, got {cell!r}"
    return found[0]


def keyed(title: str) -> dict[str, list[str]]:
    """Rows keyed by every backticked identifier in their first cell."""
    result: dict[str, list[str]] = {}
    for row in table(title):
        for ident in ticks(row[0]):
            assert ident not in result, f"'{ident}' appears twice in table '{title}'"
            result[ident] = row
    return result


def idents(title: str) -> list[str]:
    return [first_tick(row[0]) for row in table(title)]


# ---------------------------------------------------------------------------------------------
# (a) spec tables == constants module
# ---------------------------------------------------------------------------------------------


def test_constants_table():
    rows = keyed("Constants")
    assert set(rows) == {"MAGIC", "FORMAT_VERSION_MAJOR", "FORMAT_VERSION_MINOR", "HEADER_SIZE",
                         "ALIGNMENT", "MAX_MANIFEST_BYTES"}
    assert bytes.fromhex(first_tick(rows["MAGIC"][1])) == zf.MAGIC
    for name in ("FORMAT_VERSION_MAJOR", "FORMAT_VERSION_MINOR", "HEADER_SIZE", "ALIGNMENT",
                 "MAX_MANIFEST_BYTES"):
        assert int(first_tick(rows[name][1])) == getattr(zf, name), name
    assert "# The `.zse` file format, version " + f"{zf.FORMAT_VERSION_MAJOR}.{zf.FORMAT_VERSION_MINOR}" \
        in SPEC_TEXT


def _struct_fields(fmt: str) -> list[tuple[int, int, str]]:
    """(offset, size, spec type) for each field of a little-endian struct format without padding."""
    assert fmt[0] == "<"
    fields, offset = [], 0
    for count, code in re.findall(r"(\d*)([a-zA-Z])", fmt[1:]):
        n = int(count or 1)
        if code == "s":
            fields.append((offset, n, f"u8[{n}]"))
            offset += n
        else:
            size = struct.calcsize("<" + code)
            for _ in range(n):
                fields.append((offset, size, f"u{8 * size}"))
                offset += size
    return fields


def test_header_table_matches_header_struct():
    rows = table("Header")
    documented = [(int(r[1]), int(r[2]), first_tick(r[3])) for r in rows]
    assert documented == _struct_fields(zf.HEADER_STRUCT.format)
    assert sum(size for _, size, _ in documented) == zf.HEADER_SIZE == 64
    assert f"`{zf.HEADER_STRUCT.format}`" in SPEC_TEXT

    # Every field named in the table sits at its documented offset in a packed header.
    names = [first_tick(r[0]) for r in rows]
    values = dict(version_major=zf.FORMAT_VERSION_MAJOR, version_minor=7, manifest_offset=64,
                  manifest_length=0x1234, manifest_xxh64=0xFEDCBA9876543210,
                  data_offset=3 * zf.ALIGNMENT, data_length=5 * zf.ALIGNMENT)
    assert {f.name for f in dataclasses.fields(zf.Header)} <= set(names)
    packed = zf.Header(**values).pack()
    expected = values | {"magic": zf.MAGIC, "header_size": zf.HEADER_SIZE, "reserved": b"\0" * 8}
    for name, (offset, size, type_) in zip(names, documented):
        raw = packed[offset:offset + size]
        got = raw if type_.startswith("u8[") else int.from_bytes(raw, "little")
        assert got == expected[name], name


def test_dtypes_table():
    rows = keyed("Dtypes")
    assert tuple(rows) == zf.DTYPES
    for dtype, itemsize in zf.DTYPE_ITEMSIZE.items():
        assert float(rows[dtype][1]) == itemsize, dtype
    assert float(rows[zf.DTYPE_INT4][1]) == 4 / 8


def test_layouts_and_group_sizes():
    assert tuple(idents("Layouts")) == zf.LAYOUTS
    line = re.search(r"\*\*Group sizes:\*\*(.*)", SPEC_TEXT).group(1)
    assert tuple(int(v) for v in ticks(line)) == zf.INT4_GROUP_SIZES


def test_int4_section_formulas():
    body = table("`int4.rows.v1`")
    assert [r[0] for r in body] == ["packed", "scales", "zeros"]
    nbytes_formula = re.search(r"`nbytes = ([^`]+)`", SPEC_TEXT.split("### 5.2")[1]).group(1)

    def evaluate(expr: str, **env) -> int:
        value = eval(expr.replace("·", "*"), {"__builtins__": {}}, env)  # noqa: S307 - our own spec
        assert value == int(value)
        return int(value)

    for n, k, group in [(320, 192, 64), (7, 256, 32), (1, 128, 128)]:
        env = dict(N=n, K=k, G=k // group)
        sizes = [evaluate(first_tick(r[2]), **env) for r in body]
        starts = [evaluate(first_tick(r[1]), **env) for r in body]
        assert tuple(sizes) == zf.int4_section_sizes(n, k, group)
        assert starts == [0, sizes[0], sizes[0] + sizes[1]]
        assert evaluate(nbytes_formula, **env) == zf.expected_nbytes("int4", [n, k], zf.LAYOUT_INT4_ROWS,
                                                                     group)


def test_int4_worked_example():
    assert "`0x87654321`" in SPEC_TEXT and "`21 43 65 87`" in SPEC_TEXT
    word = np.frombuffer(bytes.fromhex("21436587"), "<u4").reshape(1, 1)
    assert int(word[0, 0]) == 0x87654321
    assert zf.unpack_int4(word).tolist() == [[1, 2, 3, 4, 5, 6, 7, 8]]
    weight = zf.Int4Weight(np.repeat(word, 4, axis=1), np.array([[0.5]], np.float16),
                           np.array([[8.0]], np.float16), 32)
    example = "-3.5 -3 -2.5 -2 -1.5 -1 -0.5 0"
    assert f"`{example}`" in SPEC_TEXT
    assert zf.dequantize_int4(weight)[0, :8].tolist() == [float(v) for v in example.split()]


def test_checksum_example():
    match = re.search(r'xxh64\(b"abc"\) =\s+"([0-9a-f]{16})"', SPEC_TEXT)
    assert match and match.group(1) == xxhash.xxh64_hexdigest(b"abc") \
        == format(xxhash.xxh64_intdigest(b"abc"), "016x")


def test_architectures_and_rope_types():
    rows = keyed("Architectures")
    assert tuple(rows) == zf.ARCHITECTURES
    assert {first_tick(r[1]): a for a, r in rows.items()} == HF_ARCHITECTURES
    assert tuple(idents("Rope types")) == zf.ROPE_TYPES


def test_manifest_key_tables():
    assert set(idents("Top-level keys")) == set(zf.TOP_LEVEL_KEYS)
    assert tuple(idents("`model`")) == zf.MODEL_KEYS
    assert tuple(idents("`tensors` entries")) == (*zf.TENSOR_KEYS, "group_size")
    quantization = keyed("`quantization` (informative)")
    assert set(quantization) == set(SCHEMA["$defs"]["quantization"]["properties"])
    # keys added by a minor version are optional: files of the earlier minor version lack them
    added = {key for key, row in quantization.items() if row[2].startswith("Since 1.")}
    assert added == {"gptq", "awq", "group_size_overrides", "search_column_weights"}
    assert set(SCHEMA["$defs"]["quantization"]["required"]) == set(quantization) - added
    assert set(idents("`tokenizer`")) == set(SCHEMA["$defs"]["tokenizer"]["required"])


def _sample_model(**flags) -> dict:
    return dict(architecture="llama", vocab_size=11, hidden_size=13, intermediate_size=17,
                num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2, head_dim=5,
                **flags)


@pytest.mark.parametrize("qkv_bias,o_bias", [(True, True), (True, False), (False, False)])
def test_canonical_tensor_table(qkv_bias, o_bias):
    """Evaluate the table's shape expressions; rows with {i} repeat per layer, in place."""
    model = _sample_model(qkv_bias=qkv_bias, o_bias=o_bias)
    sizes = {k: v for k, v in model.items() if isinstance(v, int) and not isinstance(v, bool)}
    rows = table("Canonical tensor names and shapes")
    present = [r for r in rows if r[2].startswith("always") or model[first_tick(r[2])]]
    globals_before = [r for r in present[:next(i for i, r in enumerate(present) if "{i}" in r[0])]]
    layer_rows = [r for r in present if "{i}" in r[0]]
    globals_after = [r for r in present if "{i}" not in r[0] and r not in globals_before]
    documented = [(first_tick(r[0]).replace("{i}", str(i)), eval(first_tick(r[1]), {"__builtins__": {}}, sizes))  # noqa: S307
                  for i, r in [(None, r) for r in globals_before]
                  + [(i, r) for i in range(model["num_hidden_layers"]) for r in layer_rows]
                  + [(None, r) for r in globals_after]]
    assert documented == list(zf.expected_tensor_shapes(model).items())


def test_layer_rows_follow_layer_tensors():
    names = [first_tick(r[0]) for r in table("Canonical tensor names and shapes")]
    assert [n.split(".")[-1] for n in names if "{i}" in n] == list(zf.LAYER_TENSORS)
    assert [n for n in names if "{i}" not in n] == [zf.EMBED, zf.FINAL_NORM, zf.LM_HEAD]


# ---------------------------------------------------------------------------------------------
# (a) schema enums == constants module
# ---------------------------------------------------------------------------------------------


def test_schema_is_valid_draft_2020_12():
    assert SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


def test_schema_agrees_with_constants():
    defs, props = SCHEMA["$defs"], SCHEMA["properties"]
    tensor, model, quant = defs["tensor"], defs["model"], defs["quantization"]
    assert set(SCHEMA["required"]) == set(zf.TOP_LEVEL_KEYS) == set(props)
    assert SCHEMA["additionalProperties"] is True  # minor versions may add top-level keys
    assert props["format"]["const"] == zf.FORMAT_NAME
    assert props["format_version"]["prefixItems"][0]["const"] == zf.FORMAT_VERSION_MAJOR

    assert tuple(model["required"]) == zf.MODEL_KEYS and tuple(model["properties"]) == zf.MODEL_KEYS
    assert model["additionalProperties"] is False
    assert tuple(model["properties"]["architecture"]["enum"]) == zf.ARCHITECTURES
    assert tuple(defs["rope_scaling"]["properties"]["rope_type"]["enum"]) == zf.ROPE_TYPES
    rope_rows = keyed("Rope types")
    for branch in defs["rope_scaling"]["allOf"]:
        rope_type = branch["if"]["properties"]["rope_type"]["const"]
        assert set(branch["then"].get("required", [])) == set(ticks(rope_rows[rope_type][1]))

    assert tuple(tensor["required"]) == zf.TENSOR_KEYS
    assert tuple(tensor["properties"]) == (*zf.TENSOR_KEYS, "group_size")
    assert tensor["additionalProperties"] is False
    assert tuple(tensor["properties"]["dtype"]["enum"]) == zf.DTYPES
    assert tuple(tensor["properties"]["layout"]["enum"]) == zf.LAYOUTS
    assert tuple(tensor["properties"]["group_size"]["enum"]) == zf.INT4_GROUP_SIZES
    assert tensor["properties"]["offset"]["multipleOf"] == zf.ALIGNMENT
    assert tensor["if"]["properties"]["layout"]["const"] == zf.LAYOUT_INT4_ROWS
    assert tensor["then"]["properties"]["dtype"]["const"] == zf.DTYPE_INT4
    assert tuple(tensor["else"]["properties"]["dtype"]["enum"]) == tuple(zf.DTYPE_ITEMSIZE)
    name_pattern = re.compile(tensor["properties"]["name"]["pattern"])
    for name in zf.expected_tensor_shapes(_sample_model(qkv_bias=True, o_bias=True) | {
            "num_hidden_layers": 12}):
        assert name_pattern.match(name), name
    for bad in ("layers.01.qkv", "layers.0.q_proj", "model.embed_tokens.weight", "lm_head "):
        assert not name_pattern.match(bad), bad

    assert tuple(quant["properties"]["group_size"]["enum"]) == zf.INT4_GROUP_SIZES
    overrides = quant["properties"]["group_size_overrides"]
    assert tuple(overrides["properties"]) == convert_module.QUANTIZED_PARTS
    assert overrides["additionalProperties"] is False
    assert all(tuple(kind["enum"]) == zf.INT4_GROUP_SIZES for kind in overrides["properties"].values())
    assert set(ticks(keyed("`quantization` (informative)")["group_size_overrides"][2])) >= set(
        convert_module.QUANTIZED_PARTS)
    assert quant["properties"]["scale_dtype"]["const"] == zf.INT4_SCALE_DTYPE
    assert quant["properties"]["zero_dtype"]["const"] == zf.INT4_ZERO_DTYPE
    assert quant["properties"]["norms_and_biases"]["const"] == convert_module.HIGH_PRECISION
    for key in ("embedding", "lm_head"):
        assert set(quant["properties"][key]["enum"]) == set(convert_module.PRECISIONS)


# ---------------------------------------------------------------------------------------------
# (b) real conversions validate against the schema and follow §1
# ---------------------------------------------------------------------------------------------

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 256}
CASES = {
    "qwen2": ("qwen2", {}, ConvertOptions()),
    "llama": ("llama", {}, ConvertOptions()),
    "qwen2-g32-fp16head-int4embed": (
        "qwen2", {}, ConvertOptions(group_size=32, lm_head="float16", embedding="int4")),
    "llama-tied-bias-llama3rope": (
        "llama", dict(tied=True, attention_bias=True, rope_scaling=LLAMA3_ROPE),
        ConvertOptions(group_size=64, clip_search=False)),
    "mistral-sliding": ("mistral", dict(sliding_window=64), ConvertOptions()),
    "qwen2-awq-gptq": ("qwen2", {}, ConvertOptions(awq=True, gptq=True, calibration_tokens=512)),
    "llama-g64-down128-qkv32": (
        "llama", {}, ConvertOptions(group_size=64, group_size_overrides={"down_proj": 128, "qkv": 32})),
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Case name -> path of its .zse file, built once per module on first use."""
    cache: dict[str, Path] = {}

    def build(case: str) -> Path:
        if case not in cache:
            arch, overrides, options = CASES[case]
            folder = tmp_path_factory.mktemp(f"ckpt-{case}")
            make_checkpoint(folder / "src", arch, **copy.deepcopy(overrides))  # transformers mutates dicts
            out = folder / "model.zse"
            convert(str(folder / "src"), out, dataclasses.replace(options))
            cache[case] = out
        return cache[case]

    return build


def _validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(SCHEMA)


def _reject_constant(value: str):
    raise ValueError(f"non-JSON constant {value}")


@pytest.mark.parametrize("case", list(CASES))
def test_converted_manifest_matches_schema(converted, case):
    path = converted(case)
    with ZseFile(path) as zse:
        manifest = zse.manifest
        header = zse.header
    errors = sorted(_validator().iter_errors(manifest), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors[:10])

    arch, overrides, options = CASES[case]
    assert manifest["model"]["architecture"] == arch
    assert manifest["quantization"]["group_size"] == options.group_size
    assert manifest["quantization"]["group_size_overrides"] == (
        options.effective_group_size_overrides)
    kinds = {t["name"]: (t["layout"], t.get("group_size")) for t in manifest["tensors"]}
    assert kinds[zf.EMBED][0] == (zf.LAYOUT_INT4_ROWS if options.embedding == "int4" else zf.LAYOUT_DENSE)
    assert kinds[zf.LM_HEAD][0] == (zf.LAYOUT_INT4_ROWS if options.lm_head == "int4" else zf.LAYOUT_DENSE)
    for name, (_, group) in kinds.items():
        requested = options.requested_group_sizes.get(name.rsplit(".", 1)[-1], options.group_size)
        assert group is None or group <= requested, name
    if "rope_scaling" in overrides:
        assert manifest["model"]["rope_scaling"] == overrides["rope_scaling"]

    # The raw manifest is strict JSON: no NaN/Infinity, UTF-8.
    raw = path.read_bytes()[header.manifest_offset:header.manifest_offset + header.manifest_length]
    json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)


@pytest.mark.parametrize("case", ["qwen2", "qwen2-g32-fp16head-int4embed"])
def test_converted_bytes_follow_file_layout(converted, case):
    """§1 and §6 on a real file, read with nothing but the spec's tables."""
    blob = converted(case).read_bytes()
    fields = {first_tick(r[0]): (int(r[1]), int(r[2])) for r in table("Header")}

    def field(name: str) -> int | bytes:
        offset, size = fields[name]
        raw = blob[offset:offset + size]
        return raw if name in ("magic", "reserved") else int.from_bytes(raw, "little")

    assert field("magic") == zf.MAGIC and field("reserved") == b"\0" * 8
    assert (field("version_major"), field("version_minor")) == (zf.FORMAT_VERSION_MAJOR,
                                                                zf.FORMAT_VERSION_MINOR)
    assert field("header_size") == field("manifest_offset") == zf.HEADER_SIZE
    manifest_end = zf.HEADER_SIZE + field("manifest_length")
    raw = blob[zf.HEADER_SIZE:manifest_end]
    assert xxhash.xxh64_intdigest(raw) == field("manifest_xxh64")
    data_offset, data_length = field("data_offset"), field("data_length")
    assert data_offset == zf.align_up(manifest_end)
    assert set(blob[manifest_end:data_offset]) <= {0}
    assert data_offset + data_length == len(blob) and len(blob) % zf.ALIGNMENT == 0

    manifest = json.loads(raw)
    end = 0
    for entry, name in zip(manifest["tensors"], zf.expected_tensor_shapes(manifest["model"]), strict=True):
        assert entry["name"] == name  # §4 order
        assert entry["offset"] == zf.align_up(end)  # tightly packed at ALIGNMENT
        assert set(blob[data_offset + end:data_offset + entry["offset"]]) <= {0}
        start = data_offset + entry["offset"]
        assert xxhash.xxh64_hexdigest(blob[start:start + entry["nbytes"]]) == entry["xxh64"]
        end = entry["offset"] + entry["nbytes"]
    assert data_length == zf.align_up(end)
    assert set(blob[data_offset + end:]) <= {0}


# ---------------------------------------------------------------------------------------------
# (c) the schema rejects what the spec forbids, and accepts forward-compatible additions
# ---------------------------------------------------------------------------------------------


def _first(manifest, layout):
    return next(t for t in manifest["tensors"] if t["layout"] == layout)


def _set(path, value):
    def apply(m):
        target = m
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return apply


def _delete(path):
    def apply(m):
        target = m
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]
    return apply


def _on_tensor(layout, mutate):
    def apply(m):
        mutate(_first(m, layout))
    return apply


AWQ_RECORD = {
    "calibration": "python-stdlib", "calibration_sha256": "ab" * 32, "tokens": 8192, "window": 512,
    "inputs": "quantized", "alpha_grid": [0.0, 0.5, 1.0], "search_rows": 512, "search_tokens": 2048,
    "alpha": {part: "0.50 0.00" for part in ("qkv", "o_proj", "gate_up", "down_proj")},
    "error_ratio": {part: "0.9000 1.0000" for part in ("qkv", "o_proj", "gate_up", "down_proj")},
}

INVALID = {
    "unknown layout": _on_tensor(zf.LAYOUT_DENSE, lambda t: t.update(layout="int4.rows.v2")),
    "upper-case xxh64": _on_tensor(zf.LAYOUT_DENSE, lambda t: t.update(xxh64=t["xxh64"].upper())),
    "short xxh64": _on_tensor(zf.LAYOUT_INT4_ROWS, lambda t: t.update(xxh64=t["xxh64"][:15])),
    "int4 without group_size": _on_tensor(zf.LAYOUT_INT4_ROWS, lambda t: t.pop("group_size")),
    "int4 with bad group_size": _on_tensor(zf.LAYOUT_INT4_ROWS, lambda t: t.update(group_size=16)),
    "dense with group_size": _on_tensor(zf.LAYOUT_DENSE, lambda t: t.update(group_size=32)),
    "int4 layout, float16 dtype": _on_tensor(zf.LAYOUT_INT4_ROWS, lambda t: t.update(dtype="float16")),
    "dense layout, int4 dtype": _on_tensor(zf.LAYOUT_DENSE, lambda t: t.update(dtype="int4")),
    "bfloat16 dtype": _on_tensor(zf.LAYOUT_DENSE, lambda t: t.update(dtype="bfloat16")),
    "3-D int4": _on_tensor(zf.LAYOUT_INT4_ROWS, lambda t: t.update(shape=[*t["shape"], 1])),
    "empty shape": _on_tensor(zf.LAYOUT_DENSE, lambda t: t.update(shape=[])),
    "zero dimension": _on_tensor(zf.LAYOUT_DENSE, lambda t: t.update(shape=[0])),
    "unaligned offset": _on_tensor(zf.LAYOUT_INT4_ROWS, lambda t: t.update(offset=t["offset"] + 64)),
    "unknown tensor key": _on_tensor(zf.LAYOUT_DENSE, lambda t: t.update(strides=[1])),
    "non-canonical name": _on_tensor(zf.LAYOUT_DENSE, lambda t: t.update(name="model.norm.weight")),
    "missing top-level key": _delete(["tokenizer"]),
    "wrong format": _set(["format"], "gguf"),
    "major version 2": _set(["format_version"], [2, 0]),
    "version triple": _set(["format_version"], [1, 0, 0]),
    "unknown model key": _set(["model", "attn_logit_softcapping"], 50.0),
    "missing model key": _delete(["model", "head_dim"]),
    "unknown architecture": _set(["model", "architecture"], "gemma"),
    "bool size": _set(["model", "num_hidden_layers"], True),
    "zero heads": _set(["model", "num_key_value_heads"], 0),
    "unknown rope type": _set(["model", "rope_scaling"], {"rope_type": "yarn", "factor": 4.0}),
    "linear rope without factor": _set(["model", "rope_scaling"], {"rope_type": "linear"}),
    "llama3 rope with extra key": _set(["model", "rope_scaling"], {**LLAMA3_ROPE, "beta_fast": 32}),
    "string sliding window": _set(["model", "sliding_window"], "4096"),
    "negative eos id": _set(["tokenizer", "eos_token_ids"], [-1]),
    "bad commit": _set(["provenance", "commit"], "main"),
    "no tensors": _set(["tensors"], []),
    "GPTQ record without tokens": _set(["quantization", "gptq"], {
        "calibration": "python-stdlib", "calibration_sha256": "ab" * 32, "window": 512,
        "damping": 0.01, "act_order": "groups", "search_weights": "hessian", "inputs": "quantized"}),
    "AWQ alphas as numbers": _set(["quantization", "awq"], AWQ_RECORD | {"alpha": {
        "qkv": [0.5, 0.5], "o_proj": [0.0, 0.0], "gate_up": [0.5, 0.5], "down_proj": [0.5, 0.5]}}),
    "AWQ record without a consumer": _set(["quantization", "awq"], AWQ_RECORD | {"error_ratio": {
        "qkv": "0.9000 1.0000", "gate_up": "0.9000 1.0000", "down_proj": "0.9000 1.0000"}}),
    "group size override of the lm_head": _set(["quantization", "group_size_overrides"],
                                                 {"lm_head": 32}),
    "group size override of 16": _set(["quantization", "group_size_overrides"], {"down_proj": 16}),
    "group size override as text": _set(["quantization", "group_size_overrides"],
                                        {"down_proj": "32"}),
    "group size overrides as a list": _set(["quantization", "group_size_overrides"],
                                           [["down_proj", 32]]),
    "GPTQ act order by columns": _set(["quantization", "gptq"], {
        "calibration": "x.txt", "calibration_sha256": "ab" * 32, "tokens": 512, "window": 512,
        "damping": 0.01, "act_order": "columns", "search_weights": "hessian", "inputs": "quantized"}),
}

VALID_ADDITIONS = {
    "new top-level key": _set(["signatures"], {"alg": "none"}),
    "new quantization key": _set(["quantization", "calibration"], None),
    "new tokenizer key": _set(["tokenizer", "add_eos_token"], False),
    "free-form generation": _set(["generation", "temperature"], 0.7),
    "linear rope": _set(["model", "rope_scaling"], {"rope_type": "linear", "factor": 2.0}),
    "hub provenance": _set(["provenance", "commit"], "0123456789abcdef0123456789abcdef01234567"),
    "minor version 4": _set(["format_version"], [1, 4]),
    "a 1.0 manifest, before quantization.gptq": lambda m: (
        _delete(["quantization", "gptq"])(m), _delete(["quantization", "awq"])(m),
        _delete(["quantization", "group_size_overrides"])(m), _set(["format_version"], [1, 0])(m)),
    "a 1.1 manifest, before quantization.awq": lambda m: (
        _delete(["quantization", "awq"])(m), _delete(["quantization", "group_size_overrides"])(m),
        _set(["format_version"], [1, 1])(m)),
    "a 1.2 manifest, before quantization.group_size_overrides": lambda m: (
        _delete(["quantization", "group_size_overrides"])(m), _set(["format_version"], [1, 2])(m)),
    "group size overrides": _set(["quantization", "group_size_overrides"],
                                 {"down_proj": 32, "qkv": 64}),
    "a group size of 96 (1.5)": _set(["quantization", "group_size_overrides"], {"o_proj": 96}),
    "a GPTQ record": _set(["quantization", "gptq"], {
        "calibration": "python-stdlib", "calibration_sha256": "ab" * 32, "tokens": 8192,
        "window": 512, "damping": 0.01, "act_order": "groups", "search_weights": "hessian",
        "inputs": "quantized"}),
    "an AWQ record": _set(["quantization", "awq"], AWQ_RECORD),
}


@pytest.fixture(scope="module")
def valid_manifest(converted):
    with ZseFile(converted("qwen2")) as zse:
        return copy.deepcopy(zse.manifest)


@pytest.mark.parametrize("mutation", list(INVALID))
def test_schema_rejects(valid_manifest, mutation):
    manifest = copy.deepcopy(valid_manifest)
    INVALID[mutation](manifest)
    assert not _validator().is_valid(manifest), f"schema accepted: {mutation}"


@pytest.mark.parametrize("addition", list(VALID_ADDITIONS))
def test_schema_accepts_forward_compatible(valid_manifest, addition):
    manifest = copy.deepcopy(valid_manifest)
    VALID_ADDITIONS[addition](manifest)
    errors = [e.message for e in _validator().iter_errors(manifest)]
    assert not errors, errors
