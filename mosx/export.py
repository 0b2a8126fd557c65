"""Export an :class:`mosx.OODGate` (or any module using the mosx ops) for deployment.

- ``pt2``: :func:`torch.export.export` of the gate, saved with :func:`torch.export.save`. The graph
  keeps the ``torch.ops.mosx.*`` custom ops (traced through their fake kernels); loading it needs
  ``import mosx`` first (which registers the ops), and it runs on every device mosx was built for.
- ``onnx``: ``torch.onnx.export(..., dynamo=True)`` with a translation table (:func:`onnx_translations`)
  that rewrites ``mosx::group_softmax_score``, ``mosx::group_predict`` and ``mosx::group_softmax``
  into standard ONNX ops, so the file runs in any ONNX runtime with no mosx code. The group
  layout is baked into the graph as constants: the logits are gathered into a padded
  ``[N, K, S]`` block (K groups, S = the largest group's logits, others slot included) with a
  constant index, padding masked to -inf; then ReduceMax / Exp / ReduceSum per group give the
  group softmax, and ArgMax / GatherElements the group prediction (first index on ties, as the
  kernels). The block costs N * K * S floats, about the logits' size for balanced groups; a very
  uneven grouping (one large group and many small ones) makes it larger.

Command line (``mosx export``): a gate file exports as it is; a model file takes ``--calibrate
ID_FOLDER`` (with ``--tpr``, ``--scorer``) and is calibrated first::

    mosx export --model gate.pt --format onnx --out gate.onnx --image-size 32
    mosx export --model model.pt --calibrate data/id_val --tpr 0.95 --scorer mos --format pt2 --out gate.pt2
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch
from torch import nn

from .groups import Groups, as_groups

__all__ = ["export_pt2", "export_onnx", "onnx_translations", "example_input", "main"]

OUTPUT_NAMES = ("pred", "conf", "score", "is_ood")


# ------------------------------------------------------------------------------ helpers
def _in_chans(module: nn.Module) -> int:
    conv = next((m for m in module.modules() if isinstance(m, nn.Conv2d)), None)
    return int(conv.in_channels) if conv is not None else 3


def example_input(module: nn.Module, image_size: int = 224, batch: int = 2) -> torch.Tensor:
    """A [batch, C, H, W] zero tensor on the module's device, C the first conv's input channels."""
    p = next(module.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    return torch.zeros(batch, _in_chans(module), image_size, image_size, device=device)


def _dynamic_batch(example: torch.Tensor, dynamic_batch: bool):
    if not dynamic_batch:
        return None
    return ({0: torch.export.Dim("batch")},)


def _gate_groups(module: nn.Module) -> Groups | None:
    g = getattr(module, "groups", None)
    return g if isinstance(g, Groups) else None


# ------------------------------------------------------------------------------ pt2
def export_pt2(
    module: nn.Module,
    path=None,
    example: torch.Tensor | None = None,
    *,
    image_size: int = 224,
    dynamic_batch: bool = True,
):
    """torch.export of `module` on `example` (default: zeros from :func:`example_input`); the
    batch dimension is dynamic unless dynamic_batch=False. Saved to `path` when given. Returns the
    ExportedProgram."""
    module.eval()
    x = example if example is not None else example_input(module, image_size)
    ep = torch.export.export(module, (x,), dynamic_shapes=_dynamic_batch(x, dynamic_batch))
    if path is not None:
        torch.export.save(ep, os.fspath(path))
    return ep


# ------------------------------------------------------------------------------ onnx
class _Layout:
    """The constant index tables of a grouping, as NumPy arrays."""

    def __init__(self, groups: Groups):
        off = [int(v) for v in groups.offsets.tolist()]
        sizes = list(groups.sizes)
        logit_class = groups.logit_class.tolist()
        k, s = len(sizes), max(sizes) + 1
        self.num_groups, self.width, self.num_logits = k, s, off[-1]
        self.index = np.zeros((k, s), dtype=np.int64)  # logit position of slot j of group k (0: others)
        self.valid = np.zeros((k, s), dtype=bool)
        self.classes = np.zeros((k, s - 1), dtype=np.int64)  # class id of class slot j of group k
        for g in range(k):
            n = sizes[g] + 1
            self.index[g, :n] = np.arange(off[g], off[g] + n)
            self.index[g, n:] = off[g]
            self.valid[g, :n] = True
            self.classes[g, : n - 1] = logit_class[off[g] + 1 : off[g] + n]
        self.others = np.asarray(off[:-1], dtype=np.int64)
        # [L] group of each logit position and [L] slot within its group (for group_softmax).
        self.logit_group = np.repeat(np.arange(k, dtype=np.int64), [z + 1 for z in sizes])
        self.logit_slot = np.concatenate([np.arange(z + 1, dtype=np.int64) for z in sizes])


def onnx_translations(groups, opset_version: int = 18) -> dict:
    """{mosx op overload: traced onnxscript function} for ``torch.onnx.export(...,
    custom_translation_table=...)``, built for one grouping (its layout becomes graph constants;
    the ops' own offsets inputs are not read). Every function uses standard ONNX ops only."""
    import onnx_ir as ir
    from onnxscript import opset18 as op

    lay = _Layout(as_groups(groups))
    S = lay.width

    def const(arr):
        return op.Constant(value=ir.tensor(np.ascontiguousarray(arr)))

    def check_width(x):
        shape = getattr(x, "shape", None)
        if shape is not None and len(shape) == 2 and isinstance(shape[1], int) and shape[1] != lay.num_logits:
            raise ValueError(
                f"mosx ONNX export: the logits have {shape[1]} columns but the grouping the "
                f"translation table was built for needs {lay.num_logits}"
            )

    def blocks(x):
        """(block [N, K, S] with -inf padding, max m [N, K], sum s [N, K]) of the groups."""
        check_width(x)
        g = op.Gather(x, const(lay.index), axis=1)  # [N, K, S]
        neg_inf = op.CastLike(const(np.array(-np.inf, dtype=np.float32)), x)
        g = op.Where(const(lay.valid), g, neg_inf)
        m = op.ReduceMax(g, const(np.array([2], dtype=np.int64)), keepdims=1)  # [N, K, 1]
        s = op.ReduceSum(op.Exp(op.Sub(g, m)), const(np.array([2], dtype=np.int64)), keepdims=0)  # [N, K]
        return g, op.Squeeze(m, const(np.array([2], dtype=np.int64))), s

    def group_softmax_score(logits, offsets):
        _, m, s = blocks(logits)
        x0 = op.Gather(logits, const(lay.others), axis=1)  # [N, K] the others logits
        p = op.Div(op.Exp(op.Sub(x0, m)), s)  # p_others per group
        group = op.ArgMin(p, axis=1, keepdims=1)  # [N, 1], first on ties
        score = op.Neg(op.ReduceMin(p, const(np.array([1], dtype=np.int64)), keepdims=0))
        lse = op.Add(m, op.Log(s))
        min_lse = op.Squeeze(op.GatherElements(lse, group, axis=1), const(np.array([1], dtype=np.int64)))
        return score, op.Squeeze(group, const(np.array([1], dtype=np.int64))), min_lse

    def group_predict(logits, offsets, logit_class):
        g, m, s = blocks(logits)
        cls_block = op.Slice(
            g,
            const(np.array([1], dtype=np.int64)),
            const(np.array([S], dtype=np.int64)),
            const(np.array([2], dtype=np.int64)),
        )  # [N, K, S-1] class slots only
        arg = op.ArgMax(cls_block, axis=2, keepdims=0)  # [N, K] first on ties
        best = op.ReduceMax(cls_block, const(np.array([2], dtype=np.int64)), keepdims=0)  # [N, K]
        prob = op.Div(op.Exp(op.Sub(best, m)), s)  # [N, K]
        group = op.ArgMax(prob, axis=1, keepdims=1)  # [N, 1] first on ties
        one = const(np.array([1], dtype=np.int64))
        slot = op.GatherElements(arg, group, axis=1)  # [N, 1]
        flat = op.Add(op.Mul(group, const(np.array([S - 1], dtype=np.int64))), slot)
        cls = op.Gather(const(lay.classes.reshape(-1)), op.Squeeze(flat, one), axis=0)  # [N]
        p = op.Squeeze(op.GatherElements(prob, group, axis=1), one)
        return cls, p, op.Squeeze(group, one)

    def group_softmax(logits, offsets, log: bool = False):
        _, m, s = blocks(logits)
        lg = const(lay.logit_group)
        m_l = op.Gather(m, lg, axis=1)  # [N, L] the group max at every logit
        s_l = op.Gather(s, lg, axis=1)
        shifted = op.Sub(logits, m_l)
        if log:
            return op.Sub(shifted, op.Log(s_l))
        return op.Div(op.Exp(shifted), s_l)

    ops = torch.ops.mosx
    return {
        ops.group_softmax_score.default: group_softmax_score,
        ops.group_predict.default: group_predict,
        ops.group_softmax.default: group_softmax,
    }


def export_onnx(
    module: nn.Module,
    path=None,
    example: torch.Tensor | None = None,
    *,
    groups=None,
    image_size: int = 224,
    dynamic_batch: bool = True,
    opset_version: int = 18,
    optimize: bool = True,
):
    """ONNX export with the mosx ops rewritten into standard ONNX ops (see the module docstring).

    groups: the grouping the mosx ops run on (default: ``module.groups``, an OODGate's); a module
    without grouped ops needs none. Inputs are named "images"; an OODGate's outputs "pred",
    "conf", "score", "is_ood". Returns the torch.onnx ONNXProgram (saved to `path` when given).
    """
    module.eval()
    g = groups if groups is not None else _gate_groups(module)
    table = onnx_translations(g, opset_version) if g is not None else None
    x = example if example is not None else example_input(module, image_size)
    gated = type(module).__name__ == "OODGate"
    prog = torch.onnx.export(
        module,
        (x,),
        dynamo=True,
        custom_translation_table=table,
        input_names=["images"],
        output_names=list(OUTPUT_NAMES) if gated else None,
        dynamic_shapes=_dynamic_batch(x, dynamic_batch),
        opset_version=opset_version,
        optimize=optimize,
        verbose=False,
    )
    if path is not None:
        prog.save(os.fspath(path))
    return prog


# ------------------------------------------------------------------------------ command line
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mosx export",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Export an OOD gate (model + score + threshold) to ONNX or a torch.export .pt2 file. "
        "--model is a gate file (OODGate.save), or a mosx model file with --calibrate ID_FOLDER "
        "to calibrate the gate first (then --save-gate keeps it as a gate file).",
    )
    p.add_argument(
        "--model", required=True, help="gate file, or a model file (any form mosx.load_model reads) with --calibrate"
    )
    p.add_argument("--format", required=True, choices=("onnx", "pt2"))
    p.add_argument("--out", required=True, help="output file")
    p.add_argument(
        "--calibrate",
        metavar="ID_FOLDER",
        help="ID validation images (class sub-folders or a list file) to calibrate the threshold on",
    )
    p.add_argument("--tpr", type=float, default=0.95, help="fraction of the calibration images kept as ID")
    p.add_argument(
        "--scorer",
        default=None,
        help="mos (grouped model; the default then), msp (flat; the "
        "default then), maxlogit, energy[:temperature=T], odin:temperature=T, entropy, gen[:gamma=G,M=M]",
    )
    p.add_argument(
        "--groups",
        help="grouping of a grouped model not stored in its file: groups .json, list file, or sizes '398,521,...'",
    )
    p.add_argument("--fpr-rule", choices=("nearest", "first"), default="nearest")
    p.add_argument("--save-gate", metavar="FILE", help="also write the calibrated gate file")
    p.add_argument(
        "--image-size",
        type=int,
        help="input height = width of the export (default: the training "
        "config's eval_resize in the model file, else 224); also the "
        "calibration transform's",
    )
    p.add_argument("--resize", choices=("squash", "crop"), default="squash")
    p.add_argument("--mean", type=float, nargs=3, default=None, help="default: the training config's, else 0.5")
    p.add_argument("--std", type=float, nargs=3, default=None, help="default: the training config's, else 0.5")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--static-batch", action="store_true", help="fix the batch size to 2 instead of a dynamic one")
    return p


