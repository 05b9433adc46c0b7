"""The inspect report: streaming a checkpoint through matrix_metrics, its rows, CSV/DataFrame, the report
directory (atomic, refuses what it must) and bad input (non-matrices, corrupt and quantized checkpoints)."""

import base64
import json
import math
import sys
import weakref

import pytest
import torch
from safetensors.torch import save_file

from weightkit.checkpoint import CheckpointReader
from weightkit.errors import WeightkitError
from weightkit.inspect.change import Table
from weightkit.inspect.metrics import matrix_metrics
from weightkit.inspect.plots import heatmap_png, line_plot_png, spectrum_png
from weightkit.inspect.report import (
    Figure,
    InspectResult,
    Section,
    comparison_sections,
    inspect_checkpoint,
    metric_sections,
    spectrum_choice,
    strict_json,
    write_report,
)
from weightkit.testing import save_tiny, tiny_gpt2


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def odd_file(tmp_path):
    """A safetensors file with one tensor of every kind the report must skip, and two real matrices."""
    tensors = {
        "scalar": torch.tensor(2.0),
        "block.bias": torch.randn(8, generator=_generator(1)),
        "conv.weight": torch.randn(4, 3, 3, 3, generator=_generator(2)),
        "codes": torch.randint(0, 7, (8, 8), dtype=torch.int32, generator=_generator(3)),
        "zeros.weight": torch.zeros(6, 4),
        "a.weight": torch.randn(16, 8, generator=_generator(4)),
        "b.weight": torch.randn(8, 12, generator=_generator(5), dtype=torch.float64).to(torch.bfloat16),
    }
    path = tmp_path / "odd.safetensors"
    save_file(tensors, path)
    return path


def test_rows_are_matrix_metrics_of_each_tensor_read_directly_in_checkpoint_order(llama_dir):
    result = inspect_checkpoint(llama_dir, device="cpu")
    with CheckpointReader(llama_dir) as reader:
        assert [row["name"] for row in result.rows] == reader.names()
        matrices = 0
        for row in result.rows:
            tensor = reader.get(row["name"])
            assert row["shape"] == list(tensor.shape) and row["dtype"] == "float32"
            if tensor.dim() == 2:
                matrices += 1
                expected = matrix_metrics(tensor)
                assert {k: row[k] for k in expected} == expected and "skipped" not in row
            else:  # the Llama's norms are its 1-D tensors
                assert row["skipped"].startswith("1-D") and set(row) == {"name", "shape", "dtype", "skipped"}
    assert matrices == 2 * 7 + 2  # 7 linears per block, embed_tokens and lm_head


def test_rows_carry_the_singular_values_in_json_but_not_in_the_table_columns(llama_dir, tmp_path):
    result = inspect_checkpoint(llama_dir, device="cpu", spectra=0)
    with CheckpointReader(llama_dir) as reader:
        for row in result.rows:
            if "skipped" in row:
                assert "singular_values" not in row
                continue
            expected = torch.linalg.svdvals(reader.get(row["name"]).double())
            got = torch.tensor(row["singular_values"], dtype=torch.float64)
            # float32 weights go through their float32 Gram matrix: values to its noise floor, sqrt(n eps)
            # times the largest (weightkit.inspect.spectral's docstring)
            floor = (len(expected) * torch.finfo(torch.float32).eps) ** 0.5 * float(expected[0])
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=floor)
    assert "singular_values" not in result.columns
    assert "singular_values" not in result.to_csv(tmp_path / "m.csv").read_text().splitlines()[0]


def test_every_tensor_that_is_not_a_weight_matrix_is_skipped_with_its_reason(odd_file):
    rows = {row["name"]: row for row in inspect_checkpoint(odd_file, device="cpu").rows}
    assert rows["scalar"]["skipped"] == "a scalar, not a matrix"
    assert rows["block.bias"]["skipped"].startswith("1-D")
    assert rows["conv.weight"]["skipped"].startswith("4-D")
    assert rows["codes"]["skipped"].startswith("int32 values")
    # matrix_metrics refuses a zero matrix: its message becomes the reason, and no number is reported
    assert "all zeros" in rows["zeros.weight"]["skipped"] and "stable_rank" not in rows["zeros.weight"]
    for name in ("a.weight", "b.weight"):
        assert "skipped" not in rows[name]
        assert rows[name]["stable_rank"] >= 1  # computed (bfloat16 read as stored)


