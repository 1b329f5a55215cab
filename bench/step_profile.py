"""Where a jitted step spends its time: one call traced with `jax.profiler` (its perfetto trace),
each executed HLO op's duration attributed to the model code that emitted it (the compiled
HLO's `source_file` / `op_name` metadata) and to forward or backward (`transpose(` in the
op name: JAX's reverse mode).

    from step_profile import profile_call, print_profile   # bench/ on sys.path
    print_profile(profile_call(jitted, *args), "train step")
"""

import collections
import glob
import gzip
import json
import os
import re
import tempfile

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?metadata=\{([^}]*)\}")
_FIELD = re.compile(r'(\w+)="([^"]*)"')

# maskrcnn_jax source file -> part of the model.
_AREAS = {
    "models/resnet.py": "backbone", "models/fpn.py": "FPN", "ops/roi_align.py": "RoIAlign",
    "ops/nms.py": "NMS", "layers/proposals.py": "proposals", "ops/boxes.py": "box ops",
    "ops/anchors.py": "anchors", "layers/targets.py": "targets & sampling",
    "ops/matcher.py": "targets & sampling", "ops/sampler.py": "targets & sampling",
    "ops/mask_targets.py": "mask targets", "training/losses.py": "losses",
    "training/train_lib.py": "train step", "models/maskrcnn.py": "MaskRCNN wiring",
    "layers/detections.py": "detections", "models/group_norm.py": "backbone",
}
_HEADS = (("rpn_head", "RPN head"), ("box_head", "box head"), ("box_predictor", "box head"),
          ("mask_head", "mask head"), ("mask_predictor", "mask head"))


def _area(op_name: str, source: str) -> str:
    if "optax" in source:
        return "optimizer"
    if "maskrcnn_jax/" not in source:
        return "other"
    path = source.rsplit("maskrcnn_jax/", 1)[1]
    if path == "models/heads.py" or path.startswith("models/"):
        for key, name in _HEADS:
            if key in op_name:
                return name
    return _AREAS.get(path, path)


def _table(text: str, title: str) -> dict:
    """`{id: body}` of one of the compiled HLO text's debug tables (FileNames, StackFrames...)."""
    rows = {}
    start = text.find("\n" + title + "\n")
    if start < 0:
        return rows
    for line in text[start + len(title) + 2:].splitlines():
        match = re.match(r"^(\d+) (.*)$", line)
        if not match:
            break
        rows[int(match.group(1))] = match.group(2)
    return rows


def _source_files(text: str) -> dict:
    """`{stack_frame_id: [file of the innermost frame, its caller's, ...]}`."""
    names = {k: v.strip('"') for k, v in _table(text, "FileNames").items()}
    locations = {k: int(re.search(r"file_name_id=(\d+)", v).group(1))
                 for k, v in _table(text, "FileLocations").items()}
    frames = {}
    for k, v in _table(text, "StackFrames").items():
        loc, parent = re.search(r"file_location_id=(\d+)", v), re.search(r"parent_frame_id=(\d+)", v)
        # parent_frame_id is the parent's id + 1 (0: none).
        frames[k] = (int(loc.group(1)) if loc else None,
                     int(parent.group(1)) - 1 if parent else None)
    out = {}
    for frame in frames:
        files, seen, current = [], set(), frame
        while current in frames and current not in seen:
            seen.add(current)
            loc, parent = frames[current]
            if loc in locations:
                files.append(names.get(locations[loc], ""))
            current = parent
        out[frame] = files
    return out


def _source(files) -> str:
    """The innermost frame in maskrcnn_jax outside ops/conv.py (else optax, else the
    innermost)."""
    for f in files:  # ops/conv.py is every conv's: the caller says which part it is
        if "maskrcnn_jax/" in f and "/.venv/" not in f and not f.endswith("ops/conv.py"):
            return f
    for f in files:
        if "optax" in f:
            return f
    return files[0] if files else ""


def hlo_attribution(compiled_text: str) -> dict:
    """`{instruction name: (area, 'forward' | 'backward')}` from optimized HLO text (its op
    names and the source files of their stack frames)."""
    frames = _source_files(compiled_text)
    out = {}
    for line in compiled_text.splitlines():
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        fields = dict(_FIELD.findall(match.group(2)))
        frame = re.search(r"stack_frame_id=(\d+)", match.group(2))
        source = fields.get("source_file") or _source(frames.get(int(frame.group(1)), [])
                                                      if frame else [])
        op_name = fields.get("op_name", "")
        out[match.group(1)] = (_area(op_name, source),
                               "backward" if "transpose(" in op_name else "forward")
    return out


def profile_call(jitted, *args):
    """Trace one call of the (already compiled) `jitted(*args)`; returns
    `{(area, direction): seconds}` summed over its HLO ops (ops run in parallel on several
    threads, so the sum can exceed the wall time)."""
    import jax

    attribution = hlo_attribution(jitted.lower(*args).compile().as_text())
    directory = tempfile.mkdtemp(prefix="jax_profile_")
    jax.block_until_ready(jitted(*args))
    jax.profiler.start_trace(directory, create_perfetto_trace=True)
    try:
        jax.block_until_ready(jitted(*args))
    finally:
        jax.profiler.stop_trace()
    path = sorted(glob.glob(os.path.join(directory, "**", "*.trace.json.gz"), recursive=True))[-1]
    with gzip.open(path) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    totals = collections.Counter()
    for event in events:
        name = event.get("name", "")
        if event.get("ph") == "X" and name in attribution:
            totals[attribution[name]] += event.get("dur", 0) * 1e-6
    return dict(totals)


def print_profile(totals: dict, title: str, top: int = 12):
    """Markdown table of the `top` (area, direction) entries, seconds and share of op time."""
    total = sum(totals.values())
    print(f"\nprofile of one {title} (sum of HLO op times {total:.2f} s):")
    print("| part | direction | s | share |\n|---|---|---:|---:|")
    for (area, direction), seconds in sorted(totals.items(), key=lambda kv: -kv[1])[:top]:
        print(f"| {area} | {direction} | {seconds:.2f} | {seconds / total:.0%} |")
