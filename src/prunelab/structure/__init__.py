"""Channels: which output channels are coupled, channel masks, and physical channel removal.

Structured methods (PFP, PFEC, SoftNet, NNrelief neuron removal) are simulated with masks, as every
method in prunelab is (docs/methods/README.md). This package maps a model's coupled channels, turns chosen
channels into masks, and turns such a masked model into a physically smaller dense model that computes
the same function, so that the speed-up can be measured. One job per module:

* :mod:`.graph`: the channel (coupling) graph, :func:`channel_graph`;
* :mod:`.channels`: channel masks, :func:`channel_masks`;
* :mod:`.layers`: :class:`GatheredConv1d` / :class:`GatheredConv2d` / :class:`GatheredLinear`, layers reading a
  subset of their inputs;
* :mod:`.removable`: which channels can be removed exactly, and folding the constants they carry;
* :mod:`.compaction`: :func:`compact` (the cut, the re-indexed masks, the plan) and the equivalence check;
* :mod:`.files`: :func:`save_compact` / :func:`load_compact`, without pickle.

What a compact model costs (:func:`structured_metrics`, :func:`compare_latency`) lives in
:mod:`prunelab.metrics` and is re-exported here.
"""

from ..metrics import compare_latency, structured_metrics
from .channels import channel_masks
from .compaction import PLAN_FORMAT, CompactReport, compact, equivalence
from .files import apply_plan, load_compact, save_compact
from .graph import (ChannelGraph, ChannelGroup, Slice, attention_modules, channel_graph, is_depthwise,
                    shortcut_destination)
from .layers import GatheredConv1d, GatheredConv2d, GatheredLinear

__all__ = ["PLAN_FORMAT", "ChannelGraph", "ChannelGroup", "CompactReport", "GatheredConv1d", "GatheredConv2d",
           "GatheredLinear", "Slice", "apply_plan", "attention_modules", "channel_graph", "channel_masks", "compact",
           "compare_latency", "equivalence", "is_depthwise", "load_compact", "save_compact", "shortcut_destination",
           "structured_metrics"]
