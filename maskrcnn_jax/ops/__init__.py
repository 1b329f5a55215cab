"""Pure `jnp` detection ops with static shapes (no flax imports here).

Boxes are `(x1, y1, x2, y2)` in absolute pixels everywhere; padded entries are marked by a
boolean validity mask.
"""
