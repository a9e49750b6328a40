"""Bad input through the command line, one test per class (docs/validation.md): every case ends
in one `Error:` line with a `Hint:`, the documented exit code, no traceback, and no file left
half-written; a checkpoint that would load as garbage is refused before loading."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from hetegen_cli.measure import profile as measure_profile
from hetegen_cli.models.shapes import headers
from hetegen_cli.run import builders
from tests.fakes import make_profile
from tests.helpers import assert_error, cli, run_quick

LONG = "/tmp/" + "x" * 300


@pytest.fixture
def profile_file(tmp_path) -> Path:
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(make_profile(gpu=False, best="float32", threads=1)))
    return path


@pytest.fixture
def plan_file(tiny_llama_dir, profile_file, tmp_path) -> Path:
    path = tmp_path / "plan.json"
    made = cli(
        "plan",
        "-m",
        str(tiny_llama_dir),
        "--profile",
        str(profile_file),
        "--prompt-len",
        "8",
        "--max-new-tokens",
        "4",
        "-o",
        str(path),
    )
    assert made.exit_code == 0, made.stderr
    return path


def _edit_tensors(folder: Path, edit) -> None:
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def _edit_json(path: Path, edit) -> Path:
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))
    return path


# --- silent garbage: refused before loading ---------------------------------------------


@pytest.mark.parametrize(
    "tensor", ["lm_head.weight", "model.norm.weight", "model.layers.1.mlp.up_proj.weight"]
)
def test_a_checkpoint_missing_a_tensor_is_refused_before_loading(tiny_copy, monkeypatch, tensor):
    _edit_tensors(tiny_copy, lambda t: t.pop(tensor))
    monkeypatch.setattr(builders, "load_tokenizer", lambda *a: pytest.fail("loaded past the check"))
    assert_error(run_quick("-m", str(tiny_copy)), "lacks 1 tensor", tensor)


def test_a_wrong_shape_or_an_integer_weight_is_refused(tiny_copy):
    _edit_tensors(tiny_copy, lambda t: t.update({"model.norm.weight": t["model.norm.weight"][:10]}))
    assert_error(run_quick("-m", str(tiny_copy)), "model.norm.weight has shape [10]")
    _edit_tensors(tiny_copy, lambda t: t.update({"model.norm.weight": t["lm_head.weight"][0].long()}))
    assert_error(run_quick("-m", str(tiny_copy)), "stored as int64")


def test_extra_tensors_are_a_warning_and_transformers_stays_quiet(tiny_copy):
    _edit_tensors(tiny_copy, lambda t: t.update({"model.extra.weight": t["model.norm.weight"].clone()}))
    result = run_quick("-m", str(tiny_copy))
    assert result.exit_code == 0, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("Warning:") and "model.extra.weight" in lines[0]
    assert len(lines) == 2 and lines[1].startswith("wall ")  # nothing from transformers between


# --- malformed config fields and safetensors headers --------------------------------------


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda c: c.pop("intermediate_size"), "field intermediate_size is missing"),
        (lambda c: c.update(num_attention_heads=0), "num_attention_heads"),
        (lambda c: c.update(hidden_size="64"), "hidden_size: should be a whole number"),
        (lambda c: c.update(num_attention_heads=3), "not a multiple of num_key_value_heads"),
        (lambda c: c.update(rms_norm_eps=float("nan")), "rms_norm_eps"),
        (lambda c: c.update(model_type="gpt2"), "does not support"),
    ],
)
def test_malformed_config_fields_are_named(tiny_copy, edit, needle):
    _edit_json(tiny_copy / "config.json", edit)
    assert_error(run_quick("-m", str(tiny_copy)), "config.json", needle)


def _write_header(folder: Path, header: object, data: bytes = b"") -> None:
    text = json.dumps(header).encode()
    (folder / "model.safetensors").write_bytes(len(text).to_bytes(8, "little") + text + data)


@pytest.mark.parametrize(
    "header, data, needle",
    [
        ([1, 2], b"", "JSON list, not an object"),
        ({"a": {"dtype": "F32", "shape": [1]}}, b"\0" * 4, "data_offsets is missing"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4, "holds 4 bytes"),
        (
            {
                "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                "b": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]},
            },
            b"\0" * 6,
            "overlaps",
        ),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"", "truncated"),
        ({"a": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 1]}}, b"\0", "safetensors does not define"),
    ],
)
def test_malformed_safetensors_headers_are_named(tiny_copy, header, data, needle):
    _write_header(tiny_copy, header, data)
    assert_error(run_quick("-m", str(tiny_copy)), "model.safetensors", needle)


# --- plan and profile documents -----------------------------------------------------------


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda d: d.update(budget=[1]), "field budget: should be a JSON object"),
        (lambda d: d.update(warnings=5), "field warnings: should be a JSON list"),
        (lambda d: d["predictions"]["hetegen"].update(decode_tokens_per_s="fast"), "should be a number"),
        (lambda d: d["runtime"].update(cpu_threads=0), "runtime.cpu_threads"),
        (lambda d: d.update(schema_version="1"), "schema_version must be a whole number"),
    ],
)
def test_plans_with_wrong_types_anywhere(tiny_llama_dir, plan_file, edit, needle):
    _edit_json(plan_file, edit)
    assert_error(run_quick("-m", str(tiny_llama_dir), "--plan", str(plan_file)), needle)


@pytest.mark.parametrize("value", [0, -5, "NaN", "Infinity", "1e999"])
def test_profiles_with_impossible_measurements(profile_file, value):
    text = profile_file.read_text().replace('"mean": 70000000000.0', f'"mean": {value}', 1)
    profile_file.write_text(text)
    result = cli("plan", "-m", "opt-125m", "--profile", str(profile_file))
    assert_error(result, "memory_read_bytes_per_s.mean", "hetegen profile")


def test_json_errors_say_where_and_a_bom_is_fine(tiny_llama_dir, plan_file, tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{"kind": "hetegen.plan",\n "schema_version": 1,\n "x": [1,,2]}')
    assert_error(run_quick("-m", str(tiny_llama_dir), "--plan", str(broken)), "line 3 column 10")
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + plan_file.read_bytes())
    assert run_quick("-m", str(tiny_llama_dir), "--plan", str(bom)).exit_code == 0


# --- operating-system errors --------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["run", "-p", "hi", "-m", LONG],
        ["plan", "-m", "opt-125m", "--output", LONG],
        ["run", "-p", "hi", "--plan", LONG],
        ["plan", "-m", "opt-125m", "--profile", LONG],
    ],
)
def test_over_long_paths(args):
    assert_error(cli(*args), "too long for the file system")


def test_over_long_hetegen_home(monkeypatch):
    monkeypatch.setenv("HETEGEN_HOME", LONG)
    assert_error(cli("plan", "-m", "opt-125m"), "HETEGEN_HOME is too long")


def test_output_through_a_symlink_writes_its_target(profile_file, tmp_path):
    target = tmp_path / "target.json"
    target.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    result = cli("plan", "-m", "opt-125m", "--profile", str(profile_file), "-o", str(link))
    assert result.exit_code == 0, result.stderr
    assert link.is_symlink() and json.loads(target.read_text())["kind"] == "hetegen.plan"


def test_symlink_loops_and_dangling_links(tmp_path):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    assert_error(run_quick("-m", str(loop)), "loop of symbolic links")
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    assert_error(run_quick("--plan", str(dangling)), "link to a missing target")


def test_permission_denied_is_not_called_corruption(tiny_copy, monkeypatch):
    real_open = open

    def deny(path, *args, **kwargs):
        if str(path).endswith(".safetensors"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(headers, "open", deny, raising=False)
    assert_error(run_quick("-m", str(tiny_copy)), "permission denied", "check its permissions")
    monkeypatch.undo()
    real_read = Path.read_bytes

    def deny_config(self):
        if self.name == "config.json":
            raise PermissionError(13, "Permission denied", str(self))
        return real_read(self)

    monkeypatch.setattr(Path, "read_bytes", deny_config)
    assert_error(run_quick("-m", str(tiny_copy)), "cannot read config file", "permission denied")


def test_a_full_disk_on_stdout_is_one_error_line(presets_home):
    """`hetegen models --json > /dev/full`: the write fails at flush; one line, exit 1."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    with open("/dev/full", "w") as full:
        proc = subprocess.run(
            [sys.executable, "-m", "hetegen_cli", "models", "--json"],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
            env={**os.environ, "HETEGEN_HOME": str(presets_home)},
        )
    assert proc.returncode == 1
    assert proc.stderr.startswith("Error: cannot write the output: No space left on device")
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr


