"""Load a causal LM and its tokenizer, turning every way that can fail into one line.

``transformers`` reports a wrong path, a missing ``config.json``, an encoder checkpoint or an
unreachable hub id with long tracebacks (or, worse, with a warning and a half-random model: a BERT
directory loads as ``BertLMHeadModel`` with a freshly initialised head). bitplan measures what
quantization does to a model, so a model that silently carries random weights would poison every
number downstream. :func:`load_model` therefore checks the config before loading, refuses checkpoints
with missing or mismatched weights, and raises :class:`~bitplan.errors.ModelError` with one line that
names the bad thing; the CLI prints it as ``error: ...``.
"""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from bitplan.errors import ModelError
from bitplan.graph import config_problem

__all__ = [
    "CACHE_KWARGS", "DTYPES", "cache_kwarg", "compute_dtype_for", "has_fast_bf16", "load_model", "load_tokenizer",
    "parse_dtype",
]  # fmt: skip

#: dtype names accepted on the command line and in configs.
DTYPES: dict[str, torch.dtype | str] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "auto": "auto",
}

# "gpt2", "HuggingFaceTB/SmolLM2-135M-Instruct": one optional namespace, no path syntax.
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")
_FILE_SUFFIXES = (".json", ".gguf", ".safetensors", ".bin", ".pt", ".pth", ".txt")


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype | str:
    """``torch.float32`` / ``"bf16"`` / ``"auto"`` ... -> a torch dtype, or ``"auto"``."""
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ModelError(f"unsupported model dtype {dtype}; expected float32, bfloat16 or float16")
        return dtype
    key = str(dtype).strip().lower().removeprefix("torch.")
    if key not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    return DTYPES[key]


def has_fast_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether bfloat16 matmuls run natively on ``device``: CUDA with bf16 support, or a CPU with AMX tiles or
    AVX-512 BF16. Elsewhere (an AVX2-only CPU) torch emulates bf16 GEMMs, measured here over 100x slower than fp32 (bench/RESULTS.md, cpu-bf16).
    Asked at call time, never at import."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if dev.type != "cpu":
        return False
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(torch.cpu, p, lambda: False)()) for p in probes)


def _param_device(model: Any) -> torch.device:
    """Device of ``model``'s first parameter (CPU for a model without parameters)."""
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


#: The keyword transformers passes a KV cache by, to a model's ``forward``, to its decoder layers and in
#: ``generate``'s model kwargs: ``cache`` from transformers 5.25 on (which deprecates the old name), before
#: that ``past_key_values``. Newest first.
CACHE_KWARGS = ("cache", "past_key_values")


def cache_kwarg(model: Any) -> str:
    """The keyword ``model.forward`` takes its cache by (one of :data:`CACHE_KWARGS`)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError, AttributeError):
        return CACHE_KWARGS[-1]
    return next((k for k in CACHE_KWARGS if k in params), CACHE_KWARGS[-1])


def compute_dtype_for(device: torch.device | str = "cpu") -> torch.dtype:
    """The default compute dtype of scoring passes: bfloat16 where it is native (fast), else float32."""
    return torch.bfloat16 if has_fast_bf16(device) else torch.float32


def _looks_like_hub_id(name: str) -> bool:
    return (
        bool(_HUB_ID.match(name))
        and ".." not in name
        and "--" not in name
        and not name.lower().endswith(_FILE_SUFFIXES)
    )


def _first_line(exc: BaseException, limit: int = 240) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__  # one line, whitespace collapsed
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _resolve(path_or_id: str | os.PathLike[str]) -> tuple[str, bool]:
    """(the string to hand to transformers, whether it is a local directory). Raises ModelError."""
    name = os.fspath(path_or_id)
    if not name.strip():
        raise ModelError("no model given (empty path)")
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{name}: directory has no config.json; expected a Hugging Face model directory")
        return str(path), True
    if path.exists():
        raise ModelError(
            f"{name}: is a file; expected a Hugging Face model directory (with config.json) or hub id"
        )
    if not _looks_like_hub_id(name):
        raise ModelError(f"{name}: no such model directory (and not a Hugging Face hub id like 'org/name')")
    return name, False


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' warnings, load reports and progress bars; we report problems ourselves."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _where(name: str, local: bool) -> str:
    return name if local else f"hub id {name!r}"


def _load_config(name: str, local: bool, local_files_only: bool) -> Any:
    from transformers import AutoConfig

    try:
        with _quiet_transformers():
            return AutoConfig.from_pretrained(name, local_files_only=local_files_only)
    except Exception as exc:  # noqa: BLE001 - any failure inside transformers is "cannot load"
        how = "cannot read the config of" if local else "cannot fetch (offline, missing or gated?)"
        raise ModelError(f"{how} {_where(name, local)}: {_first_line(exc)}") from None


def load_model(
    path_or_id: str | os.PathLike[str],
    dtype: torch.dtype | str = torch.float32,
    *,
    device: str | torch.device = "cpu",
    local_files_only: bool = False,
) -> Any:
    """Load a decoder-only causal LM in eval mode.

    ``path_or_id`` is a Hugging Face model directory or a hub id; ``dtype`` a torch dtype or one of
    :data:`DTYPES` (``"auto"`` keeps the checkpoint's dtype). ``local_files_only`` never touches the
    network (as ``HF_HUB_OFFLINE=1`` does). Raises :class:`ModelError` with one line on any failure,
    including a checkpoint that lacks weights the model needs (they would be random).
    """
    torch_dtype = parse_dtype(dtype)
    name, local = _resolve(path_or_id)
    config = _load_config(name, local, local_files_only)
    problem = config_problem(config)
    if problem is not None:
        raise ModelError(f"{name}: expected a decoder-only causal LM, found {problem}")

    from transformers import AutoModelForCausalLM

    try:
        with _quiet_transformers():
            loaded: Any = AutoModelForCausalLM.from_pretrained(
                name,
                config=config,
                dtype=torch_dtype,
                local_files_only=local_files_only,
                output_loading_info=True,
            )
    except ValueError as exc:  # "Unrecognized configuration class ... for AutoModelForCausalLM"
        model_type = getattr(config, "model_type", "?")
        if "Unrecognized configuration class" in str(exc):
            raise ModelError(
                f"{name}: model_type {model_type!r} is not a causal LM transformers can load"
            ) from None
        raise ModelError(f"cannot load {_where(name, local)}: {_first_line(exc)}") from None
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"cannot load {_where(name, local)}: {_first_line(exc)}") from None

    model, info = loaded
    missing = sorted(info.get("missing_keys") or ())
    mismatched = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys") or ())
    if missing or mismatched:
        bad = missing or mismatched
        what = "lacks" if missing else "has wrongly shaped"
        raise ModelError(
            f"{name}: checkpoint {what} {len(bad)} weight(s) the model needs (e.g. {', '.join(bad[:3])}); "
            "they would be randomly initialised"
        )
    model.eval()
    if torch.device(device) != torch.device("cpu"):
        model.to(device)
    return model


def load_tokenizer(path_or_id: str | os.PathLike[str], *, local_files_only: bool = False) -> Any:
    """Load the tokenizer stored with a model directory or hub id. Raises :class:`ModelError`."""
    name, local = _resolve(path_or_id)
    from transformers import AutoTokenizer

    try:
        with _quiet_transformers():
            tok = AutoTokenizer.from_pretrained(name, local_files_only=local_files_only)
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"cannot load the tokenizer of {_where(name, local)}: {_first_line(exc)}") from None
    if tok is None or isinstance(tok, bool):
        raise ModelError(f"{_where(name, local)}: no tokenizer files found")
    return tok