@pytest.mark.parametrize("threads", [1, 2])
def test_the_report_streams_the_tensors(odd_file, monkeypatch, threads):
    """Each matrix is read once through CheckpointReader.get; with one thread each is released before the next
    is read, with n threads (n matrices analysed at once) at most n are alive when one is read."""
    live: list[weakref.ref] = []
    read: list[str] = []
    get = CheckpointReader.get

    def tracking_get(self, name):
        alive = sum(ref() is not None for ref in live)
        assert alive < threads, f"{alive} tensors read before {name} are still alive"
        tensor = get(self, name)
        live.append(weakref.ref(tensor))
        read.append(name)
        return tensor

    monkeypatch.setattr(CheckpointReader, "get", tracking_get)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        result = inspect_checkpoint(odd_file, device="cpu", spectra=1)
        assert torch.get_num_threads() == threads  # restored after the workers' one thread each
    finally:
        torch.set_num_threads(before)
    matrices = {"zeros.weight", "a.weight", "b.weight"}  # the 2-D float tensors, read once each
    assert read == [row["name"] for row in result.rows if row["name"] in matrices]
    assert len(result.rows) == 7


def test_matrices_analysed_side_by_side_give_the_rows_of_one_at_a_time(tmp_path):
    model = save_tiny(tiny_gpt2(seed=1), tmp_path / "gpt2")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = inspect_checkpoint(model, device="cpu", spectra=3)
        torch.set_num_threads(2)
        side_by_side = inspect_checkpoint(model, device="cpu", spectra=3)
    finally:
        torch.set_num_threads(before)
    assert side_by_side.rows == serial.rows  # each matrix runs on one thread either way: the same numbers
    assert list(side_by_side.spectra) == list(serial.spectra)


def test_spectra_are_the_squared_singular_values_of_the_chosen_matrices(odd_file):
    result = inspect_checkpoint(odd_file, device="cpu", spectra=1)
    with CheckpointReader(odd_file) as reader:
        first = next(n for n in reader.names() if n in ("zeros.weight", "a.weight", "b.weight"))
        assert first != "zeros.weight"  # else the chosen one would be refused and have no spectrum
        expected = torch.linalg.svdvals(reader.get(first).double()).square()
    assert list(result.spectra) == [first]
    # float32 weights are decomposed in float32 (weightkit.inspect.spectral): eigenvalues to ~1e-6
    torch.testing.assert_close(result.spectra[first], expected, rtol=1e-5, atol=1e-6 * float(expected[0]))


@pytest.mark.parametrize(
    ("count", "expected"),
    [(0, []), (1, [0]), (2, [0, 9]), (4, [0, 3, 6, 9]), (10, list(range(10))), (50, list(range(10)))],
)
def test_spectrum_choice_is_evenly_spaced_with_both_ends(count, expected):
    names = [f"m{i}" for i in range(10)]
    assert spectrum_choice(names, count) == [f"m{i}" for i in expected]


def test_csv_and_dataframe_hold_the_same_rows(odd_file, tmp_path):
    pd = pytest.importorskip("pandas")
    result = inspect_checkpoint(odd_file, device="cpu")
    frame = result.to_pandas()
    from_csv = pd.read_csv(result.to_csv(tmp_path / "m.csv"))
    assert list(frame.columns) == list(from_csv.columns) == result.columns
    assert list(frame["name"]) == [row["name"] for row in result.rows]
    assert frame.loc[frame["name"] == "conv.weight", "shape"].item() == "4x3x3x3"
    pd.testing.assert_frame_equal(frame, from_csv, check_dtype=False)
    row = next(r for r in result.rows if r["name"] == "a.weight")
    for metric in result.metric_names:
        assert frame.loc[frame["name"] == "a.weight", metric].item() == pytest.approx(row[metric])


def test_to_pandas_without_pandas_says_how_to_get_it(odd_file, monkeypatch):
    result = InspectResult(source="x", rows=[{"name": "a", "shape": [2], "dtype": "float32"}])
    monkeypatch.setitem(sys.modules, "pandas", None)  # import pandas raises ImportError
    with pytest.raises(WeightkitError, match="pip install pandas"):
        result.to_pandas()


