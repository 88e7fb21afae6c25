"""The eval result cache is keyed by everything that determines a number: the issue's reproduction (replace the
files of the ``reference`` folder and rerun: not "cached", a new number; an unchanged rerun is still a hit), then one
check per input kind on the key itself: the evaluated checkpoint, every other model a task loads (``reference``,
``retain_model``, ``reward_model``) and its tokenizer, dataset files, lm-eval task files and the files their YAMLs
name, and the library versions. Weights are replaced by others of the same size with the old mtime put back (as
``cp -p`` or ``rsync -a`` leave them), which a key over names, sizes and mtimes cannot see."""

import importlib.metadata
import os
import shutil
import time
from pathlib import Path

import pytest
import torch

from posttrain.evals import common
from posttrain.evals.harness import _cache_path, make_spec, run_eval
from posttrain.recipes.models import resolve_model_path

torch.set_num_threads(1)


def _copy_of_tiny(folder: Path) -> Path:
    shutil.copytree(resolve_model_path("tiny:llama"), folder)
    return folder


def _replace_weights(folder: Path, seed: int) -> None:
    """Overwrite the folder's model.safetensors with perturbed weights of the same shapes (so the same size), then
    put its old mtime back."""
    from transformers import AutoModelForCausalLM

    weights = folder / "model.safetensors"
    before = weights.stat()
    model = AutoModelForCausalLM.from_pretrained(folder)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    model.save_pretrained(folder.parent / f".new-{seed}")
    shutil.copyfile(folder.parent / f".new-{seed}" / "model.safetensors", weights)
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = weights.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


def _key(spec, task: str, config: dict, model: str | None = None) -> Path:
    model = model or spec.models[0]
    return _cache_path(model, resolve_model_path(model), spec.peft, task, config, spec)


def test_replacing_the_reference_files_is_not_a_cache_hit(tmp_path):
    # the reproduction, end to end through run_eval
    ref = _copy_of_tiny(tmp_path / "ref")
    _replace_weights(ref, seed=1)  # a reference that is not the evaluated model, so the rewards are not all 0
    spec = make_spec(
        {
            "model": "tiny:llama",
            "tasks": {"preference": {"reference": str(ref)}},
            "limit": 4,
            "batch_size": 4,
            "output": str(tmp_path / "ev"),
        }
    )
    logs = []
    first = run_eval(spec, log=logs.append)["results"]["tiny:llama"]["preference"]["metrics"]
    assert "tiny:llama / preference: cached" not in logs
    logs.clear()
    again = run_eval(spec, log=logs.append)["results"]["tiny:llama"]["preference"]["metrics"]
    assert "tiny:llama / preference: cached" in logs and again == first  # unchanged: still a hit
    _replace_weights(ref, seed=2)
    logs.clear()
    after = run_eval(spec, log=logs.append)["results"]["tiny:llama"]["preference"]["metrics"]
    assert "tiny:llama / preference: cached" not in logs
    assert after["margin"] != pytest.approx(first["margin"], abs=1e-6)
    spec.cache = False
    assert run_eval(spec, log=lambda *a: None)["results"]["tiny:llama"]["preference"]["metrics"] == after


