"""Packaging guards: the namespace mapping ships every sub-package and recipe, and nothing generic leaks."""

import subprocess
import sys
import tomllib
import zipfile

from support import ROOT

MAPPED = {
    "posttrain": "posttrain",
    "trainers": "posttrain.trainers",
    "recipes": "posttrain.recipes",
    "evals": "posttrain.evals",
    "data": "posttrain.data",
}


def packages_on_disk() -> set[str]:
    found = set()
    for folder, namespace in MAPPED.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([namespace, *rel.parts]))
    return found


def test_every_subpackage_is_listed_in_pyproject():
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert packages_on_disk() == set(tool["packages"])
    assert set(tool["package-dir"]) == set(tool["packages"])


def test_built_wheel_holds_every_subpackage_and_recipe(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    wheel = next(tmp_path.glob("posttrain-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for package in packages_on_disk():
        assert package.replace(".", "/") + "/__init__.py" in names, package
    recipes = {str(p.relative_to(ROOT)) for p in (ROOT / "recipes").rglob("*.yaml")}
    assert recipes and {"posttrain/" + r for r in recipes} <= names
    data_files = {str(p.relative_to(ROOT)) for p in (ROOT / "data").glob("*.json")}  # read by the data generators
    assert data_files and {"posttrain/" + f for f in data_files} <= names
    assert not any(n.split("/")[0] in ("trainers", "data", "recipes", "evals", "tests") for n in names)


def test_bare_generic_imports_fail_outside_the_checkout(tmp_path):
    for name in ("trainers", "data", "recipes", "evals"):
        proc = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=tmp_path, capture_output=True, text=True)
        assert proc.returncode != 0 and "ModuleNotFoundError" in proc.stderr, name
    ok = subprocess.run(
        [sys.executable, "-c", "import posttrain.trainers, posttrain.data, posttrain.recipes, posttrain.evals"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
