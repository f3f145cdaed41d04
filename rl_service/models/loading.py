"""Load a causal LM and its tokenizer from the built-in directory or any local HF directory.

Safetensors only (no pickle), and `trust_remote_code` only when the config says so: a model
directory is user input, and a `.bin` file or custom modelling code can run arbitrary Python.
"""
from __future__ import annotations

import json
from pathlib import Path

from rl_service.errors import ModelLoadError

BUILTIN_MODEL_DIR = Path(__file__).resolve().parent / "builtin"


def resolve_model_dir(path: str | Path, field: str = "model.path", allow_builtin: bool = True) -> Path:
    """The model directory, checked before anything loads from it: config, safetensors weights only
    (a pickle checkpoint could run code), a tokenizer. Errors name `field`, the config field at fault."""
    directory = BUILTIN_MODEL_DIR if allow_builtin and str(path) == "builtin" else Path(path).expanduser()
    if not directory.is_dir():
        hint = " (use 'builtin' or a local HF model directory)" if allow_builtin else ""
        raise ModelLoadError(f"{field}: {directory} is not a directory{hint}")
    if not (directory / "config.json").is_file():
        raise ModelLoadError(f"{field}: {directory} has no config.json")
    if not any(directory.glob("*.safetensors")):
        raise ModelLoadError(f"{field}: {directory} has no *.safetensors weights (pickle checkpoints are not loaded)")
    if not (directory / "tokenizer.json").is_file() and not (directory / "tokenizer_config.json").is_file():
        raise ModelLoadError(f"{field}: {directory} has no tokenizer (tokenizer.json / tokenizer_config.json)")
    return directory


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

    directory = resolve_model_dir(path)
    try:
        if _saved_tokenizer_class(directory) in _GENERIC_TOKENIZER_CLASSES:
            tokenizer = PreTrainedTokenizerFast.from_pretrained(str(directory), local_files_only=True)
        else:
            tokenizer = AutoTokenizer.from_pretrained(str(directory), trust_remote_code=trust_remote_code,
                                                      local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(f"model.path: cannot load the tokenizer in {directory} ({exc})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(path: str, dtype: str = "float32", trust_remote_code: bool = False):
    import torch
    from transformers import AutoModelForCausalLM

    directory = resolve_model_dir(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(directory), dtype=getattr(torch, dtype), use_safetensors=True,
            trust_remote_code=trust_remote_code, local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(f"model.path: cannot load a causal LM from {directory} ({exc})") from None
    return model


def render_prompt(tokenizer, user_text: str, thinking: bool = True) -> str:
    """The chat-formatted prompt text for one user message, reasoning on or off (ALGORITHMS.md §BVPO.2)."""
    messages = [{"role": "user", "content": user_text}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=thinking)
    return user_text  # a base model without a template sees the raw prompt
