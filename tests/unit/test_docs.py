"""The generated docs: the API reference matches the proto, and the benchmark report draws
whatever result files exist without failing on the ones it cannot read."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from kvservice import docgen


def _load_report():
    # benchmarks/ is a folder of scripts run from the repository root, not an installed
    # package, so the module is loaded from its file.
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "report.py"
    spec = importlib.util.spec_from_file_location("benchmarks.report", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


report = sys.modules.get("benchmarks.report") or _load_report()


@pytest.fixture(scope="module")
def descriptors() -> list:
    pytest.importorskip("grpc_tools")
    return docgen.load_descriptors()


def test_api_reference_is_current(descriptors: list) -> None:
    assert docgen.API_DOC.read_text() == docgen.render(descriptors), (
        "docs/api.md is stale: run python -m kvservice.docgen"
    )


def test_api_reference_names_every_rpc_message_field_and_enum_value(descriptors: list) -> None:
    text = docgen.render(descriptors)
    for file in descriptors:
        for service in file.service:
            for method in service.method:
                assert f"### {method.name}\n" in text
                assert f"rpc {method.name}(" in text
        for message in file.message_type:
            assert f"### {message.name}\n" in text
            for field in message.field:
                assert f"| `{field.name}` | {field.number} |" in text
        for enum in file.enum_type:
            for value in enum.value:
                assert f"| `{value.name}` | {value.number} |" in text


def test_every_rpc_is_documented_in_the_proto(descriptors: list) -> None:
    for file in descriptors:
        documented = {
            tuple(loc.path) for loc in file.source_code_info.location if loc.leading_comments.strip()
        }
        for s_index, service in enumerate(file.service):
            assert (docgen._SERVICE, s_index) in documented, service.name
            for m_index, method in enumerate(service.method):
                path = (docgen._SERVICE, s_index, docgen._METHOD, m_index)
                assert path in documented, f"rpc {method.name} has no comment"


def test_comment_layout_keeps_lists_and_tables() -> None:
    comment = (
        " Intro line.\n\n Rules:\n   * first item\n     continued\n   * second\n\n"
        " Codes:\n   NOT_FOUND    unknown\n   DATA_LOSS    lost\n Tail.\n"
    )
    assert docgen._markdown(comment) == [
        "Intro line.",
        "",
        "Rules:",
        "",
        "* first item",
        "  continued",
        "* second",
        "",
        "Codes:",
        "",
        "```",
        "NOT_FOUND    unknown",
        "DATA_LOSS    lost",
        "```",
        "",
        "Tail.",
        "",
    ]
    assert docgen._markdown("") == []


@pytest.mark.parametrize(
    ("name", "unit"),
    [
        ("decode_step_us", "us"),
        ("prefix_lookup_32k_us", "us"),
        ("waste_pct_paged", "%"),
        ("p99_ms", "ms"),
        ("ops_s", "ops/s"),
        ("output_tokens_per_s", "tokens/s"),
        ("swap_gbps", "GB/s"),
        ("elapsed_s", "s"),
        ("peak_gib", "GiB"),
        ("ours_over_sdpa", "x"),
        ("max_concurrent_paged", None),
        ("num_blocks", None),
        ("B", None),
    ],
)
def test_units_are_read_from_field_names(name: str, unit: str | None) -> None:
    assert report.unit_of(name) == unit


def test_tables_of_rows_flat_numbers_and_keyed_objects() -> None:
    rows = report.tables_of(
        {
            "card": "H200",
            "results": [
                {"kernel": "decode", "B": 1, "L": 32768, "paged_us": 40.0, "sdpa_us": 120.0},
                {"kernel": "decode", "B": 64, "L": 4096, "paged_us": 300.0, "sdpa_us": 310.0},
            ],
        }
    )
    (table,) = rows
    assert table.title == "results"
    assert table.labels == ["decode B=1 L=32768", "decode B=64 L=4096"]
    assert table.series == {"us": {"paged_us": [40.0, 300.0], "sdpa_us": [120.0, 310.0]}}

    (flat,) = report.tables_of({"date": "2026-11-27", "decode_step_us": 210.0, "max_concurrent_paged": 410})
    assert flat.series == {"us": {"decode_step_us": [210.0]}, "value": {"max_concurrent_paged": [410]}}

    (keyed,) = report.tables_of({"ops": {"create": {"c1": {"p50_ms": 1.0}, "c8": {"p50_ms": 3.0}}}})
    assert keyed.labels == ["create c1", "create c8"]
    assert keyed.series == {"ms": {"p50_ms": [1.0, 3.0]}}

    assert report.tables_of({"card": "H200", "versions": {"torch": "2.11"}}) == []
    assert report.tables_of([1, 2, 3]) == []


def test_report_draws_what_it_can_and_lists_the_rest(tmp_path: Path) -> None:
    results, img, doc = tmp_path / "results", tmp_path / "docs" / "img", tmp_path / "docs" / "b.md"
    results.mkdir()
    (results / "core.json").write_text(json.dumps({"decode_step_us": 200.0, "waste_pct_paged": 2.0}))
    (results / "attention.json").write_text(
        json.dumps({"card": "H100", "rows": [{"B": 1, "paged_us": 1.0}, {"B": 2, "paged_us": 2.0}]})
    )
    (results / "broken.json").write_text("{not json")
    (results / "meta.json").write_text(json.dumps({"card": "H100"}))
    doc.parent.mkdir(parents=True)
    doc.write_text(f"# Benchmarks\n\nintro\n\n{report.BEGIN}\nold\n{report.END}\n\nafter\n")

    assert report.main(["--results", str(results), "--img", str(img), "--doc", str(doc)]) == 0

    assert sorted(p.name for p in img.iterdir()) == ["attention-rows.png", "core.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in img.iterdir())
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nintro\n\n") and text.endswith("\n\nafter\n")
    assert "old" not in text
    assert "![rows](img/attention-rows.png)" in text and "![core](img/core.png)" in text
    assert "Run: card: H100." in text
    assert "Skipped `broken.json`: unreadable" in text and "Skipped `meta.json`: no numbers" in text

    # A result file that is gone takes its plot with it; other images stay.
    (img / "diagram.png").write_bytes(b"keep")
    (results / "core.json").unlink()
    report.main(["--results", str(results), "--img", str(img), "--doc", str(doc)])
    assert sorted(p.name for p in img.iterdir()) == ["attention-rows.png", "diagram.png"]
    assert "img/core.png" not in doc.read_text()


def test_report_with_no_results_says_so(tmp_path: Path) -> None:
    doc = tmp_path / "b.md"
    report.main(["--results", str(tmp_path / "none"), "--img", str(tmp_path / "img"), "--doc", str(doc)])
    assert doc.read_text() == f"{report.BEGIN}\nNo results in benchmarks/results/ yet.\n{report.END}\n"
