"""The manifest of headline results: the README's table and the docs' figures come from the result files, an
entry regenerates end to end (its quick variant), and bad input gets one line with nothing overwritten."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from metarl import manifest
from metarl.cli import main
from metarl.manifest import ManifestError, check_all, doc_drift, load_manifest, lookup, table

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "docs/reproducing.md", "docs/speed.md", "docs/agents.md", "docs/benchmarks.md",
        "docs/scaling.md"]


def test_the_readme_table_is_the_one_the_result_files_give(capsys):
    assert main(["reproduce", "--check"]) == 0, capsys.readouterr().err
    assert "all consistent" in capsys.readouterr().out
    entries = load_manifest()
    assert len(entries) >= 10
    # a number that drifts from its file is caught
    readme = (ROOT / "README.md").read_text()
    generated = table(entries)
    assert generated in readme
    row = next(line for line in generated.splitlines() if "maml_ant_dir_2h.json" in line)
    assert "**324.5 [298.0, 349.4]**" in row


def test_a_drifted_readme_number_fails_the_check(tmp_path, monkeypatch):
    readme = tmp_path / "README.md"
    readme.write_text((ROOT / "README.md").read_text().replace("**324.5 [298.0, 349.4]**", "**330.5 [298.0, 349.4]**"))
    problems = check_all(load_manifest(), ROOT / "docs" / "reproducing.md", readme)
    assert len(problems) == 1 and "differs from the result files" in problems[0]


@pytest.mark.parametrize("page", DOCS)
def test_bold_figures_in_the_docs_tables_are_in_their_rows_files(page):
    assert doc_drift(ROOT / page) == []


def test_the_probes_index_lists_every_probe_as_its_file_gives_it():
    index = (ROOT / "experiments" / "results" / "probes" / "README.md").read_text()
    assert index == manifest.probe_index(), "regenerate it: metarl.manifest.probe_index()"
    probes = sorted((ROOT / "experiments" / "results" / "probes").glob("*.json"))
    assert len(probes) >= 20 and all(f"`{p.name}`" in index for p in probes)
    assert "| `maml_half_cheetah_dir_h200_3seeds.json` |" in index and "| 238.1 / 35.0 / 111.6 |" in index


def test_doc_drift_catches_a_changed_figure(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("| AntDir | −186.0 → **324.5** after one step | `maml_ant_dir_2h.json` |\n"
                    "| AntDir | **325.5** after one step (26.5% of it) | `maml_ant_dir_2h.json` |\n"
                    "| no file named | **1.234** |\n")
    problems = doc_drift(page, ROOT / "experiments" / "results")
    assert len(problems) == 1 and problems[0].startswith("page.md:2: 325.5")


def test_lookup_by_path_index_and_matching_fields():
    data = {"rows": [{"family": "A", "method": "m", "v": [1, 2]}, {"family": "B", "method": "m", "v": [3]}]}
    assert lookup(data, "rows.family=B,method=m.v.0") == 3
    assert lookup(data, "rows.0.v.1") == 2
    with pytest.raises(KeyError, match="no element with family=C"):
        lookup(data, "rows.family=C.v")
    with pytest.raises(KeyError, match="no 'x'"):
        lookup(data, "rows.0.x")


def _manifest(tmp_path: Path, command: str, result: str = "results/r.json") -> dict:
    path = tmp_path / "manifest.yaml"
    path.write_text(json.dumps({"entries": {"toy": {
        "what": "toy", "tasks": "held-out", "seeds": "0", "budget": "none", "command": command, "result": result,
        "figures": [{"label": "value", "at": "value"}], "quick": {"overrides": "", "seeds": "0"}}}}))
    return load_manifest(path)


def test_bad_input_one_line_and_nothing_overwritten(tmp_path, capsys):
    # an entry that does not exist
    assert main(["reproduce", "no_such_entry"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no manifest entry 'no_such_entry'; the entries: maml_point_nav_2d" in err
    # a result file without provenance
    (tmp_path / "results").mkdir()
    committed = tmp_path / "results" / "r.json"
    committed.write_text(json.dumps({"value": 1.0}))
    entries = _manifest(tmp_path, f"{shlex_quote(sys.executable)} -c 'import sys; sys.exit(3)'")
    with pytest.raises(ManifestError, match=r"^toy: .*r\.json: no provenance record"):
        manifest.read_result(committed, "toy")
    # an entry whose command fails: one line, the committed file untouched, --update notwithstanding
    before = committed.read_bytes()
    with pytest.raises(ManifestError, match=r"^toy: the command exited with status 3 .* nothing committed was touched"):
        manifest.reproduce("toy", out=tmp_path / "out", update=True, entries=entries, base=tmp_path, log=lambda _: None)
    assert committed.read_bytes() == before
    # a command that writes a result without provenance is refused too, before anything replaces the committed file
    writes = f"{shlex_quote(sys.executable)} -c 'open(\"{{out}}\", \"w\").write(\"{{{{}}}}\")'"
    entries = _manifest(tmp_path, writes)
    with pytest.raises(ManifestError, match="no provenance record"):
        manifest.reproduce("toy", out=tmp_path / "out2", update=True, entries=entries, base=tmp_path, log=lambda _: None)
    assert committed.read_bytes() == before
    # a malformed manifest
    bad = tmp_path / "bad.yaml"
    bad.write_text("entries:\n  x: {what: a, tasks: sometimes}\n")
    with pytest.raises(ManifestError, match=r"entries\.x: missing seeds, budget, command, result, figures"):
        load_manifest(bad)


def shlex_quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


def test_an_entry_regenerates_end_to_end_from_its_quick_variant(tmp_path, capsys):
    out = tmp_path / "reproduced"
    assert main(["reproduce", "maml_point_nav_2d", "--quick", "--out", str(out)]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    produced = json.loads((out / "maml_point_nav_2d_3seeds.json").read_text())
    assert produced["complete"] and produced["seeds"] == [0] and produced["per_seed"][0]["iterations"] >= 1
    assert produced["provenance"]["command"].startswith(sys.executable) or "learning" in produced["provenance"]["command"]
    # the regenerated figures are printed beside the committed ones
    assert "after one step:" in printed and "(committed: −18.4 [−20.1, −16.6])" in printed
    # nothing committed changed
    assert json.loads((ROOT / "experiments/results/maml_point_nav_2d_3seeds.json").read_text())["seeds"] == [0, 1, 2]
    shutil.rmtree(out)
