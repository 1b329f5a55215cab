"""Training data: TFDS builders (a local COCO-format folder, synthetic shapes) read without
TensorFlow, and the grain input pipeline producing fixed-shape NumPy batches.

Import the submodules: `maskrcnn_jax.data.builders` (`load`, `coco_ground_truth`, ...),
`maskrcnn_jax.data.pipeline` (`make_dataset`). Their parts: COCO folders (`coco` records,
`coco_defects`, `coco_rle`, `images`), synthetic `shapes`; per image `transform` and
`mask_crops`; training `samplers`, evaluation `eval_shards`, canvas `record_buckets`.
"""
