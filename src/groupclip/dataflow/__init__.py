"""Batch-ness by data flow: which tensors of a forward pass are per-sample, and where their samples are.

A tensor is per-sample if and only if it derives from the batched inputs of the forward pass. The batch tracker
(:class:`~groupclip.dataflow.mode.BatchTracker`) follows every torch op of the forward pass and tags its results
(:mod:`groupclip.dataflow.tags`), using a layout rule per op (:mod:`groupclip.dataflow.rules`); register one for
an op groupclip does not know with :func:`register_layout_rule`.
"""

from .rules import Call, LayoutLost, register_layout_rule
from .tags import Kind, Tag

__all__ = ["Call", "Kind", "LayoutLost", "Tag", "register_layout_rule"]
