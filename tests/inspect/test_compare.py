"""Change between checkpoints and agreement of task vectors: known answers, then real safetensors files."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from weightkit.errors import WeightkitError
from weightkit.inspect.change import (
    compare_checkpoints,
    cosine,
    delta_spectrum,
    relative_change,
    sign_agreement,
    square_factor,
)
from weightkit.inspect.compare import compare
from weightkit.inspect.task_vectors import (
    pairwise_cosine,
    sign_conflict_rate,
    sign_conflicts,
    task_vector_agreement,
    trim_to_density,
)


def _save(directory, tensors: dict, config: dict | None = None):
    directory.mkdir()
    save_file({name: t.contiguous() for name, t in tensors.items()}, directory / "model.safetensors")
    if config is not None:
        (directory / "config.json").write_text(json.dumps(config))
    return directory


def _orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)).double())
    return q


# -- pure functions ------------------------------------------------------------------------------------


def test_relative_change_cosine_and_sign_agreement_on_known_vectors():
    a = torch.tensor([3.0, 4.0])
    assert relative_change(a, torch.tensor([3.0, 9.0])) == pytest.approx(1.0)  # ||[0, 5]|| / ||[3, 4]||
    assert cosine(a, torch.tensor([-4.0, 3.0])) == pytest.approx(0.0)
    assert cosine(a, 2 * a) == pytest.approx(1.0)
    # Signs (+,-,0,+) vs (+,+,0,-): the first and the zero agree.
    assert sign_agreement(torch.tensor([1.0, -1.0, 0.0, 2.0]), torch.tensor([1.0, 1.0, 0.0, -2.0])) == 0.5


def test_undefined_ratios_are_none_not_nan():
    zero = torch.zeros(3)
    assert relative_change(zero, torch.ones(3)) is None
    assert cosine(zero, torch.ones(3)) is None


def test_the_spectrum_of_a_planted_rank_two_difference():
    u, v = _orthonormal(12, 2, 0), _orthonormal(8, 2, 1)
    delta = u @ torch.diag(torch.tensor([3.0, 2.0], dtype=torch.float64)) @ v.T
    spectrum = delta_spectrum(delta)
    assert spectrum["delta_singular_values"][:2] == pytest.approx([3.0, 2.0])
    assert max(spectrum["delta_singular_values"][2:]) < 1e-12
    assert spectrum["delta_stable_rank"] == pytest.approx(13 / 9)
    assert spectrum["delta_rank_90"] == 2  # 9/13 of the energy in the first is not 90%
    p = np.array([0.6, 0.4])
    assert spectrum["delta_effective_rank"] == pytest.approx(math.exp(-(p * np.log(p)).sum()))


@pytest.mark.parametrize("shape", [(40, 6), (6, 40), (7, 7)])
def test_the_square_factor_keeps_the_singular_values(shape):
    matrix = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    square = square_factor(matrix)
    assert square.shape == (min(shape), min(shape))
    torch.testing.assert_close(torch.linalg.svdvals(square), torch.linalg.svdvals(matrix.double()))


def test_sign_conflicts_on_a_hand_computed_case():
    taus = torch.tensor([[1.0, -2.0, 0.0, 3.0], [2.0, 1.0, -1.5, 0.0], [-1.0, 0.0, 0.0, 1.5]])
    # Entry 0: +,+,- conflict; 1: -,+ conflict; 2: only one nonzero; 3: +,+ agree.
    assert sign_conflicts(taus).tolist() == [True, True, False, False]
    assert sign_conflict_rate(taus) == 0.5
    # Density 1/2 keeps each row's two largest magnitudes: [0,-2,0,3], [2,0,-1.5,0], [-1,0,0,1.5];
    # only entry 0 (+2 against -1) still conflicts.
    assert trim_to_density(taus, 0.5).tolist() == [[0, -2, 0, 3], [2, 0, -1.5, 0], [-1, 0, 0, 1.5]]
    assert sign_conflict_rate(taus, density=0.5) == 0.25


def test_pairwise_cosine_of_a_gram_matrix_and_a_zero_task_vector():
    taus = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    cos = pairwise_cosine(taus @ taus.T)
    assert cos[0, 1] == pytest.approx(1 / math.sqrt(2)) and cos[0, 0] == pytest.approx(1.0)
    assert torch.isnan(cos[2]).all() and torch.isnan(cos[:, 2]).all()


# -- streaming over real files -------------------------------------------------------------------------


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_compare_checkpoints_pairs_by_name_and_reports_every_mismatch(tmp_path):
    g = _generator(0)
    w, b = torch.randn(6, 4, generator=g), torch.randn(4, generator=g)
    same = torch.randn(3, 3, generator=g)
    base = {
        "w": w,
        "b": b,
        "same": same,
        "ids": torch.arange(5),
        "resized": torch.ones(2, 2),
        "lm_head.weight": torch.ones(2, 2),
    }
    new_w = w + 0.1 * torch.randn(6, 4, generator=g)
    other = {"w": new_w, "b": -b, "same": same, "ids": torch.arange(5), "resized": torch.ones(3, 2)}
    other["extra"] = torch.ones(1)
    a_dir = _save(tmp_path / "a", base)
    b_dir = _save(tmp_path / "b", other, {"tie_word_embeddings": True})

    table = compare_checkpoints(a_dir, b_dir)
    rows = {row["name"]: row for row in table.rows}
    assert len({tuple(row) for row in table.rows}) == 1  # every row has the same keys
    assert rows["w"]["status"] == "compared"
    assert rows["w"]["relative_change"] == pytest.approx(relative_change(w, new_w))
    assert rows["w"]["cosine"] == pytest.approx(cosine(w, new_w))
    assert rows["w"]["sign_agreement"] == sign_agreement(w, new_w)
    assert rows["w"]["delta_singular_values"] == pytest.approx(
        torch.linalg.svdvals((new_w - w).double()).tolist()
    )
    assert rows["b"]["cosine"] == pytest.approx(-1.0) and rows["b"]["sign_agreement"] == 0.0
    assert rows["b"]["delta_stable_rank"] is None and "not a matrix" in rows["b"]["reason"]
    assert rows["same"]["status"] == "unchanged" and rows["same"]["relative_change"] == 0.0
    assert rows["same"]["delta_stable_rank"] is None
    assert rows["ids"]["status"] == "mismatch" and "floating-point" in rows["ids"]["reason"]
    assert (
        rows["resized"]["status"] == "mismatch" and "(2, 2) in base but (3, 2)" in rows["resized"]["reason"]
    )
    assert (
        "absent in other" in rows["lm_head.weight"]["reason"] and "ties" in rows["lm_head.weight"]["reason"]
    )
    assert rows["extra"]["reason"] == "absent in base"

    compared = [(base[n].double(), other[n].double()) for n in ("w", "b", "same")]
    delta_sq = sum(float((y - x).square().sum()) for x, y in compared)
    base_sq = sum(float(x.square().sum()) for x, _ in compared)
    assert table.summary["relative_change"] == pytest.approx(math.sqrt(delta_sq / base_sq))
    assert table.summary["compared"] == 3 and table.summary["changed"] == 2
    assert table.summary["mismatched"] == 4


def test_task_vector_agreement_equals_a_direct_computation_on_the_stacked_model(tmp_path):
    g = _generator(1)
    shapes = {"x": (5, 4), "y": (7,)}
    base = {name: torch.randn(*shape, generator=g) for name, shape in shapes.items()}
    finetunes = []
    for _ in range(3):
        tuned = {name: t + torch.randn(t.shape, generator=g) for name, t in base.items()}
        tuned["y"][:3] = base["y"][:3]  # unchanged entries are zeros of the task vector
        finetunes.append(tuned)
    dirs = [_save(tmp_path / f"ft{i}", ft) for i, ft in enumerate(finetunes)]
    table = task_vector_agreement(_save(tmp_path / "base", base), dirs)

    # Reference: every task vector as one numpy vector over the model; conflicts by a loop over entries.
    taus = np.stack(
        [
            np.concatenate([(ft[n].double() - base[n].double()).numpy().ravel() for n in shapes])
            for ft in finetunes
        ]
    )
    conflicting = [len({np.sign(v) for v in column if v != 0}) == 2 for column in taus.T]
    assert table.summary["sign_conflict_rate"] == pytest.approx(np.mean(conflicting))
    norms = np.linalg.norm(taus, axis=1)
    np.testing.assert_allclose(table.summary["cosine"], taus @ taus.T / np.outer(norms, norms), rtol=1e-12)
    row_y = next(row for row in table.rows if row["name"] == "y")
    tau_y = taus[:, 20:]
    assert row_y["sign_conflict_rate"] == pytest.approx(
        np.mean([len({np.sign(v) for v in column if v != 0}) == 2 for column in tau_y.T])
    )
    assert table.summary["compared"] == 2 and table.summary["models"] == [str(d) for d in dirs]


def test_task_vector_agreement_with_trimming_is_the_trimmed_rate_of_each_tensor(tmp_path):
    base = {"t": torch.zeros(4)}
    taus = torch.tensor([[1.0, -2.0, 0.0, 3.0], [2.0, 1.0, -1.5, 0.0], [-1.0, 0.0, 0.0, 1.5]])
    dirs = [_save(tmp_path / f"ft{i}", {"t": tau}) for i, tau in enumerate(taus)]
    table = task_vector_agreement(_save(tmp_path / "base", base), dirs, density=0.5)
    assert table.rows[0]["sign_conflict_rate"] == 0.25 and table.summary["sign_conflict_rate"] == 0.25


def test_task_vector_agreement_refuses_a_single_finetune(tmp_path):
    with pytest.raises(WeightkitError, match="at least two"):
        task_vector_agreement(tmp_path, [tmp_path])


def test_compare_dispatches_full_checkpoints_and_adds_task_vectors_for_two(tmp_path):
    g = _generator(2)
    base = {"w": torch.randn(4, 4, generator=g)}
    base_dir = _save(tmp_path / "base", base)
    dirs = [_save(tmp_path / f"ft{i}", {"w": base["w"] + torch.randn(4, 4, generator=g)}) for i in range(2)]
    tables = compare(base_dir, dirs)
    assert list(tables) == [f"change:{dirs[0]}", f"change:{dirs[1]}", "task_vectors"]
    assert tables[f"change:{dirs[1]}"].rows == compare_checkpoints(base_dir, dirs[1]).rows
    assert list(compare(base_dir, dirs[:1])) == [f"change:{dirs[0]}"]


def test_task_vector_rows_name_what_one_fine_tune_lacks_or_only_fine_tunes_have(tmp_path):
    base_dir = _save(tmp_path / "base", {"w": torch.zeros(2), "gone": torch.zeros(2)})
    ft0 = _save(tmp_path / "ft0", {"w": torch.ones(2), "gone": torch.ones(2), "new": torch.ones(1)})
    ft1 = _save(tmp_path / "ft1", {"w": -torch.ones(2), "new": torch.ones(1)})
    rows = {row["name"]: row for row in task_vector_agreement(base_dir, [ft0, ft1]).rows}
    assert rows["w"]["sign_conflict_rate"] == 1.0 and rows["w"]["cosine"][0][1] == pytest.approx(-1.0)
    assert rows["gone"]["status"] == "mismatch" and rows["gone"]["reason"] == f"absent in {ft1}"
    assert rows["new"]["reason"] == f"absent in base (present in {ft0}, {ft1})"
    assert len(rows) == 3


def test_a_quantized_checkpoint_is_refused_as_a_full_precision_one(tmp_path):
    base_dir = _save(tmp_path / "base", {"w": torch.zeros(2)})
    config = {"quantization_config": {"quant_method": "compressed-tensors", "format": "pack-quantized"}}
    quantized = _save(tmp_path / "quantized", {"w": torch.zeros(2)}, config)
    with pytest.raises(WeightkitError, match="is a quantized checkpoint"):
        compare_checkpoints(base_dir, quantized)
    with pytest.raises(WeightkitError, match="is a quantized checkpoint"):
        task_vector_agreement(quantized, [base_dir, base_dir.parent / "other"])