@pytest.mark.parametrize(
    "option, task", [("reference", "preference"), ("reward_model", "preference"), ("retain_model", "unlearning")]
)
def test_every_model_a_task_loads_is_in_the_key(tmp_path, option, task):
    other = _copy_of_tiny(tmp_path / option)
    spec = make_spec({"model": "tiny:llama", "tasks": {task: {option: str(other)}}, "limit": 4})
    key = _key(spec, task, spec.tasks[task])
    assert _key(spec, task, spec.tasks[task]) == key  # nothing changed: the same entry
    _replace_weights(other, seed=3)
    assert _key(spec, task, spec.tasks[task]) != key
    # its tokenizer and chat template determine its numbers too
    key = _key(spec, task, spec.tasks[task])
    config_file = other / "tokenizer_config.json"
    before = config_file.stat()
    config_file.write_text(config_file.read_text().replace("<|im_start|>", "<|im_start|> "))
    os.utime(config_file, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert _key(spec, task, spec.tasks[task]) != key


@pytest.mark.parametrize("whole_file", [True, False], ids=["content-hash", "stat-and-edges"])
def test_the_evaluated_checkpoint_is_in_the_key(tmp_path, monkeypatch, whole_file):
    # small files are hashed whole; large ones (real weights) by size, mtime, ctime, inode and their first and last
    # MiB: both see weights replaced under the same size and mtime
    if not whole_file:
        monkeypatch.setattr(common, "HASH_WHOLE_FILE_BELOW", 0, raising=False)
    model = _copy_of_tiny(tmp_path / "model")
    spec = make_spec({"model": str(model), "tasks": "perplexity", "limit": 4})
    key = _key(spec, "perplexity", {})
    common.load_checkpoint(str(model))  # reading it changes nothing
    assert _key(spec, "perplexity", {}) == key
    _replace_weights(model, seed=4)
    assert _key(spec, "perplexity", {}) != key
    if not whole_file:  # a large file rewritten in its middle only, same size and mtime: its ctime tells
        big = model / "extra.bin"
        big.write_bytes(bytes(3 << 20))
        key = _key(spec, "perplexity", {})
        before = big.stat()
        time.sleep(0.05)  # more than the file system's timestamp granularity
        with open(big, "r+b") as f:
            f.seek(3 << 19)
            f.write(b"\x01")
        os.utime(big, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert _key(spec, "perplexity", {}) != key
    # the log files a run writes beside its weights are not in it: report/, trainer_state.json
    key = _key(spec, "perplexity", {})
    (model / "trainer_state.json").write_text("{}")
    (model / "report").mkdir()
    (model / "report" / "report.md").write_text("x")
    assert _key(spec, "perplexity", {}) == key


def test_dataset_files_are_in_the_key(tmp_path):
    data = tmp_path / "pairs.jsonl"
    row = '{"prompt": "Say hi", "chosen": " hi", "rejected": " no"}\n'
    data.write_text(row * 3)
    spec = make_spec({"model": "tiny:llama", "tasks": {"preference": {"dataset": str(data)}}, "limit": 2})
    key = _key(spec, "preference", spec.tasks["preference"])
    assert _key(spec, "preference", spec.tasks["preference"]) == key
    before = data.stat()
    data.write_text(row * 2 + row.replace(" no", " ok"))  # same size
    os.utime(data, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert _key(spec, "preference", spec.tasks["preference"]) != key
    # a builtin generator is its arguments: the seed and size of the set
    key = _key(spec, "perplexity", {})
    assert _key(spec, "perplexity", {"num_samples": 128}) != key
    spec.seed = 1
    assert _key(spec, "perplexity", {}) != key


def test_lm_eval_task_files_and_the_data_they_name_are_in_the_key(tmp_path):
    tasks_dir, data = tmp_path / "tasks", tmp_path / "data" / "docs.jsonl"
    tasks_dir.mkdir()
    data.parent.mkdir()
    data.write_text('{"question": "1 plus 2 is", "choices": ["3", "4"], "label": 0}\n')
    yaml_file = tasks_dir / "tiny_choice.yaml"
    yaml_file.write_text(
        f"task: tiny_choice\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        'test_split: test\noutput_type: multiple_choice\ndoc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n'
    )
    config = {"tasks": ["tiny_choice"], "include_path": str(tasks_dir)}
    spec = make_spec({"model": "tiny:llama", "tasks": {"lm_eval": config}})
    key = _key(spec, "lm_eval", spec.tasks["lm_eval"])
    assert _key(spec, "lm_eval", spec.tasks["lm_eval"]) == key
    yaml_file.write_text(yaml_file.read_text().replace("metric: acc", "metric: acc_norm"))
    assert _key(spec, "lm_eval", spec.tasks["lm_eval"]) != key
    key = _key(spec, "lm_eval", spec.tasks["lm_eval"])
    data.write_text(data.read_text().replace('"label": 0', '"label": 1'))  # outside include_path
    assert _key(spec, "lm_eval", spec.tasks["lm_eval"]) != key


@pytest.mark.parametrize("package", ["lm_eval", "transformers"])
def test_library_versions_are_in_the_key(monkeypatch, package):
    import transformers

    spec = make_spec({"model": "tiny:llama", "tasks": "perplexity"})
    key = _key(spec, "perplexity", {})
    if package == "transformers":
        monkeypatch.setattr(transformers, "__version__", transformers.__version__ + ".post9")
    else:
        real = importlib.metadata.version
        monkeypatch.setattr(importlib.metadata, "version", lambda dist: "99.0" if dist == package else real(dist))
    assert _key(spec, "perplexity", {}) != key