def _config_of(path: str) -> dict:
    from .models.files import read_file

    try:
        d = read_file(path)
    except Exception:  # only a hint for defaults
        return {}
    if not isinstance(d, dict):
        return {}
    d = d.get("model", d) if str(d.get("format", "")).startswith("mosx.gate/") else d
    cfg = d.get("config") if isinstance(d, dict) else None
    return cfg if isinstance(cfg, dict) else {}


def _calibration_batches(folder: str, in_chans: int, image_size: int, resize: str, mean, std, batch_size: int):
    from .evaluate.images import ImageDataset, image_list, make_transform

    images = image_list(folder, "calibration", labeled=False)
    tf = make_transform(image_size, resize, mean, std, in_chans=in_chans)
    ds = ImageDataset(images, tf, (in_chans, image_size, image_size))
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False)
    for x, idx, ok in loader:
        if not bool(ok.all()):
            bad = images.item_name(int(idx[~ok][0]))
            raise ValueError(f"--calibrate: cannot read {bad} (and {int((~ok).sum()) - 1} more in this batch)")
        yield x


def main(argv=None) -> int:
    from .gate import OODGate
    from .models.files import load_model

    args = _parser().parse_args(argv)
    if not 0 < args.tpr <= 1:
        print(f"mosx export: --tpr must be in (0, 1], got {args.tpr}", file=sys.stderr)
        return 2
    cfg = _config_of(args.model) if os.path.isfile(args.model) else {}
    image_size = args.image_size or int(cfg.get("eval_resize") or 224)
    mean = args.mean or list(cfg.get("mean") or (0.5, 0.5, 0.5))
    std = args.std or list(cfg.get("std") or (0.5, 0.5, 0.5))
    try:
        model, info = load_model(args.model)
        if isinstance(model, OODGate):
            if args.calibrate:
                raise ValueError(f"{args.model} is a gate file (already calibrated); --calibrate takes a model file")
            gate = model
        else:
            if not args.calibrate:
                raise ValueError(
                    f"{args.model} is a model, not a gate file: give --calibrate ID_FOLDER (and --tpr, "
                    "--scorer) to build the gate, or a gate file written by OODGate.save / --save-gate"
                )
            groups = info.get("groups")
            if args.groups:
                from .evaluate.run import _parse_groups

                groups = _parse_groups(args.groups)
            scorer = args.scorer or ("mos" if groups is not None else "msp")
            in_chans = int(info.get("in_chans") or _in_chans(model))
            batches = _calibration_batches(
                args.calibrate, in_chans, image_size, args.resize, mean, std, args.batch_size
            )
            gate = OODGate.calibrate(
                (model, info), batches, scorer=scorer, groups=groups, tpr=args.tpr, fpr_rule=args.fpr_rule
            )
            c = gate.calibration
            print(
                f"calibrated {gate.scorer} on {c['num_images']} images: threshold {float(gate.threshold):.9g}, "
                f"kept {c['kept']} ({100 * c['measured_tpr']:.2f}%, asked {100 * args.tpr:g}%)"
            )
            if args.save_gate:
                gate.save(args.save_gate)
                print(f"wrote {args.save_gate}")
        x = example_input(gate, image_size, batch=2)
        if args.format == "pt2":
            export_pt2(gate, args.out, x, dynamic_batch=not args.static_batch)
        else:
            export_onnx(gate, args.out, x, dynamic_batch=not args.static_batch)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"mosx export: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({args.format}, input [N, {x.shape[1]}, {image_size}, {image_size}])")
    return 0
