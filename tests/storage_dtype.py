"""A check shared by the SD port tests: params are stored in param_dtype, whatever the compute dtype."""

import jax
import jax.numpy as jnp


def _dtypes(tree) -> set:
    return {leaf.dtype for leaf in jax.tree.leaves(tree)}


def assert_storage_follows_param_dtype(model_class, folder, config) -> None:
    """from_pretrained stores in param_dtype under either compute dtype; init under bf16 compute stores float32."""
    for dtype, param_dtype in ((jnp.bfloat16, jnp.float32), (jnp.float32, jnp.bfloat16)):
        module, params = model_class.from_pretrained(folder, dtype=dtype, param_dtype=param_dtype)
        assert module.dtype == dtype and _dtypes(params) == {jnp.dtype(param_dtype)}
    module = model_class.from_config(config, dtype=jnp.bfloat16)
    assert _dtypes(jax.eval_shape(lambda: module.init(jax.random.key(0), *module.dummy_inputs()))) == {
        jnp.dtype(jnp.float32)}