def test_a_corrupt_checkpoint_stops_with_the_readers_message(tmp_path):
    path = tmp_path / "broken.safetensors"
    save_file({"w": torch.ones(64, 64)}, path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(WeightkitError, match="broken.safetensors is corrupt or truncated"):
        inspect_checkpoint(path, device="cpu")


def test_a_quantized_checkpoint_is_refused_by_name(quantized_llama_dir):
    with pytest.raises(WeightkitError, match=r"quantized checkpoint \(compressed-tensors pack-quantized"):
        inspect_checkpoint(quantized_llama_dir, device="cpu")


def test_a_bare_file_of_quantized_tensors_is_refused_naming_one(quantized_llama_dir):
    # Without its config.json the file still holds packed codes and scales, which are not weights.
    file = quantized_llama_dir / "model.safetensors"
    with pytest.raises(WeightkitError, match=r"holds quantized tensors \(.*weight_(packed|scale)\)"):
        inspect_checkpoint(file, device="cpu")


def test_write_report_writes_rows_plots_and_a_page_holding_added_sections(tmp_path):
    model = save_tiny(tiny_gpt2(seed=0), tmp_path / "gpt2")
    result = inspect_checkpoint(model, device="cpu", spectra=2)
    heat = heatmap_png(torch.eye(2), row_labels=["a", "b"], col_labels=["a", "b"], title="t", value_label="v")
    extra = Section(
        "Layer similarity", rows=[{"pair": "a-b", "cka": 0.5}], figures=[Figure("sim", "CKA", heat)]
    )
    out = write_report(result, tmp_path / "report", sections=[extra])
    assert json.loads((out / "metrics.json").read_text()) == result.rows
    assert (out / "metrics.csv").read_text().splitlines()[0].split(",") == result.columns
    plots = sorted(p.name for p in (out / "plots").iterdir())
    spectra = [p for p in plots if p.startswith("spectrum_")]
    assert len(spectra) == 2 and "sim.png" in plots and "metrics_per_layer.png" in plots
    page = (out / "report.html").read_text()
    for png in (out / "plots").iterdir():  # every plot written is embedded, byte for byte
        assert f"data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()}" in page
    assert "<h2>Layer similarity</h2>" in page and "<td class=text>a-b</td>" in page
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_nan_metrics_are_json_null(tmp_path):
    rows = [{"name": "w", "shape": [2, 2], "dtype": "float32", "stable_rank": math.nan}]
    result = InspectResult(source="x", rows=rows)
    out = write_report(result, tmp_path / "r")
    assert json.loads((out / "metrics.json").read_text())[0]["stable_rank"] is None
    assert result.json_rows()[0]["stable_rank"] is None and math.isnan(result.rows[0]["stable_rank"])


def test_the_report_directory_is_refused_or_replaced_as_the_writers_are(tmp_path, odd_file):
    result = inspect_checkpoint(odd_file, device="cpu", spectra=0)
    unrelated = tmp_path / "notes"
    unrelated.mkdir()
    (unrelated / "mine.txt").write_text("keep")
    with pytest.raises(WeightkitError, match="not empty; pass --force"):
        write_report(result, unrelated)
    with pytest.raises(WeightkitError, match="does not look like a weightkit report"):
        write_report(result, unrelated, overwrite=True)
    assert [p.name for p in unrelated.iterdir()] == ["mine.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    write_report(result, empty)  # an empty directory is taken
    (empty / "metrics.json").write_text("[]")
    write_report(result, empty, overwrite=True)  # an earlier report is replaced
    assert json.loads((empty / "metrics.json").read_text()) == result.rows


def test_a_failure_while_writing_leaves_nothing(tmp_path, odd_file, monkeypatch):
    import weightkit.inspect.report as report

    result = inspect_checkpoint(odd_file, device="cpu", spectra=0)

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(report, "_html", fail)
    with pytest.raises(WeightkitError, match="out failed: disk full. Nothing was written"):
        write_report(result, tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir()] == ["odd.safetensors"]


def test_a_spectrum_is_drawn_with_the_rows_power_law_fit_when_matrix_metrics_gives_one():
    eigenvalues = torch.linspace(0.1, 10.0, 50, dtype=torch.float64)
    fitted = {"name": "w", "shape": [50, 50], "dtype": "float32", "alpha": 2.5, "xmin": 1.0}
    unfitted = {**fitted, "name": "v", "alpha": math.nan}  # a fit that failed draws no line
    result = InspectResult(source="x", rows=[fitted, unfitted], spectra={"w": eigenvalues, "v": eigenvalues})
    spectra = {f.name: f for f in metric_sections(result)[1].figures}
    assert spectra["spectrum_w"].png == spectrum_png(eigenvalues, title="w", alpha=2.5, xmin=1.0)
    assert "alpha=2.5" in spectra["spectrum_w"].title
    assert spectra["spectrum_v"].png == spectrum_png(eigenvalues, title="v")
    (bars,) = metric_sections(result)[0].figures
    assert bars.name == "metrics_per_layer"
    assert bars.title.startswith("alpha per weight matrix")  # the bar metrics the rows hold (xmin is not one)


# -- the sections of the other analyses, and the extra files ------------------------------------------------


def test_strict_json_makes_nested_non_finite_numbers_null():
    value = {"a": [math.inf, (1.0, math.nan)], 2: {"b": -math.inf, "c": "x", "d": 3}}
    assert strict_json(value) == {"a": [None, [1.0, None]], "2": {"b": None, "c": "x", "d": 3}}
    json.dumps(strict_json(value), allow_nan=False)  # strict JSON now


def test_write_report_writes_the_rows_and_extra_json_files_it_is_given(tmp_path):
    rows = [{"name": "w", "shape": [2, 2], "dtype": "float32", "stable_rank": 1.5}]
    result = InspectResult(source="x", rows=rows)
    nested = [{**rows[0], "compare": {"other": {"sqnr_db": math.inf}}}, {"name": "extra", "compare": {}}]
    out = write_report(result, tmp_path / "r", rows=nested, json_files={"summary.json": {"x": (1, math.nan)}})
    assert json.loads((out / "metrics.json").read_text())[0]["compare"] == {"other": {"sqnr_db": None}}
    assert json.loads((out / "summary.json").read_text()) == {"x": [1, None]}
    assert (out / "metrics.csv").read_text().splitlines()[0].split(",") == result.columns  # the matrices only
    for name in ("metrics.csv", "metrics.json", "../summary.json", "summary.txt"):
        with pytest.raises(WeightkitError, match="cannot be an extra file of a report"):
            write_report(result, tmp_path / "s", json_files={name: {}})
    assert not (tmp_path / "s").exists()


def _change_table() -> Table:
    rows = [
        {"name": "a.weight", "shape": [4, 3], "status": "compared", "relative_change": 0.5,
         "delta_singular_values": [3.0, 2.0, 1.0]},
        {"name": "b", "shape": [3], "status": "compared", "relative_change": 0.25,
         "delta_singular_values": None},
        {"name": "c.weight", "shape": [2, 2], "status": "mismatch", "relative_change": None,
         "delta_singular_values": None},
    ]  # fmt: skip
    return Table(rows, {"compared": 2, "relative_change": 0.4})


def test_comparison_sections_tabulate_scalars_and_draw_lists():
    tv = Table(
        [{"name": "a.weight", "shape": [4, 3], "status": "compared", "sign_conflict_rate": 0.5,
          "cosine": [[1.0, 0.1], [0.1, 1.0]]}],
        {"models": ["x", "y"], "density": None, "sign_conflict_rate": 0.5,
         "cosine": [[1.0, 0.1], [0.1, 1.0]]},
    )  # fmt: skip
    change, task_vectors = comparison_sections({"change:ft": _change_table(), "task_vectors": tv})
    assert change.title == "Comparison: change:ft" and "relative_change: 0.4" in change.note
    assert [set(row) for row in change.rows] == [{"name", "shape", "status", "relative_change"}] * 3
    assert [f.name for f in change.figures] == ["compare0_relative_change", "compare0_delta_spectra"]
    assert [f.name for f in task_vectors.figures] == ["compare1_cosine", "compare1_sign_conflicts"]
    assert "cosine" not in task_vectors.rows[0]
    assert "(raw task vectors): 0.5" in task_vectors.note
    with pytest.raises(WeightkitError, match="no report section for a comparison named 'merge:x'"):
        comparison_sections({"merge:x": _change_table()})


def test_line_plot_is_deterministic_and_refuses_what_it_cannot_draw():
    # (line_plot_png is the plot this report's curves use; tested here beside its callers.)
    series = {"before": ([0, 0.5, 1], [1.0, 2.0, 1.0]), "after": ([0, 0.5, 1], [1.0, 1.0, 1.0])}
    png = line_plot_png(series, title="t", xlabel="x", ylabel="y", hline=(1.5, "threshold"))
    assert png.startswith(b"\x89PNG") and png == line_plot_png(
        series, title="t", xlabel="x", ylabel="y", hline=(1.5, "threshold")
    )
    with pytest.raises(WeightkitError, match="has no point to draw"):
        line_plot_png({"zero": ([1, 2], [0.0, 0.0])}, title="t", xlabel="x", ylabel="y", log_y=True)
    with pytest.raises(WeightkitError, match="has 2 x values but 1 y values"):
        line_plot_png({"bad": ([1, 2], [1.0])}, title="t", xlabel="x", ylabel="y")
