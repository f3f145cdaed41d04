"""Load a causal LM and its tokenizer from the built-in directory or any local HF directory.

Safetensors only (no pickle), and `trust_remote_code` only when the config says so: a model
directory is user input, and a `.bin` file or custom modelling code can run arbitrary Python.
"""
from __future__ import annotations

import json
from pathlib import Path

from rl_service.errors import ModelLoadError

BUILTIN_MODEL_DIR = Path(__file__).resolve().parent / "builtin"


def resolve_model_dir(path: str | Path, field: str = "model.path", allow_builtin: bool = True,
                      trust_remote_code: bool | None = None) -> Path:
    """The model directory, checked before anything loads from it: a config transformers can read,
    safetensors weights only (a pickle checkpoint could run code) that are whole, a tokenizer.
    With `trust_remote_code` given, a model that needs its own modelling code is refused unless it
    is True. Errors name `field`, the config field at fault."""
    directory = BUILTIN_MODEL_DIR if allow_builtin and str(path) == "builtin" else Path(path).expanduser()
    try:
        return _checked_model_dir(directory, field, allow_builtin, trust_remote_code)
    except OSError as exc:   # a file or folder without read permission: named, not a traceback
        where = exc.filename or directory
        raise ModelLoadError(f"{field}: {where}: cannot read ({exc.strerror or exc})") from None


def _checked_model_dir(directory: Path, field: str, allow_builtin: bool, trust_remote_code: bool | None) -> Path:
    if not directory.is_dir():
        hint = " (use 'builtin' or a local HF model directory)" if allow_builtin else ""
        raise ModelLoadError(f"{field}: {directory} is not a directory{hint}")
    if not (directory / "config.json").is_file():
        if (directory / "adapter_config.json").is_file():   # a checkpoint's adapter/ (learner.lora)
            raise ModelLoadError(f"{field}: {directory} is a LoRA adapter, not a model: name its base model, or a "
                                 f"merged model (learner.lora.save_merged: true writes one to each checkpoint's model/)")
        raise ModelLoadError(f"{field}: {directory} has no config.json")
    _check_model_config(directory, field, trust_remote_code)
    weights = sorted(directory.glob("*.safetensors"))
    if not weights:
        raise ModelLoadError(f"{field}: {directory} has no *.safetensors weights (pickle checkpoints are not loaded)")
    for file in weights:
        _check_safetensors(file, field)
    _check_shard_index(directory, field)
    if not (directory / "tokenizer.json").is_file() and not (directory / "tokenizer_config.json").is_file():
        raise ModelLoadError(f"{field}: {directory} has no tokenizer (tokenizer.json / tokenizer_config.json)")
    return directory


def _read_json(file: Path, field: str) -> object:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ModelLoadError(f"{field}: {file}: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{field}: {file}: not valid JSON ({exc.msg}, line {exc.lineno})") from None


