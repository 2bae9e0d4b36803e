"""What Torch-Pruning (the reference competitor, ``import torch_pruning as tp``) does on the model families
of ``tests/families.py`` (the compatibility matrix's rows).

    OMP_NUM_THREADS=1 python benchmarks/torch_pruning_matrix.py

For each family: build the model (seed 0), take the dataset's first 4 items as the example batch (for
Hugging Face BERT a dict of ``input_ids`` and ``attention_mask``, passed to tp as kwargs; the labels are
targets, not inputs), and run ``tp.pruner.MagnitudePruner`` with ``tp.importance.MagnitudeImportance(p=2)``,
``pruning_ratio=0.25``, the final classifier/output layer ignored and, for ``nn.MultiheadAttention`` and
BERT's self-attention, ``num_heads={module: heads}`` with ``prune_num_heads=True`` (tp's default
``head_pruning_ratio=0``); then one ``pruner.step()``. Recorded per family: the outcome ("pruned" or
"crashed: <ExceptionType: message>"), the parameter counts before and after, whether the pruned model's
forward pass still runs, whether its output shape is unchanged and its output finite; for the tied family
whether ``out.weight is embedding.weight`` still holds and that weight's size; for the attention families
the heads and head size of each layer before and after (the modules' own attributes, and tp's own count
``pruner.num_heads``). The attention families are also run twice more (recorded under ``variants``): with
``head_pruning_ratio=0.5`` (the default 0 removes no whole head), and without ``num_heads`` /
``prune_num_heads`` at all. tp prunes BERT's query/key/value but leaves ``num_attention_heads``,
``attention_head_size`` and ``all_head_size`` as they were; its Hugging Face example sets them by hand after
``step()``, so for BERT the forward pass is also tried after that fix-up (``*_after_manual_fixup``).

Writes ``benchmarks/results/torch_pruning_matrix.json`` (torch and torch_pruning versions and the records)
and prints one line per family.
"""

from __future__ import annotations

import json
import os
import sys
from importlib import metadata
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import default_collate

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch_pruning as tp  # noqa: E402
from families import FAMILIES  # noqa: E402

BATCH = 4
RATIO = 0.25
VARIANTS = {"head_pruning_ratio=0.5": dict(head_pruning_ratio=0.5), "without num_heads": dict(use_num_heads=False)}
OUT = Path(__file__).resolve().parent / "results" / "torch_pruning_matrix.json"


def _batch(data):
    items = default_collate([data[i] for i in range(BATCH)])
    if isinstance(items, dict):
        return {k: v for k, v in items.items() if k != "labels"}
    return items[0]


def _forward(model, inputs):
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return out.logits if hasattr(out, "logits") else out


def _params(model):
    return sum(p.numel() for p in model.parameters())  # parameters() yields a shared tensor once


def _output_layer(model):
    if hasattr(model, "classifier"):  # BertForSequenceClassification
        return model.classifier
    for name in ("head", "out", "fc2"):
        if hasattr(model, name):
            return getattr(model, name)
    raise ValueError(f"no output layer found on {type(model).__name__}")


def _attention(model):
    """``{label: (module whose attributes hold the heads, [modules keyed in num_heads], heads)}``."""
    found = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            found[name] = (m, [m], m.num_heads)
        elif hasattr(m, "num_attention_heads") and hasattr(m, "query"):  # HF BertSelfAttention
            found[name] = (m, [m.query, m.key, m.value], m.num_attention_heads)
    return found


def _heads(attn, pruner=None):
    rows = {}
    for name, (m, keyed, _) in attn.items():
        if isinstance(m, nn.MultiheadAttention):
            row = {"num_heads": m.num_heads, "head_dim": m.head_dim, "embed_dim": m.embed_dim}
        else:
            row = {"num_attention_heads": m.num_attention_heads, "attention_head_size": m.attention_head_size,
                   "all_head_size": getattr(m, "all_head_size", None), "query_out_features": m.query.out_features}
        if pruner is not None:
            row["tp_num_heads"] = [pruner.num_heads.get(k) for k in keyed]
        rows[name] = row
    return rows


def _crash(exc):
    return f"crashed: {type(exc).__name__}: {str(exc)[:150]}"


def _fixup_bert(attn, pruner):
    """What tp's Hugging Face example does by hand after ``step()``: set the heads and sizes from the layers."""
    for m, keyed, _ in attn.values():
        if not isinstance(m, nn.MultiheadAttention):
            m.num_attention_heads = pruner.num_heads[m.query]
            m.attention_head_size = m.query.out_features // m.num_attention_heads
            m.all_head_size = m.query.out_features


def _try_forward(rec, model, inputs, out_before, suffix=""):
    try:
        out_after = _forward(model, inputs)
        rec["forward_runs" + suffix] = True
        rec["output_shape_after" + suffix] = list(out_after.shape)
        rec["output_shape_unchanged" + suffix] = out_after.shape == out_before.shape
        rec["output_finite" + suffix] = bool(torch.isfinite(out_after).all())
    except Exception as exc:
        rec["forward_runs" + suffix] = False
        rec["forward_error" + suffix] = _crash(exc).removeprefix("crashed: ")