# --- numbers at the edges -----------------------------------------------------------------


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--temperature", "1", "--seed", str(10**30)], "--seed"),
        (["--temperature", "1", "--seed", "-1"], "--seed"),
        (["--temperature", "nan"], "--temperature"),
        (["--temperature", "inf"], "--temperature"),
        (["--temperature", "1", "--top-k", str(10**30)], "--top-k"),
        (["-n", str(10**30)], "--max-new-tokens"),
        (["-n", "0"], "--max-new-tokens"),
    ],
)
def test_numbers_out_of_range_are_usage_errors(tiny_llama_dir, args, needle):
    assert_error(run_quick("-m", str(tiny_llama_dir), *args), needle, exit_code=2)


def test_a_tiny_temperature_samples_the_top_token(tiny_llama_dir):
    greedy = cli("run", "-m", str(tiny_llama_dir), "-p", "The capital", "-n", "4", "--json")
    tiny = cli(
        "run",
        "-m",
        str(tiny_llama_dir),
        "-p",
        "The capital",
        "-n",
        "4",
        "--json",
        "--temperature",
        "1e-45",
        "--seed",
        "3",
    )
    assert tiny.exit_code == 0, tiny.stderr
    assert json.loads(tiny.stdout)["token_ids"] == json.loads(greedy.stdout)["token_ids"]