def _check_model_config(directory: Path, field: str, trust_remote_code: bool | None) -> None:
    """A config.json that names an architecture this transformers has, or (trusted) custom code."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    file = directory / "config.json"
    config = _read_json(file, field)
    if not isinstance(config, dict):
        raise ModelLoadError(f"{field}: {file}: expected a JSON object, got {type(config).__name__}")
    model_type, auto_map = config.get("model_type"), config.get("auto_map")
    if model_type in CONFIG_MAPPING_NAMES:
        return  # transformers' own code; an auto_map next to it is used only with trust_remote_code
    if not auto_map:
        if not model_type:
            raise ModelLoadError(f"{field}: {file} has no 'model_type' (and no auto_map naming custom code)")
        import transformers

        raise ModelLoadError(f"{field}: model_type '{model_type}' in {file} is not one transformers "
                             f"{transformers.__version__} knows, and config.json has no auto_map naming custom code")
    if trust_remote_code is False:
        hint = ("set model.trust_remote_code=true if you trust the Python files in that directory" if field == "model.path"
                else f"custom modelling code is not loaded for {field}")
        raise ModelLoadError(f"{field}: {directory} needs its own modelling code (auto_map in config.json); {hint}")


_CUT = "(truncated or overwritten)"   # a header that parses, over data of the wrong length


def safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a whole safetensors file, or None. Reads only the header (an 8-byte little-endian
    length N, N bytes of JSON giving each tensor's `data_offsets` in the data after it, which ends at the
    largest end): a file cut short or overwritten failed only inside an actor, in a SafetensorError."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                return f"{size} bytes, shorter than a safetensors header"
            length = int.from_bytes(prefix, "little")
            if length > min(size - 8, 100_000_000):   # the library refuses a header over 100 MB
                return f"its header claims {length} bytes, the file has {size}"
            header = json.loads(handle.read(length).decode("utf-8"))
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    except ValueError:   # UnicodeDecodeError included
        header = None
    if not isinstance(header, dict):
        return "its header is not a JSON object"
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(x) is int for x in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            return f"tensor {name!r} has no valid data_offsets"
        end = max(end, offsets[1])
    if 8 + length + end != size:
        return f"{size} bytes where its header needs {8 + length + end} {_CUT}"
    return None


def _check_safetensors(file: Path, field: str) -> None:
    file.open("rb").close()   # unreadable: OSError, named "cannot read" by resolve_model_dir
    problem = safetensors_problem(file)
    if problem is not None:
        kind = "truncated" if problem.endswith(_CUT) else "not a safetensors file"
        raise ModelLoadError(f"{field}: {file}: {kind} ({problem.removesuffix(_CUT).strip()})")


def _check_shard_index(directory: Path, field: str) -> None:
    index_file = directory / "model.safetensors.index.json"
    if not index_file.is_file():
        return
    index = _read_json(index_file, field)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise ModelLoadError(f"{field}: {index_file}: no 'weight_map' object")
    missing = sorted({str(shard) for shard in weight_map.values()} - {file.name for file in directory.glob("*.safetensors")})
    if missing:
        raise ModelLoadError(f"{field}: {index_file} lists shards that are not in the directory: {', '.join(missing[:3])}"
                             + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))


# Tokenizers saved as a bare tokenizer.json (like the built-in one) name one of these classes.
_GENERIC_TOKENIZER_CLASSES = {"TokenizersBackend", "PreTrainedTokenizerFast"}


def _saved_tokenizer_class(directory: Path) -> str | None:
    try:
        return json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8")).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        return None


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """The directory's tokenizer, exactly as saved.

    A generic fast tokenizer is loaded as `PreTrainedTokenizerFast`: `AutoTokenizer` would pick the
    model type's own class (Qwen2Tokenizer for a Qwen2 config), which in transformers 5 rebuilds its
    own pre-tokenizer and silently tokenizes differently from the tokenizer.json the model was
    trained with.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    directory = resolve_model_dir(path, trust_remote_code=trust_remote_code)
    try:
        if _saved_tokenizer_class(directory) in _GENERIC_TOKENIZER_CLASSES:
            tokenizer = PreTrainedTokenizerFast.from_pretrained(str(directory), local_files_only=True)
        else:
            tokenizer = AutoTokenizer.from_pretrained(str(directory), trust_remote_code=trust_remote_code,
                                                      local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(f"model.path: cannot load the tokenizer in {directory} ({_reason(exc)})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(path: str, dtype: str = "float32", trust_remote_code: bool = False):
    import torch
    from transformers import AutoModelForCausalLM

    directory = resolve_model_dir(path, trust_remote_code=trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(directory), dtype=getattr(torch, dtype), use_safetensors=True,
            trust_remote_code=trust_remote_code, local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(f"model.path: cannot load a causal LM from {directory} ({_reason(exc)})") from None
    return model


def model_context_length(path: str, trust_remote_code: bool = False) -> int | None:
    """The most positions the model attends over (`max_position_embeddings` and its aliases), or None."""
    config = _read_json(resolve_model_dir(path, trust_remote_code=trust_remote_code) / "config.json", "model.path")
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = config.get(key) if isinstance(config, dict) else None
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def check_weights_match_config(path: str, trust_remote_code: bool = False, field: str = "model.path"):
    """Every tensor in the safetensors files has the shape the config.json's model gives it (the model
    built on the meta device: no memory, no weights read). A config that disagrees with its weights
    is named here, before Ray starts, instead of failing inside every actor. Returns the meta model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = resolve_model_dir(path, field, trust_remote_code=trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(str(directory), trust_remote_code=trust_remote_code, local_files_only=True)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - whatever transformers says about the config is the user's to see
        raise ModelLoadError(f"{field}: {directory}/config.json does not build a causal LM ({_reason(exc)})") from None
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    stored: set[str] = set()
    for file in sorted(directory.glob("*.safetensors")):
        for name, shape in _safetensors_shapes(file).items():
            stored.add(name)
            if name in expected and expected[name] != shape:
                raise ModelLoadError(f"{field}: {file.name} holds {name} of shape {list(shape)} but config.json makes "
                                     f"it {list(expected[name])}: the config does not describe these weights")
    # Tensors on one side only: transformers would initialise the missing ones at random (a config
    # with more layers than the weights) or drop the extra ones (fewer), with a warning in each actor.
    missing = [name for name in _unsatisfied(model, stored)
               if not _matches(name, getattr(model, "_keys_to_ignore_on_load_missing", None))]
    extra = sorted(name for name in stored - set(expected)
                   if not _matches(name, getattr(model, "_keys_to_ignore_on_load_unexpected", None)))
    for names, side in ((missing, "config.json makes {n} tensor(s) the weights do not hold"),
                        (extra, "the weights hold {n} tensor(s) config.json's model does not have")):
        if names:
            raise ModelLoadError(f"{field}: {side.format(n=len(names))} (first: {names[0]}): the config does not "
                                 "describe these weights")
    return model


def _unsatisfied(model, stored: set[str]) -> list[str]:
    """State-dict names no stored tensor provides; tied parameters (one tensor under several names,
    e.g. lm_head.weight = embed_tokens.weight) are provided by any of their names."""
    aliases: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(parameter), []).append(name)
    tied = {name: names for names in aliases.values() for name in names}
    return sorted(name for name in model.state_dict()
                  if name not in stored and not any(alias in stored for alias in tied.get(name, ())))


def _matches(name: str, patterns) -> bool:
    import re

    return any(re.search(pattern, name) for pattern in patterns or ())


def _safetensors_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    with file.open("rb") as handle:   # the header only (checked whole by safetensors_problem)
        header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
    return {name: tuple(entry["shape"]) for name, entry in header.items() if name != "__metadata__"}


def _reason(exc: Exception) -> str:
    """A library's exception as one line: its type when the message says little (a bare KeyError)."""
    message = " ".join(str(exc).split())
    if len(message) > 300:
        message = message[:297] + "..."
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def render_prompt(tokenizer, user_text: str, thinking: bool = True, chat: tuple | None = None) -> str:
    """The chat-formatted prompt text for one user message, reasoning on or off (ALGORITHMS.md §BVPO.2);
    `chat`: a whole conversation instead, (role, content) pairs ending with the user's message."""
    messages = ([{"role": role, "content": content} for role, content in chat] if chat
                else [{"role": "user", "content": user_text}])
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=thinking)
    # A base model without a template sees the raw prompt (a chat's messages, one paragraph each).
    return "\n\n".join(message["content"] for message in messages) if chat else user_text