def measure(builder, head_pruning_ratio=0.0, use_num_heads=True):
    model, data = builder(0)
    model.eval()
    inputs = _batch(data)
    rec = {"params_before": _params(model)}
    out_before = _forward(model, inputs)
    rec["output_shape_before"] = list(out_before.shape)
    tied = hasattr(model, "embedding") and hasattr(model, "out") and model.out.weight is model.embedding.weight
    if tied:
        rec["tied_before"] = True
        rec["tied_weight_numel_before"] = model.embedding.weight.numel()
    attn = _attention(model)
    num_heads = {k: heads for (_, keyed, heads) in attn.values() for k in keyed}
    if attn:
        rec["heads_before"] = _heads(attn)
    use = attn and use_num_heads
    kwargs = dict(num_heads=num_heads, prune_num_heads=True, head_pruning_ratio=head_pruning_ratio) if use else {}
    try:
        pruner = tp.pruner.MagnitudePruner(
            model, example_inputs=inputs, importance=tp.importance.MagnitudeImportance(p=2),
            pruning_ratio=RATIO, ignored_layers=[_output_layer(model)], **kwargs)
        pruner.step()
    except Exception as exc:  # a crash is an outcome
        rec["outcome"] = _crash(exc)
        return rec
    rec["outcome"] = "pruned"
    rec["params_after"] = _params(model)
    if tied:
        rec["tied_after"] = model.out.weight is model.embedding.weight
        rec["tied_weight_numel_after"] = model.embedding.weight.numel()
        rec["out_weight_shape_after"] = list(model.out.weight.shape)
        rec["embedding_weight_shape_after"] = list(model.embedding.weight.shape)
    if attn:
        rec["heads_after"] = _heads(attn, pruner if use else None)
    _try_forward(rec, model, inputs, out_before)
    if use and not rec["forward_runs"] and any(not isinstance(m, nn.MultiheadAttention) for m, _, _ in attn.values()):
        _fixup_bert(attn, pruner)
        rec["heads_after_manual_fixup"] = _heads(attn, pruner)
        _try_forward(rec, model, inputs, out_before, "_after_manual_fixup")
    return rec


def _line(name, rec):
    parts = [f"{name}: {rec['outcome']}", f"params {rec['params_before']}"]
    if "params_after" in rec:
        parts[-1] += f" -> {rec['params_after']}"
    if "forward_runs" in rec:
        parts.append(f"forward {'runs' if rec['forward_runs'] else 'fails (' + rec['forward_error'] + ')'}")
        if rec["forward_runs"]:
            parts.append(f"shape {'same' if rec['output_shape_unchanged'] else rec['output_shape_after']}")
            parts.append(f"finite {rec['output_finite']}")
    if "forward_runs_after_manual_fixup" in rec:
        fx = rec["forward_runs_after_manual_fixup"]
        parts.append(f"after manual fix-up: forward {'runs' if fx else 'fails (' + rec['forward_error_after_manual_fixup'] + ')'}")
        if fx:
            parts.append(f"shape {'same' if rec['output_shape_unchanged_after_manual_fixup'] else 'changed'}, "
                         f"finite {rec['output_finite_after_manual_fixup']}")
    if "tied_after" in rec:
        parts.append(f"tied {rec['tied_after']} ({rec['tied_weight_numel_before']} -> {rec['tied_weight_numel_after']})")
    if "heads_after" in rec:
        key = "heads_after_manual_fixup" if "heads_after_manual_fixup" in rec else "heads_after"
        parts.append(f"layer 0 heads {list(rec['heads_before'].values())[0]} -> {list(rec[key].values())[0]}")
    return "; ".join(parts)


def main():
    torch.set_num_threads(1)
    records = {}
    for name, builder in FAMILIES.items():
        try:
            rec = measure(builder)
        except Exception as exc:  # the family itself failed before tp ran (build or reference forward)
            rec = {"outcome": _crash(exc), "params_before": None}
        if "heads_before" in rec:
            rec["variants"] = {}
            for label, kw in VARIANTS.items():
                try:
                    rec["variants"][label] = measure(builder, **kw)
                except Exception as exc:
                    rec["variants"][label] = {"outcome": _crash(exc)}
        records[name] = rec
        print(_line(name, rec), flush=True)
        for label, var in rec.get("variants", {}).items():
            print(f"    {label}: " + _line(name, var), flush=True)
    result = {
        "torch": torch.__version__,
        "torch_pruning": metadata.version("torch-pruning"),
        "torch_pruning___version__": getattr(tp, "__version__", None),
        "settings": {"pruner": "tp.pruner.MagnitudePruner", "importance": "MagnitudeImportance(p=2)",
                     "pruning_ratio": RATIO, "example_batch": BATCH, "seed": 0,
                     "attention": "num_heads={module: heads}, prune_num_heads=True, head_pruning_ratio=0 "
                                  "(variants: head_pruning_ratio=0.5; no num_heads/prune_num_heads)"},
        "families": records,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    tmp = OUT.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, OUT)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
