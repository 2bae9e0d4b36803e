"""The compatibility matrix: every registered method on every model family of ``families.py`` either works
(every check of ``compat.run_cell``) or refuses with one line naming the layer; and ``docs/compatibility.md``
is the table of what actually happens."""

import warnings
from pathlib import Path

import pytest

from compat import all_cells, methods_in_matrix, run_cell, table
from families import FAMILIES

DOC = Path(__file__).resolve().parents[1] / "docs" / "compatibility.md"


def _names(build) -> set[str]:
    model, _ = build(0)
    return {n for n, _ in model.named_modules() if n} | {type(m).__name__ for m in model.modules()}


@pytest.mark.parametrize("method", methods_in_matrix())
@pytest.mark.parametrize("family", list(FAMILIES))
def test_cell_works_or_refuses_naming_the_layer(family, method):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # layer-collapse warnings on these tiny models are expected
        status, detail = run_cell(FAMILIES[family], method)
    if status == "refused":
        assert any(name in detail for name in _names(FAMILIES[family])), \
            f"the refusal does not name a layer of the model: {detail}"


def test_compatibility_page_is_current():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = table(all_cells())
    assert DOC.exists() and DOC.read_text() == expected, \
        "docs/compatibility.md is stale: regenerate it with `python tests/compat.py`"