def test_huge_sizes_and_non_utf8_prompts(tiny_llama_dir):
    assert_error(cli("plan", "-m", "opt-125m", "--gpu-memory", "1e400"), "too large", exit_code=2)
    prompt = b"\xff\xfehi".decode("utf-8", "surrogateescape")
    assert_error(cli("run", "-m", str(tiny_llama_dir), "-p", prompt), "not UTF-8", exit_code=2)


# --- interrupts and the last guard ------------------------------------------------------


def test_ctrl_c_says_what_stopped(monkeypatch, tmp_path):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(measure_profile, "measure_cpu", interrupted)
    result = cli("profile", "--quick", "--output", str(tmp_path / "p.json"))
    assert result.exit_code == 130
    assert result.stderr.strip() == (
        "Interrupted while measuring this machine: `hetegen profile` stopped; no partial file was left."
    )
    assert not (tmp_path / "p.json").exists()


def test_an_unexpected_exception_is_an_internal_error_not_a_traceback(monkeypatch, tiny_llama_dir):
    def broken(*args, **kwargs):
        raise RuntimeError("something nobody foresaw")

    monkeypatch.setattr(builders, "load_tokenizer", broken)
    result = run_quick("-m", str(tiny_llama_dir))
    assert_error(result, "internal error: RuntimeError: something nobody foresaw", "HETEGEN_DEBUG=1")
    monkeypatch.setenv("HETEGEN_DEBUG", "1")
    assert "Traceback" in run_quick("-m", str(tiny_llama_dir)).stderr


# --- validation before the slow part; nothing silently ignored ------------------------------


def test_a_bad_plan_fails_before_the_tokenizer_loads(tiny_llama_dir, tmp_path, monkeypatch):
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    monkeypatch.setattr(builders, "load_tokenizer", lambda *a: pytest.fail("tokenizer loaded first"))
    assert_error(run_quick("-m", str(tiny_llama_dir), "--plan", str(bad)), "not a hetegen.plan")


def test_plan_in_a_read_only_home_fails_before_measuring(monkeypatch, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HETEGEN_HOME", str(home))
    monkeypatch.setattr("hetegen_cli.core.paths.os.access", lambda *a: False)
    monkeypatch.setattr(measure_profile, "run_profile", lambda **k: pytest.fail("measured anyway"))
    assert_error(cli("plan", "-m", "opt-125m"), "HETEGEN_HOME", "not writable", "--profile")


@pytest.mark.parametrize(
    "args, needle, code",
    [
        (["run", "-p", "hi", "--profile", "/nonexistent/profile.json"], "does not exist", 1),
        (["run", "-p", "hi", "-m", ""], "--model is empty", 2),
        (["plan", "-m", "opt-125m", "--output", "-"], "not a file name", 2),
        (["run", "-p", "hi", "--device", "cpu", "--gpu-memory", "banana"], "cannot read --gpu-memory", 2),
        (["run", "-p", "hi", "--device", "cpu", "--gpu-memory", "1GiB"], "no effect with --device cpu", 2),
        (["bench", "--repeat", "0"], "--repeat is 0", 2),
        (["plan", "-m", "opt-125m", "--prompt-len", "0"], "--prompt-len is 0", 2),
        (["profile", "--threads", str(10**12)], "--threads", 2),
    ],
)
def test_no_input_is_silently_ignored_and_exit_codes_follow_one_rule(args, needle, code):
    assert_error(cli(*args), needle, exit_code=code)


def test_models_folder_is_left_clean_after_a_refused_gguf(tmp_path):
    """A file that is not a GGUF is refused before any conversion folder is made."""
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"not a gguf" * 10)
    assert_error(run_quick("-m", str(fake)), "not a valid GGUF file")
    models = Path(os.environ["HETEGEN_HOME"]) / "models"
    assert not [p for p in models.iterdir() if p.name.startswith(("gguf-", ".gguf-"))]


def teardown_module() -> None:
    shutil.rmtree("/tmp/" + "x" * 10, ignore_errors=True)
