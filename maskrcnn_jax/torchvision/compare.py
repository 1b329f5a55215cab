"""Stage-by-stage parity report between torchvision and maskrcnn_jax on one checkpoint.

    python convert.py model.pth --out=DIR --compare=IMAGE[,IMAGE...]   # the command line
    rows = compare_image(torchvision_model, predictor, image); print(format_rows(rows))

For users whose numbers drift: runs torchvision's `maskrcnn_resnet50_fpn` with the state dict and
the converted maskrcnn_jax model on each image and prints, per stage (backbone levels, FPN levels,
RPN logits and deltas, proposals, box head on torchvision's proposals, detections, masks), the max
absolute and relative difference. Each stage after the RPN is fed the same inputs on both sides
where that is possible, so a difference points at the stage that made it.
"""

import numpy as np


def _diff(ours, theirs):
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    if ours.shape != theirs.shape:
        return {"shape": f"{ours.shape} vs {theirs.shape}", "max_abs": float("nan"), "max_rel": float("nan")}
    if ours.size == 0:
        return {"max_abs": 0.0, "max_rel": 0.0}
    max_abs = float(np.abs(ours - theirs).max())
    return {"max_abs": max_abs, "max_rel": max_abs / max(float(np.abs(theirs).max()), 1e-12)}


def _nhwc(t):
    return t[0].permute(1, 2, 0).numpy()


def torchvision_stages(model, image):
    """torchvision's stage outputs for one uint8 `(H, W, 3)` image (the model in eval mode)."""
    import torch

    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255.0
    with torch.no_grad():
        image_list, _ = model.transform([tensor])
        body = model.backbone.body(image_list.tensors)
        fpn = model.backbone.fpn(body)
        levels = list(fpn.values())
        objectness, deltas = model.rpn.head(levels)
        proposals = model.rpn(image_list, fpn)[0][0]
        pooled = model.roi_heads.box_roi_pool(fpn, [proposals], image_list.image_sizes)
        class_logits, box_regression = model.roi_heads.box_predictor(model.roi_heads.box_head(pooled))
        final = model([tensor])[0]
    return {
        "image_list": image_list,
        "body": [_nhwc(v) for v in body.values()],
        "fpn": [_nhwc(v) for v in levels],
        # (1, A, H, W) -> (H*W*A,) and (1, 4A, H, W) -> (H*W*A, 4): torchvision's flatten order.
        "objectness": [o[0].permute(1, 2, 0).reshape(-1).numpy() for o in objectness],
        "rpn_deltas": [d[0].permute(1, 2, 0).reshape(-1, 4).numpy() for d in deltas],
        "proposals": proposals.numpy(),
        "class_logits": class_logits.numpy(),
        "box_regression": box_regression.numpy(),
        "detections": {k: v.numpy() for k, v in final.items()},
    }


def jax_stages(predictor, image, proposals=None):
    """maskrcnn_jax's stage outputs for one image; with `proposals` (torchvision's, (P, 4)) the
    box head is also run on those."""
    import jax

    from maskrcnn_jax.data.transform import preprocess
    from maskrcnn_jax.models.maskrcnn import MaskRCNN, canvas_valid

    batch = preprocess([image], predictor.config)
    variables = predictor.variables

    def stages(images, image_sizes, padded_sizes, given):
        out = MaskRCNN(predictor.config).apply(
            variables, images, image_sizes, padded_sizes, return_intermediates=True,
            method=MaskRCNN.detect)
        inter = out.pop("intermediates")

        def head_on(m):
            body = m.backbone(images, canvas_valid(images.shape[1:3], padded_sizes))
            pooled = m.pool(inter["fpn"], given[None], padded_sizes, (7, 7))
            return body, m.box_outputs(pooled)

        body, (logits, regression) = MaskRCNN(predictor.config).apply(variables, method=head_on)
        return out, inter, body, logits, regression

    given = np.zeros((1, 4), np.float32) if proposals is None else np.asarray(proposals, np.float32)
    out, inter, body, logits, regression = jax.device_get(jax.jit(stages)(
        batch.images, batch.image_sizes, batch.padded_sizes, given))
    valid = inter["proposal_valid"][0]
    return {
        "batch": batch,
        "body": [b[0] for b in body],
        "fpn": [f[0] for f in inter["fpn"]],
        "objectness": [o[0] for o in inter["objectness"]],
        "rpn_deltas": [d[0] for d in inter["rpn_deltas"]],
        "proposals": inter["proposals"][0][valid],
        "class_logits_on_given": logits[0],
        "box_regression_on_given": regression[0],
        "detections": predictor([image])[0],
    }


