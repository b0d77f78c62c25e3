"""A stage's backward, whole (B) or split into input gradient (I) and weight gradients (W).

The split works on the autograd graph of any stage module, without knowing its layers:

* ``backward_input`` walks the graph from the stage output and finds the *split nodes*: the
  nodes on a path to the stage input that also feed a subgraph leading only to parameters
  (e.g. a linear layer's matmul: its input gradient goes on down the stage, its weight
  gradient only to the weight). It records the gradient that arrives at each split node
  (a pre-hook), then computes the input gradient alone, keeping the graph.
* ``WeightGrad.run`` later re-enters each split node with its recorded gradient, asking
  only for the parameters below it, so W does the weight-gradient matmuls and nothing of
  the input-gradient chain again; gradients accumulate in ``.grad`` as in ``backward()``.

Where the split would not be exact (no stage input needs a gradient, e.g. the first stage,
or one parameter sits below two split nodes, e.g. a weight used twice in one stage), I
does nothing but remember the output gradient and W runs the full backward: still correct,
just without the overlap.
"""
from __future__ import annotations

import torch
from torch.autograd.graph import GradientEdge, get_gradient_edge


def backward(output: torch.Tensor, grad: torch.Tensor | None) -> None:
    """Full backward of ``output`` (the loss when ``grad`` is None)."""
    if grad is None:
        output.backward()
    else:  # the executor may have freed the sent output's storage: start from its graph
        # edge, whose recorded shape (not the freed tensor's) the gradient is checked against
        torch.autograd.backward(get_gradient_edge(output), grad)


class WeightGrad:
    """The W half of a split backward: ``run()`` accumulates the weight gradients."""

    def __init__(self, output=None, grad=None, splits=None):
        self._output, self._grad = output, grad  # fallback: a full backward
        self._splits = splits or []  # [(split node, recorded grads, [params below])]

    def run(self) -> None:
        if self._output is not None:
            backward(self._output, self._grad)
        for node, (grads, versions), params in self._splits:
            if any(g is not None and g._version != v for g, v in zip(grads, versions)):
                raise RuntimeError(
                    f"{node.name()} changed the gradient it received in place during the "
                    f"input-gradient pass, so its weight gradients cannot be computed later; "
                    f"run this stage with B instead of I + W, or make that backward leave "
                    f"its incoming gradient unchanged")
            edges = [GradientEdge(node, i) for i, g in enumerate(grads) if g is not None]
            values = [g for g in grads if g is not None]
            if edges:
                torch.autograd.backward(edges, values, inputs=params, retain_graph=True)
        self._output = self._grad = self._splits = None  # drop the graph


def _postorder(root):
    """Nodes reachable from ``root``, every node after all of its children; and children."""
    order, children, seen, stack = [], {}, set(), [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
            continue
        if node in seen:
            continue
        seen.add(node)
        kids = [(c, nr) for c, nr in node.next_functions if c is not None]
        children[node] = kids
        stack.append((node, True))
        stack.extend((c, False) for c, _ in reversed(kids) if c not in seen)
    return order, children


def _reaches(order, children, targets) -> dict:
    """node -> True if a path leads from it to a node in ``targets``."""
    result = {}
    for n in order:  # children first
        result[n] = n in targets or any(result[c] for c, _ in children[n])
    return result


def _params_below(nodes, children, params) -> list[torch.Tensor]:
    found, seen, stack = [], set(), list(nodes)
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n in params:
            found.append(params[n])
        stack.extend(c for c, _ in children[n])
    return found


def backward_input(output: torch.Tensor, grad: torch.Tensor | None,
                   inputs: list[torch.Tensor]) -> tuple[list, WeightGrad]:
    """Gradients of ``inputs`` (leaves that require grad) only, and the deferred W.

    ``output`` is the stage output with its gradient ``grad``, or the loss with None; once
    the split is made it is detached in place (its graph above the split nodes is freed)."""
    if not any(x.requires_grad for x in inputs):  # first stage: I has nothing to do
        return [None] * len(inputs), WeightGrad(output, grad)
    root = get_gradient_edge(output)
    seed = torch.ones_like(output) if grad is None else grad
    order, children = _postorder(root.node)
    input_nodes = {get_gradient_edge(x).node for x in inputs if x.requires_grad}
    params = {n: n.variable for n in order
              if hasattr(n, "variable") and n not in input_nodes}  # AccumulateGrad nodes
    on_input_path = _reaches(order, children, input_nodes)
    below_params = _reaches(order, children, set(params))

    splits, split_of_param = [], {}
    for n in reversed(order):  # from the output down: the order every TP rank shares
        if not on_input_path[n]:
            continue
        param_children = [c for c, _ in children[n] if not on_input_path[c] and below_params[c]]
        if param_children:
            below = _params_below(param_children, children, params)
            for p in below:
                split_of_param.setdefault(id(p), []).append(n)
            splits.append((n, below))
    if any(len(nodes) > 1 for nodes in split_of_param.values()):
        backward(output, grad)  # not separable: the whole backward now, W has nothing left
        return [x.grad if x.requires_grad else None for x in inputs], WeightGrad()

    recorded = {}
    handles = [n.register_prehook(lambda g, n=n: recorded.__setitem__(
                   n, (g, [None if t is None else t._version for t in g])))
               for n, _ in splits]
    wanted = [x for x in inputs if x.requires_grad]
    try:
        grads = iter(torch.autograd.grad([root], wanted, [seed], retain_graph=True))
    finally:
        for h in handles:
            h.remove()
    # W restarts at the split nodes: what lies between them and the output (e.g. the loss
    # and its saved logits) is not needed any more, so let it go now (a view cannot be
    # detached in place; its graph then lives until W).
    if output._base is None:
        output.detach_()
    return ([next(grads) if x.requires_grad else None for x in inputs],
            WeightGrad(splits=[(n, recorded[n], below) for n, below in splits if n in recorded]))
