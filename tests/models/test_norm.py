"""`models.norm.BatchNorm` against torch's `nn.BatchNorm2d`: training (batch statistics, the
running statistics' update with momentum 0.1 and unbiased variance, gradients through the
statistics), a mask selecting the entries (torch on those entries alone), and inference."""

import jax
import jax.numpy as jnp
import numpy as np
import torch

from maskrcnn_jax.models.norm import BatchNorm, fit_norm_layout


def _torch_bn(channels, seed):
    bn = torch.nn.BatchNorm2d(channels).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(channels, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(channels, generator=g))
        bn.running_mean.copy_(torch.randn(channels, generator=g))
        bn.running_var.copy_(torch.rand(channels, generator=g) + 0.5)
    return bn


def _variables(bn):
    return {"params": {"weight": bn.weight.detach().numpy(), "bias": bn.bias.detach().numpy()},
            "batch_stats": {"running_mean": bn.running_mean.numpy().copy(),
                            "running_var": bn.running_var.numpy().copy(),
                            "num_batches_tracked": np.zeros((), np.int32)}}


def _nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


def test_train_mode_matches_torch_with_and_without_mask():
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, (5, 8, 4, 6))  # NCHW for torch
    for mask in (None, np.asarray([True, False, True, True, False])):
        bn = _torch_bn(8, 1).train()
        v = _variables(bn)
        xt = torch.from_numpy(x if mask is None else x[mask]).requires_grad_(True)
        out = bn(xt)
        (out * torch.arange(out.numel(), dtype=torch.float64).reshape(out.shape).cos()).sum() \
            .backward()
        with jax.enable_x64(True):
            def f(params, xs):
                y, upd = BatchNorm().apply({**v, "params": params}, xs, True,
                                           None if mask is None else mask[:, None, None],
                                           mutable=["batch_stats"])
                return y, upd

            xs = jnp.asarray(x.transpose(0, 2, 3, 1))
            y, upd = f(v["params"], xs)
            sel = slice(None) if mask is None else mask
            np.testing.assert_allclose(np.asarray(y)[sel], _nhwc(out), rtol=1e-10, atol=1e-10)
            stats = upd["batch_stats"]
            np.testing.assert_allclose(stats["running_mean"], bn.running_mean.numpy(), rtol=1e-12)
            np.testing.assert_allclose(stats["running_var"], bn.running_var.numpy(), rtol=1e-12)
            assert int(stats["num_batches_tracked"]) == int(bn.num_batches_tracked) == 1
            cot = np.cos(np.arange(out.numel())).reshape(out.shape)  # (n, c, h, w) of the subset

            def loss(params, xs):
                y, _ = f(params, xs)
                return jnp.sum(jnp.asarray(y)[sel] * jnp.asarray(cot.transpose(0, 2, 3, 1)))

            gp, gx = jax.grad(loss, argnums=(0, 1))(v["params"], xs)
        np.testing.assert_allclose(gp["weight"], bn.weight.grad.numpy(), rtol=1e-9)
        np.testing.assert_allclose(gp["bias"], bn.bias.grad.numpy(), rtol=1e-9)
        np.testing.assert_allclose(np.asarray(gx)[sel], _nhwc(xt.grad), rtol=1e-8, atol=1e-10)
        if mask is not None:  # masked-out entries neither count nor get a gradient
            assert not np.any(np.asarray(gx)[~mask])


def test_inference_uses_running_statistics():
    bn = _torch_bn(8, 2).eval()
    x = np.random.default_rng(1).normal(size=(3, 8, 5, 5))
    ours = BatchNorm().apply(_variables(bn), jnp.asarray(x.transpose(0, 2, 3, 1), jnp.float32))
    np.testing.assert_allclose(ours, _nhwc(bn(torch.from_numpy(x))), rtol=1e-5, atol=1e-5)


def test_fit_norm_layout_moves_the_affine_map():
    frozen = {"params": {"conv": {"kernel": np.ones(2)}},
              "batch_stats": {"bn": {k: np.full(3, i, np.float32) for i, k in enumerate(
                  ("weight", "bias", "running_mean", "running_var"))}}}
    trainable = fit_norm_layout(frozen, ["params/conv/kernel", "params/bn/weight",
                                         "params/bn/bias", "batch_stats/bn/running_mean",
                                         "batch_stats/bn/running_var",
                                         "batch_stats/bn/num_batches_tracked"])
    assert sorted(trainable["params"]["bn"]) == ["bias", "weight"]
    assert sorted(trainable["batch_stats"]["bn"]) == ["num_batches_tracked", "running_mean",
                                                      "running_var"]
    back = fit_norm_layout(trainable, ["params/conv/kernel"] + [
        f"batch_stats/bn/{k}" for k in ("weight", "bias", "running_mean", "running_var")])
    assert sorted(back["batch_stats"]["bn"]) == ["bias", "running_mean", "running_var", "weight"]
    assert "bn" not in back["params"]
    np.testing.assert_array_equal(back["batch_stats"]["bn"]["bias"], np.ones(3))
