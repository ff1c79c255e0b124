"""Run a small feed-forward ONNX graph as a torch module, so it carries gradients.

ONNX Runtime cannot backpropagate to its inputs; the attribute classifiers must. This interpreter walks the
graph's nodes in their (topological) order and evaluates each with the matching torch op. Initializers
become buffers: frozen, moved by ``.to(device, dtype)``, never trained. Only the ops the shipped
classifier graphs use are supported; anything else is refused at load time, not at the first forward.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fairdiff_ray.errors import ModelFileError

Attrs = dict[str, Any]


def _pads_2d(pads: list[int]) -> tuple[int, int] | None:
    """ONNX [top, left, bottom, right] -> torch's symmetric (top, left), or None when asymmetric."""
    if len(pads) != 4:
        raise ValueError(f"only 2-D pads are supported, got {pads}")
    top, left, bottom, right = pads
    return (top, left) if (top, left) == (bottom, right) else None


def _spatial_pad(x: torch.Tensor, pads: list[int], value: float) -> torch.Tensor:
    top, left, bottom, right = pads
    return F.pad(x, (left, right, top, bottom), value=value)


def _conv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, **a: Any) -> torch.Tensor:
    pads = a.get("pads", [0, 0, 0, 0])
    sym = _pads_2d(pads)
    if sym is None:
        x, sym = _spatial_pad(x, pads, 0.0), (0, 0)
    return F.conv2d(
        x,
        w,
        b,
        stride=a.get("strides", 1),
        padding=sym,
        dilation=a.get("dilations", 1),
        groups=a.get("group", 1),
    )


def _pool(kind: str) -> Callable[..., torch.Tensor]:
    def run(x: torch.Tensor, **a: Any) -> torch.Tensor:
        pads = a.get("pads", [0, 0, 0, 0])
        sym = _pads_2d(pads)
        if sym is None:
            raise ValueError(f"asymmetric {kind} pads {pads} are not supported")
        kw = dict(kernel_size=a["kernel_shape"], stride=a.get("strides", 1), padding=sym)
        if kind == "max":
            if a.get("dilations", [1, 1]) != [1, 1] or a.get("storage_order", 0):
                raise ValueError("MaxPool with dilations or storage_order is not supported")
            return F.max_pool2d(x, ceil_mode=bool(a.get("ceil_mode", 0)), **kw)
        return F.avg_pool2d(
            x,
            ceil_mode=bool(a.get("ceil_mode", 0)),
            count_include_pad=bool(a.get("count_include_pad", 0)),
            **kw,
        )

    return run


def _pad(
    x: torch.Tensor,
    pads: torch.Tensor,
    value: torch.Tensor | None = None,
    axes: torch.Tensor | None = None,
    **a: Any,
) -> torch.Tensor:
    if a.get("mode", b"constant") not in (b"constant", "constant"):
        raise ValueError(f"Pad mode {a['mode']!r} is not supported")
    p = [int(v) for v in pads.tolist()]
    dims = list(range(x.ndim)) if axes is None else [int(d) % x.ndim for d in axes.tolist()]
    begin, end = p[: len(dims)], p[len(dims) :]
    torch_pads = [0] * (2 * x.ndim)
    for d, b0, e0 in zip(dims, begin, end):  # torch lists (begin, end) pairs from the last dim backwards
        torch_pads[2 * (x.ndim - 1 - d)] = b0
        torch_pads[2 * (x.ndim - 1 - d) + 1] = e0
    fill = 0.0 if value is None or value.numel() == 0 else float(value.reshape(-1)[0])
    return F.pad(x, torch_pads, value=fill)


def _gemm(a_: torch.Tensor, b_: torch.Tensor, c_: torch.Tensor | None = None, **a: Any) -> torch.Tensor:
    a_ = a_.transpose(0, 1) if a.get("transA", 0) else a_
    b_ = b_.transpose(0, 1) if a.get("transB", 0) else b_
    out = a.get("alpha", 1.0) * (a_ @ b_)
    return out if c_ is None else out + a.get("beta", 1.0) * c_


def _flatten(x: torch.Tensor, **a: Any) -> torch.Tensor:
    axis = a.get("axis", 1)
    axis = axis + x.ndim if axis < 0 else axis
    return x.reshape(math.prod(x.shape[:axis]), -1)


OPS: dict[str, Callable[..., torch.Tensor]] = {
    "Conv": _conv,
    "Add": lambda x, y, **a: x + y,
    "Sub": lambda x, y, **a: x - y,
    "Mul": lambda x, y, **a: x * y,
    "Div": lambda x, y, **a: x / y,
    "Relu": lambda x, **a: F.relu(x),
    "Identity": lambda x, **a: x,
    "MaxPool": _pool("max"),
    "AveragePool": _pool("avg"),
    "GlobalAveragePool": lambda x, **a: x.mean(dim=tuple(range(2, x.ndim)), keepdim=True),
    "Pad": _pad,
    "Flatten": _flatten,
    "Gemm": _gemm,
    "Softmax": lambda x, **a: torch.softmax(x, dim=a.get("axis", -1)),
}


def _safe(name: str) -> str:
    return "w_" + re.sub(r"\W", "_", name)


class OnnxGraphModule(nn.Module):
    """An ONNX graph evaluated with torch ops; differentiable in its input.

    ``output`` picks which tensor ``forward`` returns: the graph output by default, or any intermediate
    tensor by name (e.g. the pre-softmax ``"logits"``).
    """

    def __init__(self, path: str | Path, output: str | None = None) -> None:
        super().__init__()
        import onnx
        from onnx import numpy_helper

        try:
            model = onnx.load(str(path))
        except Exception as exc:  # missing file, truncated download, not an ONNX protobuf
            raise ModelFileError(
                f"{path}: cannot be read as an ONNX model ({exc}); reinstall the package"
            ) from exc
        graph = model.graph
        self._buffers_by_onnx: dict[str, str] = {}
        for init in graph.initializer:
            array = numpy_helper.to_array(init).copy()
            self.register_buffer(_safe(init.name), torch.from_numpy(array))
            self._buffers_by_onnx[init.name] = _safe(init.name)
        inputs = [i.name for i in graph.input if i.name not in self._buffers_by_onnx]
        if len(inputs) != 1:
            raise ModelFileError(f"{path}: expected one graph input, found {inputs}")
        self.input_name = inputs[0]
        self.nodes: list[tuple[str, list[str], list[str], Attrs]] = []
        produced = {self.input_name, *self._buffers_by_onnx}
        for node in graph.node:
            if node.op_type not in OPS or node.domain not in ("", "ai.onnx"):
                raise ModelFileError(
                    f"{path}: ONNX op {node.domain or 'ai.onnx'}.{node.op_type} is not supported"
                )
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            self.nodes.append((node.op_type, list(node.input), list(node.output), attrs))
            produced.update(node.output)
        self.output_name = output or graph.output[0].name
        if self.output_name not in produced:
            raise ModelFileError(f"{path}: the graph has no tensor named {self.output_name!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: the graph input (e.g. (B, 3, S, S) float) -> the selected tensor."""
        env: dict[str, torch.Tensor] = {self.input_name: x}
        for onnx_name, buf in self._buffers_by_onnx.items():
            env[onnx_name] = getattr(self, buf)
        for op, ins, outs, attrs in self.nodes:
            args = [env[n] if n else None for n in ins]
            env[outs[0]] = OPS[op](*args, **attrs)
            if outs[0] == self.output_name:
                return env[outs[0]]
        return env[self.output_name]
