"""One cell of the compatibility matrix: a registered method on a model family, checked end to end.

A cell either **works** (every check below holds) or is **refused** (``PrunelabError`` with one line that
names the layer); any other exception, or a failed check, is a bug. Checks, after pruning:

* weight-level methods reach their target exactly: round((1 - s) m) of the m eligible weights survive;
* the outputs are finite;
* pruned entries stay exactly zero after 3 steps of SGD (momentum 0.9, weight decay) and after
  ``load_state_dict`` of the dense weights;
* a tied parameter stays one tensor (same object, one mask);
* channel-level methods: ``compact`` builds a smaller model equal to the masked one within 1e-5.
"""

from __future__ import annotations

import copy

import torch
from torch.utils.data import DataLoader

import prunelab
from prunelab import masking, selection
from prunelab.data.feed import as_feed, call, default_logits, default_loss
from prunelab.errors import PrunelabError
from prunelab.methods import get_method

SPARSITY, CHANNELS = 0.5, 0.25


class CellFailure(AssertionError):
    """A check of a cell that did not hold."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise CellFailure(message)


def run_cell(build, method: str, seed: int = 0) -> tuple[str, str]:
    """("works", what was checked) or ("refused", the one-line reason)."""
    model, data = build(seed)
    try:
        detail = _exercise(model, data, method)
    except PrunelabError as error:
        message = str(error)
        check("\n" not in message and message.strip(), f"refusal is not one line: {message!r}")
        return "refused", message
    return "works", detail


def _batch(data):
    feed = as_feed(data)
    drawn = feed.draw(8, torch.Generator().manual_seed(0))
    return drawn.inputs, drawn.targets


def _forward(model, inputs):
    return default_logits(call(model, inputs))


def _ties(model) -> dict[int, list[str]]:
    names: dict[int, list[str]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for local, p in module.named_parameters(recurse=False):
            names.setdefault(id(p), []).append(masking.param_name(module_name, local))
    return {k: v for k, v in names.items() if len(v) > 1}


def _exercise(model, data, method: str) -> str:
    spec = get_method(method)
    dense = copy.deepcopy(model.state_dict())
    ties_before = _ties(model)
    if spec.schedule == "lobster":
        report = _lobster(model, data)
    elif not spec.targets:
        report = prunelab.prune(model, method, data=data)
    elif "sparsity" in spec.targets and not spec.structured:
        report = prunelab.prune(model, method, SPARSITY, data=data)
        expected = selection.keep_count(report.total, SPARSITY)
        check(report.kept == expected, f"kept {report.kept} of {report.total}, expected {expected}")
        current = masking.masks(model)
        alive = sum(int(current[n].sum()) if n in current else layer["params"]
                    for layer in report.layers for n in [layer["name"]])
        check(alive == expected, f"masks keep {alive} eligible weights, the report says {report.kept}")
    else:
        kind = "channels" if "channels" in spec.targets else "sparsity"
        report = prunelab.prune(model, method, data=data, **{kind: CHANNELS})
    current = masking.masks(model)
    check(bool(current), "no mask attached")
    check(any(not bool(m.all()) for m in current.values()), "nothing pruned")

    inputs, targets = _batch(data)
    check(bool(torch.isfinite(_forward(model, inputs)).all()), "outputs are not finite")
    _train(model, inputs, targets)
    _zeros_hold(model, current, "3 SGD steps")
    model.load_state_dict(dense)
    _zeros_hold(model, current, "load_state_dict of the dense weights")
    check(_ties(model) == ties_before, "a tie was broken")
    for names in ties_before.values():
        check(sum(n in current for n in names) <= 1, f"tied parameter {names} has more than one mask")

    detail = f"sparsity {report.sparsity:.3f} of {report.total} eligible weights"
    if spec.structured:
        example = inputs
        small, compact_report = prunelab.compact(model, example)
        check(compact_report.max_abs_diff <= 1e-5 * max(1.0, compact_report.output_scale),
              f"compact differs by {compact_report.max_abs_diff}")
        # a method that decides itself (relief) may leave no whole channel to remove; a channel target must
        check(compact_report.params_after < compact_report.params_before or not spec.targets,
              "compact removed nothing")
        detail += (f"; compact {compact_report.params_before} -> {compact_report.params_after} parameters, "
                   f"max diff {compact_report.max_abs_diff:.1e}")
    return detail


def _lobster(model, data):
    from prunelab.schedules import Lobster

    schedule = Lobster(model, data, pwe=1).attach(None)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    schedule.attach(optimizer)
    inputs, targets = _batch(data)
    for _ in range(2):
        optimizer.zero_grad()
        default_loss(_forward(model, inputs), targets).backward()
        optimizer.step()
        schedule.step()
    schedule.epoch_end(val_loss=1.0)
    event = schedule.epoch_end(val_loss=2.0)  # no improvement for pwe=1 epoch: a pruning phase
    check(event is not None, "no pruning phase on a plateau")

    class Report:
        sparsity = event["sparsity_all"]
        total = sum(p.numel() for p in model.parameters())
    return Report


def _train(model, inputs, targets) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    model.train()
    for _ in range(3):
        optimizer.zero_grad()
        default_loss(_forward(model, inputs), targets).backward()
        optimizer.step()


def _zeros_hold(model, current, after: str) -> None:
    params = dict(model.named_parameters())
    for name, mask in current.items():
        revived = int((params[name].detach()[~mask] != 0).sum())
        check(revived == 0, f"{revived} pruned entries of {name} are non-zero after {after}")


# --- the table in docs/compatibility.md ---------------------------------------------------------------------

def methods_in_matrix() -> list[str]:
    """Every registered method that prunes (``none``, the dense baseline, has nothing to check)."""
    return [m.name for m in prunelab.list_methods() if m.prunes]


def all_cells() -> dict[tuple[str, str], tuple[str, str]]:
    from families import FAMILIES

    return {(family, method): run_cell(build, method) for family, build in FAMILIES.items()
            for method in methods_in_matrix()}


def table(cells: dict[tuple[str, str], tuple[str, str]]) -> str:
    families = list(dict.fromkeys(f for f, _ in cells))
    methods = list(dict.fromkeys(m for _, m in cells))
    works = sum(status == "works" for status, _ in cells.values())
    lines = ["# Compatibility: every method on the layer types users bring", "",
             "Generated by `tests/test_compatibility.py` from the actual behaviour (regenerate with "
             "`python tests/compat.py`; the test fails when this page is stale). Each cell prunes a small model "
             "of the family (defined in `tests/families.py`) and **works** only if: a weight-level method "
             "reaches its target exactly over the eligible weights; the outputs are finite; pruned entries stay "
             "exactly zero after 3 SGD steps (momentum 0.9, weight decay) and after `load_state_dict` of the "
             "dense weights; ties stay tied; a channel-level method's `compact` model equals the masked one "
             "within 1e-5. Otherwise the method **refuses** with one line (numbered below) before changing the "
             "model. No other outcome passes the test.", "",
             f"{works} of {len(cells)} cells work, {len(cells) - works} refuse.", "",
             "| method | " + " | ".join(families) + " |", "|---|" + "---|" * len(families)]
    reasons: list[str] = []
    for method in methods:
        row = []
        for family in families:
            status, detail = cells[family, method]
            if status == "works":
                row.append("works")
            else:
                if detail not in reasons:
                    reasons.append(detail)
                row.append(f"refused [{reasons.index(detail) + 1}]")
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    lines += ["", "Refusals:", ""]
    lines += [f"{i}. {reason.replace('|', '/')}" for i, reason in enumerate(reasons, 1)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import sys
    import warnings
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    target = Path(__file__).resolve().parents[1] / "docs" / "compatibility.md"
    target.write_text(table(all_cells()))
    print(f"wrote {target}")
