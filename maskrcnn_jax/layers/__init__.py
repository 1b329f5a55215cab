"""Weightless network stages (pure jnp on top of `ops`): RPN proposals, detection post-processing,
training targets and sampling."""
