"""Inference on images: `Predictor`, exported StableHLO models, COCO evaluation."""