def compare_image(model, predictor, image):
    """Rows `(stage, differences)` for one image; each `differences` has max_abs and max_rel."""
    tv = torchvision_stages(model, image)
    jx = jax_stages(predictor, image, tv["proposals"])
    h, w = tv["image_list"].tensors.shape[-2:]
    rows = []
    for i, (ours, theirs) in enumerate(zip(jx["body"], tv["body"])):
        rows.append((f"backbone C{i + 2}", _diff(ours[: theirs.shape[0], : theirs.shape[1]], theirs)))
    names = ["P2", "P3", "P4", "P5", "P6"]
    for name, ours, theirs in zip(names, jx["fpn"], tv["fpn"]):
        rows.append((f"FPN {name}", _diff(ours[: theirs.shape[0], : theirs.shape[1]], theirs)))
    for name, ours, theirs, fpn in zip(names, jx["objectness"], tv["objectness"], tv["fpn"]):
        # The canvas grid is larger than torchvision's: keep torchvision's (y, x) positions.
        rows.append((f"RPN logits {name}", _diff(_crop_flat(ours, fpn.shape[:2], jx, name), theirs)))
    for name, ours, theirs, fpn in zip(names, jx["rpn_deltas"], tv["rpn_deltas"], tv["fpn"]):
        rows.append((f"RPN deltas {name}", _diff(_crop_flat(ours, fpn.shape[:2], jx, name), theirs)))
    rows.append(("proposals", _diff(jx["proposals"], tv["proposals"])))
    n = len(tv["proposals"])
    rows.append(("box head class logits", _diff(jx["class_logits_on_given"][:n], tv["class_logits"])))
    rows.append(("box head box deltas", _diff(jx["box_regression_on_given"][:n], tv["box_regression"])))
    ours, theirs = jx["detections"], tv["detections"]
    for key in ("boxes", "scores", "labels"):
        rows.append((f"detections {key}", _diff(ours[key], theirs[key])))
    masks = _diff(ours["masks"], theirs["masks"])
    if ours["masks"].shape == theirs["masks"].shape and ours["masks"].size:
        masks["mean_abs"] = float(np.abs(ours["masks"] - theirs["masks"]).mean())
    rows.append(("masks", masks))
    del h, w
    return rows


def _crop_flat(flat, tv_hw, jx, name):
    """Our per-level flat RPN output on the canvas grid -> torchvision's grid of (h, w)."""
    level = ["P2", "P3", "P4", "P5", "P6"].index(name)
    canvas_hw = jx["fpn"][level].shape[:2]
    trailing = flat.shape[1:]
    grid = flat.reshape(canvas_hw[0], canvas_hw[1], -1, *trailing)
    return grid[: tv_hw[0], : tv_hw[1]].reshape(-1, *trailing)


def format_rows(rows):
    lines = [f"{'stage':<26} {'max abs diff':>13} {'max rel diff':>13}  note"]
    for stage, d in rows:
        note = d.get("shape", "")
        if "mean_abs" in d:
            note = f"mean abs {d['mean_abs']:.2e}"
        lines.append(f"{stage:<26} {d['max_abs']:13.3e} {d['max_rel']:13.3e}  {note}")
    return "\n".join(lines)
